"""Load test with real clients: N concurrent live sessions, each driven and watched by its own process.

    python bench/load.py --url http://127.0.0.1:8000 --sessions N [--mode ws|webrtc|mixed]
                         [--talk all|conversational] [--duration S] [--ramp S] [--key KEY] [--out DIR]
    python bench/load.py --spawn-server [--config FILE] --sessions N ...    # starts its own server
    python bench/load.py ... --write-doc                                       # docs/benchmarks.md
    python bench/load.py --spawn-server --config FILE --scenarios 16:all,29:conversational ...
    python bench/load.py --make-speech DIR        # the sentences as WAV files (needs espeak-ng)
    python bench/load.py ... --speech-dir DIR     # speech from those files (no espeak-ng needed)
    python bench/load.py --report A.json [B.json ...] --write-doc   # docs from saved reports

``--scenarios`` runs several loads in sequence against one server (one start, which for a GPU
engine includes minutes of compilation): ``N:talk[:mode[:seconds]]`` items separated by commas,
e.g. ``16:all,18:all,29:conversational``; ``--mode`` and ``--duration`` are the defaults of the
items. Between two scenarios the bench deletes what is left of its sessions and waits until the
server lists none of them. Each scenario writes its own JSON and PNG (and doc row).

Each session is a separate client process (multiprocessing, spawn), so the clients' Python does
not run on the server's event loop:

- ``ws``: ``POST /v1/sessions``, a WHEP viewer receiving the video and audio, and an audio
  WebSocket pushing s16le 16 kHz speech in 20 ms chunks paced in real time (``end`` after each
  utterance, nothing sent during pauses, as a TTS would).
- ``webrtc``: ``POST /v1/calls`` with a microphone track (48 kHz, 20 ms frames, silence between
  utterances, as a browser would), receiving the avatar back on the same peer connection.
- ``mixed``: even sessions ``ws``, odd ones ``webrtc``.

Speech is espeak-ng, made once by this process, or read from ``--speech-dir`` (WAV files that
``--make-speech`` wrote with espeak-ng elsewhere, for a machine without it). ``--talk all`` loops sentences with ~0.3 s
pauses; ``--talk conversational`` alternates a sentence (1-4 s) with a silence of the same length,
each session starting at a random point of that cycle
(50 % talking), in an order and with a lead-in seeded per session.

Timeline: every session connects (staggered over ``--ramp`` s) and reports ready once video
arrives; when all are ready (or the set-up timeout passes) every session starts talking at the
same moment, for ``--duration`` s: that window, with every session live, is what is measured.

Per session: frames received, delivered fps in the window (frames arrived / window length),
inter-frame gaps over 100 ms and the longest gap (by arrival at the client), and the
audio-to-frame latency of each utterance onset: the sender-clock time (RTP timestamp mapped to
the server's send time, see tests/rtc_client.py) of the first frame whose mouth region moves off
rest, minus the wall time the client sent the utterance's first sample. Where the mouth is still
moving from the previous utterance when the next one starts (a pause shorter than the latency:
with MuseTalk the engine generates through ``--talk all``'s 0.3 s pauses), the returned audio's
delay (the server sends each frame with its own audio) plus the session's median offset of the
mouth against it stands in: the delay by cross-correlation with what was sent (:func:`echo_delay`:
the frame that carries the utterance's first sound, to 2 ms) where the session has it, else the
returned audio's envelope crossing a threshold (0-100 ms into the first syllable, so its p95 ran
80 ms above the mouth onsets' in one H200 run, 2026-12-03). The table's
onsets column counts both (mouth + audio / sent). Also the same latency by arrival at the client
(decode and jitter buffer included), the A/V offset of those onsets against the returned audio,
the cross-correlated delay at every onset (the frame carrying the first sound, which the mouth
leads by the model's look-ahead), and the server's own stats for the session
(``GET /v1/sessions/{id}``).
Late frames of a session, in the talking window: the server's own count (its video tracks'
``late_frames`` plus ``dropped_frames`` plus ``skipped_frames``, frames its device could not make
on time and showed the last picture for; since 2026-12-03 a held frame is counted as skipped only,
before it was also late when it went out late, and a session's share could pass 100 %; the difference of two ``GET /v1/sessions/{id}`` taken at
the window's start and end) and the client's (from arrival gaps: after a gap of g ms, the frames
that were due more than a frame interval before the next one came, ``ceil(g / 40) - 2``); the
larger of the two percentages is the session's late %.
Verdicts per session: **OK** = fps >= 24, no gap > 250 ms and late < 1 %; **passed** = OK and
p95 audio-to-frame latency <= 250 ms (an onset the mouth never answered counts as 1.5 s, the
longest the analysis looks; a session with no measured onset does not pass). The run's verdict
(``overall.acceptance``): every session OK, and over all onsets p95 <= 250 ms and late < 1 %. Overall: sessions OK and passed, latency
percentiles over all onsets, late and dropped frames, server CPU (``/proc/<pid>/stat`` of the
server and its children; 100 % = one core), client and machine CPU, GPU utilisation and memory
per GPU (``nvidia-smi``, if present), and what the server says of itself (``GET /v1/devices``:
engine, devices, capacity, if it has them), the engine section of a spawned server's config and
the avatar's resolution.

Writes ``DIR/load-<timestamp>.json`` and ``DIR/load-<timestamp>.png`` (needs matplotlib, the
``bench`` extra: ``pip install -e '.[bench]'``; without it only the JSON is written) and prints a summary. Every
run is bounded in time, and sessions (``DELETE``), client processes and a spawned server are
cleaned up on exit and on Ctrl-C.

WebRTC stays on loopback by default (``--ice-addresses 127.0.0.1``); pass ``--ice-addresses ''``
to let aiortc offer every interface when the server is on another machine.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import gzip
import itertools
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
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

OK_FPS = 24.0
OK_MAX_GAP_MS = 250.0
OK_LATE_PERCENT = 1.0  # late (or dropped) frames must stay under this share of the window's frames
PASS_LATENCY_P95_MS = 250.0  # audio-to-frame latency, 95th percentile, per session and overall
FRAME_SECONDS = 1 / 25  # the server's frame interval
GAP_MS = 100.0
LEAD_SECONDS = 1.0  # silence before each session's first utterance (talk all: + up to 1 s, per session)
PAUSE_ALL = 0.3  # pause between sentences for --talk all
TAIL_SECONDS = 1.2  # keep receiving after the window, so the last utterances' frames arrive
SETUP_TIMEOUT = 40.0  # for one session to connect and receive video
ONSET_WINDOW = 1.5  # a mouth onset more than this after the sent onset is "missed"
# A mouth rise further than this from its utterance's returned sound is not that utterance's
# start (s): frames carry their own audio, so the two rise together up to decoding and jitter
# buffers. In talk "all" a still-moving mouth otherwise put a later word's rise 1-1.5 s late,
# and with it the session's A/V offset (-191 to +614 ms in one H200 run), into the latency.
AV_PLAUSIBLE = 0.25
# The returned audio's delay found by cross-correlating each utterance's first ECHO_TEMPLATE s
# with what came back (envelopes at ECHO_STEP s): the delay of the frame that carries the
# utterance's first sound, as the server sends each frame with its own audio. An envelope
# threshold instead fires somewhere in the first syllable, 0-100 ms in depending on the sound
# (one H200 run: one session's onsets 190-290 ms by threshold, its mouth 140-200 ms).
ECHO_TEMPLATE = 0.6
ECHO_STEP = 0.002
MIN_ECHO_CORRELATION = 0.6
ECHO_TIE = 0.05  # correlation within this of the best counts as as good (the earliest such peak wins)

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
# Talk plans: what each session says, and when (seconds after the talk moment)
# =========================================================================================
class Utterance(NamedTuple):
    """One sentence of a plan: sent from ``start``, ``skip`` seconds into its clip, for ``length``
    seconds. Only a conversational plan's first and last utterances are ever cut (``skip`` > 0 or
    ``length`` short of the clip): a session found mid-sentence when the window opens, or still
    talking when it closes. A cut start is no onset: it is sent but not timed."""

    start: float
    index: int
    skip: float
    length: float

    @property
    def onset(self) -> bool:
        return self.skip == 0.0


def make_plan(talk: str, durations: list[float], duration: float, seed: int) -> list[Utterance]:
    """Utterances filling ``duration`` seconds (all talking, or conversational)."""
    rng = np.random.default_rng(seed)
    if talk == "conversational":
        return _conversation(durations, duration, rng)
    plan: list[Utterance] = []
    t = LEAD_SECONDS + float(rng.uniform(0.0, 1.0))
    order = list(rng.permutation(len(durations)))
    for k in itertools.count():
        index = int(order[k % len(order)])
        if t + durations[index] > duration - 0.2:  # near the end: the longest sentence that still fits
            fitting = [i for i, d in enumerate(durations) if t + d <= duration - 0.2]
            if not fitting:
                break
            index = max(fitting, key=lambda i: durations[i])
        plan.append(Utterance(round(t, 3), index, 0.0, durations[index]))
        t += durations[index] + PAUSE_ALL
    return plan


def _conversation(durations: list[float], duration: float, rng: np.random.Generator) -> list[Utterance]:
    """1-4 s sentences, each followed by a silence as long, seen from a random moment of that
    alternation: at every moment of the window about half the sessions talk, as with
    independent callers who were talking before the test looked.

    Each session joins its cycle in its steady state: the cycle it is in is picked with a
    chance in proportion to its length (a long cycle covers more moments), the moment within it
    uniformly; so it may join mid-sentence (sent from there, not timed) or in a silence. Until
    2026-12-04 every session opened with a whole sentence started within the first 5 s, and
    56 % of sessions talked 4-8 s in against 50 % later: a burst the GPU had to absorb on top of
    the steady state's (docs/benchmarks.md, "Load test on the H200: findings").
    """
    candidates = [i for i, d in enumerate(durations) if 1.0 <= d <= 4.0] or list(range(len(durations)))
    lengths = np.array([durations[i] for i in candidates])
    first = candidates[int(rng.choice(len(candidates), p=lengths / lengths.sum()))]
    d = durations[first]
    t0 = LEAD_SECONDS  # the window's first second is silent for everyone: the streams settle
    into = float(rng.uniform(0.0, 2 * d))
    plan: list[Utterance] = []
    if into < d:
        plan.append(Utterance(t0, first, into, d - into))
        t = t0 + (d - into) + d
    else:
        t = t0 + (2 * d - into)
    end = duration - 0.2
    while t < end - 0.2:
        index = int(rng.choice(candidates))
        d = durations[index]
        plan.append(Utterance(t, index, 0.0, min(d, end - t)))  # cut at the window's end
        t += 2 * d
    return plan


# =========================================================================================
# Client process
# =========================================================================================
def session_main(spec: dict[str, Any], messages, talk_at, stop) -> None:  # noqa: ANN001
    """Entry point of one client process: runs one session, puts ("result", index, dict)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent coordinates Ctrl-C through ``stop``
    index = spec["index"]
    if spec.get("nice"):
        os.nice(spec["nice"])  # --client-nice: the server's processes first when the CPUs are all busy
    if spec.get("cpus"):
        os.sched_setaffinity(0, spec["cpus"])  # --client-cpus: off the server's cores
    cpu0 = time.process_time()
    wall0 = time.monotonic()
    try:
        result = asyncio.run(_run_session(spec, messages, talk_at, stop))
    except BaseException as exc:  # noqa: BLE001 - reported, never raised across processes
        response = getattr(exc, "response", None)  # httpx.HTTPStatusError: say what the server said
        said = f" ({response.text[:300]})" if response is not None else ""
        result = {"index": index, "mode": spec["mode"], "error": f"{type(exc).__name__}: {exc}{said}"[:800]}
        if response is not None:
            result["http_status"] = response.status_code
    wall = max(1e-6, time.monotonic() - wall0)
    result["client_cpu_percent"] = round(100 * (time.process_time() - cpu0) / wall, 1)
    result["client_nice"] = os.nice(0)
    result["client_cpus"] = sorted(os.sched_getaffinity(0))
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
    plan = make_plan(spec["talk"], durations, spec["duration"], spec["seed"])
    roi = spec["roi"]

    class LoadClient(Client):
        """Keeps only the luminance of the mouth region (or a small thumbnail) of each frame."""

        video_size: tuple[int, int] | None = None

        async def _read_video(self, track) -> None:  # noqa: ANN001
            rec = self.recording
            async for frame in self._frames(track):
                if self.video_size is None:
                    self.video_size = (frame.width, frame.height)
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
            self.onset_samples: dict[int, int] = {}  # plan index -> its first sample, for onsets only
            for k, u in enumerate(plan):
                s = int(round(u.start * RATE))
                skip = int(round(u.skip * RATE))
                clip = clips[u.index][skip : skip + int(round(u.length * RATE))][: len(self.signal) - s]
                self.signal[s : s + len(clip)] = clip
                if u.onset:
                    self.onset_samples[k] = s
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
                for k, s in self.onset_samples.items():
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

            async def stats_at(moment: float) -> dict[str, Any] | None:
                """The server's stats of this session at ``moment`` (the window's start)."""
                await asyncio.sleep(max(0.0, moment - time.monotonic()))
                try:
                    response = await http.get(f"/v1/sessions/{session_id}", timeout=5)
                    return response.json().get("stats") if response.status_code == 200 else None
                except Exception:  # noqa: BLE001 - the totals are used instead
                    return None

            start_stats = asyncio.ensure_future(stats_at(t_talk))
            try:
                if mode == "ws":
                    chunk_bytes = 640  # 20 ms of s16le 16 kHz mono
                    for k, u in enumerate(plan):
                        skip = 2 * int(round(u.skip * 16000))
                        pcm = clips[u.index][skip : skip + 2 * int(round(u.length * 16000))]
                        for j, offset in enumerate(range(0, len(pcm), chunk_bytes)):
                            due = t_talk + u.start + j * 0.02
                            while due - time.monotonic() > 0.1 and not stop.is_set():  # silences
                                await asyncio.sleep(0.1)
                            delay = due - time.monotonic()
                            if delay > 0:
                                await asyncio.sleep(delay)
                            else:
                                push_lag = max(push_lag, -delay)
                            if j == 0 and u.onset:
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
            result["server_stats_at_start"] = await start_stats
            result["video_size"] = client.video_size
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

    if spec["clips16"]:
        sent_audio = [(np.frombuffer(c, "<i2").astype(np.float32) / 32768, 16000) for c in spec["clips16"]]
    else:
        sent_audio = [(np.asarray(c, np.float32), 48000) for c in spec["clips48"]]
    result.update(analyse(client, plan, sent_onsets, t_talk, t_end, sent_audio))
    judge(result, t_end - t_talk)
    result["plan_utterances"] = len(plan)
    result["talk_fraction"] = round(sum(u.length for u in plan) / spec["duration"], 3)
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


