"""Incremental stream decoding (pipeline/audio/stream_decode.py): every pushed format, chunked.

Material: espeak-ng speech encoded on the spot (hand-built WAV headers, sox, PyAV's libmp3lame
and libopus), then fed in random-size chunks (1..4000 bytes, seeded) the way a WebSocket would
deliver it. Each format must give the source's audio (same length up to documented codec
delay, high correlation), the same result whatever the chunking, audio before the end of the
stream, and ``bad_audio`` (never a crash) for garbage.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import pytest

from pipeline.audio.stream_decode import (
    CLOSE_CODES,
    DecodedChunk,
    StreamDecoder,
    StreamFormat,
    StreamFormatError,
    _unlace,
    make_decoder,
    ogg_crc,
    parse_start,
)
from pipeline.errors import InputError
from tests.speech import espeak

TEXT = "Hello there. I am a talking avatar, and my lips move with my words."


# ---------------------------------------------------------------------------------------------
# Material


@pytest.fixture(scope="module")
def speech24() -> np.ndarray:
    """~3.5 s of speech at 24 kHz (a common TTS rate), float32 mono."""
    return espeak(TEXT, 24000)[0]


@pytest.fixture(scope="module")
def speech48() -> np.ndarray:
    return espeak(TEXT, 48000)[0]


def stereo(mono: np.ndarray) -> np.ndarray:
    """Two different channels, so a channel mix-up or interleaving slip shows."""
    return np.stack([mono, -0.5 * mono]).astype(np.float32)


def interleave(planar: np.ndarray, dtype: str) -> bytes:
    packed = np.ascontiguousarray(planar.T)
    if dtype == "<i2":
        return np.clip(np.round(packed * 32768.0), -32768, 32767).astype("<i2").tobytes()
    return packed.astype(dtype).tobytes()


def quantize16(planar: np.ndarray) -> np.ndarray:
    return np.clip(np.round(planar * 32768.0), -32768, 32767).astype(np.float32) / 32768.0


def wav_bytes(
    planar: np.ndarray, rate: int, *, floating: bool = False, streaming: bool = False, extra: bool = False
) -> bytes:
    """A WAV written by hand so the header's quirks are under test control.

    ``streaming``: RIFF and data sizes 0xFFFFFFFF (a writer that cannot seek back);
    ``extra``: a LIST chunk before the data and another one after it.
    """
    channels = planar.shape[0]
    body = interleave(planar, "<f4" if floating else "<i2")
    width = 4 if floating else 2
    align = channels * width
    fmt = struct.pack("<HHIIHH", 3 if floating else 1, channels, rate, rate * align, align, width * 8)
    body15 = b"INFO" + b"ISFT" + struct.pack("<I", 3) + b"lip"  # odd size: padded to even
    info = b"LIST" + struct.pack("<I", len(body15)) + body15 + b"\x00"
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + (info if extra else b"")
    size = 0xFFFFFFFF if streaming else len(body)
    data = b"data" + struct.pack("<I", size) + body
    tail = info if extra else b""
    riff = 0xFFFFFFFF if streaming else 4 + len(chunks) + len(data) + len(tail)
    return b"RIFF" + struct.pack("<I", riff) + b"WAVE" + chunks + data + tail


def sox_wav(mono: np.ndarray, rate: int, *args: str) -> bytes:
    """sox writing to a pipe: placeholder sizes (0x7FFFF000), extensible header for 24 bits."""
    if shutil.which("sox") is None:
        pytest.skip("sox is not installed")
    cmd = ["sox", "-t", "f32", "-r", str(rate), "-c", "1", "-", *args, "-t", "wav", "-"]
    return subprocess.run(cmd, input=mono.astype("<f4").tobytes(), capture_output=True, check=True).stdout


def has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:
        return False
    return True


def encode(
    planar: np.ndarray, rate: int, codec: str, container: str | None, options: dict[str, str] | None = None
) -> bytes:
    """PyAV-encoded bytes: muxed into ``container`` (BytesIO), or raw packets when None."""
    layout = {1: "mono", 2: "stereo"}[planar.shape[0]]
    packed = np.ascontiguousarray(planar.T).reshape(1, -1)
    buf = io.BytesIO()
    out = av.open(buf, "w", format=container, options=options or {}) if container else None
    ctx = av.CodecContext.create(codec, "w") if out is None else None
    if out is not None:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        ctx = stream.codec_context
    else:
        ctx.sample_rate, ctx.layout, ctx.format = rate, layout, "fltp" if codec == "libmp3lame" else "flt"
    ctx.bit_rate = 64000
    raw = bytearray()

    def emit(packets: list[av.Packet]) -> None:
        for packet in packets:
            if out is not None:
                out.mux(packet)
            else:
                raw.extend(bytes(packet))

    frame = av.AudioFrame.from_ndarray(packed, format="flt", layout=layout)
    frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
    if out is None:  # a bare codec context takes frames of exactly its frame size
        resampler = av.AudioResampler(
            format=ctx.format.name, layout=layout, rate=rate, frame_size=ctx.frame_size
        )
        frames = resampler.resample(frame) + resampler.resample(None)
    else:
        frames = [frame]
    for f in frames:
        emit(ctx.encode(f))
    emit(ctx.encode(None))
    if out is not None:
        out.close()
        return buf.getvalue()
    return bytes(raw)


# ---------------------------------------------------------------------------------------------
# Feeding


def chunks_of(data: bytes, seed: int, hi: int = 4000) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out, pos = [], 0
    while pos < len(data):
        n = int(rng.integers(1, hi + 1))
        out.append(data[pos : pos + n])
        pos += n
    return out


def start(fmt: str, **fields: int) -> StreamFormat:
    return parse_start({"type": "start", "format": fmt, **fields})


def concat(chunks: list[DecodedChunk], channels: int) -> np.ndarray:
    if not chunks:
        return np.zeros((channels, 0), np.float32)
    return np.concatenate([c.planar for c in chunks], axis=1)


def decode(fmt: StreamFormat, pieces: list[bytes]) -> tuple[np.ndarray, list[DecodedChunk], StreamDecoder]:
    decoder = make_decoder(fmt)
    out: list[DecodedChunk] = []
    for piece in pieces:
        out += decoder.feed(piece)
    out += decoder.finish()
    channels = out[0].channels if out else 1
    return concat(out, channels), out, decoder


def best_lag_correlation(ref: np.ndarray, got: np.ndarray, max_lag: int) -> tuple[int, float]:
    """The lag (got delayed by it) in [0, max_lag] maximising Pearson correlation, and that value."""
    n = len(ref)
    size = 1 << int(np.ceil(np.log2(n + len(got))))
    xc = np.fft.irfft(np.fft.rfft(got, size) * np.conj(np.fft.rfft(ref, size)), size)
    lag = int(np.argmax(xc[: max_lag + 1]))
    seg = got[lag : lag + n]
    m = min(len(seg), n)
    return lag, float(np.corrcoef(ref[:m], seg[:m])[0, 1])


def expect_bad_audio(fmt: StreamFormat, data: bytes, seed: int = 0) -> StreamFormatError:
    decoder = make_decoder(fmt)
    with pytest.raises(StreamFormatError) as info:
        for piece in chunks_of(data, seed):
            decoder.feed(piece)
        decoder.finish()
    assert info.value.code == "bad_audio", info.value
    assert "\n" not in str(info.value)
    # A failed decoder stays failed: the server reports once and closes.
    with pytest.raises(StreamFormatError):
        decoder.feed(b"\x00" * 10)
    with pytest.raises(StreamFormatError):
        decoder.finish()
    assert decoder.failed
    return info.value


# ---------------------------------------------------------------------------------------------
# Good streams of every format


@dataclass
class Case:
    fmt: StreamFormat
    data: bytes
    reference: np.ndarray  # planar float32 at the output rate
    rate: int
    extra: tuple[int, int] = (0, 0)  # allowed (min, max) extra samples over the reference
    lag: tuple[int, int] = (0, 0)  # allowed delay of the output against the reference
    exact: float | None = None  # max abs error for lossless formats; None: correlation


def make_case(name: str, speech24: np.ndarray, speech48: np.ndarray) -> Case:
    mono24, st24 = speech24[None, :], stereo(speech24)
    if name == "s16_mono":
        return Case(start("pcm_s16le", sample_rate=24000, channels=1), interleave(mono24, "<i2"),
                    quantize16(mono24), 24000, exact=1e-6)
    if name == "s16_stereo":
        return Case(start("pcm_s16le", sample_rate=24000, channels=2), interleave(st24, "<i2"),
                    quantize16(st24), 24000, exact=1e-6)
    if name == "f32_stereo":
        return Case(start("pcm_f32le", sample_rate=24000, channels=2), interleave(st24, "<f4"), st24, 24000,
                    exact=0)
    if name == "wav16":
        return Case(start("wav"), wav_bytes(mono24, 24000), quantize16(mono24), 24000, exact=1e-6)
    if name == "wav_float_stereo":
        return Case(start("wav"), wav_bytes(st24, 24000, floating=True), st24, 24000, exact=0)
    if name == "wav_streaming_header":
        data = wav_bytes(st24, 24000, streaming=True, extra=True)
        # The trailing LIST chunk becomes "audio" when the data size is unknown: its 24 bytes
        # are 6 stereo frames. Real streaming writers send nothing after the data.
        return Case(start("wav"), data, quantize16(st24), 24000, extra=(6, 6), exact=1e-6)
    if name == "wav_sox_24bit":
        return Case(start("wav"), sox_wav(speech24, 24000, "-b", "24"), mono24, 24000, exact=2e-7)
    if name == "wav_sox_float":
        data = sox_wav(speech24, 24000, "-e", "floating-point", "-b", "32")
        return Case(start("wav"), data, mono24, 24000, exact=1e-7)  # sox's int32 round trip
    if name == "mp3_file":
        if not has_encoder("libmp3lame"):
            pytest.skip("PyAV's FFmpeg has no libmp3lame encoder")
        # The mp3 muxer writes an ID3v2 tag and an Info frame whose LAME tag gives the encoder
        # delay and padding: the decoder cuts both, so the length is exact (gapless).
        data = encode(mono24, 24000, "libmp3lame", "mp3")
        return Case(start("mp3", sample_rate=24000), data, mono24, 24000)
    if name == "mp3_live":
        if not has_encoder("libmp3lame"):
            pytest.skip("PyAV's FFmpeg has no libmp3lame encoder")
        # Bare frames, as live TTS streams them: no tag says the delay, so the output keeps
        # LAME's 576-sample encoder delay + the decoder's 529, and the last frame's padding
        # (under two 576-sample MPEG-2 frames: the tail plus LAME's flush frame).
        return Case(start("mp3"), encode(mono24, 24000, "libmp3lame", None), mono24, 24000,
                    extra=(1105, 1105 + 2 * 576), lag=(1105, 1105))
    if name == "mp3_stereo_44k":
        if not has_encoder("libmp3lame"):
            pytest.skip("PyAV's FFmpeg has no libmp3lame encoder")
        st44 = stereo(espeak(TEXT, 44100)[0])
        return Case(start("mp3"), encode(st44, 44100, "libmp3lame", "mp3"), st44, 44100)
    if name == "ogg_opus":
        # 20 ms pages, as streaming TTS emits them; pre-skip and the last page's granule
        # position make the output exactly the source length.
        data = encode(speech48[None, :], 48000, "libopus", "ogg", {"page_duration": "20000"})
        return Case(start("opus"), data, speech48[None, :], 48000)
    if name == "ogg_opus_stereo_24k_in":
        # Opus always decodes at 48 kHz: a 24 kHz input comes back at 48 kHz (the reference is
        # espeak's own 48 kHz rendering, so +-2 samples of interpolation slack). FFmpeg's
        # default one-second pages: coarser, still incremental.
        st48 = stereo(speech48)
        data = encode(stereo(speech24), 24000, "libopus", "ogg")
        fmt = start("opus", sample_rate=24000, channels=2)
        return Case(fmt, data, st48, 48000, extra=(-2, 2), lag=(0, 2))
    if name == "webm_opus":
        data = encode(speech48[None, :], 48000, "libopus", "webm")
        return Case(start("opus"), data, speech48[None, :], 48000)
    raise AssertionError(name)


CASES = [
    "s16_mono", "s16_stereo", "f32_stereo", "wav16", "wav_float_stereo", "wav_streaming_header",
    "wav_sox_24bit", "wav_sox_float", "mp3_file", "mp3_live", "mp3_stereo_44k", "ogg_opus",
    "ogg_opus_stereo_24k_in", "webm_opus",
]


@pytest.mark.parametrize("name", CASES)
def test_chunked_stream_decodes_like_the_source(
    name: str, speech24: np.ndarray, speech48: np.ndarray
) -> None:
    case = make_case(name, speech24, speech48)
    got, chunks, decoder = decode(case.fmt, chunks_of(case.data, seed=7))

    # Any chunking gives the same audio as one message.
    whole, _, _ = decode(case.fmt, [case.data])
    assert np.array_equal(got, whole)
    assert {c.sample_rate for c in chunks} == {case.rate}
    assert {c.layout for c in chunks} == {"mono" if case.reference.shape[0] == 1 else "stereo"}
    assert all(c.planar.dtype == np.float32 for c in chunks)
    assert decoder.warnings == []

    ref = case.reference
    assert got.shape[0] == ref.shape[0]
    extra = got.shape[1] - ref.shape[1]
    assert case.extra[0] <= extra <= case.extra[1], (got.shape, ref.shape)
    if case.exact is not None:
        assert np.abs(got[:, : ref.shape[1]] - ref).max() <= case.exact
    else:
        for channel in range(ref.shape[0]):
            lag, corr = best_lag_correlation(ref[channel], got[channel], max_lag=2048)
            assert corr > 0.9, (channel, lag, corr)
            assert case.lag[0] <= lag <= case.lag[1], lag

    # Half the bytes in: over 30 % of the audio must already be out (no waiting for the end).
    decoder = make_decoder(case.fmt)
    half = chunks_of(case.data[: len(case.data) // 2], seed=3)
    early = sum(c.samples for piece in half for c in decoder.feed(piece))
    assert early > 0.3 * got.shape[1], (early, got.shape)


def test_mp3_gapless_trim_is_exact(speech24: np.ndarray) -> None:
    """The LAME tag's delay/padding give back exactly the source length, aligned at lag 0."""
    if not has_encoder("libmp3lame"):
        pytest.skip("PyAV's FFmpeg has no libmp3lame encoder")
    data = encode(speech24[None, :], 24000, "libmp3lame", "mp3")
    assert data.startswith(b"ID3")
    got, _, _ = decode(start("mp3"), chunks_of(data, seed=1))
    assert got.shape == (1, len(speech24))
    lag, corr = best_lag_correlation(speech24, got[0], max_lag=2000)
    assert lag == 0 and corr > 0.95


