"""Incremental decoding of audio pushed over a WebSocket (TTS output), chunk by chunk.

A TTS system sends a start message naming the format, then the audio bytes in messages of any
size: a message may end inside a sample, a WAV header, an MP3 frame or an Ogg page. The avatar
must start moving as soon as the first words arrive, so every decoder here returns each chunk's
audio as soon as the bytes that carry it are complete, never waiting for the end of the stream.

Why not ``av.open`` on the growing byte stream: FFmpeg's demuxers read ahead and treat a
momentarily empty buffer as the end of the file, and probing wants kilobytes before it says
anything. The containers TTS systems emit are simple, so they are parsed here (RIFF/WAVE, Ogg
pages, WebM blocks); only the codecs (MP3, Opus) go to FFmpeg, one packet at a time.

The bytes come from the network, so garbage must never crash the server: every malformed input
ends in :class:`StreamFormatError` with code ``bad_audio``, and a decoder that raised stays
failed (later calls raise again) so the server can report the error and close the socket.

:meth:`StreamDecoder.finish` ends one stream (one utterance): it flushes what the decoder holds
and resets it, so the next bytes start a new stream of the same format (a new WAV header, a new
Ogg Opus stream with its OpusHead; MP3 and raw PCM simply continue).
"""

from __future__ import annotations

import struct
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import av
import numpy as np

from pipeline.audio.decode import default_layout, frame_to_planar
from pipeline.errors import InputError

PCM_FORMATS = ("pcm_s16le", "pcm_f32le")
SUPPORTED_FORMATS = (*PCM_FORMATS, "wav", "mp3", "opus")
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 192000
OPUS_RATE = 48000

#: WebSocket close codes that go with each closing error (RFC 6455 section 7.4.1): 1008
#: "policy violation" for a start message that breaks the protocol, 1003 "unsupported data" for
#: a format we do not decode, 1007 "invalid frame payload data" for audio bytes that are not
#: the announced format. (1009 "message too big" is the server's, for oversized messages.)
CLOSE_CODES = {"bad_start": 1008, "unsupported_format": 1003, "bad_audio": 1007}

# float PCM beyond this is not audio but misread bytes (TTS floats overshoot 1.0 only slightly).
MAX_FLOAT_SAMPLE = 8.0


class StreamFormatError(InputError):
    """A start message or audio stream the server cannot use; ``code`` names the case.

    Codes: ``bad_start`` (malformed start message), ``unsupported_format`` (a format we do not
    decode), ``bad_audio`` (the bytes are not the announced format).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    @property
    def close_code(self) -> int:
        """The WebSocket close code that goes with this error."""
        return CLOSE_CODES.get(self.code, 1008)


def _bad_audio(message: str) -> StreamFormatError:
    return StreamFormatError("bad_audio", message)


# ---------------------------------------------------------------------------------------------
# The start message


@dataclass(frozen=True)
class StreamFormat:
    """What the producer announced. ``None``: the stream's own header says it (wav/mp3/opus)."""

    format: str
    sample_rate: int | None = None
    channels: int | None = None
    # the producer relays audio as it is captured (a phone bridge, a microphone): after a delay
    # on the way the session catches up in its pauses (pipeline/audio/catch_up.py)
    live: bool = False

    def to_dict(self) -> dict[str, object]:
        """The announced format as JSON (the server echoes it in its "ready" event)."""
        out: dict[str, object] = {"format": self.format}
        if self.sample_rate is not None:
            out["sample_rate"] = self.sample_rate
        if self.channels is not None:
            out["channels"] = self.channels
        if self.live:
            out["live"] = True
        return out


_START_KEYS = ("type", "format", "sample_rate", "channels", "live")


def parse_start(message: object) -> StreamFormat:
    """Validate the first WebSocket message; one-line :class:`StreamFormatError` if unusable."""
    if not isinstance(message, dict):
        raise StreamFormatError(
            "bad_start", 'the first message must be a JSON object like {"type": "start", "format": ...}'
        )
    kind = message.get("type")
    if kind != "start":
        got = "no type" if "type" not in message else f"type {kind!r}"
        raise StreamFormatError("bad_start", f'the first message must have "type": "start" (got {got})')
    unknown = sorted(str(k) for k in message if k not in _START_KEYS)
    if unknown:
        raise StreamFormatError(
            "bad_start",
            f"unknown field(s) in the start message: {', '.join(unknown)} (known: {', '.join(_START_KEYS)})",
        )
    fmt = message.get("format")
    supported = ", ".join(SUPPORTED_FORMATS)
    if fmt is None:
        raise StreamFormatError("bad_start", f'the start message needs "format": one of {supported}')
    if not isinstance(fmt, str):
        raise StreamFormatError("bad_start", f'"format" must be a string, one of {supported}')
    name = fmt.strip().lower()
    if name not in SUPPORTED_FORMATS:
        raise StreamFormatError(
            "unsupported_format", f"audio format {fmt!r} is not supported; use one of {supported}"
        )
    pcm = name in PCM_FORMATS
    rate = _int_field(message, "sample_rate", required=pcm, what="Hz")
    if rate is not None and not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise StreamFormatError(
            "bad_start", f'"sample_rate" must be {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz (got {rate})'
        )
    channels = _int_field(message, "channels", required=pcm, what="1 or 2")
    if channels is not None and channels not in (1, 2):
        raise StreamFormatError("bad_start", f'"channels" must be 1 or 2 (got {channels})')
    live = message.get("live", False)
    if not isinstance(live, bool):
        raise StreamFormatError("bad_start", f'"live" must be true or false (got {live!r})')
    return StreamFormat(name, rate, channels, live)


def _int_field(message: dict, key: str, *, required: bool, what: str) -> int | None:
    value = message.get(key)
    if value is None:
        if required:
            raise StreamFormatError(
                "bad_start", f'the start message needs "{key}" ({what}) for {message["format"]}'
            )
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise StreamFormatError("bad_start", f'"{key}" must be an integer ({what}), got {value!r}')
    return value


# ---------------------------------------------------------------------------------------------
# Decoder interface


