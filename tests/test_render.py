"""render_to_file / render_audio with a fake engine and a synthetic avatar.

The fake engine's featurizer calls a frame active when its own 40 ms of audio is loud, and its
generator paints the face a solid colour, so the test knows exactly which frames must show the
engine's face and which the idle avatar, and can check both in the decoded MP4.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.audio.decode import decode_audio
from pipeline.audio.windows import SAMPLES_PER_FRAME, WINDOW_BEFORE, AudioFrame
from pipeline.avatar.model import CROP_SIZE, Avatar
from pipeline.engines.base import Engine, Featurizer, FrameFeatures, FrameRequest
from pipeline.errors import InputError
from pipeline.render import RenderResult, render_audio, render_to_file
from tests.speech import write_wav

W, H = 128, 96
FACE_BOX = (32, 16, 96, 80)  # x1, y1, x2, y2
FACE_BGR = (30, 200, 60)  # the fake engine's face colour


class LoudnessFeaturizer(Featurizer):
    def features(self, frames: Sequence[AudioFrame]) -> list[FrameFeatures]:
        out = []
        for frame in frames:
            own = frame.window[WINDOW_BEFORE : WINDOW_BEFORE + SAMPLES_PER_FRAME]
            out.append(FrameFeatures(active=float(np.sqrt(np.mean(own**2))) > 0.01, data=frame.index))
        return out


class SolidEngine(Engine):
    """Paints every generated face FACE_BGR and records what it was asked for."""

    name = "solid"

    def __init__(self, fail_at: int | None = None) -> None:
        self.loaded: list[str] = []
        self.requests: list[tuple[int, int]] = []  # (video frame, avatar frame)
        self.fail_at = fail_at

    def new_featurizer(self) -> Featurizer:
        return LoudnessFeaturizer()

    def load_avatar(self, avatar: Avatar) -> None:
        self.loaded.append(avatar.id)

    def generate(self, requests: Sequence[FrameRequest]) -> list[np.ndarray]:
        for r in requests:
            if self.fail_at is not None and r.features >= self.fail_at:
                raise RuntimeError("engine exploded")
            self.requests.append((r.features, r.frame_index))
        return [np.full((CROP_SIZE, CROP_SIZE, 3), FACE_BGR, np.uint8) for _ in requests]


def synthetic_avatar(root: Path, n: int = 4) -> Avatar:
    """n smooth frames, each clearly brighter than the last, one face box, a full mask."""
    ys = np.linspace(0, 40, H, dtype=np.float32)[:, None, None]
    frames = np.stack(
        [np.broadcast_to(ys + 40 + 35 * i + np.array([0, 10, 20], np.float32), (H, W, 3)) for i in range(n)]
    ).astype(np.uint8)
    boxes = np.tile(np.array(FACE_BOX, np.int32), (n, 1))
    return Avatar(
        id="synthetic",
        root=root,
        frames=frames,
        face_boxes=boxes,
        crop_boxes=boxes.copy(),
        landmarks=np.zeros((n, 68, 2), np.float32),
        masks=np.full((n, CROP_SIZE, CROP_SIZE), 255, np.uint8),
        detected=np.ones(n, np.uint8),
    )


def tone(rate: int, seconds: float, amplitude: float = 0.3, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def read_video(path: Path) -> tuple[list[np.ndarray], av.audio.stream.AudioStream, float]:
    """Decoded BGR frames, the audio stream, and the audio stream's duration in seconds."""
    with av.open(str(path)) as container:
        audio = container.streams.audio[0]
        duration = float(audio.duration * audio.time_base)
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
        return frames, audio, duration


@pytest.fixture
def avatar(tmp_path: Path) -> Avatar:
    return synthetic_avatar(tmp_path)


