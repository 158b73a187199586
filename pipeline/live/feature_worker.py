"""One feature thread per engine device: audio features of all sessions, off the asyncio loop.

Why: a blocking featurizer (MuseTalk's Whisper encoder: one pass over a 30 s window per group of
frames) takes milliseconds on a GPU and up to seconds on a CPU; on the event loop it would stall
every session, socket and WebRTC track of the server. Sessions submit ``(featurizer, frames)``
jobs here and get a future; this thread takes everything pending at once and

- merges consecutive jobs of one featurizer into one call, so a session that fell behind has its
  backlog served by shared encoder windows (frames within ``frames_per_run`` share one pass):
  the worker catches up by itself instead of falling further behind;
- runs the featurizers that share a ``batcher`` (the engine's
  :class:`~pipeline.engines.musetalk.features.WhisperBatcher`) in one batched pass, so the
  windows of all sessions on the device go through the encoder together;
- resolves the futures in submission order (sessions rely on it: frame ``i`` of a session is
  resolved before frame ``i + 1``).

Featurizer state is only touched by this thread: a session's interrupt goes through
:meth:`FeatureWorker.reset`, which drops its queued jobs and resets the featurizer in order.

A failed pass fails its jobs only; when the failure is a device fault (the encoder runs on the
engine's device: a CUDA error there means the device is broken, :mod:`pipeline.live.faults`),
``on_fault`` tells the device pool, which takes the whole device out of rotation.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.audio.windows import AudioFrame
from pipeline.engines.base import Featurizer, FrameFeatures
from pipeline.live.faults import is_device_fault

log = logging.getLogger("lipstream.features")


@dataclass
class _Job:
    featurizer: Featurizer
    frames: Sequence[AudioFrame]  # empty with reset=True
    owner: Hashable
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    reset: bool = False


class FeatureWorker:
    """Computes features for queued jobs of many sessions, batched, on one thread."""

    def __init__(
        self,
        name: str = "cpu",
        max_frames: int = 512,
        on_fault: Callable[[BaseException], None] | None = None,
        on_pass: Callable[[int, float], None] | None = None,
        burst: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        self.name = name
        self._on_fault = on_fault
        # wraps the resolving of a pass's futures (their callbacks hand the frames on): the
        # engine worker's burst(), so the frames of one pass start one batch, not several
        self._burst = burst
        # (active frames, seconds) of every pass that had any, before its futures resolve: the
        # device's stage times tell a slow pass (a GPU shared with the engine's batches) from a
        # long wait for one
        self._on_pass = on_pass
        self.max_frames = max_frames  # most frames taken in one pass (bounds one pass's latency)
        self._queue: collections.deque[_Job] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self.passes = 0  # batched passes run
        self.jobs = 0  # jobs served
        self.busy_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name=f"features-{name}", daemon=True)
        self._thread.start()

    def submit(
        self, featurizer: Featurizer, frames: Sequence[AudioFrame], owner: Hashable
    ) -> concurrent.futures.Future:
        """Queue consecutive frames of one stream; resolves to their ``list[FrameFeatures]``."""
        job = _Job(featurizer, list(frames), owner)
        self._put(job)
        return job.future

    def submit_many(
        self, requests: Sequence[tuple[Featurizer, Sequence[AudioFrame], Hashable]]
    ) -> list[concurrent.futures.Future]:
        """:meth:`submit` for several jobs at once, queued together under one lock with one wake-up
        of the thread: frames that arrived together (a device process's burst from the server)
        then share a pass, and the thread is not woken into a GIL fight with the submitter
        after the first of them."""
        jobs = [_Job(featurizer, list(frames), owner) for featurizer, frames, owner in requests]
        self._put(*jobs)
        return [job.future for job in jobs]

    def reset(self, featurizer: Featurizer, owner: Hashable) -> None:
        """Drop ``owner``'s queued jobs and reset ``featurizer`` before any job submitted later."""
        self.cancel(owner)
        self._put(_Job(featurizer, [], owner, reset=True))

    def cancel(self, owner: Hashable) -> int:
        """Drop every queued job of ``owner`` (its futures are cancelled)."""
        with self._cv:
            dropped = [job for job in self._queue if job.owner == owner and not job.reset]
            if dropped:
                self._queue = collections.deque(job for job in self._queue if job.owner != owner or job.reset)
        for job in dropped:
            job.future.cancel()
        return len(dropped)

    @property
    def queued(self) -> int:
        with self._cv:
            return len(self._queue)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            pending, self._queue = list(self._queue), collections.deque()
            self._cv.notify_all()
        for job in pending:
            job.future.cancel()
        self._thread.join(timeout=5)

    # -- the thread ----------------------------------------------------------------------------------

    def _put(self, *jobs: _Job) -> None:
        if not jobs:
            return
        with self._cv:
            if self._closed:
                raise RuntimeError(f"feature worker {self.name} is closed")
            self._queue.extend(jobs)
            self._cv.notify()

    def _take(self) -> list[_Job]:
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            taken: list[_Job] = []
            frames = 0
            while self._queue and (not taken or frames + len(self._queue[0].frames) <= self.max_frames):
                job = self._queue.popleft()
                frames += len(job.frames)
                taken.append(job)
            return taken

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if not jobs:
                if self._closed:
                    return
                continue
            # a reset splits the pass: jobs before it are computed, then the reset runs, in order
            group: list[_Job] = []
            for job in jobs:
                if job.reset:
                    self._compute(group)
                    group = []
                    if job.future.set_running_or_notify_cancel():
                        try:
                            job.featurizer.reset()
                            job.future.set_result([])
                        except Exception as exc:  # noqa: BLE001 - reported to the session, not raised here
                            job.future.set_exception(exc)
                elif job.future.set_running_or_notify_cancel():
                    group.append(job)
            self._compute(group)

    def _compute(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        started = time.perf_counter()
        # consecutive jobs of one featurizer -> one call (in submission order)
        merged: dict[int, list[_Job]] = {}
        order: list[Featurizer] = []
        for job in jobs:
            key = id(job.featurizer)
            if key not in merged:
                merged[key] = []
                order.append(job.featurizer)
            merged[key].append(job)
        results: dict[int, list[FrameFeatures] | BaseException] = {}
        by_batcher: dict[int, tuple[Any, list[Featurizer]]] = {}
        for featurizer in order:
            batcher = featurizer.batcher
            if batcher is None:
                results[id(featurizer)] = self._call(lambda f=featurizer: f.features(_frames(merged[id(f)])))
            else:
                by_batcher.setdefault(id(batcher), (batcher, []))[1].append(featurizer)
        for batcher, members in by_batcher.values():
            work = [(f, _frames(merged[id(f)])) for f in members]
            out = self._call(lambda b=batcher, w=work: b.features(w))
            for k, f in enumerate(members):
                results[id(f)] = out if isinstance(out, BaseException) else out[k]
        computed = time.perf_counter() - started
        if self._on_pass is not None:
            # the frames that go on to a picture: a silent frame's pass does no encoder work and
            # would only dilute the figure
            active = sum(
                sum(1 for f in result if f.active) for result in results.values() if not isinstance(result, BaseException)
            )
            if active:
                self._on_pass(active, computed)
        with self._burst() if self._burst is not None else contextlib.nullcontext():
            _resolve(jobs, results)
        self.passes += 1
        self.jobs += len(jobs)
        self.busy_seconds += time.perf_counter() - started

    def _call(self, fn: Any) -> Any:
        try:
            return fn()
        except Exception as exc:  # a failed pass fails its jobs, not the worker
            log.exception("feature pass failed on %s", self.name)
            if self._on_fault is not None and is_device_fault(exc):
                self._on_fault(exc)
            return exc


def _resolve(jobs: list[_Job], results: dict[int, list[FrameFeatures] | BaseException]) -> None:
    """Each job's future, in submission order (a featurizer's jobs share its result in order)."""
    cursor = {id(job.featurizer): 0 for job in jobs}
    for job in jobs:
        key = id(job.featurizer)
        result = results[key]
        if isinstance(result, BaseException):
            job.future.set_exception(result)
            continue
        lo = cursor[key]
        cursor[key] = lo + len(job.frames)
        job.future.set_result(result[lo : lo + len(job.frames)])


def _frames(jobs: list[_Job]) -> list[AudioFrame]:
    return [frame for job in jobs for frame in job.frames]