def echo_delay(sent: np.ndarray, sent_rate: int, returned: np.ndarray, returned_rate: int, start: float,
               search: float) -> tuple[float, float] | None:
    """(delay s, correlation) of ``sent`` (an utterance's audio) in ``returned`` from sample
    ``start`` s on, by the normalised cross-correlation of their envelopes over ``search`` s of
    lags; None where ``returned`` has too little there or nothing correlates well enough."""
    template = _smooth_envelope(np.asarray(sent[: int(ECHO_TEMPLATE * sent_rate)], np.float32), sent_rate)
    lo = int(round(start * returned_rate))
    hi = lo + int((search + ECHO_TEMPLATE) * returned_rate)
    if lo < 0 or hi > len(returned) or len(template) < 10:
        return None
    heard = _smooth_envelope(returned[lo:hi], returned_rate)
    n = len(template)
    if len(heard) < n:
        return None
    t = template - template.mean()
    norm = float(np.linalg.norm(t))
    if norm == 0.0:
        return None
    windows = np.lib.stride_tricks.sliding_window_view(heard, n)
    w = windows - windows.mean(axis=1, keepdims=True)
    corr = (w @ t) / (np.linalg.norm(w, axis=1) * norm + 1e-12)
    best = float(corr.max())
    if best < MIN_ECHO_CORRELATION:
        return None
    # the earliest peak about as good as the best: speech with a steady rhythm also matches
    # itself a syllable or two later, and the utterance came back once, first
    rising = corr >= np.concatenate([[-np.inf], corr[:-1]])
    falling = corr >= np.concatenate([corr[1:], [-np.inf]])
    k = int(np.flatnonzero((corr >= best - ECHO_TIE) & rising & falling)[0])
    return k * ECHO_STEP, float(corr[k])


def _smooth_envelope(signal: np.ndarray, rate: int, width: float = 0.01) -> np.ndarray:
    """RMS over ``width`` s windows every ECHO_STEP s: wide enough that a voice's pitch period
    does not ripple it, sampled finely enough for the delay's resolution."""
    power = np.concatenate([[0.0], np.cumsum(np.asarray(signal, np.float64) ** 2)])
    n, hop = int(width * rate), int(ECHO_STEP * rate)
    starts = np.arange(0, len(signal) - n + 1, hop)
    return np.sqrt((power[starts + n] - power[starts]) / n)


def analyse(client, plan, sent_onsets, t_talk, t_end, sent_audio=None) -> dict[str, Any]:  # noqa: ANN001, C901
    """``sent_audio``: per sentence, (its samples, their rate), for the returned audio's
    cross-correlated delay (:func:`echo_delay`)."""
    from tests.rtc_client import RATE, envelope, motion

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
    # Frames the viewer got late: after a gap g, the frames due more than one frame interval
    # before the next one arrived (ceil(g / interval) - 2 of them; none for g <= 2 intervals).
    out["client_late_frames"] = int(sum(max(0, math.ceil(g / FRAME_SECONDS - 1e-6) - 2) for g in gaps))
    out["client_late_percent"] = round(100 * out["client_late_frames"] / max(1.0, window / FRAME_SECONDS), 2)
    sent = np.sort(times[(times >= t_talk) & (times <= t_end)])
    sender_gaps = np.diff(np.concatenate([[t_talk], sent, [t_end]])) if len(sent) else np.array([window])
    out["sender_max_gap_ms"] = round(float(sender_gaps.max()) * 1000, 1)
    # Send time minus arrival: how far behind the RTP schedule frames arrived (decode + jitter buffer).
    out["arrival_delay_ms_p50"] = _pct((arrivals[inside] - times[inside]) * 1000, 50)
    # ... split at the frame's first RTP packet: the server and the network before it, this
    # client's jitter buffer and decoder after it
    clock = rec.video_clock
    first = np.array([clock.first_arrival.get(clock.unwrap(clock.rtp(p)), np.nan) for p in rec.video_pts])
    decode = (arrivals[inside] - first[inside]) * 1000
    out["packet_delay_ms_p50"] = _pct((first[inside] - times[inside]) * 1000, 50)
    out["decode_delay_ms_p50"] = _pct(decode, 50)
    out["decode_delay_ms_p95"] = _pct(decode, 95)

    # Mouth motion, against the resting mouth in stretches with no speech near them.
    onset_list = [(k, sent_onsets[k]) for k in sorted(sent_onsets)]
    # Onsets sent in the last half second may not have played out before the window closed:
    # they steer the search for the next one but are not counted.
    counted_onsets = {k for k, u in onset_list if u <= t_end - 0.5}
    # Every utterance's span, a conversation's cut first one too (sent from its plan time, no
    # onset): frames inside any are no resting mouth.
    starts = {k: sent_onsets.get(k, t_talk + u.start) for k, u in enumerate(plan)}
    spans = [(starts[k], starts[k] + u.length) for k, u in enumerate(plan) if k in sent_onsets or not u.onset]
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
    plausible_offsets: list[float] = []  # the A/V offsets of mouth rises within AV_PLAUSIBLE of their sound
    # The returned audio's delay at every counted onset, by cross-correlation (ECHO_TEMPLATE), ms
    echo_at: dict[int, float] = {}
    if sent_audio and len(signal_):
        for k, u in onset_list:
            if k in counted_onsets:
                samples, rate = sent_audio[plan[k].index]
                found = echo_delay(samples, rate, signal_, RATE, u - t0, ONSET_WINDOW)
                if found is not None:
                    echo_at[k] = found[0] * 1000
    # Per onset: (sent time, mouth latency or None, returned-audio latency by threshold or None,
    # "missed"/"unclear"/None, returned-audio latency by cross-correlation or None)
    onsets: list[tuple[float, float | None, float | None, str | None, float | None]] = []
    missed = unclear = 0
    video_free = audio_free = -np.inf  # when the previous utterance has played out, video / audio
    sounding = env > env_threshold if len(env) else np.zeros(0, bool)
    for n, (k, u) in enumerate(onset_list):
        length = plan[k].length
        limit = u + ONSET_WINDOW
        if n + 1 < len(onset_list):
            limit = min(limit, onset_list[n + 1][1] + 0.1)
        rise, active = first_rise(moving, times, max(u, video_free), limit)
        audio_rise = audio_latency = None
        if len(env):
            audio_rise, _ = first_rise(sounding, env_times, max(u, audio_free), limit)
            if audio_rise is not None:
                audio_latency = float(env_times[audio_rise] - u)
                audio_free = u + length + audio_latency + 0.05
        counted = k in counted_onsets
        if rise is not None and audio_rise is not None and abs(times[rise] - env_times[audio_rise]) > AV_PLAUSIBLE:
            # The server sends each frame with its own audio, so the utterance's first mouth
            # movement comes with its first sound. A rise far from that sound is a later word's,
            # from a mouth still moving from the previous utterance (talk "all"): its offset
            # is kept (a real A/V fault shows there), its latency is taken from the audio.
            if counted:
                av_offsets.append((times[rise] - env_times[audio_rise]) * 1000)
            rise, active = None, True
        if rise is None:
            if audio_latency is not None:
                offset = float(np.median(plausible_offsets)) / 1000 if plausible_offsets else 0.0
                guess = audio_latency + offset
            else:
                guess = float(np.median(latencies)) / 1000 if latencies else 0.0
            video_free = u + length + guess + 0.05
            if counted:
                unclear += active
                missed += not active
                onsets.append((u, None, None if audio_latency is None else audio_latency * 1000,
                               "unclear" if active else "missed", echo_at.get(k)))
            continue
        video_free = u + length + (times[rise] - u) + 0.05
        if not counted:
            continue
        latencies.append((times[rise] - u) * 1000)
        arrival_latencies.append((arrivals[rise] - u) * 1000)
        if audio_rise is not None:
            av_offsets.append((times[rise] - env_times[audio_rise]) * 1000)
            plausible_offsets.append(av_offsets[-1])
        onsets.append((u, latencies[-1], None if audio_latency is None else audio_latency * 1000, None, echo_at.get(k)))
    out["onsets_sent"] = len(counted_onsets)
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
    # Every onset's audio-to-frame latency: the mouth's where it rose from rest; where the mouth was
    # still moving from the previous utterance (a pause shorter than the latency, as in --talk all
    # with MuseTalk: the engine keeps generating through short pauses), the returned audio's delay
    # plus this session's median A/V offset (the server sends a frame's audio with that frame, so
    # the utterance's first sound marks the frame that carries its start). The delay is the
    # cross-correlated one (to ECHO_STEP) with the offset of the mouth against it, where the
    # session has both for some onset; else the envelope threshold's onset (which fires 0-100 ms
    # into the first syllable) with the offset of the mouth against that. An onset with no mouth
    # motion at all is missed.
    offset = float(np.median(plausible_offsets)) if plausible_offsets else 0.0
    out["av_offset_ms_used"] = round(offset, 1)
    echo_offsets = [mouth - echo for _, mouth, _, _, echo in onsets
                    if mouth is not None and echo is not None and abs(mouth - echo) <= AV_PLAUSIBLE * 1000]
    echo_offset = float(np.median(echo_offsets)) if echo_offsets else None
    out["echo_offset_ms_used"] = None if echo_offset is None else round(echo_offset, 1)
    combined, by_audio, by_echo = [], 0, 0
    for _, mouth, audio, what, echo in onsets:
        if mouth is not None:
            combined.append(mouth)
        elif what == "unclear" and echo is not None and echo_offset is not None:
            combined.append(echo + echo_offset)
            by_audio += 1
            by_echo += 1
        elif what == "unclear" and audio is not None:
            combined.append(audio + offset)
            by_audio += 1
    out["audio_latency_ms"] = [None if a is None else round(a, 1) for _, _, a, _, _ in onsets]
    out["audio_latency_ms_p50"] = _pct([a for _, _, a, _, _ in onsets if a is not None], 50)
    out["onset_latency_ms"] = [round(v, 1) for v in combined]
    out["onset_latency_by_audio"] = by_audio
    out["onset_latency_by_echo"] = by_echo
    out["onset_latency_ms_p50"] = _pct(combined, 50)
    out["onset_latency_ms_p95"] = _pct(combined, 95)
    out["onset_latency_ms_p99"] = _pct(combined, 99)
    out["onsets_unmeasured"] = len(onsets) - len(combined)  # missed, or unclear without returned audio
    # the returned audio's delay itself: the frame that carries each utterance's first sound
    out["echo_latency_ms"] = [round(echo_at[k], 1) for k, _ in onset_list if k in echo_at]
    return out


