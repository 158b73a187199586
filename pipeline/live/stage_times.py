"""Where a device's frames spend their processing budget: per-frame stage durations, rolling.

Why: on an H200 the same build held 16 all-talking sessions with no late frame in one load test
and lost 21 % of its frames in the next, at the same 82-85 % GPU (docs/benchmarks.md, "Load test
on the H200: findings"). A session's total audio-to-frame latency cannot say which part of the
budget ran out: the Whisper features, the wait for a batch, the batch itself or the pasting and
hand-over after it. Each device's :class:`~pipeline.live.worker.EngineWorker` records every made
frame's stages here, and ``GET /v1/devices`` shows their percentiles (``stages_ms``):

- ``handoff``: from the server sending a frame's audio to a device process to its arrival there
  (the pipe and both ends' threads: where a busy server process shows; absent for devices in
  the server process);
- ``handoff_pipe``: the part of ``handoff`` until the message batch holding the frame was
  received (the server's sending thread and the pipe; the rest is the device process's own
  receiving thread getting to the frame);
- ``features``: from the frame's audio reaching the device to its features (where known);
- ``feature_pass``: the feature pass that served the frame, alone (the rest of ``features`` is
  the wait for the pass before it and for its own turn); counted for frames with speech, as
  ``features``;
- ``queue``: from its features to the start of the batch it ran in;
- ``batch``: that batch's device part (UNet + VAE + blend, with any feature passes that ran on
  the same GPU meanwhile);
- ``batch_host``: the part of ``batch`` its thread was not asleep waiting for the GPU: inputs,
  launches, GIL waits (only engines that report ``last_batch_asleep``: MuseTalk on cuda). On an
  H200 at 16 sessions a batch took ~0.6 ms per frame more than its GPU work, unexplained;
- ``gpu_batch`` / ``gpu_idle``: the batch on the GPU's own clock (CUDA events on the engine's
  stream, from its first kernel to its end), and how long that stream sat idle between the
  previous batch's end and this one's start (waiting for frames, batch gathering, the host side
  between batches; only engines that report ``last_batch_gpu`` / ``last_batch_idle``: MuseTalk
  on cuda). Their sum over the batches against the wall time says what share of the GPU the
  batches leave unused, and where;
- ``finish``: from the end of that part to the frame's delivery (pasting, and waiting for the
  previous batch's pasting: batches are delivered in order);
- ``slack``: the frame's deadline minus its delivery (negative: late). Its low percentiles are
  the ones to read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np

STAGES = (
    "handoff", "handoff_pipe", "features", "feature_pass", "queue", "batch", "batch_host", "gpu_batch", "gpu_idle",
    "finish", "slack",
)
#: Stages only some engines report (absent from ``summary`` otherwise).
ENGINE_STAGES = ("batch_host", "gpu_batch", "gpu_idle")
#: Frames kept per stage: about 25 s of 16 talking sessions.
KEEP_FRAMES = 10_000
#: Seconds of recent frames a summary covers: what the device does now, not a minute ago (a load
#: test's scenario reads them at its end; counted in frames only, 10,000 frames at 16 sessions
#: still held the end of the scenario before).
WINDOW_SECONDS = 15.0


class _Ring:
    """The last ``size`` values, and when each was added, in preallocated arrays: adding a
    batch's values and reading them back stay numpy work (the summary runs once a second in a
    device process beside its engine thread: 0.7 ms here against 1.3 ms from deques of Python
    floats)."""

    def __init__(self, size: int) -> None:
        self.values = np.zeros(size, dtype=np.float64)
        self.stamps = np.zeros(size, dtype=np.float64)
        self.count = 0  # values ever added

    def extend(self, values: np.ndarray, now: float) -> None:
        size = self.values.size
        values = values[-size:]
        at = self.count % size
        first = min(values.size, size - at)
        self.values[at : at + first] = values[:first]
        self.values[: values.size - first] = values[first:]
        self.stamps[at : at + first] = now
        self.stamps[: values.size - first] = now
        self.count += values.size

    def kept(self, since: float | None) -> np.ndarray:
        n = min(self.count, self.values.size)
        if since is None:
            return self.values[:n].copy()
        return self.values[:n][self.stamps[:n] >= since]


class StageTimes:
    """The last ``keep`` frames' seconds per stage; thread-safe (the engine and finisher threads
    add, any thread reads)."""

    def __init__(self, keep: int = KEEP_FRAMES, window_seconds: float | None = WINDOW_SECONDS) -> None:
        self._rings = {stage: _Ring(keep) for stage in STAGES}
        self._lock = threading.Lock()
        self.window_seconds = window_seconds

    def add(self, stage: str, seconds: float, frames: int = 1) -> None:
        """``frames`` frames spent ``seconds`` in ``stage`` (a batch's stages count once per frame)."""
        self.add_each(stage, np.full(frames, seconds))

    def add_pass(self, frames: int, seconds: float) -> None:
        """A feature pass of ``seconds`` served ``frames`` frames (a FeatureWorker's ``on_pass``)."""
        self.add("feature_pass", seconds, frames)

    def add_each(self, stage: str, seconds: Sequence[float] | np.ndarray) -> None:
        """One value per frame (e.g. every frame of a batch its own wait)."""
        values = np.asarray(seconds, dtype=np.float64)
        now = time.monotonic()
        with self._lock:
            self._rings[stage].extend(values, now)

    def summary(self) -> dict[str, dict[str, float] | int]:
        """Per stage, milliseconds at the 5th, 50th and 95th percentile of the kept frames
        recorded in the last ``window_seconds``, and how many frames that is (``frames``: of the
        slack, i.e. delivered frames)."""
        since = None if self.window_seconds is None else time.monotonic() - self.window_seconds
        with self._lock:
            arrays = {stage: ring.kept(since) for stage, ring in self._rings.items()}
        out: dict[str, dict[str, float] | int] = {"frames": int(arrays["slack"].size)}
        for stage, values in arrays.items():
            if values.size:
                p5, p50, p95 = np.percentile(values, (5, 50, 95)) * 1000
                out[stage] = {"p5": round(float(p5), 1), "p50": round(float(p50), 1), "p95": round(float(p95), 1)}
        return out
