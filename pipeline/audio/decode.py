"""Audio in from files and streams: decode anything FFmpeg reads, resample to 16 kHz mono.

Two products come out of one decode, because they serve different ends:

- ``original``: the source samples as planar float32 at the source rate and channel count. The
  rendered MP4 carries *this* audio, so a 48 kHz stereo song is not re-encoded from a 16 kHz
  mono copy.
- ``mono16k``: the 16 kHz mono float32 signal every featurizer and the VAD read.

:class:`Resampler16k` is the one place where audio becomes 16 kHz mono; file decoding, offline
render and the live server's inputs all go through it, so a live stream and a rendered file of
the same audio produce identical features.

Channel mixing uses libswresample's standard downmix matrix (LFE dropped, centre and surrounds
at -3 dB) with ``rematrix_maxval=1``: the matrix is normalised so that the mix can never exceed
full scale. For stereo this is exactly the mean of the two channels, so a stereo file with two
identical channels yields the same 16 kHz signal as the mono file.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from pipeline.errors import InputError

SAMPLE_RATE = 16000

# Keeps downmixes within full scale (see the module docstring).
SWR_OPTIONS = {"rematrix_maxval": "1.0"}

# The most decoded audio we trim to a container's declared length: a few codec frames of
# encoder padding, never real content.
MAX_TAIL_PADDING = 4096

_INT_SCALE = {"s16": 2.0**15, "s32": 2.0**31, "s64": 2.0**63}


def default_layout(channels: int) -> str:
    """FFmpeg's default layout name for a channel count (1 -> mono, 2 -> stereo, 6 -> 5.1)."""
    if channels < 1:
        raise ValueError("an audio stream needs at least one channel")
    return av.AudioLayout(f"{channels}c").name


def layout_name(layout: av.AudioLayout) -> str:
    """The layout's name, with FFmpeg's default layout for unordered ones ("2 channels" -> stereo).

    WAV files without a channel mask decode as "N channels"; naming them lets the downmix
    matrix treat them like every other file and keeps messages readable.
    """
    name = layout.name
    n = layout.nb_channels
    return default_layout(n) if name == f"{n} channels" else name