def _p95_with_missed(latencies: list[float], missed: int) -> float | None:
    """The 95th percentile (as ``_pct``) with each onset the mouth never answered counted at the
    longest latency the analysis can see (``ONSET_WINDOW``)."""
    return _pct(list(latencies) + [ONSET_WINDOW * 1000] * missed, 95)


def _late_or_skipped(o: dict[str, Any]) -> float | None:
    """The late column: late frames plus those the device skipped (reports before 2026-12-03 have none)."""
    if o.get("late_percent") is None:
        return None
    return round(o["late_percent"] + (o.get("skipped_percent") or 0.0), 2)


def judge(result: dict[str, Any], window: float) -> None:
    """Adds the server's late frames in the talking window and the session's verdicts:
    ``ok`` (fps, gaps, late frames) and ``passed`` (ok and p95 latency)."""
    end = (result.get("server") or {}).get("stats") or {}
    start = result.get("server_stats_at_start") or {}
    if end:
        keys = ("frames", "late_frames", "dropped_frames")
        windowed = bool(start) and all(isinstance(start.get(k), int) for k in keys)
        delta = {k: (end.get(k) or 0) - ((start.get(k) or 0) if windowed else 0) for k in keys}
        # frames the device skipped (they could not be on time; the last picture held) count as
        # late: a degraded frame either way (servers before 2026-12-03 report none)
        delta["skipped_frames"] = (end.get("skipped_frames") or 0) - ((start.get("skipped_frames") or 0) if windowed else 0)
        result["server_window"] = {**delta, "windowed": windowed}
        if delta["frames"] > 0:
            bad = delta["late_frames"] + delta["dropped_frames"] + delta["skipped_frames"]
            result["server_late_percent"] = round(100 * bad / delta["frames"], 2)
    shares = [result.get(k) for k in ("server_late_percent", "client_late_percent")]
    shares = [v for v in shares if v is not None]
    result["late_percent"] = max(shares) if shares else None
    checks: dict[str, bool] = {}
    if "fps" in result:
        checks["fps"] = result["fps"] >= OK_FPS
        checks["gap"] = result["max_gap_ms"] <= OK_MAX_GAP_MS
        checks["late"] = result["late_percent"] is not None and result["late_percent"] < OK_LATE_PERCENT
        values = result.get("onset_latency_ms", [])
        p95 = _p95_with_missed(values, result.get("onsets_unmeasured", 0))
        result["latency_ms_p95_with_missed"] = p95
        checks["latency"] = p95 is not None and len(values) > 0 and p95 <= PASS_LATENCY_P95_MS
    result["checks"] = checks
    result["ok"] = bool(checks) and checks["fps"] and checks["gap"] and checks["late"] and not result.get("error")
    result["passed"] = bool(result["ok"] and checks["latency"])


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


def cpu_list(text: str | None) -> list[int] | None:
    """``"0-10,12"`` -> [0, ..., 10, 12] (Linux's CPU list syntax, as taskset takes it)."""
    if not text:
        return None
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"not a CPU list: {text!r} (e.g. 0-10,12)")
        cpus.update(range(int(first), int(last or first) + 1))
    unknown = cpus - os.sched_getaffinity(0)
    if unknown:
        raise ValueError(f"CPUs {sorted(unknown)} are not this process's to use")
    return sorted(cpus)


def _affinity(pid: int | None) -> list[int] | None:
    """The CPUs process ``pid`` may run on (None: no such process here)."""
    try:
        return sorted(os.sched_getaffinity(pid)) if pid else None
    except OSError:
        return None


def _server_preexec(cpus: list[int] | None) -> None:
    _die_with_parent()
    if cpus:
        os.sched_setaffinity(0, cpus)  # before exec: every process and thread it starts inherits it


class SpawnedServer:
    """``lipstream serve`` with the given config file plus loopback host, a free port and
    loopback-only WebRTC. LIPSTREAM_* environment variables are not passed on: the file decides."""

    def __init__(self, config: Path | None, sessions: int, workdir: Path, cpus: list[int] | None = None) -> None:
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
        self.cpus = cpus

    def start(self, timeout: float = 120.0) -> None:
        from tests.live_server import wait_until_ready

        env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSTREAM_")}
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "--config", str(self.path), "serve"],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=functools.partial(_server_preexec, self.cpus),
        )
        wait_until_ready(self.url, self.process, self.log_path, timeout, poll=0.2)

    def gone(self) -> str | None:
        """How the server process ended, if it did ("exited with code 1", "killed by SIGKILL");
        None while it runs."""
        code = None if self.process is None else self.process.poll()
        if code is None:
            return None
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with code {code}"

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
SPEECH_MANIFEST = "speech.json"


def _resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Linear resampling, as tests/speech.py's espeak() does (so both sources give the same clips)."""
    if rate == target:
        return audio.astype(np.float32)
    t_old = np.arange(len(audio)) / rate
    t_new = np.arange(int(len(audio) * target / rate)) / target
    return np.interp(t_new, t_old, audio).astype(np.float32)


def _clips(natives: list[tuple[np.ndarray, int]]) -> tuple[list[bytes], list[np.ndarray], list[float]]:
    """s16le 16 kHz bytes (WebSocket) and float32 48 kHz (microphone) of each sentence."""
    clips16, clips48, durations = [], [], []
    for audio, rate in natives:
        audio16 = _resample(audio, rate, 16000)
        clips16.append((np.clip(audio16, -1, 1) * 32767).astype("<i2").tobytes())
        clips48.append(_resample(audio, rate, 48000))
        durations.append(len(audio16) / 16000)
    return clips16, clips48, durations


def make_speech(speech_dir: Path | None = None) -> tuple[list[bytes], list[np.ndarray], list[float]]:
    """The sentences: from ``speech_dir`` (``--make-speech`` files) if given, else espeak-ng."""
    if speech_dir is not None:
        return _clips(read_speech(speech_dir))
    from tests.speech import espeak

    return _clips([espeak(text) for text in SENTENCES])


