"""The HTTP surface of the foundation: health, readiness, avatars, the page; and a real `serve`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from tests.live_server import ready_test_client


@pytest.fixture()
def client(avatars_root: Path):
    with ready_test_client(avatars_root) as test_client:
        yield test_client


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["engine"] == "lite"


def test_avatars_listed_with_preview(client: TestClient) -> None:
    avatars = client.get("/v1/avatars").json()["avatars"]
    assert "demo" in [a["id"] for a in avatars]
    preview = client.get("/v1/avatars/demo/preview.jpg")
    assert preview.status_code == 200 and preview.content[:2] == b"\xff\xd8"
    assert client.get("/v1/avatars/nobody/preview.jpg").status_code == 404
    bad = client.get("/v1/avatars/..%2Fetc/preview.jpg")
    assert bad.status_code in (400, 404)


def test_page_is_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "<title>lipstream</title>" in page.text
    assert client.get("/openapi.json").status_code == 200


def test_readyz_reports_a_failed_start(tmp_path: Path) -> None:
    settings = Settings()
    settings.avatars.dir = tmp_path
    settings.avatars.default = "nobody"
    with TestClient(create_app(settings)) as test_client:
        deadline = time.monotonic() + 10
        body = test_client.get("/readyz").json()
        while body["status"] == "starting" and time.monotonic() < deadline:
            time.sleep(0.05)
            body = test_client.get("/readyz").json()
        assert body["status"] == "failed" and "nobody" in body["detail"]
        assert test_client.get("/healthz").status_code == 200


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_serve_answers_within_60_seconds(avatars_root: Path) -> None:
    """What `make run` does: the real command, a real socket, ready well inside a minute."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSTREAM_")}
    env["LIPSTREAM_AVATARS__DIR"] = str(avatars_root)
    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "--config", str(root / "configs" / "default.yaml"), "serve",
         "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code
                if status == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert status == 200
        assert "lipstream" in httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_idle_session_ends_after_the_idle_timeout(avatars_root: Path) -> None:
    with ready_test_client(avatars_root, sessions={"idle_timeout_seconds": 0.5}) as client:
        session_id = client.post("/v1/sessions", json={}).json()["id"]
        assert client.get(f"/v1/sessions/{session_id}").status_code == 200
        deadline = time.monotonic() + 5
        while client.get(f"/v1/sessions/{session_id}").status_code == 200:
            assert time.monotonic() < deadline, "idle session was not ended"
            time.sleep(0.1)
        assert client.get("/v1/sessions").json()["sessions"] == []
