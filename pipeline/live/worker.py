"""One batching worker per engine device, shared by every session bound to it.

Why a thread: the engine call (a GPU batch, or the lite warp on a CPU) must stay off the asyncio
loop, and frames of all sessions compete for it. Compositing happens in the same thread, inside
:meth:`Engine.compose` (generation + blending: on the CPU by default, on its own device for
engines that can), so only finished frames come back to the loop.

Which frames go into a batch. Each job carries its frame's deadline (the wall time at which the
session releases that frame to its outputs). A batch is filled in two passes over the jobs in
earliest-deadline-first order:

1. every session (``owner``) with queued jobs may take up to its *share* of the batch,
   ``ceil(batch_size / sessions with queued jobs)``;
2. slots left free go to the remaining jobs, earliest deadline first, whoever owns them.

Why not EDF alone: a session is paced by its clock at 25 frames/s, so in steady state it has one
or two frames queued; a session with many is catching up on a backlog (features that arrived in
a burst after a stall, a loop that was held up). Those frames are usually already overdue, and
an overdue deadline is the *earliest* deadline: EDF alone would serve one session's stale backlog
before every other session's on-time frame, turning one session's stall into everyone's. The
share gives each session with work a slot in the very next batch, which is all a paced session
needs to stay on time, and the backlog still drains at full batch speed through the slots others
leave free. Without contention (no more jobs queued than one batch holds) the batch is simply
every queued job, exactly as EDF.

Why not "serve overdue jobs after on-time ones" instead: outputs wait for every frame's picture
in order (an overdue frame is never skipped), so demoting a late frame stalls its session's video
further while helping nobody the share does not already protect; and under overload a demoted
class would starve for good. The share keeps every session progressing.

Frames that cannot be on time are skipped, with ``skip_late`` (``engine.skip_late_frames``, on
in the server). Outputs release every frame in order, so a frame made late holds its session's
video back, and under a burst above the device's capacity (more sessions starting to talk at
once than it can serve) every frame made late makes the next one later: the load test saw a
backlog that drained only at the device's spare rate, so the sessions never caught up although
the average load fitted (docs/benchmarks.md, "Load test on the H200: findings"). So when more
frames are queued than one batch holds (the device is behind), queued frames whose deadline
falls before even the next batch could be done (now + a batch's own time) resolve to
:data:`SKIPPED` instead, earliest first, until one batch's worth is left: its session shows its
last picture for that frame (the mouth holds for 40 ms) and is on time again. The frames that
are made are on time, bursts cost a few held frames, and the skips are counted
(``BatchStats.skipped``; per session in its stats). Without a backlog nothing is skipped, and
a full batch is always left to run: a device merely slower than the processing budget makes
its frames late, as before, rather than showing none (and its batch time keeps being measured).

Two details matter (the first version had neither, and on an H200 at 16 talking sessions it
skipped 37 % of frames with the GPU 75 % busy, run ``055707``): skipping stops once one batch's
worth is queued (it used to drop *every* doomed frame once more than a batch was queued, and at
16 sessions a 90 ms budget holds more than a batch: most of the queue went), and a batch's time
is its own, from its start or the previous batch's delivery, whichever is later (its frames are
delivered by the finisher after the previous batch's pasting; start to delivery counted that
wait too).

How many frames a pick always leaves is ``skip_keep`` (``engine.skip_keep_frames``; 0, the
default: one batch). Fewer sheds more of a burst: bench/worker_sim.py, the real worker before a
modelled H200, put 29 conversational sessions at 19 % late or held frames keeping a batch and
9 % keeping one frame, 18 all-talking at 36 % and 11 % (docs/benchmarks.md); on an H200 it was
the other way round (29 conversational 78 % vs 10.5 %): the small batches it leaves cost more
GPU time per frame, so more frames fall behind. Keeping few would cost a device slower than the
processing budget: it would make only that many frames per batch (every fresh frame looks
doomed) and its talking sessions mostly hold; so when every queued frame is doomed, a pick
keeps a whole batch whatever ``skip_keep`` says.

Two stages per batch (:meth:`Engine.compose_staged`): the engine thread runs the device's part
(for MuseTalk: UNet, VAE, blend, the face boxes back to the CPU) and hands the CPU end (pasting
the boxes into full frames, resolving the futures) to a finisher thread, then starts on the next
batch at once. Profiled on an H200 with the work in one thread, the GPU idled ~13 % of the time
between batches while that CPU end ran. A device process gives ``place``: each frame is then
pasted straight into a slot of the shared memory its server reads
(:meth:`~pipeline.ipc.frame_ring.ResultRing.reserve`), and the future resolves to that
:class:`Placement`, not to a frame of its own.

Overlapped batches. An engine whose stage one only queues the batch on its device
(``overlapped_staging``: MuseTalk on a GPU, ``engine.overlap_batches``) returns a stage two with
a ``wait()``; the finisher thread waits there, asleep, then pastes. The engine thread meanwhile
picks and stages the next batch, so the GPU runs it straight after the one before instead of
idling through the batch's host side (picking, stacking inputs, launching: on an H200 at 29
conversational sessions, 7 ms of each ~38 ms batch at p50, plus 2 ms between batches; with the
overlap, frames held for want of GPU time fell from 0.9 % to 0.1 %: runs ``103258`` and
``102927``, docs/benchmarks.md). Picking early has a price: frames that arrive after the pick wait for the batch
after. So the engine thread picks when the batch on the device is expected to have about the
host side's recent time left (x LEAD_SAFETY, + LEAD_MARGIN): its expected end is its start (the
end of the batch before it, if that was still running) plus the recent device time of batches of
its size, and a batch done sooner wakes the pick at once. At most MAX_IN_FLIGHT batches are staged
and not finished. A skipped frame's test ("before even the next batch could be done") counts
from when the batches ahead are expected to end. The batch's figures (``batch``, ``gpu_batch``,
``gpu_idle``, the busy time of :class:`BatchStats`) are recorded after the wait; ``batch_host`` is
the engine thread's time to stage it.

Device faults (:mod:`pipeline.live.faults`): an ordinary exception fails only its batch's frames.
A device fault (CUDA error, out of memory, our :class:`~pipeline.live.faults.DeviceFailure`)
marks the worker *failed*: no more batches, every queued frame fails with
:class:`~pipeline.live.faults.DeviceFailed`, new submissions are refused, and ``on_fault`` tells
the device pool, which takes the device out of rotation and ends its sessions.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pipeline.engines.base import Engine, FrameRequest
from pipeline.live.faults import DeviceFailed, describe_fault, is_device_fault
from pipeline.live.stage_times import StageTimes

log = logging.getLogger("lipstream.worker")

BatchObserver = Callable[[int, float], None]  # (batch size, seconds) after every batch
FaultObserver = Callable[[str], None]  # (reason) once, when the device fails


class Placement(Protocol):
    """Where one frame is to be made (``EngineWorker(place)``): write :attr:`array`, then
    :meth:`commit`; :meth:`abandon` when the frame is not made after all."""

    array: np.ndarray

    def commit(self) -> None: ...

    def abandon(self) -> None: ...


#: (owner, request) -> where the frame goes, or None for a frame of its own
Placer = Callable[[Hashable, FrameRequest], "Placement | None"]

#: Seconds of recent batches that :meth:`EngineWorker.utilisation` looks at.
UTILISATION_WINDOW = 10.0
#: Weight of the newest batch in the running estimate of a batch's time (``skip_late``).
BATCH_TIME_WEIGHT = 0.2


def _recent(previous: float | None, value: float) -> float:
    """A running estimate (batch, host and device times) moved toward ``value`` by BATCH_TIME_WEIGHT."""
    return value if previous is None else previous + BATCH_TIME_WEIGHT * (value - previous)


class _Skipped:
    """What a skipped frame's future resolves to (a singleton: compare with ``is``)."""

    def __repr__(self) -> str:
        return "SKIPPED"