def write_speech(speech_dir: Path) -> list[Path]:
    """espeak-ng's speech of the sentences at its own rate, 16-bit WAV, and a manifest."""
    import wave

    from tests.speech import espeak

    speech_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, text in enumerate(SENTENCES):
        audio, rate = espeak(text)  # trimmed, native rate: resampled on reading, as espeak() would
        path = speech_dir / f"sentence-{i:02d}.wav"
        with wave.open(str(path), "wb") as w:  # espeak's own 16-bit samples, exactly
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(np.clip(np.round(audio * 32768), -32768, 32767).astype("<i2").tobytes())
        files.append(path)
    manifest = {"sentences": SENTENCES, "files": [f.name for f in files], "made_by": "espeak-ng -s 150"}
    (speech_dir / SPEECH_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return files


def read_speech(speech_dir: Path) -> list[tuple[np.ndarray, int]]:
    import wave

    manifest_path = speech_dir / SPEECH_MANIFEST
    if not manifest_path.is_file():
        raise SystemExit(f"--speech-dir {speech_dir}: no {SPEECH_MANIFEST}; make the clips with "
                         f"`python bench/load.py --make-speech {speech_dir}` (needs espeak-ng)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("sentences") != SENTENCES:
        raise SystemExit(f"--speech-dir {speech_dir}: made for other sentences; make them again "
                         f"with `python bench/load.py --make-speech {speech_dir}`")
    natives = []
    for name in manifest["files"]:
        with wave.open(str(speech_dir / name)) as w:
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        natives.append((pcm.astype(np.float32) / 32768.0, rate))
    return natives


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
    servers = [(r.get("server") or {}).get("stats") or {} for r in results]
    output_lags = [s.get("output_lag_ms") or {} for s in servers]  # pictures ready / sent after release
    # The server's counts in the talking window (whole-session totals where the start is unknown).
    windows = [r.get("server_window") or {} for r in results]
    frames = sum(w.get("frames", 0) for w in windows)
    late = sum(w.get("late_frames", 0) for w in windows)
    dropped = sum(w.get("dropped_frames", 0) for w in windows)
    skipped = sum(w.get("skipped_frames", 0) for w in windows)
    client_late = sum(r.get("client_late_frames", 0) for r in measured)
    latencies = [v for r in results for v in r.get("latency_ms", [])]
    combined = [v for r in results for v in r.get("onset_latency_ms", [])]
    missed = sum(r.get("onsets_missed", 0) for r in results)
    unmeasured = sum(r.get("onsets_unmeasured", 0) for r in results)
    arrival = [v for r in results for v in r.get("arrival_latency_ms", [])]
    echoes = [v for r in results for v in r.get("echo_latency_ms", [])]
    window_s = (t_end - t_talk) if t_talk is not None and t_end is not None else None
    p95_missed = _p95_with_missed(combined, unmeasured)
    overall: dict[str, Any] = {
        "sessions": n,
        "sessions_measured": len(measured),
        "sessions_ok": sum(1 for r in results if r.get("ok")),
        "sessions_passed": sum(1 for r in results if r.get("passed")),
        "window_seconds": None if window_s is None else round(window_s, 3),
        "errors": [f"#{r['index']}: {r['error']}" for r in results if r.get("error")],
        "sessions_refused": sum(1 for r in results if r.get("http_status") == 503),
        "fps_min": min((r["fps"] for r in measured), default=None),
        "fps_median": _pct([r["fps"] for r in measured], 50),
        "max_gap_ms": max((r["max_gap_ms"] for r in measured), default=None),
        "gaps_over_100ms": sum(r.get("gaps_over_100ms", 0) for r in measured),
        "frames_received": sum(r.get("frames_received", 0) for r in results),
        "onsets_sent": sum(r.get("onsets_sent", 0) for r in results),
        "onsets_measured": len(latencies),
        "onsets_missed": missed,
        "onsets_unclear": sum(r.get("onsets_unclear", 0) for r in results),
        "onsets_by_audio": sum(r.get("onset_latency_by_audio", 0) for r in results),
        "onsets_by_echo": sum(r.get("onset_latency_by_echo", 0) for r in results),
        "onsets_unmeasured": unmeasured,
        "onset_latency_ms_p50": _pct(combined, 50),
        "onset_latency_ms_p95": _pct(combined, 95),
        "onset_latency_ms_p99": _pct(combined, 99),
        "onsets_timed": len(combined),
        "latency_ms_p50": _pct(latencies, 50),
        "latency_ms_p95": _pct(latencies, 95),
        "latency_ms_p99": _pct(latencies, 99),
        "arrival_latency_ms_p50": _pct(arrival, 50),
        "arrival_latency_ms_p95": _pct(arrival, 95),
        "echo_onsets": len(echoes),
        "echo_latency_ms_p50": _pct(echoes, 50),
        "echo_latency_ms_p95": _pct(echoes, 95),
        "echo_latency_ms_p99": _pct(echoes, 99),
        "client_send_lag_ms_max": max((r.get("max_send_lag_ms", 0.0) for r in results), default=None),
        "server_latency_ms_p50_median": _pct([s.get("latency_ms_p50") for s in servers], 50),
        "server_latency_ms_p95_max": max(
            (s["latency_ms_p95"] for s in servers if s.get("latency_ms_p95") is not None), default=None
        ),
        "latency_ms_p95_with_missed": p95_missed,
        "server_frames": frames,
        "server_frames_windowed": bool(measured) and all((r.get("server_window") or {}).get("windowed")
                                                          for r in measured),
        "server_active_frames_total": sum(s.get("active_frames", 0) or 0 for s in servers),
        # the sessions' input, whole sessions: silence the clock filled in for audio that came
        # late, and pauses of delayed live input left out to catch up (servers before 2026-12-04
        # evening report none)
        "input_padded_seconds": round(sum(s.get("padded_seconds", 0) or 0 for s in servers), 2),
        "input_shortened_seconds": (round(sum(s.get("shortened_seconds", 0) or 0 for s in servers), 2)
                                    if any("shortened_seconds" in s for s in servers) else None),
        "late_frames": late,
        "dropped_frames": dropped,
        "late_percent": round(100 * late / frames, 2) if frames else None,
        "dropped_percent": round(100 * dropped / frames, 2) if frames else None,
        "skipped_frames": skipped,
        "skipped_percent": round(100 * skipped / frames, 2) if frames else None,
        # the verdict's share: late, dropped for a slow viewer, or skipped (the mouth held)
        "server_late_or_dropped_percent": round(100 * (late + dropped + skipped) / frames, 2) if frames else None,
        "client_late_frames": client_late,
        "client_late_percent": (round(100 * client_late / (len(measured) * window_s / FRAME_SECONDS), 2)
                                if measured and window_s else None),
        "late_percent_max_session": max((r["late_percent"] for r in measured
                                         if r.get("late_percent") is not None), default=None),
        # where a frame's delivery waits (medians over sessions; reports before 2026-12-03 have none)
        "output_ready_ms_p50_median": _pct([lag.get("ready_p50") for lag in output_lags], 50),
        "output_ready_ms_p95_median": _pct([lag.get("ready_p95") for lag in output_lags], 50),
        "output_sent_ms_p95_median": _pct([lag.get("sent_p95") for lag in output_lags], 50),
        "output_sent_ms_max": max((lag["sent_max"] for lag in output_lags if lag.get("sent_max") is not None),
                                  default=None),
        "packet_delay_ms_p50_median": _pct([r.get("packet_delay_ms_p50") for r in measured], 50),
        "decode_delay_ms_p50_median": _pct([r.get("decode_delay_ms_p50") for r in measured], 50),
        "decode_delay_ms_p95_max": max((r["decode_delay_ms_p95"] for r in measured
                                        if r.get("decode_delay_ms_p95") is not None), default=None),
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
    overall["clients_cpu_percent_per_session"] = mean([s["clients"] / n for s in steady])
    gsteady = window(gpu.samples)
    overall["gpu_util_percent_mean"] = mean([float(np.mean(s["util"])) for s in gsteady])
    overall["gpu_util_percent_max"] = largest([float(np.max(s["util"])) for s in gsteady])
    overall["gpu_memory_mib_max"] = largest([float(np.sum(s["mem_mib"])) for s in gsteady])
    count = max((len(s["util"]) for s in gsteady), default=0)
    overall["gpu_util_percent_mean_per_gpu"] = [
        mean([s["util"][g] for s in gsteady if g < len(s["util"])]) for g in range(count)]
    overall["gpu_memory_mib_max_per_gpu"] = [
        largest([s["mem_mib"][g] for s in gsteady if g < len(s["mem_mib"])]) for g in range(count)]

    # The acceptance in one place: every session OK (>= 24 fps, no long gap, < 1 % late), and over
    # all sessions' onsets together p95 latency <= 250 ms and late frames < 1 % (server and client
    # counts alike). ``sessions_passed`` (each session's own p95 too) is stricter and reported beside
    # it: a session has only ~5-12 onsets in 30 s, so its own p95 is about its worst onset.
    late_shares = [v for v in (overall["server_late_or_dropped_percent"], overall["client_late_percent"])
                   if v is not None]
    overall["acceptance"] = {
        "all_sessions_ok": overall["sessions_ok"] == n,
        "latency_p95_ok": p95_missed is not None and p95_missed <= PASS_LATENCY_P95_MS,
        "late_ok": bool(late_shares) and max(late_shares) < OK_LATE_PERCENT,
        "fps_ok": overall["fps_min"] is not None and overall["fps_min"] >= OK_FPS and len(measured) == n,
    }
    overall["acceptance"]["passed"] = all(overall["acceptance"].values())
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
    ("onsets", 7, lambda r, st: f"{r.get('onsets_measured', 0)}+{r.get('onset_latency_by_audio', 0)}"
                                f"/{r.get('onsets_sent', 0)}"),
    ("lat50", 6, lambda r, st: r.get("onset_latency_ms_p50")),
    ("lat95", 6, lambda r, st: r.get("onset_latency_ms_p95")),
    ("lat99", 6, lambda r, st: r.get("onset_latency_ms_p99")),
    ("srv50", 6, lambda r, st: st.get("latency_ms_p50")),
    ("srv95", 6, lambda r, st: st.get("latency_ms_p95")),
    ("late", 4, lambda r, st: (r.get("server_window") or {}).get("late_frames")),
    ("drop", 4, lambda r, st: (r.get("server_window") or {}).get("dropped_frames")),
    ("clate", 5, lambda r, st: r.get("client_late_frames")),
    ("late%", 5, lambda r, st: r.get("late_percent")),
    ("cpu%", 5, lambda r, st: r.get("client_cpu_percent")),
    ("lag", 5, lambda r, st: r.get("max_send_lag_ms")),
    ("ok", 3, lambda r, st: "yes" if r.get("ok") else "NO"),
    ("pass", 4, lambda r, st: "yes" if r.get("passed") else "NO"),
]


def print_summary(report: dict[str, Any]) -> None:
    cfg, o = report["config"], report["overall"]
    print()
    info = report.get("server") or {}
    print(f"lipstream load test: {cfg['sessions']} x {cfg['mode']} ({cfg['talk']}), {cfg['duration']:g} s, "
          f"engine {cfg.get('engine')}, {cfg['device']}")
    size = cfg.get("avatar_size")
    sources = [s for s in info.get("capacity_source") or [] if s]
    per_device = info.get("capacity_per_device") or []
    print(f"server: devices {', '.join(map(str, cfg.get('devices') or [])) or '-'}; capacity "
          f"{fmt(cfg.get('capacity'))}"
          + (f" ({' + '.join(map(str, per_device))})" if len(per_device) > 1 else "")
          + (f" {'/'.join(sorted(set(sources)))}" if sources else "")
          + f"; avatar {cfg['avatar']} "
          f"{f'{size[0]}x{size[1]}' if size else '?'}"
          + (f" (video received {', '.join('x'.join(map(str, v)) for v in cfg['video_sizes'])})"
             if cfg.get("video_sizes") else "")
          + (f"; ready {info['startup_seconds']:g} s after start" if info.get("startup_seconds") else ""))
    print("latency: onset sent -> mouth moves (sender clock), ms; srv: the server's own figures; late/drop: "
          "the server's, clate: the client's, in the window; cpu%: the client process; lag: its worst "
          "pacing slip (ms)")
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
          f"(fps >= {OK_FPS:g}, no gap > {OK_MAX_GAP_MS:g} ms, late < {OK_LATE_PERCENT:g}%); "
          f"fps min/median {fmt(o['fps_min'])}/{fmt(o['fps_median'])}; max gap {fmt(o['max_gap_ms'], ' ms')}")
    if "sessions_passed" in o:
        print(f"sessions passed all criteria: {o['sessions_passed']}/{o['sessions']} "
              f"(OK and p95 latency <= {PASS_LATENCY_P95_MS:g} ms, missed onsets counting as late)")
    if "onset_latency_ms_p50" in o:
        print(f"latency over {o['onsets_timed']}/{o['onsets_sent']} onsets ({o['onsets_measured']} by the mouth, "
              f"{o['onsets_by_audio']} by the returned audio + A/V offset"
              + (f", {o['onsets_by_echo']} of them cross-correlated" if "onsets_by_echo" in o else "")
              + f"): p50 {fmt(o['onset_latency_ms_p50'])}, "
              f"p95 {fmt(o['onset_latency_ms_p95'])}, p99 {fmt(o['onset_latency_ms_p99'])} ms"
              + (f"; {o['onsets_unmeasured']} not measured (p95 counting them as "
                 f"{ONSET_WINDOW * 1000:g} ms: {fmt(o['latency_ms_p95_with_missed'])})"
                 if o.get("onsets_unmeasured") else ""))
    print(f"mouth onsets only: {o['onsets_measured']}/{o['onsets_sent']}: p50 {fmt(o['latency_ms_p50'])}, "
          f"p95 {fmt(o['latency_ms_p95'])}, p99 {fmt(o['latency_ms_p99'])} ms "
          f"(by arrival at the client: p50 {fmt(o['arrival_latency_ms_p50'])} ms)")
    if o.get("echo_onsets"):
        print(f"returned audio by cross-correlation (the frame carrying each utterance's first sound): "
              f"{o['echo_onsets']}/{o['onsets_sent']} onsets, p50 {fmt(o['echo_latency_ms_p50'])}, "
              f"p95 {fmt(o['echo_latency_ms_p95'])}, p99 {fmt(o['echo_latency_ms_p99'])} ms")
    print(f"server: latency p50 {fmt(o['server_latency_ms_p50_median'])} ms (median of sessions), "
          f"p95 {fmt(o['server_latency_ms_p95_max'])} ms (max); late {o['late_frames']} "
          f"({fmt(o['late_percent'], '%')}), dropped {o['dropped_frames']} "
          f"({fmt(o['dropped_percent'], '%')}), skipped {o.get('skipped_frames', 0)} "
          f"({fmt(o.get('skipped_percent'), '%')}) "
          f"of {o['server_frames']} frames" + (" in the window" if o.get("server_frames_windowed") else ""))
    if o.get("input_shortened_seconds") is not None:
        print(f"input, whole sessions: {fmt(o.get('input_padded_seconds'))} s of gaps filled with silence, "
              f"{fmt(o['input_shortened_seconds'])} s of delayed microphones' pauses left out to catch up")
    if o.get("output_sent_ms_p95_median") is not None or o.get("decode_delay_ms_p50_median") is not None:
        process = report.get("server_process_at_end") or {}
        lag = process.get("event_loop_lag") or {}
        collector = process.get("gc") or {}
        print(f"delivery, ms after release (median of sessions): picture ready p50/p95 "
              f"{fmt(o.get('output_ready_ms_p50_median'))}/{fmt(o.get('output_ready_ms_p95_median'))}, sent p95 "
              f"{fmt(o.get('output_sent_ms_p95_median'))} (max {fmt(o.get('output_sent_ms_max'))}); server event loop "
              f"late p50/p99/max {fmt(lag.get('p50_ms'))}/{fmt(lag.get('p99_ms'))}/{fmt(lag.get('max_ms'))}"
              + (f", its longest GC pause {fmt(collector.get('pause_max_ms'))} ({collector['collections'][2]} full "
                 "collections)" if collector.get("collections") else "") + "; "
              f"clients: first packet p50 {fmt(o.get('packet_delay_ms_p50_median'))} after the sender clock, "
              f"decoded p50 {fmt(o.get('decode_delay_ms_p50_median'))} (p95 max "
              f"{fmt(o.get('decode_delay_ms_p95_max'))}) after it")
    if "client_late_frames" in o:
        print(f"clients: {o['client_late_frames']} frames late by arrival "
              f"({fmt(o['client_late_percent'], '%')}); worst session late "
              f"{fmt(o['late_percent_max_session'], '%')}")
    print(f"CPU (100% = one core, {o['machine_cores']} cores): server "
          f"{fmt(o['server_cpu_percent_mean'], '%')} mean, {fmt(o['server_cpu_percent_max'], '%')} max, "
          f"{fmt(o['server_cpu_percent_per_session'], '%')} per session; clients "
          f"{fmt(o['clients_cpu_percent_mean'], '%')}"
          + (f" at nice {cfg['client_nice']}" if cfg.get("client_nice") else "")
          + (f" on CPUs {cfg['client_cpus']}" if cfg.get("client_cpus") else "")
          + (f" (the server on CPUs {cfg['server_cpus']})" if cfg.get("server_cpus") else "")
          + "; other programs "
          f"{fmt(o['other_cpu_percent_mean'], '%')}; taken by a VM host "
          f"{fmt(o['steal_cpu_percent_mean'], '%')}")
    print(f"GPU: util {fmt(o['gpu_util_percent_mean'], '%')} mean, "
          f"{fmt(o['gpu_util_percent_max'], '%')} max, "
          f"memory {fmt(o['gpu_memory_mib_max'], ' MiB')} max"
          + (f"; per GPU util {' / '.join(fmt(v, '%') for v in o['gpu_util_percent_mean_per_gpu'])}, memory "
             f"{' / '.join(fmt(v, ' MiB') for v in o['gpu_memory_mib_max_per_gpu'])}"
             if len(o.get("gpu_util_percent_mean_per_gpu") or []) > 1 else ""))
    for line in window_lines(report.get("server_devices_window") or [], report["config"]["duration"]):
        print(line)
    for line in stage_lines(report.get("server_devices_at_end") or {}):
        print(line)
    if "clients_cpu_percent_per_session" in o:
        print(f"CPU per session: server {fmt(o['server_cpu_percent_per_session'], '%')}, client "
              f"{fmt(o['clients_cpu_percent_per_session'], '%')} (100% = one core)")
    for error in o["errors"]:
        print(f"error: {error}")
    if o.get("sessions_refused"):
        admitted = o["sessions"] - o["sessions_refused"]
        print(f"{o['sessions_refused']} sessions were refused (503, e.g. at capacity: see the server's capacity "
              "above; engine.capacity_sessions / engine.burst_capacity_sessions / sessions.expected_talk_fraction "
              f"decide it); of the {admitted} admitted, {o.get('sessions_passed', '-')} passed every criterion")
    acceptance = o.get("acceptance")
    if acceptance:
        failed = [k for k, v in acceptance.items() if k != "passed" and not v]
        print(f"verdict: {'PASS' if acceptance['passed'] else 'FAIL'}"
              + (f" ({', '.join(failed)} not met)" if failed else
                 f" (every session OK; p95 {fmt(o['latency_ms_p95_with_missed'])} ms; late "
                 f"{fmt(o['server_late_or_dropped_percent'], '%')} server / "
                 f"{fmt(o['client_late_percent'], '%')} client)"))


def plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no PNG was written (the JSON was). "
              "Install it with `pip install -e '.[bench]'` (make test does).")
        return False
    sessions = report["sessions"]
    cfg = report["config"]
    t0 = report["timeline"]["t_talk"] or 0.0
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    size = cfg.get("avatar_size")
    o = report["overall"]
    fig.suptitle(f"lipstream load: {cfg['sessions']} x {cfg['mode']} ({cfg['talk']}), {cfg['duration']:g} s, "
                 f"engine {cfg.get('engine')} on {', '.join(map(str, cfg.get('devices') or [])) or '?'}, avatar "
                 f"{f'{size[0]}x{size[1]}' if size else '?'}; passed {o.get('sessions_passed', '-')}/{o['sessions']}"
                 f"\n{cfg['device']}", fontsize=9)

    ax = axes[0][0]
    labels = [f"#{r['index']} {r['mode']}" for r in sessions]
    fps = [r.get("fps", 0.0) for r in sessions]
    colours = ["tab:green" if r.get("passed") else "tab:orange" if r.get("ok") else "tab:red" for r in sessions]
    ax.bar(labels, fps, width=min(0.8, 0.15 * len(labels) + 0.2), color=colours)
    ax.axhline(OK_FPS, color="k", ls="--", lw=0.8)
    ax.set_ylabel("delivered fps")
    ax.set_title("per-session fps (green: passed; orange: OK but p95 latency over; red: not OK)", fontsize=9)
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)

    ax = axes[0][1]
    key = "onset_latency_ms" if any("onset_latency_ms" in r for r in sessions) else "latency_ms"
    everything = sorted(v for r in sessions for v in r.get(key, []))
    for r in sessions:
        values = sorted(r.get(key, []))
        if values:
            ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", alpha=0.3, lw=0.8)
    if everything:
        fraction = np.arange(1, len(everything) + 1) / len(everything)
        ax.step(everything, fraction, where="post", color="k", lw=2, label="all sessions")
        ax.axvline(PASS_LATENCY_P95_MS, color="tab:red", ls="--", lw=0.8, label=f"{PASS_LATENCY_P95_MS:g} ms")
        ax.axhline(0.95, color="k", ls=":", lw=0.6)
        ax.legend(loc="lower right")
    ax.set_xlabel("utterance sent -> its first frame (ms, sender clock; mouth, else returned audio + A/V)")
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
        for g in range(len(gpu[0]["mem_mib"])):
            ax2.plot(t, [s["mem_mib"][g] if g < len(s["mem_mib"]) else np.nan for s in gpu], color="tab:gray",
                     ls=":", label=f"GPU {g} memory MiB")
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


