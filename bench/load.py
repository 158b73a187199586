"""Load test with real clients: N concurrent live sessions, each driven and watched by its own process.

    python bench/load.py --url http://127.0.0.1:8000 --sessions N [--mode ws|webrtc|mixed]
                         [--talk all|conversational] [--duration S] [--ramp S] [--key KEY] [--out DIR]
    python bench/load.py --spawn-server [--config FILE] --sessions N ...    # starts its own server
    python bench/load.py ... --write-doc                                       # docs/benchmarks.md

Each session is a separate client process (multiprocessing, spawn), so the clients' Python does
not run on the server's event loop:

- ``ws``: ``POST /v1/sessions``, a WHEP viewer receiving the video and audio, and an audio
  WebSocket pushing s16le 16 kHz speech in 20 ms chunks paced in real time (``end`` after each
  utterance, nothing sent during pauses, as a TTS would).
- ``webrtc``: ``POST /v1/calls`` with a microphone track (48 kHz, 20 ms frames, silence between
  utterances, as a browser would), receiving the avatar back on the same peer connection.
- ``mixed``: even sessions ``ws``, odd ones ``webrtc``.

Speech is espeak-ng, made once by this process. ``--talk all`` loops sentences with ~0.3 s
pauses; ``--talk conversational`` alternates a sentence (1-4 s) with a silence of the same length
(50 % talking), in an order and with a lead-in seeded per session.

Timeline: every session connects (staggered over ``--ramp`` s) and reports ready once video
arrives; when all are ready (or the set-up timeout passes) every session starts talking at the
same moment, for ``--duration`` s: that window, with every session live, is what is measured.

Per session: frames received, delivered fps in the window (frames arrived / window length),
inter-frame gaps over 100 ms and the longest gap (by arrival at the client), and the
audio-to-frame latency of each utterance onset: the sender-clock time (RTP timestamp mapped to
the server's send time, see tests/rtc_client.py) of the first frame whose mouth region moves off
rest, minus the wall time the client sent the utterance's first sample. Also the same latency by
arrival at the client (decode and jitter buffer included), the A/V offset of those onsets against
the returned audio, and the server's own stats for the session (``GET /v1/sessions/{id}``).
Overall: sessions OK (fps >= 24, no gap > 250 ms), latency percentiles over all onsets, late
and dropped frames, server CPU (``/proc/<pid>/stat`` of the server and its children; 100 % = one
core), client and machine CPU, GPU utilisation and memory (``nvidia-smi``, if present).

Writes ``DIR/load-<timestamp>.json`` and ``DIR/load-<timestamp>.png`` (needs matplotlib:
``pip install matplotlib``; without it only the JSON is written) and prints a summary. Every
run is bounded in time, and sessions (``DELETE``), client processes and a spawned server are
cleaned up on exit and on Ctrl-C.

WebRTC stays on loopback by default (``--ice-addresses 127.0.0.1``); pass ``--ice-addresses ''``
to let aiortc offer every interface when the server is on another machine.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import multiprocessing as mp
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

OK_FPS = 24.0
OK_MAX_GAP_MS = 250.0
GAP_MS = 100.0
LEAD_SECONDS = 1.0  # silence before each session's first utterance (+ up to 1 s, per session)
PAUSE_ALL = 0.3  # pause between sentences for --talk all
TAIL_SECONDS = 1.2  # keep receiving after the window, so the last utterances' frames arrive
SETUP_TIMEOUT = 40.0  # for one session to connect and receive video
ONSET_WINDOW = 1.5  # a mouth onset more than this after the sent onset is "missed"

# Sentences of about 1 to 4 s at espeak-ng's 150 words per minute.
SENTENCES = [
    "Hello there.",
    "Good morning!",
    "How can I help you today?",
    "Sure, let me check that for you.",
    "Your order shipped on Monday.",
    "I am a talking avatar, and my lips move with my words.",
    "Thank you for waiting, it will only take a moment.",
    "The weather tomorrow looks sunny and warm, with a light breeze.",
    "Would you like to hear more about our plans?",
    "Please say that again, a little more slowly.",
]


# =========================================================================================
# Talk plans: (start seconds after the talk moment, sentence index), both modes alike
# =========================================================================================
def make_plan(
    talk: str, durations: list[float], duration: float, seed: int
) -> tuple[list[tuple[float, int]], float]:
    """Utterances fitting in ``duration`` seconds; returns (plan, lead-in seconds)."""
    rng = np.random.default_rng(seed)
    lead = LEAD_SECONDS + float(rng.uniform(0.0, 1.0))
    order = list(rng.permutation(len(durations)))
    plan: list[tuple[float, int]] = []
    t = lead
    k = 0
    while True:
        index = int(order[k % len(order)])
        k += 1
        if talk == "conversational":
            # 1-4 s utterances (the sentences' own lengths) alternating with equal silences.
            candidates = [i for i, d in enumerate(durations) if 1.0 <= d <= 4.0]
            candidates = candidates or list(range(len(durations)))
            index = int(rng.choice(candidates))
        if t + durations[index] > duration - 0.2:  # near the end: the longest sentence that still fits
            fitting = [i for i, d in enumerate(durations) if t + d <= duration - 0.2]
            if not fitting:
                break
            index = max(fitting, key=lambda i: durations[i])
        d = durations[index]
        plan.append((round(t, 3), index))
        t += d + (PAUSE_ALL if talk == "all" else d)
    return plan, lead


# =========================================================================================
# Client process
# =========================================================================================
def session_main(spec: dict[str, Any], messages, talk_at, stop) -> None:  # noqa: ANN001
    """Entry point of one client process: runs one session, puts ("result", index, dict)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent coordinates Ctrl-C through ``stop``
    index = spec["index"]
    cpu0 = time.process_time()
    wall0 = time.monotonic()
    try:
        result = asyncio.run(_run_session(spec, messages, talk_at, stop))
    except BaseException as exc:  # noqa: BLE001 - reported, never raised across processes
        result = {"index": index, "mode": spec["mode"], "error": f"{type(exc).__name__}: {exc}"[:500]}
    wall = max(1e-6, time.monotonic() - wall0)
    result["client_cpu_percent"] = round(100 * (time.process_time() - cpu0) / wall, 1)
    messages.put(("result", index, result))


