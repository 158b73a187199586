"""The device pool: every engine device, the sessions bound to it, and where the next one goes.

One :class:`Device` per configured name (``cpu``, ``cpu:N``, ``cuda:N``) holds its own engine
instance, its batching :class:`~pipeline.live.worker.EngineWorker` and its
:class:`~pipeline.live.feature_worker.FeatureWorker`, its state (``ready`` or ``failed`` with the
reason), the avatars whose per-avatar state is loaded on it, and the sessions bound to it with
their demand. Why a pool rather than one engine per server: a session's frames must all be made
on one device (its avatar's latents live there, and batching across sessions only pays on one
device), so the choice is made once, when the session is created.

Capacity and demand are counted in *talking sessions*: a session that speaks in every frame needs
25 frames/s. A device's capacity is configured (``engine.capacity_sessions``) or measured at
start (:mod:`pipeline.live.calibration`). A session's demand is what the caller says it is, in
practice ``max(expected talk fraction, its measured recent talk fraction)``: a conversational
avatar that listens half the time costs half, but one that turns out to talk more is counted as
it behaves.

Admission (:meth:`DevicePool.admit`): candidates are the ready devices where current demand plus
the new session's fits the capacity, and where the sessions' talking overlaps rarely enough that
bursts past the device's burst capacity stay under ``max_burst_overload`` of the talking frames
(:mod:`pipeline.live.bursts`: half-talking sessions whose average fits still overlap). The burst
capacity (``engine.burst_capacity_sessions``, at least the capacity) is what the device makes
frames for while more sessions than usual talk for a few seconds: the capacity keeps a margin
for sustained load (16 all-talking sessions on an H200 keep it 73-77 % busy), which a burst may
spend. Among
them, those where the avatar is already resident win (no latents to load, no second copy in
device memory), then the least utilised (demand over capacity, so devices of different sizes
fill evenly). None: :class:`AtCapacity` (HTTP 503) with a
reason naming every device's load or failure. Running sessions are never degraded to make room.
The choice and the reservation happen in one call under a lock, so concurrent creations cannot
both take the last place.

Failure isolation: a device fault in a batch, a feature pass or an avatar load
(:mod:`pipeline.live.faults`) marks the device failed, takes it out of rotation and calls the
failure listeners (the server ends the sessions bound to it); the other devices carry on.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.avatar.model import Avatar
from pipeline.engines.base import Engine
from pipeline.errors import EngineUnavailable, LipstreamError
from pipeline.live.bursts import overload_share
from pipeline.live.calibration import FPS, HEADROOM, Calibration, calibrate
from pipeline.live.device_link import DeviceLink
from pipeline.live.faults import DeviceFailed, describe_fault, is_device_fault
from pipeline.live.feature_worker import FeatureWorker
from pipeline.live.worker import BatchObserver, EngineWorker

log = logging.getLogger("lipstream.devices")

FailureListener = Callable[[str, str], None]  # (device name, reason), from any thread

READY, FAILED, STARTING = "ready", "failed", "starting"


class AtCapacity(LipstreamError):
    """No device can take another session without slowing the ones it serves."""

    http_status = 503


@dataclass
class _Binding:
    avatar_id: str
    demand: Callable[[], float]  # talking-session equivalents, now


@dataclass
class Device:
    """One engine device and what is bound to it (see the module docstring)."""

    name: str
    engine_name: str
    # In the server process (threads) ...
    engine: Engine | None = None
    worker: EngineWorker | None = None
    feature_worker: FeatureWorker | None = None
    # ... or in a device process of its own (engine.device_workers: process)
    link: DeviceLink | None = None
    state: str = STARTING
    error: str | None = None
    capacity: int = 0  # talking sessions
    burst_capacity_configured: int = 0  # engine.burst_capacity_sessions (0: the capacity)
    capacity_source: str | None = None  # "configured" | "calibrated"
    calibration: Calibration | None = None
    capacity_note: str | None = None
    avatars: set[str] = field(default_factory=set)
    bindings: dict[Hashable, _Binding] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.state == READY

    def demands(self) -> list[float]:
        """Each bound session's (and each being created) talking-session equivalent, now."""
        return [binding.demand() for binding in self.bindings.values()]

    @property
    def burst_capacity(self) -> int:
        """Talking sessions at once that a burst may reach: never below the capacity."""
        return max(self.capacity, self.burst_capacity_configured)

    def burst_overload(self, demands: Sequence[float]) -> float:
        """Expected share of talking frames past the burst capacity (0..1) when sessions of
        these demands talk independently (:mod:`pipeline.live.bursts`)."""
        return overload_share(demands, self.burst_capacity) if self.burst_capacity > 0 else 0.0

    def describe(self) -> dict[str, Any]:
        demands = self.demands()
        demand = sum(demands)
        worker = self.worker or self.link
        stats = worker.stats if worker else None
        calibration = None
        if self.calibration is not None:
            calibration = self.calibration.describe()
            if self.capacity_note:
                calibration["note"] = self.capacity_note
        return {
            "name": self.name,
            "engine": self.engine_name,
            "state": self.state,
            "error": self.error,
            "capacity": self.capacity,
            "burst_capacity": self.burst_capacity,
            "capacity_source": self.capacity_source,
            "calibration": calibration,
            "sessions": len(self.bindings),
            "demand": {
                "talking_sessions": round(demand, 3),
                "frames_per_second": round(FPS * demand, 1),
                "burst_overload_percent": round(100 * self.burst_overload(demands), 2),
            },
            "avatars": sorted(self.avatars),
            "queued_frames": worker.queued if worker else 0,
            "batches": stats.batches if stats else 0,
            "frames": stats.frames if stats else 0,
            "skipped_frames": stats.skipped if stats else 0,
            "busy_seconds": round(stats.busy_seconds, 3) if stats else 0.0,
            "utilisation": round(stats.utilisation(), 3) if stats else 0.0,
            "stages_ms": self._stage_summary(),
            "process": self.link.describe_process() if self.link else None,
        }

    def _stage_summary(self) -> dict[str, Any]:
        """Where made frames spent their budget (pipeline/live/stage_times.py): the worker's own,
        or the last a device process sent."""
        if self.worker is not None:
            return self.worker.stages.summary()
        return self.link.stage_summary if self.link is not None else {}