def device_window(start: Any, end: Any) -> list[dict[str, Any]]:
    """Each device's batches in the talking window: the difference of ``GET /v1/devices`` at its
    start and end (the counters run from the server's start, warm-up and earlier scenarios
    included). Mean batch size and device time per batch and per frame: the figures that showed
    on an H200 how a run's batches grew past what the processing budget holds."""
    if not isinstance(start, dict) or not isinstance(end, dict):
        return []
    before = {d["name"]: d for d in start.get("devices") or []}
    rows = []
    for device in end.get("devices") or []:
        first = before.get(device["name"])
        if first is None:
            continue
        batches = device.get("batches", 0) - first.get("batches", 0)
        frames = device.get("frames", 0) - first.get("frames", 0)
        busy = device.get("busy_seconds", 0.0) - first.get("busy_seconds", 0.0)
        waits = [((d.get("process") or {}).get("result_ring_waits") or {}) for d in (first, device)]
        rows.append({
            "name": device["name"], "batches": batches, "frames": frames,
            "skipped_frames": device.get("skipped_frames", 0) - first.get("skipped_frames", 0),
            "busy_seconds": round(busy, 3),
            "mean_batch": round(frames / batches, 2) if batches else None,
            "ms_per_batch": round(1000 * busy / batches, 2) if batches else None,
            "ms_per_frame": round(1000 * busy / frames, 3) if frames else None,
            # a device process's finisher waiting for the server to read its ring (None: no such process)
            "ring_waits": (waits[1]["waits"] - waits[0].get("waits", 0)) if waits[1] else None,
            "ring_wait_seconds": round(waits[1]["seconds"] - waits[0].get("seconds", 0.0), 3) if waits[1] else None,
        })
    return rows


def window_lines(rows: list[dict[str, Any]], seconds: float) -> list[str]:
    return [
        f"device {r['name']} in the window: {r['batches']} batches of {fmt(r['mean_batch'])} frames on average, "
        f"{fmt(r['ms_per_batch'])} ms each ({fmt(r['ms_per_frame'])} ms per frame), busy "
        f"{fmt(100 * r['busy_seconds'] / seconds if seconds else None, '%')}; {r['skipped_frames']} frames skipped"
        + (f"; its finisher waited for the server to read {r['ring_waits']} times, {fmt(r['ring_wait_seconds'])} s"
           if r.get("ring_waits") is not None else "")
        for r in rows if r["batches"]
    ]


