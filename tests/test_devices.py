"""The device pool in a real (in-process) server: binding, admission, /v1/devices, failure isolation.

Several devices without a GPU: ``cpu:0`` and ``cpu:1`` are two lite workers, each with its own
engine, batching worker and feature worker, exactly as two GPUs would be. The app runs in the
test's event loop (its start-up called directly, HTTP through httpx's ASGI transport), so a test
can reach into a device to inject a fault and still see what clients see.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from pipeline.live.faults import DeviceFailed, DeviceFailure
from tests.live_server import in_process_server as server
from tests.speech import SpeechClip

WAIT = 20.0  # liveness bound for things that take a few frames (a loaded CI box is slow)


@pytest.fixture(scope="module")
def two_avatars(avatars_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo avatar and a copy of it named 'second' (a different avatar to the engines)."""
    root = tmp_path_factory.mktemp("two-avatars")
    shutil.copytree(avatars_root / "demo", root / "demo")
    shutil.copytree(avatars_root / "demo", root / "second")
    meta = json.loads((root / "second" / "avatar.json").read_text())
    meta["id"] = "second"
    (root / "second" / "avatar.json").write_text(json.dumps(meta))
    return root


async def create(http: httpx.AsyncClient, avatar: str | None = None) -> dict[str, Any]:
    response = await http.post("/v1/sessions", json={"avatar": avatar} if avatar else {})
    assert response.status_code == 201, response.text
    return response.json()


async def devices(http: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in (await http.get("/v1/devices")).json()["devices"]}


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


TWO_CPUS = {"devices": ["cpu:0", "cpu:1"], "capacity_sessions": 2}


def test_devices_endpoint_reports_a_calibrated_device(avatars_root: Path) -> None:
    async def scenario() -> None:
        async with server(avatars_root) as (_, http):
            (device,) = (await http.get("/v1/devices")).json()["devices"]
            assert device.keys() == {
                "name", "engine", "state", "error", "capacity", "burst_capacity", "capacity_source", "calibration", "sessions",
                "demand", "avatars", "queued_frames", "batches", "frames", "skipped_frames", "busy_seconds", "utilisation",
                "stages_ms", "process",
            }
            assert (device["name"], device["engine"], device["state"], device["error"]) == ("cpu", "lite", "ready", None)
            assert device["capacity_source"] == "calibrated" and device["capacity"] >= 1
            assert device["burst_capacity"] == device["capacity"]  # none configured
            table = device["calibration"]["table"]
            assert [row["batch_size"] for row in table] == [1, 2, 4, 8, 16]
            assert all(row["seconds"] > 0 and row["frames_per_second"] > 0 for row in table)
            assert device["avatars"] == ["demo"]
            assert device["process"] is None  # a cpu device works in the server process by default
            assert device["sessions"] == 0 and device["demand"] == {
                "talking_sessions": 0.0, "frames_per_second": 0.0, "burst_overload_percent": 0.0
            }

            await create(http)
            device = (await devices(http))["cpu"]
            assert device["sessions"] == 1
            assert device["demand"] == {
                "talking_sessions": 1.0, "frames_per_second": 25.0, "burst_overload_percent": 0.0
            }

            metrics = (await http.get("/metrics")).text
            assert f'lipstream_device_capacity_sessions{{device="cpu"}} {float(device["capacity"])}' in metrics
            assert 'lipstream_device_ready{device="cpu"} 1.0' in metrics
            assert f'lipstream_device_burst_capacity_sessions{{device="cpu"}} {float(device["capacity"])}' in metrics
            assert 'lipstream_device_sessions{device="cpu"} 1.0' in metrics
            assert 'lipstream_device_frames_total{device="cpu"}' in metrics

    run(scenario())


def test_sessions_go_to_the_least_loaded_device(avatars_root: Path) -> None:
    async def scenario() -> None:
        engine = {**TWO_CPUS, "capacity_sessions": 3, "burst_capacity_sessions": 4, "batch_gather_ms": 7.0}
        async with server(avatars_root, engine=engine) as (state, http):
            placed = [(await create(http))["device"] for _ in range(4)]
            assert placed == ["cpu:0", "cpu:1", "cpu:0", "cpu:1"]
            listed = await devices(http)
            assert [listed[name]["sessions"] for name in ("cpu:0", "cpu:1")] == [2, 2]
            assert listed["cpu:0"]["capacity_source"] == "configured" and listed["cpu:0"]["calibration"] is None
            assert listed["cpu:0"]["burst_capacity"] == 4  # engine.burst_capacity_sessions
            # a session bound to a device is served by that device's worker
            sessions = state.manager.sessions.values()
            assert all(s.live.worker is state.pool.devices[s.device].worker for s in sessions)
            assert {d.worker.gather_seconds for d in state.pool.devices.values()} == {0.007}  # engine.batch_gather_ms

    run(scenario())


