"""Batching fairness of the engine worker, on a logical clock (no wall-time asserts).

A fake engine blocks in every batch until the test lets it go, so the test decides exactly what
is queued when each batch is formed. Time is counted in batches: batch ``k`` (the k-th after the
blocker) ends at logical time ``k * T``. A paced session submits one frame while each batch runs,
with its deadline two batch times later (its processing budget); it is on time when its frame
lands in the very next batch.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from pipeline.engines.base import Engine, FrameRequest
from pipeline.live.worker import SKIPPED, EngineWorker

T = 1.0  # one batch, logical seconds
BATCH = 8
WAIT = 10.0  # liveness bound only (a loaded 2-core box may be slow), never a timing assert


class GatedEngine(Engine):
    """compose() reports each batch's tags, then blocks until the test releases it."""

    name = "gated"

    def __init__(self) -> None:
        self.started: queue.Queue[list[str]] = queue.Queue()
        self.gate = threading.Semaphore(0)

    def new_featurizer(self):
        raise NotImplementedError

    def load_avatar(self, avatar) -> None:
        pass

    def generate(self, requests):  # unused: compose is overridden
        raise NotImplementedError

    def compose(self, requests):
        self.started.put([r.features for r in requests])
        assert self.gate.acquire(timeout=WAIT), "test never released the batch"
        return [np.zeros((1, 1, 3), np.uint8) for _ in requests]

    def next_batch(self) -> list[str]:
        return self.started.get(timeout=WAIT)


def request(tag: str) -> FrameRequest:
    return FrameRequest(None, 0, tag)  # type: ignore[arg-type]


@contextmanager
def gated_worker() -> Iterator[tuple[GatedEngine, EngineWorker]]:
    engine = GatedEngine()
    worker = EngineWorker(engine, batch_size=BATCH, name="test")
    try:
        worker.submit(request("blocker"), -100.0, "blocker")  # the worker sits in this batch
        assert engine.next_batch() == ["blocker"]
        yield engine, worker
    finally:
        for _ in range(1000):
            engine.gate.release()
        worker.close()


def run_flood(flood_deadline: float, flood_jobs: int = 300, steps: int = 50) -> tuple[list[list[str]], list]:
    """Session A floods ``flood_jobs`` frames at once (all with ``flood_deadline``); session B
    submits one frame per batch, due two batches later. Returns the batches and A's futures."""
    with gated_worker() as (engine, worker):
        flood = [worker.submit(request(f"A{i}"), flood_deadline + i * 1e-6, "A") for i in range(flood_jobs)]
        batches: list[list[str]] = []
        for k in range(steps):
            # B's frame k arrives while batch k runs (logical time k*T), due at (k+2)*T
            worker.submit(request(f"B{k}"), (k + 2) * T, "B")
            engine.gate.release()  # batch k ends; batch k+1 is formed from what is queued now
            batches.append(engine.next_batch())
        return batches, flood


@pytest.mark.parametrize("flood_deadline", [-5.0, 0.5], ids=["overdue-flood", "on-time-flood"])
def test_a_flooding_session_cannot_push_another_past_its_deadlines(flood_deadline: float) -> None:
    # overdue: A's backlog is already 5 batches late (EDF alone would serve all 300 first);
    # on-time: A's frames are due before B's (EDF alone again serves A's 300 first)
    batches, _ = run_flood(flood_deadline)
    for k, batch in enumerate(batches):
        assert f"B{k}" in batch, f"B's frame {k} missed its batch (logical end {(k + 1) * T}, due {(k + 2) * T})"
    # the backlog still drains at full speed: every batch is full while A has frames queued
    assert all(len(batch) == BATCH for batch in batches[:30])
    served_a = [tag for batch in batches for tag in batch if tag.startswith("A")]
    assert served_a == sorted(served_a, key=lambda tag: int(tag[1:])), "A's own frames keep their order"