def test_opus_pre_skip_and_end_trim_are_exact(speech48: np.ndarray) -> None:
    data = encode(speech48[None, :], 48000, "libopus", "ogg", {"page_duration": "20000"})
    pre_skip = struct.unpack_from("<H", data, 28 + 10)[0]  # OpusHead follows the 28-byte page header
    assert pre_skip > 0
    got, _, _ = decode(start("opus"), chunks_of(data, seed=2))
    assert got.shape == (1, len(speech48))
    lag, corr = best_lag_correlation(speech48, got[0], max_lag=2000)
    assert lag == 0 and corr > 0.95


def test_pcm_carries_partial_samples_and_frames() -> None:
    """A message may end inside a sample or between a frame's channels."""
    planar = np.array([[0.5, -0.25, 0.125], [-0.5, 0.25, -1.0]], np.float32)
    raw = interleave(planar, "<i2")
    decoder = make_decoder(start("pcm_s16le", sample_rate=16000, channels=2))
    got = [decoder.feed(raw[i : i + 1]) for i in range(len(raw))]
    outs = [c for step in got for c in step]
    assert sum(1 for step in got if step) == 3  # one frame completes every 4 bytes
    assert np.array_equal(concat(outs, 2), planar)
    assert decoder.finish() == []


def test_pcm_finish_drops_a_partial_frame_with_a_warning() -> None:
    decoder = make_decoder(start("pcm_s16le", sample_rate=16000, channels=1))
    assert concat(decoder.feed(b"\x00\x40\x00"), 1).shape == (1, 1)
    assert decoder.finish() == []
    assert decoder.warnings and "dropped" in decoder.warnings[0]
    # finish() ends an utterance; the decoder goes on with the next one.
    assert concat(decoder.feed(b"\x00\xc0"), 1).tolist() == [[-0.5]]


