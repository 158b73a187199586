"""Overlapped batches in the engine worker (pipeline/live/worker.py, "Overlapped batches").

A fake device engine: stage one only records the batch (it is "queued on the device") and
returns a stage two whose ``wait()`` blocks until the test says the device is done with it. So
the test decides when each batch ends and sees when the next one is staged; no wall-time asserts
(the short ``quiet`` checks only give a wrong pick the chance to show).
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
from pipeline.live.faults import DeviceFailed, DeviceFailure
from pipeline.live.worker import MAX_IN_FLIGHT, EngineWorker

BATCH = 8
WAIT = 10.0  # liveness bound only


class QueuedBatch:
    def __init__(self, engine: DeviceEngine, tags: list[str]) -> None:
        self.engine = engine
        self.tags = tags
        self.done = threading.Event()
        self.fault: Exception | None = None

    def wait(self) -> None:
        assert self.done.wait(WAIT), "test never finished the batch on the device"
        if self.fault is not None:
            raise self.fault
        self.engine.last_batch_gpu = self.engine.device_seconds  # as MuseTalk's wait sets them
        self.engine.last_batch_idle = 0.0

    def __call__(self, into=None) -> list[np.ndarray]:
        self.wait()
        return [np.full((1, 1, 3), i, np.uint8) for i, _ in enumerate(self.tags)]


class DeviceEngine(Engine):
    """compose_staged queues a batch and returns at once; the test ends each batch."""

    name = "device"
    overlapped_staging = True

    def __init__(self, device_seconds: float = 0.01) -> None:
        self.staged: queue.Queue[QueuedBatch] = queue.Queue()
        self.device_seconds = device_seconds
        self.last_batch_gpu: float | None = None
        self.last_batch_idle: float | None = None

    def new_featurizer(self):
        raise NotImplementedError

    def load_avatar(self, avatar) -> None:
        pass

    def generate(self, requests):
        raise NotImplementedError

    def compose_staged(self, requests):
        batch = QueuedBatch(self, [r.features for r in requests])
        self.staged.put(batch)
        return batch

    def next_staged(self) -> QueuedBatch:
        return self.staged.get(timeout=WAIT)

    def quiet(self, seconds: float = 0.3) -> bool:
        """Nothing staged within ``seconds``."""
        try:
            batch = self.staged.get(timeout=seconds)
        except queue.Empty:
            return True
        self.staged.put(batch)
        return False


def request(tag: str) -> FrameRequest:
    return FrameRequest(None, 0, tag)  # type: ignore[arg-type]


FAR = 1000.0  # seconds to a frame's deadline: never due


def submit(worker: EngineWorker, tag: str, owner: str):
    return worker.submit(request(tag), time.monotonic() + FAR, owner)


def eventually(condition) -> bool:
    """``condition()`` turned true within WAIT (figures recorded on the finisher thread)."""
    deadline = time.monotonic() + WAIT
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


@contextmanager
def device_worker(engine: DeviceEngine) -> Iterator[EngineWorker]:
    worker = EngineWorker(engine, batch_size=BATCH, name="test")
    try:
        assert worker.overlapped
        yield worker
    finally:
        while not engine.staged.empty():
            engine.staged.get().done.set()
        worker.close()


def test_the_next_batch_is_staged_while_the_device_runs_one_and_at_most_two_are_in_flight() -> None:
    engine = DeviceEngine()
    with device_worker(engine) as worker:
        a = submit(worker, "a", "s1")
        first = engine.next_staged()
        assert first.tags == ["a"]
        # the first batch is still on the device: no measured device time yet, so the next frame
        # is staged behind it at once
        b = submit(worker, "b", "s2")
        second = engine.next_staged()
        assert second.tags == ["b"] and not first.done.is_set()
        c = submit(worker, "c", "s3")
        assert engine.quiet(), f"more than {MAX_IN_FLIGHT} batches staged"
        first.done.set()
        third = engine.next_staged()  # the device finished one: room for the next
        assert third.tags == ["c"]
        assert a.result(WAIT) is not None and not b.done()
        second.done.set()
        third.done.set()
        frames = [f.result(WAIT) for f in (b, c)]
        assert all(isinstance(f, np.ndarray) for f in frames)
        stages = worker.stages.summary()
        # the device's figures come from the wait (the engine's last_batch_gpu), the host side
        # from the staging
        assert stages["gpu_batch"]["p50"] == 10.0 and "batch_host" in stages and "batch" in stages
        assert eventually(lambda: worker.stats.batches == 3)  # recorded after delivery
        assert worker.stats.frames == 3


def test_the_pick_waits_for_the_end_of_the_batch_on_the_device_and_wakes_when_it_ends_early() -> None:
    """With batches measured at 100 s of device time, frames that arrive while one runs are not
    staged as a batch of their own at once (they would wait behind it anyway, and the frames after
    them would miss it): the pick comes near its expected end, or as soon as it is done."""
    engine = DeviceEngine(device_seconds=100.0)
    with device_worker(engine) as worker:
        done = submit(worker, "m", "s1")
        measured = engine.next_staged()
        measured.done.set()  # the device time of a batch of 1 is now known: 100 s
        done.result(WAIT)
        submit(worker, "a", "s1")
        running = engine.next_staged()  # the device is idle: staged at once
        late = [submit(worker, t, f"s{t}") for t in ("x", "y", "z")]
        assert engine.quiet(), "picked while the batch on the device had ~100 s to run"
        running.done.set()  # done long before expected
        together = engine.next_staged()
        assert together.tags == ["x", "y", "z"]
        together.done.set()
        assert all(isinstance(f.result(WAIT), np.ndarray) for f in late)


def test_a_device_fault_in_the_wait_fails_the_batch_and_the_worker() -> None:
    engine = DeviceEngine()
    with device_worker(engine) as worker:
        made = submit(worker, "a", "s1")
        batch = engine.next_staged()
        batch.fault = DeviceFailure("CUDA error: an illegal memory access was encountered")
        batch.done.set()
        with pytest.raises(DeviceFailed, match="illegal memory access"):
            made.result(WAIT)
        assert eventually(lambda: worker.failed is not None)
        with pytest.raises(DeviceFailed):
            submit(worker, "b", "s1")


def test_an_engine_that_waits_in_stage_one_is_not_overlapped() -> None:
    class Plain(DeviceEngine):
        overlapped_staging = False

    worker = EngineWorker(Plain(), batch_size=BATCH, name="test")
    try:
        assert not worker.overlapped
    finally:
        worker.close()