def test_the_backlog_is_not_starved() -> None:
    batches, flood = run_flood(-5.0, flood_jobs=100, steps=20)
    served = sum(tag.startswith("A") for batch in batches for tag in batch)
    assert served == 100  # 7 per batch beside B's one: done within 15 batches
    assert all(f.done() and f.exception() is None for f in flood)


def test_many_sessions_each_get_their_frame_into_the_next_batch() -> None:
    """Sessions beside a flood: each of 5 paced sessions gets its frame in; the flood gets the rest."""
    with gated_worker() as (engine, worker):
        for i in range(200):
            worker.submit(request(f"A{i}"), -5.0 + i * 1e-6, "A")
        for k in range(10):
            for s in range(5):
                worker.submit(request(f"S{s}-{k}"), (k + 2) * T, f"S{s}")
            engine.gate.release()
            batch = engine.next_batch()
            assert {f"S{s}-{k}" for s in range(5)} <= set(batch), batch
            assert len(batch) == BATCH


def test_without_contention_a_batch_is_every_queued_job_earliest_deadline_first() -> None:
    with gated_worker() as (engine, worker):
        worker.submit(request("late"), 3.0, "X")
        worker.submit(request("early"), 1.0, "Y")
        worker.submit(request("middle"), 2.0, "X")
        engine.gate.release()
        assert engine.next_batch() == ["early", "middle", "late"]


def test_more_sessions_than_slots_take_one_each_by_deadline() -> None:
    with gated_worker() as (engine, worker):
        for s in range(BATCH + 2):  # the two with the latest deadlines wait for the next batch
            worker.submit(request(f"S{s}"), float(s), f"S{s}")
            worker.submit(request(f"S{s}b"), float(s) + 0.5, f"S{s}")
        engine.gate.release()
        assert engine.next_batch() == [f"S{s}" for s in range(BATCH)]


def test_silent_sessions_cost_nothing(demo_avatar) -> None:
    """A session whose audio is silence submits no engine work at all, even with a viewer."""
    import asyncio

    from pipeline.engines.lite import LiteEngine
    from pipeline.live.session import LiveSession

    class CountingWorker(EngineWorker):
        submitted = 0

        def submit(self, request, deadline, owner, arrived=None):
            CountingWorker.submitted += 1
            return super().submit(request, deadline, owner, arrived)

    async def scenario() -> int:
        engine = LiteEngine()
        worker = CountingWorker(engine, batch_size=BATCH, name="cpu")
        session = LiveSession(demo_avatar, worker, engine.new_featurizer(), processing_seconds=0.01)
        session.subscribe()
        session.start()
        session.push(np.zeros((1, 16000), np.float32), 16000, "mono")  # 1 s of silence
        try:
            while session.stats.frames < 30:
                await asyncio.sleep(0.02)
        finally:
            await session.close()
            worker.close()
        return session.stats.frames

    assert asyncio.run(scenario()) >= 30
    assert CountingWorker.submitted == 0


# --- skipping frames that cannot be on time (EngineWorker(skip_late=True)) ----------------------


@contextmanager
def plain_worker(skip_late: bool) -> Iterator[tuple[GatedEngine, EngineWorker]]:
    """A gated worker with nothing queued yet (real monotonic deadlines: skipping compares them
    with the clock; the margins below are seconds, far beyond any scheduling delay)."""
    engine = GatedEngine()
    worker = EngineWorker(engine, batch_size=BATCH, name="test", skip_late=skip_late)
    try:
        yield engine, worker
    finally:
        for _ in range(100):
            engine.gate.release()
        worker.close()


