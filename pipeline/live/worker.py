"""One batching worker per engine device, shared by every session bound to it.

Why a thread and a heap: the engine call (a GPU batch, or the lite warp on a CPU) must stay off
the asyncio loop, and frames of all sessions compete for it. Jobs are taken earliest deadline
first, up to ``batch_size`` at a time, so a session that floods requests cannot push another
session's frame past its deadline: whoever is due first is served first. Compositing happens in
the same thread, inside :meth:`Engine.compose` (generation + blending: on the CPU by default, on
its own device for engines that can), so only finished frames come back to the loop.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from pipeline.engines.base import Engine, FrameRequest

log = logging.getLogger("lipstream.worker")

BatchObserver = Callable[[int, float], None]  # (batch size, seconds) after every batch


@dataclass(order=True)
class _Job:
    deadline: float
    seq: int
    owner: Hashable = field(compare=False)
    request: FrameRequest = field(compare=False)
    future: concurrent.futures.Future = field(compare=False)


class EngineWorker:
    """Runs ``engine.compose`` (generation + compositing) for queued frame requests, earliest
    deadline first."""

    def __init__(
        self, engine: Engine, batch_size: int = 16, name: str = "cpu", on_batch: BatchObserver | None = None
    ) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self.name = name
        self._on_batch = on_batch
        self._heap: list[_Job] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self.batches = 0
        self.frames = 0
        self.busy_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

    def submit(self, request: FrameRequest, deadline: float, owner: Hashable) -> concurrent.futures.Future:
        """Queue one frame; the future resolves to the composed full BGR frame."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._closed:
                raise RuntimeError(f"engine worker {self.name} is closed")
            heapq.heappush(self._heap, _Job(deadline, next(self._seq), owner, request, future))
            self._cv.notify()
        return future

    def cancel(self, owner: Hashable) -> int:
        """Drop every queued request of ``owner`` (an interrupted or closed session)."""
        with self._cv:
            kept = [job for job in self._heap if job.owner != owner]
            dropped = [job for job in self._heap if job.owner == owner]
            self._heap = kept
            heapq.heapify(self._heap)
        for job in dropped:
            job.future.cancel()
        return len(dropped)

    @property
    def queued(self) -> int:
        with self._cv:
            return len(self._heap)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            pending, self._heap = self._heap, []
            self._cv.notify_all()
        for job in pending:
            job.future.cancel()
        self._thread.join(timeout=5)

    def _take_batch(self) -> list[_Job]:
        with self._cv:
            while not self._heap and not self._closed:
                self._cv.wait()
            batch = []
            while self._heap and len(batch) < self.batch_size:
                job = heapq.heappop(self._heap)
                if job.future.set_running_or_notify_cancel():
                    batch.append(job)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                if self._closed:
                    return
                continue
            started = time.perf_counter()
            try:
                frames = self.engine.compose([job.request for job in batch])
                if len(frames) != len(batch):
                    raise RuntimeError(f"engine returned {len(frames)} frames for {len(batch)} requests")
            except Exception as exc:  # a failed batch fails its frames, not the worker
                log.exception("engine batch of %d failed on %s", len(batch), self.name)
                for job in batch:
                    job.future.set_exception(exc)
                continue
            elapsed = time.perf_counter() - started
            self.batches += 1
            self.frames += len(batch)
            self.busy_seconds += elapsed
            for job, frame in zip(batch, frames, strict=True):
                job.future.set_result(frame)
            if self._on_batch is not None:
                self._on_batch(len(batch), elapsed)
