"""Devices in processes of their own (``engine.device_workers: process``), on two lite CPU devices.

The same server as tests/test_devices.py, but every device's engine, feature worker and batching
worker run in a spawned device process, pictures come back through shared memory. What must
hold: the frames are the very frames the in-process path makes, binding and admission work as
before, and a device process that dies ends only its own sessions and leaves no shared memory.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.ipc.frame_ring import ResultRing
from pipeline.live.stage_times import ENGINE_STAGES, STAGES
from tests.speech import SpeechClip
from tests.test_devices import WAIT, create, devices, ended_reason, next_ended, server, until

TWO_CPU_PROCESSES = {"devices": ["cpu:0", "cpu:1"], "capacity_sessions": 2, "device_workers": "process"}
FRAMES = 60


def test_result_ring_hands_frames_over_and_waits_for_the_reader() -> None:
    ring = ResultRing.create((4, 6, 3), slots=2)
    writer = ResultRing.attach(*ring.describe())
    first = writer.put(np.full((4, 6, 3), 1, np.uint8))
    second = writer.put(np.full((4, 6, 3), 2, np.uint8))
    assert [first, second] == [(0, 1), (1, 2)]
    # the ring is full: the third frame waits for slot 0 to be released, then gives up
    third = writer.put(np.full((4, 6, 3), 3, np.uint8), timeout=0.05)
    assert third == (0, 3)
    assert writer.waits == 1 and writer.wait_seconds >= 0.04  # the wait is counted
    assert ring.take(*first) is None  # frame 1 was overwritten: reported missing, never torn
    np.testing.assert_array_equal(ring.take(*third), np.full((4, 6, 3), 3, np.uint8))
    np.testing.assert_array_equal(ring.take(*second), np.full((4, 6, 3), 2, np.uint8))
    assert writer.put(np.full((4, 6, 3), 4, np.uint8), timeout=5) == (1, 4)  # released: no wait
    assert writer.waits == 1
    with pytest.raises(ValueError, match="does not fit"):
        writer.put(np.zeros((6, 4, 3), np.uint8))
    writer.close()
    assert Path("/dev/shm", ring.name).exists()
    ring.close()
    assert not Path("/dev/shm", ring.name).exists()


def test_result_ring_slots_are_written_in_place_committed_or_abandoned() -> None:
    """reserve(): the frame is written in the slot itself; the reader sees nothing of it until
    commit(); an abandoned slot counts as read, so the writer never waits for it."""
    ring = ResultRing.create((4, 6, 3), slots=2)
    writer = ResultRing.attach(*ring.describe())
    try:
        placed = writer.reserve()
        placed.array[:] = 7
        assert ring.take(placed.slot, placed.number) is None  # not committed: never shown half-made
        again = writer.reserve()
        again.array[:] = 8
        again.commit()
        np.testing.assert_array_equal(ring.take(again.slot, again.number), np.full((4, 6, 3), 8, np.uint8))
        dropped = writer.reserve(timeout=5)  # slot 0 was released by the take above (as missing)
        dropped.abandon()  # e.g. its batch failed: no message will ever name it
        late = writer.reserve(timeout=5)  # slot 1 again
        late.array[:] = 9
        late.commit()
        following = writer.reserve(timeout=5)  # slot 0 again: free without any reader, no wait
        following.abandon()
        assert writer.waits == 0
        np.testing.assert_array_equal(ring.take(late.slot, late.number), np.full((4, 6, 3), 9, np.uint8))
    finally:
        writer.close()
        ring.close()


async def _pictures(
    state: Any, session_id: str, planar: np.ndarray, rate: int
) -> list[tuple[int, bool, np.ndarray, np.ndarray]]:
    """The first FRAMES frames of a session fed ``planar`` at once: (index, speaking, picture,
    the idle avatar frame it replaces)."""
    live = state.manager.sessions[session_id].live
    queue = live.subscribe()
    live.push(planar, rate, "mono", enforce_limit=False)
    frames = []
    while len(frames) < FRAMES:
        out = await asyncio.wait_for(queue.get(), WAIT)
        image = out.image
        if isinstance(image, asyncio.Future):
            image = await asyncio.wait_for(image, WAIT)
        frames.append((out.index, out.speaking, np.array(image), live.idle_image(out)))
    return frames


def test_device_processes_make_the_same_frames_as_threads(avatars_root: Path, speech: SpeechClip) -> None:
    """Same audio, same avatar: every picture from a device process equals the in-process one,
    speech frames are really composed (they differ from the idle avatar), and /v1/devices shows
    the processes, their batches and where each made frame's time went (``stages_ms``, both ways)."""
    planar = speech.samples[None, :].astype(np.float32)

    async def frames_of(workers: str) -> tuple[list, dict]:
        # the process run calibrates its devices (there, in each device process)
        engine = {**TWO_CPU_PROCESSES, "device_workers": workers, "capacity_sessions": 2 if workers == "thread" else 0}
        if workers == "process":
            engine["device_switch_interval_ms"] = 0.25  # not the default: it must reach the process
        async with server(avatars_root, engine=engine) as (state, http):
            created = await create(http)
            frames = await _pictures(state, created["id"], planar, speech.sample_rate)
            made = sum(1 for _, speaking, _, _ in frames if speaking)
            listed: dict = {}

            async def stages_arrived() -> None:  # a device process sends them every second
                listed.update(await devices(http))

            deadline = asyncio.get_running_loop().time() + WAIT
            await stages_arrived()
            while listed["cpu:0"]["stages_ms"].get("frames", 0) < made and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.1)
                await stages_arrived()
            return frames, listed

    threads, listed_threads = asyncio.run(frames_of("thread"))
    processes, listed = asyncio.run(frames_of("process"))
    assert [(i, s) for i, s, _, _ in processes] == [(i, s) for i, s, _, _ in threads]
    spoken = [i for i, speaking, _, _ in processes if speaking]
    assert len(spoken) >= 10, "the clip should make the avatar talk"
    for where, timed in ((listed_threads, ("queue", "batch", "finish", "slack")), (listed, tuple(s for s in STAGES if s not in ENGINE_STAGES))):
        # in the server process there is no handoff, and the lite featurizer runs inline (no
        # feature worker to time)
        stages = where["cpu:0"]["stages_ms"]
        assert stages["frames"] >= len(spoken), (stages, len(spoken))  # every made frame, delivered
        assert set(stages) == {"frames", *timed}, stages
        for stage in timed:
            p5, p50, p95 = (stages[stage][q] for q in ("p5", "p50", "p95"))
            assert p5 <= p50 <= p95, (stage, stages[stage])
            if stage != "slack":  # durations; slack is deadline - delivery and may be negative
                assert p5 >= 0, (stage, stages[stage])
        assert where["cpu:1"]["stages_ms"].get("frames", 0) == 0  # its device made nothing
    for (index, speaking, ours, idle), (_, _, theirs, _) in zip(processes, threads, strict=True):
        np.testing.assert_array_equal(ours, theirs, err_msg=f"frame {index}")
        if speaking:  # composed there, not the idle picture
            assert not np.array_equal(ours, idle), f"frame {index} is idle"

    device = listed["cpu:0"]
    assert device["capacity_source"] == "calibrated" and device["capacity"] >= 1
    assert [row["batch_size"] for row in device["calibration"]["table"]] == [1, 2, 4, 8, 16]
    assert device["process"]["alive"] and device["process"]["pid"] != os.getpid()
    assert device["process"]["result_rings"] == 1
    assert device["process"]["switch_interval_ms"] == pytest.approx(0.25)
    assert sys.getswitchinterval() == pytest.approx(0.005)  # this test's own process keeps Python's
    collector = device["process"]["gc"]  # sent with the stage times: collections, pauses, frozen start-up
    assert len(collector["collections"]) == 3 and collector["frozen_objects"] > 10_000, collector
    assert device["process"]["result_ring_waits"]["waits"] >= 0  # reported with the stage times
    assert device["frames"] >= len(spoken) and device["batches"] > 0  # batches seen from the server
    assert listed["cpu:1"]["sessions"] == 0 and listed["cpu:1"]["process"]["alive"]


