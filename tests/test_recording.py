"""MP4 recordings of live sessions, against a real server: finished on DELETE, on the session's
end and on SIGTERM; size and disk limits stop the recording, never the session."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import av
import httpx
import numpy as np
import pytest
import websockets

from tests.live_server import push_realtime, running_server, ws_url
from tests.speech import espeak

pytestmark = pytest.mark.slow

FRAME = 0.04
AAC_FRAME = 1024 / 48000
TEXT = "This is a recording of a talking avatar."


def probe(path: Path) -> dict:
    """Decodes the whole file: codecs, frame count, both durations, and whether moov comes first."""
    head = path.read_bytes()[:4096]
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        audio = container.streams.audio[0]
        codecs = (video.codec_context.name, audio.codec_context.name)
        rate = float(video.average_rate)
        frames, pts, samples, audio_start = 0, [], 0, None
        for frame in container.decode(video=0, audio=0):
            if isinstance(frame, av.VideoFrame):
                frames += 1
                pts.append(float(frame.pts * frame.time_base))
            else:
                audio_start = float(frame.pts * frame.time_base) if audio_start is None else audio_start
                samples += frame.samples
    return {
        "codecs": codecs,
        "fps": rate,
        "frames": frames,
        "video_start": pts[0],
        "video_duration": pts[-1] - pts[0] + FRAME,
        "audio_start": audio_start,
        "audio_duration": samples / 48000,
        "faststart": head.find(b"moov") != -1 and (head.find(b"mdat") == -1 or head.find(b"moov") < head.find(b"mdat")),
    }


def assert_consistent(info: dict, frames: int) -> None:
    assert info["codecs"] == ("h264", "aac")
    assert info["fps"] == 25
    assert info["frames"] == frames, (info, frames)
    assert info["video_start"] == 0
    assert abs(info["video_duration"] - frames * FRAME) < 1e-6
    assert abs(info["audio_start"] - info["video_start"]) <= AAC_FRAME
    end_gap = info["audio_start"] + info["audio_duration"] - info["video_duration"]
    assert -FRAME <= end_gap <= 2 * AAC_FRAME, info
    assert info["faststart"]


def speech_pcm() -> bytes:
    speech24, _ = espeak(TEXT, sample_rate=24000)
    return (np.clip(speech24, -1, 1) * 32767).astype("<i2").tobytes()






@pytest.fixture(scope="module")
def server(avatars_root: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("record-server")
    with running_server(avatars_root, tmp, {"recordings": {"dir": str(tmp / "recordings"), "min_free_bytes": 0}}) as url:
        yield url


def test_record_download_and_finish_on_session_end(server: str) -> None:
    pcm = speech_pcm()

    async def scenario():
        async with httpx.AsyncClient(base_url=server, timeout=20) as http:
            session_id = (await http.post("/v1/sessions", json={})).json()["id"]
            async with websockets.connect(ws_url(server, session_id)) as ws:
                await ws.send(json.dumps({"type": "start", "format": "pcm_s16le", "sample_rate": 24000, "channels": 1}))
                started = time.monotonic()
                first = (await http.post(f"/v1/sessions/{session_id}/outputs/record")).json()
                second = (await http.post(f"/v1/sessions/{session_id}/outputs/record")).json()
                await asyncio.sleep(0.5)
                await push_realtime(ws, pcm, 48000)
                await ws.send(json.dumps({"type": "end"}))
                await asyncio.sleep(0.5)
                busy = await http.get(f"/v1/sessions/{session_id}/outputs/record/{first['id']}")
                listed = (await http.get(f"/v1/sessions/{session_id}/outputs")).json()["outputs"]
                final = (await http.delete(f"/v1/sessions/{session_id}/outputs/record/{first['id']}")).json()
                stopped = time.monotonic()
                download = await http.get(f"/v1/sessions/{session_id}/outputs/record/{first['id']}")
                await asyncio.sleep(0.5)
            # The second recording is finished by the end of its session, and outlives it.
            await http.delete(f"/v1/sessions/{session_id}")
            ended = await http.get(f"/v1/sessions/{session_id}/outputs/record/{second['id']}")
            unknown = await http.get(f"/v1/sessions/{session_id}/outputs/record/nosuch")
            sneaky = await http.get(f"/v1/sessions/{session_id}/outputs/record/..%2F..%2Fetc")
            return first, second, busy, listed, final, download, ended, unknown, sneaky, stopped - started

    first, second, busy, listed, final, download, ended, unknown, sneaky, span = asyncio.run(scenario())
    assert first["kind"] == "record" and first["path"].endswith(f"{first['id']}.mp4")
    assert first["state"] in ("starting", "recording")  # its writer may start before the answer goes out
    assert busy.status_code == 409 and "DELETE" in busy.json()["detail"]
    assert {o["state"] for o in listed} == {"recording"}
    # Both recordings started on the same frame (one shared encode, one forced keyframe).
    assert listed[0]["first_frame"] == listed[1]["first_frame"]
    assert final["state"] == "stopped" and final["finished"] and final["last_error"] is None
    assert download.status_code == 200 and download.headers["content-type"] == "video/mp4"
    assert len(download.content) == final["bytes"]
    assert unknown.status_code == 404 and sneaky.status_code == 404

    path = Path(final["path"])
    info = probe(path)
    assert_consistent(info, final["frames"])
    # The recording spans the time between POST and DELETE (less the encoder's start-up).
    assert span - 0.5 <= info["video_duration"] <= span + FRAME, (info["video_duration"], span)
    assert ended.status_code == 200
    later = Path(second["path"])
    info2 = probe(later)
    assert_consistent(info2, info2["frames"])
    assert info2["video_duration"] > info["video_duration"]
    assert not [p for p in path.parent.iterdir() if "partial" in p.name]


def test_sigterm_finishes_the_recording(avatars_root: Path, tmp_path: Path) -> None:
    recordings = tmp_path / "recordings"
    pcm = speech_pcm()
    with running_server(avatars_root, tmp_path, {"recordings": {"dir": str(recordings), "min_free_bytes": 0}}) as url:

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=20) as http:
                session_id = (await http.post("/v1/sessions", json={})).json()["id"]
                async with websockets.connect(ws_url(url, session_id)) as ws:
                    await ws.send(json.dumps({"type": "start", "format": "pcm_s16le", "sample_rate": 24000, "channels": 1}))
                    started = time.monotonic()
                    rec = (await http.post(f"/v1/sessions/{session_id}/outputs/record")).json()
                    await push_realtime(ws, pcm[: 48000 * 2], 48000)
                    before = (await http.get(f"/v1/sessions/{session_id}/outputs")).json()["outputs"][0]
                    url.process.send_signal(signal.SIGTERM)  # mid-recording, speech still arriving
                    signalled = time.monotonic()
                    try:
                        await push_realtime(ws, pcm[48000 * 2 :], 48000)
                    except websockets.ConnectionClosed:
                        pass
                return rec, before, signalled - started

        rec, before, span = asyncio.run(scenario())
        # uvicorn re-raises the signal once it has shut down cleanly
        assert url.process.wait(20) in (0, -signal.SIGTERM)
    path = Path(rec["path"])
    assert path.is_file(), list(recordings.rglob("*"))
    info = probe(path)
    assert_consistent(info, info["frames"])
    assert info["frames"] >= before["frames"]
    assert span - 0.5 <= info["video_duration"] <= span + 0.5, (info["video_duration"], span)
    assert not [p for p in path.parent.iterdir() if "partial" in p.name]


def test_size_limit_stops_the_recording_not_the_session(avatars_root: Path, tmp_path: Path) -> None:
    overrides = {"recordings": {"dir": str(tmp_path / "recordings"), "max_bytes": 150_000, "min_free_bytes": 0}}
    with running_server(avatars_root, tmp_path, overrides) as url, httpx.Client(base_url=url, timeout=10) as http:
        session_id = http.post("/v1/sessions", json={}).json()["id"]
        rec = http.post(f"/v1/sessions/{session_id}/outputs/record").json()
        deadline = time.monotonic() + 10
        while True:
            output = http.get(f"/v1/sessions/{session_id}/outputs").json()["outputs"][0]
            if output["state"] not in ("starting", "recording") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert output["state"] == "failed", output
        assert "recordings.max_bytes" in output["last_error"]
        # The file holds what fitted, finished and playable; the session goes on.
        assert 0 < output["bytes"] <= 150_000
        download = http.get(f"/v1/sessions/{session_id}/outputs/record/{rec['id']}")
        assert download.status_code == 200 and len(download.content) <= 150_000
        path = Path(rec["path"])
        assert_consistent(probe(path), output["frames"])
        assert http.get(f"/v1/sessions/{session_id}").json()["state"] in ("idle", "speaking")
        again = http.post(f"/v1/sessions/{session_id}/outputs/record")
        assert again.status_code == 201
        http.delete(f"/v1/sessions/{session_id}")


def test_no_recording_below_the_free_space_floor(tmp_path: Path) -> None:
    from pipeline.errors import LipstreamError
    from server.config import Settings
    from server.metrics import Metrics
    from server.outputs import InsufficientStorage, OutputManager

    settings = Settings(recordings={"dir": tmp_path, "min_free_bytes": 1 << 62})

    async def scenario() -> LipstreamError:
        manager = OutputManager(settings, Metrics(), sessions=None)  # type: ignore[arg-type]
        session = SimpleNamespace(id="s1", ended=False, outputs=None)
        with pytest.raises(InsufficientStorage) as caught:
            manager.of(session).add_recording()  # type: ignore[arg-type]
        return caught.value

    error = asyncio.run(scenario())
    assert error.http_status == 507 and "recordings.min_free_bytes" in str(error)