def frame_to_planar(frame: av.AudioFrame) -> np.ndarray:
    """A decoded frame as float32 [channels, samples], whatever its sample format."""
    fmt = frame.format.name.rstrip("p")  # packed name: s16p -> s16, fltp -> flt
    channels = frame.layout.nb_channels
    if fmt in ("flt", "dbl", "s16", "s32", "u8"):
        raw = frame.to_ndarray()
        data = raw if frame.format.is_planar else raw.reshape(-1, channels).T
    else:  # s64 and anything exotic: let libswresample convert it
        converter = av.AudioResampler(format="flt", layout=frame.layout, rate=frame.sample_rate)
        out = [f for f in converter.resample(frame) + converter.resample(None) if f is not None]
        if not out:
            return np.zeros((channels, 0), dtype=np.float32)
        return np.concatenate([f.to_ndarray().reshape(-1, channels).T for f in out], axis=1)
    if fmt == "u8":
        return ((data.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if fmt in _INT_SCALE:
        return (data.astype(np.float64) / _INT_SCALE[fmt]).astype(np.float32)
    return np.ascontiguousarray(data, dtype=np.float32)


def planar_to_frame(planar: np.ndarray, sample_rate: int, layout: str, pts: int) -> av.AudioFrame:
    """float32 [channels, n] -> an ``flt`` (packed) frame with pts in samples.

    Packed, not planar: PyAV's planar ``from_ndarray`` breaks past 8 channels.
    """
    channels, n = planar.shape
    packed = np.ascontiguousarray(planar.T, dtype=np.float32).reshape(1, channels * n)
    frame = av.AudioFrame.from_ndarray(packed, format="flt", layout=layout)
    frame.sample_rate = sample_rate
    frame.pts = pts
    frame.time_base = Fraction(1, sample_rate)
    return frame


def expected_length(n: int, from_rate: int, to_rate: int) -> int:
    """Samples that ``n`` samples at ``from_rate`` become at ``to_rate`` (round half up, like swr)."""
    return (2 * n * to_rate + from_rate) // (2 * from_rate)


class MonoResampler:
    """Streams audio of any rate and channel count into mono float32 at ``rate`` (16 kHz default).

    Feed it :class:`av.AudioFrame` s or numpy chunks (float32/float64 in [-1, 1] or int16;
    1-D = mono, 2-D = planar ``[channels, n]``), in any chunk size; each call returns the 16 kHz
    samples ready so far. :meth:`flush` at the end of a stream returns the filter's tail, padded
    or trimmed so that the stream's total is exactly ``round(n * 16000 / rate)``: frame counts
    are then a function of the input length alone. A change of rate or channel count mid-stream
    (a live source reconfiguring) flushes the old segment and starts a new one seamlessly.
    """

    def __init__(self, rate: int = SAMPLE_RATE) -> None:
        self.rate = rate
        self._resampler: av.AudioResampler | None = None
        self._source_rate = 0
        self._layout = ""
        self._in = 0  # input samples of the current segment
        self._out = 0  # output samples of the current segment

    def push(
        self, chunk: av.AudioFrame | np.ndarray, sample_rate: int | None = None, layout: str | None = None
    ) -> np.ndarray:
        """16 kHz mono samples ready after ``chunk`` (numpy chunks need ``sample_rate``)."""
        if isinstance(chunk, av.AudioFrame):
            planar, rate, layout = frame_to_planar(chunk), chunk.sample_rate, layout_name(chunk.layout)
        else:
            if sample_rate is None:
                raise ValueError("numpy chunks need a sample_rate")
            planar, rate = _as_planar(chunk), int(sample_rate)
            layout = layout or default_layout(planar.shape[0])
        return self.push_planar(planar, rate, layout)

    def push_planar(self, planar: np.ndarray, sample_rate: int, layout: str) -> np.ndarray:
        """Like :meth:`push` for float32 ``[channels, n]`` with a known layout name."""
        out: list[np.ndarray] = []
        if self._resampler is not None and (sample_rate != self._source_rate or layout != self._layout):
            out.append(self.flush())
        if planar.shape[1] == 0:
            return _join(out)
        if self._resampler is None and sample_rate == self.rate and layout == "mono":
            # Already what we make: no filter, no frame objects. Every session pushes a chunk
            # every 20 ms through two of these; on a loaded GPU server the frame round trip
            # was the largest single share of the main process's GIL time (docs/benchmarks.md).
            out.append(np.array(planar[0], dtype=np.float32))
            return _join(out)
        if self._resampler is None:
            self._resampler = av.AudioResampler(
                format="flt", layout="mono", rate=self.rate, options=SWR_OPTIONS
            )
            self._source_rate, self._layout = sample_rate, layout
        frame = planar_to_frame(planar, sample_rate, layout, self._in)
        self._in += planar.shape[1]
        out.append(self._take(self._resampler.resample(frame)))
        return _join(out)

    def flush(self) -> np.ndarray:
        """End of stream: the remaining samples; the next push starts a fresh segment."""
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        tail = self._take(self._resampler.resample(None))
        want = expected_length(self._in, self._source_rate, self.rate) - (self._out - len(tail))
        if want < len(tail):
            tail = tail[: max(want, 0)]
        elif want > len(tail):
            tail = np.concatenate([tail, np.zeros(want - len(tail), dtype=np.float32)])
        self._resampler = None
        self._in = self._out = 0
        return tail

    def _take(self, frames: list[av.AudioFrame | None]) -> np.ndarray:
        # A passthrough resampler (input already 16 kHz mono float) hands back None on flush.
        data = _join([f.to_ndarray().reshape(-1) for f in frames if f is not None])
        self._out += len(data)
        return data


class Resampler16k(MonoResampler):
    """The featurizers' and VAD's input: 16 kHz mono."""

    def __init__(self) -> None:
        super().__init__(SAMPLE_RATE)


@dataclass(frozen=True)
class DecodedAudio:
    """A whole decoded audio file: the original for re-encoding, 16 kHz mono for analysis."""

    original: np.ndarray  # float32 [channels, n] at sample_rate
    sample_rate: int
    channels: int
    layout: str  # FFmpeg layout name ("mono", "stereo", "5.1", ...)
    mono16k: np.ndarray  # float32 [round(n * 16000 / sample_rate)]
    name: str = ""  # the file's name, for messages

    @property
    def samples(self) -> int:
        return int(self.original.shape[1])

    @property
    def duration(self) -> float:
        return self.samples / self.sample_rate

    @property
    def video_frames(self) -> int:
        """Frames of 25 fps video this audio drives: floor(duration * 25), exactly."""
        return self.samples * 25 // self.sample_rate


def decode_audio(path: Path | str, *, name: str | None = None) -> DecodedAudio:
    """Decode the first audio stream of ``path`` (any container/codec FFmpeg reads).

    ``name`` is what error messages call the file (default: its file name); the server passes
    the uploaded file's name rather than its temporary path. Raises :class:`InputError` with
    one line for a missing, empty, non-media, audio-less, corrupt or sample-less file.
    """
    path = Path(path)
    label = repr(name if name is not None else path.name)
    if not path.is_file():
        raise InputError(f"{label} does not exist" if not path.exists() else f"{label} is not a file")
    if path.stat().st_size == 0:
        raise InputError(f"{label} is empty")
    try:
        container = av.open(str(path), mode="r")
    except av.FFmpegError as exc:
        raise InputError(f"{label} is not a readable media file ({_reason(exc)})") from None
    try:
        if not container.streams.audio:
            raise InputError(f"{label} has no audio stream")
        stream = container.streams.audio[0]
        chunks: list[np.ndarray] = []
        mono: list[np.ndarray] = []
        resampler = Resampler16k()
        rate = layout = None
        channels = 0
        converter: _Converter | None = None

        def add(planar: np.ndarray) -> None:
            if planar.shape[1]:
                chunks.append(planar)
                mono.append(resampler.push_planar(planar, rate, layout))

        try:
            for frame in container.decode(stream):
                planar = frame_to_planar(frame)
                if planar.shape[1] == 0:
                    continue
                source = (frame.sample_rate, layout_name(frame.layout))
                if rate is None:
                    rate, layout, channels = source[0], source[1], planar.shape[0]
                if source == (rate, layout):
                    add(planar)
                    continue
                # Chained streams (e.g. concatenated Oggs) may switch format; the original must
                # stay one array, so later parts are converted to the first part's format.
                if converter is None or converter.source != source:
                    if converter is not None:
                        add(converter.flush())
                    converter = _Converter(source, (rate, layout))
                add(converter.push(planar))
        except av.FFmpegError as exc:
            if not chunks:
                raise InputError(f"{label} is corrupt or not audio ({_reason(exc)})") from None
            # Damage after some good audio: keep what decoded, as players do.
        if converter is not None:
            add(converter.flush())
        if rate is None or not chunks:
            raise InputError(f"{label} contains no audio samples")
        mono.append(resampler.flush())
        declared = _declared_samples(container, stream, rate)
    finally:
        container.close()
    original = np.concatenate(chunks, axis=1)
    mono16k = _join(mono)
    if declared is not None and 0 < original.shape[1] - declared <= MAX_TAIL_PADDING:
        original = original[:, :declared]
        mono16k = mono16k[: expected_length(declared, rate, SAMPLE_RATE)]
    return DecodedAudio(
        original=original,
        sample_rate=int(rate),
        channels=channels,
        layout=str(layout),
        mono16k=mono16k,
        name=name if name is not None else path.name,
    )


def _declared_samples(
    container: av.container.InputContainer, stream: av.AudioStream, rate: int
) -> int | None:
    """The stream length an MP4/MOV declares (edit list / sample table), in samples.

    Why: an AAC encoder pads the last frame to 1024 samples and decoders return that padding,
    which would make a 22.05 kHz file up to 46 ms (one video frame) longer than it is. MP4
    records the true presentation length, so we trim the decoded tail to it. Only MP4/MOV:
    other containers' durations are estimates (MP3's comes from the bitrate).
    """
    if "mp4" not in container.format.name and "mov" not in container.format.name:
        return None
    if not stream.duration or stream.time_base is None:
        return None
    return int(round(stream.duration * stream.time_base * rate))


class _Converter:
    """Converts one run of frames from ``source`` to ``target`` (rate, layout), statefully."""

    def __init__(self, source: tuple[int, str], target: tuple[int, str]) -> None:
        self.source = source
        self._channels = av.AudioLayout(target[1]).nb_channels
        self._resampler = av.AudioResampler(
            format="fltp", layout=target[1], rate=target[0], options=SWR_OPTIONS
        )
        self._pts = 0

    def push(self, planar: np.ndarray) -> np.ndarray:
        frame = planar_to_frame(planar, self.source[0], self.source[1], self._pts)
        self._pts += planar.shape[1]
        return self._planar(self._resampler.resample(frame))

    def flush(self) -> np.ndarray:
        return self._planar(self._resampler.resample(None))

    def _planar(self, frames: list[av.AudioFrame | None]) -> np.ndarray:
        parts = [frame_to_planar(f) for f in frames if f is not None]
        if not parts:
            return np.zeros((self._channels, 0), dtype=np.float32)
        return np.concatenate(parts, axis=1)


def _as_planar(chunk: np.ndarray) -> np.ndarray:
    arr = np.asarray(chunk)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError("audio chunks are 1-D (mono) or 2-D planar [channels, n]")
    if arr.dtype == np.int16:
        return arr.astype(np.float32) / 32768.0
    return arr.astype(np.float32, copy=False)


def _join(parts: list[np.ndarray]) -> np.ndarray:
    parts = [p for p in parts if len(p)]
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _reason(exc: Exception) -> str:
    """FFmpeg's own words for a failure, without the file path it repeats."""
    text = getattr(exc, "strerror", None) or str(exc)
    return str(text).split(":")[0].strip() or type(exc).__name__