def test_a_dead_device_process_ends_only_its_sessions(avatars_root: Path, speech: SpeechClip) -> None:
    """Binding over two device processes, then SIGKILL of cpu:1's process: its session ends with
    the reason, cpu:0's session keeps getting composed frames, cpu:1's shared memory is gone, new
    sessions go to cpu:0 and 503 names the failure past its capacity."""
    planar = speech.samples[None, :].astype(np.float32)

    async def scenario() -> None:
        async with server(avatars_root, engine=TWO_CPU_PROCESSES) as (state, http):
            manager, pool = state.manager, state.pool
            ids = [(await create(http))["id"] for _ in range(2)]
            sessions = [manager.sessions[i] for i in ids]
            assert [s.device for s in sessions] == ["cpu:0", "cpu:1"]
            events: list[asyncio.Queue] = []
            for session in sessions:
                session.live.subscribe()  # a viewer: active frames go through the engine
                events.append(asyncio.Queue())
                session.listeners.add(events[-1])
                for _ in range(3):
                    session.live.push(planar, speech.sample_rate, "mono")
            await until(lambda: all(s.live.stats.active_frames > 0 for s in sessions), "frames on both devices")
            dead = pool.devices["cpu:1"].link
            rings = [name for name in dead._rings_by_name]
            assert rings and all(Path("/dev/shm", name).exists() for name in rings)

            os.kill(dead.process.pid, signal.SIGKILL)
            ended = await asyncio.wait_for(next_ended(events[1]), WAIT)
            assert ended["reason"] == "device cpu:1 failed: device process exited (code -9)"
            await until(lambda: ids[1] not in manager.sessions, "the dead device's session to end")
            await until(lambda: not any(Path("/dev/shm", name).exists() for name in rings), "its rings unlinked")

            active = sessions[0].live.stats.active_frames
            await until(lambda: sessions[0].live.stats.active_frames >= active + 10, "more frames on cpu:0")
            assert ids[0] in manager.sessions and ended_reason(events[0]) is None

            listed = await devices(http)
            assert listed["cpu:1"]["state"] == "failed" and listed["cpu:1"]["error"].startswith("device process exited")
            assert listed["cpu:0"]["state"] == "ready"
            assert (await create(http))["device"] == "cpu:0"
            refused = await http.post("/v1/sessions", json={})
            assert refused.status_code == 503
            assert "cpu:1 failed: device process exited" in refused.json()["detail"]

    asyncio.run(scenario())