class DevicePool:
    """Devices by name, in configured order; admission, binding and failure (module docstring)."""

    def __init__(
        self,
        names: Sequence[str],
        make_engine: Callable[[str], Engine],
        *,
        engine_name: str,
        batch_size: int,
        processing_seconds: float,
        capacity_sessions: int = 0,
        burst_capacity_sessions: int = 0,
        headroom: float = HEADROOM,
        on_batch: BatchObserver | None = None,
        make_link: Callable[[str], DeviceLink] | None = None,
        skip_late: bool = False,
        skip_keep: int = 0,
        gather_seconds: float = 0.0,
        max_burst_overload: float = 1.0,
    ) -> None:
        """``make_link``: run each device in a process of its own (``make_engine`` then unused).
        ``max_burst_overload``: the share of talking frames (0..1) a device may be expected to
        lack time for when its sessions happen to talk at once; 1 admits by the average alone.
        ``burst_capacity_sessions``: how many talking sessions a device serves in such a burst
        (0, or below a device's capacity: its capacity)."""
        if not names:
            raise ValueError("a device pool needs at least one device")
        self.devices: dict[str, Device] = {
            name: Device(name, engine_name, burst_capacity_configured=burst_capacity_sessions) for name in names
        }
        self._make_engine = make_engine
        self._make_link = make_link
        self.batch_size = batch_size
        self.processing_seconds = processing_seconds
        self.capacity_sessions = capacity_sessions
        self.headroom = headroom
        self.skip_late = skip_late  # EngineWorker(skip_late, skip_keep) (worker.py docstring)
        self.skip_keep = skip_keep
        self.gather_seconds = gather_seconds  # EngineWorker(gather_seconds)
        self.max_burst_overload = max_burst_overload
        self._on_batch = on_batch
        self._lock = threading.RLock()
        self._listeners: list[FailureListener] = []

    # -- start and stop ------------------------------------------------------------------------------

    def start(self, avatar: Avatar) -> None:
        """Blocking (run it off the loop): create every device's engine, load ``avatar`` on it,
        set its capacity (configured, or calibrated on ``avatar``), start its workers.

        A device that fails to start is marked failed and the others go on. In the server
        process, engines are created one after another (torch.compile is not safe to run from
        several threads at once); device processes build theirs at the same time. Calibrations
        run together either way, so that CPU workers sharing cores are measured sharing them.
        Raises when no device started: the original error when there is one device."""
        errors = self._start_processes(avatar) if self._make_link is not None else self._start_threads(avatar)
        if not any(d.ready for d in self.devices.values()):
            if len(self.devices) == 1 and errors:
                raise errors[0]
            raise EngineUnavailable(f"no device started: {self._failures()}")

    def _start_processes(self, avatar: Avatar) -> list[BaseException]:
        """Every device process at once (each builds, loads and calibrates on its own)."""
        assert self._make_link is not None
        calibrating = self.capacity_sessions <= 0

        def start(device: Device) -> Calibration | None:
            assert self._make_link is not None
            link = device.link = self._make_link(device.name)
            link.on_batch = self._on_batch
            link.on_fault = lambda reason, name=device.name: self.fail(name, reason)
            return link.start(avatar.id, calibrating)

        errors: list[BaseException] = []
        devices = list(self.devices.values())
        with concurrent.futures.ThreadPoolExecutor(len(devices), thread_name_prefix="device-start") as pool:
            started = [pool.submit(start, device) for device in devices]
        for device, outcome in zip(devices, started, strict=True):
            try:
                calibration = outcome.result()
            except Exception as exc:  # noqa: BLE001 - isolated: reported on the device and below
                errors.append(exc)
                self._start_failed(device, exc)
                if device.link is not None:
                    device.link.close()
                continue
            if device.state == FAILED:  # a fault reported while it started
                continue
            device.avatars.add(avatar.id)
            if calibration is None:
                device.capacity, device.capacity_source = self.capacity_sessions, "configured"
            else:
                self._set_calibration(device, calibration)
            device.state = READY
        return errors

    def _start_threads(self, avatar: Avatar) -> list[BaseException]:
        errors: list[BaseException] = []
        for device in self.devices.values():
            try:
                device.engine = self._make_engine(device.name)
                device.engine.load_avatar(avatar)
                device.avatars.add(avatar.id)
            except Exception as exc:  # noqa: BLE001 - isolated: reported on the device and below
                errors.append(exc)
                self._start_failed(device, exc)
        started = [d for d in self.devices.values() if d.engine is not None and d.state != FAILED]
        if started and self.capacity_sessions > 0:
            for device in started:
                device.capacity, device.capacity_source = self.capacity_sessions, "configured"
        elif started:
            with concurrent.futures.ThreadPoolExecutor(len(started), thread_name_prefix="calibrate") as pool:
                outcomes = list(pool.map(lambda d: self._calibrate(d, avatar), started))
            errors += [exc for exc in outcomes if exc is not None]
        for device in self.devices.values():
            if device.engine is None or device.state == FAILED:
                continue
            name = device.name
            device.worker = EngineWorker(
                device.engine,
                self.batch_size,
                name,
                on_batch=self._on_batch,
                on_fault=lambda reason, name=name: self.fail(name, reason),
                skip_late=self.skip_late,
                skip_keep=self.skip_keep,
                gather_seconds=self.gather_seconds,
            )
            device.feature_worker = FeatureWorker(
                name,
                on_fault=lambda exc, name=name: self.fail(name, describe_fault(exc)),
                on_pass=device.worker.stages.add_pass,
            )
            device.state = READY
        return errors

    def _calibrate(self, device: Device, avatar: Avatar) -> BaseException | None:
        assert device.engine is not None
        try:
            result = calibrate(device.engine, avatar, self.batch_size, self.processing_seconds, self.headroom)
        except Exception as exc:  # noqa: BLE001 - isolated like a failed start
            self._start_failed(device, exc)
            return exc
        self._set_calibration(device, result)
        return None

    def _set_calibration(self, device: Device, result: Calibration) -> None:
        device.calibration, device.capacity_source = result, "calibrated"
        device.capacity = max(1, result.capacity)
        if result.capacity == 0:
            # Refusing everything would make the server useless; one session can only slow itself.
            device.capacity_note = "slower than real time for one talking session; admitting one"
            log.warning("device %s: %s", device.name, device.capacity_note)

    def _start_failed(self, device: Device, exc: BaseException) -> None:
        device.state, device.error = FAILED, describe_fault(exc)
        log.error("device %s failed to start: %s", device.name, device.error, exc_info=exc)

    def close(self) -> None:
        for device in self.devices.values():
            if device.link is not None:
                device.link.close()
            for part in (device.worker, device.feature_worker):
                if part is not None:
                    part.close()
            if device.engine is not None:
                try:
                    device.engine.close()
                except Exception:  # a failed device may not even release cleanly
                    log.exception("closing the engine of device %s", device.name)

    # -- state -----------------------------------------------------------------------------------------

    def add_failure_listener(self, listener: FailureListener) -> None:
        self._listeners.append(listener)

    def fail(self, name: str, reason: str) -> None:
        """Take device ``name`` out of rotation (idempotent); its worker fails its queued frames
        and the failure listeners hear about it, from the calling thread."""
        device = self.devices[name]
        with self._lock:
            if device.state == FAILED:
                return
            device.state, device.error = FAILED, reason
        log.error("device %s out of rotation: %s", name, reason)
        if device.worker is not None:
            device.worker.fail(reason)  # its on_fault comes back here and returns at once
        if device.link is not None:
            device.link.fail(reason)  # frames in flight there fail with DeviceFailed
        for listener in list(self._listeners):
            try:
                listener(name, reason)
            except Exception:
                log.exception("device failure listener")

    def unavailable_reason(self) -> str | None:
        """Why no session can be served at all, or None while some device is ready."""
        if any(d.ready for d in self.devices.values()):
            return None
        return f"no device available: {self._failures()}"

    def _failures(self) -> str:
        return "; ".join(f"{d.name} {d.state}: {d.error}" if d.error else f"{d.name} {d.state}" for d in self.devices.values())

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [device.describe() for device in self.devices.values()]

    # -- admission and binding ------------------------------------------------------------------------

    def admit(self, owner: Hashable, avatar_id: str, demand: float) -> Device:
        """Choose a device for a new session needing ``demand`` talking sessions and reserve it
        (module docstring); raises :class:`AtCapacity` naming every device's load or failure."""
        with self._lock:
            order = {name: i for i, name in enumerate(self.devices)}
            demands = {d.name: d.demands() for d in self.devices.values() if d.ready}
            loads = {name: sum(values) for name, values in demands.items()}
            # the devices where the average fits with the new session, and their burst overload with it
            bursts = {
                d.name: d.burst_overload([*demands[d.name], demand])
                for d in self.devices.values()
                if d.ready and loads[d.name] + demand <= d.capacity + 1e-9
            }
            candidates = [
                d for d in self.devices.values() if d.name in bursts and self._bursts_fit(bursts[d.name])
            ]
            if not candidates:
                raise AtCapacity(self._refusal(loads, bursts, demand))
            resident = [d for d in candidates if avatar_id in d.avatars]
            device = min(
                resident or candidates,
                key=lambda d: (loads[d.name] / d.capacity, loads[d.name], order[d.name]),
            )
            device.bindings[owner] = _Binding(avatar_id, lambda: demand)
            return device

    def _bursts_fit(self, overload: float) -> bool:
        return self.max_burst_overload >= 1.0 or overload <= self.max_burst_overload + 1e-12

    @staticmethod
    def _burst_label(device: Device) -> str:
        return f"({device.burst_capacity} in a burst) " if device.burst_capacity != device.capacity else ""

    def _refusal(self, loads: dict[str, float], bursts: dict[str, float], demand: float) -> str:
        if not loads:
            return f"no device available: {self._failures()}"
        parts = []
        for d in self.devices.values():
            if d.name in bursts:  # the average fits, bursts do not
                parts.append(
                    f"{d.name} {loads[d.name]:.1f}/{d.capacity} talking sessions, with it "
                    f"{100 * bursts[d.name]:.1f} % of talking frames past capacity "
                    f"{self._burst_label(d)}when sessions talk at once "
                    f"(limit {100 * self.max_burst_overload:g} %)"
                )
            elif d.ready:
                parts.append(f"{d.name} {loads[d.name]:.1f}/{d.capacity} talking sessions")
            else:
                parts.append(f"{d.name} {d.state}" + (f": {d.error}" if d.error else ""))
        return f"at capacity: devices {', '.join(parts)}; a new session needs {demand:g}"

    def track(self, owner: Hashable, demand: Callable[[], float]) -> None:
        """From now on count ``owner``'s demand with ``demand()`` (its live measurement)."""
        with self._lock:
            for device in self.devices.values():
                if owner in device.bindings:
                    device.bindings[owner].demand = demand

    def release(self, owner: Hashable) -> None:
        with self._lock:
            for device in self.devices.values():
                device.bindings.pop(owner, None)

    def device_of(self, owner: Hashable) -> Device | None:
        with self._lock:
            return next((d for d in self.devices.values() if owner in d.bindings), None)

    def load_avatar(self, device: Device, avatar: Avatar) -> None:
        """Blocking: the avatar's per-avatar state on ``device`` (idempotent; the engine caches).
        A device fault here fails the device like one in a batch."""
        if not device.ready or (device.engine is None and device.link is None):
            raise DeviceFailed(f"device {device.name} failed: {device.error}")
        if device.link is not None:  # a device fault there is reported by the process itself
            device.link.load_avatar(avatar.id)
            with self._lock:
                device.avatars.add(avatar.id)
            return
        assert device.engine is not None
        try:
            device.engine.load_avatar(avatar)
        except Exception as exc:
            if is_device_fault(exc):
                self.fail(device.name, describe_fault(exc))
                raise DeviceFailed(f"device {device.name} failed: {describe_fault(exc)}") from exc
            raise
        with self._lock:
            device.avatars.add(avatar.id)