@dataclass(frozen=True)
class DecodedChunk:
    """Audio decoded from the bytes fed so far: float32 ``[channels, n]`` at ``sample_rate``."""

    planar: np.ndarray
    sample_rate: int
    layout: str  # FFmpeg layout name: "mono", "stereo", ...

    @property
    def samples(self) -> int:
        return int(self.planar.shape[1])

    @property
    def channels(self) -> int:
        return int(self.planar.shape[0])


class StreamDecoder(ABC):
    """Bytes in, :class:`DecodedChunk` s out, as early as the format allows.

    Subclasses implement ``_feed``/``_finish``/``_reset``; this class turns every decoding
    failure into ``bad_audio`` and keeps a failed decoder failed.
    """

    def __init__(self, fmt: StreamFormat) -> None:
        self.fmt = fmt
        #: Notes for the producer that are not errors (e.g. a WAV header overriding the start
        #: message's sample rate). The server may forward them; they never stop the stream.
        self.warnings: list[str] = []
        self._error: StreamFormatError | None = None
        self._reset()

    def feed(self, data: bytes | bytearray | memoryview) -> list[DecodedChunk]:
        """Decode the next bytes of the stream (any split); returns the audio now complete."""
        return self._guard(self._feed, bytes(data))

    def finish(self) -> list[DecodedChunk]:
        """End of the stream (utterance): flush held audio and get ready for a new stream."""
        try:
            return self._guard(self._finish)
        finally:
            if self._error is None:
                self._reset()

    def reset(self) -> None:
        """Drop everything held (an interrupt): the next bytes start a new stream.

        A failed decoder stays failed: its error closes the socket anyway.
        """
        if self._error is None:
            self._reset()

    @property
    def failed(self) -> bool:
        return self._error is not None

    def _guard(self, step: Callable[..., list[DecodedChunk]], *args: bytes) -> list[DecodedChunk]:
        if self._error is not None:
            raise StreamFormatError(self._error.code, str(self._error))
        try:
            chunks = step(*args)
        except StreamFormatError as exc:
            self._error = exc
            raise
        except (av.FFmpegError, ValueError, struct.error, OverflowError) as exc:
            # Codec and parser failures on bytes from the network: the stream is not what it
            # claims to be. (av's errors are also ValueError/OSError subclasses.)
            self._error = _bad_audio(f"the {self.fmt.format} stream is corrupt ({_reason(exc)})")
            raise self._error from None
        return _merge(chunks)

    @abstractmethod
    def _reset(self) -> None: ...

    @abstractmethod
    def _feed(self, data: bytes) -> list[DecodedChunk]: ...

    @abstractmethod
    def _finish(self) -> list[DecodedChunk]: ...


def make_decoder(fmt: StreamFormat) -> StreamDecoder:
    """The incremental decoder for an announced format (see :func:`parse_start`)."""
    if fmt.format in PCM_FORMATS:
        return PcmDecoder(fmt)
    factory: dict[str, type[StreamDecoder]] = {"wav": WavDecoder, "mp3": Mp3Decoder, "opus": OpusDecoder}
    if fmt.format not in factory:
        raise StreamFormatError(
            "unsupported_format",
            f"audio format {fmt.format!r} is not supported; use one of {', '.join(SUPPORTED_FORMATS)}",
        )
    return factory[fmt.format](fmt)


# ---------------------------------------------------------------------------------------------
# PCM (raw and inside WAV)


class _PcmReader:
    """Interleaved little-endian PCM bytes -> planar float32, carrying partial frames.

    Carrying whole *frames* (one sample of every channel), not just bytes of a sample, keeps
    the channels of a stereo stream aligned however the bytes were split.
    """

    WIDTHS: ClassVar[dict[str, int]] = {"u8": 1, "s16": 2, "s24": 3, "s32": 4, "f32": 4, "f64": 8}

    def __init__(self, encoding: str, channels: int) -> None:
        self.encoding = encoding
        self.channels = channels
        self._frame = self.WIDTHS[encoding] * channels
        self._rest = b""

    @property
    def pending(self) -> int:
        """Bytes held back: an incomplete frame waiting for the rest of its bytes."""
        return len(self._rest)

    def push(self, data: bytes) -> np.ndarray:
        buf = self._rest + data if self._rest else data
        usable = len(buf) - len(buf) % self._frame
        self._rest = buf[usable:]
        samples = _pcm_to_float(buf[:usable], self.encoding)
        return np.ascontiguousarray(samples.reshape(-1, self.channels).T)

    def drop_pending(self) -> int:
        dropped, self._rest = len(self._rest), b""
        return dropped


def _pcm_to_float(raw: bytes, encoding: str) -> np.ndarray:
    """Samples as float32 in [-1, 1] (float input: as sent, checked to be plausible audio)."""
    if encoding == "u8":
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    if encoding == "s16":
        return np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    if encoding == "s24":
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = (v << 8) >> 8  # sign-extend from 24 bits
        return (v.astype(np.float64) / 2.0**23).astype(np.float32)
    if encoding == "s32":
        return (np.frombuffer(raw, "<i4").astype(np.float64) / 2.0**31).astype(np.float32)
    values = np.frombuffer(raw, "<f4" if encoding == "f32" else "<f8")
    # Any byte sequence is valid integer PCM, but floats can be told apart from garbage: misread
    # bytes (wrong format, a header sent as samples) give NaN, Inf or astronomic values.
    if values.size and not (np.isfinite(values).all() and np.abs(values).max() <= MAX_FLOAT_SAMPLE):
        raise _bad_audio(
            f"float samples must be finite and within ±{MAX_FLOAT_SAMPLE:g} "
            "(NaN, Inf or huge values: these bytes are not float PCM)"
        )
    return values.astype(np.float32)


