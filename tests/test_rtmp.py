"""RTMP output end to end: a real nginx-rtmp on loopback, a real server, a PyAV player.

nginx runs from a config file in the test's temporary directory (``master_process off``: one
process, so killing it is killing the server), listening on a free loopback port. The stream is
pulled back by ``python -m tests.test_rtmp pull`` in a subprocess: FFmpeg's RTMP reader holds
the GIL at times, which would disturb the WebRTC viewer this test runs beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets

from tests.live_server import ROOT, free_port, push_realtime, running_server, wait_until_ready
from tests.rtc_client import RATE, Client, envelope, motion, onsets
from tests.speech import espeak

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
RTMP_MODULE = Path("/usr/lib/nginx/modules/ngx_rtmp_module.so")
TEXT = "Hello there. I am a talking avatar, streaming to an RTMP server."
FRAME = 0.04


class Nginx:
    """nginx with an rtmp block on 127.0.0.1:``port``, everything it writes under ``root``."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.process: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)
        load = f"load_module {RTMP_MODULE};\n" if RTMP_MODULE.exists() else ""
        closed = free_port()  # nothing listens there: on_publish can never be approved
        self.conf = root / "nginx.conf"
        self.conf.write_text(
            f"""{load}master_process off;
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 64; }}
rtmp {{
  server {{
    listen 127.0.0.1:{port};
    chunk_size 4096;
    application live {{ live on; record off; }}
    application refuse {{ live on; record off; on_publish http://127.0.0.1:{closed}/auth; }}
  }}
}}
"""
        )

    def start(self) -> None:
        log = open(self.root / "stderr.log", "ab")
        self.process = subprocess.Popen(
            [NGINX, "-c", str(self.conf), "-p", str(self.root), "-g", "daemon off;"], stdout=log, stderr=log
        )
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited: {(self.root / 'stderr.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("nginx did not listen within 10 s") from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(5)

    def players(self, name: str) -> int:
        """How many players have asked for stream ``name`` so far (from nginx's info log)."""
        log = self.root / "error.log"
        return log.read_text(errors="replace").count(f"play: name='{name}'") if log.exists() else 0

    async def wait_player(self, name: str, before: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.players(name) <= before:
            assert time.monotonic() < deadline, f"no player of '{name}' reached nginx"
            await asyncio.sleep(0.05)

    def url(self, path: str) -> str:
        return f"rtmp://127.0.0.1:{self.port}/{path}"


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory):
    if not os.path.exists(NGINX) or not RTMP_MODULE.exists():
        pytest.skip("nginx with the RTMP module is not installed (make test installs nginx libnginx-mod-rtmp)")
    server = Nginx(tmp_path_factory.mktemp("nginx"), free_port())
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def server(avatars_root: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("rtmp-server")
    overrides = {"rtmp": {"reconnect_initial_seconds": 0.25, "reconnect_max_seconds": 0.5}}
    with running_server(avatars_root, tmp, overrides) as url:
        yield url


# ---------------------------------------------------------------------------------- the player
def pull(url: str, out: str, roi: str, max_seconds: float, read_timeout: float) -> None:
    """Plays ``url`` until it ends (no data for ``read_timeout``) or ``max_seconds`` passed; saves
    stream facts, every video frame's pts and mouth crop, and the decoded audio."""
    import av

    x1, y1, x2, y2 = (int(v) for v in roi.split(","))
    info: dict = {"error": None}
    video_pts, crops, audio, audio_pts = [], [], [], []
    started = time.monotonic()
    try:
        container = av.open(url, options={"rw_timeout": str(int(read_timeout * 1e6))}, timeout=(20, read_timeout))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        info["error"] = f"open: {exc!r}"
        container = None
    if container is not None:
        info["streams"] = {s.type: s.codec_context.name for s in container.streams}
        video = next(s for s in container.streams if s.type == "video")
        info["fps"] = float(video.average_rate or 0)
        audio_stream = next(s for s in container.streams if s.type == "audio")
        info["sample_rate"] = audio_stream.codec_context.sample_rate
        info["video_errors"] = 0
        try:
            for packet in container.demux():
                if packet.dts is None:
                    continue
                try:
                    frames = packet.decode()
                except av.FFmpegError:
                    info["video_errors"] += packet.stream.type == "video"
                    continue
                for frame in frames:
                    if packet.stream.type == "video":
                        video_pts.append(float(frame.pts * frame.time_base))
                        crops.append(frame.to_ndarray(format="bgr24")[y1:y2, x1:x2])
                    else:
                        audio_pts.append(float(frame.pts * frame.time_base))
                        audio.append(frame.to_ndarray().astype(np.float32).reshape(-1))
                if time.monotonic() - started > max_seconds:
                    break
        except Exception as exc:  # noqa: BLE001 - the end of a live stream is a read timeout
            info["ended"] = repr(exc)
        container.close()
    np.savez(
        out,
        video_pts=np.array(video_pts),
        crops=np.stack(crops) if crops else np.zeros((0, 1, 1, 3), np.uint8),
        audio=np.concatenate(audio) if audio else np.zeros(0, np.float32),
        audio_pts=np.array(audio_pts),
        info=json.dumps(info),
    )


class Puller:
    def __init__(self, url: str, out: Path, roi: tuple[int, int, int, int], max_seconds: float = 60, read_timeout: float = 2.0):
        self.out = out
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.test_rtmp", "pull", url, str(out), ",".join(map(str, roi)),
             str(max_seconds), str(read_timeout)],
            cwd=ROOT,
        )

    def result(self, timeout: float = 30) -> dict:
        self.process.wait(timeout)
        data = np.load(self.out)
        result = {k: data[k] for k in data.files if k != "info"}
        result["info"] = json.loads(str(data["info"]))
        return result


# ---------------------------------------------------------------------------------- helpers
async def wait_state(http: httpx.AsyncClient, session_id: str, output_id: str, states: set[str], timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        outputs = (await http.get(f"/v1/sessions/{session_id}/outputs")).json()["outputs"]
        output = next(o for o in outputs if o["id"] == output_id)
        if output["state"] in states:
            return output
        assert time.monotonic() < deadline, f"output stayed {output['state']}: {output}"
        await asyncio.sleep(0.05)




async def collect(ws, events: list[dict]) -> None:
    try:
        async for message in ws:
            events.append(json.loads(message))
    except websockets.ConnectionClosed:
        pass


def windowed_fps(arrivals: list[float], start: float, end: float, window: float = 2.0) -> list[float]:
    times = np.array(arrivals)
    rates = []
    t = start
    while t + window <= end:
        rates.append(float(((times >= t) & (times < t + window)).sum() / window))
        t += window / 2
    return rates


# ---------------------------------------------------------------------------------- unit tests
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("rtmp://a.rtmp.youtube.com/live2/abcd-1234", ("rtmp", "a.rtmp.youtube.com", 1935, "live2", "abcd-1234")),
        ("rtmps://ingest.example:4443/app/inst/key?token=1", ("rtmps", "ingest.example", 4443, "app/inst", "key?token=1")),
        ("RTMP://127.0.0.1/live/x/", ("rtmp", "127.0.0.1", 1935, "live", "x")),
        ("rtmps://[::1]/live/k", ("rtmps", "::1", 443, "live", "k")),
    ],
)
def test_rtmp_urls(url: str, expected: tuple) -> None:
    from pipeline.media.rtmp import parse_rtmp_url

    parsed = parse_rtmp_url(url)
    assert (parsed.scheme, parsed.host, parsed.port, parsed.app, parsed.key) == expected
    assert parsed.key not in parsed.redacted or len(parsed.key) <= 3


