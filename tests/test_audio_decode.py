"""decode_audio and Resampler16k: every common format, exact lengths, clear errors.

Material: espeak-ng speech encoded on the spot with PyAV's own encoders (so no external tool
beyond espeak-ng is needed), at the rates and channel counts real uploads come in.
"""

from __future__ import annotations

import wave
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from pipeline.audio.decode import DecodedAudio, Resampler16k, decode_audio, expected_length
from pipeline.errors import InputError
from pipeline.media.mp4 import Mp4Writer
from tests.speech import espeak, write_wav

LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}


def resample_np(x: np.ndarray, rate: int, to_rate: int) -> np.ndarray:
    """Reference resampler (linear interpolation) independent of the code under test."""
    n = int(len(x) * to_rate / rate)
    return np.interp(np.arange(n) / to_rate, np.arange(len(x)) / rate, x).astype(np.float32)


def encode_audio(
    path: Path,
    mono: np.ndarray,
    rate: int,
    channels: int,
    codec: str,
    container: str | None = None,
    options: dict[str, str] | None = None,
) -> Path:
    """Write ``mono`` copied to every channel with PyAV's encoder ``codec``.

    PyAV's audio encoder re-chunks to the codec's frame size itself, so any chunk size works.
    """
    layout = LAYOUTS[channels]
    planar = np.tile(mono.astype(np.float32), (channels, 1))
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        if options:
            stream.codec_context.options = options
        for start in range(0, planar.shape[1], 4000):
            chunk = np.ascontiguousarray(planar[:, start : start + 4000].T).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout=layout)
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def voice() -> tuple[np.ndarray, int]:
    """~2.5 s of espeak speech at its native 22050 Hz."""
    return espeak("Testing one two three, the quick brown fox.")


# name, rate, channels, codec, container, options, tolerance in seconds.
# Tolerances: PCM and FLAC are exact. The lossy codecs carry encoder delay and padding in
# their streams; FFmpeg removes it where the file says how much (MP3: LAME's Info tag; Opus:
# pre-skip and the final granule position; MP4: the edit list, to which decode_audio also trims
# the AAC tail), so what remains is a few samples. 5 ms is far below one video frame (40 ms).
CASES = [
    ("mono8k.wav", 8000, 1, "pcm_s16le", None, None, 0.0),
    ("stereo44k.wav", 44100, 2, "pcm_s16le", None, None, 0.0),
    ("float48k.wav", 48000, 2, "pcm_f32le", None, None, 0.0),
    ("surround48k.wav", 48000, 6, "pcm_s16le", None, None, 0.0),
    ("speech.flac", 22050, 1, "flac", None, None, 0.0),
    ("speech.mp3", 44100, 2, "libmp3lame", None, None, 0.005),
    ("speech22k.mp3", 22050, 1, "libmp3lame", None, None, 0.005),
    ("speech.m4a", 44100, 2, "aac", None, None, 0.005),
    ("speech22k.m4a", 22050, 1, "aac", None, None, 0.005),
    ("speech.ogg", 44100, 2, "vorbis", "ogg", {"strict": "-2"}, 0.005),  # FFmpeg's native Vorbis
    ("speech.opus", 48000, 1, "libopus", "ogg", None, 0.005),
]


@pytest.mark.parametrize(("name", "rate", "channels", "codec", "container", "options", "tol"), CASES)
def test_decode_formats(
    tmp_path: Path,
    voice: tuple[np.ndarray, int],
    name: str,
    rate: int,
    channels: int,
    codec: str,
    container: str | None,
    options: dict[str, str] | None,
    tol: float,
) -> None:
    speech, speech_rate = voice
    source = resample_np(speech, speech_rate, rate) if rate != speech_rate else speech
    path = encode_audio(tmp_path / name, source, rate, channels, codec, container, options)
    true_duration = len(source) / rate

    decoded = decode_audio(path)

    assert decoded.sample_rate == rate
    assert decoded.channels == channels
    assert decoded.layout == LAYOUTS[channels]
    assert decoded.original.dtype == np.float32 and decoded.original.shape[0] == channels
    assert abs(decoded.duration - true_duration) <= tol + 1e-9
    # 16 kHz length is a function of the original length alone (frame counts depend on it).
    assert len(decoded.mono16k) == expected_length(decoded.samples, rate, 16000)
    assert abs(len(decoded.mono16k) - round(decoded.duration * 16000)) <= 1
    assert decoded.video_frames == decoded.samples * 25 // rate
    # Same speech, same timing (no lag: correlation is taken at zero offset), same loudness:
    # identical channels must downmix to the signal itself, not to a louder or quieter copy.
    reference = resample_np(speech, speech_rate, 16000)
    m = min(len(reference), len(decoded.mono16k))
    corr = np.corrcoef(decoded.mono16k[:m], reference[:m])[0, 1]
    assert corr > 0.98, corr
    rms_ratio = np.sqrt(np.mean(decoded.mono16k[:m] ** 2) / np.mean(reference[:m] ** 2))
    assert 0.9 < rms_ratio < 1.1, rms_ratio