class PcmDecoder(StreamDecoder):
    """Raw interleaved PCM (``pcm_s16le``/``pcm_f32le``) at the announced rate and channels.

    s16 cannot be validated: every byte pair is a valid sample, so a wrong format is heard,
    not detected. f32 is checked for NaN/Inf/huge values (``bad_audio``).
    """

    def _reset(self) -> None:
        encoding = "s16" if self.fmt.format == "pcm_s16le" else "f32"
        if self.fmt.sample_rate is None or self.fmt.channels is None:
            raise ValueError("raw PCM needs the sample rate and channel count of the start message")
        self._reader = _PcmReader(encoding, self.fmt.channels)
        self._layout = default_layout(self.fmt.channels)

    def _feed(self, data: bytes) -> list[DecodedChunk]:
        planar = self._reader.push(data)
        assert self.fmt.sample_rate is not None
        return [DecodedChunk(planar, self.fmt.sample_rate, self._layout)] if planar.shape[1] else []

    def _finish(self) -> list[DecodedChunk]:
        dropped = self._reader.drop_pending()
        if dropped:
            self.warnings.append(f"the stream ended inside a sample frame; dropped its {dropped} byte(s)")
        return []


# ---------------------------------------------------------------------------------------------
# WAV

# (format tag, bits) -> sample encoding. Tag 1: integer PCM (8-bit unsigned), 3: IEEE float.
_WAV_ENCODINGS = {
    (1, 8): "u8", (1, 16): "s16", (1, 24): "s24", (1, 32): "s32", (3, 32): "f32", (3, 64): "f64",
}
_KSDATAFORMAT_TAIL = bytes.fromhex("000000001000800000aa00389b71")
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)


class WavDecoder(StreamDecoder):
    """RIFF/WAVE (and RF64) streamed: the header is parsed as its bytes arrive, then PCM.

    Streaming writers cannot know the length up front, so a RIFF or data size of 0 or
    0xFFFFFFFF means "until the stream ends"; any other data size is honoured and bytes past
    it (trailing LIST chunks) are ignored. Chunks before "data" (LIST, fact, ...) are skipped.
    The header's rate and channels are authoritative; a different start message gets a warning.
    """

    #: Most header bytes (chunks before "data") accepted: TTS headers are 44 bytes; this bounds
    #: what garbage that happens to start with "RIFF" can make us swallow.
    MAX_HEADER = 1 << 20

    def _reset(self) -> None:
        self._buf = b""  # header bytes not yet parsed
        self._stage = "riff"  # riff -> chunks -> data -> done
        self._consumed = 0  # header bytes parsed so far
        self._skip = 0  # bytes left of a skipped chunk
        self._rf64 = False
        self._rf64_data_size: int | None = None
        self._reader: _PcmReader | None = None
        self._rate = 0
        self._layout = ""
        self._remaining: int | None = None  # data bytes left; None: until the end

    def _feed(self, data: bytes) -> list[DecodedChunk]:
        if self._stage == "data":
            return self._pcm(data)
        if self._stage == "done":
            return []
        self._buf += data
        self._parse_header()
        if self._stage == "data":
            rest, self._buf = self._buf, b""
            return self._pcm(rest)
        return []

    def _finish(self) -> list[DecodedChunk]:
        if self._stage in ("riff", "chunks") and (self._buf or self._consumed):
            raise _bad_audio("the stream ended inside its WAV header (no data chunk)")
        if self._reader is not None:
            # Silently: with an unknown data size, RIFF's pad byte after odd-sized data lands here.
            self._reader.drop_pending()
        return []

    def _pcm(self, data: bytes) -> list[DecodedChunk]:
        if self._remaining is not None:
            data = data[: self._remaining]
            self._remaining -= len(data)
            if self._remaining == 0:
                self._stage = "done"
        assert self._reader is not None
        planar = self._reader.push(data)
        return [DecodedChunk(planar, self._rate, self._layout)] if planar.shape[1] else []

    def _take(self, n: int) -> bytes:
        out, self._buf = self._buf[:n], self._buf[n:]
        self._consumed += n
        if self._consumed > self.MAX_HEADER:
            raise _bad_audio(f"no WAV data chunk within the first {self.MAX_HEADER} bytes")
        return out

    def _parse_header(self) -> None:
        if self._stage == "riff":
            head = self._buf[:4]
            if not (b"RIFF".startswith(head) or b"RF64".startswith(head)):
                raise _bad_audio("not a WAV stream (it does not start with a RIFF/WAVE header)")
            if len(self._buf) < 12:
                return
            riff = self._take(12)
            if riff[8:12] != b"WAVE":
                raise _bad_audio("not a WAV stream (RIFF, but not WAVE)")
            self._rf64 = riff[:4] == b"RF64"
            self._stage = "chunks"
        while self._stage == "chunks":
            if self._skip:
                n = min(self._skip, len(self._buf))
                self._take(n)
                self._skip -= n
                if self._skip:
                    return
            if len(self._buf) < 8:
                return
            cid, size = self._buf[:4], struct.unpack_from("<I", self._buf, 4)[0]
            if not all(32 <= c < 127 for c in cid):
                raise _bad_audio(f"corrupt WAV header (chunk id {cid!r})")
            if cid == b"data":
                self._take(8)
                self._start_data(size)
                return
            if cid in (b"fmt ", b"ds64"):
                if not 16 <= size <= 1024:
                    raise _bad_audio(f"corrupt WAV header ({cid.decode().strip()} chunk of {size} bytes)")
                if len(self._buf) < 8 + size:
                    return
                self._take(8)
                body = self._take(size)
                if cid == b"fmt ":
                    self._parse_fmt(body)
                else:
                    self._rf64_data_size = struct.unpack_from("<Q", body, 8)[0]
                self._skip = size & 1  # chunks are padded to an even size
                continue
            self._take(8)
            self._skip = size + (size & 1)

    def _start_data(self, size: int) -> None:
        if self._reader is None:
            raise _bad_audio("corrupt WAV header (data chunk before the fmt chunk)")
        if self._rf64 and size == 0xFFFFFFFF:
            size = self._rf64_data_size or 0
        self._remaining = None if size in _UNKNOWN_SIZES else size
        self._stage = "data"

    def _parse_fmt(self, body: bytes) -> None:
        tag, channels, rate, _byte_rate, align, bits = struct.unpack_from("<HHIIHH", body)
        if tag == 0xFFFE:  # WAVE_FORMAT_EXTENSIBLE: the real tag leads the sub-format GUID
            if len(body) < 40 or body[26:40] != _KSDATAFORMAT_TAIL:
                raise _bad_audio("unsupported WAV encoding (unknown WAVE_FORMAT_EXTENSIBLE sub-format)")
            tag = struct.unpack_from("<H", body, 24)[0]
        encoding = _WAV_ENCODINGS.get((tag, bits))
        if encoding is None:
            raise _bad_audio(
                f"unsupported WAV encoding (format tag {tag:#06x}, {bits} bits); "
                "send 8/16/24/32-bit integer or 32/64-bit float PCM"
            )
        if not 1 <= channels <= 8:
            raise _bad_audio(f"unsupported WAV channel count {channels} (1..8)")
        if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
            raise _bad_audio(f"WAV sample rate {rate} Hz is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE}")
        if align != channels * _PcmReader.WIDTHS[encoding]:
            raise _bad_audio(f"corrupt WAV header (block align {align} for {channels} x {bits} bits)")
        self._reader = _PcmReader(encoding, channels)
        self._rate = rate
        self._layout = default_layout(channels)
        if self.fmt.sample_rate is not None and self.fmt.sample_rate != rate:
            self.warnings.append(
                f"the WAV header says {rate} Hz, the start message {self.fmt.sample_rate} Hz: using {rate} Hz"
            )
        if self.fmt.channels is not None and self.fmt.channels != channels:
            self.warnings.append(
                f"the WAV header says {channels} channel(s), the start message {self.fmt.channels}: "
                f"using {channels}"
            )