def test_wav_header_overrides_the_start_message(speech24: np.ndarray) -> None:
    data = wav_bytes(stereo(speech24[:2400]), 24000)
    got, chunks, decoder = decode(start("wav", sample_rate=16000, channels=1), chunks_of(data, seed=4))
    assert {c.sample_rate for c in chunks} == {24000} and got.shape == (2, 2400)
    assert len(decoder.warnings) == 2
    assert "24000" in decoder.warnings[0] and "16000" in decoder.warnings[0]


def test_mp3_stream_overrides_the_start_message(speech24: np.ndarray) -> None:
    if not has_encoder("libmp3lame"):
        pytest.skip("PyAV's FFmpeg has no libmp3lame encoder")
    data = encode(speech24[None, :4800], 24000, "libmp3lame", None)
    _, chunks, decoder = decode(start("mp3", sample_rate=44100, channels=2), chunks_of(data, seed=16))
    assert {c.sample_rate for c in chunks} == {24000} and {c.layout for c in chunks} == {"mono"}
    assert len(decoder.warnings) == 2 and "44100" in decoder.warnings[0]


def test_wav_data_size_is_honoured(speech24: np.ndarray) -> None:
    """Bytes past a known data size (a trailing chunk) are not audio."""
    data = wav_bytes(speech24[None, :4800], 24000, extra=True)
    got, _, _ = decode(start("wav"), chunks_of(data, seed=5, hi=37))
    assert got.shape == (1, 4800)