def test_original_keeps_channels_apart(tmp_path: Path) -> None:
    """The original is planar and exact: left and right are not mixed or swapped."""
    rate = 44100
    t = np.arange(rate) / rate
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.25 * np.sin(2 * np.pi * 1000 * t)
    pcm = np.round(np.stack([left, right], axis=1) * 32767).astype(np.int16)
    path = tmp_path / "lr.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())

    decoded = decode_audio(path)

    assert decoded.original.shape == (2, rate)
    np.testing.assert_allclose(decoded.original[0], pcm[:, 0] / 32768.0, atol=1e-6)
    np.testing.assert_allclose(decoded.original[1], pcm[:, 1] / 32768.0, atol=1e-6)
    # Downmix = mean of the two channels.
    mono_ref = resample_np((pcm[:, 0] + pcm[:, 1].astype(np.float32)) / 65536.0, rate, 16000)
    m = min(len(mono_ref), len(decoded.mono16k)) - 50
    np.testing.assert_allclose(decoded.mono16k[50:m], mono_ref[50:m], atol=0.01)


def test_resampler_streaming_matches_one_shot(tmp_path: Path, voice: tuple[np.ndarray, int]) -> None:
    speech, rate = voice
    stereo = resample_np(speech, rate, 44100)
    path = encode_audio(tmp_path / "s.wav", stereo, 44100, 2, "pcm_s16le")
    one_shot = decode_audio(path)

    resampler = Resampler16k()
    rng = np.random.default_rng(7)
    parts, pos = [], 0
    original = one_shot.original
    while pos < original.shape[1]:
        size = int(rng.integers(1, 3000))
        parts.append(resampler.push(original[:, pos : pos + size], 44100))
        pos += size
    parts.append(resampler.flush())
    streamed = np.concatenate(parts)

    assert len(streamed) == len(one_shot.mono16k)
    np.testing.assert_allclose(streamed, one_shot.mono16k, atol=1e-5)


def test_resampler_takes_av_frames_and_int16(tmp_path: Path, voice: tuple[np.ndarray, int]) -> None:
    speech, rate = voice
    path = encode_audio(tmp_path / "s.mp3", speech, rate, 1, "libmp3lame")
    expected = decode_audio(path).mono16k

    resampler = Resampler16k()
    with av.open(str(path)) as container:
        parts = [resampler.push(frame) for frame in container.decode(audio=0)]
    parts.append(resampler.flush())
    np.testing.assert_allclose(np.concatenate(parts), expected, atol=1e-5)

    pcm16 = (speech * 32767).astype(np.int16)
    resampler = Resampler16k()
    out = np.concatenate([resampler.push(pcm16, rate), resampler.flush()])
    m = min(len(out), len(expected))
    assert np.corrcoef(out[:m], resample_np(speech, rate, 16000)[:m])[0, 1] > 0.99


def test_resampler_follows_a_rate_change() -> None:
    """A live source that switches rate mid-stream: both segments kept, at their exact lengths."""
    resampler = Resampler16k()
    a = 0.3 * np.sin(2 * np.pi * 200 * np.arange(48000) / 48000).astype(np.float32)
    b = 0.3 * np.sin(2 * np.pi * 200 * np.arange(8000) / 8000).astype(np.float32)
    out = np.concatenate([resampler.push(a, 48000), resampler.push(b, 8000), resampler.flush()])
    assert len(out) == 16000 + 16000
    assert np.abs(out[1000:15000]).max() > 0.25 and np.abs(out[17000:31000]).max() > 0.25