# ---------------------------------------------------------------------------------------------
# Shared by MP3 and Opus: cutting codec delay and padding off a decoded stream


class _Window:
    """Keeps decoded samples in ``[start, end)`` of the decoded timeline, streaming.

    Encoders add silence (MP3's encoder + decoder delay, Opus pre-skip) at the start and pad
    the last frame. Where the stream says how much (LAME tag, OpusHead, Ogg granule), cutting
    it as frames go by restores the exact original length without holding anything back.
    """

    def __init__(self, start: int = 0, end: int | None = None) -> None:
        self.start = start
        self.end = end
        self.pos = 0

    def cut(self, planar: np.ndarray) -> np.ndarray:
        n = planar.shape[1]
        lo = min(max(self.start - self.pos, 0), n)
        hi = n if self.end is None else min(max(self.end - self.pos, lo), n)
        self.pos += n
        return planar[:, lo:hi] if (lo, hi) != (0, n) else planar


def _frames_to_chunks(frames: list[av.AudioFrame], window: _Window) -> list[DecodedChunk]:
    chunks = []
    for frame in frames:
        planar = window.cut(frame_to_planar(frame))
        if planar.shape[1]:
            chunks.append(DecodedChunk(planar, frame.sample_rate, default_layout(planar.shape[0])))
    return chunks


def _decoder(*names: str) -> av.CodecContext:
    for name in names:
        try:
            return av.CodecContext.create(name, "r")
        except (av.FFmpegError, ValueError):
            continue
    raise RuntimeError(f"this FFmpeg build has none of the decoders {', '.join(names)}")


# ---------------------------------------------------------------------------------------------
# MP3


@dataclass(frozen=True)
class _XingInfo:
    frames: int | None  # audio frames in the stream (without the info frame)
    delay: int | None  # encoder delay (LAME tag), samples
    padding: int | None  # encoder padding at the end (LAME tag), samples
    samples_per_frame: int


def _xing_info(packet: bytes) -> _XingInfo | None:
    """The Xing/Info/VBRI header frame an encoder puts first, or None for an audio frame.

    That frame carries no audio (decoding it gives a frame of silence), and its LAME extension
    tells the exact encoder delay and padding, as FFmpeg's mp3 demuxer reads them.
    """
    if len(packet) < 4 or packet[0] != 0xFF or packet[1] & 0xE0 != 0xE0 or (packet[1] >> 1) & 3 != 1:
        return None
    mpeg1 = (packet[1] >> 3) & 3 == 3
    mono = (packet[3] >> 6) & 3 == 3
    spf = 1152 if mpeg1 else 576
    if packet[36:40] == b"VBRI":
        return _XingInfo(None, None, None, spf)
    offset = 4 + ((17 if mono else 32) if mpeg1 else (9 if mono else 17))
    if packet[offset : offset + 4] not in (b"Xing", b"Info") or len(packet) < offset + 8:
        return None
    flags = struct.unpack_from(">I", packet, offset + 4)[0]
    pos = offset + 8
    frames = None
    if flags & 1 and len(packet) >= pos + 4:
        frames = struct.unpack_from(">I", packet, pos)[0]
    pos += 4 * bool(flags & 1) + 4 * bool(flags & 2) + 100 * bool(flags & 4) + 4 * bool(flags & 8)
    tag = packet[pos : pos + 24]
    if len(tag) == 24 and tag[:4] in (b"LAME", b"Lavf", b"Lavc"):
        delay = (tag[21] << 4) | (tag[22] >> 4)
        padding = ((tag[22] & 0x0F) << 8) | tag[23]
        return _XingInfo(frames, delay, padding, spf)
    return _XingInfo(frames, None, None, spf)