def test_finish_starts_the_next_stream(speech24: np.ndarray, speech48: np.ndarray) -> None:
    """Utterance after utterance over one socket: each a complete stream with its header."""
    cases = [
        (start("wav"), wav_bytes(speech24[None, :24000], 24000), 24000),
        (start("opus"), encode(speech48[None, :48000], 48000, "libopus", "ogg"), 48000),
    ]
    if has_encoder("libmp3lame"):
        cases.append((start("mp3"), encode(speech24[None, :24000], 24000, "libmp3lame", "mp3"), 24000))
    for fmt, data, n in cases:
        decoder = make_decoder(fmt)
        for _ in range(2):
            out = [c for piece in chunks_of(data, seed=6) for c in decoder.feed(piece)] + decoder.finish()
            assert concat(out, 1).shape == (1, n), fmt


def test_chained_ogg_streams_without_finish(speech48: np.ndarray) -> None:
    one = encode(speech48[None, :48000], 48000, "libopus", "ogg")
    got, _, _ = decode(start("opus"), chunks_of(one + one, seed=8))
    assert got.shape == (1, 96000)


def test_ogg_crc_matches_the_bitwise_definition() -> None:
    def reference(data: bytes) -> int:
        crc = 0
        for byte in data:
            crc ^= byte << 24
            for _ in range(8):
                crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
                crc &= 0xFFFFFFFF
        return crc

    rng = np.random.default_rng(9)
    for n in (0, 1, 27, 300):
        data = rng.bytes(n)
        assert ogg_crc(data) == reference(data)


