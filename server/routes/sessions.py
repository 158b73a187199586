"""``/v1/sessions``: create, list, inspect, end and interrupt live sessions; ``/v1/server``."""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ConfigDict

from server.routes.deps import app_state

router = APIRouter(prefix="/v1", tags=["sessions"])


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    avatar: str | None = None
    engine: str | None = None


@router.post("/sessions", status_code=201)
async def create_session(body: SessionCreate | None = None, state=Depends(app_state)) -> dict[str, Any]:
    """A session without input yet: push audio over its WebSocket, watch it over WHEP."""
    body = body or SessionCreate()
    session = await state.require_manager().create(body.avatar, body.engine)
    return session.describe()


@router.get("/sessions")
async def list_sessions(state=Depends(app_state)) -> dict[str, list[dict[str, Any]]]:
    return {"sessions": [s.describe() for s in state.require_manager().sessions.values()]}


@router.get("/sessions/{session_id}")
async def get_session(session_id: str, state=Depends(app_state)) -> dict[str, Any]:
    return state.require_manager().get(session_id).describe()


@router.delete("/sessions/{session_id}", status_code=204)
async def delete_session(session_id: str, state=Depends(app_state)) -> Response:
    manager = state.require_manager()
    manager.get(session_id)
    await manager.end(session_id, "deleted")
    return Response(status_code=204)


@router.post("/sessions/{session_id}/interrupt")
async def interrupt_session(session_id: str, state=Depends(app_state)) -> dict[str, Any]:
    """Drop everything queued; the avatar is idle again from the next frame sent."""
    session = state.require_manager().get(session_id)
    session.live.interrupt()
    return {"interrupted": True, "media_time": round(session.live.media_time, 3)}


@router.get("/server", tags=["health"])
async def server_info(state=Depends(app_state)) -> dict[str, Any]:
    """What the process holds right now: lets operators (and tests) see that ended sessions
    released their tasks, peers and threads."""
    manager = state.require_manager()
    return {
        "sessions": len(manager.sessions),
        "draining": manager.draining,
        "tasks": len(asyncio.all_tasks()),
        "threads": threading.active_count(),
        "peers": sum(
            (1 if s.input_peer is not None else 0) + len(s.viewers) for s in manager.sessions.values()
        ),
        "subscribers": sum(s.live.subscribers for s in manager.sessions.values()),
        "peer_processes": manager.peers.describe(),
        "frame_rings": manager.peers.frame_rings,
        "event_loop_lag": state.loop_lag.describe(),
        "gc": state.gc_pauses.describe(),
        "switch_interval_ms": round(sys.getswitchinterval() * 1000, 3),
    }

