"""``/v1/devices``: every engine device, its state, capacity, calibration and load.

Operators read it to see why a session was refused (503 "at capacity") or ended ("device ...
failed"), and how close each device is to its capacity; docs/protocol.md describes the fields.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from server.routes.deps import app_state

router = APIRouter(prefix="/v1", tags=["devices"])


@router.get("/devices")
async def devices(state=Depends(app_state)) -> dict[str, list[dict[str, Any]]]:  # the routes' pattern
    """Per device: engine, state (ready/failed) and error, capacity in talking sessions and whether
    calibrated or configured, the calibration table, sessions bound, current demand (talking
    sessions and frames/s), avatars resident, queued frames, batches, frames, busy time and
    utilisation over the last 10 s."""
    manager = state.require_manager()  # 503 while starting
    return {"devices": manager.pool.describe()}