# ---------------------------------------------------------------------------------------------
# Start messages


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ([], "JSON object"),
        ("start", "JSON object"),
        ({"format": "wav"}, "type"),
        ({"type": "audio", "format": "wav"}, "type"),
        ({"type": 1, "format": "wav"}, "type"),
        ({"type": "start", "format": "wav", "rate": 16000}, "rate"),
        ({"type": "start"}, "format"),
        ({"type": "start", "format": 5}, "format"),
        ({"type": "start", "format": "pcm_s16le", "channels": 1}, "sample_rate"),
        ({"type": "start", "format": "pcm_s16le", "sample_rate": 16000}, "channels"),
        ({"type": "start", "format": "pcm_f32le", "sample_rate": "16000", "channels": 1}, "sample_rate"),
        ({"type": "start", "format": "pcm_f32le", "sample_rate": 16000.0, "channels": 1}, "sample_rate"),
        ({"type": "start", "format": "pcm_f32le", "sample_rate": True, "channels": 1}, "sample_rate"),
        ({"type": "start", "format": "pcm_s16le", "sample_rate": 4000, "channels": 1}, "sample_rate"),
        ({"type": "start", "format": "pcm_s16le", "sample_rate": 384000, "channels": 1}, "sample_rate"),
        ({"type": "start", "format": "wav", "sample_rate": 7999}, "sample_rate"),
        ({"type": "start", "format": "pcm_s16le", "sample_rate": 16000, "channels": 3}, "channels"),
        ({"type": "start", "format": "mp3", "channels": "2"}, "channels"),
        ({"type": "start", "format": "opus", "channels": 0}, "channels"),
        ({"type": "start", "format": "opus", "live": "yes"}, "live"),
        ({"type": "start", "format": "opus", "live": 1}, "live"),
    ],
)
def test_bad_start_messages(message: object, field: str) -> None:
    with pytest.raises(StreamFormatError) as info:
        parse_start(message)
    assert info.value.code == "bad_start"
    assert field in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, InputError)
    assert info.value.close_code == CLOSE_CODES["bad_start"]


