"""The server's side of a device process: start it, bind streams to it, get frames back.

A :class:`DeviceLink` owns one spawned :mod:`~pipeline.live.device_process` and reads, to the
device pool, like a local worker: batch statistics, ``queued``, ``fail``, ``close``. Each session
bound to the device gets a :class:`RemoteStream`; :meth:`RemoteStream.submit` sends one frame's
audio window and returns two futures, its features' ``active`` flag and its picture (a full BGR
frame, or None when no picture is made: silence, or nobody watching).

Messages from the process are handled on the channel's receiving thread, not the event loop: a
frame's futures are resolved there (sessions wrap them into asyncio futures), and its picture
is copied out of the :class:`~pipeline.ipc.frame_ring.ResultRing` right away, so the ring slot
is free again within microseconds of the message. The rings belong to this side (one per frame
shape, unlinked on close): a device process that crashes leaves no shared memory behind.

A process that exits unexpectedly is a device fault: ``on_fault`` tells the pool (which ends the
device's sessions), and every pending frame fails with :class:`~pipeline.live.faults.DeviceFailed`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Any

import numpy as np

from pipeline.audio.windows import AudioFrame
from pipeline.avatar.model import Avatar
from pipeline.errors import LipstreamError
from pipeline.ipc.channel import Channel
from pipeline.ipc.frame_ring import ResultRing
from pipeline.live.device_process import DeviceSpec
from pipeline.live.faults import DeviceFailed
from pipeline.live.worker import SKIPPED, BatchObserver, BatchStats, FaultObserver

log = logging.getLogger("lipstream.devices")

#: Seconds a command may take: building a GPU engine compiles and captures graphs (minutes, cold).
START_TIMEOUT = 1800.0
LOAD_TIMEOUT = 600.0


class _Frame:
    """A frame in flight: its features' ``active`` flag, then its picture."""

    __slots__ = ("features", "picture")

    def __init__(self) -> None:
        self.features: concurrent.futures.Future = concurrent.futures.Future()
        self.picture: concurrent.futures.Future = concurrent.futures.Future()

    def fail(self, error: BaseException | None) -> None:
        for future in (self.features, self.picture):
            if future.done():
                continue
            if error is None:
                future.cancel()
            else:
                future.set_exception(error)


