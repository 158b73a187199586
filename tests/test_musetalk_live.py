"""The whole MuseTalk engine end to end on a CPU: a live session in a real server, and `render`.

Weights are synthetic checkpoints in the official layout with the *micro* configuration
(``synthetic.MICRO_OVERRIDES``: the official interfaces with narrow layers), because CI machines
have two cores. Measured on this 2-core machine: the tiny configuration's UNet + VAE take
~100-150 ms per frame and its Whisper encoder ~1.6 s per 30 s window, far from 25 fps; the micro
one ~20-30 ms per frame and ~0.2-0.4 s per window. Even so a CPU cannot run a Whisper pass per
frame in real time: the FeatureWorker merges a session's backlog into shared windows (up to 25
frames a pass), and the session's ``processing_seconds`` is raised to 2 s (default 0.06) so that
catching up happens inside the release delay; frames then leave on the clock at 25 fps. The
utterance is short (~1.2 s) and the server runs torch with one OpenMP thread per op (two worker
threads on two cores; with the default, their OpenMP teams oversubscribe the cores and stall for
0.5-1 s: 3 failures in 7 runs before, 8 passes in 8 after). The random model's pictures are
noise-like, so lip motion is not asserted (tests/test_live.py does that with the lite engine).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
websockets = pytest.importorskip("websockets")

from tests.live_server import ROOT, push_realtime, running_server, ws_url
from tests.rtc_client import Client
from tests.speech import SpeechClip, espeak

pytestmark = pytest.mark.slow

TEXT = "Hello there, avatar."  # ~1.2 s: a 2-core CPU catches up inside the 2 s budget


@pytest.fixture(scope="module")
def micro_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.engines.musetalk.synthetic import MICRO_OVERRIDES, write_synthetic_checkpoints

    return write_synthetic_checkpoints(
        tmp_path_factory.mktemp("musetalk-micro"), tiny=True, seed=2, overrides=MICRO_OVERRIDES
    )


def engine_section(models: Path) -> dict:
    return {"name": "musetalk", "devices": ["cpu"], "dtype": "fp32", "models_dir": str(models), "batch_size": 8}


@pytest.mark.parametrize("workers", ["thread", "process"])
def test_musetalk_live_session_over_websocket_and_whep(
    avatars_root: Path, micro_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: str
) -> None:
    """``workers``: the engine's threads in the server process, or a device process (the GPU
    default) whose Whisper tokens stay there and whose pictures come back by shared memory."""
    # The server runs Whisper (feature thread) and UNet + VAE (engine thread) at once; with torch's
    # default of one OpenMP thread per core each, two cores are oversubscribed and OpenMP's
    # spinning threads starve each other (measured: stalls of 0.5-1 s). One thread per op here.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    speech, rate = espeak(TEXT, sample_rate=24000)
    pcm = (np.clip(speech, -1, 1) * 32767).astype("<i2").tobytes()
    overrides = {
        "engine": {**engine_section(micro_models), "device_workers": workers},
        "sessions": {"processing_seconds": 2.0},
        "limits": {"audio_buffer_seconds": 8},
    }

    async def scenario(url: str):
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            (device,) = (await http.get("/v1/devices")).json()["devices"]
            assert (device["process"] is not None) == (workers == "process")
            session_id = (await http.post("/v1/sessions", json={"avatar": "demo"})).json()["id"]
            viewer = Client()
            await viewer.watch(http, session_id)
            deadline = time.monotonic() + 20
            while len(viewer.recording.frames) < 25:
                assert time.monotonic() < deadline, "no video from the session"
                await asyncio.sleep(0.05)
            events: list[dict] = []
            async with websockets.connect(ws_url(url, session_id)) as ws:

                async def listen() -> None:
                    try:
                        async for message in ws:
                            events.append(json.loads(message))
                    except websockets.ConnectionClosed:
                        pass

                listener = asyncio.ensure_future(listen())
                await ws.send(json.dumps({"type": "start", "format": "pcm_s16le", "sample_rate": rate, "channels": 1}))
                await asyncio.sleep(0.5)
                await push_realtime(ws, pcm, rate * 2)
                await ws.send(json.dumps({"type": "end"}))
                await asyncio.sleep(3.5)  # the release delay (2.2 s) and a little silence after
                listener.cancel()
            session = (await http.get(f"/v1/sessions/{session_id}")).json()
            await viewer.close()
            await http.delete(f"/v1/sessions/{session_id}")
            return viewer, events, session

    with running_server(avatars_root, tmp_path, overrides) as url:
        viewer, events, session = asyncio.run(scenario(url))

    arrivals = np.array(viewer.recording.video_arrival)
    steady = (arrivals > arrivals[0] + 0.5) & (arrivals < arrivals[-1] - 0.2)
    fps = (steady.sum() - 1) / (arrivals[steady][-1] - arrivals[steady][0])
    assert fps >= 20, f"delivered {fps:.1f} fps"
    stats = session["stats"]
    assert stats["active_frames"] > 0, stats  # the engine generated frames for the speech
    assert any(e["type"] == "speaking_started" for e in events), events
    assert all(f.shape == viewer.recording.frames[0].shape for f in viewer.recording.frames)


def test_musetalk_render_cli(avatars_root: Path, micro_models: Path, speech: SpeechClip, tmp_path: Path) -> None:
    import av
    import yaml

    config = tmp_path / "render.yaml"
    config.write_text(yaml.safe_dump({"avatars": {"dir": str(avatars_root)}, "engine": engine_section(micro_models)}))
    out = tmp_path / "musetalk.mp4"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSTREAM_")}
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "--config", str(config), "render", "--engine", "musetalk",
         "--avatar", "demo", "--audio", str(speech.path), "--out", str(out), "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = len(speech.samples) * 25 // speech.sample_rate  # floor(duration * 25)
    assert f"{expected} frames" in proc.stdout
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        audio = container.streams.audio[0]
        assert audio.codec_context.name == "aac"
        assert abs(float(audio.duration * audio.time_base) - speech.duration) <= 0.04
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    assert len(frames) == expected
    width, height = frames[0].shape[1], frames[0].shape[0]
    assert (width, height) == (512, 512)
