"""How late the server's event loop runs what is due, and the garbage collector's pauses.

Every session clock, frame release and WebSocket of the process shares one asyncio loop. When
anything on it runs long (a blocking call, a garbage-collection pause, too much work per frame),
everything due meanwhile runs late, for every session at once, while the process's CPU can
still look moderate. The sampler sleeps ``period`` seconds over and over and keeps how much
later than asked each sleep ended: its percentiles and maximum over the last ``keep`` samples go
to ``GET /server`` and to the ``lipstream_event_loop_lag_seconds`` gauge. A garbage collection
stops every thread of the process for its whole run, so :class:`GcPauses` times them: a loop
that stalls for 100 ms or more at moderate CPU is either that or a blocking call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import time
from typing import Any

import numpy as np


class LoopLag:
    """Samples the running loop's scheduling delay."""

    def __init__(self, period: float = 0.025, keep: int = 400) -> None:
        if period <= 0 or keep < 1:
            raise ValueError("period must be > 0 and keep >= 1")
        self.period = period
        self._lags: collections.deque[float] = collections.deque(maxlen=keep)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.period
            await asyncio.sleep(self.period)
            self._lags.append(max(0.0, loop.time() - due))

    def add(self, seconds: float) -> None:
        """One observed delay (the sampler's own; tests feed it directly)."""
        self._lags.append(max(0.0, seconds))

    def quantile(self, q: float) -> float | None:
        return float(np.quantile(np.asarray(self._lags), q)) if self._lags else None

    def describe(self) -> dict[str, float | int | None]:
        """Milliseconds late over the recent samples (about ``keep * period`` seconds)."""

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000, 2)

        return {
            "samples": len(self._lags),
            "period_ms": round(self.period * 1000, 1),
            "p50_ms": ms(self.quantile(0.5)),
            "p99_ms": ms(self.quantile(0.99)),
            "max_ms": ms(max(self._lags) if self._lags else None),
        }


class GcPauses:
    """Times the garbage collector's runs in this process (``gc.callbacks``), per generation."""

    def __init__(self, keep: int = 200) -> None:
        self.counts = [0, 0, 0]
        self._pauses: collections.deque[tuple[int, float]] = collections.deque(maxlen=keep)
        self._started: float | None = None
        self._installed = False

    def install(self) -> None:
        if not self._installed:
            gc.callbacks.append(self._callback)
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._callback)
            self._installed = False

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            generation = int(info.get("generation", 0))
            self.counts[min(generation, 2)] += 1
            self._pauses.append((generation, time.perf_counter() - self._started))
            self._started = None

    def describe(self) -> dict[str, Any]:
        """Collections per generation since start; the longest of the recent ones (ms)."""
        recent = list(self._pauses)
        return {
            "collections": list(self.counts),
            "recent": len(recent),
            "pause_max_ms": round(max((p for _, p in recent), default=0.0) * 1000, 2),
            "gen2_pause_max_ms": round(max((p for g, p in recent if g == 2), default=0.0) * 1000, 2),
            "frozen_objects": gc.get_freeze_count(),  # start-up's, never walked (server/app.py)
        }