def test_frames_that_cannot_be_on_time_are_skipped_the_rest_made() -> None:
    """A burst queued behind a running batch: frames due before the next batch can be done
    resolve to SKIPPED at once (whoever owns them); those that can make it go into the batch."""
    with plain_worker(skip_late=True) as (engine, worker):
        worker.submit(request("blocker"), time.monotonic() + 1000, "blocker")
        assert engine.next_batch() == ["blocker"]
        worker.batch_seconds = 5.0  # batches take 5 s (as if measured): a frame due sooner cannot make it
        now = time.monotonic()
        late = {
            "overdue": worker.submit(request("overdue"), now - 1.0, "A"),
            "too-soon": worker.submit(request("too-soon"), now + 1.0, "A"),
            "other-session": worker.submit(request("other-session"), now + 2.0, "B"),
        }
        on_time = {tag: worker.submit(request(tag), now + 100.0, owner) for tag, owner in (("A-ok", "A"), ("B-ok", "B"))}
        # a backlog: more queued than one batch holds (without one nothing is skipped)
        filler = [worker.submit(request(f"C{i}"), now + 200.0 + i, "C") for i in range(BATCH)]
        engine.gate.release()  # the blocker ends; the next batch is formed from the queue
        batch = engine.next_batch()
        assert {"A-ok", "B-ok"} <= set(batch) and len(batch) == BATCH
        assert not {"overdue", "too-soon", "other-session"} & set(batch)
        for tag, future in late.items():
            assert future.result(timeout=WAIT) is SKIPPED, tag
        engine.gate.release()
        for future in on_time.values():
            assert future.result(timeout=WAIT) is not SKIPPED
        assert worker.stats.skipped == 3 and worker.stats.frames == 1 + BATCH
        engine.gate.release()  # the last two fillers
        assert all(f.result(timeout=WAIT) is not SKIPPED for f in filler)
        # the estimate follows the batches actually run (the test held them well under 5 s)
        assert worker.batch_seconds is not None and worker.batch_seconds < 5.0


def test_skipping_leaves_one_batch_to_run_earliest_skipped_first() -> None:
    """However far behind, a full batch is left to run (skipping everything would show nothing
    and never measure the device again), and the frames skipped are the most overdue."""
    with plain_worker(skip_late=True) as (engine, worker):
        worker.submit(request("blocker"), time.monotonic() + 1000, "blocker")
        assert engine.next_batch() == ["blocker"]
        worker.batch_seconds = 5.0
        now = time.monotonic()
        doomed = [worker.submit(request(f"D{i}"), now - 3.0 + i * 0.1, "AB"[i % 2]) for i in range(2 * BATCH + 3)]
        engine.gate.release()
        assert engine.next_batch() == [f"D{i}" for i in range(BATCH + 3, 2 * BATCH + 3)]
        engine.gate.release()
        assert all(f.result(timeout=WAIT) is SKIPPED for f in doomed[: BATCH + 3])
        assert all(f.result(timeout=WAIT) is not SKIPPED for f in doomed[BATCH + 3 :])
        assert worker.stats.skipped == BATCH + 3


def test_skip_keep_sets_how_many_frames_a_pick_always_leaves() -> None:
    """``skip_keep=1`` sheds every doomed frame while a fresh one is queued (a batch's worth is
    kept by default); when every queued frame is doomed (a device slower than the budget) a
    pick still keeps a whole batch, made late, rather than one frame."""
    engine = GatedEngine()
    worker = EngineWorker(engine, batch_size=BATCH, name="test", skip_late=True, skip_keep=1)
    try:
        worker.submit(request("blocker"), time.monotonic() + 1000, "blocker")
        assert engine.next_batch() == ["blocker"]
        worker.batch_seconds = 5.0
        now = time.monotonic()
        doomed = [worker.submit(request(f"D{i}"), now - 3.0 + i * 0.1, "AB"[i % 2]) for i in range(BATCH + 3)]
        fresh = worker.submit(request("fresh"), now + 100.0, "A")
        engine.gate.release()
        assert engine.next_batch() == ["fresh"]
        assert all(f.result(timeout=WAIT) is SKIPPED for f in doomed)
        # all doomed: the latest batch of them is made
        now = time.monotonic()
        slow = [worker.submit(request(f"S{i}"), now - 3.0 + i * 0.1, "AB"[i % 2]) for i in range(BATCH + 3)]
        engine.gate.release()
        assert engine.next_batch() == [f"S{i}" for i in range(3, BATCH + 3)]
        engine.gate.release()
        assert fresh.result(timeout=WAIT) is not SKIPPED
        assert [f.result(timeout=WAIT) is SKIPPED for f in slow] == [True] * 3 + [False] * BATCH
    finally:
        for _ in range(10):
            engine.gate.release()
        worker.close()


