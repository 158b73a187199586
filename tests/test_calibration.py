"""Device calibration: the capacity rule on made-up tables, and a real (short) run of the lite engine."""

from __future__ import annotations

import time

from pipeline.live.calibration import BatchTiming, calibrate, calibration_sizes, capacity_from


def table(per_frame: float, fixed: float, sizes: list[int]) -> list[BatchTiming]:
    return [BatchTiming(n, fixed + per_frame * n) for n in sizes]


def test_sizes_reach_the_batch_size() -> None:
    assert calibration_sizes(1) == [1]
    assert calibration_sizes(16) == [1, 2, 4, 8, 16]
    assert calibration_sizes(48) == [1, 2, 4, 8, 16, 32, 48]


def test_capacity_is_throughput_bound() -> None:
    # 2 ms per frame, no fixed cost: 500 frames/s at every size; 0.9 * 500 / 25 = 18 sessions
    flat = table(0.002, 0.0, calibration_sizes(16))
    assert capacity_from(flat, 16, processing_seconds=1.0) == 18
    assert capacity_from(flat, 16, processing_seconds=1.0, headroom=1.0) == 20


#: The H200 sweep of docs/benchmarks.md (MuseTalk, compiled + CUDA graphs): batch -> seconds.
H200 = [BatchTiming(1, 0.0081), BatchTiming(4, 0.01205), BatchTiming(8, 0.02047), BatchTiming(16, 0.03812),
        BatchTiming(32, 0.07189), BatchTiming(48, 0.107)]


def test_capacity_of_the_measured_h200() -> None:
    # 15 sessions: a batch of 15 (~36 ms) runs 418 frames/s, 0.9 of it carries 375 = 25 * 15
    assert capacity_from(H200, 48, processing_seconds=0.25) == 15
    # 0.8 leaves the Whisper pass its share of the GPU: 13, what the end-to-end test sustained
    assert capacity_from(H200, 48, processing_seconds=0.25, headroom=0.8) == 13


def test_capacity_needs_the_batch_within_the_processing_budget() -> None:
    # batches of at most 8 fit a 21 ms budget: 8 sessions (25 * 8 = 200 <= 0.9 * 391)
    assert capacity_from(H200, 48, processing_seconds=0.021) == 8
    assert capacity_from(H200, 48, processing_seconds=0.005) == 0


def test_a_device_too_slow_for_one_session_has_capacity_zero() -> None:
    slow = table(0.05, 0.0, [1, 2, 4])  # 20 frames/s
    assert capacity_from(slow, 4, processing_seconds=1.0) == 0


def test_lite_engine_calibrates_quickly(demo_avatar) -> None:
    from pipeline.engines.lite import LiteEngine

    engine = LiteEngine()
    engine.load_avatar(demo_avatar)
    started = time.perf_counter()
    result = calibrate(engine, demo_avatar, batch_size=16, processing_seconds=0.06)
    assert time.perf_counter() - started < 5  # well under 2 s unloaded; generous for a busy CI box
    assert [t.batch_size for t in result.timings] == [1, 2, 4, 8, 16]
    assert all(t.seconds > 0 for t in result.timings)
    assert result.capacity == capacity_from(result.timings, 16, 0.06)
    described = result.describe()
    assert described["table"][0].keys() == {"batch_size", "seconds", "frames_per_second"}
    assert described["headroom"] == 0.9