class Mp3Decoder(StreamDecoder):
    """MPEG audio (MP3) via FFmpeg's parser + decoder, one frame at a time.

    ID3v2 tags at the start are skipped here (FFmpeg's parser would glue them to the first
    frame, which then fails to decode). An Xing/Info header frame is skipped too, and its LAME
    tag's delay/padding are cut so the output has the original length (gapless); streams
    without one (typical for live TTS) keep the codec's ~1100 samples of leading silence.

    Garbage: the stream must start with an ID3 tag or a frame sync (0xFFE). Past that, MP3
    decoders resynchronise on any 0xFFE bit pattern, so detection is by outcome: ``bad_audio``
    when the first packet fails to decode, when several packets in a row fail after good audio
    (one damaged frame or a stray trailing tag is skipped, as players do), or when 64 KiB of
    input produced no audio.
    """

    GARBAGE_BYTES = 64 * 1024
    #: Damage in a real stream (a cut, a flipped byte) costs 1..5 failed packets before the
    #: decoder resynchronises; random bytes fail packet after packet.
    MAX_BAD_PACKETS = 8
    MAX_ID3_BYTES = 4 << 20
    DECODER_DELAY = 529  # samples the MP3 decoder's filterbank lags (FFmpeg: 528 + 1)

    def _reset(self) -> None:
        self._ctx = _decoder("mp3float", "mp3")
        self._head = b""  # stream start held back while checking for an ID3v2 tag
        self._tags_done = False  # past the ID3v2 tag(s) at the start
        self._skip = 0  # bytes of an ID3v2 tag still to skip
        self._first_packet = True
        self._since_audio = 0  # bytes fed (tags excluded) since audio last came out
        self._bad_run = 0
        self._decoded = False
        self._window = _Window()

    def _feed(self, data: bytes) -> list[DecodedChunk]:
        data = self._strip_tags(data)
        if not data:
            return []
        self._since_audio += len(data)
        chunks = self._decode(self._ctx.parse(data))
        if self._since_audio > self.GARBAGE_BYTES:
            raise _bad_audio(f"no MP3 audio in {self._since_audio} bytes: this is not an MP3 stream")
        return chunks

    def _finish(self) -> list[DecodedChunk]:
        if self._head:  # a stream shorter than an ID3 header
            self._tags_done, data, self._head = True, self._head, b""
            self._since_audio += len(data)
            chunks = self._decode(self._ctx.parse(data))
        else:
            chunks = []
        chunks += self._decode(self._ctx.parse(b""))
        chunks += _frames_to_chunks(self._ctx.decode(None), self._window)
        if not self._decoded and self._since_audio:
            raise _bad_audio(f"no MP3 audio in {self._since_audio} bytes: this is not an MP3 stream")
        return chunks

    def _strip_tags(self, data: bytes) -> bytes:
        """Drops ID3v2 tags at the start of the stream, however the bytes are split."""
        while not self._tags_done:
            if self._skip:
                n = min(self._skip, len(data))
                self._skip -= n
                data = data[n:]
                if self._skip:
                    return b""
            head = self._head + data
            if not b"ID3".startswith(head[:3]):
                if head[:1] != b"\xff" or (len(head) > 1 and head[1] & 0xE0 != 0xE0):
                    # A stream starts at a tag or a frame: anything else (text, JSON, zeros, a
                    # WAV header) fails on its first message instead of after 64 KiB.
                    raise _bad_audio("not an MP3 stream (it starts with neither an ID3 tag nor a frame)")
                if len(head) < 2:
                    self._head = head
                    return b""
                self._tags_done, self._head = True, b""
                return head
            if len(head) < 10:
                self._head = head
                return b""
            size_bytes = head[6:10]
            if head[3] not in (2, 3, 4) or any(b & 0x80 for b in size_bytes):
                raise _bad_audio("corrupt ID3 tag at the start of the MP3 stream")
            size = 10 + sum(b << (7 * (3 - i)) for i, b in enumerate(size_bytes))
            size += 10 if head[5] & 0x10 else 0  # footer
            if size > self.MAX_ID3_BYTES:
                raise _bad_audio(f"ID3 tag of {size} bytes at the start of the MP3 stream (too large)")
            self._head = b""
            self._skip = size
            data = head
        return data

    def _decode(self, packets: list[av.Packet]) -> list[DecodedChunk]:
        chunks: list[DecodedChunk] = []
        for packet in packets:
            if self._first_packet:
                self._first_packet = False
                info = _xing_info(bytes(packet))
                if info is not None:
                    self._use_info(info)
                    continue
            try:
                frames = self._ctx.decode(packet)
            except av.FFmpegError as exc:
                self._bad_run += 1
                if not self._decoded or self._bad_run > self.MAX_BAD_PACKETS:
                    raise _bad_audio(f"not a decodable MP3 stream ({_reason(exc)})") from None
                continue
            if any(f.samples for f in frames):
                if not self._decoded:
                    self._compare_with_start(frames[0])
                self._decoded, self._bad_run, self._since_audio = True, 0, 0
            chunks += _frames_to_chunks(frames, self._window)
        return chunks

    def _compare_with_start(self, frame: av.AudioFrame) -> None:
        """The stream's own rate and channels win; a different start message gets a warning."""
        rate, channels = frame.sample_rate, frame.layout.nb_channels
        if self.fmt.sample_rate is not None and self.fmt.sample_rate != rate:
            self.warnings.append(
                f"the MP3 stream is {rate} Hz, the start message says {self.fmt.sample_rate} Hz: "
                f"using {rate} Hz"
            )
        if self.fmt.channels is not None and self.fmt.channels != channels:
            self.warnings.append(
                f"the MP3 stream has {channels} channel(s), the start message says {self.fmt.channels}: "
                f"using {channels}"
            )

    def _use_info(self, info: _XingInfo) -> None:
        if info.delay is None or info.padding is None:
            return
        start = info.delay + self.DECODER_DELAY
        end = None
        if info.frames:
            end = info.frames * info.samples_per_frame - info.padding + self.DECODER_DELAY
        if end is None or end > start:
            self._window = _Window(start, end)


# ---------------------------------------------------------------------------------------------
# Opus: packets from Ogg or WebM, decoded at 48 kHz


@dataclass(frozen=True)
class OpusHead:
    """The Opus identification header (RFC 7845 section 5.1)."""

    channels: int
    pre_skip: int  # samples at 48 kHz to drop at the start
    input_sample_rate: int  # the encoder's input rate: informational only
    mapping_family: int
    raw: bytes

    @classmethod
    def parse(cls, packet: bytes) -> OpusHead:
        if len(packet) < 19 or not packet.startswith(b"OpusHead"):
            raise _bad_audio("the Opus stream does not start with an OpusHead header")
        version, channels, pre_skip, rate, _gain, family = struct.unpack_from("<BBHIhB", packet, 8)
        if version >> 4 != 0:
            raise _bad_audio(f"unsupported OpusHead version {version}")
        if channels == 0 or (family == 0 and channels > 2) or (family != 0 and len(packet) < 21 + channels):
            raise _bad_audio(f"corrupt OpusHead ({channels} channels, mapping family {family})")
        return cls(channels, pre_skip, rate, family, bytes(packet))