class StagedGatedEngine(GatedEngine):
    """The device part returns at once; the CPU end (finish) waits for the test: the next batch
    starts while the one before waits for its delivery."""

    def compose_staged(self, requests):
        self.started.put([r.features for r in requests])
        return lambda: self.compose_finish(requests)

    def compose_finish(self, requests):
        assert self.gate.acquire(timeout=WAIT), "test never released the batch"
        return [np.zeros((1, 1, 3), np.uint8) for _ in requests]


def test_batch_time_estimate_excludes_waiting_for_the_batch_in_flight() -> None:
    """A batch starts while the previous one still waits for its delivery (the finisher serves
    them in order); that wait is not the batch's own time and must not make frames look doomed."""
    engine = StagedGatedEngine()
    worker = EngineWorker(engine, batch_size=BATCH, name="test", skip_late=True)
    try:
        first = worker.submit(request("first"), time.monotonic() + 1000, "A")
        assert engine.next_batch() == ["first"]
        second = worker.submit(request("second"), time.monotonic() + 1000, "A")
        assert engine.next_batch() == ["second"]  # staged at once, behind the first
        time.sleep(0.6)
        engine.gate.release()
        first.result(timeout=WAIT)
        engine.gate.release()
        second.result(timeout=WAIT)
        # first: ~0.6 s; second: only the moment after the first's delivery (start to delivery
        # would be ~0.6 s again and keep the estimate at >= 0.6)
        assert worker.batch_seconds is not None and worker.batch_seconds < 0.55
    finally:
        for _ in range(10):
            engine.gate.release()
        worker.close()


def test_batch_host_is_the_batch_minus_the_engines_sleep_on_its_device() -> None:
    """An engine that reports how long its batch slept on the device (MuseTalk on cuda) gets the
    rest of the batch recorded as ``batch_host``, and its device timeline as ``gpu_batch`` and
    ``gpu_idle``; one that reports nothing gets no such stages."""

    class SleepyEngine(StagedGatedEngine):
        def compose_staged(self, requests):
            time.sleep(0.2)  # 0.2 s of "device" time, reported as slept
            self.last_batch_asleep = 0.2
            self.last_batch_gpu, self.last_batch_idle = 0.19, 0.03
            return super().compose_staged(requests)

    for engine, reported in ((SleepyEngine(), True), (StagedGatedEngine(), False)):
        worker = EngineWorker(engine, batch_size=BATCH, name="test")
        try:
            made = worker.submit(request("x"), time.monotonic() + 1000, "A")
            assert engine.next_batch() == ["x"]
            engine.gate.release()
            made.result(timeout=WAIT)
            stages = worker.stages.summary()
            if reported:
                assert stages["batch"]["p50"] >= 200.0
                # the batch's 0.2 s of sleep is not host time; what is left is (a loaded runner may
                # add to it, never take from it)
                assert 0.0 <= stages["batch_host"]["p50"] < stages["batch"]["p50"] - 150.0, stages
                assert stages["gpu_batch"]["p50"] == 190.0 and stages["gpu_idle"]["p50"] == 30.0
            else:
                assert not {"batch_host", "gpu_batch", "gpu_idle"} & set(stages)
        finally:
            worker.close()


