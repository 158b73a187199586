"""Bad input against a running server, while a healthy session keeps streaming beside it.

One healthy session (WebSocket speech + a WHEP viewer) runs for the whole scenario; every bad
request must get its clear error, and the healthy viewer must keep receiving >= 24 fps.
Auth on a non-loopback bind is checked in-process (binding off loopback is not for tests).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from tests.live_server import running_server, ws_url
from tests.rtc_client import Client
from tests.speech import espeak

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(avatars_root: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("errors")
    overrides = {"limits": {"audio_buffer_seconds": 3, "ws_message_bytes": 65536, "max_sessions": 6}}
    with running_server(avatars_root, tmp, overrides) as url:
        yield url




START = {"type": "start", "format": "pcm_s16le", "sample_rate": 16000, "channels": 1}


async def expect_error(ws, code: str) -> dict:
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if message["type"] == "error":
            assert message["code"] == code, message
            assert message["message"]
            return message


async def expect_close(ws, close_code: int) -> None:
    with pytest.raises(websockets.ConnectionClosed) as closed:
        for _ in range(20):
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == close_code, closed.value


async def healthy_session(http: httpx.AsyncClient, url: str, stop: asyncio.Event) -> Client:
    """Speech pushed in real time, in a loop, watched over WHEP, until ``stop``."""
    session_id = (await http.post("/v1/sessions", json={})).json()["id"]
    viewer = Client()
    await viewer.watch(http, session_id)
    speech, _ = espeak("Still talking while others misbehave.", sample_rate=16000)
    pcm = (speech * 32767).astype("<i2").tobytes()
    async with websockets.connect(ws_url(url, session_id)) as ws:
        await ws.send(json.dumps(START))
        start = time.monotonic()
        n = 0
        while not stop.is_set():
            offset = (n * 640) % len(pcm)
            await ws.send(pcm[offset : offset + 640])
            n += 1
            await asyncio.sleep(max(0.0, start + n * 0.02 - time.monotonic()))
    await http.delete(f"/v1/sessions/{session_id}")
    return viewer


async def bad_requests(http: httpx.AsyncClient, url: str) -> None:
    # Malformed SDP, on each signalling route.
    response = await http.post("/v1/calls", json={"sdp": "this is not sdp", "type": "offer"})
    assert response.status_code == 400 and "SDP" in response.json()["detail"]
    response = await http.post("/v1/calls", json={"sdp": "v=0\r\no=- 0 0 IN IP4 1.2.3.4\r\n", "type": "offer"})
    assert response.status_code == 400
    response = await http.post("/v1/whip", content="v=0\r\n", headers={"content-type": "application/sdp"})
    assert response.status_code == 400
    # Well-formed enough for the server's own check, refused by the peer process (no ICE
    # credentials): the error travels back as a 400, and the call's session is not kept.
    odd = (
        "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=fingerprint:sha-256 AB:CD\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:111 opus/48000/2\r\n"
    )
    before = len((await http.get("/v1/sessions")).json()["sessions"])
    response = await http.post("/v1/calls", json={"sdp": odd, "type": "offer"})
    assert response.status_code == 400 and "SDP" in response.json()["detail"], response.text
    assert len((await http.get("/v1/sessions")).json()["sessions"]) == before
    response = await http.post("/v1/whip", content="v=0", headers={"content-type": "text/plain"})
    assert response.status_code == 415
    response = await http.post("/v1/calls", json={"type": "offer"})
    assert response.status_code == 422

    # Unknown session, everywhere a session id goes.
    assert (await http.get("/v1/sessions/nope")).status_code == 404
    assert (await http.delete("/v1/sessions/nope")).status_code == 404
    assert (await http.post("/v1/sessions/nope/interrupt")).status_code == 404
    whep = await http.post("/v1/sessions/nope/whep", content="v=0\r\n", headers={"content-type": "application/sdp"})
    assert whep.status_code == 404
    async with websockets.connect(ws_url(url, "nope")) as ws:
        # the client offered per-message deflate; the server declines (server.ws_compression)
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        await expect_error(ws, "unknown_session")
        await expect_close(ws, 4404)

    # Unknown avatar and engine for a new session.
    assert (await http.post("/v1/sessions", json={"avatar": "nobody"})).status_code == 404
    assert (await http.post("/v1/sessions", json={"avatar": "../etc"})).status_code == 400
    assert (await http.post("/v1/sessions", json={"engine": "nosuch"})).status_code == 400

    # Oversized request body.
    response = await http.post("/v1/calls", content=b"x" * 70000, headers={"content-type": "application/json"})
    assert response.status_code == 413

    sid = (await http.post("/v1/sessions", json={})).json()["id"]
    try:
        # Bad start messages, each closing the socket with its code.
        for start, code, close in [
            ({"type": "start", "format": "pcm_s16le", "sample_rate": 5, "channels": 1}, "bad_start", 1008),
            ({"type": "start", "format": "flac", "sample_rate": 16000, "channels": 1}, "unsupported_format", 1003),
            ({"type": "start", "format": "pcm_s16le", "sample_rate": 16000, "channels": 1, "x": 1}, "bad_start", 1008),
        ]:
            async with websockets.connect(ws_url(url, sid)) as ws:
                await ws.send(json.dumps(start))
                await expect_error(ws, code)
                await expect_close(ws, close)
        # Audio before start, unknown messages, bad base64, not JSON: reported, socket stays open.
        async with websockets.connect(ws_url(url, sid)) as ws:
            await ws.send(b"\x00\x01" * 100)
            await expect_error(ws, "not_started")
            await ws.send("{not json")
            await expect_error(ws, "bad_message")
            await ws.send(json.dumps({"type": "dance"}))
            await expect_error(ws, "bad_message")
            await ws.send(json.dumps(START))
            await ws.send(json.dumps({"type": "audio", "data": "***"}))
            await expect_error(ws, "bad_message")
            await ws.send(json.dumps({"type": "ping"}))
            while json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] != "pong":
                pass
        # Garbage binary frames in a compressed format.
        async with websockets.connect(ws_url(url, sid)) as ws:
            await ws.send(json.dumps({"type": "start", "format": "mp3"}))
            await ws.send(bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)))
            await expect_error(ws, "bad_audio")
            await expect_close(ws, 1007)
        # An oversize message.
        async with websockets.connect(ws_url(url, sid), max_size=None) as ws:
            await ws.send(json.dumps(START))
            await ws.send(b"\x00" * 100_000)
            await expect_error(ws, "message_too_large")
            await expect_close(ws, 1009)
        # A producer flooding past the buffer limit (3 s): refused, nothing silently dropped.
        async with websockets.connect(ws_url(url, sid)) as ws:
            await ws.send(json.dumps(START))
            second = b"\x10\x00" * 16000
            for _ in range(5):
                await ws.send(base64.b64encode(second).decode().join(['{"type":"audio","data":"', '"}']))
            error = await expect_error(ws, "buffer_full")
            assert "limit" in error["message"]
            info = (await http.get(f"/v1/sessions/{sid}")).json()
            assert 2.0 <= info["stats"]["buffered_seconds"] <= 4.0
            await ws.send(json.dumps({"type": "interrupt"}))
    finally:
        await http.delete(f"/v1/sessions/{sid}")


def test_bad_input_while_a_healthy_session_streams(server: str) -> None:
    async def scenario():
        async with httpx.AsyncClient(base_url=server, timeout=20) as http:
            stop = asyncio.Event()
            healthy = asyncio.ensure_future(healthy_session(http, server, stop))
            await asyncio.sleep(2.0)
            await bad_requests(http, server)
            await asyncio.sleep(1.0)
            stop.set()
            viewer = await healthy
            await viewer.close()
            return viewer

    viewer = asyncio.run(scenario())
    arrivals = np.array(viewer.recording.video_arrival)
    steady = arrivals[(arrivals > arrivals[0] + 0.5) & (arrivals < arrivals[-1] - 0.1)]
    gaps = np.diff(steady)
    fps = (len(steady) - 1) / (steady[-1] - steady[0])
    assert fps >= 24, f"healthy session fell to {fps:.1f} fps"
    assert gaps.max() < 0.25, f"healthy session stalled for {gaps.max() * 1000:.0f} ms"


VANISHING_CLIENT = textwrap.dedent(
    """
    import asyncio, sys, httpx, numpy as np
    from tests.rtc_client import Client, SpeechTrack

    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            client = Client()
            session_id = await client.call(http, SpeechTrack(np.zeros(48000 * 60, np.float32)))
            print(session_id, flush=True)
            await asyncio.sleep(60)

    asyncio.run(main(sys.argv[1]))
    """
)


def test_client_vanishing_mid_call_frees_everything(server: str) -> None:
    deadline = time.monotonic() + 5
    while httpx.get(f"{server}/v1/server").json()["sessions"] and time.monotonic() < deadline:
        time.sleep(0.1)  # earlier tests' sessions wind down first
    baseline = httpx.get(f"{server}/v1/server").json()
    client = subprocess.Popen(
        [sys.executable, "-c", VANISHING_CLIENT, server],
        cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    try:
        session_id = client.stdout.readline().strip()
        assert session_id, "the client did not start a call"
        deadline = time.monotonic() + 10
        while httpx.get(f"{server}/v1/sessions/{session_id}").json()["stats"]["received_seconds"] < 1.0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        during = httpx.get(f"{server}/v1/server").json()
        assert during["sessions"] == baseline["sessions"] + 1 and during["peers"] >= 1
        client.send_signal(signal.SIGKILL)  # no BYE, no DTLS close: the peer just vanishes
        killed_at = time.monotonic()
        client.wait()
        while httpx.get(f"{server}/v1/sessions/{session_id}").status_code != 404:
            assert time.monotonic() - killed_at < 2.0, "session still alive 2 s after its peer vanished"
            time.sleep(0.05)
        freed = time.monotonic() - killed_at
        time.sleep(0.3)
        after = httpx.get(f"{server}/v1/server").json()
        assert after["sessions"] == baseline["sessions"] and after["peers"] == baseline["peers"]
        assert after["subscribers"] == baseline["subscribers"]
        assert after["tasks"] <= baseline["tasks"] + 2, (baseline, after)
        assert after["threads"] <= baseline["threads"] + 1, (baseline, after)
        assert freed < 2.0
    finally:
        if client.poll() is None:
            client.kill()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "nope"}])
def test_keys_required_off_loopback(avatars_root: Path, headers: dict[str, str]) -> None:
    settings = Settings()
    settings.server.host = "0.0.0.0"
    settings.server.api_keys = ["right-key"]
    settings.avatars.dir = avatars_root
    with TestClient(create_app(settings)) as http:
        assert http.get("/healthz").status_code == 200
        assert http.get("/").status_code == 200  # the page itself asks for the key
        for method, path in [("get", "/v1/sessions"), ("post", "/v1/sessions"), ("get", "/v1/avatars"),
                             ("get", "/metrics"), ("post", "/v1/calls")]:
            response = getattr(http, method)(path, headers=headers)
            assert response.status_code == 401, (path, response.status_code)
        with pytest.raises(Exception):
            with http.websocket_connect("/v1/sessions/x/audio", headers=headers):
                pass
        assert http.get("/v1/avatars", headers={"Authorization": "Bearer right-key"}).status_code == 200
        assert http.get("/v1/avatars?key=right-key").status_code == 200


def test_loopback_bind_needs_no_key_but_checks_a_given_one(avatars_root: Path) -> None:
    settings = Settings()
    settings.server.api_keys = ["right-key"]
    settings.avatars.dir = avatars_root
    with TestClient(create_app(settings)) as http:
        assert http.get("/v1/avatars").status_code == 200
        assert http.get("/v1/avatars", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_open_bind_without_keys_refuses_to_start() -> None:
    from pipeline.errors import ConfigError

    settings = Settings()
    settings.server.host = "0.0.0.0"
    with pytest.raises(ConfigError, match="server.api_keys"):
        create_app(settings)


def test_sigterm_drains_sessions_and_exits(avatars_root: Path, tmp_path: Path) -> None:
    """SIGTERM: connected producers are told the session ended, the process exits cleanly."""
    with running_server(avatars_root, tmp_path) as url:
        session_id = httpx.post(f"{url}/v1/sessions", json={}).json()["id"]

        async def producer():
            events = []
            async with websockets.connect(ws_url(url, session_id)) as ws:
                await ws.send(json.dumps(START))
                try:
                    async for message in ws:
                        events.append(json.loads(message))
                except websockets.ConnectionClosed:
                    pass
                return events

        async def scenario():
            task = asyncio.ensure_future(producer())
            await asyncio.sleep(1.0)
            url.process.send_signal(signal.SIGTERM)
            return await asyncio.wait_for(task, 10)

        events = asyncio.run(scenario())
        assert any(e["type"] == "session_ended" and "shutting down" in e["reason"] for e in events), events
        # uvicorn re-raises the captured SIGTERM once shut down, as process managers expect.
        assert url.process.wait(timeout=10) in (0, -signal.SIGTERM)


def test_json_log_lines_carry_session_ids() -> None:
    import logging

    from server.logs import JsonFormatter

    record = logging.LogRecord("lipstream.sessions", logging.INFO, __file__, 1, "session ended: %s", ("deleted",), None)
    record.session_id = "abc"
    line = json.loads(JsonFormatter().format(record))
    assert line["session_id"] == "abc" and line["message"] == "session ended: deleted" and line["level"] == "info"
