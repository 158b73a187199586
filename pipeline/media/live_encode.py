"""One H.264 + AAC encode of a live session, muxed into any number of containers (FLV, MP4).

Encoding is the expensive part of an output, so a session encodes once per output format and
every output of that format (several RTMP URLs, a recording) muxes the same packets. A muxer can
join at any time: it starts at a keyframe (the encoder is asked for one, so nobody waits for the
next GOP) and its timestamps start at zero there, shifted by the same amount on both tracks.

Timestamps come from the session's media clock: video pts = frame index (time base 1/25),
audio pts = sample index at 48 kHz, so frame ``i`` and the audio that drove it share a
timestamp in every container. A frame whose picture was dropped (a slow encoder) leaves a gap
in the video timestamps; its audio is encoded anyway, so the sound never skips.

Nothing here blocks on a network: muxers write to files or to in-memory byte sinks that the
caller carries wherever it wants (see ``pipeline/media/rtmp.py``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

AUDIO_RATE = 48000
AAC_FRAME = 1024


@dataclass(frozen=True)
class EncodeSettings:
    width: int
    height: int
    fps: int = 25
    video_bitrate: int = 2_500_000
    gop_seconds: float = 2.0
    preset: str = "veryfast"
    audio_bitrate: int = 128_000

    @property
    def samples_per_frame(self) -> int:
        return AUDIO_RATE // self.fps

    @property
    def even_size(self) -> tuple[int, int]:
        """4:2:0 chroma needs even dimensions; an odd edge loses one pixel."""
        return self.width - self.width % 2, self.height - self.height % 2


@dataclass(frozen=True)
class MediaPacket:
    kind: str  # "video" | "audio"
    pts: int  # video: frame index (1/fps); audio: sample index (1/48000)
    key: bool
    data: bytes


class _NullSink:
    def write(self, data: bytes) -> int:
        return len(data)


class ByteSink:
    """A write-only file object collecting what a muxer writes, taken out piece by piece."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.total = 0

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        self.total += len(chunk)
        return len(chunk)

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


class LiveEncoder:
    """H.264 (libx264, zerolatency, no B-frames) + AAC-LC mono 48 kHz. Use from one thread."""

    def __init__(self, settings: EncodeSettings) -> None:
        self.settings = settings
        width, height = settings.even_size
        if width < 2 or height < 2:
            raise ValueError(f"frame size {settings.width}x{settings.height} is too small for H.264")
        # The encoders live in a template container that is never muxed into: once it has
        # written its header, its streams carry complete codec parameters (SPS/PPS, the AAC
        # config), which every muxer copies.
        self._template = av.open(_NullSink(), "w", format="flv")
        video = self._template.add_stream("libx264", rate=settings.fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.bit_rate = settings.video_bitrate
        ctx = video.codec_context
        ctx.time_base = Fraction(1, settings.fps)
        ctx.gop_size = max(1, round(settings.gop_seconds * settings.fps))
        video.options = {
            "preset": settings.preset,
            "tune": "zerolatency",
            "forced-idr": "1",  # a requested keyframe is an IDR: a muxer can start there
            "maxrate": str(settings.video_bitrate),
            "bufsize": str(settings.video_bitrate * 2),
            "x264-params": f"scenecut=0:keyint_min={ctx.gop_size}",
        }
        audio = self._template.add_stream("aac", rate=AUDIO_RATE, layout="mono")
        audio.bit_rate = settings.audio_bitrate
        audio.codec_context.time_base = Fraction(1, AUDIO_RATE)
        video.codec_context.open()
        audio.codec_context.open()
        self._template.start_encoding()
        self.video, self.audio = video, audio
        self._fifo = np.zeros(0, np.float32)
        self._audio_pts: int | None = None  # sample index of _fifo[0]
        self._force_key = True
        self.frames = 0

    def request_keyframe(self) -> None:
        self._force_key = True

    def encode(self, index: int, image: np.ndarray | None, audio: np.ndarray) -> list[MediaPacket]:
        """Frame ``index``: its BGR picture (None: dropped, audio only) and its int16 audio."""
        packets: list[MediaPacket] = []
        if image is not None:
            width, height = self.settings.even_size
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[:height, :width]), format="bgr24")
            frame.pts = index
            frame.time_base = Fraction(1, self.settings.fps)
            if self._force_key:
                frame.pict_type = av.video.frame.PictureType.I
                self._force_key = False
            packets += self._packets("video", self.video.encode(frame))
            self.frames += 1
        start = index * self.settings.samples_per_frame
        if self._audio_pts is None or self._audio_pts + len(self._fifo) != start:
            # first frame, or frames went missing: restart the audio timeline there
            self._fifo = np.zeros(0, np.float32)
            self._audio_pts = start
        self._fifo = np.concatenate([self._fifo, audio.astype(np.float32) / 32768.0])
        packets += self._encode_audio(final=False)
        return packets

    def flush(self) -> list[MediaPacket]:
        """Everything still inside the encoders (at the end of the stream)."""
        packets = self._encode_audio(final=True)
        packets += self._packets("audio", self.audio.encode(None))
        packets += self._packets("video", self.video.encode(None))
        return packets

    def _encode_audio(self, final: bool) -> list[MediaPacket]:
        packets: list[MediaPacket] = []
        while len(self._fifo) >= AAC_FRAME or (final and len(self._fifo)):
            chunk = self._fifo[:AAC_FRAME]
            if len(chunk) < AAC_FRAME:
                chunk = np.pad(chunk, (0, AAC_FRAME - len(chunk)))
            self._fifo = self._fifo[AAC_FRAME:]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk[None, :]), format="fltp", layout="mono")
            frame.sample_rate = AUDIO_RATE
            frame.pts = self._audio_pts
            frame.time_base = Fraction(1, AUDIO_RATE)
            assert self._audio_pts is not None
            self._audio_pts += AAC_FRAME
            packets += self._packets("audio", self.audio.encode(frame))
        return packets

    @staticmethod
    def _packets(kind: str, encoded: list[av.Packet]) -> list[MediaPacket]:
        return [MediaPacket(kind, int(p.pts), bool(p.is_keyframe), bytes(p)) for p in encoded if p.pts is not None]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._template.close()