@pytest.mark.parametrize(
    ("rate", "channels", "seconds"),
    [(22050, 1, 2.37), (44100, 2, 1.13), (48000, 1, 0.999), (8000, 2, 1.015)],
)
def test_frame_count_and_audio_length(
    tmp_path: Path, avatar: Avatar, rate: int, channels: int, seconds: float
) -> None:
    samples = np.concatenate([np.zeros(rate // 4, np.float32), tone(rate, seconds - 0.25)])
    wav = write_wav(tmp_path / "in.wav", samples, rate, channels)
    n = len(samples)
    calls: list[tuple[int, int]] = []
    engine = SolidEngine()

    result = render_to_file(
        avatar, wav, tmp_path / "out.mp4", engine, batch_size=7, progress=lambda d, t: calls.append((d, t))
    )

    expected = n * 25 // rate  # floor(duration * 25), in integers
    assert isinstance(result, RenderResult)
    assert result.frames == expected
    assert result.duration == pytest.approx(n / rate)
    assert result.path == tmp_path / "out.mp4"
    assert engine.loaded == ["synthetic"]
    frames, audio, audio_seconds = read_video(tmp_path / "out.mp4")
    assert len(frames) == expected
    assert audio.codec_context.name == "aac"
    assert audio.sample_rate == rate and audio.channels == channels
    assert audio_seconds == pytest.approx(n / rate, abs=0.005)  # the full original audio
    assert calls[-1] == (expected, expected)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.wav", "out.mp4"]


def test_idle_and_active_frames(tmp_path: Path, avatar: Avatar) -> None:
    rate = 16000
    samples = np.concatenate([np.zeros(rate), tone(rate, 1.0), np.zeros(rate)]).astype(np.float32)
    wav = write_wav(tmp_path / "in.wav", samples, rate)
    engine = SolidEngine()

    result = render_to_file(avatar, wav, tmp_path / "out.mp4", engine)

    assert result.frames == 75
    # The tone fills exactly frames 25..49; each request names the ping-pong avatar frame.
    assert engine.requests == [(i, avatar.cycle_index(i)) for i in range(25, 50)]
    assert result.active_frames == 25
    frames, _, _ = read_video(tmp_path / "out.mp4")
    assert len(frames) == 75
    # The avatar frames differ a lot, so matching the right one is a real check of the cycle.
    assert np.abs(avatar.frames[0].astype(int) - avatar.frames[1]).mean() > 30
    x1, y1, x2, y2 = FACE_BOX
    inner = (slice(y1 + 4, y2 - 4), slice(x1 + 4, x2 - 4))
    outside = np.ones((H, W), bool)
    outside[y1 - 4 : y2 + 4, x1 - 4 : x2 + 4] = False
    for i, got in enumerate(frames):
        want = avatar.frames[avatar.cycle_index(i)].astype(int)
        if 25 <= i < 50:
            assert np.abs(got[inner].astype(int) - FACE_BGR).mean() < 6, i
            assert np.abs(got[outside].astype(int) - want[outside]).mean() < 4, i
        else:
            assert np.abs(got.astype(int) - want).mean() < 3, i  # H.264 is lossy: loosely equal


class RecordingSink:
    def __init__(self) -> None:
        self.video: list[np.ndarray] = []
        self.audio: list[np.ndarray] = []

    def write_video(self, frame_bgr: np.ndarray) -> None:
        self.video.append(np.array(frame_bgr))

    def write_audio(self, planar: np.ndarray) -> None:
        self.audio.append(np.array(planar))


def test_render_audio_into_a_sink(tmp_path: Path, avatar: Avatar) -> None:
    """Exact checks without a codec in the way: idle pixels and every audio sample pass through."""
    rate = 44100
    mono = np.concatenate([np.zeros(rate // 2), tone(rate, 0.5), np.zeros(rate // 2 + 77)]).astype(np.float32)
    decoded = decode_audio(write_wav(tmp_path / "in.wav", mono, rate, channels=2))
    sink = RecordingSink()

    result = render_audio(avatar, decoded, sink, SolidEngine(), batch_size=5)

    assert result.path is None
    assert len(sink.video) == result.frames == decoded.samples * 25 // rate
    np.testing.assert_array_equal(np.concatenate(sink.audio, axis=1), decoded.original)
    for i in (0, 3, 6, 7, 30, 36):
        np.testing.assert_array_equal(sink.video[i], avatar.frames[avatar.cycle_index(i)])
    x1, y1, x2, y2 = FACE_BOX
    assert (sink.video[18][y1:y2, x1:x2] == FACE_BGR).all()
    assert (sink.video[18][:y1] == avatar.frames[avatar.cycle_index(18)][:y1]).all()


@pytest.mark.parametrize("name", ["out.avi", "out", "missing/out.mp4"])
def test_bad_output_path(tmp_path: Path, avatar: Avatar, name: str) -> None:
    wav = write_wav(tmp_path / "in.wav", tone(16000, 0.5), 16000)
    engine = SolidEngine()
    with pytest.raises(InputError):
        render_to_file(avatar, wav, tmp_path / name, engine)
    assert engine.loaded == []  # rejected before any work
    assert [p.name for p in tmp_path.iterdir()] == ["in.wav"]


def test_output_path_is_a_directory(tmp_path: Path, avatar: Avatar) -> None:
    wav = write_wav(tmp_path / "in.wav", tone(16000, 0.5), 16000)
    (tmp_path / "out.mp4").mkdir()
    with pytest.raises(InputError, match="directory"):
        render_to_file(avatar, wav, tmp_path / "out.mp4", SolidEngine())


def test_bad_audio_is_an_input_error(tmp_path: Path, avatar: Avatar) -> None:
    (tmp_path / "in.wav").write_text("not audio")
    with pytest.raises(InputError, match="'in.wav'"):
        render_to_file(avatar, tmp_path / "in.wav", tmp_path / "out.mp4", SolidEngine())
    write_wav(tmp_path / "short.wav", tone(16000, 0.03), 16000)  # 30 ms: not one video frame
    with pytest.raises(InputError, match="too short"):
        render_to_file(avatar, tmp_path / "short.wav", tmp_path / "out.mp4", SolidEngine())
    assert not (tmp_path / "out.mp4").exists()


def test_engine_failure_leaves_no_file(tmp_path: Path, avatar: Avatar) -> None:
    wav = write_wav(tmp_path / "in.wav", tone(16000, 2.0), 16000)
    with pytest.raises(RuntimeError, match="exploded"):
        render_to_file(avatar, wav, tmp_path / "out.mp4", SolidEngine(fail_at=30))
    assert [p.name for p in tmp_path.iterdir()] == ["in.wav"]


def test_progress_can_cancel(tmp_path: Path, avatar: Avatar) -> None:
    wav = write_wav(tmp_path / "in.wav", tone(16000, 2.0), 16000)

    def progress(done: int, total: int) -> None:
        if done >= 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        render_to_file(avatar, wav, tmp_path / "out.mp4", SolidEngine(), progress=progress)
    assert [p.name for p in tmp_path.iterdir()] == ["in.wav"]


def test_render_audio_into_an_open_writer(tmp_path: Path, avatar: Avatar) -> None:
    """A server job may own the writer: render fills it, the caller closes it."""
    from pipeline.media.mp4 import Mp4Writer

    rate = 22050
    decoded = decode_audio(write_wav(tmp_path / "in.wav", tone(rate, 1.0), rate))
    with Mp4Writer(tmp_path / "job.mp4", W, H, audio_rate=rate, audio_channels=1) as writer:
        result = render_audio(avatar, decoded, writer, SolidEngine())
        assert not (tmp_path / "job.mp4").exists()  # not finalised until the caller closes it
    frames, audio, seconds = read_video(tmp_path / "job.mp4")
    assert len(frames) == result.frames == 25
    assert seconds == pytest.approx(1.0, abs=0.005)

    writer = Mp4Writer(tmp_path / "wrong.mp4", W, H, audio_rate=44100, audio_channels=2)
    with pytest.raises(ValueError, match="44100"):
        render_audio(avatar, decoded, writer, SolidEngine())
    writer.abort()
    assert not (tmp_path / "wrong.mp4").exists()