def test_an_avatar_already_loaded_on_a_device_draws_its_sessions(two_avatars: Path) -> None:
    async def scenario() -> None:
        async with server(two_avatars, engine={**TWO_CPUS, "capacity_sessions": 4}) as (_, http):
            assert (await create(http))["device"] == "cpu:0"  # the demo avatar is on both
            assert (await create(http, "second"))["device"] == "cpu:1"  # least loaded; loads it there
            listed = await devices(http)
            assert listed["cpu:1"]["avatars"] == ["demo", "second"] and listed["cpu:0"]["avatars"] == ["demo"]
            # cpu:1 is busier (1 vs 1, then 2 vs 1), but 'second' is resident there only
            assert (await create(http, "second"))["device"] == "cpu:1"
            assert (await create(http))["device"] == "cpu:0"  # demo: resident on both, least loaded

    run(scenario())


def test_admission_refuses_past_a_configured_capacity(avatars_root: Path) -> None:
    async def scenario() -> None:
        async with server(avatars_root, engine={"capacity_sessions": 2}) as (_, http):
            first = await create(http)
            await create(http)
            refused = await http.post("/v1/sessions", json={})
            assert refused.status_code == 503
            assert refused.json()["error"] == "AtCapacity"
            assert refused.json()["detail"] == "at capacity: devices cpu 2.0/2 talking sessions; a new session needs 1"
            assert (await http.delete(f"/v1/sessions/{first['id']}")).status_code == 204
            await create(http)  # the place is free again

    run(scenario())


def test_admission_refuses_past_a_calibrated_capacity(avatars_root: Path) -> None:
    """The lite engine calibrated on this CPU (~25-40 talking sessions); a small headroom keeps
    the number of sessions to create small."""
    from pipeline.live.calibration import BatchTiming, capacity_from

    async def scenario() -> None:
        async with server(avatars_root, engine={"capacity_headroom": 0.1}, limits={"max_sessions": 1000}) as (_, http):
            device = (await devices(http))["cpu"]
            assert device["capacity_source"] == "calibrated"
            table = [BatchTiming(row["batch_size"], row["seconds"]) for row in device["calibration"]["table"]]
            capacity = device["capacity"]
            # the rule applied to the reported table (rounded to microseconds: may differ by one)
            assert abs(capacity - max(1, capacity_from(table, 16, 0.06, headroom=0.1))) <= 1
            assert capacity <= 10
            for _ in range(capacity):
                await create(http)
            refused = await http.post("/v1/sessions", json={})
            assert refused.status_code == 503
            assert f"cpu {capacity:.1f}/{capacity} talking sessions" in refused.json()["detail"]

    run(scenario())


def test_expected_talk_fraction_and_measured_talk_count_towards_demand(avatars_root: Path) -> None:
    """The average alone (the burst limit off: test_bursts_past_the_limit_refuse_a_session)."""

    async def scenario() -> None:
        async with server(
            avatars_root,
            engine={"capacity_sessions": 2, "max_burst_overload_percent": 100},
            sessions={"expected_talk_fraction": 0.5},
        ) as (state, http):
            ids = [(await create(http))["id"] for _ in range(3)]  # 1.5 of 2
            assert (await devices(http))["cpu"]["demand"]["talking_sessions"] == 1.5
            # one of them turns out to talk 90% of the time: it counts 0.9, not 0.5
            state.manager.sessions[ids[0]].live.stats.talk_fraction = 0.9
            assert (await devices(http))["cpu"]["demand"]["talking_sessions"] == 1.9
            refused = await http.post("/v1/sessions", json={})
            assert refused.status_code == 503 and "1.9/2" in refused.json()["detail"]
            # running sessions are never ended to make room; when it quiets down, a place opens
            assert len(state.manager.sessions) == 3
            state.manager.sessions[ids[0]].live.stats.talk_fraction = 0.2
            await create(http)
            assert (await devices(http))["cpu"]["demand"]["talking_sessions"] == 2.0

    run(scenario())


