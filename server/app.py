"""The FastAPI application: avatars, health, the page. Sessions and WebRTC build on this.

Start-up work (preparing the demo avatar on first use, loading the engine) runs in the app's
lifespan, off the event loop, so ``/healthz`` answers at once and ``/readyz`` turns ready when
the server can take work.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from pipeline.avatar.store import AvatarStore
from pipeline.engines.base import Engine
from pipeline.errors import LipstreamError
from server.config import Settings

log = logging.getLogger("lipstream.server")


def static_dir() -> Path:
    """The page's files: beside the package when installed as a wheel, else the repo's static/."""
    packaged = Path(__file__).parent / "static"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "static"


@dataclass
class AppState:
    settings: Settings
    store: AvatarStore
    engine: Engine | None = None
    ready: bool = False
    startup_error: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


async def _start(state: AppState) -> None:
    from pipeline.avatar.demo import DEMO_ID, ensure_demo_avatar
    from pipeline.engines import create_engine

    settings = state.settings
    try:
        if settings.avatars.default == DEMO_ID:
            await asyncio.to_thread(ensure_demo_avatar, state.store)
        avatar = await asyncio.to_thread(state.store.load, settings.avatars.default)
        state.engine = create_engine(settings.engine.name, device=settings.engine.device)
        await asyncio.to_thread(state.engine.load_avatar, avatar)
        state.ready = True
        log.info("ready: engine=%s avatar=%s", settings.engine.name, avatar.id)
    except LipstreamError as exc:
        state.startup_error = str(exc)
        log.error("start-up failed: %s", exc)


def create_app(settings: Settings) -> FastAPI:
    state = AppState(settings=settings, store=AvatarStore(settings.avatars.dir))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.create_task(_start(state))
        yield
        starting.cancel()
        if state.engine is not None:
            state.engine.close()

    app = FastAPI(title="lipstream", version="0.1.0", lifespan=lifespan)
    app.state.lipstream = state

    @app.exception_handler(LipstreamError)
    async def _lipstream_error(request: Request, exc: LipstreamError) -> JSONResponse:
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=exc.http_status)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        """Readiness: the engine and the default avatar are loaded."""
        if state.ready:
            return JSONResponse({"status": "ready", "engine": settings.engine.name})
        body = {"status": "starting" if state.startup_error is None else "failed"}
        if state.startup_error:
            body["detail"] = state.startup_error
        return JSONResponse(body, status_code=503)

    @app.get("/v1/avatars", tags=["avatars"])
    async def list_avatars() -> dict[str, list[dict[str, Any]]]:
        """Prepared avatars with their metadata."""
        return {"avatars": await asyncio.to_thread(state.store.list)}

    @app.get("/v1/avatars/{avatar_id}/preview.jpg", tags=["avatars"])
    async def avatar_preview(avatar_id: str) -> FileResponse:
        from pipeline.avatar.ids import validate_avatar_id

        validate_avatar_id(avatar_id)
        path = state.store.path(avatar_id) / "preview.jpg"
        if not path.is_file():
            raise HTTPException(404, f"unknown avatar '{avatar_id}'")
        return FileResponse(path, media_type="image/jpeg")

    app.mount("/", StaticFiles(directory=static_dir(), html=True), name="static")
    return app


def run_server(settings: Settings) -> None:
    import uvicorn

    logging.basicConfig(
        level=settings.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.server.host,
        port=settings.server.port,
        log_level=settings.server.log_level,
    )
