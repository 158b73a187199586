"""``/v1/sessions/{id}/outputs``: RTMP streams and MP4 recordings of a session (server/outputs.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict

from server.outputs import OutputManager
from server.routes.deps import app_state
from server.sessions import ServerSession

router = APIRouter(prefix="/v1/sessions/{session_id}/outputs", tags=["outputs"])


class RtmpCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str


def _outputs(state: Any, session_id: str) -> tuple[OutputManager, ServerSession]:
    session = state.require_manager().get(session_id)
    assert state.outputs is not None  # set together with the session manager
    return state.outputs, session


@router.get("")
async def list_outputs(session_id: str, state=Depends(app_state)) -> dict[str, list[dict[str, Any]]]:
    """Every output of the session with its state (connecting, live, retrying, recording,
    failed, stopped), bytes, frames, dropped frames, reconnects and last error."""
    manager, session = _outputs(state, session_id)
    return {"outputs": manager.of(session).describe()}


@router.post("/rtmp", status_code=201)
async def add_rtmp(session_id: str, body: RtmpCreate, state=Depends(app_state)) -> dict[str, Any]:
    """Stream the session to an RTMP(S) URL (``rtmp://host[:port]/app/stream-key``): H.264 + AAC
    in FLV, reconnecting on its own; several URLs per session share one encode."""
    manager, session = _outputs(state, session_id)
    return manager.of(session).add_rtmp(body.url).describe()


@router.delete("/rtmp/{output_id}")
async def remove_rtmp(session_id: str, output_id: str, state=Depends(app_state)) -> dict[str, Any]:
    """Stop streaming to that URL; answers the output's final figures."""
    manager, session = _outputs(state, session_id)
    return (await manager.of(session).remove("rtmp", output_id)).describe()


@router.post("/record", status_code=201)
async def add_recording(session_id: str, state=Depends(app_state)) -> dict[str, Any]:
    """Record the session from now on into an MP4 (H.264 + AAC) under ``recordings.dir``."""
    manager, session = _outputs(state, session_id)
    return manager.of(session).add_recording().describe()


@router.delete("/record/{output_id}")
async def finish_recording(session_id: str, output_id: str, state=Depends(app_state)) -> dict[str, Any]:
    """Stop recording and finish the file; it can be downloaded once this answers."""
    manager, session = _outputs(state, session_id)
    return (await manager.of(session).remove("record", output_id)).describe()


@router.get("/record/{output_id}", response_class=FileResponse)
async def download_recording(session_id: str, output_id: str, state=Depends(app_state)) -> FileResponse:
    """The finished MP4 (also after its session ended); 409 while it is still being recorded."""
    state.require_manager()
    assert state.outputs is not None
    path = state.outputs.recording_file(session_id, output_id)
    return FileResponse(path, media_type="video/mp4", filename=f"{session_id}-{output_id}.mp4")