def test_bursts_past_the_limit_refuse_a_session(avatars_root: Path) -> None:
    """Capacity 2, half-talking sessions: a third fits the average (1.5 of 2) but all three talk at
    once an eighth of the time, 8.3 % of their talking frames past capacity (default limit 1 %)."""

    async def scenario() -> None:
        async with server(
            avatars_root, engine={"capacity_sessions": 2}, sessions={"expected_talk_fraction": 0.5}
        ) as (_, http):
            for _ in range(2):
                await create(http)
            assert (await devices(http))["cpu"]["demand"]["burst_overload_percent"] == 0.0
            refused = await http.post("/v1/sessions", json={})
            assert refused.status_code == 503
            assert refused.json()["detail"] == (
                "at capacity: devices cpu 1.0/2 talking sessions, with it 8.3 % of talking frames past "
                "capacity when sessions talk at once (limit 1 %); a new session needs 0.5"
            )
            metrics = (await http.get("/metrics")).text
            assert 'lipstream_device_burst_overload_percent{device="cpu"} 0.0' in metrics

    run(scenario())


def test_max_sessions_stays_a_global_cap(avatars_root: Path) -> None:
    async def scenario() -> None:
        async with server(avatars_root, engine={**TWO_CPUS, "capacity_sessions": 8}, limits={"max_sessions": 3}) as (_, http):
            for _ in range(3):
                await create(http)
            refused = await http.post("/v1/sessions", json={})
            assert refused.status_code == 503 and "3 of 3 sessions in use" in refused.json()["detail"]

    run(scenario())


def test_a_failed_device_ends_only_its_sessions(avatars_root: Path, speech: SpeechClip) -> None:
    """A CUDA-style fault in cpu:1's batch: its session ends with the reason, cpu:0's session keeps
    getting lip-synced frames, new sessions go to cpu:0, then 503 names the failure."""
    planar = speech.samples[None, :].astype(np.float32)

    async def scenario() -> None:
        async with server(avatars_root, engine=TWO_CPUS) as (state, http):
            manager, pool = state.manager, state.pool
            ids = [(await create(http))["id"] for _ in range(2)]
            sessions = [manager.sessions[i] for i in ids]
            assert [s.device for s in sessions] == ["cpu:0", "cpu:1"]
            events: list[asyncio.Queue] = []
            for session in sessions:
                session.live.subscribe()  # a viewer: active frames go through the engine
                events.append(asyncio.Queue())
                session.listeners.add(events[-1])
                for _ in range(2):
                    session.live.push(planar, speech.sample_rate, "mono")
            workers = [pool.devices[name].worker for name in ("cpu:0", "cpu:1")]
            await until(lambda: all(w.stats.frames > 0 for w in workers), "lip-synced frames on both devices")

            def broken(requests):
                raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore torch advice")

            pool.devices["cpu:1"].engine.compose = broken
            ended = await asyncio.wait_for(next_ended(events[1]), WAIT)
            assert ended["session_id"] == ids[1]
            assert ended["reason"] == "device cpu:1 failed: RuntimeError: CUDA error: an illegal memory access was encountered"
            await until(lambda: ids[1] not in manager.sessions, "the failed device's session to end")

            # the other device's session keeps talking, through its engine
            assert ids[0] in manager.sessions and ended_reason(events[0]) is None
            frames, active = workers[0].stats.frames, sessions[0].live.stats.active_frames
            await until(
                lambda: workers[0].stats.frames >= frames + 10 and sessions[0].live.stats.active_frames >= active + 10,
                "more lip-synced frames on the healthy device",
            )
            assert sessions[0].live.stats.talk_fraction > 0

            listed = await devices(http)
            assert listed["cpu:1"]["state"] == "failed"
            assert listed["cpu:1"]["error"].startswith("RuntimeError: CUDA error")
            assert listed["cpu:1"]["sessions"] == 0
            assert listed["cpu:0"]["state"] == "ready"
            assert 'lipstream_device_ready{device="cpu:1"} 0.0' in (await http.get("/metrics")).text

            # new sessions go to the healthy device until it is full, then 503 names the failure
            assert (await create(http))["device"] == "cpu:0"
            refused = await http.post("/v1/sessions", json={})
            assert refused.status_code == 503
            assert refused.json()["detail"].startswith("at capacity: devices cpu:0 2.0/2 talking sessions, cpu:1 failed: ")
            assert (await http.get("/readyz")).status_code == 200

            # when the last device fails too, nothing is admitted and /readyz says why
            pool.fail("cpu:0", "DeviceFailure: simulated")
            await until(lambda: not manager.sessions, "the last device's sessions to end")
            assert ended_reason(events[0]) == "device cpu:0 failed: DeviceFailure: simulated"
            refused = await http.post("/v1/sessions", json={})
            assert refused.status_code == 503 and refused.json()["detail"].startswith("no device available: ")
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and "cpu:1 failed" in ready.json()["detail"]

    run(scenario())


