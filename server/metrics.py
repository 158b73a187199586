"""Prometheus metrics for ``/metrics``, on a registry of our own (tests create many apps)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class Metrics:
    """Implements the pipeline's ``SessionObserver`` and the engine worker's batch observer."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions = Gauge("lipstream_sessions", "Live sessions", registry=r)
        self.frames = Counter("lipstream_frames", "Video frames produced", ["kind"], registry=r)
        self.late_frames = Counter("lipstream_late_frames", "Made frames sent more than a frame late (held frames count as skipped)", registry=r)
        self.dropped_frames = Counter("lipstream_dropped_frames", "Frames not delivered to a slow output", registry=r)
        self.shortened_seconds = Counter(
            "lipstream_input_shortened_seconds",
            "Pauses of delayed live inputs (microphones) left out to catch up with real time",
            registry=r,
        )
        self.fps = Gauge("lipstream_output_fps", "Mean delivered video fps over outputs", registry=r)
        self.loop_lag = Gauge(
            "lipstream_event_loop_lag_seconds",
            "How late the server's event loop ran what was due (p99 over the last ~10 s)",
            registry=r,
        )
        self.latency = Histogram(
            "lipstream_audio_to_frame_seconds",
            "From a frame's last input sample arriving to the frame's release",
            buckets=(0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0),
            registry=r,
        )
        self.batch_size = Histogram(
            "lipstream_engine_batch_size", "Frames per engine batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.batch_seconds = Histogram(
            "lipstream_engine_batch_seconds", "Engine batch time (generate + composite)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32), registry=r,
        )

        # RTMP outputs and recordings (server/outputs.py)
        self.outputs = Gauge("lipstream_outputs", "Outputs by kind and state", ["kind", "state"], registry=r)
        self.output_bytes = Counter("lipstream_output_bytes", "Bytes sent (RTMP) or written (recordings)", ["kind"], registry=r)
        self.output_frames = Counter("lipstream_output_frames", "Video frames muxed into outputs", ["kind"], registry=r)
        self.output_dropped_frames = Counter(
            "lipstream_output_dropped_frames", "Video frames an output skipped because it fell behind", ["kind"], registry=r
        )
        self.output_reconnects = Counter("lipstream_output_reconnects", "RTMP reconnection attempts", registry=r)
        self.output_errors = Counter("lipstream_output_errors", "Output connection or write failures", ["kind"], registry=r)
        self.encodes = Gauge("lipstream_output_encodes", "Running output encodes (shared by outputs of a session)", registry=r)
        self.encode_seconds = Histogram(
            "lipstream_output_encode_seconds", "Time to encode one frame with its audio for outputs",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16), registry=r,
        )

        # engine devices (pipeline/live/devices.py), read from the pool at every scrape
        self._devices = _DeviceCollector()
        r.register(self._devices)

    def set_device_source(self, source: Callable[[], list[dict[str, Any]]]) -> None:
        """Where per-device gauges come from: the device pool's ``describe``."""
        self._devices.source = source

    def on_output_state(self, kind: str, old: str | None, new: str | None) -> None:
        if old is not None:
            self.outputs.labels(kind, old).dec()
        if new is not None:
            self.outputs.labels(kind, new).inc()

    def set_fps_source(self, source: Callable[[], float]) -> None:
        self.fps.set_function(source)

    def set_loop_lag_source(self, source: Callable[[], float]) -> None:
        self.loop_lag.set_function(source)

    # SessionObserver
    def on_frame(self, active: bool) -> None:
        self.frames.labels("speech" if active else "idle").inc()

    def on_latency(self, seconds: float) -> None:
        self.latency.observe(seconds)

    def on_dropped(self) -> None:
        self.dropped_frames.inc()

    def on_shortened(self, seconds: float) -> None:
        self.shortened_seconds.inc(seconds)

    # engine worker
    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)


class _DeviceCollector(Collector):
    """Per-device gauges (label ``device``) from the pool's description at scrape time: one source
    of truth with ``GET /v1/devices``, nothing to keep in step."""

    GAUGES = (
        ("lipstream_device_ready", "1 while the device serves sessions, 0 once failed", lambda d: d["state"] == "ready"),
        ("lipstream_device_capacity_sessions", "Talking sessions the device can carry", lambda d: d["capacity"]),
        ("lipstream_device_burst_capacity_sessions", "Talking sessions at once the device serves in a burst", lambda d: d["burst_capacity"]),
        ("lipstream_device_sessions", "Sessions bound to the device", lambda d: d["sessions"]),
        ("lipstream_device_demand_sessions", "Demand in talking-session equivalents", lambda d: d["demand"]["talking_sessions"]),
        ("lipstream_device_demand_fps", "Demand in frames/s", lambda d: d["demand"]["frames_per_second"]),
        ("lipstream_device_burst_overload_percent", "Expected % of talking frames past the burst capacity when sessions talk at once", lambda d: d["demand"]["burst_overload_percent"]),
        ("lipstream_device_queued_frames", "Frame requests waiting for the device", lambda d: d["queued_frames"]),
        ("lipstream_device_utilisation", "Share of the last 10 s the device spent in batches", lambda d: d["utilisation"]),
    )
    COUNTERS = (
        ("lipstream_device_frames", "Frames the device composed", lambda d: d["frames"]),
        ("lipstream_device_skipped_frames", "Speech frames the device skipped: they could not be on time", lambda d: d["skipped_frames"]),
        ("lipstream_device_busy_seconds", "Seconds the device spent in batches", lambda d: d["busy_seconds"]),
    )

    def __init__(self) -> None:
        self.source: Callable[[], list[dict[str, Any]]] | None = None

    def collect(self) -> Iterator[Any]:
        devices = self.source() if self.source is not None else []
        for name, text, value in self.GAUGES:
            family = GaugeMetricFamily(name, text, labels=["device"])
            for d in devices:
                family.add_metric([d["name"]], float(value(d)))
            yield family
        for name, text, value in self.COUNTERS:
            family = CounterMetricFamily(name, text, labels=["device"])
            for d in devices:
                family.add_metric([d["name"]], float(value(d)))
            yield family