def test_amf0_round_trip() -> None:
    from pipeline.media.rtmp import amf0_decode, amf0_encode

    values = ["connect", 1.0, {"app": "live", "n": 3.5, "ok": True, "nested": {"x": None}}, None, [1.0, "a"], "é" * 3]
    assert amf0_decode(amf0_encode(*values)) == values


def test_chunk_stream_round_trip_with_extended_timestamps_and_pings() -> None:
    """Messages chunked by one client are read back by another: long payloads over several
    chunks, timestamps past 24 bits (extended), and a ping answered with the same stamp."""
    from pipeline.media import rtmp

    a_sock, b_sock = socket.socketpair()
    url = rtmp.parse_rtmp_url("rtmp://h/app/key")
    a, b = rtmp.RtmpPublisher(url), rtmp.RtmpPublisher(url)
    a._sock, b._sock = a_sock, b_sock
    b._in_chunk_size = rtmp.OUT_CHUNK_SIZE
    sent = [
        (rtmp.COMMAND_AMF0, 0, rtmp.amf0_encode("onStatus", 0, None, {"code": "x" * 9000})),
        (rtmp.DATA_AMF0, 0x1234567, rtmp.amf0_encode("@setDataFrame", "onMetaData", {"width": 2.0})),
        (rtmp.DATA_AMF0, 0x1234568, bytes(range(256)) * 40),
    ]
    for type_id, stamp, payload in sent:
        a._send(rtmp.CS_STREAM, type_id, 1, stamp, payload)
    a._send(rtmp.CS_CONTROL, rtmp.USER_CONTROL, 0, 0, struct.pack(">HI", 6, 424242))  # ping request
    deadline = time.monotonic() + 2
    while len(b._messages) < 3 and time.monotonic() < deadline:
        b._read_some(0.2, "test")
    assert [(t, p) for t, _, p in b._messages] == [(t, p) for t, _, p in sent]
    a_sock.settimeout(2)
    pong = a_sock.recv(100)
    assert pong[-6:] == struct.pack(">HI", 7, 424242)
    a_sock.close()
    b_sock.close()