async def next_ended(events: asyncio.Queue) -> dict[str, Any]:
    """The session_ended event (speaking events come before it)."""
    while True:
        event = await events.get()
        if event and event["type"] == "session_ended":
            return event


def ended_reason(events: asyncio.Queue) -> str | None:
    while not events.empty():
        event = events.get_nowait()
        if event and event["type"] == "session_ended":
            return event["reason"]
    return None


# -- the worker's side of a fault, without a server -------------------------------------------------


class _Engine:
    """compose() runs ``behaviour`` (a function of the requests) each batch."""

    name = "fake"

    def __init__(self, behaviour: Callable[[Any], Any]) -> None:
        self.behaviour = behaviour

    def compose(self, requests):
        return self.behaviour(requests)


def test_an_ordinary_error_fails_only_its_batch() -> None:
    from pipeline.live.worker import EngineWorker

    calls = []

    def once_bad(requests):
        calls.append(len(requests))
        if len(calls) == 1:
            raise ValueError("bad features")
        return [np.zeros(1)] * len(requests)

    faults: list[str] = []
    worker = EngineWorker(_Engine(once_bad), batch_size=4, name="cpu", on_fault=faults.append)  # type: ignore[arg-type]
    try:
        first = worker.submit(None, 0.0, "a")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="bad features"):
            first.result(WAIT)
        assert worker.submit(None, 0.0, "a").result(WAIT) is not None  # type: ignore[arg-type]
        assert worker.failed is None and faults == []
    finally:
        worker.close()


@pytest.mark.parametrize(
    "fault",
    [
        DeviceFailure("simulated"),
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: device-side assert triggered"),
        RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"),
    ],
    ids=["ours", "oom", "assert", "cudnn"],
)
def test_a_device_fault_fails_the_worker_and_everything_queued(fault: Exception) -> None:
    import threading

    from pipeline.live.worker import EngineWorker

    gate = threading.Event()

    def fault_after_gate(requests):
        gate.wait(WAIT)
        raise fault

    faults: list[str] = []
    worker = EngineWorker(_Engine(fault_after_gate), batch_size=1, name="cuda:1", on_fault=faults.append)  # type: ignore[arg-type]
    try:
        running = worker.submit(None, 0.0, "a")  # type: ignore[arg-type]
        queued = [worker.submit(None, 1.0, "b") for _ in range(3)]  # type: ignore[arg-type]
        gate.set()
        for future in [running, *queued]:
            with pytest.raises(DeviceFailed, match="device cuda:1 failed: "):
                future.result(WAIT)
        assert faults and worker.failed == faults[0]
        with pytest.raises(DeviceFailed):
            worker.submit(None, 2.0, "c")  # type: ignore[arg-type]
    finally:
        worker.close()


class _StagedEngine:
    """compose_staged: stage one records the batch; stage two waits for ``release`` (or raises
    ``finish_error``), so a test can hold a batch's CPU end while the next batch starts."""

    name = "staged"

    def __init__(self, finish_error: Exception | None = None) -> None:
        import threading

        self.started: list[list[str]] = []
        self.release = threading.Event()
        self.finish_error = finish_error

    def compose_staged(self, requests):
        self.started.append([r for r in requests])

        def finish():
            self.release.wait(WAIT)
            if self.finish_error is not None and len(self.started) == 1:
                raise self.finish_error
            return [f"frame {r}" for r in requests]

        return finish