class DeviceLink:
    """One device process (module docstring)."""

    def __init__(self, spec: DeviceSpec, ring_slots: int | None = None) -> None:
        from pipeline.live import device_process

        self.spec = spec
        self.switch_interval_ms: float | None = None  # the process's GIL switch interval, once started
        self.gc: dict[str, Any] | None = None  # the process's garbage collections (pipeline/live/gc_pauses.py)
        self.ring_waits: dict[str, float] | None = None  # its result rings' writer waiting for us
        self.name = spec.name
        self.on_batch: BatchObserver | None = None
        self.on_fault: FaultObserver | None = None
        self.stats = BatchStats()
        self.queued = 0  # frames waiting for the engine, as of the last batch
        self.stage_summary: dict[str, Any] = {}  # the process's StageTimes.summary(), every second
        self.failed: str | None = None
        # A batch is written in one go and read within moments: two batches of slots is plenty.
        self.ring_slots = ring_slots or 2 * spec.batch_size + 8
        self._rings: dict[tuple[int, ...], ResultRing] = {}
        self._rings_by_name: dict[str, ResultRing] = {}
        self._frames: dict[str, dict[int, _Frame]] = {}  # stream key -> frame index -> in flight
        self._replies: dict[int, concurrent.futures.Future] = {}
        self._requests = itertools.count()
        self._lock = threading.Lock()
        self._stopping = False
        context = multiprocessing.get_context("spawn")  # no fork: the server holds threads (and CUDA)
        ours, theirs = context.Pipe(duplex=True)
        self.process = context.Process(
            target=device_process.run, args=(theirs, spec), name=f"lipstream-device-{spec.name}", daemon=True
        )
        self.process.start()
        theirs.close()
        # coalesce: the frames a loop turn submits cross as one item (pipeline/ipc/channel.py)
        self.channel = Channel(ours, f"device-{spec.name}", coalesce=True)
        self.channel.listen_in_thread(self._handle, self._gone)

    # -- commands (blocking: call them off the event loop) ------------------------------------------

    def start(self, avatar_id: str, calibrate: bool) -> Any:
        """Build the engine, load ``avatar_id``, calibrate if asked, start the workers; returns the
        :class:`~pipeline.live.calibration.Calibration` or None. Raises what the process raised."""
        calibration, self.switch_interval_ms = self._request("start", avatar_id, calibrate, timeout=START_TIMEOUT)
        return calibration

    def load_avatar(self, avatar_id: str) -> None:
        self._request("load", avatar_id, timeout=LOAD_TIMEOUT)

    def _request(self, kind: str, *args: Any, timeout: float) -> Any:
        if self.failed is not None:
            raise DeviceFailed(self._failure_message())
        request = next(self._requests)
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._replies[request] = future
        self.channel.send((kind, request, *args))
        self.channel.flush()  # it is waited for right here
        try:
            error, value = future.result(timeout)
        except concurrent.futures.TimeoutError:
            self._dump_stacks()
            raise LipstreamError(f"device process {self.name} did not finish '{kind}' within {timeout:.0f} s") from None
        finally:
            with self._lock:
                self._replies.pop(request, None)
        if error is not None:
            raise error
        return value

    def _dump_stacks(self) -> None:
        if self.process.pid is not None and self.process.is_alive():
            with contextlib.suppress(OSError):
                os.kill(self.process.pid, signal.SIGUSR1)

    # -- streams -------------------------------------------------------------------------------------

    def open_stream(self, key: str, avatar: Avatar) -> RemoteStream:
        """A session's stream on this device (``avatar`` loaded here already)."""
        if self.failed is not None:
            raise DeviceFailed(self._failure_message())
        shape = tuple(avatar.frames[0].shape)
        with self._lock:
            ring = self._rings.get(shape)
            if ring is None:
                ring = self._rings[shape] = ResultRing.create(shape, self.ring_slots)
                self._rings_by_name[ring.name] = ring
                self.channel.send(("ring", *ring.describe()))
            self._frames[key] = {}
        self.channel.send(("open", key, avatar.id))
        return RemoteStream(self, key)

    def _submit(self, key: str, frame: AudioFrame, avatar_index: int, deadline: float, compose: bool) -> _Frame:
        pending = _Frame()
        with self._lock:
            frames = self._frames.get(key)
            if frames is None or self.failed is not None:
                frames = None
            else:
                frames[frame.index] = pending
        if frames is None:
            pending.fail(DeviceFailed(self._failure_message()) if self.failed else RuntimeError("stream is closed"))
            return pending
        window = np.ascontiguousarray(frame.window, dtype=np.float32).tobytes()
        sent = time.monotonic()  # the device's stage times start its handoff here
        self.channel.send(("frame", key, frame.index, window, frame.speech, avatar_index, deadline, compose, sent))
        return pending

    def _drop(self, key: str, command: str, forget: bool) -> None:
        """Cancel ``key``'s frames in flight here and tell the process (``reset`` or ``close``);
        their late messages then find nothing and are ignored (pictures' slots released)."""
        with self._lock:
            frames = self._frames.pop(key, None) if forget else self._frames.get(key)
            pending = list(frames.values()) if frames else []
            if frames:
                frames.clear()
        for frame in pending:
            frame.fail(None)
        if not self.channel.closed:
            self.channel.send((command, key))

    # -- the process's messages (on the receiving thread) ---------------------------------------------

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "features":
            _, key, index, active, composing = message
            frame = self._frame_of(key, index, last=not composing)
            if frame is not None:
                if not frame.features.done():
                    frame.features.set_result(active)
                if not composing and not frame.picture.done():
                    frame.picture.set_result(None)
        elif kind == "picture":
            _, key, index, ring_name, slot, number = message
            ring = self._rings_by_name.get(ring_name)
            frame = self._frame_of(key, index, last=True)
            if ring is None:
                return
            if frame is None:
                ring.release(slot, number)  # interrupted meanwhile: nobody wants it
                return
            image = ring.take(slot, number)
            if image is None:
                frame.fail(RuntimeError(f"frame {index} was overwritten before it was read"))
            elif not frame.picture.done():
                frame.picture.set_result(image)
        elif kind == "skipped":
            _, key, index = message
            self.stats.skipped += 1
            frame = self._frame_of(key, index, last=True)
            if frame is not None and not frame.picture.done():
                frame.picture.set_result(SKIPPED)
        elif kind == "failed":
            _, key, index, error = message
            frame = self._frame_of(key, index, last=True)
            if frame is not None:
                frame.fail(error)
        elif kind == "batch":
            _, size, seconds, queued = message
            self.stats.record(size, seconds)
            self.queued = queued
            if self.on_batch is not None:
                self.on_batch(size, seconds)
        elif kind == "stages":
            _, self.stage_summary, self.gc, self.ring_waits = message
        elif kind == "fault":
            self._fault(message[1])
        elif kind == "reply":
            _, request, error, value = message
            with self._lock:
                future = self._replies.get(request)
            if future is not None and not future.done():
                future.set_result((error, value))

    def _frame_of(self, key: str, index: int, last: bool) -> _Frame | None:
        with self._lock:
            frames = self._frames.get(key)
            if frames is None:
                return None
            return frames.pop(index, None) if last else frames.get(index)

    def _gone(self) -> None:
        """The process's end of the pipe closed: an orderly stop, or a crash (a device fault)."""
        if self._stopping:
            return
        self.process.join(2)
        self._fault(f"device process exited (code {self.process.exitcode})")
        self._close_rings()  # nobody writes them any more

    def _fault(self, reason: str) -> None:
        if self.failed is None and self.on_fault is not None:
            self.on_fault(reason)  # the pool takes the device out of rotation, then calls fail()
        self.fail(reason)

    def _failure_message(self) -> str:
        return f"device {self.name} failed: {self.failed}"

    # -- what the device pool uses -------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        """Out of service: every frame in flight fails with DeviceFailed; idempotent."""
        with self._lock:
            if self.failed is not None:
                return
            self.failed = reason
            pending = [frame for frames in self._frames.values() for frame in frames.values()]
            for frames in self._frames.values():
                frames.clear()
            replies = list(self._replies.values())
        error = DeviceFailed(self._failure_message())
        for frame in pending:
            frame.fail(error)
        for future in replies:
            if not future.done():
                future.set_result((error, None))

    def describe_process(self) -> dict[str, Any]:
        return {
            "pid": self.process.pid,
            "alive": self.process.is_alive(),
            "result_rings": len(self._rings),
            "switch_interval_ms": self.switch_interval_ms,  # as the process applied it
            "gc": self.gc,  # its garbage collections and their longest pauses (once a second)
            # its composed frames waited this often / long for the server to read a ring slot
            "result_ring_waits": self.ring_waits,
        }

    def close(self) -> None:
        """Stop the process (what is queued is dropped), then unlink the rings."""
        self._stopping = True
        if not self.channel.closed:
            self.channel.send(("stop",))
            self.channel.flush()  # joined right here
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self.channel.close()
        self.fail("closed")
        self._close_rings()

    def _close_rings(self) -> None:
        with self._lock:
            rings, self._rings, self._rings_by_name = list(self._rings.values()), {}, {}
        for ring in rings:
            ring.close()


class RemoteStream:
    """One session's stream on a device process; what :class:`~pipeline.live.session.LiveSession`
    calls instead of a local featurizer and workers."""

    def __init__(self, link: DeviceLink, key: str) -> None:
        self.link = link
        self.key = key

    def submit(
        self, frame: AudioFrame, avatar_index: int, deadline: float, compose: bool
    ) -> tuple[concurrent.futures.Future, concurrent.futures.Future]:
        """Futures of frame ``frame``'s ``active`` flag and of its picture (None: none made)."""
        pending = self.link._submit(self.key, frame, avatar_index, deadline, compose)
        return pending.features, pending.picture

    def reset(self) -> None:
        """Interrupt: frames in flight are cancelled, the featurizer starts from rest."""
        self.link._drop(self.key, "reset", forget=False)

    def close(self) -> None:
        self.link._drop(self.key, "close", forget=True)

