"""How often sessions that each talk part of the time ask a device for more than it can make.

Admission by average demand alone (the sum of the sessions' talk fractions within a device's
capacity) lets a device fill with conversational sessions whose *average* fits, but whose
talking overlaps: 29 sessions that each talk half the time are 14.5 talking sessions on
average, yet 18 or more talk at once 13 % of the time. A device that can make 16 sessions'
frames then skips the rest (the mouth holds), and every session admitted after the average
filled pays for it. On an H200 the load test's skipped frames followed this: per talking
frame, exactly what the talk plans replayed predict for a device of the GPU's measured
throughput, 1000 / (25 x GPU ms per frame) sessions (docs/benchmarks.md, 2026-12-04, "Load
test on the H200: findings").

The model: each session ``i`` talks in a frame with probability ``p_i`` (its demand, clipped to
[0, 1]), independently of the others, so the number of talking sessions ``L`` is
Poisson-binomial. A device that serves ``C`` talking sessions at once in a burst (its burst
capacity, ``engine.burst_capacity_sessions``: at least its capacity) lacks GPU time for
``max(0, L - C)`` of them in that frame; :func:`overload_share` is the expected share of talking
frames that get none, ``E[max(0, L - C)] / E[L]``. Sessions that talk all the time (``p = 1``)
make ``L`` certain, and the rule is the plain one: no overload while they fit.

It is optimistic in one way: callers are not independent when a show's audience reacts at once.
The burst capacity is the knob for the other: counted against the capacity (16 all-talking
sessions on an H200) the model is conservative, because the capacity keeps a margin below the
GPU's throughput (~19 sessions' frames at 2.0-2.1 ms each) that a burst of a few seconds may
spend; counted against 18 it matched the load test (configs/gpu.yaml). Computed exactly, O(n^2) for n sessions: a few hundred microseconds at 64.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def talking_distribution(demands: Iterable[float]) -> np.ndarray:
    """``P(L = k)`` for k = 0..n: how many of the sessions talk in one frame (Poisson-binomial)."""
    dist = np.ones(1)
    for demand in demands:
        p = min(1.0, max(0.0, float(demand)))
        grown = np.zeros(len(dist) + 1)
        grown[:-1] += dist * (1.0 - p)
        grown[1:] += dist * p
        dist = grown
    return dist


def overload_share(demands: Iterable[float], capacity: float) -> float:
    """Expected share of talking frames beyond ``capacity`` simultaneous talkers (0..1)."""
    dist = talking_distribution(demands)
    talking = np.arange(len(dist))
    mean = float((dist * talking).sum())
    if mean <= 0.0:
        return 0.0
    return float((dist * np.maximum(0.0, talking - capacity)).sum()) / mean