def test_an_idle_worker_waits_for_a_burst_to_end_then_batches_it_whole() -> None:
    """A feature pass hands its frames over inside worker.burst(): the idle worker must not start
    a batch with the first of them, but one with all of them; a full batch starts at once."""
    engine = GatedEngine()
    worker = EngineWorker(engine, batch_size=BATCH, name="test")
    try:
        with worker.burst():
            made = [worker.submit(request(f"f{i}"), time.monotonic() + 1000, f"s{i}") for i in range(3)]
            time.sleep(0.3)  # an idle worker that did not wait would have started by now
            assert engine.started.empty()
        assert sorted(engine.next_batch()) == ["f0", "f1", "f2"]
        engine.gate.release()
        for future in made:
            future.result(timeout=WAIT)
        with worker.burst():
            full = [worker.submit(request(f"g{i}"), time.monotonic() + 1000, f"s{i}") for i in range(BATCH + 2)]
            assert len(engine.next_batch()) == BATCH  # a whole batch does not wait for the burst's end
        engine.gate.release()
        assert sorted(engine.next_batch()) == ["g8", "g9"]
        engine.gate.release()
        for future in full:
            future.result(timeout=WAIT)
    finally:
        for _ in range(10):
            engine.gate.release()
        worker.close()


def test_a_feature_pass_resolves_its_frames_inside_one_burst() -> None:
    """FeatureWorker(burst=...) wraps the resolving of a pass's futures, so every frame's callback
    (which hands it to the engine worker in a device process) runs inside the same burst."""
    from pipeline.audio.windows import AudioFrame
    from pipeline.engines.base import Featurizer, FrameFeatures
    from pipeline.live.feature_worker import FeatureWorker

    entered, release = threading.Event(), threading.Event()

    class Waiting(Featurizer):
        def features(self, frames):
            entered.set()
            assert release.wait(WAIT)  # the first pass waits, so the next jobs queue up together
            return [FrameFeatures(True, f.index) for f in frames]

    inside: list[bool] = []
    bursts: list[str] = []

    @contextmanager
    def burst():
        bursts.append("open")
        yield
        bursts.append("closed")

    worker = FeatureWorker("test", burst=burst)
    try:
        window = np.zeros(3200, np.float32)
        first = worker.submit(Waiting(), [AudioFrame(0, window, True)], "a")
        assert entered.wait(WAIT)  # the thread is in the first pass now
        rest = [worker.submit(Waiting(), [AudioFrame(i, window, True)], f"s{i}") for i in range(1, 5)]
        for future in rest:
            future.add_done_callback(lambda _f: inside.append(bursts[-1] == "open"))
        release.set()
        first.result(timeout=WAIT)
        for future in rest:
            future.result(timeout=WAIT)
    finally:
        worker.close()
    assert inside == [True] * 4
    assert bursts == ["open", "closed", "open", "closed"]  # one burst per pass: the first, then the rest


def test_a_batch_that_outlasts_close_fails_its_frames_instead_of_the_thread() -> None:
    """close() waits close_wait for the batch in flight, then shuts the finisher; the batch ending
    later must fail its frames cleanly (it raised from the engine thread before)."""
    engine = GatedEngine()
    worker = EngineWorker(engine, batch_size=BATCH, name="test")
    worker.close_wait = 0.1
    made = worker.submit(request("slow"), time.monotonic() + 1000, "A")
    assert engine.next_batch() == ["slow"]
    worker.close()  # returns while the batch still runs
    engine.gate.release()
    with pytest.raises(RuntimeError, match="closed during the batch"):
        made.result(timeout=WAIT)
    worker._thread.join(timeout=WAIT)
    assert not worker._thread.is_alive()