def test_flv_tags_split_from_pieces() -> None:
    from pipeline.media.rtmp import FlvTagReader

    def tag(kind: int, stamp: int, body: bytes) -> bytes:
        head = bytes([kind]) + len(body).to_bytes(3, "big") + (stamp & 0xFFFFFF).to_bytes(3, "big") + bytes([stamp >> 24])
        return head + b"\0\0\0" + body + (11 + len(body)).to_bytes(4, "big")

    stream = b"FLV\x01\x05\0\0\0\x09\0\0\0\0" + tag(18, 0, b"meta") + tag(9, 40, b"v" * 100) + tag(8, 0x1000000, b"a")
    reader = FlvTagReader()
    tags = []
    for start in range(0, len(stream), 7):
        tags += reader.feed(stream[start : start + 7])
    assert tags == [(18, 0, b"meta"), (9, 40, b"v" * 100), (8, 0x1000000, b"a")]


def test_frame_feed_drops_pictures_never_audio() -> None:
    from server.outputs import FrameFeed, FrameItem

    feed = FrameFeed(max_pictures=3, max_items=100)
    image = np.zeros((2, 2, 3), np.uint8)
    dropped = sum(feed.put(FrameItem(i, image, np.full(1920, i, np.int16))) for i in range(10))
    assert dropped == 7 and feed.dropped == 7
    items = [feed.get(0) for _ in range(10)]
    assert [i.index for i in items] == list(range(10))  # every frame's audio is still there
    assert [i.image is not None for i in items] == [False] * 7 + [True] * 3  # the newest pictures
    feed.close()
    assert feed.get(0) is None


