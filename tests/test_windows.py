"""Per-frame audio windows: counts, lookahead, chunking invariance, VAD flags."""

from __future__ import annotations

import numpy as np

from pipeline.audio.windows import (
    SAMPLES_PER_FRAME,
    WINDOW,
    WINDOW_AFTER,
    WINDOW_BEFORE,
    FrameWindower,
    frame_count,
)
from tests.speech import espeak


def test_frame_count_is_floor_of_duration_times_25() -> None:
    assert frame_count(16000) == 25
    assert frame_count(16000 * 2 + 639) == 50
    assert frame_count(639) == 0


def test_frames_wait_for_their_lookahead() -> None:
    windower = FrameWindower()
    # Frame 0 needs samples up to 120 ms: 1920 samples.
    assert windower.push(np.zeros(WINDOW_AFTER - 1, np.float32)) == []
    frames = windower.push(np.zeros(1, np.float32))
    assert [f.index for f in frames] == [0]
    rest = windower.finish()
    assert [f.index for f in rest] == [1, 2]  # 1920 samples = 3 frames in all


def test_window_contents_and_zero_padding() -> None:
    ramp = np.arange(16000, dtype=np.float32)
    windower = FrameWindower()
    frames = windower.push(ramp) + windower.finish()
    assert len(frames) == 25
    for frame in (frames[0], frames[10], frames[24]):
        start = frame.index * SAMPLES_PER_FRAME - WINDOW_BEFORE
        expected = np.array([ramp[s] if 0 <= s < len(ramp) else 0.0 for s in range(start, start + WINDOW)])
        np.testing.assert_array_equal(frame.window, expected)


def test_chunking_does_not_change_the_frames() -> None:
    rng = np.random.default_rng(1)
    audio = rng.standard_normal(16000 * 3).astype(np.float32) * 0.1
    whole = FrameWindower()
    one_shot = whole.push(audio) + whole.finish()
    chunked = FrameWindower()
    got = []
    pos = 0
    while pos < len(audio):
        n = int(rng.integers(1, 2000))
        got += chunked.push(audio[pos : pos + n])
        pos += n
    got += chunked.finish()
    assert [f.index for f in got] == [f.index for f in one_shot]
    for a, b in zip(got, one_shot, strict=True):
        np.testing.assert_array_equal(a.window, b.window)
        assert a.speech == b.speech


def test_vad_marks_speech_not_silence() -> None:
    speech, _ = espeak("one two three four five", sample_rate=16000)
    silence = np.zeros(16000, np.float32)
    audio = np.concatenate([silence, speech, silence])
    windower = FrameWindower()
    frames = windower.push(audio) + windower.finish()
    speech_frames = [f for f in frames if 30 <= f.index < 25 + len(speech) // SAMPLES_PER_FRAME - 5]
    quiet_frames = [f for f in frames if f.index < 20 or f.index > len(frames) - 20]
    assert np.mean([f.speech for f in speech_frames]) > 0.6
    assert not any(f.speech for f in quiet_frames)


def test_reset_drops_buffered_audio_and_keeps_numbering() -> None:
    windower = FrameWindower()
    windower.push(np.ones(5000, np.float32))
    before = windower.next_frame
    windower.reset()
    frames = windower.push(np.zeros(SAMPLES_PER_FRAME * 2 + WINDOW_AFTER, np.float32))
    assert frames[0].index == before
    assert not frames[0].window.any()  # nothing of the dropped audio leaks into the new frames
