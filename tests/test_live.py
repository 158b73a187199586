"""Live sessions end to end against a real server process, all traffic on loopback.

Each scenario sends espeak-ng speech with silence around it and measures on what comes back:
delivered fps, the mouth moving in speech and resting in silence, and A/V sync as the offset
between speech onsets in the returned audio and motion onsets of the mouth, both on the
sender's clock (see tests/rtc_client.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets

from tests.live_server import push_realtime, running_server, ws_url
from tests.rtc_client import RATE, Client, SpeechTrack, envelope, motion, onsets
from tests.speech import espeak

pytestmark = pytest.mark.slow

SYNC_TOLERANCE = 0.040
FRAME = 0.040
TEXT = "Hello there. I am a talking avatar. Watch my lips move with my words."


@pytest.fixture(scope="module")
def server(avatars_root: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("live")
    overrides = {"limits": {"audio_buffer_seconds": 8, "ws_message_bytes": 262144, "max_sessions": 6}}
    with running_server(avatars_root, tmp, overrides) as url:
        yield url


@pytest.fixture(scope="module")
def speech48() -> np.ndarray:
    audio, _ = espeak(TEXT, sample_rate=RATE)
    return audio


@dataclass
class Analysis:
    fps: float
    audio_onsets: list[float]
    mouth_onsets: list[float]
    speech_motion: float
    silence_motion: float
    first_offset: float
    offsets: list[float]


def analyse(client: Client, speech_span: tuple[float, float]) -> Analysis:
    """``speech_span``: sender-clock times bracketing the speech in the returned audio.

    A frame stands for the 40 ms it is on screen, so it is timed at the middle of that span.
    Onsets are where each signal first rises past a tenth of its own peak (audio envelope) or
    past both a tenth of the peak motion and four times the resting noise (mouth), so neither
    side's loudness or the codec's noise decides the offset.
    """
    rec = client.recording
    times = rec.video_times() + FRAME / 2
    arrivals = np.array(rec.video_arrival)
    steady = (arrivals > arrivals[0] + 0.5) & (arrivals < arrivals[-1] - 0.2)
    fps = (steady.sum() - 1) / (arrivals[steady][-1] - arrivals[steady][0])

    signal, t0 = rec.audio_signal()
    env = envelope(signal)
    env_times = t0 + np.arange(len(env)) * 0.01
    audio_onsets = onsets(env, env_times, threshold=0.1 * float(np.percentile(env, 99.5)))

    quiet = (times < speech_span[0] - 0.3) & (times > times[0] + 0.5)
    reference = np.median(np.stack([f for f, q in zip(rec.frames, quiet, strict=True) if q]), axis=0)
    moves = motion(rec.frames, reference)
    silence_motion = float(np.percentile(moves[quiet], 95))
    threshold = max(4.0 * silence_motion, 0.1 * float(np.percentile(moves, 99.5)), 1.0)
    mouth_onsets = onsets(moves, times, threshold=threshold)
    during = (times > speech_span[0]) & (times < speech_span[1])
    import os
    if os.environ.get("LIPSTREAM_DEBUG_DUMP"):
        np.savez(os.environ["LIPSTREAM_DEBUG_DUMP"], times=times, moves=moves, env=env, env_times=env_times,
                 signal=signal, t0=t0)
    offsets = []
    for onset in audio_onsets:
        nearest = min(mouth_onsets, key=lambda m: abs(m - onset), default=None)
        if nearest is not None and abs(nearest - onset) < 0.15:
            offsets.append(nearest - onset)
    return Analysis(
        fps=float(fps),
        audio_onsets=audio_onsets,
        mouth_onsets=mouth_onsets,
        speech_motion=float(np.mean(moves[during])),
        silence_motion=silence_motion,
        first_offset=mouth_onsets[0] - audio_onsets[0] if audio_onsets and mouth_onsets else float("nan"),
        offsets=offsets,
    )


def assert_lipsync(result: Analysis) -> None:
    assert result.fps >= 24, f"delivered {result.fps:.1f} fps"
    assert result.audio_onsets, "no speech in the returned audio"
    assert result.mouth_onsets, "the mouth never moved"
    assert result.speech_motion > 5 * max(result.silence_motion, 0.5), result
    assert abs(result.first_offset) <= SYNC_TOLERANCE, f"speech onset vs mouth onset: {result.first_offset * 1000:.0f} ms"
    assert len(result.offsets) >= 1
    assert abs(float(np.median(result.offsets))) <= SYNC_TOLERANCE, result.offsets


async def wait_for_frames(client: Client, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(client.recording.frames) < count:
        assert time.monotonic() < deadline, f"only {len(client.recording.frames)} frames arrived"
        await asyncio.sleep(0.05)






async def collect_events(ws, events: list[dict]) -> None:
    try:
        async for message in ws:
            event = json.loads(message)
            event["received_at"] = time.monotonic()
            events.append(event)
    except websockets.ConnectionClosed:
        pass


def test_websocket_push_with_whep_viewer(server: str, mouth_roi, tmp_path: Path) -> None:
    speech24, _ = espeak(TEXT, sample_rate=24000)
    pcm = (np.clip(speech24, -1, 1) * 32767).astype("<i2").tobytes()

    async def scenario():
        async with httpx.AsyncClient(base_url=server, timeout=20) as http:
            session_id = (await http.post("/v1/sessions", json={"avatar": "demo"})).json()["id"]
            viewer = Client(roi=mouth_roi)
            await viewer.watch(http, session_id)
            await wait_for_frames(viewer, 25)
            events: list[dict] = []
            async with websockets.connect(ws_url(server, session_id)) as ws:
                listener = asyncio.ensure_future(collect_events(ws, events))
                await ws.send(json.dumps({"type": "start", "format": "pcm_s16le", "sample_rate": 24000, "channels": 1}))
                await asyncio.sleep(1.0)
                pushed_at = time.monotonic()
                await push_realtime(ws, pcm, 24000 * 2)
                await ws.send(json.dumps({"type": "end"}))
                await asyncio.sleep(1.5)
                listener.cancel()
            session = (await http.get(f"/v1/sessions/{session_id}")).json()
            await viewer.close()
            await http.delete(f"/v1/sessions/{session_id}")
            return viewer, events, pushed_at, session

    viewer, events, pushed_at, session = asyncio.run(scenario())
    result = analyse(viewer, (pushed_at, pushed_at + len(speech24) / 24000 + 0.3))
    assert_lipsync(result)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "ready"
    started = [e for e in events if e["type"] == "speaking_started"]
    stopped = [e for e in events if e["type"] == "speaking_stopped"]
    assert started and stopped
    # Plausible media timestamps: speech spans roughly the pushed duration, in order.
    span = stopped[-1]["media_time"] - started[0]["media_time"]
    assert abs(span - len(speech24) / 24000) < 0.5, span
    assert started[0]["media_time"] >= 0.9  # one second of silence came first
    assert 0 <= started[0]["received_at"] - pushed_at < 0.6
    assert session["stats"]["latency_ms_p50"] is not None


def test_call_with_microphone(server: str, mouth_roi, speech48: np.ndarray) -> None:
    silence = np.zeros(RATE, np.float32)
    microphone = SpeechTrack(np.concatenate([silence, silence, speech48, silence, silence]))

    async def scenario():
        async with httpx.AsyncClient(base_url=server, timeout=20) as http:
            client = Client(roi=mouth_roi)
            session_id = await client.call(http, microphone, avatar="demo")
            await wait_for_frames(client, 10)
            await asyncio.sleep(len(speech48) / RATE + 3.6)
            info = (await http.get(f"/v1/sessions/{session_id}")).json()
            await client.close()
            return client, info

    client, info = asyncio.run(scenario())
    start = microphone.started_at + 2.0
    result = analyse(client, (start, start + len(speech48) / RATE + 0.3))
    assert_lipsync(result)
    # Not a speed check (bench/ measures latency): a ceiling far above the real ~150-250 ms that
    # still fails if the call path buffers whole utterances instead of streaming them. 400 ms
    # failed on a shared 2-core runner while another load ran.
    assert info["input"] == "call" and 0 < info["stats"]["latency_ms_p95"] < 1500


def test_interrupt_returns_to_idle_within_100ms(server: str, mouth_roi) -> None:
    speech24, _ = espeak(TEXT + " " + TEXT, sample_rate=24000)
    pcm = (np.clip(speech24, -1, 1) * 32767).astype("<i2").tobytes()

    async def scenario():
        async with httpx.AsyncClient(base_url=server, timeout=20) as http:
            session_id = (await http.post("/v1/sessions", json={})).json()["id"]
            viewer = Client(roi=mouth_roi)
            await viewer.watch(http, session_id)
            await wait_for_frames(viewer, 25)
            async with websockets.connect(ws_url(server, session_id)) as ws:
                await ws.send(json.dumps({"type": "start", "format": "pcm_s16le", "sample_rate": 24000, "channels": 1}))
                await ws.recv()
                second = 24000 * 2
                for offset in range(0, second * 6, second):  # 6 s at once: buffered ahead of real time
                    await ws.send(pcm[offset : offset + second])
                await asyncio.sleep(2.5)
                interrupted_at = time.monotonic()
                await http.post(f"/v1/sessions/{session_id}/interrupt")
                await asyncio.sleep(1.5)
            await viewer.close()
            await http.delete(f"/v1/sessions/{session_id}")
            return viewer, interrupted_at

    viewer, interrupted_at = asyncio.run(scenario())
    rec = viewer.recording
    times = rec.video_times()
    reference = np.median(np.stack(rec.frames[:10]), axis=0)
    moves = motion(rec.frames, reference)
    before = moves[(times > interrupted_at - 1.0) & (times < interrupted_at)]
    assert before.mean() > 4.0, "the mouth should be moving before the interrupt"
    idle_threshold = max(float(np.percentile(moves[:10], 95)) * 3, 2.0)
    after = np.flatnonzero(times >= interrupted_at)
    # The first frame from which the mouth stays at rest.
    resting = [i for i in after if (moves[i:] < idle_threshold).all()]
    assert resting, "the avatar never returned to idle"
    delay = times[resting[0]] - interrupted_at
    assert delay <= 0.100, f"idle {delay * 1000:.0f} ms after the interrupt"
    signal, t0 = rec.audio_signal()
    tail = signal[int((interrupted_at + 0.1 - t0) * RATE) :]
    assert np.abs(tail).max() < 0.01, "speech audio kept playing after the interrupt"


def test_whip_ingest_then_delete(server: str, speech48: np.ndarray) -> None:
    """A WHIP sender's audio drives a new session; DELETE on its Location ends it."""
    microphone = SpeechTrack(np.concatenate([np.zeros(RATE // 2, np.float32), speech48]))

    async def scenario():
        async with httpx.AsyncClient(base_url=server, timeout=20) as http:
            sender = Client()
            sender.pc.addTrack(microphone)
            response = await http.post(
                "/v1/whip?avatar=demo", content=await sender.offer(), headers={"content-type": "application/sdp"}
            )
            assert response.status_code == 201, response.text
            assert response.headers["content-type"].startswith("application/sdp")
            location = response.headers["location"]
            await sender.accept(response.text)
            session_id = location.rsplit("/", 1)[1]
            await asyncio.sleep(2.5)
            info = (await http.get(f"/v1/sessions/{session_id}")).json()
            metrics = (await http.get("/metrics")).text
            deleted = await http.delete(location)
            gone = await http.get(f"/v1/sessions/{session_id}")
            await sender.close()
            return info, metrics, deleted.status_code, gone.status_code

    info, metrics, deleted, gone = asyncio.run(scenario())
    assert info["input"] == "whip" and info["stats"]["received_seconds"] > 1.0
    assert info["stats"]["active_frames"] == 0  # nobody watches: no engine work is spent
    assert "lipstream_sessions" in metrics and "lipstream_audio_to_frame_seconds_bucket" in metrics
    assert 'lipstream_frames_total{kind="idle"}' in metrics
    lag = [line for line in metrics.splitlines() if line.startswith("lipstream_event_loop_lag_seconds ")]
    assert lag and 0.0 <= float(lag[0].split()[1]) < 1.0, lag  # sampled from the start, in seconds
    assert info["stats"]["output_lag_ms"] is None  # nobody watches: no pictures sent
    assert deleted == 200 and gone == 404
