"""The garbage collector's runs in this process, timed: the pauses no profile of CPU shows.

A collection holds the GIL for its whole run, so every thread of the process stands still: in
the server process its event loop (every session's clock and frames), in a device process its
engine, feature and finisher threads. A full collection walks every tracked object; what
start-up built (the server's imports, a device's torch stack) is most of them, which is why
both processes freeze it once ready (``gc.freeze()``). ``GET /v1/server`` and ``GET /v1/devices``
report these figures, so a load test can tell a collection from a slow frame.
"""

from __future__ import annotations

import collections
import gc
import time
from typing import Any


def freeze_startup() -> int:
    """Collect, then move every object left (what start-up built: it lives as long as the
    process) out of the collector's walks; returns how many were frozen. Counted here, once:
    ``gc.get_freeze_count()`` walks the whole frozen list, which in a device process (~1M
    objects with torch) held the GIL ~170 ms on an H200 host; called every second, it stalled
    the engine, feature and receiving threads for a sixth of the time."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GcPauses:
    """Times the garbage collector's runs in this process (``gc.callbacks``), per generation."""

    def __init__(self, keep: int = 200) -> None:
        self.counts = [0, 0, 0]
        self._pauses: collections.deque[tuple[int, float]] = collections.deque(maxlen=keep)
        self._started: float | None = None
        self._installed = False
        self.frozen_objects = 0  # freeze_startup()'s count, once it ran

    def freeze_startup(self) -> None:
        """:func:`freeze_startup`, its count kept for :meth:`describe`; the collection it runs is
        start-up's, not a pause sessions see (1.6 s in a device process on an H200 host), so it
        is left out of the recent pauses."""
        self.frozen_objects = freeze_startup()
        self._pauses.clear()

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
            "frozen_objects": self.frozen_objects,  # start-up's, never walked (counted once: O(n))
        }