def test_a_skipped_frame_crosses_from_the_device_process_as_skipped() -> None:
    """The worker's SKIPPED (a frame that could not be on time) goes over the pipe as a
    ``skipped`` message, not a picture, and resolves the server's picture future to SKIPPED."""
    import concurrent.futures
    import threading

    from pipeline.live.device_link import DeviceLink, _Frame
    from pipeline.live.device_process import DeviceProcess
    from pipeline.live.worker import SKIPPED, BatchStats

    sent: list[tuple] = []
    process = DeviceProcess.__new__(DeviceProcess)
    process.channel = type("Channel", (), {"send": staticmethod(sent.append)})()
    process.rings = {}
    made: concurrent.futures.Future = concurrent.futures.Future()
    made.set_result(SKIPPED)
    process._composed("session-1", 42, made)
    assert sent == [("skipped", "session-1", 42)]

    link = DeviceLink.__new__(DeviceLink)
    link._lock = threading.Lock()
    link.stats = BatchStats()
    frame = _Frame()
    frame.features.set_result(True)
    link._frames = {"session-1": {42: frame}}
    link._handle(sent[0])
    assert frame.picture.result(timeout=1) is SKIPPED
    assert link.stats.skipped == 1 and link._frames["session-1"] == {}


def test_a_device_verdict_reaches_the_session_in_one_loop_turn(demo_avatar) -> None:
    """A frame's features and picture, resolved on a device channel's thread, are handled on the
    loop in the next turn (asyncio.wrap_future took two: its copy of the state, then its
    callbacks); in frame order; and a silent frame's picture is the idle frame."""
    import concurrent.futures
    import threading

    from pipeline.audio.windows import AudioFrame
    from pipeline.live.session import LiveSession

    class Remote:
        def __init__(self) -> None:
            self.submitted: list[tuple[concurrent.futures.Future, concurrent.futures.Future]] = []

        def submit(self, frame: AudioFrame, avatar_index: int, deadline: float, compose: bool):  # noqa: ANN201
            pair = (concurrent.futures.Future(), concurrent.futures.Future())
            self.submitted.append(pair)
            return pair

        def reset(self) -> None:
            pass

        def close(self) -> None:
            pass

    async def scenario() -> None:
        remote = Remote()
        live = LiveSession(demo_avatar, None, None, remote=remote)
        live.subscribe()
        window = np.zeros(3200, np.float32)
        outs = [live._produce_remote(AudioFrame(i, window, i == 1), 0, 1e9, np.zeros(1920, np.int16))
                for i in range(2)]
        composed = np.full_like(demo_avatar.frames[0], 7)

        def device() -> None:  # the channel's thread: both verdicts, then frame 1's picture
            remote.submitted[0][0].set_result(False)
            remote.submitted[1][0].set_result(True)
            remote.submitted[1][1].set_result(composed)

        thread = threading.Thread(target=device)
        thread.start()
        thread.join()
        await asyncio.sleep(0)  # one turn: the two verdicts (in order), then frame 1's picture hand-over
        assert outs[0].image.done() and outs[0].image.result() is not None  # silent: the idle frame
        assert np.array_equal(outs[0].image.result(), demo_avatar.frames[0])
        assert outs[1].speaking and not outs[1].image.done()  # its picture comes one turn later
        await asyncio.sleep(0)
        assert outs[1].image.done() and np.array_equal(outs[1].image.result(), composed)
        assert live.stats.active_frames == 1
        await live.close()

    asyncio.run(scenario())


