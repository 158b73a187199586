"""Offline render: an audio file in, a lip-synced MP4 of an avatar out.

It runs the same stages as a live session, in the same order and with the same classes
(:class:`Resampler16k` inside :func:`decode_audio`, :class:`FrameWindower`, the engine's
featurizer, the compositor), so a rendered file shows what a live call would have shown for
that audio. What differs is only pacing: frames are produced as fast as the engine allows.

Streaming: audio is windowed one second at a time and frames are generated, composited and
encoded in batches, so memory stays flat however long the audio is. The MP4 carries the
*original* decoded audio (not the 16 kHz analysis copy), written alongside the video as it goes
so the two tracks are interleaved in the file.

The video has exactly ``floor(duration * 25)`` frames; the audio track keeps its full length
(up to 40 ms longer than the last frame), so no speech is cut.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pipeline.audio.decode import DecodedAudio, decode_audio
from pipeline.audio.windows import FPS, AudioFrame, FrameWindower
from pipeline.avatar.model import Avatar
from pipeline.engines.base import Engine, FrameRequest
from pipeline.errors import InputError

if TYPE_CHECKING:
    from pipeline.compositor import Compositor

#: 16 kHz samples pushed to the windower per step (one second).
CHUNK_SAMPLES = 16000

Progress = Callable[[int, int], None]


class MediaSink(Protocol):
    """Where rendered media goes: :class:`~pipeline.media.mp4.Mp4Writer` or anything alike."""

    def write_video(self, frame_bgr: np.ndarray) -> None: ...

    def write_audio(self, planar: np.ndarray) -> None: ...


@dataclass(frozen=True)
class RenderResult:
    frames: int  # video frames written: floor(duration * 25)
    duration: float  # seconds of audio
    seconds: float  # wall-clock time the render took
    active_frames: int  # frames the engine generated (the rest showed the idle avatar)
    path: Path | None = None  # the MP4 written, when render wrote one


def check_output_path(out_path: Path | str) -> Path:
    """An MP4 path we can create: ``.mp4`` suffix, existing directory, not a directory itself."""
    path = Path(out_path)
    if path.suffix.lower() != ".mp4":
        raise InputError(f"output '{path}' must end in .mp4")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output directory '{parent}' does not exist")
    if path.is_dir():
        raise InputError(f"output '{path}' is a directory")
    return path


def render_to_file(
    avatar: Avatar,
    audio_path: Path | str,
    out_path: Path | str,
    engine: Engine,
    *,
    batch_size: int = 16,
    progress: Progress | None = None,
    vad_aggressiveness: int = 2,
    crf: int = 20,
    preset: str = "veryfast",
    audio_bitrate: int = 192_000,
) -> RenderResult:
    """Render ``audio_path`` spoken by ``avatar`` into the MP4 ``out_path``.

    The output path is checked before any decoding, so a typo fails in milliseconds. On any
    error the target is left untouched (see :class:`~pipeline.media.mp4.Mp4Writer`).
    """
    out = check_output_path(out_path)
    decoded = decode_audio(audio_path)
    return render_audio(
        avatar,
        decoded,
        out,
        engine,
        batch_size=batch_size,
        progress=progress,
        vad_aggressiveness=vad_aggressiveness,
        crf=crf,
        preset=preset,
        audio_bitrate=audio_bitrate,
    )


def render_audio(
    avatar: Avatar,
    decoded: DecodedAudio,
    writer_or_path: MediaSink | Path | str,
    engine: Engine,
    *,
    batch_size: int = 16,
    progress: Progress | None = None,
    vad_aggressiveness: int = 2,
    compositor: Compositor | None = None,
    crf: int = 20,
    preset: str = "veryfast",
    audio_bitrate: int = 192_000,
) -> RenderResult:
    """Render already decoded audio, into a new MP4 at a path or into a sink the caller owns.

    Given a path, the MP4 is created and finalised here. Given a sink (an open ``Mp4Writer``
    made with this audio's rate and channels, or any :class:`MediaSink`), frames and audio are
    written to it and the caller closes it. ``progress(done, total)`` is called after each
    batch; raising from it cancels the render (a path target is then not written).
    ``compositor`` lets a caller reuse one it already holds for this avatar.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    total = decoded.video_frames
    if total == 0:
        raise InputError(
            f"{decoded.name or 'the audio'!r} is too short: {decoded.duration * 1000:.0f} ms of audio "
            f"makes no video frame (at least {1000 // FPS} ms needed)"
        )
    started = time.perf_counter()
    engine.load_avatar(avatar)
    if compositor is None:
        from pipeline.compositor import Compositor  # lazy: keeps `pipeline.render` import light

        compositor = Compositor(avatar)

    owned: Any = None
    if isinstance(writer_or_path, (str, Path)):
        from pipeline.media.mp4 import Mp4Writer

        width, height = avatar.size
        owned = Mp4Writer(
            writer_or_path,
            width,
            height,
            fps=FPS,
            audio_rate=decoded.sample_rate,
            audio_channels=decoded.channels,
            audio_layout=decoded.layout,
            crf=crf,
            preset=preset,
            audio_bitrate=audio_bitrate,
        )
        sink: MediaSink = owned
    else:
        sink = writer_or_path
        rate = getattr(sink, "audio_rate", decoded.sample_rate)
        channels = getattr(sink, "audio_channels", decoded.channels)
        if (rate, channels) != (decoded.sample_rate, decoded.channels):
            raise ValueError(
                f"the sink takes {channels} channel(s) at {rate} Hz, the audio has "
                f"{decoded.channels} at {decoded.sample_rate} Hz"
            )

    with owned if owned is not None else contextlib.nullcontext():
        job = _RenderJob(avatar, decoded, sink, engine, compositor, total, progress)
        windower = FrameWindower(vad_aggressiveness)
        pending: list[AudioFrame] = []
        mono = decoded.mono16k
        for start in range(0, len(mono), CHUNK_SAMPLES):
            pending.extend(windower.push(mono[start : start + CHUNK_SAMPLES]))
            while len(pending) >= batch_size:
                job.run(pending[:batch_size])
                del pending[:batch_size]
        pending.extend(windower.finish())
        for start in range(0, len(pending), batch_size):
            job.run(pending[start : start + batch_size])
        job.finish()
        if job.done != total:  # the windower and the frame count disagree: a bug, not input
            raise RuntimeError(f"rendered {job.done} frames, expected {total}")

    return RenderResult(
        frames=job.done,
        duration=decoded.duration,
        seconds=time.perf_counter() - started,
        active_frames=job.active,
        path=owned.path if owned is not None else None,
    )


class _RenderJob:
    """Turns batches of audio frames into written video frames, keeping audio level with video."""

    def __init__(
        self,
        avatar: Avatar,
        decoded: DecodedAudio,
        sink: MediaSink,
        engine: Engine,
        compositor: Compositor,
        total: int,
        progress: Progress | None,
    ) -> None:
        self.avatar, self.decoded, self.sink = avatar, decoded, sink
        self.engine, self.compositor = engine, compositor
        self.featurizer = engine.new_featurizer()
        self.total, self.progress = total, progress
        self.done = 0
        self.active = 0
        self._audio_written = 0

    def run(self, frames: Sequence[AudioFrame]) -> None:
        # Past the last whole video frame the windower may emit one more (16 kHz rounding);
        # the frame count is defined by the original audio, so it is dropped.
        frames = [f for f in frames if f.index < self.total]
        if not frames:
            return
        features = self.featurizer.features(frames)
        cycle = [self.avatar.cycle_index(f.index) for f in frames]
        active = [k for k, feat in enumerate(features) if feat.active]
        composed: dict[int, np.ndarray] = {}
        if active:
            # engine.compose blends where the engine runs (on its GPU for MuseTalk).
            requests = [FrameRequest(self.avatar, cycle[k], features[k].data) for k in active]
            composed = dict(zip(active, self.engine.compose(requests), strict=True))
        for k in range(len(frames)):
            image = composed[k] if k in composed else self.compositor.idle(cycle[k])
            self.sink.write_video(image)
        self.done += len(frames)
        self.active += len(active)
        self._write_audio_until(self.done * self.decoded.sample_rate // FPS)
        if self.progress is not None:
            self.progress(self.done, self.total)

    def finish(self) -> None:
        self._write_audio_until(self.decoded.samples)

    def _write_audio_until(self, sample: int) -> None:
        if sample > self._audio_written:
            self.sink.write_audio(self.decoded.original[:, self._audio_written : sample])
            self._audio_written = sample
