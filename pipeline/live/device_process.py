"""A device process: one engine device's engine, feature worker and batching worker, own GIL.

Why a process per device: measured on an H200 (docs/benchmarks.md, "Load test on the H200:
findings"), the GPUs sat 55-66 % busy while the server's one process was pinned at 100 % of a
core. A quarter of its GIL time was the feature path (cutting each session's audio into Whisper
windows, gathering tokens), another seventh the engine worker's Python between GPU calls, and
the batches themselves ran ~30 % slower than in the engine benchmark because their thread kept
waiting for the GIL. Here those threads (:class:`~pipeline.live.feature_worker.FeatureWorker`,
:class:`~pipeline.live.worker.EngineWorker`, unchanged) get a process of their own per device;
the server keeps the API, the session clocks and the outputs, and talks to this process through
:class:`~pipeline.live.device_link.DeviceLink`.

Per frame the server sends the frame's audio window with everything needed to finish it here:
which avatar frame, the deadline, whether anyone watches. The chain features -> (active and
watched? compose : nothing) runs in this process without a round trip through the server.
The server hears ``features`` (in frame order, as soon as they are known: speaking events and
talk statistics) and then ``picture`` with the slot of a :class:`~pipeline.ipc.frame_ring.ResultRing`
(shared memory the server owns) holding the composed frame. Pictures never cross the pipe.

Commands (tuples, first item the kind):

- server -> process: ``start(request, avatar, calibrate)``, ``load(request, avatar)``,
  ``ring(name, shape, slots)``, ``open(key, avatar)``, ``frame(key, index, window, speech,
  avatar_index, deadline, compose, sent)``, ``reset(key)``, ``close(key)``, ``stop()``;
- process -> server: ``reply(request, error, value)`` (``start``'s value: the calibration and the
  GIL switch interval the process runs with, ms), ``features(key, index, active,
  composing)``, ``picture(key, index, ring, slot, number)``, ``skipped(key, index)`` (the frame
  could not be on time), ``failed(key, index, error)``,
  ``batch(size, seconds, queued)``, ``stages(summary)`` (every second:
  :class:`~pipeline.live.stage_times.StageTimes`), ``fault(reason)``.

``deadline`` is a ``time.monotonic()`` instant (one clock for every process of the machine).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import pickle
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audio.windows import AudioFrame
from pipeline.avatar.model import Avatar
from pipeline.engines.base import Engine, Featurizer, FrameRequest
from pipeline.ipc.channel import Channel
from pipeline.ipc.frame_ring import ResultRing, ResultSlot
from pipeline.live.calibration import calibrate
from pipeline.live.faults import DeviceFailed, describe_fault, is_device_fault
from pipeline.live.feature_worker import FeatureWorker
from pipeline.live.gc_pauses import GcPauses
from pipeline.live.worker import SKIPPED, EngineWorker
from pipeline.opencv_threads import use_serial_opencv

log = logging.getLogger("lipstream.device")
#: Seconds between two ``stages`` messages (the engine worker's stage percentiles).
STAGES_EVERY = 1.0


@dataclass(frozen=True)
class DeviceSpec:
    """Everything a device process needs to build its device (picklable: it crosses the spawn)."""

    name: str  # cpu, cpu:N, cuda:N
    engine: str
    engine_options: dict[str, Any]
    avatars_dir: Path
    batch_size: int
    processing_seconds: float
    headroom: float
    log_level: str = "warning"
    skip_late: bool = False  # EngineWorker(skip_late): frames that cannot be on time are skipped
    skip_keep: int = 0  # EngineWorker(skip_keep): frames always left queued when skipping (0: a batch)
    gather_seconds: float = 0.0  # EngineWorker(gather_seconds): most an idle worker waits for a fuller batch
    switch_interval_ms: float = 0.5  # the process's sys.setswitchinterval (engine.device_switch_interval_ms)


@dataclass
class _Stream:
    """One session's audio stream on this device."""

    featurizer: Featurizer
    avatar: Avatar
    closed: bool = False