def stage_lines(devices_at_end: dict[str, Any]) -> list[str]:
    """Where each device's made frames spent their budget (``stages_ms`` of ``GET /v1/devices``,
    pipeline/live/stage_times.py: the frames of the last ``WINDOW_SECONDS`` at the end of the scenario)."""
    from pipeline.live.stage_times import STAGES, WINDOW_SECONDS

    lines = []
    for device in devices_at_end.get("devices") or []:
        stages = device.get("stages_ms") or {}
        if not stages.get("frames"):
            continue
        parts = [f"{stage} {fmt(stages[stage]['p50'])}/{fmt(stages[stage]['p95'])}"
                 for stage in STAGES
                 if stage != "slack" and stage in stages]  # (slack: its low percentiles, below)
        slack = stages.get("slack")
        if slack:
            parts.append(f"slack (deadline - delivery) p5 {fmt(slack['p5'])}, p50 {fmt(slack['p50'])}")
        collector = (device.get("process") or {}).get("gc") or {}
        if collector.get("collections"):  # a device process: its garbage collections stop all its threads
            parts.append(f"its process's longest GC pause {fmt(collector.get('pause_max_ms'))} "
                         f"({collector['collections'][2]} full collections)")
        lines.append(f"device {device['name']} stages over its last ~{WINDOW_SECONDS:g} s ({stages['frames']} frames), "
                     "ms p50/p95: " + "; ".join(parts))
    return lines


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
        "passed": f"{o['sessions_passed']}/{o['sessions']}" if "sessions_passed" in o else "-",
        "devices": ", ".join(map(str, cfg.get("devices") or [])) or "-",
        "avatar_size": "x".join(map(str, cfg["avatar_size"])) if cfg.get("avatar_size") else "-",
        "fps": f"{fmt(o['fps_min'])} / {fmt(o['fps_median'])}", "gap": fmt(o["max_gap_ms"]),
        "latency": (f"{fmt(o['onset_latency_ms_p50'])} / {fmt(o['onset_latency_ms_p95'])} / "
                    f"{fmt(o['onset_latency_ms_p99'])}" if "onset_latency_ms_p50" in o else
                    f"{fmt(o['latency_ms_p50'])} / {fmt(o['latency_ms_p95'])} / {fmt(o['latency_ms_p99'])}"),
        "onsets": (f"{o['onsets_measured']}+{o['onsets_by_audio']}/{o['onsets_sent']}" if "onsets_by_audio" in o
                   else f"{o['onsets_measured']}/{o['onsets_sent']}"),
        "arrival": f"{fmt(o['arrival_latency_ms_p50'])} / {fmt(o['arrival_latency_ms_p95'])}",
        "server": f"{fmt(o['server_latency_ms_p50_median'])} / {fmt(o['server_latency_ms_p95_max'])}",
        "late": f"{fmt(_late_or_skipped(o))} / {fmt(o['dropped_percent'])}"
        + (f" / {fmt(o['client_late_percent'])}" if "client_late_percent" in o else ""),
        "cpu": f"{fmt(o['server_cpu_percent_mean'])} ({fmt(o['server_cpu_percent_per_session'])})",
        "others": f"{fmt(o['clients_cpu_percent_mean'])} / {fmt(o['other_cpu_percent_mean'])}",
        "lag": fmt(o["client_send_lag_ms_max"]),
        "gpu": (f"{' + '.join(fmt(v) for v in o['gpu_util_percent_mean_per_gpu'])} / "
                f"{' + '.join(fmt(v) for v in o['gpu_memory_mib_max_per_gpu'])}"
                if len(o.get("gpu_util_percent_mean_per_gpu") or []) > 1
                else f"{fmt(o['gpu_util_percent_mean'])} / {fmt(o['gpu_memory_mib_max'])}"),
        "command": cfg.get("doc_command", cfg["command"]),
    }
    key = ("sessions", "mode", "talk", "devices")
    rows = [r for r in rows if any(r.get(k, row[k]) != row[k] for k in key)] + [row]  # old rows: no devices
    rows.sort(key=lambda r: (r["talk"] != "all", {"ws": 0, "webrtc": 1}.get(r["mode"], 2), r["sessions"]))
    with_gpu = any(r["gpu"] != "n/a / n/a" for r in rows)
    server = cfg["url"]
    if cfg["spawn_server"]:
        server = "spawned by the bench (`--spawn-server`: its config, loopback WebRTC)"
    size = f" ({row['avatar_size']})" if row["avatar_size"] != "-" else ""
    where = f" on {row['devices']}" if row["devices"] != "-" else ""
    capacity = f", capacity {fmt(cfg['capacity'])} sessions (`GET /v1/devices`)" if cfg.get("capacity") else ""
    lines = [
        f"Device: {cfg['device']}. Engine: {cfg.get('engine')}{where}{capacity}, avatar `{cfg['avatar']}`{size}. "
        f"Server: {server}. "
        "Command: `python bench/load.py` (each row gives its arguments). Each session is its own client "
        "process on the same machine, so the clients' CPU is taken from the server's. `ws`: speech pushed "
        "over the audio WebSocket (s16le 16 kHz, 20 ms chunks in real time) and watched by a WHEP viewer; "
        "`webrtc`: a call (`POST /v1/calls`) sending a microphone track and receiving the avatar. `all`: "
        "sentences with 0.3 s pauses; `conversational`: 1-4 s sentences alternating with equal silences. "
        "All sessions talk during the same window (s).",
        "",
        "Columns: **passed** = sessions meeting every criterion: OK and p95 audio-to-frame latency <= 250 ms "
        "(an onset the mouth never answered counts as late). **OK** = sessions with >= 24 fps, no gap over "
        "250 ms and < 1 % late frames (rows with no passed figure are older: their OK did not count late "
        "frames). **fps** = min / median over "
        "sessions. **gap** = the longest wait between two frames at any client (ms). **latency** = from the "
        "client sending an utterance's first sample to the first frame with the mouth moving, on the "
        "server's send clock (RTP mapping), p50 / p95 / p99 over all utterance onsets (ms); where the mouth "
        "was still moving from the previous utterance, the returned audio's onset plus the session's median "
        "A/V offset; **onsets** = timed by the mouth + by the audio / sent (older rows: by the mouth / sent). "
        "**at arrival** = the mouth-timed latency to the frame's arrival at the client, after "
        "network, decoding and the client's jitter buffer: it also shows frames the server sent late. "
        "**server** = the server's own audio-to-frame latency, median of the sessions' "
        "p50 / largest p95 (ms). **late / dropped / client late** = % of the server's frames in the window "
        "(late includes frames the device skipped because they could not be on time, since 2026-12-03) "
        "sent late / not delivered to a slow viewer, and % of the window's frames that arrived more than a "
        "frame interval late at the clients (gaps). **server CPU** = % of one "
        "core used by the server's processes, mean over the window (per session). **clients / other** = "
        "% of one core used by the client processes / by other programs on the machine during the run. "
        "**lag** = the worst real-time pacing slip of a client's audio sender (ms): a starved client.",
        "",
        "| date | sessions | mode | talk | s | passed | OK | fps | gap | latency p50/p95/p99 | onsets "
        "| at arrival p50/p95 | server p50/p95 | late / dropped / client late % | server CPU % "
        "| clients / other CPU % | lag |"
        + (" GPU util % / MiB |" if with_gpu else "") + " arguments |",
        "|---" * (18 + with_gpu) + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['date']} | {r['sessions']} | {r['mode']} | {r['talk']} | {r['duration']:g} "
            f"| {r.get('passed', '-')} | {r['ok']} "
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
SCENARIO_HELP = "N:talk[:mode[:seconds]] items, comma-separated, e.g. '16:all,29:conversational:ws:30'"


def warmup_scenario(scenarios: list[dict[str, Any]], seconds: float, sessions: int | None = None) -> dict[str, Any]:
    """The unmeasured warm-up: as many sessions as the largest scenario, talking as it does.
    Why its talk mode: all 26 sessions of a conversational scenario talking at once asked an
    H200 for 650 frames/s (57 % late, run 123325), an overload the scenario itself never asks for."""
    largest = max(scenarios, key=lambda s: s["sessions"])
    return {"sessions": sessions or largest["sessions"], "talk": largest["talk"], "mode": scenarios[0]["mode"],
            "duration": seconds}


