"""WebRTC signalling: the call page's JSON offer/answer, WHIP ingest and WHEP viewing (RFC 9725)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict

from pipeline.errors import LipstreamError
from server.routes.deps import app_state
from server.sessions import ServerSession, SessionManager
from server.webrtc import check_offer

router = APIRouter(prefix="/v1", tags=["webrtc"])


class UnsupportedMediaType(LipstreamError):
    http_status = 415


class CallOffer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sdp: str
    type: Literal["offer"]
    avatar: str | None = None
    engine: str | None = None


async def _connect_input(manager: SessionManager, session: ServerSession, kind: str, sdp: str, send_back: bool) -> str:
    """Negotiates the session's input peer: its microphone in and, for calls, the avatar out."""
    peer, answer_sdp = await manager.open_peer(session, sdp, send_media=send_back, microphone=True)
    session.input_kind, session.input_peer = kind, peer
    return answer_sdp


@router.post("/calls")
async def call(offer: CallOffer, state=Depends(app_state)) -> dict[str, Any]:
    """The call page: the browser's microphone in, the avatar's video and voice back, one peer."""
    manager = state.require_manager()
    sdp = check_offer(offer.sdp, manager.settings.webrtc)
    session = await manager.create(offer.avatar, offer.engine)
    try:
        answer_sdp = await _connect_input(manager, session, "call", sdp, send_back=True)
    except BaseException:
        await manager.end(session.id, "negotiation failed")
        raise
    return {"sdp": answer_sdp, "type": "answer", "session_id": session.id}


async def _sdp_body(request: Request) -> str:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/sdp":
        raise UnsupportedMediaType(f"expected Content-Type application/sdp, got {content_type or 'none'!r}")
    try:
        return (await request.body()).decode("utf-8")
    except UnicodeDecodeError:
        raise LipstreamError("SDP body is not UTF-8 text") from None


def _sdp_created(sdp: str, location: str) -> Response:
    return Response(sdp, status_code=201, media_type="application/sdp", headers={"Location": location})


@router.post("/whip", status_code=201, response_class=Response)
async def whip(request: Request, avatar: str | None = None, state=Depends(app_state)) -> Response:
    """WHIP ingest: a sender's audio drives a new session; watch it over WHEP."""
    manager = state.require_manager()
    sdp = check_offer(await _sdp_body(request), manager.settings.webrtc)
    session = await manager.create(avatar)
    try:
        answer_sdp = await _connect_input(manager, session, "whip", sdp, send_back=False)
    except BaseException:
        await manager.end(session.id, "negotiation failed")
        raise
    return _sdp_created(answer_sdp, f"/v1/whip/{session.id}")


@router.delete("/whip/{session_id}", status_code=200)
async def whip_end(session_id: str, state=Depends(app_state)) -> Response:
    manager = state.require_manager()
    manager.get(session_id)
    await manager.end(session_id, "WHIP sender ended")
    return Response(status_code=200)


@router.post("/sessions/{session_id}/whep", status_code=201, response_class=Response)
async def whep(session_id: str, request: Request, state=Depends(app_state)) -> Response:
    """WHEP: watch a session; several viewers per session, each with its own peer."""
    manager = state.require_manager()
    session = manager.get(session_id)
    sdp = check_offer(await _sdp_body(request), manager.settings.webrtc)
    viewer = await manager.add_viewer(session, sdp)
    return _sdp_created(viewer.answer, f"/v1/sessions/{session_id}/whep/{viewer.id}")


@router.delete("/sessions/{session_id}/whep/{viewer_id}", status_code=200)
async def whep_end(session_id: str, viewer_id: str, state=Depends(app_state)) -> Response:
    manager = state.require_manager()
    await manager.remove_viewer(manager.get(session_id), viewer_id)
    return Response(status_code=200)