def test_a_burst_of_frames_reaches_the_feature_thread_as_one_pass() -> None:
    """Frames that crossed the pipe together are queued for the feature thread in one go and
    share one pass (queued one by one, the thread woke after the first and fought the receiving
    thread for the GIL); a bad message in the burst costs only itself, commands keep their place
    between frames, and both handoff stages are recorded per frame."""
    import threading

    from pipeline.engines.base import FrameFeatures
    from pipeline.live.device_process import DeviceProcess, _Stream
    from pipeline.live.feature_worker import FeatureWorker
    from pipeline.live.stage_times import StageTimes

    passes: list[int] = []
    gate = threading.Event()

    class Batcher:
        def features(self, work):  # one pass: every stream's frames
            gate.wait(WAIT)
            passes.append(sum(len(frames) for _, frames in work))
            return [[FrameFeatures(False, None) for _ in frames] for _, frames in work]

    class Featurizer:
        batcher = Batcher()

    sent: list[tuple] = []
    process = DeviceProcess.__new__(DeviceProcess)
    process.channel = type("Channel", (), {"send": staticmethod(sent.append)})()
    process.features = FeatureWorker("test")
    process.worker = type("Worker", (), {"stages": StageTimes()})()
    process.streams = {f"s{k}": _Stream(Featurizer(), None) for k in range(8)}  # type: ignore[arg-type]
    resets: list[str] = []
    process._reset = resets.append  # type: ignore[method-assign]
    window = np.zeros(640, np.float32).tobytes()
    now = time.monotonic()

    def frame(key: str, index: int) -> tuple:
        return ("frame", key, index, window, False, 0, now + 1, True, now)

    try:
        burst = [frame(f"s{k}", 0) for k in range(8)]
        burst.insert(3, ("frame", "s1"))  # malformed
        burst.insert(5, ("frame", "nobody", 0, window, False, 0, now + 1, True, now))
        burst.append(("reset", "s0"))
        burst.append(frame("s0", 1))
        process.handle_batch(burst)
        assert resets == ["s0"]
        gate.set()
        deadline = time.monotonic() + WAIT
        while sum(1 for m in sent if m[0] == "features") < 9:
            assert time.monotonic() < deadline, sent
            time.sleep(0.01)
        # the eight frames before the reset share the first pass (the frame after it may join)
        assert passes[0] >= 8 and sum(passes) == 9, passes
        assert [m[1:3] for m in sent if m[0] == "failed"] == [("nobody", 0)]
        stages = process.worker.stages.summary()
        assert "handoff" in stages and "handoff_pipe" in stages
        assert stages["handoff"]["p50"] >= stages["handoff_pipe"]["p50"]
    finally:
        gate.set()
        process.features.close()