def test_the_next_batch_starts_while_the_last_one_is_finished() -> None:
    """Stage one of batch 2 runs while batch 1's CPU end is held; frames come out in order."""
    from pipeline.live.worker import EngineWorker

    engine = _StagedEngine()
    worker = EngineWorker(engine, batch_size=1, name="cuda:0")  # type: ignore[arg-type]
    try:
        futures = [worker.submit(f"r{i}", float(i), "a") for i in range(3)]  # type: ignore[arg-type]
        deadline = time.monotonic() + WAIT
        while len(engine.started) < 3:  # every batch's device part ran; none is finished yet
            assert time.monotonic() < deadline, engine.started
            time.sleep(0.01)
        assert not any(f.done() for f in futures)
        engine.release.set()
        assert [f.result(WAIT) for f in futures] == ["frame r0", "frame r1", "frame r2"]
        assert worker.stats.batches == 3
    finally:
        engine.release.set()
        worker.close()


@pytest.mark.parametrize("device_fault", [False, True], ids=["ordinary", "device"])
def test_a_failure_while_finishing_fails_its_batch(device_fault: bool) -> None:
    from pipeline.live.worker import EngineWorker

    error = DeviceFailure("lost while copying") if device_fault else ValueError("bad paste")
    engine = _StagedEngine(finish_error=error)
    faults: list[str] = []
    worker = EngineWorker(engine, batch_size=1, name="cuda:0", on_fault=faults.append)  # type: ignore[arg-type]
    try:
        first = worker.submit("r0", 0.0, "a")  # type: ignore[arg-type]
        engine.release.set()
        with pytest.raises(DeviceFailed if device_fault else ValueError):
            first.result(WAIT)
        if device_fault:
            assert faults == ["DeviceFailure: lost while copying"] and worker.failed
        else:
            assert worker.submit("r1", 1.0, "a").result(WAIT) == "frame r1"  # type: ignore[arg-type]
            assert faults == [] and worker.failed is None
    finally:
        worker.close()


class _Placed:
    """A stand-in for a shared-memory slot (pipeline.ipc.frame_ring.ResultSlot)."""

    def __init__(self) -> None:
        self.array = np.zeros((2, 2, 3), np.uint8)
        self.state = "reserved"

    def commit(self) -> None:
        self.state = "committed"

    def abandon(self) -> None:
        self.state = "abandoned"


class _PastingEngine:
    """compose_staged's second stage writes each frame where it is told (``into``), like MuseTalk's
    paste into a device process's ring; frames of request ``"bad"`` fail the batch."""

    name = "pasting"

    def compose_staged(self, requests):
        from pipeline.engines.base import place_frames

        def finish(into=None):
            if "bad" in requests:
                raise ValueError("bad paste")
            return place_frames([np.full((2, 2, 3), int(r[1:]), np.uint8) for r in requests], into)

        return finish


def test_frames_are_made_where_the_placer_says_and_committed() -> None:
    """EngineWorker(place): a frame with a place is written there and its future resolves to the
    committed place; one without gets a frame of its own; a failed batch abandons its places."""
    from pipeline.live.worker import EngineWorker

    places: dict[str, _Placed] = {}

    def place(owner, request):
        if owner == "own":
            return None
        places[request] = _Placed()
        return places[request]

    worker = EngineWorker(_PastingEngine(), batch_size=4, name="cuda:0", place=place)  # type: ignore[arg-type]
    try:
        placed = worker.submit("r3", 0.0, "a").result(WAIT)  # type: ignore[arg-type]
        assert placed is places["r3"] and placed.state == "committed"
        np.testing.assert_array_equal(placed.array, np.full((2, 2, 3), 3, np.uint8))
        own = worker.submit("r5", 1.0, "own").result(WAIT)  # type: ignore[arg-type]
        assert isinstance(own, np.ndarray) and own[0, 0, 0] == 5
        with worker.burst():  # one batch: "r6" fails with "bad"
            doomed = [worker.submit(r, 2.0, "a") for r in ("r6", "bad")]  # type: ignore[arg-type]
        for future in doomed:
            with pytest.raises(ValueError, match="bad paste"):
                future.result(WAIT)
        assert places["r6"].state == "abandoned" and places["bad"].state == "abandoned"
        assert worker.failed is None
    finally:
        worker.close()