class PacketMuxer:
    """One container fed with a LiveEncoder's packets, from the first video keyframe it gets.

    ``target`` is a path or a write-only file object (e.g. a ByteSink for RTMP).
    """

    def __init__(self, encoder: LiveEncoder, target: Any, format: str, options: dict[str, str] | None = None) -> None:
        self.settings = encoder.settings
        self.container = av.open(target, "w", format=format, options=options or {})
        try:
            self._video = self.container.add_stream_from_template(encoder.video)
            self._audio = self.container.add_stream_from_template(encoder.audio)
        except BaseException:
            with contextlib.suppress(Exception):
                self.container.close()
            raise
        self.origin: int | None = None  # frame index shown at time 0
        self._waiting_key = True
        self.frames = 0  # video frames muxed
        self.first_frame: int | None = None
        self.last_frame: int | None = None
        self.audio_samples = 0
        self.media_bytes = 0  # packet payload muxed
        self._closed = False

    def resync(self) -> None:
        """Packets were lost: skip everything up to the next video keyframe."""
        self._waiting_key = True

    @property
    def started(self) -> bool:
        return self.origin is not None

    def write(self, packet: MediaPacket) -> bool:
        """Muxes ``packet`` unless it comes before the keyframe this muxer (re)starts at."""
        if self._waiting_key:
            if packet.kind != "video" or not packet.key:
                return False
            self._waiting_key = False
            if self.origin is None:
                self.origin = packet.pts
                self.first_frame = packet.pts
        assert self.origin is not None
        if packet.kind == "video":
            pts, time_base, stream = packet.pts - self.origin, Fraction(1, self.settings.fps), self._video
        else:
            pts = packet.pts - self.origin * self.settings.samples_per_frame
            if pts < 0:
                return False
            time_base, stream = Fraction(1, AUDIO_RATE), self._audio
        out = av.Packet(packet.data)
        out.pts = out.dts = pts
        out.time_base = time_base
        out.is_keyframe = packet.key
        out.stream = stream
        self.container.mux(out)
        self.media_bytes += len(packet.data)
        if packet.kind == "video":
            self.frames += 1
            self.last_frame = packet.pts
        else:
            self.audio_samples += AAC_FRAME
        return True

    def close(self) -> None:
        """Writes the trailer (a muxer that never started writes nothing useful)."""
        if not self._closed:
            self._closed = True
            self.container.close()

    def abort(self) -> None:
        self._closed = True
        with contextlib.suppress(Exception):
            self.container.close()


class Mp4File:
    """An MP4 recording: muxed into ``.<name>.partial-<random>.mp4`` beside ``path`` and renamed
    over it only when finished, so ``path`` is either complete and playable or absent (the
    same rule as :class:`pipeline.media.mp4.Mp4Writer`). ``+faststart`` puts the index first."""

    def __init__(self, encoder: LiveEncoder, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.partial-{secrets.token_hex(4)}.mp4")
        self.muxer = PacketMuxer(encoder, str(self.tmp), "mp4", {"movflags": "+faststart"})

    def size_estimate(self) -> int:
        """Bytes the finished file will take if closed now: media, plus its index."""
        m = self.muxer
        return m.media_bytes + 16 * m.frames + 8 * (m.audio_samples // AAC_FRAME) + 4096

    def finish(self) -> Path:
        try:
            if not self.muxer.started:
                raise RuntimeError("no video frame was recorded")
            self.muxer.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        self.muxer.abort()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()
