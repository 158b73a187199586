"""RTMP publishing: URL checks, and a small client that sends an FLV byte stream to a server.

Why not FFmpeg's own ``rtmp://`` protocol through PyAV: PyAV opens an output URL with
``avio_open`` while holding the GIL and without any options, so ``rw_timeout``/``timeout`` never
reach the protocol and a server that accepts the TCP connection but never answers freezes the
whole Python process (every thread and the event loop), not just the output. Here PyAV still
muxes the FLV (H.264 + AAC, sequence headers, onMetaData); this client only carries its tags to
the server over a socket with real timeouts that another thread can also abort at any time.

The protocol part is the publishing subset every ingest server speaks (nginx-rtmp, SRS,
YouTube, Twitch, ...): the plain handshake, ``connect``, ``releaseStream``, ``FCPublish``,
``createStream``, ``publish(key, "live")``, then one audio/video/data message per FLV tag.
Server pings are answered and acknowledgements sent, so long sessions are not dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import socket
import ssl
import struct
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from pipeline.errors import InputError, LipstreamError

DEFAULT_PORTS = {"rtmp": 1935, "rtmps": 443}
OUT_CHUNK_SIZE = 4096
HANDSHAKE_SIZE = 1536

# Message types
SET_CHUNK_SIZE, ABORT, ACK, USER_CONTROL, WINDOW_ACK_SIZE, SET_PEER_BANDWIDTH = 1, 2, 3, 4, 5, 6
AUDIO, VIDEO, DATA_AMF0, COMMAND_AMF0 = 8, 9, 18, 20
# Chunk stream ids, as FFmpeg uses them
CS_CONTROL, CS_COMMAND, CS_AUDIO, CS_VIDEO, CS_STREAM = 2, 3, 4, 6, 8


class BadRtmpUrl(InputError):
    """The URL cannot be an RTMP publishing point (HTTP 400)."""


class RtmpError(LipstreamError):
    """Connecting or streaming failed; ``retry`` says whether trying again may help."""

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True)
class RtmpUrl:
    scheme: str  # rtmp | rtmps
    host: str
    port: int
    app: str
    key: str  # stream key (play path), with its query string if any

    @property
    def tc_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/{self.app}"

    @property
    def redacted(self) -> str:
        """The URL with the stream key hidden (keys are credentials: never logged or listed)."""
        hint = self.key[:3] + "***" if len(self.key) > 8 else "***"
        return f"{self.tc_url}/{hint}"


def parse_rtmp_url(url: Any) -> RtmpUrl:
    """``rtmp[s]://host[:port]/app[/more]/key``; BadRtmpUrl saying what is wrong otherwise."""
    if not isinstance(url, str) or not url.strip():
        raise BadRtmpUrl("the RTMP URL is empty")
    if len(url) > 2048 or any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise BadRtmpUrl("the RTMP URL must be one line without spaces or control characters, at most 2048 characters")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BadRtmpUrl(f"malformed RTMP URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise BadRtmpUrl(f"unsupported URL scheme {parts.scheme or '(none)'!r}: use rtmp:// or rtmps://")
    if not parts.hostname:
        raise BadRtmpUrl("the RTMP URL has no host: use rtmp://host[:port]/app/stream-key")
    if parts.username or parts.password:
        raise BadRtmpUrl("credentials in the RTMP URL's host part are not supported; put them in the stream key")
    path = parts.path.strip("/")
    if "/" not in path:
        raise BadRtmpUrl("the RTMP URL needs an application and a stream key: rtmp://host[:port]/app/stream-key")
    app, key = path.rsplit("/", 1)
    if not app or not key:
        raise BadRtmpUrl("the RTMP URL needs an application and a stream key: rtmp://host[:port]/app/stream-key")
    if parts.query:
        key = f"{key}?{parts.query}"
    return RtmpUrl(scheme, parts.hostname, port or DEFAULT_PORTS[scheme], app, key)


# ---------------------------------------------------------------------------------- AMF0
class _Undefined:
    pass


def amf0_encode(*values: Any) -> bytes:
    out = bytearray()
    for value in values:
        _amf0_value(out, value)
    return bytes(out)


def _amf0_string_body(out: bytearray, text: str) -> None:
    data = text.encode("utf-8")
    out += struct.pack(">H", len(data)) + data


def _amf0_value(out: bytearray, value: Any) -> None:
    if value is None:
        out.append(0x05)
    elif isinstance(value, bool):
        out += bytes([0x01, 1 if value else 0])
    elif isinstance(value, (int, float)):
        out.append(0x00)
        out += struct.pack(">d", float(value))
    elif isinstance(value, str):
        data = value.encode("utf-8")
        if len(data) < 0x10000:
            out.append(0x02)
            out += struct.pack(">H", len(data)) + data
        else:
            out.append(0x0C)
            out += struct.pack(">I", len(data)) + data
    elif isinstance(value, dict):
        out.append(0x03)
        for key, item in value.items():
            _amf0_string_body(out, key)
            _amf0_value(out, item)
        out += b"\x00\x00\x09"
    elif isinstance(value, (list, tuple)):
        out.append(0x0A)
        out += struct.pack(">I", len(value))
        for item in value:
            _amf0_value(out, item)
    else:
        raise TypeError(f"cannot AMF0-encode {type(value).__name__}")


def amf0_decode(data: bytes) -> list[Any]:
    """Every value in ``data`` (commands are a sequence of values)."""
    values, pos = [], 0
    while pos < len(data):
        value, pos = _amf0_read(data, pos)
        values.append(value)
    return values


def _amf0_read(data: bytes, pos: int) -> tuple[Any, int]:
    marker = data[pos]
    pos += 1
    if marker == 0x00:
        return struct.unpack_from(">d", data, pos)[0], pos + 8
    if marker == 0x01:
        return bool(data[pos]), pos + 1
    if marker == 0x02:
        (n,) = struct.unpack_from(">H", data, pos)
        return data[pos + 2 : pos + 2 + n].decode("utf-8", "replace"), pos + 2 + n
    if marker == 0x0C:
        (n,) = struct.unpack_from(">I", data, pos)
        return data[pos + 4 : pos + 4 + n].decode("utf-8", "replace"), pos + 4 + n
    if marker in (0x03, 0x08):
        if marker == 0x08:
            pos += 4  # ECMA array: approximate count, then key/value pairs like an object
        obj: dict[str, Any] = {}
        while pos + 3 <= len(data):
            (n,) = struct.unpack_from(">H", data, pos)
            if n == 0 and data[pos + 2] == 0x09:
                return obj, pos + 3
            key = data[pos + 2 : pos + 2 + n].decode("utf-8", "replace")
            obj[key], pos = _amf0_read(data, pos + 2 + n)
        return obj, len(data)
    if marker == 0x0A:
        (n,) = struct.unpack_from(">I", data, pos)
        pos += 4
        items = []
        for _ in range(n):
            item, pos = _amf0_read(data, pos)
            items.append(item)
        return items, pos
    if marker == 0x0B:
        return struct.unpack_from(">d", data, pos)[0], pos + 10  # date: ms + time zone
    if marker in (0x05, 0x06):
        return (None if marker == 0x05 else _Undefined()), pos
    raise ValueError(f"unsupported AMF0 marker 0x{marker:02x}")


# ---------------------------------------------------------------------------------- FLV tags
class FlvTagReader:
    """Splits an FLV byte stream (as a muxer writes it, in pieces) into (type, timestamp ms, body)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header_done = False

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        self._buf += data
        tags = []
        if not self._header_done:
            if len(self._buf) < 9:
                return tags
            if self._buf[:3] != b"FLV":
                raise ValueError("not an FLV stream")
            skip = struct.unpack_from(">I", self._buf, 5)[0] + 4  # header, then PreviousTagSize0
            if len(self._buf) < skip:
                return tags
            del self._buf[:skip]
            self._header_done = True
        pos = 0
        while len(self._buf) - pos >= 11:
            kind = self._buf[pos] & 0x1F
            size = int.from_bytes(self._buf[pos + 1 : pos + 4], "big")
            if len(self._buf) - pos < 11 + size + 4:
                break
            stamp = int.from_bytes(self._buf[pos + 4 : pos + 7], "big") | (self._buf[pos + 7] << 24)
            tags.append((kind, stamp, bytes(self._buf[pos + 11 : pos + 11 + size])))
            pos += 11 + size + 4
        del self._buf[:pos]
        return tags


# ---------------------------------------------------------------------------------- the client
@dataclass
class _InChunkStream:
    timestamp: int = 0
    delta: int = 0
    length: int = 0
    type_id: int = 0
    stream_id: int = 0
    extended: bool = False
    payload: bytearray | None = None


class RtmpPublisher:
    """One publishing connection. Not thread-safe, except :meth:`abort` (any thread)."""

    def __init__(self, url: RtmpUrl, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = timeout
        self.bytes_sent = 0
        self.bytes_received = 0
        self._sock: socket.socket | None = None
        self._aborted = False
        self._inbuf = bytearray()
        self._in_chunk_size = 128
        self._in_streams: dict[int, _InChunkStream] = {}
        self._messages: list[tuple[int, int, bytes]] = []  # (type, stream id, payload)
        self._window = 0
        self._acked = 0
        self._stream_id = 0
        self._tags = FlvTagReader()
        self._txn = 1

    # ---- connection ----------------------------------------------------------------------
    def connect(self) -> None:
        """Handshake, connect, createStream, publish; RtmpError on any failure or timeout."""
        deadline = time.monotonic() + self.timeout
        where = f"{self.url.host}:{self.url.port}"
        try:
            sock = socket.create_connection((self.url.host, self.url.port), timeout=self.timeout)
        except ConnectionRefusedError:
            raise RtmpError(f"connection refused by {where}") from None
        except TimeoutError:
            raise RtmpError(f"timed out connecting to {where} after {self.timeout:g} s") from None
        except OSError as exc:
            raise RtmpError(f"cannot connect to {where}: {exc.strerror or exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        if self._aborted:
            self._close_socket()
            raise RtmpError("stopped", retry=False)
        try:
            if self.url.scheme == "rtmps":
                context = ssl.create_default_context()
                self._sock = context.wrap_socket(sock, server_hostname=self.url.host)
            self._handshake(deadline)
            self._send(CS_CONTROL, SET_CHUNK_SIZE, 0, 0, struct.pack(">I", OUT_CHUNK_SIZE))
            self._command(
                "connect",
                {
                    "app": self.url.app,
                    "type": "nonprivate",
                    "flashVer": "FMLE/3.0 (compatible; lipstream)",
                    "tcUrl": self.url.tc_url,
                },
            )
            self._expect_result(1, "connect", deadline)
            self._command("releaseStream", None, self.url.key)
            self._command("FCPublish", None, self.url.key)
            self._command("createStream", None)
            result = self._expect_result(4, "createStream", deadline)
            self._stream_id = int(result[3]) if len(result) > 3 and isinstance(result[3], float) else 1
            self._send(
                CS_STREAM, COMMAND_AMF0, self._stream_id, 0, amf0_encode("publish", 0, None, self.url.key, "live")
            )
            self._expect_status("NetStream.Publish.Start", "publish", deadline)
        except ssl.SSLError as exc:
            self._close_socket()
            raise RtmpError(f"TLS with {where} failed: {exc.reason or exc}") from None
        except (OSError, RtmpError) as exc:
            self._close_socket()
            if isinstance(exc, RtmpError):
                raise
            raise self._io_error(exc, "connecting") from None

    def _handshake(self, deadline: float) -> None:
        c1 = struct.pack(">II", 0, 0) + os.urandom(HANDSHAKE_SIZE - 8)
        self._sendall(b"\x03" + c1)
        s0s1 = self._recv_exact(1 + HANDSHAKE_SIZE, deadline, "handshake")
        if s0s1[0] != 3:
            raise RtmpError(f"not an RTMP server (handshake version {s0s1[0]})")
        self._sendall(s0s1[1:])  # C2 echoes S1
        self._recv_exact(HANDSHAKE_SIZE, deadline, "handshake")  # S2

    def _command(self, name: str, *args: Any) -> None:
        self._send(CS_COMMAND, COMMAND_AMF0, 0, 0, amf0_encode(name, self._txn, *args))
        self._txn += 1

    def _expect_result(self, txn: int, what: str, deadline: float) -> list[Any]:
        while True:
            for type_id, _, payload in self._drain_messages(deadline, what):
                if type_id != COMMAND_AMF0:
                    continue
                values = amf0_decode(payload)
                if len(values) >= 2 and values[1] == txn and values[0] in ("_result", "_error"):
                    if values[0] == "_error":
                        raise RtmpError(f"{what} refused by the server: {_describe_status(values)}", retry=True)
                    return values
                self._check_status(values, what)

    def _expect_status(self, code: str, what: str, deadline: float) -> None:
        while True:
            for type_id, _, payload in self._drain_messages(deadline, what):
                if type_id != COMMAND_AMF0:
                    continue
                values = amf0_decode(payload)
                info = values[3] if len(values) > 3 and isinstance(values[3], dict) else {}
                if values and values[0] == "onStatus" and info.get("code") == code:
                    return
                self._check_status(values, what)

    @staticmethod
    def _check_status(values: list[Any], what: str) -> None:
        if values and values[0] in ("onStatus", "_error"):
            info = values[3] if len(values) > 3 and isinstance(values[3], dict) else {}
            if info.get("level") == "error" or values[0] == "_error":
                raise RtmpError(f"{what} refused by the server: {_describe_status(values)}")

    def _drain_messages(self, deadline: float, what: str) -> list[tuple[int, int, bytes]]:
        """Blocks until at least one message arrived (or the deadline), returns them all."""
        while not self._messages:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RtmpError(f"timed out waiting for the server's answer to {what} after {self.timeout:g} s")
            self._read_some(remaining, what)
        messages, self._messages = self._messages, []
        return messages

    # ---- streaming -----------------------------------------------------------------------
    def send_flv(self, data: bytes) -> None:
        """Sends the complete FLV tags in ``data`` (pieces of one FLV stream, header first)."""
        for kind, stamp, body in self._tags.feed(data):
            if kind == AUDIO:
                self._send(CS_AUDIO, AUDIO, self._stream_id, stamp, body)
            elif kind == VIDEO:
                self._send(CS_VIDEO, VIDEO, self._stream_id, stamp, body)
            elif kind == DATA_AMF0:
                if body[:13] == b"\x02\x00\x0aonMetaData":
                    body = amf0_encode("@setDataFrame") + body
                self._send(CS_STREAM, DATA_AMF0, self._stream_id, stamp, body)
        self.poll()

    def poll(self) -> None:
        """Handles whatever the server sent (pings, acknowledgement windows, errors); never blocks."""
        if self._sock is None:
            raise RtmpError("not connected")
        self._read_some(0.0, "streaming")
        messages, self._messages = self._messages, []
        for type_id, _, payload in messages:
            if type_id == COMMAND_AMF0:
                self._check_status(amf0_decode(payload), "the stream")

    def close(self) -> None:
        """Ends the stream politely (FCUnpublish, deleteStream), then closes the socket."""
        if self._sock is not None and not self._aborted:
            with contextlib.suppress(OSError, RtmpError):
                self._sock.settimeout(min(self.timeout, 1.0))
                self._command("FCUnpublish", None, self.url.key)
                self._command("deleteStream", None, float(self._stream_id))
        self._close_socket()

    def abort(self) -> None:
        """From any thread: breaks off a connect, read or write in progress."""
        self._aborted = True
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    # ---- chunk layer ---------------------------------------------------------------------
    def _send(self, csid: int, type_id: int, stream_id: int, timestamp: int, payload: bytes) -> None:
        timestamp &= 0xFFFFFFFF
        extended = timestamp >= 0xFFFFFF
        header = bytes([csid]) + struct.pack(
            ">I", min(timestamp, 0xFFFFFF)
        )[1:] + struct.pack(">I", len(payload))[1:] + bytes([type_id]) + struct.pack("<I", stream_id)
        ext = struct.pack(">I", timestamp) if extended else b""
        out = bytearray(header + ext)
        out += payload[:OUT_CHUNK_SIZE]
        for start in range(OUT_CHUNK_SIZE, len(payload), OUT_CHUNK_SIZE):
            out.append(0xC0 | csid)
            out += ext
            out += payload[start : start + OUT_CHUNK_SIZE]
        self._sendall(bytes(out))

    def _sendall(self, data: bytes) -> None:
        if self._sock is None or self._aborted:
            raise RtmpError("stopped", retry=False)
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise self._io_error(exc, "sending") from None
        self.bytes_sent += len(data)

    def _io_error(self, exc: OSError, doing: str) -> RtmpError:
        if self._aborted:
            return RtmpError("stopped", retry=False)
        if isinstance(exc, TimeoutError):
            return RtmpError(f"timed out {doing} (no progress for {self.timeout:g} s)")
        if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
            return RtmpError(f"the server closed the connection while {doing}")
        return RtmpError(f"network error while {doing}: {exc.strerror or exc}")

    def _recv_exact(self, n: int, deadline: float, what: str) -> bytes:
        while len(self._inbuf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RtmpError(f"timed out during the {what} after {self.timeout:g} s")
            self._recv_into_buffer(remaining, what)
        data = bytes(self._inbuf[:n])
        del self._inbuf[:n]
        return data

    def _recv_into_buffer(self, wait: float, what: str) -> bool:
        sock = self._sock
        if sock is None or self._aborted:
            raise RtmpError("stopped", retry=False)
        pending = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
        if not pending:
            try:
                readable, _, _ = select.select([sock], [], [], max(0.0, wait))
            except (OSError, ValueError):
                raise RtmpError("stopped" if self._aborted else "socket closed", retry=not self._aborted) from None
            if not readable:
                return False
        try:
            sock.settimeout(self.timeout)
            data = sock.recv(65536)
        except ssl.SSLWantReadError:
            return False
        except OSError as exc:
            raise self._io_error(exc, f"reading ({what})") from None
        if not data:
            if self._aborted:
                raise RtmpError("stopped", retry=False)
            raise RtmpError(f"the server closed the connection during {what}")
        self._inbuf += data
        self.bytes_received += len(data)
        if self._window and self.bytes_received - self._acked >= self._window:
            self._acked = self.bytes_received
            self._send(CS_CONTROL, ACK, 0, 0, struct.pack(">I", self.bytes_received & 0xFFFFFFFF))
        return True

    def _read_some(self, wait: float, what: str) -> None:
        """Reads what is there (waiting up to ``wait`` for the first bytes) and parses chunks."""
        got = self._recv_into_buffer(wait, what)
        for _ in range(64):  # bounded: a chatty server cannot keep the sender from sending
            if not got:
                break
            self._parse_chunks()
            got = self._recv_into_buffer(0.0, what)
        self._parse_chunks()

    def _parse_chunks(self) -> None:
        while True:
            consumed = self._parse_one(memoryview(self._inbuf))
            if not consumed:
                return
            del self._inbuf[:consumed]

    def _parse_one(self, buf: memoryview) -> int:
        """Parses one chunk at the start of ``buf``; 0 when it is not complete yet."""
        if not buf:
            return 0
        fmt, csid, pos = buf[0] >> 6, buf[0] & 0x3F, 1
        if csid == 0:
            if len(buf) < 2:
                return 0
            csid, pos = 64 + buf[1], 2
        elif csid == 1:
            if len(buf) < 3:
                return 0
            csid, pos = 64 + buf[1] + 256 * buf[2], 3
        state = self._in_streams.get(csid) or _InChunkStream()
        header_len = (11, 7, 3, 0)[fmt]
        if len(buf) < pos + header_len:
            return 0
        new = dataclasses.replace(state)
        stamp = 0
        if fmt <= 2:
            stamp = int.from_bytes(buf[pos : pos + 3], "big")
            new.extended = stamp == 0xFFFFFF
            if fmt <= 1:
                new.length = int.from_bytes(buf[pos + 3 : pos + 6], "big")
                new.type_id = buf[pos + 6]
            if fmt == 0:
                new.stream_id = int.from_bytes(buf[pos + 7 : pos + 11], "little")
        pos += header_len
        if new.extended:
            if len(buf) < pos + 4:
                return 0
            stamp = int.from_bytes(buf[pos : pos + 4], "big")
            pos += 4
        starting = new.payload is None
        if starting:
            if fmt == 0:
                new.timestamp = stamp
            elif fmt in (1, 2):
                new.delta = stamp
                new.timestamp += stamp
            else:
                new.timestamp += new.delta
            new.payload = bytearray()
        size = min(self._in_chunk_size, new.length - len(new.payload))
        if len(buf) < pos + size:
            return 0
        new.payload += buf[pos : pos + size]
        pos += size
        if len(new.payload) >= new.length:
            self._on_message(new.type_id, new.stream_id, bytes(new.payload))
            new.payload = None
        self._in_streams[csid] = new
        return pos

    def _on_message(self, type_id: int, stream_id: int, payload: bytes) -> None:
        if type_id == SET_CHUNK_SIZE and len(payload) >= 4:
            self._in_chunk_size = max(1, struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF)
        elif type_id == WINDOW_ACK_SIZE and len(payload) >= 4:
            self._window = struct.unpack(">I", payload[:4])[0]
        elif type_id == SET_PEER_BANDWIDTH and len(payload) >= 4:
            window = struct.unpack(">I", payload[:4])[0]
            self._send(CS_CONTROL, WINDOW_ACK_SIZE, 0, 0, struct.pack(">I", window))
        elif type_id == USER_CONTROL and len(payload) >= 6:
            event = struct.unpack(">H", payload[:2])[0]
            if event == 6:  # ping request -> ping response with the same timestamp
                self._send(CS_CONTROL, USER_CONTROL, 0, 0, struct.pack(">H", 7) + payload[2:6])
        elif type_id in (COMMAND_AMF0, DATA_AMF0):
            self._messages.append((type_id, stream_id, payload))


def _describe_status(values: list[Any]) -> str:
    info = next((v for v in values[2:] if isinstance(v, dict)), {})
    code = info.get("code") or "error"
    text = info.get("description")
    return f"{code}: {text}" if text else str(code)
