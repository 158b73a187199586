"""MP4 out: H.264 video + AAC audio, written atomically.

Why atomic: a render can fail (bad engine, disk full) or be cancelled half way. The file is
written to ``.<name>.partial-<random>.mp4`` beside the target and renamed over it only after
both encoders are flushed and the trailer is written, so the target path either holds a complete,
playable file or is untouched, and no half-written partial is left behind.

Timing: video pts are frame indices on a ``1/fps`` time base and audio pts are sample counts
from 0, so both tracks start at the same instant. The AAC encoder's priming delay is hidden by
the edit list the MP4 muxer writes, so players align them without any offset on our side.
``+faststart`` moves the ``moov`` index in front of the media data, so a browser can start
playing a download before it has all of it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np

from pipeline.audio.decode import SWR_OPTIONS, default_layout, planar_to_frame

#: Sample rates the AAC bitstream can signal directly; anything else is resampled to 48 kHz.
AAC_RATES = frozenset({96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000})
AAC_FALLBACK_RATE = 48000
AAC_FRAME = 1024  # AAC-LC frame length; used if the encoder does not report one


class Mp4Writer:
    """Encode BGR frames and float32 audio into an MP4 at ``path`` (see the module docstring).

    Use as a context manager: a clean exit finalises the file, an exception aborts it.
    ``audio_rate=None`` writes a video-only file. Odd frame sizes are cropped by one pixel on
    the right/bottom, since 4:2:0 chroma needs even dimensions.
    """

    def __init__(
        self,
        path: Path | str,
        width: int,
        height: int,
        fps: int = 25,
        audio_rate: int | None = None,
        audio_channels: int = 1,
        *,
        audio_layout: str | None = None,
        crf: int = 20,
        preset: str = "veryfast",
        audio_bitrate: int = 192_000,
        x264_options: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.fps = int(fps)
        self.width, self.height = int(width), int(height)
        self._even_w, self._even_h = self.width - self.width % 2, self.height - self.height % 2
        if self._even_w < 2 or self._even_h < 2:
            raise ValueError(f"frame size {width}x{height} is too small for H.264")
        self.frames_written = 0
        self.audio_samples_written = 0  # at the input rate
        self.audio_rate: int | None = None  # input audio format; None: video only
        self.audio_channels = 0
        self._closed = False
        self._tmp = self.path.with_name(f".{self.path.name}.partial-{secrets.token_hex(4)}.mp4")
        self._container = av.open(str(self._tmp), mode="w", format="mp4", options={"movflags": "+faststart"})
        try:
            self._video = self._add_video(crf, preset, x264_options or {})
            self._audio: av.audio.stream.AudioStream | None = None
            self._resampler: av.AudioResampler | None = None
            if audio_rate is not None:
                self._add_audio(int(audio_rate), int(audio_channels), audio_layout, audio_bitrate)
        except BaseException:
            self._discard()
            raise

    # ---- setup -------------------------------------------------------------------------------

    def _add_video(self, crf: int, preset: str, extra: dict[str, str]) -> av.video.stream.VideoStream:
        stream = self._container.add_stream("libx264", rate=self.fps)
        stream.width, stream.height = self._even_w, self._even_h
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, self.fps)
        stream.options = {"crf": str(crf), "preset": preset, **extra}
        return stream

    def _add_audio(self, rate: int, channels: int, layout: str | None, bitrate: int) -> None:
        if channels < 1:
            raise ValueError("audio needs at least one channel")
        self.audio_rate, self.audio_channels = rate, channels
        self._in_layout = layout or default_layout(channels)
        self._out_rate = rate if rate in AAC_RATES else AAC_FALLBACK_RATE
        self._out_layout = "mono" if channels == 1 else "stereo"
        self._out_channels = 1 if channels == 1 else 2
        stream = self._container.add_stream("aac", rate=self._out_rate, layout=self._out_layout)
        stream.bit_rate = bitrate
        stream.codec_context.time_base = Fraction(1, self._out_rate)
        self._audio = stream
        if self._out_rate != rate or channels > 2:
            # libswresample both resamples and downmixes (normalised, so nothing clips).
            self._resampler = av.AudioResampler(
                format="fltp", layout=self._out_layout, rate=self._out_rate, options=SWR_OPTIONS
            )
        self._pending = np.zeros((self._out_channels, 0), dtype=np.float32)
        self._audio_pts = 0  # output samples handed to the encoder

    # ---- writing -----------------------------------------------------------------------------

    def write_video(self, frame_bgr: np.ndarray) -> None:
        """Append one uint8 BGR [height, width, 3] frame; it is shown at ``frames_written / fps``."""
        self._check_open()
        if frame_bgr.shape != (self.height, self.width, 3) or frame_bgr.dtype != np.uint8:
            raise ValueError(
                f"expected a uint8 frame of shape {(self.height, self.width, 3)}, "
                f"got {frame_bgr.dtype} {frame_bgr.shape}"
            )
        image = np.ascontiguousarray(frame_bgr[: self._even_h, : self._even_w])
        frame = av.VideoFrame.from_ndarray(image, format="bgr24")
        frame.pts = self.frames_written
        frame.time_base = Fraction(1, self.fps)
        self._mux(self._video.encode(frame))
        self.frames_written += 1

    def write_audio(self, planar: np.ndarray) -> None:
        """Append float32 [channels, n] samples at the rate and channel count given at creation."""
        self._check_open()
        if self._audio is None:
            raise RuntimeError("this Mp4Writer was created without audio")
        planar = np.asarray(planar, dtype=np.float32)
        if planar.ndim == 1 and self.audio_channels == 1:
            planar = planar[None, :]
        if planar.ndim != 2 or planar.shape[0] != self.audio_channels:
            raise ValueError(f"expected audio of shape ({self.audio_channels}, n), got {planar.shape}")
        if planar.shape[1] == 0:
            return
        if self._resampler is not None:
            assert self.audio_rate is not None
            frame = planar_to_frame(planar, self.audio_rate, self._in_layout, self.audio_samples_written)
            converted = [f.to_ndarray() for f in self._resampler.resample(frame) if f is not None]
            self._push_audio(converted)
        else:
            self._push_audio([planar])
        self.audio_samples_written += planar.shape[1]

    def _push_audio(self, parts: list[np.ndarray], final: bool = False) -> None:
        assert self._audio is not None
        if parts:
            fresh = [p.astype(np.float32, copy=False) for p in parts]
            self._pending = np.concatenate([self._pending, *fresh], axis=1)
        size = self._audio.codec_context.frame_size or AAC_FRAME
        while self._pending.shape[1] >= size or (final and self._pending.shape[1] > 0):
            chunk = np.ascontiguousarray(self._pending[:, :size])
            self._pending = self._pending[:, size:]
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=self._out_layout)
            frame.sample_rate = self._out_rate
            frame.pts = self._audio_pts
            frame.time_base = Fraction(1, self._out_rate)
            self._audio_pts += chunk.shape[1]
            self._mux(self._audio.encode(frame))

    def _mux(self, packets: list[av.Packet]) -> None:
        for packet in packets:
            self._container.mux(packet)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Mp4Writer is closed")

    # ---- ending ------------------------------------------------------------------------------

    def close(self) -> Path:
        """Flush both encoders, finish the file and move it to ``path``; returns ``path``."""
        if self._closed:
            return self.path
        if self.frames_written == 0:
            self._discard()
            raise RuntimeError(f"no video frames were written; '{self.path.name}' was not created")
        try:
            if self._audio is not None:
                if self._resampler is not None:
                    tail = [f.to_ndarray() for f in self._resampler.resample(None) if f is not None]
                    self._push_audio(tail)
                self._push_audio([], final=True)
                self._mux(self._audio.encode(None))
            self._mux(self._video.encode(None))
            self._container.close()
            self._closed = True
            os.replace(self._tmp, self.path)
        except BaseException:
            self._discard()
            raise
        return self.path

    def abort(self) -> None:
        """Give up: close everything and delete the partial file; ``path`` is left untouched."""
        if not self._closed:
            self._discard()

    def _discard(self) -> None:
        self._closed = True
        with contextlib.suppress(Exception):
            self._container.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
