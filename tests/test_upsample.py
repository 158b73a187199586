"""The live output's polyphase upsampler: aligned, exact in length, chunking-invariant, clean."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.audio.decode import MonoResampler
from pipeline.audio.upsample import OutputResampler, PolyphaseUpsampler


def _tone(freq: float, rate: int, seconds: float) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


@pytest.mark.parametrize("rate", [8000, 16000, 24000])
def test_a_tone_comes_out_where_and_as_long_as_it_went_in(rate: int) -> None:
    """Output sample m is the input at time m / L (no filter delay: A/V sync depends on it), and
    a stream's total is exactly L times its input, like libswresample's through MonoResampler."""
    tone = _tone(1000, rate, 1.0)
    up = PolyphaseUpsampler(48000 // rate)
    out = np.concatenate([up.push(tone[i : i + rate // 50]) for i in range(0, len(tone), rate // 50)] + [up.flush()])
    assert len(out) == 48000
    ideal = _tone(1000, 48000, 1.0)
    inner = slice(2000, 46000)  # away from the stream's edges, where the input stops
    assert np.abs(out[inner] - ideal[inner]).max() < 1e-4


def test_chunking_does_not_change_the_output() -> None:
    rng = np.random.default_rng(2)
    audio = (0.2 * rng.standard_normal(16000)).astype(np.float32)
    whole = PolyphaseUpsampler(3)
    one_shot = np.concatenate([whole.push(audio), whole.flush()])
    chunked = PolyphaseUpsampler(3)
    parts, pos = [], 0
    while pos < len(audio):
        n = int(rng.integers(0, 700))
        parts.append(chunked.push(audio[pos : pos + n]))
        pos += n
    parts.append(chunked.flush())
    # equal up to float32 rounding: BLAS may sum a row's products in another order for another
    # number of rows (OpenBLAS picks its kernels per CPU: exact on one machine, an ulp or two
    # apart on another); a sample lost, repeated or misaligned at a chunk edge is ~0.1 apart
    chunked_out = np.concatenate(parts)
    assert chunked_out.shape == one_shot.shape
    np.testing.assert_allclose(chunked_out, one_shot, rtol=0, atol=1e-6)
    # and the next stream starts afresh: the same input gives the same output again
    np.testing.assert_array_equal(np.concatenate([chunked.push(audio), chunked.flush()]), one_shot)


def test_images_above_the_input_band_are_suppressed() -> None:
    """A 7 kHz tone at 16 kHz has its first image at 9 kHz after upsampling by 3: below -70 dB."""
    up = PolyphaseUpsampler(3)
    out = np.concatenate([up.push(_tone(7000, 16000, 1.0)), up.flush()])
    segment = out[4800 : 4800 + 38400] * np.hanning(38400)
    spectrum = np.abs(np.fft.rfft(segment))
    freqs = np.fft.rfftfreq(38400, 1 / 48000)
    level = 20 * np.log10(spectrum / spectrum.max())
    assert level[np.argmin(np.abs(freqs - 7000))] == pytest.approx(0.0)
    assert level[np.argmin(np.abs(freqs - 9000))] < -70


def test_output_resampler_takes_the_polyphase_path_only_for_mono_integer_ratios() -> None:
    """Mono 8/16/24 kHz: polyphase (keeps the GIL); stereo, 44.1 kHz and 48 kHz input: through
    libswresample as before. A rate change mid-stream flushes the old stream first, so the
    output's length is each segment's own exact total."""
    resampler = OutputResampler(48000)
    first = resampler.push_planar(_tone(440, 16000, 0.5)[None, :], 16000, "mono")
    assert isinstance(resampler._path, PolyphaseUpsampler)
    second = resampler.push_planar(_tone(440, 44100, 0.5)[None, :], 44100, "mono")
    assert isinstance(resampler._path, MonoResampler)
    rest = resampler.flush()
    assert len(first) + len(second) + len(rest) == 24000 + 24000
    stereo = OutputResampler(48000)
    stereo.push_planar(np.zeros((2, 320), np.float32), 16000, "stereo")
    assert isinstance(stereo._path, MonoResampler)
    same = OutputResampler(48000)
    assert len(same.push_planar(_tone(440, 48000, 0.1)[None, :], 48000, "mono")) == 4800
    assert isinstance(same._path, MonoResampler) and len(same.flush()) == 0
    assert len(OutputResampler(48000).flush()) == 0
    with pytest.raises(ValueError, match="factor must be >= 1"):
        PolyphaseUpsampler(0)


def test_the_polyphase_path_agrees_with_libswresample_on_speech_like_audio() -> None:
    """Both are band-limited interpolators of the same samples: a voiced, syllable-modulated
    signal comes out within 1e-3 of full scale of what MonoResampler made. (They differ near
    the input's Nyquist: this filter's passband ends at 0.45 of the input rate, 7.2 kHz of
    16 kHz, libswresample's nearer 8 kHz.)"""
    t = np.arange(16000) / 16000
    voiced = (0.4 * np.clip(np.sin(2 * np.pi * 3 * t), 0, None) * np.sin(2 * np.pi * (150 + 40 * t) * t)).astype(np.float32)
    ours = OutputResampler(48000)
    a = np.concatenate([ours.push_planar(voiced[None, i : i + 320], 16000, "mono") for i in range(0, 16000, 320)] + [ours.flush()])
    theirs = MonoResampler(48000)
    b = np.concatenate([theirs.push_planar(voiced[None, i : i + 320], 16000, "mono") for i in range(0, 16000, 320)] + [theirs.flush()])
    assert len(a) == len(b) == 48000
    assert np.abs(a[100:-100] - b[100:-100]).max() < 1e-3