def test_resampler_passthrough_16k_mono() -> None:
    x = np.random.default_rng(1).uniform(-0.5, 0.5, 16003).astype(np.float32)
    resampler = Resampler16k()
    parts = [resampler.push(x[:5000], 16000), resampler.push(x[5000:], 16000), resampler.flush()]
    out = np.concatenate(parts)
    np.testing.assert_allclose(out, x, atol=1e-6)


def test_resampler_switches_between_passthrough_and_filtering() -> None:
    """16 kHz mono goes straight through (bit-exact); a segment at another rate in between is
    filtered and flushed at its exact length; back at 16 kHz it passes straight through again."""
    rng = np.random.default_rng(2)
    x = rng.uniform(-0.5, 0.5, 8000).astype(np.float32)
    y = (0.3 * np.sin(2 * np.pi * 200 * np.arange(24000) / 48000)).astype(np.float32)
    resampler = Resampler16k()
    first = resampler.push(x, 16000)
    np.testing.assert_array_equal(first, x)
    middle = resampler.push(y, 48000)
    last = resampler.push(x, 16000)  # flushes the 48 kHz segment, then passes through
    tail = resampler.flush()
    assert len(tail) == 0
    assert len(middle) + len(last) == 8000 + 8000
    np.testing.assert_array_equal(last[-8000:], x)


# ---- errors ------------------------------------------------------------------------------


def _expect_input_error(path: Path, *fragments: str) -> InputError:
    with pytest.raises(InputError) as info:
        decode_audio(path)
    message = str(info.value)
    assert "\n" not in message
    assert f"'{path.name}'" in message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


def test_png_is_not_audio(tmp_path: Path) -> None:
    ok, png = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))
    assert ok
    (tmp_path / "x.png").write_bytes(png.tobytes())
    _expect_input_error(tmp_path / "x.png", "no audio stream")
    (tmp_path / "picture.wav").write_bytes(png.tobytes())  # renamed: the name must not fool us
    _expect_input_error(tmp_path / "picture.wav")


def test_text_renamed_wav(tmp_path: Path) -> None:
    (tmp_path / "notes.wav").write_text("this is not audio\n" * 20)
    _expect_input_error(tmp_path / "notes.wav")


def test_random_bytes(tmp_path: Path) -> None:
    (tmp_path / "noise.mp3").write_bytes(np.random.default_rng(3).bytes(4096))
    _expect_input_error(tmp_path / "noise.mp3")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.wav").write_bytes(b"")
    _expect_input_error(tmp_path / "empty.wav", "empty")


def test_wav_without_samples(tmp_path: Path) -> None:
    write_wav(tmp_path / "zero.wav", np.zeros(0, np.float32), 22050)
    _expect_input_error(tmp_path / "zero.wav", "no audio samples")


def test_truncated_wav_header(tmp_path: Path) -> None:
    write_wav(tmp_path / "full.wav", np.zeros(1000, np.float32), 16000)
    (tmp_path / "cut.wav").write_bytes((tmp_path / "full.wav").read_bytes()[:20])
    _expect_input_error(tmp_path / "cut.wav")


def test_video_without_audio(tmp_path: Path) -> None:
    with Mp4Writer(tmp_path / "silent.mp4", 64, 48) as writer:
        for _ in range(3):
            writer.write_video(np.zeros((48, 64, 3), np.uint8))
    _expect_input_error(tmp_path / "silent.mp4", "no audio stream")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    _expect_input_error(tmp_path / "nope.wav", "does not exist")
    (tmp_path / "dir.wav").mkdir()
    _expect_input_error(tmp_path / "dir.wav", "not a file")


def test_display_name_in_messages(tmp_path: Path) -> None:
    (tmp_path / "upload-123.tmp").write_bytes(b"")
    with pytest.raises(InputError, match="'my song.mp3' is empty"):
        decode_audio(tmp_path / "upload-123.tmp", name="my song.mp3")


def test_decoded_audio_properties() -> None:
    original = np.zeros((2, 22050 * 2 + 100), np.float32)
    decoded = DecodedAudio(original, 22050, 2, "stereo", np.zeros(0, np.float32))
    assert decoded.duration == pytest.approx(2 + 100 / 22050)
    assert decoded.video_frames == 50
