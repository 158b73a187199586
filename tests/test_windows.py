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


def test_silence_padding_makes_the_frames_pushed_zeros_make() -> None:
    """A live session pads missing input with silence; push_silence skips the VAD on blocks
    that are all zero, and must still give the same windows and speech flags as pushing
    zeros, also where padding starts or ends inside a 10 ms block that holds speech."""
    speech, _ = espeak("one two three", sample_rate=16000)
    rng = np.random.default_rng(4)
    zeros, padded = FrameWindower(), FrameWindower()
    got_zeros = zeros.push(np.zeros(16000, np.float32))  # a second of nothing first
    got_padded = padded.push_silence(16000)
    pos = 0
    while pos < len(speech):
        n = int(rng.integers(1, 1500))
        got_zeros += zeros.push(speech[pos : pos + n])
        got_padded += padded.push(speech[pos : pos + n])
        pos += n
        gap = int(rng.integers(0, 900))
        got_zeros += zeros.push(np.zeros(gap, np.float32))
        got_padded += padded.push_silence(gap)
    got_zeros += zeros.finish()
    got_padded += padded.finish()
    assert len(got_padded) == len(got_zeros) > 25
    assert any(f.speech for f in got_zeros) and not all(f.speech for f in got_zeros)
    for a, b in zip(got_padded, got_zeros, strict=True):
        assert a.index == b.index and a.speech == b.speech
        np.testing.assert_array_equal(a.window, b.window)


def test_a_long_stream_keeps_a_bounded_vad_history() -> None:
    """An hour of input (a kiosk's session runs for days) keeps only the VAD flags the next
    frames can still ask about, and the flags still answer for them."""
    speech, _ = espeak("hello", sample_rate=16000)
    windower = FrameWindower()
    chunk = np.zeros(16000 * 60, np.float32)
    for _ in range(60):
        windower.push(chunk)
    frames = windower.push(speech) + windower.finish()
    assert len(windower._vad.flags) < 100  # 1 s of flags; 360 000 before
    assert windower._vad.first_block > 60 * 60 * 100 - 100
    assert any(f.speech for f in frames)