def test_a_gathering_worker_waits_for_a_fuller_batch_only_while_deadlines_allow() -> None:
    """gather_seconds: an idle worker with a batch time known waits for more frames before a
    batch that is not full, but starts by the earliest deadline minus the batch's time, and at
    once when the batch is full or it does not gather."""
    engine = GatedEngine()
    worker = EngineWorker(engine, batch_size=BATCH, name="test", gather_seconds=0.5)
    try:
        worker.submit(request("first"), time.monotonic() + 1000, "A")  # no batch time yet: at once
        assert engine.next_batch() == ["first"]
        engine.gate.release()
        worker.batch_seconds = 0.1  # now it knows a batch's time
        # far deadlines: the worker waits, and frames arriving meanwhile join the batch
        worker.submit(request("a1"), time.monotonic() + 1000, "A")
        time.sleep(0.1)
        worker.submit(request("b1"), time.monotonic() + 1000, "B")
        assert sorted(engine.next_batch()) == ["a1", "b1"]
        engine.gate.release()
        worker.batch_seconds = 0.1
        # a near deadline: latest start = deadline - 1.5 x 0.1 s - 5 ms, so it waits only ~45 ms
        started = time.monotonic()
        worker.submit(request("soon"), started + 0.2, "A")
        assert engine.next_batch() == ["soon"]
        assert time.monotonic() - started < 0.4  # not the whole 0.5 s gather
        engine.gate.release()
        worker.batch_seconds = 0.1
        # a full batch does not wait
        started = time.monotonic()
        for i in range(BATCH):
            worker.submit(request(f"f{i}"), started + 1000, f"s{i}")
        assert len(engine.next_batch()) == BATCH
        assert time.monotonic() - started < 0.4
        engine.gate.release()
    finally:
        for _ in range(10):
            engine.gate.release()
        worker.close()


def test_without_a_backlog_late_frames_are_made_not_skipped() -> None:
    """A device merely slower than the budget (a short queue) makes its frames late, as before:
    skipping them all would show no speech at all and never measure the device again."""
    with plain_worker(skip_late=True) as (engine, worker):
        worker.submit(request("blocker"), time.monotonic() + 1000, "blocker")
        assert engine.next_batch() == ["blocker"]
        worker.batch_seconds = 5.0
        late = [worker.submit(request(f"L{i}"), time.monotonic() - 1.0, "A") for i in range(BATCH)]
        engine.gate.release()
        assert engine.next_batch() == [f"L{i}" for i in range(BATCH)]
        engine.gate.release()
        assert all(f.result(timeout=WAIT) is not SKIPPED for f in late)
        assert worker.stats.skipped == 0


@pytest.mark.parametrize("skip_late", [False, True])
def test_without_skip_late_or_before_any_batch_every_frame_is_made(skip_late: bool) -> None:
    with plain_worker(skip_late) as (engine, worker):
        overdue = worker.submit(request("overdue"), time.monotonic() - 10.0, "A")
        # with skip_late: nothing measured yet, so nothing is known to be too late
        assert engine.next_batch() == ["overdue"]
        engine.gate.release()
        assert overdue.result(timeout=WAIT) is not SKIPPED
        if not skip_late:  # skip_late off: made, however late, backlog or not
            worker.batch_seconds = 5.0
            again = [worker.submit(request(f"again{i}"), time.monotonic() - 10.0, "A") for i in range(2 * BATCH)]
            for _ in range(2):
                assert len(engine.next_batch()) == BATCH
                engine.gate.release()
            assert all(f.result(timeout=WAIT) is not SKIPPED for f in again)
        assert worker.stats.skipped == 0


