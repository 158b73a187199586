"""Mp4Writer: H.264 + AAC that PyAV reads back as written, faststart, atomic on failure."""

from __future__ import annotations

import struct
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.media.mp4 import Mp4Writer

W, H = 96, 64


def top_level_boxes(path: Path) -> list[str]:
    """Names of the MP4's top-level boxes, in file order."""
    names, data, pos = [], path.read_bytes(), 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8 : pos + 16])[0]
        elif size == 0:
            size = len(data) - pos
        names.append(kind.decode("latin-1"))
        pos += size
    return names


def tone(rate: int, seconds: float, channels: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.tile((0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), (channels, 1))


def frame(i: int) -> np.ndarray:
    """A frame whose colour says its index: blue ramps up, red ramps down (BGR order)."""
    image = np.zeros((H, W, 3), np.uint8)
    image[..., 0] = 40 + 3 * i
    image[..., 2] = 200 - 3 * i
    return image


def write_clip(path: Path, rate: int = 44100, channels: int = 2, frames: int = 50, **kw: object) -> Path:
    audio = tone(rate, frames / 25, channels)
    with Mp4Writer(path, W, H, audio_rate=rate, audio_channels=channels, **kw) as writer:
        for i in range(frames):
            writer.write_video(frame(i))
            # Audio in uneven pieces, interleaved with the video as render does.
            writer.write_audio(audio[:, i * rate // 25 : (i + 1) * rate // 25])
    return path


def test_streams_timing_and_content(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "clip.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]

    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert video.codec_context.name == "h264"
        assert audio.codec_context.name == "aac"
        assert video.average_rate == 25
        assert (video.width, video.height) == (W, H)
        assert audio.sample_rate == 44100 and audio.channels == 2
        assert float(audio.duration * audio.time_base) == pytest.approx(2.0, abs=0.005)
        assert float(video.duration * video.time_base) == pytest.approx(2.0, abs=1e-6)
        decoded = [f for f in container.decode(video)]
    assert len(decoded) == 50
    assert decoded[0].pts == 0
    assert [round(float(f.pts * f.time_base) * 25) for f in decoded] == list(range(50))
    for i in (0, 25, 49):
        got = decoded[i].to_ndarray(format="bgr24").astype(int)
        assert np.abs(got - frame(i)).mean() < 4, i  # lossy, but the right colours, in BGR

    with av.open(str(path)) as container:
        audio_frames = list(container.decode(audio=0))
    assert audio_frames[0].pts == 0
    samples = np.concatenate([f.to_ndarray() for f in audio_frames], axis=1)
    peak = np.abs(samples[:, 2000:80000]).max()
    assert 0.25 < peak < 0.35  # the tone survives, at its level


def test_faststart_puts_moov_first(tmp_path: Path) -> None:
    boxes = top_level_boxes(write_clip(tmp_path / "clip.mp4"))
    assert "moov" in boxes and "mdat" in boxes
    assert boxes.index("moov") < boxes.index("mdat")


@pytest.mark.parametrize(
    ("rate", "channels", "out_rate", "out_channels"),
    [(22050, 1, 22050, 1), (37000, 1, 48000, 1), (48000, 6, 48000, 2), (8000, 2, 8000, 2)],
)
def test_audio_rates_and_channels(
    tmp_path: Path, rate: int, channels: int, out_rate: int, out_channels: int
) -> None:
    path = write_clip(tmp_path / "clip.mp4", rate=rate, channels=channels, frames=25)
    with av.open(str(path)) as container:
        audio = container.streams.audio[0]
        assert audio.sample_rate == out_rate and audio.channels == out_channels
        assert float(audio.duration * audio.time_base) == pytest.approx(1.0, abs=0.01)
        samples = np.concatenate([f.to_ndarray() for f in container.decode(audio)], axis=1)
    # Identical channels: the (normalised) downmix keeps the level, no clipping, no silence.
    assert 0.25 < np.abs(samples[:, out_rate // 10 : out_rate // 2]).max() < 0.35


def test_odd_size_is_cropped_to_even(tmp_path: Path) -> None:
    with Mp4Writer(tmp_path / "odd.mp4", 65, 49) as writer:
        for _ in range(3):
            writer.write_video(np.full((49, 65, 3), 128, np.uint8))
    with av.open(str(tmp_path / "odd.mp4")) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (64, 48)
        assert not container.streams.audio
        assert sum(1 for _ in container.decode(stream)) == 3


def test_exception_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with Mp4Writer(tmp_path / "clip.mp4", W, H, audio_rate=44100, audio_channels=2) as writer:
            for i in range(10):
                writer.write_video(frame(i))
            writer.write_audio(tone(44100, 0.4, 2))
            assert any(p.name.startswith(".clip.mp4.partial-") for p in tmp_path.iterdir())
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_abort_keeps_existing_target(tmp_path: Path) -> None:
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"previous render")
    with pytest.raises(KeyboardInterrupt):
        with Mp4Writer(target, W, H) as writer:
            writer.write_video(frame(0))
            raise KeyboardInterrupt
    assert target.read_bytes() == b"previous render"
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_rejects_wrong_shapes(tmp_path: Path) -> None:
    with Mp4Writer(tmp_path / "clip.mp4", W, H, audio_rate=16000, audio_channels=1) as writer:
        with pytest.raises(ValueError):
            writer.write_video(np.zeros((H, W + 2, 3), np.uint8))
        with pytest.raises(ValueError):
            writer.write_audio(np.zeros((2, 100), np.float32))
        writer.write_video(frame(0))
        writer.write_audio(np.zeros(1600, np.float32))  # 1-D is fine for mono
    assert (tmp_path / "clip.mp4").is_file()


def test_closing_without_frames_creates_nothing(tmp_path: Path) -> None:
    writer = Mp4Writer(tmp_path / "empty.mp4", W, H, audio_rate=16000, audio_channels=1)
    writer.write_audio(np.zeros(1600, np.float32))
    with pytest.raises(RuntimeError, match="no video frames"):
        writer.close()
    assert list(tmp_path.iterdir()) == []
