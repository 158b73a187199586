"""``/v1/sessions/{id}/audio``: audio pushed by a TTS system or any producer (docs/protocol.md).

The socket stays a thin adapter: the stream decoders turn bytes into samples, the live session
does the timing. Errors a producer can recover from (a full buffer, an unknown message) are
reported and the socket stays open; a broken stream (bad start, undecodable audio, an
oversized message) is reported and the socket is closed with a matching close code.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from typing import Any

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from pipeline.audio.stream_decode import CLOSE_CODES, StreamFormatError, make_decoder, parse_start
from pipeline.errors import LipstreamError
from pipeline.live.session import BufferFull
from server.sessions import ServerSession, SessionNotFound

log = logging.getLogger("lipstream.audio_ws")
router = APIRouter()

MESSAGE_TOO_LARGE = 1009


class _Close(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class AudioSocket:
    """One producer connection: decoding state and the event pump back to it."""

    def __init__(self, ws: WebSocket, session: ServerSession, max_bytes: int) -> None:
        self.ws = ws
        self.session = session
        self.max_bytes = max_bytes
        self.decoder: Any = None
        self.live = False  # the start message's "live": audio relayed as it is captured
        self.events: asyncio.Queue = asyncio.Queue(256)

    async def send(self, message: dict[str, Any]) -> None:
        if self.ws.client_state == WebSocketState.CONNECTED:
            await self.ws.send_text(json.dumps(message))

    async def error(self, code: str, message: str) -> None:
        await self.send({"type": "error", "code": code, "message": message})

    async def pump_events(self) -> None:
        while True:
            event = await self.events.get()
            if event is None:  # the session ended
                await self.ws.close(code=1000, reason="session ended")
                return
            await self.send(event)

    async def handle(self, message: dict[str, Any]) -> None:
        if message.get("bytes") is not None:
            data = message["bytes"]
            self._check_size(len(data))
            await self.audio(data)
        elif message.get("text") is not None:
            self._check_size(len(message["text"]))
            await self.control(message["text"])

    def _check_size(self, size: int) -> None:
        if size > self.max_bytes:
            raise _Close("message_too_large", f"message of {size} bytes is over the {self.max_bytes}-byte limit")

    async def control(self, text: str) -> None:
        try:
            message = json.loads(text)
        except json.JSONDecodeError:
            await self.error("bad_message", "text messages must be JSON objects")
            return
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "start":
            try:
                fmt = parse_start(message)
                self.decoder = make_decoder(fmt)
                self.live = fmt.live
            except StreamFormatError as exc:
                raise _Close(exc.code, str(exc)) from None
            await self.send({"type": "ready", "session_id": self.session.id, "format": fmt.to_dict()})
        elif kind == "audio":
            try:
                data = base64.b64decode(message.get("data", ""), validate=True)
            except (binascii.Error, TypeError, ValueError):
                await self.error("bad_message", "'data' must be base64-encoded audio bytes")
                return
            await self.audio(data)
        elif kind == "end":
            if self.decoder is not None:
                self._push(self.decoder.finish())  # also readies it for the next utterance's stream
            self.session.live.end_of_input()
        elif kind == "interrupt":
            if self.decoder is not None:
                self.decoder.reset()  # the next utterance starts a fresh stream (WAV/Ogg header)
            self.session.live.interrupt()
            await self.send({"type": "interrupted", "media_time": round(self.session.live.media_time, 3)})
        elif kind == "ping":
            await self.send({"type": "pong"})
        else:
            await self.error("bad_message", f"unknown message type {kind!r}; expected start, audio, end, interrupt or ping")

    async def audio(self, data: bytes) -> None:
        if self.decoder is None:
            await self.error("not_started", "send a start message before audio")
            return
        # Refuse before decoding: a compressed stream's bytes cannot be un-fed, so a refused
        # message must leave the decoder untouched for the producer to resend it.
        try:
            self.session.live.check_room()
        except BufferFull as exc:
            await self.error("buffer_full", str(exc))
            return
        try:
            chunks = self.decoder.feed(data)
        except StreamFormatError as exc:
            raise _Close(exc.code, str(exc)) from None
        self._push(chunks)

    def _push(self, chunks: list[Any]) -> None:
        for chunk in chunks:
            self.session.live.push(chunk.planar, chunk.sample_rate, chunk.layout, enforce_limit=False, live=self.live)


@router.websocket("/v1/sessions/{session_id}/audio")
async def audio_socket(ws: WebSocket, session_id: str) -> None:
    state = ws.app.state.lipstream
    await ws.accept()
    try:
        session = state.require_manager().get(session_id)
    except (SessionNotFound, LipstreamError) as exc:
        await ws.send_text(json.dumps({"type": "error", "code": "unknown_session", "message": str(exc)}))
        await ws.close(code=4404, reason="unknown session")
        return
    conn = AudioSocket(ws, session, state.settings.limits.ws_message_bytes)
    session.websockets += 1
    session.input_kind = session.input_kind or "websocket"
    session.listeners.add(conn.events)
    pump = asyncio.get_running_loop().create_task(conn.pump_events())
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            await conn.handle(message)
    except _Close as exc:
        await conn.error(exc.code, str(exc))
        await ws.close(code=CLOSE_CODES.get(exc.code, MESSAGE_TOO_LARGE), reason=exc.code)
    except WebSocketDisconnect:
        pass
    finally:
        session.listeners.discard(conn.events)
        session.websockets -= 1
        pump.cancel()