#: The result of a frame that could not be made on time (``EngineWorker(skip_late=True)``).
SKIPPED = _Skipped()


#: Overlapped batches: at most this many staged and not yet finished (one on the device, the next
#: queued behind it).
MAX_IN_FLIGHT = 2
#: Overlapped batches: the next batch is picked when the one on the device has about its host
#: side's recent time (x LEAD_SAFETY, + LEAD_MARGIN seconds) left to run.
LEAD_SAFETY = 1.5
LEAD_MARGIN = 0.002


#: A gathering worker starts a batch by the earliest queued deadline minus the recent batch time
#: times this, minus GATHER_MARGIN seconds (a batch with more frames takes longer).
GATHER_SAFETY = 1.5
GATHER_MARGIN = 0.005


class BatchStats:
    """Batches run on a device and how busy they kept it: read by ``GET /v1/devices``, the
    metrics and admission. Thread-safe. Kept by the worker itself, or mirrored in the server
    from a device process's ``batch`` messages."""

    def __init__(self) -> None:
        self.batches = 0
        self.frames = 0
        self.skipped = 0  # frames resolved as SKIPPED: they could not be on time
        self.busy_seconds = 0.0
        self.started = time.monotonic()
        self._recent: collections.deque[tuple[float, float]] = collections.deque()  # (end, seconds)
        self._lock = threading.Lock()

    def record(self, size: int, seconds: float) -> None:
        now = time.monotonic()
        with self._lock:
            self.batches += 1
            self.frames += size
            self.busy_seconds += seconds
            self._recent.append((now, seconds))
            while self._recent and self._recent[0][0] < now - UTILISATION_WINDOW:
                self._recent.popleft()

    def utilisation(self, window: float = UTILISATION_WINDOW) -> float:
        """Share of the last ``window`` seconds (or of the time since start, if shorter) spent
        running batches."""
        now = time.monotonic()
        with self._lock:
            busy = sum(seconds for end, seconds in self._recent if end >= now - window)
        span = min(window, max(now - self.started, 1e-3))
        return min(1.0, busy / span)


