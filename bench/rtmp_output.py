"""CPU cost of RTMP output per stream at 720p and 1080p, measured on a real server.

    python bench/rtmp_output.py [--seconds 20] [--write]

For each size, an avatar is prepared from scikit-image's astronaut photograph, scaled to the
frame height and letterboxed (1280x720, 1920x1080). A real ``lipstream serve`` (lite engine) gets
a session of that avatar, fed with espeak-ng speech in real time over the WebSocket the whole
time, and the server process's CPU time (all threads, from /proc) is measured over
``--seconds`` three times: with frames generated but not encoded (the only output is an RTMP
URL that refuses connections, so the engine works as for a viewer and the encoder idles), with
one RTMP output to a local nginx-rtmp, and with a second RTMP URL of the same session (which
shares the first one's encode). The differences are the cost of a stream. Needs nginx with libnginx-mod-rtmp (``make test`` installs them).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import cpu_name, write_section
from pipeline.avatar.demo import demo_image
from pipeline.avatar.prepare import prepare_avatar
from pipeline.avatar.store import AvatarStore
from server.config import Settings
from tests.live_server import free_port, running_server
from tests.speech import espeak

SIZES = {"hd720": (1280, 720), "hd1080": (1920, 1080)}
RTMP_MODULE = Path("/usr/lib/nginx/modules/ngx_rtmp_module.so")


def letterboxed(width: int, height: int) -> np.ndarray:
    image = demo_image()
    side = min(width, height)
    scaled = cv2.resize(image, (side, side), interpolation=cv2.INTER_CUBIC)
    canvas = np.zeros((height, width, 3), np.uint8)
    x, y = (width - side) // 2, (height - side) // 2
    canvas[y : y + side, x : x + side] = scaled
    return canvas


def start_nginx(root: Path, port: int) -> subprocess.Popen:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx) or not RTMP_MODULE.exists():
        sys.exit("error: needs nginx with its RTMP module (apt-get install nginx libnginx-mod-rtmp)")
    conf = root / "nginx.conf"
    conf.write_text(
        f"load_module {RTMP_MODULE};\nmaster_process off;\npid {root}/nginx.pid;\nerror_log {root}/error.log;\n"
        f"events {{ worker_connections 64; }}\n"
        f"rtmp {{ server {{ listen 127.0.0.1:{port}; application live {{ live on; record off; }} }} }}\n"
    )
    process = subprocess.Popen([nginx, "-c", str(conf), "-p", str(root), "-g", "daemon off;"])
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            time.sleep(0.05)
    sys.exit("error: nginx did not start")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def histogram_mean(metrics: str, name: str) -> tuple[float, float]:
    total = float(re.search(rf"^{name}_sum (\S+)$", metrics, re.MULTILINE).group(1))
    count = float(re.search(rf"^{name}_count (\S+)$", metrics, re.MULTILINE).group(1))
    return total, count


async def measure(url: str, pid: int, avatar: str, rtmp_base: str, seconds: float, pcm: bytes) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        session_id = (await http.post("/v1/sessions", json={"avatar": avatar})).json()["id"]
        ws = await websockets.connect(url.replace("http://", "ws://") + f"/v1/sessions/{session_id}/audio")
        await ws.send(json.dumps({"type": "start", "format": "pcm_s16le", "sample_rate": 24000, "channels": 1}))

        async def speak() -> None:  # speech in real time, looped, for the whole measurement
            chunk = 960  # 20 ms at 24 kHz, 16-bit
            start, n = time.monotonic(), 0
            while True:
                for offset in range(0, len(pcm), chunk):
                    await ws.send(pcm[offset : offset + chunk])
                    n += 1
                    delay = start + n * 0.02 - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)

        speaker = asyncio.ensure_future(speak())

        async def window() -> dict:
            metrics = (await http.get("/metrics")).text
            enc0 = histogram_mean(metrics, "lipstream_output_encode_seconds")
            cpu0, wall0 = cpu_seconds(pid), time.monotonic()
            await asyncio.sleep(seconds)
            cpu1, wall1 = cpu_seconds(pid), time.monotonic()
            metrics = (await http.get("/metrics")).text
            enc1 = histogram_mean(metrics, "lipstream_output_encode_seconds")
            frames = enc1[1] - enc0[1]
            return {
                "cpu": (cpu1 - cpu0) / (wall1 - wall0),
                "encode_ms": 1000 * (enc1[0] - enc0[0]) / frames if frames else None,
            }

        # Frames are only generated while someone watches, so the baseline has a watcher that
        # costs nothing else: an RTMP output to a closed port (retrying; nothing is encoded while
        # no output takes packets).
        dead = f"rtmp://127.0.0.1:{free_port()}/live/nobody"
        await http.post(f"/v1/sessions/{session_id}/outputs/rtmp", json={"url": dead})
        await asyncio.sleep(3)
        baseline = await window()
        outputs = []
        for name in ("a", "b"):
            response = await http.post(f"/v1/sessions/{session_id}/outputs/rtmp", json={"url": f"{rtmp_base}/{avatar}-{name}"})
            outputs.append(response.json()["id"])
            while (await http.get(f"/v1/sessions/{session_id}/outputs")).json()["outputs"][-1]["state"] != "live":
                await asyncio.sleep(0.05)
            await asyncio.sleep(2)
            if name == "a":
                one = await window()
            else:
                two = await window()
        listed = (await http.get(f"/v1/sessions/{session_id}/outputs")).json()["outputs"][1:]
        first = listed[0]
        bitrate = 8 * first["bytes"] / (time.time() - first["created"])
        dropped = sum(o["dropped_frames"] for o in listed)
        speaker.cancel()
        await ws.close()
        await http.delete(f"/v1/sessions/{session_id}")
    return {"baseline": baseline, "one": one, "two": two, "bitrate": bitrate, "dropped": dropped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each CPU measurement window")
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="lipstream-rtmp-bench-"))
    store = AvatarStore(tmp / "avatars")
    for avatar_id, (width, height) in SIZES.items():
        prepare_avatar(letterboxed(width, height), avatar_id, store, source_name=f"astronaut letterboxed {width}x{height}")
    speech, _ = espeak("The quick brown fox jumps over the lazy dog. " * 3, sample_rate=24000)
    pcm = (np.clip(speech, -1, 1) * 32767).astype("<i2").tobytes()
    nginx_port = free_port()
    nginx = start_nginx(tmp, nginx_port)
    rtmp = Settings().rtmp
    results = {}
    try:
        with running_server(tmp / "avatars", tmp) as url:
            for avatar_id in SIZES:
                results[avatar_id] = asyncio.run(
                    measure(url, url.process.pid, avatar_id, f"rtmp://127.0.0.1:{nginx_port}/live", args.seconds, pcm)
                )
                print(avatar_id, results[avatar_id], flush=True)
    finally:
        nginx.terminate()
        nginx.wait(10)

    cmd = "python bench/rtmp_output.py" + (f" --seconds {args.seconds:g}" if args.seconds != 20 else "") + " --write"
    rows = []
    for avatar_id, (width, height) in SIZES.items():
        r = results[avatar_id]
        base, one, two = r["baseline"]["cpu"], r["one"]["cpu"], r["two"]["cpu"]
        rows.append(
            f"| {width}x{height} | {100 * base:.0f}% | {100 * one:.0f}% | **{100 * (one - base):.0f}%** | "
            f"{100 * (two - one):.0f}% | {r['one']['encode_ms']:.1f} | {r['bitrate'] / 1e6:.2f} | {r['dropped']} |"
        )
    intro = (
        f"Date: {datetime.date.today()}. Device: {cpu_name()}, {os.cpu_count()} cores (no pinning: x264 uses "
        f"its own threads). Command: `{cmd}`."
    )
    setup = (
        "A real server (lite engine) with one session of a letterboxed astronaut avatar at each size, fed "
        "espeak-ng speech in real time the whole time; CPU is the server process's (all threads) over "
        f"{args.seconds:g} s windows, in % of one core. The baseline already makes every frame (its only "
        "output is an RTMP URL that refuses connections, so the engine works as for a viewer while nothing "
        "is encoded). Encoding settings are the defaults: x264 "
        f"`{rtmp.preset}` + `zerolatency`, {rtmp.video_bitrate / 1e6:g} Mbit/s, GOP {rtmp.gop_seconds:g} s; "
        f"AAC {rtmp.audio_bitrate // 1000} kbit/s mono 48 kHz; FLV to a local nginx-rtmp."
    )
    header = (
        "| frame | session, frames made, no encode | + 1 RTMP stream | cost of the stream | "
        "+ 2nd URL (shared encode) | encode ms/frame | Mbit/s sent | frames dropped |"
    )
    notes = (
        "The cost of a stream is almost all x264; a second URL of the same session costs only its muxing "
        "and socket (one encode is shared by every RTMP output and recording of a session). Divide the "
        "machine's cores by the stream cost for a rough ceiling on concurrent streams at that size."
    )
    body = "\n".join([intro, "", setup, "", header, "|---|---|---|---|---|---|---|---|", *rows, "", notes])
    print(body)
    if args.write:
        write_section("RTMP output (CPU)", body)


if __name__ == "__main__":
    main()
