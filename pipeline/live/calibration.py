"""Measuring how many talking sessions one device can carry.

Why measure: admission must refuse a session *before* it would make every session on the device
late, and the number that decides it depends on the engine, its options, the GPU (an H200 runs
~450 frames/s at batch 48, a CPU the lite engine at a few hundred at batch 1), the batch size and
whatever else the machine is doing. A configured number (``engine.capacity_sessions``) is used
when given; otherwise each device is timed once at start.

How: the engine composes batches of real active requests for the default avatar (features from
:meth:`Engine.calibration_features`, which produce the same work as speech) at a few batch sizes
up to ``batch_size``, each once untimed (warm-up: lazy rigs, allocator, graph replay) and then
timed until a small per-size budget is spent; the median time per size makes the table. A
session that talks all the time needs 25 frames/s, and with ``N`` such sessions a batch holds
about one frame of each, so

    capacity = the largest N with 25 * N <= headroom * throughput(min(N, batch_size))
               and batch_seconds(min(N, batch_size)) <= processing_seconds

(times between measured sizes are interpolated). ``headroom`` (0.9) keeps room for the feature
pass, blending and the loop sharing the machine. Capacity is in *talking-session equivalents*:
a session that is silent half the time counts half once measured (the device pool's demand).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.avatar.model import Avatar
from pipeline.engines.base import Engine, FrameRequest
from pipeline.errors import ConfigError

log = logging.getLogger("lipstream.calibration")

FPS = 25.0
HEADROOM = 0.9
#: Timed repetitions per batch size: at least MIN, more while under the per-size budget.
MIN_REPEATS, MAX_REPEATS = 1, 5
SIZE_BUDGET_SECONDS = 0.15


@dataclass(frozen=True)
class BatchTiming:
    batch_size: int
    seconds: float  # median time of one compose of this many frames

    @property
    def frames_per_second(self) -> float:
        return self.batch_size / self.seconds if self.seconds > 0 else float("inf")

    def describe(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "seconds": round(self.seconds, 6),
            "frames_per_second": round(self.frames_per_second, 1),
        }


@dataclass(frozen=True)
class Calibration:
    """The measured table and the capacity it gives (0: not even one talking session)."""

    timings: tuple[BatchTiming, ...]
    capacity: int
    headroom: float
    processing_seconds: float
    seconds: float  # how long the calibration took

    def describe(self) -> dict[str, Any]:
        return {
            "table": [t.describe() for t in self.timings],
            "headroom": self.headroom,
            "processing_seconds": self.processing_seconds,
            "measured_capacity": self.capacity,
            "seconds": round(self.seconds, 3),
        }


def calibration_sizes(batch_size: int) -> list[int]:
    """Powers of two below ``batch_size``, and ``batch_size`` itself: 1, 2, 4, 8, 16, 32, 48."""
    sizes = [1]
    while sizes[-1] * 2 < batch_size:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != batch_size:
        sizes.append(batch_size)
    return sizes


def measure(engine: Engine, avatar: Avatar, batch_size: int) -> list[BatchTiming]:
    """The table: median compose time at each of :func:`calibration_sizes`."""
    try:
        features = engine.calibration_features(batch_size)
    except NotImplementedError:
        raise ConfigError(
            f"engine {engine.name!r} cannot be calibrated; set engine.capacity_sessions"
        ) from None
    requests = [FrameRequest(avatar, avatar.cycle_index(i), features[i]) for i in range(batch_size)]
    table = []
    for size in calibration_sizes(batch_size):
        batch = requests[:size]
        engine.compose(batch)  # warm-up, untimed
        times: list[float] = []
        spent = 0.0
        while len(times) < MIN_REPEATS or (len(times) < MAX_REPEATS and spent < SIZE_BUDGET_SECONDS):
            started = time.perf_counter()
            engine.compose(batch)
            times.append(time.perf_counter() - started)
            spent += times[-1]
        table.append(BatchTiming(size, statistics.median(times)))
    return table


def batch_seconds(table: list[BatchTiming] | tuple[BatchTiming, ...], size: int) -> float:
    """Time of a batch of ``size``, interpolated linearly between measured sizes."""
    sizes = [t.batch_size for t in table]
    return float(np.interp(size, sizes, [t.seconds for t in table]))


def capacity_from(
    table: list[BatchTiming] | tuple[BatchTiming, ...],
    batch_size: int,
    processing_seconds: float,
    headroom: float = HEADROOM,
) -> int:
    """Talking sessions the table supports (module docstring); 0 when not even one."""
    if not table:
        return 0
    best_fps = max(t.frames_per_second for t in table)
    upper = min(100_000, int(headroom * best_fps / FPS) + 1)
    capacity = 0
    for n in range(1, upper + 1):
        size = min(n, batch_size)
        seconds = batch_seconds(table, size)
        throughput = size / seconds if seconds > 0 else float("inf")
        if FPS * n <= headroom * throughput and seconds <= processing_seconds:
            capacity = n
    return capacity


def calibrate(
    engine: Engine, avatar: Avatar, batch_size: int, processing_seconds: float, headroom: float = HEADROOM
) -> Calibration:
    started = time.perf_counter()
    table = measure(engine, avatar, batch_size)
    capacity = capacity_from(table, batch_size, processing_seconds, headroom)
    result = Calibration(tuple(table), capacity, headroom, processing_seconds, time.perf_counter() - started)
    log.info(
        "calibrated %s: %d talking sessions (%s) in %.2f s",
        engine.name,
        capacity,
        ", ".join(f"{t.batch_size}: {t.frames_per_second:.0f} fps" for t in table),
        result.seconds,
    )
    return result