@pytest.mark.parametrize("fmt", ["flac", "aac", "pcm_s24le", "ulaw"])
def test_unsupported_formats(fmt: str) -> None:
    with pytest.raises(StreamFormatError) as info:
        parse_start({"type": "start", "format": fmt, "sample_rate": 16000, "channels": 1})
    assert info.value.code == "unsupported_format"
    message = str(info.value)
    assert repr(fmt) in message
    assert all(name in message for name in ("pcm_s16le", "pcm_f32le", "wav", "mp3", "opus"))


def test_good_start_messages() -> None:
    assert parse_start({"type": "start", "format": "pcm_s16le", "sample_rate": 24000, "channels": 1}) == (
        StreamFormat("pcm_s16le", 24000, 1)
    )
    assert parse_start({"type": "start", "format": "opus"}) == StreamFormat("opus", None, None)
    assert parse_start({"type": "start", "format": "mp3", "sample_rate": 44100, "channels": 2}).to_dict() == {
        "format": "mp3", "sample_rate": 44100, "channels": 2,
    }
    assert parse_start({"type": "start", "format": "wav"}).to_dict() == {"format": "wav"}
    relayed = parse_start({"type": "start", "format": "pcm_s16le", "sample_rate": 8000, "channels": 1, "live": True})
    assert relayed.live and relayed.to_dict()["live"] is True
    assert not parse_start({"type": "start", "format": "wav", "live": False}).live


# ---------------------------------------------------------------------------------------------
# Garbage


