"""A real lipstream server in a subprocess, configured for loopback-only WebRTC; or in this
process (:func:`in_process_server`), for tests that reach into its state."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent


class ServerUrl(str):
    """The server's base URL, carrying its process (for tests that signal it)."""

    process: subprocess.Popen


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(
    url: str, process: subprocess.Popen, log: Path, timeout: float = 60.0, poll: float = 0.1
) -> None:
    """Returns once ``url``'s /readyz answers 200; raises with the log's tail if the server
    exits first or is not ready within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited (code {process.returncode}):\n{_tail(log)}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server was not ready within {timeout:.0f} s:\n{_tail(log)}")
        time.sleep(poll)


def _tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@contextmanager
def running_server(avatars: Path, tmp: Path, overrides: dict[str, Any] | None = None) -> Iterator[ServerUrl]:
    """Starts ``lipstream serve`` and yields its base URL once /readyz says ready."""
    port = free_port()
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
        "avatars": {"dir": str(avatars)},
        "webrtc": {"host_addresses": ["127.0.0.1"]},
    }
    for section, values in (overrides or {}).items():
        config.setdefault(section, {}).update(values)
    path = tmp / f"server-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSTREAM_")}
    log = open(tmp / f"server-{port}.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "--config", str(path), "serve"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = ServerUrl(f"http://127.0.0.1:{port}")
    url.process = process
    try:
        wait_until_ready(url, process, tmp / f"server-{port}.log")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def ws_url(url: str, session_id: str) -> str:
    """The audio WebSocket of a session on the server at ``url``."""
    return url.replace("http://", "ws://") + f"/v1/sessions/{session_id}/audio"


async def push_realtime(ws, pcm: bytes, bytes_per_second: int, chunk_seconds: float = 0.02) -> None:  # noqa: ANN001
    """Sends 16-bit PCM in ``chunk_seconds`` messages paced in real time, as a live TTS would."""
    chunk = int(bytes_per_second * chunk_seconds) // 2 * 2
    start = time.monotonic()
    for n, offset in enumerate(range(0, len(pcm), chunk)):
        await ws.send(pcm[offset : offset + chunk])
        delay = start + (n + 1) * chunk_seconds - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


def _settings(avatars: Path, sections: dict[str, dict[str, Any]]) -> Any:
    from server.config import Settings

    settings = Settings()
    settings.avatars.dir = avatars
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(settings, section), key, value)
    return settings


@contextmanager
def ready_test_client(avatars: Path, **sections: dict[str, Any]) -> Iterator[Any]:
    """FastAPI's TestClient over the app (it speaks WebSocket too), once /readyz says ready;
    ``sections`` override settings as for :func:`in_process_server`."""
    from fastapi.testclient import TestClient

    from server.app import create_app

    with TestClient(create_app(_settings(avatars, sections))) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        yield client


@asynccontextmanager
async def in_process_server(avatars: Path, **sections: dict[str, Any]) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The app started in this process (its peer and device processes are real) and an HTTP
    client bound to it; ``sections`` override settings, e.g. ``engine={"capacity_sessions": 3}``."""
    from server.app import _start, _stop, create_app

    app = create_app(_settings(avatars, sections))
    state = app.state.lipstream
    await _start(state)
    assert state.ready, state.startup_error
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            yield state, http
    finally:
        await _stop(state)