def test_a_skipped_frame_holds_the_sessions_last_picture(demo_avatar) -> None:
    """What a session shows for a frame its device skipped: its last picture if that is one of
    the frames just before (the mouth holds), else the idle avatar frame; skips are counted."""
    import asyncio

    from pipeline.engines.lite import LiteEngine
    from pipeline.live.session import HOLD_FRAMES, LiveSession, OutputFrame

    async def scenario() -> None:
        engine = LiteEngine()
        worker = EngineWorker(engine, batch_size=BATCH, name="cpu")
        session = LiveSession(demo_avatar, worker, engine.new_featurizer())
        loop = asyncio.get_running_loop()
        made_picture = np.full_like(demo_avatar.frames[0], 7)

        def show(index: int, result: object) -> np.ndarray:
            out = OutputFrame(index, 0, 0.0, index % demo_avatar.frame_count, None, np.zeros(0, np.int16), True)
            made, picture = loop.create_future(), loop.create_future()
            made.set_result(result)
            session._picture_made(made, out, picture)
            return picture.result()

        try:
            assert show(10, made_picture) is made_picture
            assert show(11, SKIPPED) is made_picture  # held
            assert show(10 + HOLD_FRAMES, SKIPPED) is made_picture
            stale = 10 + HOLD_FRAMES + 1
            np.testing.assert_array_equal(show(stale, SKIPPED), demo_avatar.frames[stale % demo_avatar.frame_count])
            np.testing.assert_array_equal(show(20, None), demo_avatar.frames[20 % demo_avatar.frame_count])  # not made
            assert session.stats.skipped_frames == 3
        finally:
            await session.close()
            worker.close()

    asyncio.run(scenario())


def test_a_burst_over_capacity_is_skipped_not_made_late(demo_avatar, speech) -> None:
    """Three sessions talk at once into a device that makes ~13 frames/s: with skip_late the
    worker sheds what cannot be on time (counted, shown as held or idle pictures) and every
    session keeps getting pictures; without it nothing is skipped and the backlog is made."""
    import asyncio

    from pipeline.engines.lite import LiteEngine
    from pipeline.live.session import LiveSession

    class SlowEngine(LiteEngine):
        def compose(self, requests):
            time.sleep(0.15)  # a device far slower than three talking sessions need
            return super().compose(requests)

    planar = speech.samples[None, : 3 * speech.sample_rate].astype(np.float32)

    async def scenario(skip_late: bool) -> tuple[list[int], int, int]:
        engine = SlowEngine()
        worker = EngineWorker(engine, batch_size=2, name="cpu", skip_late=skip_late)
        sessions = [LiveSession(demo_avatar, worker, engine.new_featurizer(), processing_seconds=0.1) for _ in range(3)]
        queues = [s.subscribe() for s in sessions]
        for s in sessions:
            s.start()
            s.push(planar, speech.sample_rate, "mono")
        pictures = 0
        try:
            for _ in range(50):  # 2 s of frames of each session; every picture comes
                for queue in queues:
                    out = await asyncio.wait_for(queue.get(), WAIT)
                    image = await asyncio.wait_for(out.image, WAIT) if isinstance(out.image, asyncio.Future) else out.image
                    assert image.shape == demo_avatar.frames[0].shape
                    pictures += 1
        finally:
            for s in sessions:
                await s.close()
            worker.close()
        return [s.stats.skipped_frames for s in sessions], worker.stats.skipped, pictures

    skipped, total, pictures = asyncio.run(scenario(True))
    assert pictures == 150
    assert all(n > 0 for n in skipped), skipped  # every session shed some, none was starved of the rest
    assert total >= sum(skipped)  # (a skip that lands after its session closed is not shown)
    skipped, total, _ = asyncio.run(scenario(False))
    assert skipped == [0, 0, 0] and total == 0