class _OpusPackets:
    """Decodes the audio packets of one Opus stream at 48 kHz, cutting pre-skip and padding.

    The decoder gets the OpusHead as extradata (channel mapping, output gain) but with its
    pre-skip zeroed: FFmpeg's decoders would drop it themselves, yet only on some paths, so it
    is cut here once, explicitly, by the same :class:`_Window` that applies the end trim.
    """

    def __init__(self, head: OpusHead) -> None:
        self.head = head
        self._ctx = _decoder("opus", "libopus")
        self._ctx.extradata = head.raw[:10] + b"\x00\x00" + head.raw[12:]
        self._ctx.sample_rate = OPUS_RATE
        self.window = _Window(start=head.pre_skip)

    def decode(self, packet: bytes, discard_end: int = 0) -> list[DecodedChunk]:
        if not packet:  # an empty packet would put FFmpeg's decoder into draining mode
            return []
        frames = self._ctx.decode(av.Packet(packet))
        if discard_end > 0:  # WebM DiscardPadding: the last block's padding
            end = self.window.pos + sum(f.samples for f in frames) - discard_end
            self.window.end = end if self.window.end is None else min(end, self.window.end)
        return _frames_to_chunks(frames, self.window)


def ogg_crc(data: bytes) -> int:
    """Ogg's page CRC-32 (polynomial 0x04C11DB7, not reflected, init 0, no final xor).

    Computed with zlib's reflected CRC-32 on bit-reversed bytes, bit-reversing the result:
    C speed, and identical to the bitwise definition (see the test that checks both).
    """
    reflected = zlib.crc32(data.translate(_BIT_REVERSED), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{reflected:032b}"[::-1], 2)


_BIT_REVERSED = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


@dataclass(frozen=True)
class OggPage:
    flags: int  # 0x01 continued packet, 0x02 beginning of stream, 0x04 end of stream
    granule: int
    serial: int
    sequence: int
    laces: bytes
    body: bytes

    @property
    def bos(self) -> bool:
        return bool(self.flags & 2)

    @property
    def eos(self) -> bool:
        return bool(self.flags & 4)


class OggPageReader:
    """Splits a byte stream into CRC-checked Ogg pages as soon as each page is complete.

    No resynchronisation: bytes arrive over a reliable socket, so anything but a valid page
    where one must start is garbage (``bad_audio``), not a transmission error to skip.
    """

    HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, flags, granule, serial, seq, crc, n

    def __init__(self) -> None:
        self._buf = b""

    @property
    def pending(self) -> int:
        return len(self._buf)

    def push(self, data: bytes) -> list[OggPage]:
        buf = self._buf + data if self._buf else data
        pages = []
        pos = 0  # parse by offset: a 1 MiB message holds hundreds of pages, slicing each is quadratic
        while True:
            if not b"OggS".startswith(buf[pos : pos + 4]):
                raise _bad_audio("not an Ogg stream (missing the OggS capture pattern)")
            if len(buf) - pos < 27:
                break
            _, version, flags, granule, serial, seq, crc, nsegs = self.HEADER.unpack_from(buf, pos)
            if version != 0:
                raise _bad_audio(f"unsupported Ogg version {version}")
            if len(buf) - pos < 27 + nsegs:
                break
            laces = buf[pos + 27 : pos + 27 + nsegs]
            size = 27 + nsegs + sum(laces)
            if len(buf) - pos < size:
                break
            page = buf[pos : pos + size]
            if ogg_crc(page[:22] + b"\0\0\0\0" + page[26:]) != crc:
                raise _bad_audio(f"corrupt Ogg page {seq} (CRC mismatch)")
            pages.append(OggPage(flags, granule, serial, seq, laces, page[27 + nsegs :]))
            pos += size
        self._buf = buf[pos:]
        return pages


class _OggOpus:
    """Ogg pages -> packets of the (first) Opus logical stream -> audio; chains restart it."""

    MAX_PACKET = 1 << 20

    def __init__(self, owner: OpusDecoder) -> None:
        self._owner = owner
        self._pages = OggPageReader()
        self._serial: int | None = None
        self._stream: _OpusPackets | None = None
        self._tags_seen = False
        self._ended = False
        self._data_seen = False  # a non-BOS page of ours went by: a BOS now is a new chain link
        self._partial: bytes | None = None

    def push(self, data: bytes) -> list[DecodedChunk]:
        chunks: list[DecodedChunk] = []
        for page in self._pages.push(data):
            chunks += self._page(page)
        return chunks

    def finish(self) -> list[DecodedChunk]:
        if self._pages.pending:
            raise _bad_audio("the Ogg stream ended inside a page")
        return []

    def _page(self, page: OggPage) -> list[DecodedChunk]:
        if page.bos:
            # Multiplexed streams put all their BOS pages first; a BOS after audio pages is the
            # next link of a chain (the next utterance), even if the producer skipped the EOS.
            if self._serial is None or self._ended or self._data_seen:
                held = self._partial
                packets = self._packets(page, fresh=True)
                self._partial = held  # an ignored BOS page must not disturb our stream's lacing
                if packets and packets[0].startswith(b"OpusHead"):
                    head = OpusHead.parse(packets[0])
                    self._owner.opened(head)
                    self._serial, self._stream = page.serial, _OpusPackets(head)
                    self._tags_seen = self._ended = self._data_seen = False
                    self._partial = None
            return []  # other streams multiplexed in (skeleton, video) are ignored
        if self._serial is None:
            raise _bad_audio("the Ogg stream carries no Opus audio (no OpusHead)")
        if page.serial != self._serial or self._ended:
            return []
        self._data_seen = True
        assert self._stream is not None
        if page.eos and page.granule >= 0:
            # RFC 7845 4.4: the last page's granule position is the length, pre-skip included.
            self._stream.window.end = page.granule
        chunks: list[DecodedChunk] = []
        for packet in self._packets(page):
            if not self._tags_seen:
                if not packet.startswith(b"OpusTags"):
                    raise _bad_audio("the Opus stream's second packet is not OpusTags")
                self._tags_seen = True
                continue
            chunks += self._stream.decode(packet)
        self._ended = page.eos
        return chunks

    def _packets(self, page: OggPage, fresh: bool = False) -> list[bytes]:
        """Lacing: 255-byte segments continue a packet, a shorter one ends it (across pages)."""
        packets: list[bytes] = []
        partial = None if fresh else self._partial
        continued = bool(page.flags & 1)
        skipping = continued and partial is None  # the tail of a packet we never saw the start of
        current = bytearray(partial) if continued and partial is not None else bytearray()
        pos = 0
        for lace in page.laces:
            current += page.body[pos : pos + lace]
            pos += lace
            if len(current) > self.MAX_PACKET:
                raise _bad_audio(f"Ogg packet larger than {self.MAX_PACKET} bytes")
            if lace < 255:
                if not skipping:
                    packets.append(bytes(current))
                skipping = False
                current = bytearray()
        if page.laces:
            self._partial = bytes(current) if page.laces[-1] == 255 and not skipping else None
        elif not continued:
            self._partial = None
        return packets


class _WebmOpus:
    """WebM/Matroska with an Opus track (browser MediaRecorder output), block by block.

    A flat EBML walk: Segment and Cluster (often of unknown size when live) are entered,
    Tracks, SimpleBlocks and BlockGroups are read whole (they are small), everything else is
    skipped as it streams by.
    """

    EBML, SEGMENT, CLUSTER, TRACKS = 0x1A45DFA3, 0x18538067, 0x1F43B675, 0x1654AE6B
    SIMPLE_BLOCK, BLOCK_GROUP, BLOCK, DISCARD_PADDING = 0xA3, 0xA0, 0xA1, 0x75A2
    TRACK_ENTRY, TRACK_NUMBER, TRACK_TYPE, CODEC_ID, CODEC_PRIVATE = 0xAE, 0xD7, 0x83, 0x86, 0x63A2
    ENTER = (SEGMENT, CLUSTER)
    READ = (TRACKS, SIMPLE_BLOCK, BLOCK_GROUP)
    MAX_ELEMENT = 1 << 20
    #: Bytes without a single Opus block before we call the stream garbage (headers are ~1 KiB).
    GARBAGE_BYTES = 1 << 20

    def __init__(self, owner: OpusDecoder) -> None:
        self._owner = owner
        self._buf = b""
        self._skip = 0
        self._started = False
        self._track: int | None = None
        self._stream: _OpusPackets | None = None
        self._since_audio = 0

    def push(self, data: bytes) -> list[DecodedChunk]:
        buf = self._buf + data if self._buf else data
        self._since_audio += len(data)
        chunks: list[DecodedChunk] = []
        pos = 0  # parse by offset (see OggPageReader.push)
        while True:
            if self._skip:
                n = min(self._skip, len(buf) - pos)
                pos, self._skip = pos + n, self._skip - n
                if self._skip:
                    break
            parsed = _ebml_header(buf, pos)
            if parsed is None:
                break
            eid, size, hlen = parsed
            if not self._started:
                if eid != self.EBML:
                    raise _bad_audio("not a WebM stream (no EBML header)")
                self._started = True
            if eid in self.ENTER:
                pos += hlen
                continue
            if size is None:
                raise _bad_audio(f"corrupt WebM stream (element {eid:#x} of unknown size)")
            if eid in self.READ:
                if size > self.MAX_ELEMENT:
                    raise _bad_audio(f"WebM element {eid:#x} of {size} bytes (too large)")
                if len(buf) - pos < hlen + size:
                    break
                chunks += self._element(eid, buf[pos + hlen : pos + hlen + size])
                pos += hlen + size
                continue
            pos += hlen
            self._skip = size
        self._buf = buf[pos:]
        if self._since_audio > self.GARBAGE_BYTES:
            raise _bad_audio(f"no Opus audio in {self._since_audio} bytes of WebM")
        return chunks

    def finish(self) -> list[DecodedChunk]:
        if self._stream is None and (self._buf or self._started):
            raise _bad_audio("the WebM stream ended before any Opus track")
        return []

    def _element(self, eid: int, body: bytes) -> list[DecodedChunk]:
        if eid == self.TRACKS:
            self._tracks(body)
            return []
        if eid == self.SIMPLE_BLOCK:
            return self._block(body, 0)
        block, discard = None, 0
        for cid, value in _ebml_children(body):
            if cid == self.BLOCK:
                block = value
            elif cid == self.DISCARD_PADDING:
                ns = int.from_bytes(value, "big", signed=True) if value else 0
                discard = round(ns * OPUS_RATE / 1e9)
        return self._block(block, discard) if block is not None else []

    def _tracks(self, body: bytes) -> None:
        if self._stream is not None:
            return
        for cid, entry in _ebml_children(body):
            if cid != self.TRACK_ENTRY:
                continue
            fields = dict(_ebml_children(entry))
            if int.from_bytes(fields.get(self.TRACK_TYPE, b""), "big") != 2:  # 2: audio
                continue
            codec = fields.get(self.CODEC_ID, b"").rstrip(b"\0").decode("ascii", "replace")
            if codec != "A_OPUS":
                raise _bad_audio(f"the WebM audio track is {codec or 'of no codec'}, not Opus (A_OPUS)")
            head = OpusHead.parse(fields.get(self.CODEC_PRIVATE, b""))
            self._owner.opened(head)
            self._track = int.from_bytes(fields.get(self.TRACK_NUMBER, b"\x01"), "big")
            self._stream = _OpusPackets(head)
            return
        raise _bad_audio("the WebM stream has no audio track")

    def _block(self, block: bytes, discard: int) -> list[DecodedChunk]:
        track, n = _ebml_vint(block, 0)
        if track is None or len(block) < n + 3:
            raise _bad_audio("corrupt WebM block")
        if self._stream is None or track != self._track:
            return []
        frames = _unlace(block[n + 3 :], (block[n + 2] >> 1) & 3)
        chunks: list[DecodedChunk] = []
        for i, frame in enumerate(frames):
            chunks += self._stream.decode(frame, discard if i == len(frames) - 1 else 0)
        if chunks:
            self._since_audio = 0
        return chunks


def _ebml_vint(buf: bytes, pos: int, keep_marker: bool = False) -> tuple[int | None, int]:
    """An EBML variable-size integer at ``pos``: (value, length); (None, 0) if incomplete.

    Raises ``bad_audio`` on a first byte of 0 (no length marker in 8 bits).
    """
    if pos >= len(buf):
        return None, 0
    first = buf[pos]
    if first == 0:
        raise _bad_audio("corrupt WebM stream (invalid EBML number)")
    length = 9 - first.bit_length()
    if pos + length > len(buf):
        return None, 0
    value = int.from_bytes(buf[pos : pos + length], "big")
    if not keep_marker:
        value &= (1 << (7 * length)) - 1
    return value, length


def _ebml_header(buf: bytes, pos: int = 0) -> tuple[int, int | None, int] | None:
    """(element id, size or None when unknown, header length) at ``pos``; None if incomplete."""
    eid, ilen = _ebml_vint(buf, pos, keep_marker=True)
    if eid is None:
        return None
    if ilen > 4:
        raise _bad_audio("corrupt WebM stream (element id longer than 4 bytes)")
    size, slen = _ebml_vint(buf, pos + ilen)
    if size is None:
        return None
    unknown = size == (1 << (7 * slen)) - 1
    return eid, None if unknown else size, ilen + slen


def _ebml_children(body: bytes) -> list[tuple[int, bytes]]:
    """The child elements of a master element read whole."""
    out = []
    pos = 0
    while pos < len(body):
        parsed = _ebml_header(body, pos)
        if parsed is None or parsed[1] is None or pos + parsed[2] + parsed[1] > len(body):
            raise _bad_audio("corrupt WebM element")
        eid, size, hlen = parsed
        out.append((eid, body[pos + hlen : pos + hlen + size]))
        pos += hlen + size
    return out


def _unlace(data: bytes, lacing: int) -> list[bytes]:
    """Matroska block lacing: none, Xiph (1), fixed-size (2) or EBML (3)."""
    if lacing == 0:
        return [data]
    if not data:
        raise _bad_audio("corrupt WebM block lacing")
    count, pos = data[0] + 1, 1
    sizes: list[int] = []
    if lacing == 1:
        for _ in range(count - 1):
            size = 0
            while True:
                if pos >= len(data):
                    raise _bad_audio("corrupt WebM block lacing")
                size += data[pos]
                pos += 1
                if data[pos - 1] != 255:
                    break
            sizes.append(size)
    elif lacing == 3:
        first, n = _ebml_vint(data, pos)
        if first is None:
            raise _bad_audio("corrupt WebM block lacing")
        sizes.append(first)
        pos += n
        for _ in range(count - 2):
            raw, n = _ebml_vint(data, pos)
            if raw is None:
                raise _bad_audio("corrupt WebM block lacing")
            sizes.append(sizes[-1] + raw - ((1 << (7 * n - 1)) - 1))
            pos += n
    else:
        if (len(data) - 1) % count:
            raise _bad_audio("corrupt WebM block lacing")
        sizes = [(len(data) - 1) // count] * (count - 1)
    if any(s < 0 for s in sizes) or pos + sum(sizes) > len(data):
        raise _bad_audio("corrupt WebM block lacing")
    frames = []
    for size in sizes:
        frames.append(data[pos : pos + size])
        pos += size
    frames.append(data[pos:])
    return frames


class OpusDecoder(StreamDecoder):
    """Opus in Ogg (RFC 7845; what TTS services stream) or WebM (browsers), sniffed.

    Output is always 48 kHz (Opus decodes at 48 kHz whatever the encoder's input rate), with
    pre-skip dropped and, at the end of an Ogg stream, the padding the last granule position
    excludes. Each packet is decoded when the page (Ogg) or block (WebM) holding it is complete.
    """

    def _reset(self) -> None:
        self._sniff = b""
        self._container: _OggOpus | _WebmOpus | None = None

    def opened(self, head: OpusHead) -> None:
        """Called by the container parser on a stream's OpusHead: compare it with the start."""
        if self.fmt.channels is not None and self.fmt.channels != head.channels:
            self.warnings.append(
                f"the Opus header says {head.channels} channel(s), the start message "
                f"{self.fmt.channels}: using {head.channels}"
            )
        if self.fmt.sample_rate not in (None, OPUS_RATE, head.input_sample_rate):
            self.warnings.append(
                f"Opus always decodes at {OPUS_RATE} Hz; the start message's sample_rate "
                f"{self.fmt.sample_rate} is ignored"
            )

    def _feed(self, data: bytes) -> list[DecodedChunk]:
        if self._container is None:
            self._sniff += data
            head = self._sniff[:4]
            ogg, webm = b"OggS".startswith(head), bytes.fromhex("1a45dfa3").startswith(head)
            if not (ogg or webm):
                raise _bad_audio("not an Ogg Opus (or WebM Opus) stream")
            if len(self._sniff) < 4:
                return []
            self._container = _OggOpus(self) if ogg else _WebmOpus(self)
            data, self._sniff = self._sniff, b""
        return self._container.push(data)

    def _finish(self) -> list[DecodedChunk]:
        if self._container is None:
            if self._sniff:
                raise _bad_audio("the Opus stream ended after a few bytes")
            return []
        return self._container.finish()


# ---------------------------------------------------------------------------------------------
# Helpers


def _merge(chunks: list[DecodedChunk]) -> list[DecodedChunk]:
    """Joins consecutive chunks of the same rate and layout: fewer, larger arrays per feed."""
    out: list[DecodedChunk] = []
    run: list[DecodedChunk] = []
    for chunk in chunks:
        if run and (chunk.sample_rate, chunk.layout) != (run[0].sample_rate, run[0].layout):
            out.append(_join(run))
            run = []
        run.append(chunk)
    if run:
        out.append(_join(run))
    return out


def _join(run: list[DecodedChunk]) -> DecodedChunk:
    if len(run) == 1:
        return run[0]
    planar = np.concatenate([c.planar for c in run], axis=1)
    return DecodedChunk(planar, run[0].sample_rate, run[0].layout)


def _reason(exc: Exception) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return str(text).split(":")[0].strip() or type(exc).__name__