def parse_scenarios(text: str, mode: str, duration: float) -> list[dict[str, Any]]:
    """``--scenarios``: each item's sessions, talk, mode and seconds (defaults from the flags)."""
    scenarios = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        fields = item.split(":")
        if not 1 <= len(fields) <= 4:
            raise ValueError(f"scenario {item!r}: expected {SCENARIO_HELP}")
        try:
            sessions = int(fields[0])
            seconds = float(fields[3]) if len(fields) > 3 and fields[3] else duration
        except ValueError:
            raise ValueError(f"scenario {item!r}: expected {SCENARIO_HELP}") from None
        talk = fields[1] if len(fields) > 1 and fields[1] else "all"
        how = fields[2] if len(fields) > 2 and fields[2] else mode
        if not 1 <= sessions <= 64:
            raise ValueError(f"scenario {item!r}: sessions must be 1..64")
        if talk not in ("all", "conversational"):
            raise ValueError(f"scenario {item!r}: talk must be 'all' or 'conversational'")
        if how not in ("ws", "webrtc", "mixed"):
            raise ValueError(f"scenario {item!r}: mode must be ws, webrtc or mixed")
        if not 1 <= seconds <= 600:
            raise ValueError(f"scenario {item!r}: seconds must be 1..600")
        scenarios.append({"sessions": sessions, "talk": talk, "mode": how, "duration": seconds})
    if not scenarios:
        raise ValueError(f"no scenario in {text!r}: expected {SCENARIO_HELP}")
    return scenarios


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running server (default http://127.0.0.1:8000)")
    where.add_argument("--spawn-server", action="store_true", help="start a server subprocess for the run")
    where.add_argument("--make-speech", type=Path, metavar="DIR",
                       help="write the sentences (espeak-ng) as WAV files into DIR for --speech-dir, and exit")
    where.add_argument("--report", type=Path, nargs="+", metavar="JSON",
                       help="print (and with --write-doc, write the docs rows of) saved reports, and exit")
    parser.add_argument("--config", type=Path, help="config file for --spawn-server (host, port, WebRTC "
                        "addresses and max_sessions are set by the bench)")
    parser.add_argument("--server-timeout", type=float, default=120.0,
                        help="seconds a spawned server may take to turn ready (a GPU engine compiles first)")
    parser.add_argument("--server-pid", type=int, help="pid of the --url server, to sample its CPU")
    parser.add_argument("--sessions", type=int, default=1, help="concurrent sessions (a process each)")
    parser.add_argument("--mode", choices=["ws", "webrtc", "mixed"], default="ws")
    parser.add_argument("--talk", choices=["all", "conversational"], default="all")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds all sessions talk (measured)")
    parser.add_argument("--scenarios", help=f"several runs against one server, in order: {SCENARIO_HELP} "
                        "(instead of --sessions/--talk; --mode and --duration are the defaults)")
    parser.add_argument("--warmup", type=float, default=0.0, metavar="SECONDS",
                        help="before the first scenario, sessions talk this long, unmeasured (a fresh server's "
                        "first speech, and its first passes at each new number of sessions, can stall)")
    parser.add_argument("--warmup-sessions", type=int, metavar="N",
                        help="sessions of the warm-up (default: the largest scenario's; they talk as it does)")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds between scenarios, after the last one's sessions are gone")
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds over which sessions connect")
    parser.add_argument(
        "--client-nice", type=int, default=10, choices=range(0, 20), metavar="0-19",
        help="niceness of the client processes (default 10): real viewers and producers are not on the "
        "server's machine, so when every core is busy (16 cores: ~5 of them the clients' at 26 sessions) "
        "the server's processes run first; each client still reports its own pacing slips (lag)",
    )
    parser.add_argument("--client-cpus", metavar="LIST",
                        help="run the client processes on these CPUs only (e.g. 10-15): with --server-cpus, "
                        "the server's cores are its own, as on a machine that does not host its viewers")
    parser.add_argument("--server-cpus", metavar="LIST",
                        help="run the --spawn-server server (all its processes) on these CPUs only (e.g. 0-9)")
    parser.add_argument("--avatar", default="demo")
    parser.add_argument("--avatars-dir", type=Path, help="where the avatar is prepared, for the mouth region "
                        "(default: the spawned server's, else ./avatars)")
    parser.add_argument("--speech-dir", type=Path,
                        help="read the sentences from DIR (written by --make-speech) instead of espeak-ng")
    parser.add_argument("--key", help="API key (Authorization: Bearer)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="talk plans use seed + session index")
    parser.add_argument("--ice-addresses", default="127.0.0.1",
                        help="comma-separated ICE host addresses for the clients; '' = every interface")
    parser.add_argument("--write-doc", action="store_true", help="update its section of docs/benchmarks.md")
    parser.add_argument("--doc", type=Path, help="markdown file for --write-doc (default docs/benchmarks.md)")
    parser.add_argument("--doc-command", metavar="TEMPLATE",
                        help="the command the docs show for each scenario instead of this one's arguments, "
                        "'{scenario}' standing for its N:talk:mode:seconds (bench/device/gpu_load.sh passes its own)")
    parser.add_argument("--doc-title", help="section title (default 'Load test (<GPU or CPU>, <engine> engine)', "
                        "with 'N x' before the GPU when the server runs on N devices)")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.sessions > 64:
        parser.error("--sessions must be 1..64")
    if not 1 <= args.duration <= 600:
        parser.error("--duration must be 1..600 s")
    if args.config and not args.spawn_server:
        parser.error("--config goes with --spawn-server")
    if args.server_cpus and not args.spawn_server:
        parser.error("--server-cpus goes with --spawn-server")
    try:  # parsed once, here: a bad list stops the run before anything starts
        args.client_cpu_list, args.server_cpu_list = cpu_list(args.client_cpus), cpu_list(args.server_cpus)
    except ValueError as exc:
        parser.error(str(exc))
    if args.config and not args.config.is_file():
        parser.error(f"--config {args.config}: no such file")
    if args.speech_dir and not args.speech_dir.is_dir():
        parser.error(f"--speech-dir {args.speech_dir}: no such directory")
    try:
        if args.scenarios:
            args.scenario_list = parse_scenarios(args.scenarios, args.mode, args.duration)
        else:
            args.scenario_list = [{"sessions": args.sessions, "talk": args.talk, "mode": args.mode,
                                   "duration": args.duration}]
    except ValueError as exc:
        parser.error(f"--scenarios: {exc}")
    args.url = (args.url or "http://127.0.0.1:8000").rstrip("/")
    return args


def _interrupt(signum, frame) -> None:  # noqa: ANN001
    raise KeyboardInterrupt


def _doc_arguments(given: list[str], scenario: dict[str, Any]) -> str:
    """The command that reproduces one scenario, for the docs: without where results and docs go,
    and with a --scenarios item written out as --sessions/--talk/--mode/--duration."""
    drop_value = {"--out", "--doc", "--doc-title", "--doc-command", "--scenarios", "--sessions", "--talk", "--mode",
                  "--duration", "--settle"}
    shown, skip = [], False
    for a in given:
        if skip:
            skip = False
        elif a in drop_value:
            skip = True
        elif a != "--write-doc" and not a.startswith(tuple(f"{k}=" for k in drop_value)):
            shown.append(a)
    shown += ["--sessions", str(scenario["sessions"]), "--mode", scenario["mode"], "--talk", scenario["talk"],
              "--duration", f"{scenario['duration']:g}"]
    return "python bench/load.py " + " ".join(shlex.quote(a) for a in shown)


def server_info(url: str, headers: dict[str, str], server: SpawnedServer | None, avatars_dir: Path,
                avatar: str) -> dict[str, Any]:
    """What the server says of itself (``GET /v1/devices``, if it has it), the engine section of a
    spawned server's config, and the avatar's resolution from its ``avatar.json``."""
    import httpx

    info: dict[str, Any] = {"devices_endpoint": None, "engine": None, "devices": None, "capacity": None}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=10) as http:
            response = http.get("/v1/devices")
        if response.status_code == 200:
            body = response.json()
            info["devices_endpoint"] = body
            entries = body.get("devices") if isinstance(body, dict) else None
            if isinstance(entries, list) and entries:
                info["engine"] = next((d.get("engine") for d in entries if d.get("engine")), None)
                info["devices"] = [d.get("device") or d.get("name") for d in entries]
                capacities = [d.get("capacity") for d in entries]
                if all(isinstance(c, (int, float)) for c in capacities):
                    info["capacity"] = sum(capacities)
                    info["capacity_per_device"] = capacities
                info["capacity_source"] = [d.get("capacity_source") for d in entries]
            for key in ("capacity", "capacity_sessions", "max_sessions"):  # a top-level figure wins
                if isinstance(body, dict) and isinstance(body.get(key), (int, float)):
                    info["capacity"] = body[key]
        else:
            info["devices_endpoint"] = {"status": response.status_code}
    except Exception as exc:  # noqa: BLE001 - an older or foreign server: recorded, not fatal
        info["devices_endpoint"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    if server is not None:
        engine = dict(server.config.get("engine") or {})
        info["engine_config"] = {k: str(v) if isinstance(v, Path) else v for k, v in engine.items()}
        info["engine"] = info["engine"] or engine.get("name", "lite")
        configured = engine.get("devices") or ([engine["device"]] if engine.get("device") else None)
        if configured:
            info["devices"] = [str(d) for d in configured]
        info["max_sessions"] = server.config.get("limits", {}).get("max_sessions")
    try:
        meta = json.loads((avatars_dir / avatar / "avatar.json").read_text())
        info["avatar_size"] = [meta.get("width"), meta.get("height")]
        info["avatar_frames"] = meta.get("frame_count")
    except (OSError, ValueError):
        info["avatar_size"] = None
    return info


def fetch_json(url: str, path: str, headers: dict[str, str]) -> Any:
    """``GET path`` as JSON, or what went wrong."""
    import httpx

    try:
        response = httpx.get(f"{url}{path}", headers=headers, timeout=3)
        return response.json() if response.status_code == 200 else {"status": response.status_code}
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}


class ServerGone(RuntimeError):
    """The spawned server process ended during the run."""


def settle(url: str, headers: dict[str, str], ours: set[str], seconds: float) -> None:
    """Between scenarios: delete our sessions that are still listed, wait (up to 30 s) until the
    server lists none of them, then ``seconds`` more for the engine's queues to drain."""
    import httpx

    deadline = time.monotonic() + 30
    with httpx.Client(base_url=url, headers=headers, timeout=10) as http:
        while True:
            try:
                listed = http.get("/v1/sessions").json()
                listed = listed.get("sessions", listed) if isinstance(listed, dict) else listed
                left = {s.get("id") for s in listed if isinstance(s, dict)} & ours
            except Exception:  # noqa: BLE001
                left = set()
            if not left:
                break
            if time.monotonic() > deadline:
                print(f"warning: {len(left)} sessions of the last scenario are still listed", flush=True)
                break
            for session_id in left:
                try:
                    http.delete(f"/v1/sessions/{session_id}")
                except Exception:  # noqa: BLE001
                    pass
            time.sleep(0.5)
    time.sleep(seconds)


def main(argv: list[str] | None = None) -> int:  # noqa: C901
    args = parse_args(argv)
    if args.make_speech:
        files = write_speech(args.make_speech)
        size = sum(f.stat().st_size for f in files)
        print(f"wrote {len(files)} sentences ({size / 1e6:.1f} MB) and {SPEECH_MANIFEST} into {args.make_speech}")
        return 0
    if args.report:
        return report_files(args)
    # Ctrl-C and SIGTERM both stop the run cleanly (also when started in the background, where
    # SIGINT would otherwise be ignored).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    import httpx

    given = sys.argv[1:] if argv is None else argv
    command = "python bench/load.py " + " ".join(shlex.quote(a) for a in given)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="lipstream-load-"))
    scenarios = args.scenario_list
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}

    if args.speech_dir:
        print(f"reading speech from {args.speech_dir} ({len(SENTENCES)} sentences) ...", flush=True)
    else:
        print(f"making speech with espeak-ng ({len(SENTENCES)} sentences) ...", flush=True)
    speech = make_speech(args.speech_dir)

    server: SpawnedServer | None = None
    reports: list[dict[str, Any]] = []
    status = 0
    try:
        if args.spawn_server:
            server = SpawnedServer(args.config, max(s["sessions"] for s in scenarios), workdir, args.server_cpu_list)
            print(f"starting a server on {server.url} (log: {server.log_path}) ...", flush=True)
            t = time.monotonic()
            server.start(timeout=args.server_timeout)
            startup = round(time.monotonic() - t, 1)
            print(f"server ready after {startup:g} s", flush=True)
            url, server_pid = server.url, server.process.pid
            avatars_dir = args.avatars_dir or server.avatars_dir
        else:
            startup = None
            url, server_pid = args.url, args.server_pid
            avatars_dir = args.avatars_dir or (ROOT / "avatars")
        with httpx.Client(base_url=url, headers=headers, timeout=10) as http:
            http.get("/healthz").raise_for_status()
        info = server_info(url, headers, server, avatars_dir, args.avatar)
        info["startup_seconds"] = startup
        roi = mouth_roi(avatars_dir, args.avatar)
        if roi is None:
            print(f"note: avatar '{args.avatar}' not found under {avatars_dir}: mouth motion is measured on "
                  "a thumbnail of the whole frame (pass --avatars-dir for the mouth region)")
        ours: set[str] = set()
        if args.warmup > 0:
            warm = warmup_scenario(scenarios, args.warmup, args.warmup_sessions)
            print(f"\n=== warm-up: {warm['sessions']} x {warm['mode']} ({warm['talk']}) for {args.warmup:g} s, "
                  "not measured ===", flush=True)
            warm_report = run_scenario(args, {**warm, "index": 0, "of": len(scenarios), "name": "warmup",
                                              "doc_command": ""},
                                       url, server_pid, headers, roi, speech, info, command, stamp, ours, server)
            wo = warm_report["overall"]
            print(f"warm-up: fps min {fmt(wo['fps_min'])}, max gap {fmt(wo['max_gap_ms'])} ms, late "
                  f"{fmt(wo['server_late_or_dropped_percent'], '%')}, errors {len(wo['errors'])}", flush=True)
            info["warmup"] = {"seconds": args.warmup, "sessions": warm["sessions"], "fps_min": wo["fps_min"],
                              "max_gap_ms": wo["max_gap_ms"], "late_percent": wo["server_late_or_dropped_percent"]}
            if warm_report["config"]["interrupted"]:
                raise KeyboardInterrupt
        for k, scenario in enumerate(scenarios):
            if k or args.warmup > 0:
                settle(url, headers, ours, args.settle)
            ended = server.gone() if server is not None else None
            if ended is not None:  # no scenario against a dead server (its clients would only fail to connect)
                raise ServerGone(f"the server {ended} before scenario {k + 1} (its log: the end of "
                                 f"load-{stamp}-server.log in {args.out})")
            name = f"load-{stamp}" if len(scenarios) == 1 else (
                f"load-{stamp}-{k + 1}-{scenario['sessions']}-{scenario['talk']}-{scenario['mode']}")
            if len(scenarios) > 1:
                print(f"\n=== scenario {k + 1}/{len(scenarios)}: {scenario['sessions']} x {scenario['mode']} "
                      f"({scenario['talk']}), {scenario['duration']:g} s ===", flush=True)
            item = f"{scenario['sessions']}:{scenario['talk']}:{scenario['mode']}:{scenario['duration']:g}"
            doc_command = (args.doc_command.replace("{scenario}", item) if args.doc_command
                           else _doc_arguments(given, scenario))
            run = {**scenario, "index": k + 1, "of": len(scenarios), "name": name, "doc_command": doc_command}
            report = run_scenario(args, run, url, server_pid, headers, roi, speech, info, command, stamp, ours,
                                  server)
            reports.append(report)
            finish_report(args, report, args.out / f"{name}.json", args.out / f"{name}.png")
            if report["config"]["interrupted"]:
                status = 130
                break
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
        status = 130
    except Exception as exc:  # noqa: BLE001
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        status = 1
    finally:
        if server is not None:
            server.stop()
            shutil.copy(server.log_path, args.out / f"load-{stamp}-server.log")
        shutil.rmtree(workdir, ignore_errors=True)
    if len(reports) > 1:
        print_overview(reports)
    return status if reports or status else 1


