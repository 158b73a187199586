"""The FastAPI application: one asyncio loop serving the API, signalling, sockets and the page.

Start-up work (preparing the demo avatar on first use, creating an engine on every configured
device, calibrating them, starting their workers: :mod:`pipeline.live.devices`) runs in the app's
lifespan, off the event loop, so ``/healthz`` answers at once and ``/readyz`` turns ready when the
server can take sessions. Shutdown (SIGTERM) drains: new sessions are refused, every session's
peers and sockets are closed, the workers stop.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline.avatar.store import AvatarStore
from pipeline.errors import LipstreamError
from pipeline.live.device_link import DeviceLink
from pipeline.live.device_process import DeviceSpec
from pipeline.live.devices import DevicePool
from pipeline.live.gc_pauses import GcPauses
from server.auth import ApiKeyMiddleware, BodyLimitMiddleware, check_auth_config, is_loopback_host
from server.config import Settings, engine_options
from server.loop_lag import LoopLag
from server.metrics import Metrics
from server.outputs import BootSession, OutputManager, start_boot_session
from server.routes import audio_ws, devices, outputs, sessions, webrtc
from server.sessions import SessionManager
from server.webrtc import configure_host_addresses

log = logging.getLogger("lipstream.server")


def static_dir() -> Path:
    """The page's files: beside the package when installed as a wheel, else the repo's static/."""
    packaged = Path(__file__).parent / "static"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "static"


@dataclass
class AppState:
    settings: Settings
    store: AvatarStore
    metrics: Metrics = field(default_factory=Metrics)
    loop_lag: LoopLag = field(default_factory=LoopLag)
    gc_pauses: GcPauses = field(default_factory=GcPauses)
    pool: DevicePool | None = None  # the engine devices
    manager: SessionManager | None = None
    outputs: OutputManager | None = None  # RTMP outputs and recordings
    boot: BootSession | None = None  # `serve --rtmp/--session-id`: a session created at start
    ready: bool = False
    freeze_gc: bool = False  # see create_app
    startup_error: str | None = None

    def require_manager(self) -> SessionManager:
        if self.manager is None:
            raise NotReady(self.startup_error or "server is starting; try again shortly")
        return self.manager


class NotReady(LipstreamError):
    http_status = 503


async def _start(state: AppState) -> None:
    from pipeline.avatar.demo import DEMO_ID, ensure_demo_avatar
    from pipeline.engines import create_engine

    settings = state.settings
    try:
        if settings.avatars.default == DEMO_ID:
            await asyncio.to_thread(ensure_demo_avatar, state.store)
        avatar = await asyncio.to_thread(state.store.load, settings.avatars.default)
        engine = settings.engine

        def make_link(device: str) -> DeviceLink:
            return DeviceLink(
                DeviceSpec(
                    name=device,
                    engine=engine.name,
                    engine_options=engine_options(engine, device),
                    avatars_dir=settings.avatars.dir,
                    batch_size=engine.batch_size,
                    processing_seconds=settings.sessions.processing_seconds,
                    headroom=engine.capacity_headroom,
                    log_level=settings.server.log_level,
                    skip_late=engine.skip_late_frames,
                    skip_keep=engine.skip_keep_frames,
                    gather_seconds=engine.batch_gather_ms / 1000,
                    switch_interval_ms=engine.device_switch_interval_ms,
                )
            )

        state.pool = DevicePool(
            engine.devices,
            lambda device: create_engine(engine.name, **engine_options(engine, device)),
            make_link=make_link if engine.workers_in_processes() else None,
            engine_name=engine.name,
            batch_size=engine.batch_size,
            processing_seconds=settings.sessions.processing_seconds,
            capacity_sessions=engine.capacity_sessions,
            burst_capacity_sessions=engine.burst_capacity_sessions,
            headroom=engine.capacity_headroom,
            on_batch=state.metrics.on_batch,
            skip_late=engine.skip_late_frames,
            skip_keep=engine.skip_keep_frames,
            gather_seconds=engine.batch_gather_ms / 1000,
            max_burst_overload=engine.max_burst_overload_percent / 100,
        )
        state.metrics.set_device_source(state.pool.describe)
        # Off the loop: a GPU engine compiles and captures CUDA graphs at start (minutes, cold),
        # then every device is calibrated (under a second for the lite engine).
        await asyncio.to_thread(state.pool.start, avatar)
        state.manager = SessionManager(settings, state.store, state.pool, state.metrics)
        state.manager.start()
        state.outputs = OutputManager(settings, state.metrics, state.manager)
        if state.boot is not None:
            await start_boot_session(state.manager, state.outputs, state.boot)
        state.metrics.set_fps_source(state.manager.mean_fps)
        # What start-up built lives as long as the process: out of the collector's sight, a full
        # collection walks only what sessions allocate. (Start-up leaves ~93k objects; walking
        # them took 50 ms on a 2-core box, and the GIL stops every thread of the process for it.)
        if state.freeze_gc:
            state.gc_pauses.freeze_startup()
        state.ready = True
        log.info(
            "ready: engine=%s avatar=%s devices=%s",
            settings.engine.name,
            avatar.id,
            ", ".join(f"{d['name']} ({d['state']}, {d['capacity']} talking sessions)" for d in state.pool.describe()),
        )
    except LipstreamError as exc:
        state.startup_error = str(exc)
        log.error("start-up failed: %s", exc)


async def _stop(state: AppState) -> None:
    if state.manager is not None:
        await state.manager.shutdown()
    if state.outputs is not None:
        await state.outputs.drain()  # recordings finished on disk before the process exits
    if state.pool is not None:
        await asyncio.to_thread(state.pool.close)
    await state.loop_lag.stop()
    state.gc_pauses.uninstall()


def create_app(settings: Settings, boot: BootSession | None = None, freeze_gc: bool = False) -> FastAPI:
    """``freeze_gc``: once ready, move what start-up built out of the garbage collector's walks
    (for the server's own process; an app built inside a test run would pin the test's objects)."""
    check_auth_config(settings.server.host, settings.server.api_keys)
    if settings.webrtc.host_addresses:
        configure_host_addresses(settings.webrtc.host_addresses)
    state = AppState(settings=settings, store=AvatarStore(settings.avatars.dir), boot=boot, freeze_gc=freeze_gc)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.loop_lag.start()
        state.gc_pauses.install()
        state.metrics.set_loop_lag_source(lambda: state.loop_lag.quantile(0.99) or 0.0)
        starting = asyncio.create_task(_start(state))
        yield
        starting.cancel()
        await _stop(state)

    app = FastAPI(title="lipstream", version="0.1.0", lifespan=lifespan)
    app.state.lipstream = state
    public_files = {"/"} | {f"/{p.name}" for p in static_dir().iterdir() if p.is_file()}
    limits = settings.limits
    app.add_middleware(BodyLimitMiddleware, default_limit=limits.request_body_bytes)
    app.add_middleware(
        ApiKeyMiddleware,
        keys=settings.server.api_keys,
        required=not is_loopback_host(settings.server.host),
        public_files=public_files,
    )
    app.include_router(sessions.router)
    app.include_router(devices.router)
    app.include_router(webrtc.router)
    app.include_router(audio_ws.router)
    app.include_router(outputs.router)

    @app.exception_handler(LipstreamError)
    async def _lipstream_error(request: Request, exc: LipstreamError) -> JSONResponse:
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=exc.http_status)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        """Readiness: the engine and the default avatar are loaded on at least one device that
        has not failed (a load balancer stops sending sessions once none is left)."""
        unavailable = state.pool.unavailable_reason() if state.ready and state.pool is not None else None
        if state.ready and unavailable is None:
            return JSONResponse({"status": "ready", "engine": settings.engine.name})
        if unavailable is not None:
            return JSONResponse({"status": "failed", "detail": unavailable}, status_code=503)
        body = {"status": "starting" if state.startup_error is None else "failed"}
        if state.startup_error:
            body["detail"] = state.startup_error
        return JSONResponse(body, status_code=503)

    @app.get("/metrics", tags=["health"])
    async def metrics() -> Response:
        """Prometheus metrics: sessions, frames, late/dropped frames, latency, batch sizes."""
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

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


def run_server(settings: Settings, boot: BootSession | None = None) -> None:
    import uvicorn

    from pipeline.opencv_threads import use_serial_opencv
    from server.logs import configure_logging

    configure_logging(settings.server.log_level, settings.server.log_format)
    sys.setswitchinterval(settings.server.switch_interval_ms / 1000)
    use_serial_opencv()
    app = create_app(settings, boot, freeze_gc=True)

    class DrainingServer(uvicorn.Server):
        """Starts the drain on SIGTERM/SIGINT itself: uvicorn would first wait for open
        WebSockets and then kill them, so producers would never hear that their session ended."""

        def handle_exit(self, sig: int, frame: object) -> None:
            manager = app.state.lipstream.manager
            if manager is None or manager.draining:  # not started, or a second signal: exit now
                super().handle_exit(sig, frame)
                return

            async def drain_then_exit() -> None:
                try:
                    await asyncio.wait_for(manager.shutdown(), timeout=10)
                finally:
                    super(DrainingServer, self).handle_exit(sig, frame)

            asyncio.get_event_loop().call_soon_threadsafe(lambda: asyncio.ensure_future(drain_then_exit()))

    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_level=settings.server.log_level,
        log_config=None,  # keep our formatter for uvicorn's own lines too
        # Oversized messages up to twice the limit reach our handler, which answers with a
        # readable error; beyond that uvicorn closes with 1009 before buffering them.
        ws_max_size=2 * settings.limits.ws_message_bytes,
        ws_per_message_deflate=settings.server.ws_compression,
        timeout_graceful_shutdown=5,
    )
    DrainingServer(config).run()