def test_a_slow_output_drops_only_its_own_backlog() -> None:
    from types import SimpleNamespace

    from pipeline.media.live_encode import MediaPacket
    from server.metrics import Metrics
    from server.outputs import INBOX_PACKETS, Output

    keyframes = []
    metrics = Metrics()
    owner = SimpleNamespace(manager=SimpleNamespace(metrics=metrics), session=SimpleNamespace(id="s"))
    encoding = SimpleNamespace(request_keyframe=lambda: keyframes.append(1))
    slow, fast = Output(owner, encoding), Output(owner, encoding)  # type: ignore[arg-type]
    frame = [MediaPacket("video", 0, False, b"v"), MediaPacket("audio", 0, True, b"a")]
    for _ in range(INBOX_PACKETS // 2 + 10):
        slow.offer(frame)  # nobody takes these
        fast.offer(frame)
        fast._take(0)
    assert slow.dropped_frames == INBOX_PACKETS // 2 and fast.dropped_frames == 0
    packets, resync, _ = slow._take(0)
    assert resync and len(packets) == 20  # restarts at the next keyframe, asked for at once
    assert keyframes == [1]
    assert f'lipstream_output_dropped_frames_total{{kind="output"}} {INBOX_PACKETS // 2}.0' in metrics_text(metrics)


def metrics_text(metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_bad_urls_are_refused(server: str) -> None:
    with httpx.Client(base_url=server, timeout=10) as http:
        session_id = http.post("/v1/sessions", json={}).json()["id"]
        for url in ["http://x", "rtmp://", "rtmp:///live/x", "rtmp://host/onlyapp", "rtmp://h:99999/a/b", "rtmp://h/a/b c", ""]:
            response = http.post(f"/v1/sessions/{session_id}/outputs/rtmp", json={"url": url})
            assert response.status_code == 400, (url, response.text)
            assert response.json()["detail"]
        assert http.post(f"/v1/sessions/{session_id}/outputs/rtmp", json={}).status_code == 422
        assert http.post("/v1/sessions/nosuch/outputs/rtmp", json={"url": "rtmp://h/a/b"}).status_code == 404
        assert http.delete(f"/v1/sessions/{session_id}/outputs/rtmp/nosuch").status_code == 404
        assert http.get(f"/v1/sessions/{session_id}/outputs").json() == {"outputs": []}
        http.delete(f"/v1/sessions/{session_id}")


@pytest.mark.slow
def test_stream_pull_and_server_restart(server: str, nginx: Nginx, mouth_roi, tmp_path: Path) -> None:
    speech24, _ = espeak(TEXT, sample_rate=24000)
    pcm = (np.clip(speech24, -1, 1) * 32767).astype("<i2").tobytes()

    async def scenario():
        async with httpx.AsyncClient(base_url=server, timeout=20) as http:
            session_id = (await http.post("/v1/sessions", json={})).json()["id"]
            viewer = Client(roi=mouth_roi)
            await viewer.watch(http, session_id)
            events: list[dict] = []
            async with websockets.connect(server.replace("http://", "ws://") + f"/v1/sessions/{session_id}/audio") as ws:
                listener = asyncio.ensure_future(collect(ws, events))
                await ws.send(json.dumps({"type": "start", "format": "pcm_s16le", "sample_rate": 24000, "channels": 1}))
                # The player waits on nginx before anything is published, so it gets it all.
                players = nginx.players("a")
                first = Puller(nginx.url("live/a"), tmp_path / "a.npz", mouth_roi)
                await nginx.wait_player("a", players)
                added_at = time.monotonic()
                a = (await http.post(f"/v1/sessions/{session_id}/outputs/rtmp", json={"url": nginx.url("live/a")})).json()
                b = (await http.post(f"/v1/sessions/{session_id}/outputs/rtmp", json={"url": nginx.url("live/b")})).json()
                assert a["state"] in ("starting", "connecting") and a["url"].endswith("/live/***")
                await wait_state(http, session_id, a["id"], {"live"})
                await wait_state(http, session_id, b["id"], {"live"})
                await asyncio.sleep(1.0)
                await push_realtime(ws, pcm, 24000 * 2)
                await ws.send(json.dumps({"type": "end"}))
                await asyncio.sleep(1.0)
                metrics = (await http.get("/metrics")).text
                final_a = (await http.delete(f"/v1/sessions/{session_id}/outputs/rtmp/{a['id']}")).json()
                removed_at = time.monotonic()
                # let nginx hand stream a's last frames to its player before it is killed below (a
                # fresh-clone run lost 2 of 169 at the end when the kill came right after this)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(first.process.wait, 10)

                # nginx dies mid-stream: b retries; nginx comes back: b is live again.
                killed_at = time.monotonic()
                await asyncio.to_thread(nginx.kill)
                retrying = await wait_state(http, session_id, b["id"], {"retrying"}, timeout=5)
                await asyncio.sleep(0.5)
                await asyncio.to_thread(nginx.start)
                second = Puller(nginx.url("live/b"), tmp_path / "b.npz", mouth_roi, max_seconds=4.0)
                relive = await wait_state(http, session_id, b["id"], {"live"}, timeout=10)
                await asyncio.sleep(4.5)
                final_b = (await http.delete(f"/v1/sessions/{session_id}/outputs/rtmp/{b['id']}")).json()
                watched_until = time.monotonic()
                listener.cancel()
            await viewer.close()
            await http.delete(f"/v1/sessions/{session_id}")
            return dict(
                viewer=viewer, events=events, first=first, second=second, final_a=final_a, final_b=final_b,
                retrying=retrying, relive=relive, metrics=metrics, added_at=added_at, removed_at=removed_at,
                watched_until=watched_until, killed_at=killed_at,
            )

    r = asyncio.run(scenario())
    a = r["first"].result()
    info = a["info"]
    assert info["error"] is None, info
    assert info["streams"] == {"video": "h264", "audio": "aac"} or set(info["streams"].values()) == {"h264", "aac"}
    assert info["fps"] == 25 and info["sample_rate"] == 48000
    assert info["video_errors"] == 0

    # Duration: every frame the server sent came through, at 40 ms steps from 0.
    pts = a["video_pts"]
    sent = r["final_a"]["frames"]
    assert abs(len(pts) - sent) <= 1, (len(pts), sent)
    assert np.allclose(np.diff(pts), FRAME, atol=0.0015), np.unique(np.round(np.diff(pts), 3))
    duration = pts[-1] - pts[0] + FRAME
    assert abs(round(duration / FRAME) - sent) <= 1, (duration, sent)  # in whole frames: 168 vs 169 came out as 0.04 + 4e-17 s
    assert abs(duration - (r["removed_at"] - r["added_at"])) < 1.0  # about the time it was live
    # A/V: both tracks start together and last as long.
    audio_start, audio_duration = a["audio_pts"][0], len(a["audio"]) / 48000
    assert abs(audio_start - pts[0]) <= FRAME, (audio_start, pts[0])
    assert abs(audio_duration - duration) <= FRAME + 1024 / 48000, (audio_duration, duration)

    # The mouth moves with the speech, and its onsets line up with the audio's (stream clock).
    crops = list(a["crops"])
    times = pts + FRAME / 2
    env = envelope(a["audio"], RATE)
    env_times = audio_start + np.arange(len(env)) * 0.01
    audio_onsets = onsets(env, env_times, threshold=0.1 * float(np.percentile(env, 99.5)))
    assert audio_onsets, "no speech in the pulled audio"
    quiet = times < audio_onsets[0] - 0.3
    assert quiet.sum() >= 10
    reference = np.median(np.stack([c for c, q in zip(crops, quiet, strict=True) if q]), axis=0)
    moves = motion(crops, reference)
    silence = float(np.percentile(moves[quiet], 95))
    speech_end = audio_onsets[0] + len(speech24) / 24000
    during = (times > audio_onsets[0]) & (times < speech_end)
    assert float(np.mean(moves[during])) > 5 * max(silence, 0.5), (float(np.mean(moves[during])), silence)
    mouth_onsets = onsets(moves, times, threshold=max(4 * silence, 0.1 * float(np.percentile(moves, 99.5)), 1.0))
    assert mouth_onsets and abs(mouth_onsets[0] - audio_onsets[0]) <= 0.040, (mouth_onsets[:3], audio_onsets[:3])

    # Two URLs, one encode; counters on /metrics.
    assert "lipstream_output_encodes 1.0" in r["metrics"]
    assert 'lipstream_outputs{kind="rtmp",state="live"} 2.0' in r["metrics"]

    # After the restart: a valid stream again, from a keyframe, with both tracks.
    b = r["second"].result()
    assert b["info"]["error"] is None, b["info"]
    assert set(b["info"]["streams"].values()) == {"h264", "aac"}
    assert b["info"]["video_errors"] == 0
    assert len(b["video_pts"]) >= 50 and np.allclose(np.diff(b["video_pts"]), FRAME, atol=0.0015)
    assert len(b["audio"]) / 48000 >= 1.5
    assert r["retrying"]["last_error"] and r["final_b"]["reconnects"] >= 1
    states = [e["state"] for e in r["events"] if e["type"] == "output_state" and e["output_id"] == r["final_b"]["id"]]
    assert states[:2] == ["connecting", "live"] and "retrying" in states and states[-1] == "stopped", states
    assert states[states.index("retrying") :].count("live") >= 1

    # The WebRTC viewer of the same session never noticed any of it.
    arrivals = r["viewer"].recording.video_arrival
    rates = windowed_fps(arrivals, arrivals[0] + 0.5, r["watched_until"] - 0.2)
    overall = (len([t for t in arrivals if t > arrivals[0] + 0.5]) - 1) / (arrivals[-1] - arrivals[0] - 0.5)
    assert overall >= 24, overall
    assert min(rates) >= 23, (rates, "nginx killed at", r["killed_at"] - arrivals[0])


@pytest.mark.slow
def test_unreachable_and_refused_urls_fail_after_bounded_retries(
    avatars_root: Path, nginx: Nginx, tmp_path: Path
) -> None:
    overrides = {"rtmp": {"max_retries": 2, "reconnect_initial_seconds": 0.1, "reconnect_max_seconds": 0.2, "timeout_seconds": 2}}
    with running_server(avatars_root, tmp_path, overrides) as url, httpx.Client(base_url=url, timeout=10) as http:
        session_id = http.post("/v1/sessions", json={}).json()["id"]
        targets = {
            "closed port": f"rtmp://127.0.0.1:{free_port()}/live/x",
            "refused key": nginx.url("refuse/secret-key"),
            "unknown app": nginx.url("nosuchapp/x"),
        }
        ids = {name: http.post(f"/v1/sessions/{session_id}/outputs/rtmp", json={"url": u}).json()["id"] for name, u in targets.items()}
        good = http.post(f"/v1/sessions/{session_id}/outputs/rtmp", json={"url": nginx.url("live/ok")}).json()["id"]
        deadline = time.monotonic() + 10
        while True:
            outputs = {o["id"]: o for o in http.get(f"/v1/sessions/{session_id}/outputs").json()["outputs"]}
            if all(outputs[i]["state"] == "failed" for i in ids.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for name, output_id in ids.items():
            output = outputs[output_id]
            assert output["state"] == "failed", (name, output)
            assert output["reconnects"] == 2, (name, output)
            assert "gave up after 3 failed attempts" in output["last_error"], output
        assert "refused" in outputs[ids["closed port"]]["last_error"]
        assert "closed the connection during publish" in outputs[ids["refused key"]]["last_error"]
        assert "closed the connection during connect" in outputs[ids["unknown app"]]["last_error"]
        assert outputs[good]["state"] == "live" and outputs[good]["frames"] > 0
        # No crash: the server and the session carry on.
        assert http.get("/healthz").status_code == 200
        assert http.get(f"/v1/sessions/{session_id}").json()["state"] != "ended"
        metrics = http.get("/metrics").text
        assert 'lipstream_outputs{kind="rtmp",state="failed"} 3.0' in metrics
        assert "lipstream_output_reconnects_total 6.0" in metrics
        for output_id in ids.values():
            assert http.delete(f"/v1/sessions/{session_id}/outputs/rtmp/{output_id}").json()["state"] == "failed"
        http.delete(f"/v1/sessions/{session_id}")


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.mark.slow
def test_rtmps_publishes_through_tls(nginx: Nginx, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rtmps:// = the same client inside TLS (certificate checked): here against a local TLS
    terminator in front of nginx, trusted through SSL_CERT_FILE."""
    import ssl
    import threading

    from pipeline.media.live_encode import ByteSink, EncodeSettings, LiveEncoder, PacketMuxer
    from pipeline.media.rtmp import RtmpError, RtmpPublisher, parse_rtmp_url

    cert, key = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)

    def terminate_tls() -> None:
        while True:
            try:
                client, _ = listener.accept()
                tls = context.wrap_socket(client, server_side=True)
            except OSError:
                continue  # e.g. the client refused our certificate
            upstream = socket.create_connection(("127.0.0.1", nginx.port))
            threading.Thread(target=pipe, args=(tls, upstream), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, tls), daemon=True).start()

    threading.Thread(target=terminate_tls, daemon=True).start()
    url = parse_rtmp_url(f"rtmps://localhost:{port}/live/tls")
    with pytest.raises(RtmpError, match="TLS"):
        RtmpPublisher(url, timeout=3).connect()  # an untrusted certificate is refused
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    publisher = RtmpPublisher(url, timeout=3)
    publisher.connect()
    encoder = LiveEncoder(EncodeSettings(320, 240))
    sink = ByteSink()
    muxer = PacketMuxer(encoder, sink, "flv", {"flush_packets": "1"})
    for index in range(25):
        for packet in encoder.encode(index, np.zeros((240, 320, 3), np.uint8), np.zeros(1920, np.int16)):
            muxer.write(packet)
        publisher.send_flv(sink.take())
    muxer.close()
    publisher.send_flv(sink.take())
    publisher.close()
    assert muxer.frames == 25 and publisher.bytes_sent > 1000
    log = (nginx.root / "error.log").read_text()
    assert "publish: name='tls'" in log
    listener.close()


@pytest.mark.slow
def test_serve_rtmp_starts_a_session(avatars_root: Path, nginx: Nginx, tmp_path: Path) -> None:
    """``lipstream serve --rtmp URL --session-id NAME``: a session at boot, streaming at once."""
    port = free_port()
    config = tmp_path / "c.yaml"
    config.write_text(
        f"server: {{port: {port}, log_level: warning}}\navatars: {{dir: '{avatars_root}'}}\n"
        "webrtc: {host_addresses: ['127.0.0.1']}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSTREAM_")}
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "--config", str(config), "serve", "--rtmp", nginx.url("live/boot"),
         "--session-id", "studio"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_ready(base, process, tmp_path / "serve.log")
        deadline = time.monotonic() + 10
        while True:
            outputs = httpx.get(f"{base}/v1/sessions/studio/outputs").json()["outputs"]
            if outputs and outputs[0]["state"] == "live" and outputs[0]["frames"] > 10:
                break
            assert time.monotonic() < deadline, outputs
            time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(15)
        log.close()
    assert "session 'studio' starts with the server" in (tmp_path / "serve.log").read_text()


if __name__ == "__main__" and sys.argv[1:2] == ["pull"]:
    pull(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]), float(sys.argv[6]))