def run_scenario(args: argparse.Namespace, run: dict[str, Any], url: str, server_pid: int | None,  # noqa: C901
                 headers: dict[str, str], roi, speech, info: dict[str, Any], command: str, stamp: str,  # noqa: ANN001
                 ours: set[str], server: SpawnedServer | None) -> dict[str, Any]:
    """One load: ``run['sessions']`` client processes, the talking window, the report (not yet written)."""
    import httpx

    from bench._report import cpu_name

    clips16, clips48, durations = speech
    gpus = gpu_names()
    device = f"{cpu_name()} ({os.cpu_count()} cores)" + (f", {', '.join(gpus)}" if gpus else ", no GPU")
    ctx = mp.get_context("spawn")
    processes: list[mp.Process] = []
    created: dict[int, str] = {}
    results: dict[int, dict[str, Any]] = {}
    stop = ctx.Event()
    talk_at = ctx.Value("d", 0.0)
    messages = ctx.Queue()
    interrupted = False
    t_talk = t_end = None
    devices_at_start: Any = None
    devices_at_end: Any = None
    process_at_end: Any = None
    n = run["sessions"]
    cpu = CpuSampler(server_pid)
    gpu = GpuSampler()
    cpu.start()
    gpu.start()
    try:
        t0 = time.monotonic() + 1.0
        ice = None if args.ice_addresses is None else [a for a in args.ice_addresses.split(",") if a.strip()]
        for i in range(n):
            mode = run["mode"] if run["mode"] != "mixed" else ("ws" if i % 2 == 0 else "webrtc")
            spec = {
                "index": i, "mode": mode, "talk": run["talk"], "duration": run["duration"], "url": url,
                "key": args.key, "avatar": args.avatar, "seed": args.seed + i, "roi": roi,
                "ice_addresses": ice,
                "connect_at": t0 + (args.ramp * i / n if n > 1 else 0.0),
                "clips16": clips16 if mode == "ws" else [], "clips48": clips48 if mode == "webrtc" else [],
                "durations": durations, "nice": args.client_nice, "cpus": args.client_cpu_list,
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
            if t_end is not None and devices_at_end is None and now >= t_end - 0.5:
                devices_at_end = fetch_json(url, "/v1/devices", headers)  # its utilisation covers the window's end
                process_at_end = fetch_json(url, "/v1/server", headers)  # its event-loop lag: the last ~10 s
            if t_talk is None and (len(ready | set(results)) == n or now > setup_deadline):
                t_talk = time.monotonic() + 0.5
                t_end = t_talk + run["duration"]
                talk_at.value = t_talk
                final_deadline = t_end + TAIL_SECONDS + 45
                devices_at_start = fetch_json(url, "/v1/devices", headers)  # the window's device figures are differences
                print(f"{len(ready)}/{n} sessions ready; talking for {run['duration']:g} s ...", flush=True)
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
                ours.add(payload)
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
                ours.add(payload)
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
        cpu.stop()
        gpu.stop()
        cpu.join(timeout=2)
        gpu.join(timeout=6)

    sessions = [results.get(i, {"index": i, "mode": "?", "error": "no result"}) for i in range(n)]
    overall = summarise(sessions, cpu, gpu, t_talk, t_end, n)
    sizes = sorted({tuple(r["video_size"]) for r in sessions if r.get("video_size")})
    return {
        "config": {
            "command": command, "doc_command": run["doc_command"], "date": datetime.date.today().isoformat(),
            "started": stamp, "scenario": {k: run[k] for k in ("index", "of", "name")},
            "scenarios": args.scenarios, "url": url,
            "spawn_server": bool(args.spawn_server),
            "server_config": str(args.config) if args.config else None,
            "sessions": n, "mode": run["mode"], "talk": run["talk"], "duration": run["duration"],
            "ramp": args.ramp, "client_nice": args.client_nice, "client_cpus": args.client_cpus,
            "server_cpus": args.server_cpus, "server_affinity": _affinity(server_pid),
            "avatar": args.avatar, "engine": info.get("engine"),
            "devices": info.get("devices"), "capacity": info.get("capacity"),
            "avatar_size": info.get("avatar_size"), "video_sizes": [list(s) for s in sizes],
            "device": device, "cpu": cpu_name(), "cores": os.cpu_count(), "gpus": gpus, "mouth_roi": roi,
            "seed": args.seed, "speech": str(args.speech_dir) if args.speech_dir else "espeak-ng",
            "interrupted": interrupted, "sentences": SENTENCES,
            "sentence_seconds": [round(d, 3) for d in durations],
            "criteria": {"fps_min": OK_FPS, "max_gap_ms": OK_MAX_GAP_MS, "late_percent_below": OK_LATE_PERCENT,
                         "latency_ms_p95_max": PASS_LATENCY_P95_MS},
        },
        "server": info,
        "server_devices_at_end": devices_at_end,
        "server_process_at_end": process_at_end,
        "server_devices_window": device_window(devices_at_start, devices_at_end),
        "timeline": {"t_talk": t_talk, "t_end": t_end},
        "overall": overall,
        "sessions": sessions,
        "samples": {
            "cpu": [{**s, "t": round(s["t"], 3)} for s in cpu.samples],
            "gpu": gpu.samples,
        },
    }


def doc_title(report: dict[str, Any]) -> str:
    cfg = report["config"]
    gpus = cfg.get("gpus") or []
    devices = [d for d in (cfg.get("devices") or []) if d]
    on_gpu = any(str(d).startswith("cuda") for d in devices) or (gpus and not devices)
    label = gpus[0] if gpus and on_gpu else "CPU"
    if on_gpu and len(devices) > 1:
        label = f"{len(devices)} x {label}"
    return f"Load test ({label}, {cfg.get('engine')} engine)"


def finish_report(args: argparse.Namespace, report: dict[str, Any], json_path: Path, png_path: Path) -> None:
    json_path.write_text(json.dumps(report, indent=1, default=str))
    print_summary(report)
    drew = plot(report, png_path)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if drew else ""), flush=True)
    if args.write_doc and not report["config"]["interrupted"]:
        write_doc(report, args.doc_title or doc_title(report), args.doc)


def read_report(path: Path) -> dict[str, Any]:
    """A saved report, plain or gzipped: the stored ones in bench/results/load are gzipped (a tenth
    of the size), which keeps the working tree small enough to travel to the lent GPU machine."""
    blob = path.read_bytes()
    return json.loads(gzip.decompress(blob) if path.suffix == ".gz" else blob)


def report_files(args: argparse.Namespace) -> int:
    """``--report``: the summaries of saved reports, their docs rows with --write-doc."""
    reports = []
    for path in args.report:
        report = read_report(path)
        reports.append(report)
        print_summary(report)
        if args.write_doc:
            if report["config"].get("interrupted"):
                print(f"not written to the docs: {path} was interrupted")
            else:
                write_doc(report, args.doc_title or doc_title(report), args.doc)
    if len(reports) > 1:
        print_overview(reports)
    return 0


def print_overview(reports: list[dict[str, Any]]) -> None:
    """One line per scenario: what the acceptance reads."""
    print("\nscenarios:")
    print(f"{'sessions':>8} {'mode':>6} {'talk':>14} {'passed':>7} {'ok':>6} {'fps min':>7} {'p50':>6} "
          f"{'p95':>6} {'p99':>6} {'late%':>6} {'cl.late%':>8} {'srvCPU/s':>8} {'GPU%':>10} {'batch':>6} "
          f"{'feat95':>6} {'pass95':>6} {'slack5':>6} {'verdict':>8}")
    for report in reports:
        cfg, o = report["config"], report["overall"]
        gpu = "/".join(fmt(v) for v in o.get("gpu_util_percent_mean_per_gpu") or []) or "-"
        # the first device's mean batch in the window and its stage figures (ms): what filled the
        # budget (feat95: audio at the device to features; pass95: the feature pass alone)
        window = (report.get("server_devices_window") or [{}])[0]
        devices = (report.get("server_devices_at_end") or {}).get("devices") or [{}]
        stages = devices[0].get("stages_ms") or {}
        verdict = "PASS" if o.get("acceptance", {}).get("passed") else "fail"
        if cfg.get("interrupted"):
            verdict = "stopped"
        print(f"{cfg['sessions']:>8} {cfg['mode']:>6} {cfg['talk']:>14} "
              f"{o.get('sessions_passed', '-'):>3}/{o['sessions']:<3} {o['sessions_ok']:>2}/{o['sessions']:<3} "
              f"{fmt(o['fps_min']):>7} {fmt(o.get('onset_latency_ms_p50')):>6} "
              f"{fmt(o.get('onset_latency_ms_p95')):>6} "
              f"{fmt(o.get('onset_latency_ms_p99')):>6} {fmt(o.get('server_late_or_dropped_percent')):>6} "
              f"{fmt(o.get('client_late_percent')):>8} {fmt(o['server_cpu_percent_per_session']):>8} "
              f"{gpu:>10} {fmt(window.get('mean_batch')):>6} {fmt((stages.get('features') or {}).get('p95')):>6} "
              f"{fmt((stages.get('feature_pass') or {}).get('p95')):>6} "
              f"{fmt((stages.get('slack') or {}).get('p5')):>6} {verdict:>8}")


if __name__ == "__main__":
    raise SystemExit(main())
