"""How late the server's event loop runs what is due: the number that says the loop is the limit.

Every session clock, frame release and WebSocket of the process shares one asyncio loop. When
anything on it runs long (a blocking call, a garbage-collection pause, too much work per frame),
everything due meanwhile runs late, for every session at once, while the process's CPU can
still look moderate. The sampler sleeps ``period`` seconds over and over and keeps how much
later than asked each sleep ended: its percentiles and maximum over the last ``keep`` samples go
to ``GET /server`` and to the ``lipstream_event_loop_lag_seconds`` gauge. A loop that stalls
for 100 ms or more at moderate CPU is a blocking call or a garbage collection (which
:class:`~pipeline.live.gc_pauses.GcPauses` times).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

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
            self.add(loop.time() - due)

    def add(self, seconds: float) -> None:
        """One observed delay (an early wake-up counts as on time)."""
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