@dataclass(order=True)
class _Job:
    deadline: float
    seq: int
    owner: Hashable = field(compare=False)
    request: FrameRequest = field(compare=False)
    future: concurrent.futures.Future = field(compare=False)
    submitted: float = field(compare=False, default=0.0)  # time.monotonic() at submit


class EngineWorker:
    """Runs ``engine.compose`` (generation + compositing) for queued frame requests, batched
    with a per-session share, earliest deadline first (module docstring)."""

    def __init__(
        self,
        engine: Engine,
        batch_size: int = 16,
        name: str = "cpu",
        on_batch: BatchObserver | None = None,
        on_fault: FaultObserver | None = None,
        skip_late: bool = False,
        skip_keep: int = 0,
        gather_seconds: float = 0.0,
        place: Placer | None = None,
    ) -> None:
        self.engine = engine
        self._place = place
        self.batch_size = batch_size
        self.skip_late = skip_late
        # most an idle worker waits for more frames before a batch that is not full, while the
        # earliest queued deadline allows it (_gather_locked); 0: start at once
        self.gather_seconds = gather_seconds
        # frames never skipped at a pick: the latest-due ones run (0: one batch's worth)
        self.skip_keep = skip_keep if skip_keep > 0 else batch_size
        # a batch's own time: from its start, or from the previous batch's delivery if that came
        # later, to its delivery (the finisher delivers batches in order, so a batch can wait
        # for the previous one's pasting; that wait is not its own), recent batches weighted
        # most; None until a batch has run (nothing is skipped before)
        self.batch_seconds: float | None = None
        self._last_delivery = 0.0
        # Overlapped batches (module docstring): the engine's stage one returns with the batch
        # queued on its device, so the next one is prepared while it runs
        self.overlapped = bool(getattr(engine, "overlapped_staging", False))
        self._in_flight: collections.deque[int] = collections.deque()  # sizes staged, not yet done on the device
        self._busy_until = 0.0  # when the device is expected to be done with them (time.monotonic())
        self._last_done = 0.0
        self._device_seconds: dict[int, float] = {}  # a batch's device time by size, recent batches weighted most
        self._host_seconds: float | None = None  # the engine thread's time to stage a batch, likewise
        self.name = name
        self._on_batch = on_batch
        self._on_fault = on_fault
        self._queues: dict[Hashable, list[_Job]] = {}  # per owner, a heap by (deadline, seq)
        self._queued = 0
        self._holds = 0  # open bursts (burst()): a batch waits for their frames
        self.close_wait = 5.0  # seconds close() waits for a batch in flight (a hung device: not forever)
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self.failed: str | None = None  # the device fault's description once failed
        self.stats = BatchStats()
        self.stages = StageTimes()  # where made frames spent their budget (GET /v1/devices)
        # The CPU end of each batch (pasting, handing frames over) runs here, in batch order,
        # while the device already works on the next batch (Engine.compose_staged).
        self._finisher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"finish-{name}")
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

    def submit(
        self, request: FrameRequest, deadline: float, owner: Hashable, arrived: float | None = None
    ) -> concurrent.futures.Future:
        """Queue one frame; the future resolves to the composed full BGR frame. ``arrived``: when
        its audio reached the device (``time.monotonic()``), for the features stage of
        :attr:`stages`.

        Raises :class:`DeviceFailed` once the device failed, RuntimeError once closed."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        now = time.monotonic()
        if arrived is not None:
            self.stages.add("features", now - arrived)
        with self._cv:
            if self.failed is not None:
                raise DeviceFailed(self._failure_message())
            if self._closed:
                raise RuntimeError(f"engine worker {self.name} is closed")
            job = _Job(deadline, next(self._seq), owner, request, future, now)
            heapq.heappush(self._queues.setdefault(owner, []), job)
            self._queued += 1
            self._cv.notify()
        return future

    @contextlib.contextmanager
    def burst(self) -> Iterator[None]:
        """Frames submitted inside belong together: an idle worker does not start a batch until
        the burst ends (or a whole batch is queued).

        Why: a feature pass resolves all its sessions' frames at once, and each submit woke the
        idle engine thread, which took a batch of the first one or two before the rest were
        queued; they then waited for that small batch (whose fixed cost is most of it) before
        theirs. On an H200 the mean batch was 8-11 frames at 14 all-talking and 26 conversational
        sessions (how many frames a pass hands over there is not measured; in bench/worker_sim.py's
        model passes hold only a few and the burst changes nothing)."""
        with self._cv:
            self._holds += 1
        try:
            yield
        finally:
            with self._cv:
                self._holds -= 1
                if not self._holds:
                    self._cv.notify()

    def cancel(self, owner: Hashable) -> int:
        """Drop every queued request of ``owner`` (an interrupted or closed session)."""
        with self._cv:
            dropped = self._queues.pop(owner, [])
            self._queued -= len(dropped)
        for job in dropped:
            job.future.cancel()
        return len(dropped)

    @property
    def queued(self) -> int:
        with self._cv:
            return self._queued

    def fail(self, reason: str) -> None:
        """Take the device out of service: fail queued frames, refuse new ones, tell ``on_fault``.

        Called by the worker thread on a device fault, or by the device pool when something
        else on the device (its feature pass, loading an avatar) hit one. Idempotent."""
        with self._cv:
            if self.failed is not None:
                return
            self.failed = reason
            pending = self._drain_locked()
            self._cv.notify_all()
        log.error("device %s failed: %s", self.name, reason)
        if self._on_fault is not None:  # out of rotation before any frame hears of the failure
            self._on_fault(reason)
        error = DeviceFailed(self._failure_message())
        for job in pending:
            if not job.future.done():
                job.future.set_exception(error)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            pending = self._drain_locked()
            self._cv.notify_all()
        for job in pending:
            job.future.cancel()
        self._thread.join(timeout=self.close_wait)
        self._finisher.shutdown(wait=True)  # batches already made are delivered

    # -- the thread ----------------------------------------------------------------------------------

    def _failure_message(self) -> str:
        return f"device {self.name} failed: {self.failed}"

    def _drain_locked(self) -> list[_Job]:
        pending = [job for queue in self._queues.values() for job in queue]
        self._queues = {}
        self._queued = 0
        return pending

    def _take_batch(self) -> list[_Job]:
        with self._cv:
            while (
                (not self._queued or (self._holds and self._queued < self.batch_size))
                and not self._closed
                and self.failed is None
            ):
                self._cv.wait()
            if self._closed or self.failed is not None:
                return []
            if self.gather_seconds > 0 and self.batch_seconds is not None:
                self._gather_locked()
                if self._closed or self.failed is not None or not self._queued:
                    return []
            if self.skip_late and self.batch_seconds is not None and self._queued > self.skip_keep:
                # a batch picked now starts on the device once the batches ahead of it are done
                starts = max(time.monotonic(), self._busy_until if self._in_flight else 0.0)
                skipped = self._skip_late_locked(starts + self.batch_seconds)
            else:
                skipped = []
            batch = self._pick_locked()
        for job in skipped:
            job.future.set_result(SKIPPED)
        return batch

    def _gather_locked(self) -> None:
        """Wait up to ``gather_seconds`` for a fuller batch, but only while the earliest queued
        frame could still start later and be on time: its deadline minus a batch's recent time
        (x GATHER_SAFETY, + GATHER_MARGIN) is the latest start.

        Why: a batch's fixed cost (about 5 ms of an H200 batch, plus its host side) is paid per
        batch, so an idle worker that starts on the first frames it sees makes small, costly
        batches (8.4 frames, 2.9 ms per frame at 14 all-talking sessions; 2.6 ms at 15.5). A
        frame is released at its release time whenever it is made in time, so waiting within
        the deadlines costs it nothing."""
        assert self.batch_seconds is not None
        until = time.monotonic() + self.gather_seconds
        while self._queued < self.batch_size and not self._closed and self.failed is None:
            heads = [queue[0].deadline for queue in self._queues.values() if queue]
            if not heads:
                return
            latest_start = min(heads) - self.batch_seconds * GATHER_SAFETY - GATHER_MARGIN
            left = min(until, latest_start) - time.monotonic()
            if left <= 0:
                return
            self._cv.wait(left)

    def _skip_late_locked(self, done_by: float) -> list[_Job]:
        """Take queued jobs due before ``done_by`` out of the queues, earliest first, while more
        than ``skip_keep`` (one batch, by default) are queued; a whole batch when every queued
        job is doomed (module docstring)."""
        skipped: list[_Job] = []
        keep = self.skip_keep
        if keep < self.batch_size and all(job.deadline < done_by for queue in self._queues.values() for job in queue):
            keep = self.batch_size  # a device slower than the budget: make a batch, late, not one frame
        for queue in self._earliest_first_locked():
            if self._queued <= keep or queue[0].deadline >= done_by:
                break
            job = heapq.heappop(queue)
            self._queued -= 1
            if job.future.set_running_or_notify_cancel():
                skipped.append(job)
        if skipped:
            self.stats.skipped += len(skipped)
        return skipped

    def _earliest_first_locked(self) -> Iterator[list[_Job]]:
        """The owners' queues in the order of their queued jobs' deadlines, across owners: each
        time, the queue whose head is the earliest queued job. The caller pops that head before
        asking for the next, or stops."""
        heads = [(queue[0], owner) for owner, queue in self._queues.items() if queue]
        heapq.heapify(heads)
        while heads:
            _, owner = heapq.heappop(heads)
            queue = self._queues[owner]
            yield queue
            if queue:
                heapq.heappush(heads, (queue[0], owner))

    def _pick_locked(self) -> list[_Job]:
        """Up to ``batch_size`` jobs: each owner's share first, then the rest, earliest deadline
        first (module docstring)."""
        owners = sorted((queue[0], owner) for owner, queue in self._queues.items() if queue)
        share = max(1, math.ceil(self.batch_size / max(1, len(owners))))
        batch: list[_Job] = []

        def take(queue: list[_Job]) -> None:
            job = heapq.heappop(queue)
            self._queued -= 1
            if job.future.set_running_or_notify_cancel():  # skips frames cancelled meanwhile
                batch.append(job)

        for _, owner in owners:  # pass 1: every owner's share, owners by their earliest job
            queue = self._queues[owner]
            taken = len(batch)
            while queue and len(batch) - taken < share and len(batch) < self.batch_size:
                take(queue)
        for queue in self._earliest_first_locked():  # pass 2: free slots, earliest deadline first
            if len(batch) >= self.batch_size:
                break
            take(queue)
        for owner in [owner for owner, queue in self._queues.items() if not queue]:
            del self._queues[owner]
        batch.sort()
        return batch

    def _run(self) -> None:
        while True:
            if self.overlapped:
                self._wait_for_device()
            batch = self._take_batch()
            if not batch:
                if self._closed or self.failed is not None:
                    return
                continue
            started = time.monotonic()  # one clock for stages, deadlines and the batch time
            self.stages.add_each("queue", [started - job.submitted for job in batch])
            try:
                finish = self._stage_one([job.request for job in batch])
            except Exception as exc:
                if self._failed_batch(batch, exc):
                    return
                continue
            made = time.monotonic()
            if self.overlapped:
                self._queued_on_device(len(batch), started, made)
                try:
                    self._finisher.submit(self._finish, batch, finish, started, made)
                except RuntimeError:  # closed meanwhile: its frames will not be waited for
                    self._batch_done(len(batch), time.monotonic())
                    self._close_batch(batch)
                    return
                continue
            elapsed = made - started
            self.stats.record(len(batch), elapsed)
            self.stages.add("batch", elapsed, len(batch))
            asleep = getattr(self.engine, "last_batch_asleep", None)
            if asleep is not None:  # an engine that waits for its device asleep tells how long
                self.stages.add("batch_host", max(0.0, elapsed - asleep), len(batch))
            self._record_device_stages(len(batch))
            try:
                self._finisher.submit(self._finish, batch, finish, started, made)
            except RuntimeError:  # closed while this batch ran longer than close() waits for it
                self._close_batch(batch)
                return
            if self._on_batch is not None:
                self._on_batch(len(batch), elapsed)

    def _close_batch(self, batch: list[_Job]) -> None:
        closed = RuntimeError(f"engine worker {self.name} closed during the batch")
        for job in batch:
            if not job.future.done():
                job.future.set_exception(closed)

    # -- overlapped batches --------------------------------------------------------------------------

    def _wait_for_device(self) -> None:
        """Before picking a batch: wait while MAX_IN_FLIGHT batches are staged, then until the
        one on the device is nearly done (its expected end minus the lead), so that the pick
        sees the frames that came meanwhile and the batch is queued just before the device
        needs it. Wakes early when a batch is done sooner than expected."""
        with self._cv:
            while len(self._in_flight) >= MAX_IN_FLIGHT and self._live_locked():
                self._cv.wait()
            lead = LEAD_MARGIN + LEAD_SAFETY * (self._host_seconds or 0.0)
            while self._in_flight and self._live_locked():
                left = self._busy_until - lead - time.monotonic()
                if left <= 0:
                    return
                self._cv.wait(left)

    def _live_locked(self) -> bool:
        return not self._closed and self.failed is None

    def _device_estimate(self, size: int) -> float:
        """Expected device seconds of a batch of ``size``: the recent time of that size, else of
        the nearest size measured, scaled; 0 before any (the pick is then not delayed)."""
        known = self._device_seconds.get(size)
        if known is not None:
            return known
        if not self._device_seconds:
            return 0.0
        near = min(self._device_seconds, key=lambda k: abs(k - size))
        return self._device_seconds[near] * size / near

    def _queued_on_device(self, size: int, started: float, staged: float) -> None:
        """The engine thread queued a batch: account its host time and its expected end."""
        host = staged - started
        self.stages.add("batch_host", host, size)
        with self._cv:
            self._host_seconds = _recent(self._host_seconds, host)
            start = max(started, self._busy_until) if self._in_flight else started
            self._in_flight.append(size)
            self._busy_until = start + self._device_estimate(size)

    def _batch_done(self, size: int, done: float, device_seconds: float | None = None) -> None:
        """The device finished the oldest staged batch (of ``size``) at ``done``."""
        with self._cv:
            if device_seconds is not None:
                self._device_seconds[size] = _recent(self._device_seconds.get(size), device_seconds)
            if self._in_flight:
                self._in_flight.popleft()
            self._busy_until = done + sum(self._device_estimate(n) for n in self._in_flight)
            self._cv.notify_all()

    def _wait_overlapped(self, batch: list[_Job], finish: Any, started: float) -> float | None:
        """On the finisher thread: wait for an overlapped batch's device part and record what
        the engine thread records for a batch it waited for itself; the time it was done, or
        None when it failed (its frames failed with it)."""
        size = len(batch)
        try:
            wait = getattr(finish, "wait", None)
            if wait is not None:  # an engine whose stage one already waited has none
                wait()
        except Exception as exc:
            self._batch_done(size, time.monotonic())
            self._failed_batch(batch, exc)
            return None
        done = time.monotonic()
        own = done - max(started, self._last_done)  # from its start, or the previous batch's end
        self._last_done = done
        gpu = getattr(self.engine, "last_batch_gpu", None)  # set by the wait, on this thread
        busy = gpu if gpu is not None else own
        self._batch_done(size, done, busy)
        self.stats.record(size, busy)
        self.stages.add("batch", own, size)
        self._record_device_stages(size)
        if self._on_batch is not None:
            self._on_batch(size, busy)
        return done

    def _record_device_stages(self, size: int) -> None:
        """``gpu_batch`` / ``gpu_idle`` of the batch just made, from an engine that times its device."""
        for stage, attribute in (("gpu_batch", "last_batch_gpu"), ("gpu_idle", "last_batch_idle")):
            seconds = getattr(self.engine, attribute, None)
            if seconds is not None:
                self.stages.add(stage, seconds, size)

    def _stage_one(self, requests: list[FrameRequest]) -> Callable[[], list[Any]]:
        staged = getattr(self.engine, "compose_staged", None)
        if staged is not None:
            return staged(requests)
        frames = self.engine.compose(requests)  # an engine-like object without stages
        return lambda: frames

    def _finish(self, batch: list[_Job], finish: Callable[[], list[Any]], started: float, made: float) -> None:
        """On the finisher thread, batches in order: the CPU part, then every frame delivered.
        ``started`` / ``made``: the start and end of the batch's device part (``time.monotonic()``,
        as deadlines)."""
        if self.overlapped:
            done = self._wait_overlapped(batch, finish, started)
            if done is None:
                return
            made = done
        places: list[Placement | None] = []
        try:
            if self._place is None:
                frames = finish()
            else:
                for job in batch:
                    places.append(self._place(job.owner, job.request))
                frames = finish([None if p is None else p.array for p in places])
            if len(frames) != len(batch):
                raise RuntimeError(f"engine returned {len(frames)} frames for {len(batch)} requests")
        except Exception as exc:
            for place in places:
                if place is not None:
                    place.abandon()
            self._failed_batch(batch, exc)
            return
        for job, frame, place in itertools.zip_longest(batch, frames, places):
            if place is not None:
                place.commit()
                frame = place
            try:
                job.future.set_result(frame)
            except concurrent.futures.InvalidStateError:  # cancelled meanwhile (its session gave up on it)
                if place is not None:
                    place.abandon()  # nobody will read it: the slot is free again
        delivered = time.monotonic()
        self.stages.add("finish", delivered - made, len(batch))
        self.stages.add_each("slack", [job.deadline - delivered for job in batch])
        seconds = delivered - max(started, self._last_delivery)
        self._last_delivery = delivered
        self.batch_seconds = _recent(self.batch_seconds, seconds)

    def _failed_batch(self, batch: list[_Job], exc: Exception) -> bool:
        """Fail ``batch``'s frames; True when ``exc`` was a device fault (the worker is done)."""
        if is_device_fault(exc):
            log.exception("engine batch of %d hit a device fault on %s", len(batch), self.name, exc_info=exc)
            self.fail(describe_fault(exc))
            error = DeviceFailed(self._failure_message())
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(error)
            return True
        # an ordinary failure fails this batch's frames, not the worker
        log.error("engine batch of %d failed on %s", len(batch), self.name, exc_info=exc)
        for job in batch:
            if not job.future.done():
                job.future.set_exception(exc)
        return False