async def _run_session(spec: dict[str, Any], messages, talk_at, stop) -> dict[str, Any]:  # noqa: ANN001, C901
    from fractions import Fraction

    import av
    import httpx
    import websockets
    from aiortc import MediaStreamTrack

    from server.webrtc import configure_host_addresses
    from tests.rtc_client import CHUNK, RATE, Client

    if spec["ice_addresses"] is not None:
        configure_host_addresses(spec["ice_addresses"])

    index, mode = spec["index"], spec["mode"]
    clips = spec["clips16"] if mode == "ws" else spec["clips48"]
    durations = spec["durations"]
    plan, _ = make_plan(spec["talk"], durations, spec["duration"], spec["seed"])
    roi = spec["roi"]

    class LoadClient(Client):
        """Keeps only the luminance of the mouth region (or a small thumbnail) of each frame."""

        async def _read_video(self, track) -> None:  # noqa: ANN001
            rec = self.recording
            async for frame in self._frames(track):
                gray = frame.to_ndarray(format="gray")
                if roi is not None and gray.shape[0] >= roi[3] and gray.shape[1] >= roi[2]:
                    x1, y1, x2, y2 = roi
                    image = gray[y1:y2, x1:x2].copy()
                else:
                    step = max(1, max(gray.shape) // 96)
                    image = gray[::step, ::step].copy()
                rec.video_pts.append(frame.pts)
                rec.video_arrival.append(time.monotonic())
                rec.frames.append(image)

    class PlanTrack(MediaStreamTrack):
        """A microphone playing the plan from the shared talk moment, silence before and after."""

        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self.signal = np.zeros(int((spec["duration"] + 1) * RATE), np.float32)
            self.onset_samples = []
            for start, i in plan:
                s = int(round(start * RATE))
                clip = clips[i][: len(self.signal) - s]
                self.signal[s : s + len(clip)] = clip
                self.onset_samples.append(s)
            self.onset_sent: dict[int, float] = {}
            self.max_lag = 0.0
            self._t0: float | None = None
            self._index = 0

        async def recv(self):  # noqa: ANN201
            if self._t0 is None:
                self._t0 = time.monotonic()
            due = self._t0 + self._index * CHUNK / RATE
            delay = due - time.monotonic()
            t_talk = talk_at.value
            if delay > 0:
                await asyncio.sleep(delay)
            elif 0 < t_talk <= due:  # pacing slips while talking (a starved client bursts to catch up)
                self.max_lag = max(self.max_lag, -delay)
            chunk = np.zeros(CHUNK, np.float32)
            sent = time.monotonic()
            if t_talk > 0:
                p = int(round((due - t_talk) * RATE))
                lo, hi = max(p, 0), min(p + CHUNK, len(self.signal))
                if hi > lo:
                    chunk[lo - p : hi - p] = self.signal[lo:hi]
                for k, s in enumerate(self.onset_samples):
                    if k not in self.onset_sent and p <= s < p + CHUNK:
                        self.onset_sent[k] = sent + (s - p) / RATE
            pcm = np.clip(chunk * 32767, -32768, 32767).astype(np.int16).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
            frame.sample_rate = RATE
            frame.pts = self._index * CHUNK
            frame.time_base = Fraction(1, RATE)
            self._index += 1
            return frame

    headers = {"Authorization": f"Bearer {spec['key']}"} if spec["key"] else {}
    base = spec["url"]
    events: list[dict[str, Any]] = []
    sent_onsets: dict[int, float] = {}
    push_lag = 0.0
    result: dict[str, Any] = {"index": index, "mode": mode, "talk": spec["talk"], "seed": spec["seed"]}

    while time.monotonic() < spec["connect_at"]:
        if stop.is_set():
            raise RuntimeError("stopped before connecting")
        await asyncio.sleep(0.02)

    async def wait_frames(client: Client, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(client.recording.frames) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(client.recording.frames)} video frames within {timeout:.0f} s")
            if stop.is_set():
                raise RuntimeError("stopped during set-up")
            await asyncio.sleep(0.05)

    async def listen(ws) -> None:  # noqa: ANN001
        try:
            async for message in ws:
                if isinstance(message, str):
                    event = json.loads(message)
                    event["at"] = time.monotonic()
                    events.append(event)
        except websockets.ConnectionClosed:
            pass

    session_id: str | None = None
    ws = None
    listener = None
    client: Client | None = None
    track = None
    setup_start = time.monotonic()
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:
        try:
            if mode == "ws":
                response = await http.post("/v1/sessions", json={"avatar": spec["avatar"]})
                response.raise_for_status()
                session_id = response.json()["id"]
                messages.put(("created", index, session_id))
                client = LoadClient()
                await client.watch(http, session_id)
                ws_url = base.replace("http", "ws", 1) + f"/v1/sessions/{session_id}/audio"
                ws = await websockets.connect(ws_url, additional_headers=headers, open_timeout=30)
                start_message = {"type": "start", "format": "pcm_s16le", "sample_rate": 16000, "channels": 1}
                await ws.send(json.dumps(start_message))
                ready = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if ready.get("type") != "ready":
                    raise RuntimeError(f"WebSocket start answered {ready}")
                listener = asyncio.ensure_future(listen(ws))
            else:
                track = PlanTrack()
                client = LoadClient()
                session_id = await client.call(http, track, avatar=spec["avatar"])
                messages.put(("created", index, session_id))
            await wait_frames(client, 10, SETUP_TIMEOUT)
            result["session_id"] = session_id
            result["setup_seconds"] = round(time.monotonic() - setup_start, 3)
            messages.put(("ready", index, session_id))

            deadline = time.monotonic() + 120
            while talk_at.value <= 0:
                if stop.is_set() or time.monotonic() > deadline:
                    raise RuntimeError("never told to talk")
                await asyncio.sleep(0.01)
            t_talk = talk_at.value
            t_end = t_talk + spec["duration"]

            try:
                if mode == "ws":
                    chunk_bytes = 640  # 20 ms of s16le 16 kHz mono
                    for k, (start, i) in enumerate(plan):
                        pcm = clips[i]
                        for j, offset in enumerate(range(0, len(pcm), chunk_bytes)):
                            due = t_talk + start + j * 0.02
                            while due - time.monotonic() > 0.1 and not stop.is_set():  # silences
                                await asyncio.sleep(0.1)
                            delay = due - time.monotonic()
                            if delay > 0:
                                await asyncio.sleep(delay)
                            else:
                                push_lag = max(push_lag, -delay)
                            if j == 0:
                                sent_onsets[k] = time.monotonic()
                            await ws.send(pcm[offset : offset + chunk_bytes])
                            if stop.is_set():
                                break
                        await ws.send(json.dumps({"type": "end"}))
                        if stop.is_set():
                            break
                while time.monotonic() < t_end + TAIL_SECONDS and not stop.is_set():
                    await asyncio.sleep(0.05)
                if stop.is_set() and time.monotonic() < t_end:  # interrupted: measure what ran
                    t_end = time.monotonic()
                    result["stopped_early"] = True
            except Exception as exc:  # noqa: BLE001 - what arrived is still analysed
                result["error"] = f"while talking: {type(exc).__name__}: {exc}"[:500]
            if mode == "webrtc":
                sent_onsets = dict(track.onset_sent)
                push_lag = track.max_lag

            server = await http.get(f"/v1/sessions/{session_id}")
            result["server"] = server.json() if server.status_code == 200 else {"status": server.status_code}
        finally:
            if listener is not None:
                listener.cancel()
            if ws is not None:
                try:
                    await asyncio.wait_for(ws.close(), 5)
                except Exception:  # noqa: BLE001
                    pass
            if client is not None:
                try:
                    await asyncio.wait_for(client.close(), 10)
                except Exception:  # noqa: BLE001
                    pass
            if session_id is not None:
                try:
                    await http.delete(f"/v1/sessions/{session_id}", timeout=10)
                except Exception:  # noqa: BLE001
                    pass

    result.update(analyse(client, plan, durations, sent_onsets, t_talk, t_end))
    if result.get("error"):
        result["ok"] = False
    result["plan_utterances"] = len(plan)
    result["talk_fraction"] = round(sum(durations[i] for _, i in plan) / spec["duration"], 3)
    result["max_send_lag_ms"] = round(push_lag * 1000, 1)
    result["ws_errors"] = [e for e in events if e.get("type") == "error"][:5]
    result["speaking_started_events"] = sum(1 for e in events if e.get("type") == "speaking_started")
    return result


# =========================================================================================
# Analysis (in the client process, where the frames are)
# =========================================================================================
def _pct(values, q: float) -> float | None:  # noqa: ANN001
    values = [v for v in values if v is not None and not math.isnan(v)]
    return round(float(np.percentile(values, q)), 1) if values else None


def analyse(client, plan, durations, sent_onsets, t_talk, t_end) -> dict[str, Any]:  # noqa: ANN001, C901
    from tests.rtc_client import envelope, motion

    rec = client.recording
    out: dict[str, Any] = {"frames_received": len(rec.frames)}
    if len(rec.frames) < 10:
        out["error"] = f"only {len(rec.frames)} video frames received"
        return out
    arrivals = np.asarray(rec.video_arrival)
    times = rec.video_times()  # sender clock (server send time), by the RTP mapping

    # Delivery in the window where every session was live.
    inside = (arrivals >= t_talk) & (arrivals <= t_end)
    window = t_end - t_talk
    out["fps"] = round(float(inside.sum()) / window, 2)
    edges = np.concatenate([[t_talk], arrivals[inside], [t_end]])
    gaps = np.diff(edges)
    out["gaps_over_100ms"] = int((gaps > GAP_MS / 1000).sum())
    out["max_gap_ms"] = round(float(gaps.max()) * 1000, 1)
    sent = np.sort(times[(times >= t_talk) & (times <= t_end)])
    sender_gaps = np.diff(np.concatenate([[t_talk], sent, [t_end]])) if len(sent) else np.array([window])
    out["sender_max_gap_ms"] = round(float(sender_gaps.max()) * 1000, 1)
    # Send time minus arrival: how far behind the RTP schedule frames arrived (decode + jitter buffer).
    out["arrival_delay_ms_p50"] = _pct((arrivals[inside] - times[inside]) * 1000, 50)

    # Mouth motion, against the resting mouth in stretches with no speech near them.
    onset_list = [(k, sent_onsets[k]) for k in sorted(sent_onsets)]
    spans = [(sent_onsets[k], sent_onsets[k] + durations[plan[k][1]]) for k in sent_onsets]
    quiet = times > times[0] + 0.5
    for a, b in spans:
        quiet &= ~((times > a - 0.1) & (times < b + 0.8))
    if quiet.sum() < 5:
        quiet = np.zeros(len(times), bool)
        quiet[: min(10, len(times))] = True
    frames = rec.frames
    if len({f.shape for f in frames}) > 1:  # the resolution changed mid-stream: use the common size
        shape = frames[-1].shape
        frames = [f if f.shape == shape else np.zeros(shape, np.uint8) for f in frames]
    reference = np.median(np.stack([f for f, q in zip(frames, quiet, strict=True) if q]), axis=0)
    moves = motion(frames, reference)
    rest_noise = float(np.percentile(moves[quiet], 95))
    threshold = max(4.0 * rest_noise, 0.1 * float(np.percentile(moves, 99.5)), 1.0)
    moving = moves > threshold
    out["motion_threshold"] = round(threshold, 2)
    out["rest_motion_p95"] = round(rest_noise, 3)

    signal_, t0 = rec.audio_signal()
    env = envelope(signal_) if len(signal_) else np.zeros(0)
    env_times = t0 + np.arange(len(env)) * 0.01
    env_threshold = 0.1 * float(np.percentile(env, 99.5)) if len(env) else 0.0

    def first_rise(active: np.ndarray, at: np.ndarray, begin: float, limit: float) -> tuple[int | None, bool]:
        """The first index in [begin, limit) where ``active`` turns on after being off; and
        whether ``active`` was on at all there (on all along: still the previous utterance)."""
        span = np.flatnonzero((at >= begin) & (at < limit))
        for i in span:
            if active[i] and i > 0 and not active[i - 1]:
                return int(i), True
        return None, bool(active[span].any()) if len(span) else False

    # An utterance's mouth onset is the first rise from rest after (a) its audio was sent (motion
    # cannot precede it) and (b) the previous utterance has played out: when the latency exceeds
    # the pause between utterances, the previous one's last words are still on screen after the
    # next one was sent. (b) is the end of the previous utterance plus its own measured latency.
    latencies, arrival_latencies, av_offsets = [], [], []
    missed = unclear = 0
    video_free = audio_free = -np.inf  # when the previous utterance has played out, video / audio
    sounding = env > env_threshold if len(env) else np.zeros(0, bool)
    for n, (k, u) in enumerate(onset_list):
        length = durations[plan[k][1]]
        limit = u + ONSET_WINDOW
        if n + 1 < len(onset_list):
            limit = min(limit, onset_list[n + 1][1] + 0.1)
        rise, active = first_rise(moving, times, max(u, video_free), limit)
        audio_rise = None
        if len(env):
            audio_rise, _ = first_rise(sounding, env_times, max(u, audio_free), limit)
            if audio_rise is not None:
                audio_free = u + length + (env_times[audio_rise] - u) + 0.05
        if rise is None:
            video_free = u + length + (float(np.median(latencies)) / 1000 if latencies else 0.0) + 0.05
            if u <= t_end - 0.5:
                unclear += active
                missed += not active
            continue
        video_free = u + length + (times[rise] - u) + 0.05
        if u > t_end - 0.5:
            continue
        latencies.append((times[rise] - u) * 1000)
        arrival_latencies.append((arrivals[rise] - u) * 1000)
        if audio_rise is not None:
            av_offsets.append((times[rise] - env_times[audio_rise]) * 1000)
    out["onsets_sent"] = sum(1 for _, u in onset_list if u <= t_end - 0.5)
    out["onsets_measured"] = len(latencies)
    out["onsets_missed"] = missed
    out["onsets_unclear"] = unclear
    out["latency_ms"] = [round(v, 1) for v in latencies]
    out["latency_ms_p50"] = _pct(latencies, 50)
    out["latency_ms_p95"] = _pct(latencies, 95)
    out["latency_ms_p99"] = _pct(latencies, 99)
    out["arrival_latency_ms"] = [round(v, 1) for v in arrival_latencies]
    out["arrival_latency_ms_p50"] = _pct(arrival_latencies, 50)
    out["av_offset_ms"] = [round(v, 1) for v in av_offsets]
    out["av_offset_ms_median"] = _pct(av_offsets, 50)
    out["ok"] = bool(out["fps"] >= OK_FPS and out["max_gap_ms"] <= OK_MAX_GAP_MS)
    return out


# =========================================================================================
# Samplers (in the parent): CPU from /proc, GPU from nvidia-smi
# =========================================================================================
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime + stime ticks) for every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return table