@dataclass
class DeviceProcess:
    """The process's state; commands arrive on the channel's receiving thread (module docstring)."""

    spec: DeviceSpec
    channel: Channel
    engine: Engine | None = None
    features: FeatureWorker | None = None
    worker: EngineWorker | None = None
    avatars: dict[str, Avatar] = field(default_factory=dict)
    streams: dict[str, _Stream] = field(default_factory=dict)
    rings: dict[tuple[int, ...], ResultRing] = field(default_factory=dict)
    # slow commands (building the engine, loading an avatar) run on the process's main thread
    control: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    gc_pauses: GcPauses = field(default_factory=GcPauses)

    # -- commands --------------------------------------------------------------------------------------

    def handle_batch(self, messages: list[tuple]) -> None:
        """The messages that arrived together, in order (the channel's receiving thread). Runs of
        frames go to the feature thread as one submission (:meth:`_frames`): the server sends a
        burst whenever its sender fell behind (up to 64 at once), and queueing them one by one
        woke the feature thread after the first into a GIL fight with this thread for the rest
        (the ``handoff`` stage reached a p95 of 116 ms at 26 sessions on an H200)."""
        received = time.monotonic()
        frames: list[tuple] = []
        for message in messages:
            if message[0] == "frame":
                frames.append(message)
                continue
            if frames:
                self._frames(frames, received)
                frames = []
            self.handle(message)
        if frames:
            self._frames(frames, received)

    def handle(self, message: tuple) -> None:
        """One command (frames go through :meth:`handle_batch`); a bad one is logged and costs
        only itself."""
        try:
            self._handle(message)
        except Exception:  # noqa: BLE001 - the channel goes on with the next message
            log.exception("device process: handling %r failed", message[:1])

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "reset":
            self._reset(message[1])
        elif kind == "open":
            self._open(*message[1:])
        elif kind == "close":
            self._close(message[1])
        elif kind == "ring":
            name, shape, slots = message[1:]
            self.rings[tuple(shape)] = ResultRing.attach(name, tuple(shape), slots)
        elif kind in ("start", "load", "stop"):
            self.control.put(message)
        else:
            log.warning("device process: unknown command %r", kind)

    def serve(self) -> None:
        """The main thread: slow commands in order, until ``stop`` (or the server is gone); while
        idle, every second, the engine worker's stage times to the server (computed here, not on
        the engine thread)."""
        while True:
            try:
                message = self.control.get(timeout=STAGES_EVERY)
            except queue.Empty:
                if self.worker is not None:
                    self.channel.send(("stages", self.worker.stages.summary(), self.gc_pauses.describe(),
                                       self._ring_waits()))
                continue
            kind = message[0]
            if kind == "stop":
                return
            request = message[1]
            try:
                value = self._start(*message[2:]) if kind == "start" else self._load(*message[2:])
            except Exception as exc:  # noqa: BLE001 - the server gets it as the request's error
                log.exception("device %s: %s failed", self.spec.name, kind)
                self.channel.send(("reply", request, _portable(exc), None))
            else:
                self.channel.send(("reply", request, None, value))

    def _start(self, avatar_id: str, calibrate_capacity: bool) -> Any:
        from pipeline.engines import create_engine

        spec = self.spec
        device = spec.engine_options.get("device")
        if isinstance(device, str) and device.startswith("cuda"):
            import torch

            torch.cuda.set_device(device)  # this process's one GPU is also its current device
        self.engine = create_engine(spec.engine, **spec.engine_options)
        avatar = self._load(avatar_id)
        calibration = None
        if calibrate_capacity:
            calibration = calibrate(self.engine, avatar, spec.batch_size, spec.processing_seconds, spec.headroom)
        self.worker = EngineWorker(
            self.engine,
            spec.batch_size,
            spec.name,
            on_batch=lambda size, seconds: self.channel.send(("batch", size, seconds, self._queued())),
            on_fault=lambda reason: self.channel.send(("fault", reason)),
            skip_late=spec.skip_late,
            skip_keep=spec.skip_keep,
            gather_seconds=spec.gather_seconds,
            place=self._place,
        )
        self.features = FeatureWorker(
            spec.name, on_fault=self._feature_fault, on_pass=self.worker.stages.add_pass, burst=self.worker.burst
        )
        # The engine's modules, graphs and imports live as long as the process: out of the
        # collector's walks (torch and the MuseTalk stack leave ~330k objects, a 200 ms walk on a
        # 2-core box during which the engine, feature and finisher threads all stand still).
        self.gc_pauses.freeze_startup()
        return calibration, sys.getswitchinterval() * 1000

    def _load(self, avatar_id: str) -> Avatar:
        from pipeline.avatar.store import AvatarStore

        assert self.engine is not None
        avatar = self.avatars.get(avatar_id)
        if avatar is None:
            avatar = AvatarStore(self.spec.avatars_dir).load(avatar_id)
        try:
            self.engine.load_avatar(avatar)
        except Exception as exc:
            if is_device_fault(exc) and self.worker is not None:
                self.worker.fail(describe_fault(exc))  # tells the server: "fault"
                raise DeviceFailed(f"device {self.spec.name} failed: {describe_fault(exc)}") from exc
            raise
        self.avatars[avatar_id] = avatar
        return avatar

    def _ring_waits(self) -> dict[str, float]:
        """How often and how long (s) the result rings' writer waited for the server to read."""
        rings = list(self.rings.values())
        return {"waits": sum(r.waits for r in rings), "seconds": round(sum(r.wait_seconds for r in rings), 3)}

    def _queued(self) -> int:
        return self.worker.queued if self.worker is not None else 0

    def _feature_fault(self, exc: BaseException) -> None:
        if self.worker is not None:
            self.worker.fail(describe_fault(exc))

    def _open(self, key: str, avatar_id: str) -> None:
        assert self.engine is not None
        self.streams[key] = _Stream(self.engine.new_featurizer(), self.avatars[avatar_id])

    def _close(self, key: str) -> None:
        stream = self.streams.pop(key, None)
        if stream is None:
            return
        stream.closed = True
        if self.worker is not None:
            self.worker.cancel(key)
        if self.features is not None:
            self.features.cancel(key)

    def _reset(self, key: str) -> None:
        stream = self.streams.get(key)
        if stream is None or self.worker is None or self.features is None:
            return
        self.worker.cancel(key)
        self.features.reset(stream.featurizer, key)

    # -- one frame's chain -------------------------------------------------------------------------

    def _frames(self, messages: list[tuple], received: float) -> None:
        """Frames' audio to the feature thread in one submission; each frame's features then
        start its picture (:meth:`_featured`). A message is ``("frame", key, index, window,
        speech, avatar_index, deadline, compose, sent)``."""
        jobs: list[tuple[Any, list[AudioFrame], str]] = []
        chains: list[tuple[str, _Stream, int, int, float, bool]] = []
        pipe: list[float] = []
        for message in messages:
            try:
                _, key, index, window, speech, avatar_index, deadline, compose, sent = message
                stream = self.streams.get(key)
                if stream is None or self.features is None:
                    self.channel.send(("failed", key, index, RuntimeError("no such stream on this device")))
                    continue
                frame = AudioFrame(index, np.frombuffer(window, dtype=np.float32), speech)
            except Exception:  # noqa: BLE001 - a malformed message costs only itself
                log.exception("device process: bad frame message")
                continue
            jobs.append((stream.featurizer, [frame], key))
            chains.append((key, stream, index, avatar_index, deadline, compose))
            pipe.append(received - sent)
        if not jobs:
            return
        arrived = time.monotonic()
        if self.worker is not None:
            # handoff_pipe: the server's sending thread and the pipe; handoff: up to here
            self.worker.stages.add_each("handoff_pipe", pipe)
            self.worker.stages.add_each("handoff", [arrived - received + p for p in pipe])
        try:
            assert self.features is not None
            pending = self.features.submit_many(jobs)
        except RuntimeError as exc:  # closed while stopping
            for key, _, index, *_ in chains:
                self.channel.send(("failed", key, index, _portable(exc)))
            return
        for future, chain in zip(pending, chains, strict=True):
            future.add_done_callback(functools.partial(self._featured, *chain, arrived))

    def _featured(
        self,
        key: str,
        stream: _Stream,
        index: int,
        avatar_index: int,
        deadline: float,
        compose: bool,
        arrived: float,
        done: concurrent.futures.Future,
    ) -> None:
        """On the feature thread, in frame order: tell the server, start the picture."""
        if done.cancelled():
            self.channel.send(("failed", key, index, None))  # reset or closed: the server dropped it
            return
        if done.exception() is not None:
            self.channel.send(("failed", key, index, _portable(done.exception())))
            return
        features = done.result()[0]
        composing = features.active and compose and not stream.closed and self.worker is not None
        self.channel.send(("features", key, index, features.active, composing))
        if not composing:
            return
        assert self.worker is not None
        request = FrameRequest(stream.avatar, avatar_index, features.data)
        try:
            picture = self.worker.submit(request, deadline, key, arrived=arrived)
        except (DeviceFailed, RuntimeError) as exc:
            self.channel.send(("failed", key, index, _portable(exc)))
            return
        picture.add_done_callback(lambda made: self._composed(key, index, made))

    def _place(self, key: str, request: FrameRequest) -> ResultSlot | None:
        """On the finisher thread: the server's ring slot the frame is pasted into (None: no ring
        for its shape yet; :meth:`_composed` reports that)."""
        ring = self.rings.get(tuple(request.avatar.frames[request.frame_index].shape))
        return None if ring is None else ring.reserve()

    def _composed(self, key: str, index: int, made: concurrent.futures.Future) -> None:
        """On the finisher thread: the picture's ring slot to the server (a picture made
        elsewhere is copied into the ring first)."""
        if made.cancelled():
            self.channel.send(("failed", key, index, None))
            return
        if made.exception() is not None:
            self.channel.send(("failed", key, index, _portable(made.exception())))
            return
        image = made.result()
        if image is SKIPPED:  # it could not be on time (EngineWorker skip_late)
            self.channel.send(("skipped", key, index))
            return
        if isinstance(image, ResultSlot):  # pasted in place (EngineWorker(place))
            self.channel.send(("picture", key, index, image.ring.name, image.slot, image.number))
            return
        ring = self.rings.get(tuple(image.shape))
        if ring is None:
            self.channel.send(("failed", key, index, RuntimeError(f"no result ring for frames of shape {image.shape}")))
            return
        slot, number = ring.put(np.ascontiguousarray(image))
        self.channel.send(("picture", key, index, ring.name, slot, number))

    def close(self) -> None:
        for part in (self.worker, self.features):
            if part is not None:
                part.close()
        if self.engine is not None:
            try:
                self.engine.close()
            except Exception:  # noqa: BLE001 - a failed device may not even release cleanly
                log.exception("closing the engine of device %s", self.spec.name)
        for ring in self.rings.values():
            ring.close()


def _portable(exc: BaseException | None) -> BaseException | None:
    """``exc`` if it survives pickling, else a RuntimeError with its description."""
    if exc is None:
        return None
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any unpicklable exception
        return DeviceFailed(describe_fault(exc)) if is_device_fault(exc) else RuntimeError(describe_fault(exc))
    return exc


def run(conn: Connection, spec: DeviceSpec) -> None:
    """The process's entry point (multiprocessing spawn target)."""
    import faulthandler
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops us (Ctrl-C reaches the whole group)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the server asks when we stop answering
    faulthandler.enable(all_threads=True)  # a crash in native code leaves its stacks in the log
    logging.basicConfig(level=spec.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.setswitchinterval(spec.switch_interval_ms / 1000)
    use_serial_opencv()  # its paste threads resize faces side by side (pipeline/opencv_threads.py)
    channel = Channel(conn, f"device-{spec.name}")
    process = DeviceProcess(spec, channel)
    process.gc_pauses.install()
    channel.listen_batches_in_thread(process.handle_batch, on_closed=lambda: process.control.put(("stop",)))
    try:
        process.serve()
    finally:
        process.close()
        channel.close()