GARBAGE = {
    "random": np.random.default_rng(10).bytes(200_000),
    "zeros": bytes(100_000),
    "text": b"this is not audio at all, just some text sent by mistake. " * 2000,
    "json": b'{"type": "audio", "data": "UklGRiQAAABXQVZFZm10IBAAAAABAAEA"}' * 2000,
}


@pytest.mark.parametrize("fmt", ["wav", "mp3", "opus"])
@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_garbage_is_bad_audio(fmt: str, kind: str) -> None:
    error = expect_bad_audio(start(fmt), GARBAGE[kind])
    assert error.close_code == 1007


def test_garbage_after_an_mp3_header_is_bad_audio(speech24: np.ndarray) -> None:
    if not has_encoder("libmp3lame"):
        pytest.skip("PyAV's FFmpeg has no libmp3lame encoder")
    good = encode(speech24[None, :12000], 24000, "libmp3lame", None)
    expect_bad_audio(start("mp3"), good + GARBAGE["random"])


def test_other_formats_announced_wrongly_are_bad_audio(speech24: np.ndarray, speech48: np.ndarray) -> None:
    wav = wav_bytes(speech24[None, :], 24000)
    ogg = encode(speech48[None, :48000], 48000, "libopus", "ogg")
    expect_bad_audio(start("opus"), wav)
    expect_bad_audio(start("wav"), ogg)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e6])
def test_f32_garbage_is_bad_audio(bad: float) -> None:
    samples = np.zeros(2000, np.float32)
    samples[1500] = bad
    expect_bad_audio(start("pcm_f32le", sample_rate=16000, channels=1), samples.tobytes())


def test_wav_with_unsupported_encoding_is_bad_audio() -> None:
    data = bytearray(wav_bytes(np.zeros((1, 100), np.float32), 16000))
    struct.pack_into("<H", data, 20, 7)  # mu-law
    error = expect_bad_audio(start("wav"), bytes(data))
    assert "format tag 0x0007" in str(error)


def test_truncated_wav_header_is_bad_audio() -> None:
    expect_bad_audio(start("wav"), wav_bytes(np.zeros((1, 10), np.float32), 16000)[:30])