def _tree(table: dict[int, tuple[int, int]], roots: set[int]) -> set[int]:
    members = {p for p in roots if p in table}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in table.items():
            if ppid in members and pid not in members:
                members.add(pid)
                grew = True
    return members


def _machine_ticks() -> tuple[int, int, int]:
    """(total, idle, steal) ticks of all CPUs; steal: time a hypervisor gave to other guests."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]), idle, fields[7] if len(fields) > 7 else 0


class CpuSampler(threading.Thread):
    """Every ``period`` s: CPU % (100 = one core) of the server's process tree, of the client
    processes, and of the whole machine."""

    def __init__(self, server_pid: int | None, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.server_pid = server_pid
        self.client_pids: set[int] = set()
        self.period = period
        self.samples: list[dict[str, float | None]] = []
        self._halt = threading.Event()
        self.available = Path("/proc/stat").exists()

    def run(self) -> None:
        if not self.available:
            return
        last: dict[int, int] = {}
        last_t = time.monotonic()
        last_machine = _machine_ticks()
        table = _proc_table()
        for pid, (_, ticks) in table.items():
            last[pid] = ticks
        while not self._halt.wait(self.period):
            now = time.monotonic()
            table = _proc_table()
            machine = _machine_ticks()
            dt = now - last_t

            server = self._usage(table, last, dt, {self.server_pid}) if self.server_pid else None
            clients = self._usage(table, last, dt, set(self.client_pids)) if self.client_pids else 0.0
            total, idle = machine[0] - last_machine[0], machine[1] - last_machine[1]
            cores = os.cpu_count() or 1
            busy = 100.0 * cores * (total - idle) / total if total > 0 else 0.0
            steal = 100.0 * cores * (machine[2] - last_machine[2]) / total if total > 0 else 0.0
            # Other programs: every process outside the server's tree, the clients and this one.
            ours = _tree(table, {self.server_pid or -1, os.getpid(), *self.client_pids})
            others = sum(max(0, t - last.get(pid, 0)) for pid, (_, t) in table.items() if pid not in ours)
            other = 100.0 * others / CLK_TCK / dt
            sample = {"t": now, "server": server, "clients": clients, "machine": busy, "other": other,
                      "steal": steal}
            self.samples.append(sample)
            last = {pid: ticks for pid, (_, ticks) in table.items()}
            last_t, last_machine = now, machine

    @staticmethod
    def _usage(table: dict[int, tuple[int, int]], last: dict[int, int], dt: float, roots: set[int]) -> float:
        """CPU % of the process trees under ``roots`` since the last sample."""
        ticks = sum(max(0, table[p][1] - last.get(p, 0)) for p in _tree(table, roots))
        return 100.0 * ticks / CLK_TCK / dt

    def stop(self) -> None:
        self._halt.set()


class GpuSampler(threading.Thread):
    def __init__(self, period: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.exe = shutil.which("nvidia-smi")
        self.period = period
        self.samples: list[dict[str, Any]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        if not self.exe:
            return
        while True:
            now = time.monotonic()
            try:
                out = subprocess.run(
                    [self.exe, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=5, check=True,
                ).stdout
                lines = [line for line in out.strip().splitlines() if line.strip()]
                rows = [[float(x) for x in line.split(",")] for line in lines]
                self.samples.append({"t": now, "util": [r[0] for r in rows], "mem_mib": [r[1] for r in rows]})
            except (subprocess.SubprocessError, ValueError, OSError):
                pass
            if self._halt.wait(self.period):
                return

    def stop(self) -> None:
        self._halt.set()


def gpu_names() -> list[str]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]
    except (subprocess.SubprocessError, OSError):
        return []


# =========================================================================================
# Server subprocess
# =========================================================================================
def _die_with_parent() -> None:
    """In the server's process (Linux): SIGTERM it if this bench dies without cleaning up."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class SpawnedServer:
    """``lipstream serve`` with the given config file plus loopback host, a free port and
    loopback-only WebRTC. LIPSTREAM_* environment variables are not passed on: the file decides."""

    def __init__(self, config: Path | None, sessions: int, workdir: Path) -> None:
        import yaml

        from tests.live_server import free_port

        data: dict[str, Any] = yaml.safe_load(config.read_text()) if config else {}
        data = data or {}
        self.port = free_port()
        data.setdefault("server", {}).update({"host": "127.0.0.1", "port": self.port})
        data["server"].setdefault("log_level", "warning")
        data.setdefault("webrtc", {})["host_addresses"] = ["127.0.0.1"]
        limits = data.setdefault("limits", {})
        limits["max_sessions"] = max(int(limits.get("max_sessions", 8)), sessions + 2)
        # The server runs in the repository root; a relative avatars.dir from the file is taken
        # relative to where this command runs, none at all means the repository's avatars/.
        avatars = data.setdefault("avatars", {}) or {}
        data["avatars"] = avatars
        avatars["dir"] = str(Path(avatars["dir"]).resolve()) if avatars.get("dir") else str(ROOT / "avatars")
        self.avatars_dir = Path(avatars["dir"])
        self.config = data
        self.path = workdir / "server.yaml"
        self.path.write_text(yaml.safe_dump(data))
        self.log_path = workdir / "server.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> None:
        import httpx

        env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSTREAM_")}
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "--config", str(self.path), "serve"],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited (code {self.process.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # SIGTERM: the server drains
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self._log.close()


# =========================================================================================
# Orchestration
# =========================================================================================
def make_speech() -> tuple[list[bytes], list[np.ndarray], list[float]]:
    """The sentences as s16le 16 kHz bytes (WebSocket) and float32 48 kHz (microphone)."""
    from tests.speech import espeak

    clips16, clips48, durations = [], [], []
    for text in SENTENCES:
        audio16, _ = espeak(text, sample_rate=16000)
        audio48, _ = espeak(text, sample_rate=48000)
        clips16.append((np.clip(audio16, -1, 1) * 32767).astype("<i2").tobytes())
        clips48.append(audio48.astype(np.float32))
        durations.append(len(audio16) / 16000)
    return clips16, clips48, durations


def mouth_roi(avatars_dir: Path | None, avatar: str) -> tuple[int, int, int, int] | None:
    """The mouth region (lip landmarks + 8 px) of the avatar's first frame, if it is on disk."""
    if avatars_dir is None or not (avatars_dir / avatar).is_dir():
        return None
    try:
        from pipeline.avatar.store import AvatarStore

        points = np.asarray(AvatarStore(avatars_dir).load(avatar).landmarks[0][48:68])
    except Exception:  # noqa: BLE001
        return None
    x1, y1 = points.min(axis=0) - 8
    x2, y2 = points.max(axis=0) + 8
    return int(max(0, x1)), int(max(0, y1)), int(x2), int(y2)


def summarise(results: list[dict[str, Any]], cpu: CpuSampler, gpu: GpuSampler, t_talk: float | None,
              t_end: float | None, n: int) -> dict[str, Any]:
    measured = [r for r in results if "fps" in r]
    servers = [r.get("server", {}).get("stats", {}) for r in results]
    frames = sum(s.get("frames", 0) or 0 for s in servers)
    late = sum(s.get("late_frames", 0) or 0 for s in servers)
    dropped = sum(s.get("dropped_frames", 0) or 0 for s in servers)
    latencies = [v for r in results for v in r.get("latency_ms", [])]
    arrival = [v for r in results for v in r.get("arrival_latency_ms", [])]
    overall: dict[str, Any] = {
        "sessions": n,
        "sessions_measured": len(measured),
        "sessions_ok": sum(1 for r in results if r.get("ok")),
        "errors": [f"#{r['index']}: {r['error']}" for r in results if r.get("error")],
        "fps_min": min((r["fps"] for r in measured), default=None),
        "fps_median": _pct([r["fps"] for r in measured], 50),
        "max_gap_ms": max((r["max_gap_ms"] for r in measured), default=None),
        "gaps_over_100ms": sum(r.get("gaps_over_100ms", 0) for r in measured),
        "frames_received": sum(r.get("frames_received", 0) for r in results),
        "onsets_sent": sum(r.get("onsets_sent", 0) for r in results),
        "onsets_measured": len(latencies),
        "latency_ms_p50": _pct(latencies, 50),
        "latency_ms_p95": _pct(latencies, 95),
        "latency_ms_p99": _pct(latencies, 99),
        "arrival_latency_ms_p50": _pct(arrival, 50),
        "arrival_latency_ms_p95": _pct(arrival, 95),
        "client_send_lag_ms_max": max((r.get("max_send_lag_ms", 0.0) for r in results), default=None),
        "server_latency_ms_p50_median": _pct([s.get("latency_ms_p50") for s in servers], 50),
        "server_latency_ms_p95_max": max(
            (s["latency_ms_p95"] for s in servers if s.get("latency_ms_p95") is not None), default=None
        ),
        "server_frames": frames,
        "server_active_frames": sum(s.get("active_frames", 0) or 0 for s in servers),
        "late_frames": late,
        "dropped_frames": dropped,
        "late_percent": round(100 * late / frames, 2) if frames else None,
        "dropped_percent": round(100 * dropped / frames, 2) if frames else None,
    }

    def window(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if t_talk is None or t_end is None:
            return samples
        return [s for s in samples if t_talk + 1.0 <= s["t"] <= t_end]

    def mean(values: list[float]) -> float | str:
        return round(float(np.mean(values)), 1) if values else "n/a"

    def largest(values: list[float]) -> float | str:
        return round(float(np.max(values)), 1) if values else "n/a"

    steady = window(cpu.samples)
    server_cpu = [s["server"] for s in steady if s["server"] is not None]
    overall["server_cpu_percent_mean"] = mean(server_cpu)
    overall["server_cpu_percent_max"] = largest(server_cpu)
    overall["server_cpu_percent_per_session"] = mean([v / n for v in server_cpu])
    overall["clients_cpu_percent_mean"] = mean([s["clients"] for s in steady])
    overall["machine_cpu_percent_mean"] = mean([s["machine"] for s in steady])
    # Everything else on the machine (other programs): a busy machine distorts the figures.
    overall["other_cpu_percent_mean"] = mean([s["other"] for s in steady])
    overall["steal_cpu_percent_mean"] = mean([s.get("steal", 0.0) for s in steady])  # VM hosts' share
    overall["machine_cores"] = os.cpu_count()
    gsteady = window(gpu.samples)
    overall["gpu_util_percent_mean"] = mean([float(np.mean(s["util"])) for s in gsteady])
    overall["gpu_util_percent_max"] = largest([float(np.max(s["util"])) for s in gsteady])
    overall["gpu_memory_mib_max"] = largest([float(np.sum(s["mem_mib"])) for s in gsteady])
    return overall


def fmt(value: Any, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:.1f}{suffix}" if abs(value) < 1000 else f"{value:.0f}{suffix}"
    return f"{value}{suffix}"


# (header, width, value of a session result) for the per-session table
COLUMNS: list[tuple[str, int, Any]] = [
    ("#", 2, lambda r, st: r["index"]),
    ("mode", 6, lambda r, st: r["mode"]),
    ("session", 10, lambda r, st: (r.get("session_id") or "")[:10]),
    ("fps", 5, lambda r, st: r.get("fps")),
    ("frames", 6, lambda r, st: r.get("frames_received")),
    ("gaps", 4, lambda r, st: r.get("gaps_over_100ms")),
    ("maxgap", 6, lambda r, st: r.get("max_gap_ms")),
    ("onsets", 6, lambda r, st: f"{r.get('onsets_measured', 0)}/{r.get('onsets_sent', 0)}"),
    ("lat50", 6, lambda r, st: r.get("latency_ms_p50")),
    ("lat95", 6, lambda r, st: r.get("latency_ms_p95")),
    ("lat99", 6, lambda r, st: r.get("latency_ms_p99")),
    ("srv50", 6, lambda r, st: st.get("latency_ms_p50")),
    ("srv95", 6, lambda r, st: st.get("latency_ms_p95")),
    ("late", 4, lambda r, st: st.get("late_frames")),
    ("drop", 4, lambda r, st: st.get("dropped_frames")),
    ("cpu%", 5, lambda r, st: r.get("client_cpu_percent")),
    ("lag", 5, lambda r, st: r.get("max_send_lag_ms")),
    ("ok", 3, lambda r, st: "yes" if r.get("ok") else "NO"),
]


def print_summary(report: dict[str, Any]) -> None:
    cfg, o = report["config"], report["overall"]
    print()
    print(f"lipstream load test: {cfg['sessions']} x {cfg['mode']} ({cfg['talk']}), {cfg['duration']:g} s, "
          f"engine {cfg.get('engine')}, {cfg['device']}")
    print("latency: onset sent -> mouth moves (sender clock), ms; srv: the server's own figures; "
          "cpu%: the client process; lag: its worst pacing slip (ms)")
    head = " ".join(f"{name:>{width}}" for name, width, _ in COLUMNS)
    print(head)
    print("-" * len(head))
    for r in report["sessions"]:
        if r.get("error") and "fps" not in r:
            print(f"{r['index']:>2} {r['mode']:6} error: {r['error'][:100]}")
            continue
        stats = r.get("server", {}).get("stats", {})
        print(" ".join(f"{fmt(value(r, stats)):>{width}}" for _, width, value in COLUMNS))
        if r.get("error"):
            print(f"   error: {r['error'][:100]}")
    print("-" * len(head))
    print(f"sessions OK: {o['sessions_ok']}/{o['sessions']} "
          f"(fps >= {OK_FPS:g}, no gap > {OK_MAX_GAP_MS:g} ms); "
          f"fps min/median {fmt(o['fps_min'])}/{fmt(o['fps_median'])}; max gap {fmt(o['max_gap_ms'], ' ms')}")
    print(f"latency over {o['onsets_measured']}/{o['onsets_sent']} onsets: p50 {fmt(o['latency_ms_p50'])}, "
          f"p95 {fmt(o['latency_ms_p95'])}, p99 {fmt(o['latency_ms_p99'])} ms "
          f"(by arrival at the client: p50 {fmt(o['arrival_latency_ms_p50'])} ms)")
    print(f"server: latency p50 {fmt(o['server_latency_ms_p50_median'])} ms (median of sessions), "
          f"p95 {fmt(o['server_latency_ms_p95_max'])} ms (max); late {o['late_frames']} "
          f"({fmt(o['late_percent'], '%')}), dropped {o['dropped_frames']} "
          f"({fmt(o['dropped_percent'], '%')}) "
          f"of {o['server_frames']} frames")
    print(f"CPU (100% = one core, {o['machine_cores']} cores): server "
          f"{fmt(o['server_cpu_percent_mean'], '%')} mean, {fmt(o['server_cpu_percent_max'], '%')} max, "
          f"{fmt(o['server_cpu_percent_per_session'], '%')} per session; clients "
          f"{fmt(o['clients_cpu_percent_mean'], '%')}; other programs "
          f"{fmt(o['other_cpu_percent_mean'], '%')}; taken by a VM host "
          f"{fmt(o['steal_cpu_percent_mean'], '%')}")
    print(f"GPU: util {fmt(o['gpu_util_percent_mean'], '%')} mean, "
          f"{fmt(o['gpu_util_percent_max'], '%')} max, "
          f"memory {fmt(o['gpu_memory_mib_max'], ' MiB')} max")
    for error in o["errors"]:
        print(f"error: {error}")


def plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no PNG was written (the JSON was). "
              "Install it with `pip install matplotlib` (the lead is asked to add a `bench` extra).")
        return False
    sessions = report["sessions"]
    cfg = report["config"]
    t0 = report["timeline"]["t_talk"] or 0.0
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    fig.suptitle(f"lipstream load: {cfg['sessions']} x {cfg['mode']} ({cfg['talk']}), {cfg['duration']:g} s, "
                 f"engine {cfg.get('engine')}, {cfg['device']}", fontsize=10)

    ax = axes[0][0]
    labels = [f"#{r['index']} {r['mode']}" for r in sessions]
    fps = [r.get("fps", 0.0) for r in sessions]
    colours = ["tab:green" if r.get("ok") else "tab:red" for r in sessions]
    ax.bar(labels, fps, width=min(0.8, 0.15 * len(labels) + 0.2), color=colours)
    ax.axhline(OK_FPS, color="k", ls="--", lw=0.8)
    ax.set_ylabel("delivered fps")
    ax.set_title("per-session fps (green: OK)")
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)

    ax = axes[0][1]
    everything = sorted(v for r in sessions for v in r.get("latency_ms", []))
    for r in sessions:
        values = sorted(r.get("latency_ms", []))
        if values:
            ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", alpha=0.3, lw=0.8)
    if everything:
        fraction = np.arange(1, len(everything) + 1) / len(everything)
        ax.step(everything, fraction, where="post", color="k", lw=2, label="all sessions")
        ax.legend(loc="lower right")
    ax.set_xlabel("audio onset sent -> mouth moves (ms, sender clock)")
    ax.set_ylabel("fraction of onsets")
    ax.set_title("latency CDF")
    ax.grid(alpha=0.3)

    ax = axes[1][0]
    cpu = report["samples"]["cpu"]
    if cpu:
        t = [s["t"] - t0 for s in cpu]
        if any(s["server"] is not None for s in cpu):
            ax.plot(t, [s["server"] for s in cpu], label="server")
        ax.plot(t, [s["clients"] for s in cpu], label="clients", alpha=0.7)
        ax.plot(t, [s["machine"] for s in cpu], label="machine", alpha=0.5, ls=":")
        ax.plot(t, [s.get("other", 0.0) for s in cpu], label="other programs", alpha=0.5, ls="--")
        ax.axhline(100 * (os.cpu_count() or 1), color="k", lw=0.6, ls="--")
        ax.legend(loc="upper left", fontsize=8)
    ax.axvspan(0, cfg["duration"], color="tab:blue", alpha=0.07)
    ax.set_xlabel("s from the talk moment (shaded: measured window)")
    ax.set_ylabel("CPU % (100 = one core)")
    ax.set_title("CPU over time")

    ax = axes[1][1]
    gpu = report["samples"]["gpu"]
    if gpu:
        t = [s["t"] - t0 for s in gpu]
        for g in range(len(gpu[0]["util"])):
            ax.plot(t, [s["util"][g] if g < len(s["util"]) else np.nan for s in gpu], label=f"GPU {g} util %")
        ax2 = ax.twinx()
        ax2.plot(t, [sum(s["mem_mib"]) for s in gpu], color="tab:gray", ls=":", label="memory MiB")
        ax2.set_ylabel("memory used (MiB)")
        ax.legend(loc="upper left", fontsize=8)
        ax.axvspan(0, cfg["duration"], color="tab:blue", alpha=0.07)
        ax.set_ylabel("utilisation %")
        ax.set_xlabel("s from the talk moment")
    else:
        ax.text(0.5, 0.5, "no GPU (nvidia-smi not found)", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title("GPU over time")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------- docs section
DOC_ROWS = "<!-- load-rows "


def write_doc(report: dict[str, Any], title: str, doc: Path | None = None) -> None:
    """One table row per (sessions, mode, talk), replacing an older row of the same key; rows are
    kept as JSON in a comment, so each run updates the section. Text after ``<!-- keep -->`` stays."""
    from bench._report import DOC, write_section

    doc = doc or DOC
    text = doc.read_text() if doc.exists() else ""
    start = text.find(f"## {title}\n")
    old = ""
    if start >= 0:
        end = text.find("\n## ", start + 1)
        old = text[start : len(text) if end < 0 else end]
    rows: list[dict[str, Any]] = []
    if DOC_ROWS in old:
        blob = old[old.find(DOC_ROWS) + len(DOC_ROWS) :]
        try:
            rows = json.loads(blob[: blob.find(" -->")])
        except json.JSONDecodeError:
            rows = []
    keep = old[old.find("<!-- keep -->") :].strip() if "<!-- keep -->" in old else ""
    cfg, o = report["config"], report["overall"]
    row = {
        "date": cfg["date"], "sessions": cfg["sessions"], "mode": cfg["mode"], "talk": cfg["talk"],
        "duration": cfg["duration"], "ok": f"{o['sessions_ok']}/{o['sessions']}",
        "fps": f"{fmt(o['fps_min'])} / {fmt(o['fps_median'])}", "gap": fmt(o["max_gap_ms"]),
        "latency": f"{fmt(o['latency_ms_p50'])} / {fmt(o['latency_ms_p95'])} / {fmt(o['latency_ms_p99'])}",
        "onsets": f"{o['onsets_measured']}/{o['onsets_sent']}",
        "arrival": f"{fmt(o['arrival_latency_ms_p50'])} / {fmt(o['arrival_latency_ms_p95'])}",
        "server": f"{fmt(o['server_latency_ms_p50_median'])} / {fmt(o['server_latency_ms_p95_max'])}",
        "late": f"{fmt(o['late_percent'])} / {fmt(o['dropped_percent'])}",
        "cpu": f"{fmt(o['server_cpu_percent_mean'])} ({fmt(o['server_cpu_percent_per_session'])})",
        "others": f"{fmt(o['clients_cpu_percent_mean'])} / {fmt(o['other_cpu_percent_mean'])}",
        "lag": fmt(o["client_send_lag_ms_max"]),
        "gpu": f"{fmt(o['gpu_util_percent_mean'])} / {fmt(o['gpu_memory_mib_max'])}",
        "command": cfg.get("doc_command", cfg["command"]),
    }
    key = ("sessions", "mode", "talk")
    rows = [r for r in rows if any(r.get(k) != row[k] for k in key)] + [row]
    rows.sort(key=lambda r: (r["talk"] != "all", {"ws": 0, "webrtc": 1}.get(r["mode"], 2), r["sessions"]))
    with_gpu = any(r["gpu"] != "n/a / n/a" for r in rows)
    server = cfg["url"]
    if cfg["spawn_server"]:
        server = "spawned by the bench (`--spawn-server`: its config, loopback WebRTC)"
    lines = [
        f"Device: {cfg['device']}. Engine: {cfg.get('engine')}, avatar `{cfg['avatar']}`. Server: {server}. "
        "Command: `python bench/load.py` (each row gives its arguments). Each session is its own client "
        "process on the same machine, so the clients' CPU is taken from the server's. `ws`: speech pushed "
        "over the audio WebSocket (s16le 16 kHz, 20 ms chunks in real time) and watched by a WHEP viewer; "
        "`webrtc`: a call (`POST /v1/calls`) sending a microphone track and receiving the avatar. `all`: "
        "sentences with 0.3 s pauses; `conversational`: 1-4 s sentences alternating with equal silences. "
        "All sessions talk during the same window (s).",
        "",
        "Columns: **OK** = sessions with >= 24 fps and no gap over 250 ms. **fps** = min / median over "
        "sessions. **gap** = the longest wait between two frames at any client (ms). **latency** = from the "
        "client sending an utterance's first sample to the first frame with the mouth moving, on the "
        "server's send clock (RTP mapping), p50 / p95 / p99 over all utterance onsets (ms); **onsets** = "
        "measured / sent. **at arrival** = the same latency to the frame's arrival at the client, after "
        "network, decoding and the client's jitter buffer: it also shows frames the server sent late. "
        "**server** = the server's own audio-to-frame latency, median of the sessions' "
        "p50 / largest p95 (ms). **late / dropped** = % of the server's frames. **server CPU** = % of one "
        "core used by the server's processes, mean over the window (per session). **clients / other** = "
        "% of one core used by the client processes / by other programs on the machine during the run. "
        "**lag** = the worst real-time pacing slip of a client's audio sender (ms): a starved client.",
        "",
        "| date | sessions | mode | talk | s | OK | fps | gap | latency p50/p95/p99 | onsets "
        "| at arrival p50/p95 | server p50/p95 | late / dropped % | server CPU % "
        "| clients / other CPU % | lag |"
        + (" GPU util % / MiB |" if with_gpu else "") + " arguments |",
        "|---" * (17 + with_gpu) + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['date']} | {r['sessions']} | {r['mode']} | {r['talk']} | {r['duration']:g} | {r['ok']} "
            f"| {r['fps']} | {r['gap']} | {r['latency']} | {r['onsets']} | {r.get('arrival', '-')} "
            f"| {r['server']} | {r['late']} "
            f"| {r['cpu']} | {r['others']} | {r['lag']} |" + (f" {r['gpu']} |" if with_gpu else "")
            + f" `{r['command'].replace('python bench/load.py ', '')}` |"
        )
    lines += ["", f"{DOC_ROWS}{json.dumps(rows)} -->"]
    body = "\n".join(lines)
    if keep:
        body += "\n\n" + keep
    write_section(title, body, doc)
    print(f"wrote the section '{title}' of {doc}")


# ------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running server (default http://127.0.0.1:8000)")
    where.add_argument("--spawn-server", action="store_true", help="start a server subprocess for the run")
    parser.add_argument("--config", type=Path, help="config file for --spawn-server (host, port, WebRTC "
                        "addresses and max_sessions are set by the bench)")
    parser.add_argument("--server-pid", type=int, help="pid of the --url server, to sample its CPU")
    parser.add_argument("--sessions", type=int, default=1, help="concurrent sessions (a process each)")
    parser.add_argument("--mode", choices=["ws", "webrtc", "mixed"], default="ws")
    parser.add_argument("--talk", choices=["all", "conversational"], default="all")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds all sessions talk (measured)")
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds over which sessions connect")
    parser.add_argument("--avatar", default="demo")
    parser.add_argument("--avatars-dir", type=Path, help="where the avatar is prepared, for the mouth region "
                        "(default: the spawned server's, else ./avatars)")
    parser.add_argument("--key", help="API key (Authorization: Bearer)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="talk plans use seed + session index")
    parser.add_argument("--ice-addresses", default="127.0.0.1",
                        help="comma-separated ICE host addresses for the clients; '' = every interface")
    parser.add_argument("--write-doc", action="store_true", help="update its section of docs/benchmarks.md")
    parser.add_argument("--doc", type=Path, help="markdown file for --write-doc (default docs/benchmarks.md)")
    parser.add_argument("--doc-title", help="section title (default 'Load test (<device>, <engine> engine)')")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.sessions > 64:
        parser.error("--sessions must be 1..64")
    if not 1 <= args.duration <= 600:
        parser.error("--duration must be 1..600 s")
    if args.config and not args.spawn_server:
        parser.error("--config goes with --spawn-server")
    if args.config and not args.config.is_file():
        parser.error(f"--config {args.config}: no such file")
    args.url = (args.url or "http://127.0.0.1:8000").rstrip("/")
    return args


def _interrupt(signum, frame) -> None:  # noqa: ANN001
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:  # noqa: C901
    args = parse_args(argv)
    # Ctrl-C and SIGTERM both stop the run cleanly (also when started in the background, where
    # SIGINT would otherwise be ignored).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    import httpx

    from bench._report import cpu_name

    given = sys.argv[1:] if argv is None else argv
    command = "python bench/load.py " + " ".join(shlex.quote(a) for a in given)
    # What reproduces the figures, for the docs: without where the results and the docs go.
    shown, skip = [], False
    for a in given:
        if skip:
            skip = False
        elif a in ("--out", "--doc", "--doc-title"):
            skip = True
        elif a != "--write-doc" and not a.startswith(("--out=", "--doc=", "--doc-title=")):
            shown.append(a)
    doc_command = "python bench/load.py " + " ".join(shlex.quote(a) for a in shown)
    gpus = gpu_names()
    device = f"{cpu_name()} ({os.cpu_count()} cores)" + (f", {', '.join(gpus)}" if gpus else ", no GPU")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="lipstream-load-"))

    print(f"making speech with espeak-ng ({len(SENTENCES)} sentences) ...", flush=True)
    clips16, clips48, durations = make_speech()

    server: SpawnedServer | None = None
    ctx = mp.get_context("spawn")
    processes: list[mp.Process] = []
    created: dict[int, str] = {}
    results: dict[int, dict[str, Any]] = {}
    stop = ctx.Event()
    talk_at = ctx.Value("d", 0.0)
    messages = ctx.Queue()
    cpu = gpu = None
    interrupted = False
    t_talk = t_end = None
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    report: dict[str, Any] | None = None
    try:
        if args.spawn_server:
            server = SpawnedServer(args.config, args.sessions, workdir)
            print(f"starting a server on {server.url} (log: {server.log_path}) ...", flush=True)
            server.start()
            url, server_pid = server.url, server.process.pid
            avatars_dir = args.avatars_dir or server.avatars_dir
        else:
            url, server_pid = args.url, args.server_pid
            avatars_dir = args.avatars_dir or (ROOT / "avatars")
        with httpx.Client(base_url=url, headers=headers, timeout=10) as http:
            dev = http.get("/v1/devices")
            dev.raise_for_status()
            engine = dev.json()["devices"][0].get("engine")
        roi = mouth_roi(avatars_dir, args.avatar)
        if roi is None:
            print(f"note: avatar '{args.avatar}' not found under {avatars_dir}: mouth motion is measured on "
                  "a thumbnail of the whole frame (pass --avatars-dir for the mouth region)")

        cpu = CpuSampler(server_pid)
        gpu = GpuSampler()
        cpu.start()
        gpu.start()

        n = args.sessions
        t0 = time.monotonic() + 1.0
        ice = None if args.ice_addresses is None else [a for a in args.ice_addresses.split(",") if a.strip()]
        for i in range(n):
            mode = args.mode if args.mode != "mixed" else ("ws" if i % 2 == 0 else "webrtc")
            spec = {
                "index": i, "mode": mode, "talk": args.talk, "duration": args.duration, "url": url,
                "key": args.key, "avatar": args.avatar, "seed": args.seed + i, "roi": roi,
                "ice_addresses": ice,
                "connect_at": t0 + (args.ramp * i / n if n > 1 else 0.0),
                "clips16": clips16 if mode == "ws" else [], "clips48": clips48 if mode == "webrtc" else [],
                "durations": durations,
            }
            p = ctx.Process(
                target=session_main, args=(spec, messages, talk_at, stop), name=f"load-{i}", daemon=True
            )
            p.start()
            processes.append(p)
            cpu.client_pids.add(p.pid)
        print(f"{n} client processes started; connecting over {args.ramp:g} s ...", flush=True)

        ready: set[int] = set()
        setup_deadline = t0 + args.ramp + SETUP_TIMEOUT + 10
        final_deadline: float | None = None
        while len(results) < n:
            now = time.monotonic()
            if t_talk is None and (len(ready | set(results)) == n or now > setup_deadline):
                t_talk = time.monotonic() + 0.5
                t_end = t_talk + args.duration
                talk_at.value = t_talk
                final_deadline = t_end + TAIL_SECONDS + 45
                print(f"{len(ready)}/{n} sessions ready; talking for {args.duration:g} s ...", flush=True)
            if final_deadline is not None and now > final_deadline:
                print("warning: some client processes did not finish in time; stopping them")
                break
            try:
                kind, index, payload = messages.get(timeout=0.2)
            except queue.Empty:
                if all(not p.is_alive() for p in processes) and messages.empty():
                    break
                continue
            if kind == "created":
                created[index] = payload
            elif kind == "ready":
                ready.add(index)
            elif kind == "result":
                results[index] = payload
                if payload.get("error") and "fps" not in payload:
                    print(f"session #{index}: {payload['error']}", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        if t_end is not None and time.monotonic() < t_end:
            t_end = time.monotonic()
        print("\ninterrupted: stopping the sessions ...", flush=True)
    except Exception as exc:  # noqa: BLE001
        print(f"error: {exc}", file=sys.stderr)
        interrupted = True
    finally:
        stop.set()
        deadline = time.monotonic() + 15
        for p in processes:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        while True:  # results that came in while stopping
            try:
                kind, index, payload = messages.get_nowait()
            except (queue.Empty, OSError, ValueError):
                break
            if kind == "created":
                created[index] = payload
            elif kind == "result":
                results.setdefault(index, payload)
        for p in processes:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
        if created and (server is None or server.process.poll() is None):
            try:
                with httpx.Client(base_url=url, headers=headers, timeout=5) as http:
                    for session_id in created.values():
                        http.delete(f"/v1/sessions/{session_id}")  # 404 when the client already did
            except Exception:  # noqa: BLE001
                pass
        if cpu is not None:
            cpu.stop()
        if gpu is not None:
            gpu.stop()
        if server is not None:
            server.stop()
            shutil.copy(server.log_path, args.out / f"load-{stamp}-server.log")
        shutil.rmtree(workdir, ignore_errors=True)
        if cpu is not None:
            cpu.join(timeout=2)
            gpu.join(timeout=6)

    if cpu is None:  # nothing ran
        return 1
    sessions = [results.get(i, {"index": i, "mode": "?", "error": "no result"}) for i in range(args.sessions)]
    overall = summarise(sessions, cpu, gpu, t_talk, t_end, args.sessions)
    report = {
        "config": {
            "command": command, "doc_command": doc_command, "date": datetime.date.today().isoformat(),
            "started": stamp, "url": url,
            "spawn_server": bool(args.spawn_server),
            "server_config": str(args.config) if args.config else None,
            "sessions": args.sessions, "mode": args.mode, "talk": args.talk, "duration": args.duration,
            "ramp": args.ramp, "avatar": args.avatar, "engine": engine, "device": device, "cpu": cpu_name(),
            "cores": os.cpu_count(), "gpus": gpus, "mouth_roi": roi, "seed": args.seed,
            "interrupted": interrupted, "sentences": SENTENCES,
            "sentence_seconds": [round(d, 3) for d in durations],
        },
        "timeline": {"t_talk": t_talk, "t_end": t_end},
        "overall": overall,
        "sessions": sessions,
        "samples": {
            "cpu": [{**s, "t": round(s["t"], 3)} for s in cpu.samples],
            "gpu": gpu.samples,
        },
    }
    json_path = args.out / f"load-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=1, default=str))
    png_path = args.out / f"load-{stamp}.png"
    print_summary(report)
    drew = plot(report, png_path)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if drew else ""))
    if args.write_doc and not interrupted:
        gpu_label = gpus[0] if gpus else "CPU"
        write_doc(report, args.doc_title or f"Load test ({gpu_label}, {engine} engine)", args.doc)
    return 130 if interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