def test_a_held_frame_counts_as_skipped_not_also_late(demo_avatar) -> None:
    """A frame sent more than a frame after its release is late if its device made it; a frame
    the device skipped (a held picture) is counted as skipped only, even when it goes out late
    behind late frames, so late + skipped counts each degraded frame once (the load test adds
    them: before, a late held frame was counted twice and a session could pass 100 %)."""
    import asyncio
    from types import SimpleNamespace

    from pipeline.engines.lite import LiteEngine
    from pipeline.live.session import LiveSession, OutputFrame
    from server.peer_pool import SessionFeed

    async def scenario() -> None:
        engine = LiteEngine()
        worker = EngineWorker(engine, batch_size=BATCH, name="cpu")
        session = LiveSession(demo_avatar, worker, engine.new_featurizer())
        sent: list[tuple] = []
        peers = SimpleNamespace(channel=SimpleNamespace(send=lambda message, before=None: sent.append(message)), feeds={})
        feed = SessionFeed("s1", session, peers, on_late=None)
        peers.feeds["s1"] = feed
        loop = asyncio.get_running_loop()
        long_ago = loop.time() - 1.0  # released a second ago: whatever goes out now is late

        async def send(index: int, result: object) -> OutputFrame:
            out = OutputFrame(index, session.epoch, long_ago, index % demo_avatar.frame_count, None, np.zeros(0, np.int16), True)
            made, picture = loop.create_future(), loop.create_future()
            made.set_result(result)
            session._picture_made(made, out, picture)
            out.image = picture
            feed._queue.put_nowait(out)  # as the session's clock releases it
            await asyncio.sleep(0.05)
            return out

        try:
            made = await send(10, np.full_like(demo_avatar.frames[0], 7))
            assert not made.held and feed.late == 1
            held = await send(11, SKIPPED)
            assert held.held and feed.late == 1 and session.stats.skipped_frames == 1
            assert feed.sent == 2 and [m[0] for m in sent].count("frame") == 2
        finally:
            await feed.close()
            await session.close()
            worker.close()

    asyncio.run(scenario())


def test_stage_times_report_percentiles_per_frame() -> None:
    """A batch's stage counts once per frame; percentiles are over frames, in milliseconds."""
    from pipeline.live.stage_times import StageTimes

    stages = StageTimes(keep=100)
    assert stages.summary() == {"frames": 0}
    stages.add("batch", 0.010, frames=19)  # one batch of 19 frames at 10 ms
    stages.add("batch", 0.030)  # and one frame's batch at 30 ms
    for ms in range(-10, 10):
        stages.add("slack", ms / 1000)
    summary = stages.summary()
    assert summary["frames"] == 20
    assert summary["batch"] == {"p5": 10.0, "p50": 10.0, "p95": 11.0}  # numpy's linear percentiles
    assert summary["slack"]["p5"] == pytest.approx(-9.05, abs=0.06) and summary["slack"]["p50"] == -0.5
    assert "queue" not in summary  # nothing recorded, nothing claimed
    for _ in range(150):
        stages.add("queue", 0.001)
    assert stages.summary()["queue"]["p95"] == 1.0  # only the last `keep` frames are kept


def test_stage_times_ring_wraps_around_in_order_of_arrival() -> None:
    """Values added in pieces that cross the end of the ring keep exactly the last ``keep``."""
    from pipeline.live.stage_times import StageTimes

    stages = StageTimes(keep=7)
    added: list[float] = []
    for piece in ([1, 2, 3], [4, 5, 6, 7, 8], [9], list(range(10, 25)), [25, 26]):
        stages.add_each("queue", [v / 1000 for v in piece])
        added.extend(piece)
        last = np.array(added[-7:], dtype=float)
        expected = np.percentile(last, (5, 50, 95))
        got = stages.summary()["queue"]
        assert [got["p5"], got["p50"], got["p95"]] == [round(float(v), 1) for v in expected], (piece, got)


def test_stage_times_cover_only_the_recent_window(monkeypatch) -> None:
    """A summary covers the frames recorded in the last ``window_seconds``: a load test's
    scenario reads what the device did during it, not the end of the scenario before."""
    from pipeline.live import stage_times
    from pipeline.live.stage_times import StageTimes

    now = [1000.0]
    monkeypatch.setattr(stage_times.time, "monotonic", lambda: now[0])
    stages = StageTimes(keep=100, window_seconds=15.0)
    stages.add("queue", 0.200, frames=10)  # an earlier, slower scenario
    now[0] += 20.0
    stages.add("queue", 0.010, frames=10)
    assert stages.summary()["queue"] == {"p5": 10.0, "p50": 10.0, "p95": 10.0}
    now[0] += 16.0
    assert "queue" not in stages.summary()  # nothing recent, nothing claimed
    assert StageTimes(keep=100, window_seconds=None).summary() == {"frames": 0}
