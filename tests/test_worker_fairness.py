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
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from pipeline.engines.base import Engine, FrameRequest
from pipeline.live.worker import EngineWorker

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

        def submit(self, request, deadline, owner):
            CountingWorker.submitted += 1
            return super().submit(request, deadline, owner)

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