def test_ogg_with_a_corrupted_crc_is_bad_audio(speech48: np.ndarray) -> None:
    data = bytearray(encode(speech48[None, :], 48000, "libopus", "ogg", {"page_duration": "20000"}))
    page = data.find(b"OggS", len(data) // 2)
    data[page + 40] ^= 0x10  # a bit of that page's audio
    decoder = make_decoder(start("opus"))
    out: list[DecodedChunk] = []
    with pytest.raises(StreamFormatError) as info:
        for piece in chunks_of(bytes(data), seed=11):
            out += decoder.feed(piece)
    assert info.value.code == "bad_audio" and "CRC" in str(info.value)
    assert sum(c.samples for c in out) > 0  # the good pages before it were already out
    with pytest.raises(StreamFormatError):
        decoder.feed(b"")


def test_fuzzed_streams_never_crash(speech24: np.ndarray, speech48: np.ndarray) -> None:
    """Damaged streams (flipped bytes, cuts, insertions) decode or raise StreamFormatError."""
    short24, short48 = speech24[None, :12000], speech48[None, :24000]
    streams = [
        (start("wav"), wav_bytes(short24, 24000, extra=True)),
        (start("wav"), sox_wav(short24[0], 24000, "-b", "24")),
        (start("opus"), encode(short48, 48000, "libopus", "ogg", {"page_duration": "20000"})),
        (start("opus"), encode(short48, 48000, "libopus", "webm")),
        (start("pcm_f32le", sample_rate=24000, channels=1), interleave(short24, "<f4")),
    ]
    if has_encoder("libmp3lame"):
        streams.append((start("mp3"), encode(short24, 24000, "libmp3lame", "mp3")))
    rng = np.random.default_rng(12)
    for fmt, good in streams:
        for trial in range(25):
            data = bytearray(good)
            for _ in range(int(rng.integers(1, 6))):
                pos = int(rng.integers(0, len(data)))
                action = int(rng.integers(0, 3))
                if action == 0:
                    data[pos] ^= 1 << int(rng.integers(0, 8))
                elif action == 1:
                    del data[pos : pos + int(rng.integers(1, 64))]
                else:
                    data[pos:pos] = rng.bytes(int(rng.integers(1, 64)))
            decoder = make_decoder(fmt)
            try:
                for piece in chunks_of(bytes(data), seed=trial, hi=2000):
                    for chunk in decoder.feed(piece):
                        assert chunk.planar.dtype == np.float32 and np.isfinite(chunk.planar).all()
                decoder.finish()
            except StreamFormatError as exc:
                assert exc.code == "bad_audio"


def test_a_damaged_mp3_frame_is_skipped_like_players_do(speech24: np.ndarray) -> None:
    """One cut inside a live stream costs a frame or two, not the session."""
    if not has_encoder("libmp3lame"):
        pytest.skip("PyAV's FFmpeg has no libmp3lame encoder")
    good = encode(speech24[None, :], 24000, "libmp3lame", None)
    cut = len(good) // 2
    damaged = good[:cut] + good[cut + 40 :]
    got, _, decoder = decode(start("mp3"), chunks_of(damaged, seed=13))
    assert not decoder.failed
    assert abs(got.shape[1] - (len(speech24) + 1105)) < 4 * 576


def test_webm_block_lacing() -> None:
    """Xiph, fixed-size and EBML lacing (MediaRecorder sends unlaced blocks; muxers may lace)."""
    frames = [b"a" * 300, b"b" * 7, b"c" * 20]
    xiph = bytes([2, 255, 45, 7]) + b"".join(frames)
    assert _unlace(xiph, 1) == frames
    assert _unlace(bytes([2]) + b"x" * 12, 2) == [b"xxxx"] * 3
    # EBML: first size 300 as a 2-byte vint, then the difference 7 - 300 = -293 as a signed
    # 2-byte vint (bias 8191).
    ebml = bytes([2]) + (0x4000 | 300).to_bytes(2, "big") + (0x4000 | (-293 + 8191)).to_bytes(2, "big")
    assert _unlace(ebml + b"".join(frames), 3) == frames
    with pytest.raises(StreamFormatError):
        _unlace(bytes([2]) + b"x" * 11, 2)
    with pytest.raises(StreamFormatError):
        _unlace(bytes([2, 255, 255]), 1)


def test_reset_after_an_interrupt_takes_a_new_stream(speech24: np.ndarray, speech48: np.ndarray) -> None:
    """An interrupted utterance is cut mid-stream; the next one starts with its own header."""
    wav = wav_bytes(speech24[None, :24000], 24000)
    ogg = encode(speech48[None, :48000], 48000, "libopus", "ogg", {"page_duration": "20000"})
    for fmt, data, n in ((start("wav"), wav, 24000), (start("opus"), ogg, 48000)):
        decoder = make_decoder(fmt)
        decoder.feed(data[: len(data) // 2 + 3])
        decoder.reset()
        out = [c for piece in chunks_of(data, seed=14) for c in decoder.feed(piece)] + decoder.finish()
        assert concat(out, 1).shape == (1, n), fmt


def test_ogg_new_stream_without_eos_starts_a_new_chain_link(speech48: np.ndarray) -> None:
    """A producer that cancels an utterance without closing its Ogg stream: the next OpusHead wins."""
    ogg = encode(speech48[None, :48000], 48000, "libopus", "ogg", {"page_duration": "20000"})
    last_page = ogg.rfind(b"OggS")
    cut = ogg[:last_page]  # no EOS page
    got, _, _ = decode(start("opus"), chunks_of(cut + ogg, seed=15))
    assert 48000 < got.shape[1] < 96000
    assert np.array_equal(got[:, -48000:], decode(start("opus"), [ogg])[0])
