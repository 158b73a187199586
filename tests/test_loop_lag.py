"""The event-loop lag sampler and the GC pause timer: what stalls a loop shows in their figures."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

from pipeline.live.gc_pauses import GcPauses
from server.loop_lag import LoopLag


def test_a_blocked_loop_shows_in_the_lag() -> None:
    async def scenario() -> dict:
        lag = LoopLag(period=0.01)
        lag.start()
        await asyncio.sleep(0.15)
        quiet = lag.describe()
        time.sleep(0.2)  # a blocking call on the loop: whatever was due waits for it
        await asyncio.sleep(0.05)
        await lag.stop()
        return {"quiet": quiet, "after": lag.describe()}

    seen = asyncio.run(scenario())
    assert seen["quiet"]["samples"] >= 5 and seen["quiet"]["max_ms"] < 100, seen
    assert seen["after"]["max_ms"] >= 150, seen
    assert seen["after"]["p50_ms"] < 100, seen  # one stall, not a slow loop


def test_no_samples_no_figures() -> None:
    lag = LoopLag()
    assert lag.describe() == {"samples": 0, "period_ms": 25.0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    lag.add(0.004)
    lag.add(-1.0)  # an early wake-up counts as on time
    assert lag.describe()["max_ms"] == 4.0 and lag.quantile(0.0) == 0.0


@pytest.mark.parametrize("args", [{"period": 0}, {"keep": 0}])
def test_bad_settings_are_refused(args: dict) -> None:
    with pytest.raises(ValueError):
        LoopLag(**args)


def test_gc_pauses_are_timed_per_generation() -> None:
    pauses = GcPauses()
    pauses.install()
    try:
        garbage = [[i] for i in range(200_000)]  # something for a full collection to walk
        before = pauses.describe()["collections"][2]
        gc.collect()
        seen = pauses.describe()
    finally:
        pauses.uninstall()
        del garbage
    assert seen["collections"][2] == before + 1
    assert seen["recent"] >= 1 and seen["gen2_pause_max_ms"] > 0.0
    assert seen["pause_max_ms"] >= seen["gen2_pause_max_ms"]
    gc.collect()  # uninstalled: no longer counted
    assert pauses.describe()["collections"][2] == before + 1


def test_describing_gc_pauses_does_not_walk_the_frozen_objects(monkeypatch) -> None:
    """``gc.get_freeze_count()`` walks every frozen object (~1M in a device process, ~170 ms with
    the GIL held on an H200 host); the once-a-second report must use the count taken at freezing."""
    pauses = GcPauses()
    try:
        pauses.install()
        pauses.freeze_startup()
        assert pauses.frozen_objects > 0
        assert pauses.describe()["recent"] == 0  # start-up's own collection is not a pause
        monkeypatch.setattr(gc, "get_freeze_count", lambda: pytest.fail("describe() walked the frozen list"))
        assert pauses.describe()["frozen_objects"] == pauses.frozen_objects
    finally:
        pauses.uninstall()
        gc.unfreeze()
