"""What N sessions cost the server process's event loop per frame, with the device and the
viewers stubbed: the figures for taking work off that loop, on any CPU.

Why: at 26 conversational sessions on an H200 the server's loop stalled (lag p99 84-297 ms) and
frames went out late while the GPU had room (docs/benchmarks.md, "2026-12-03, night"). A GPU
session is 30 minutes; this measures the loop's own share on the CPU at hand. Each session is a
real :class:`~pipeline.live.session.LiveSession` fed like the audio WebSocket does (the same
decoder, 20 ms s16le chunks in real time, nothing during silences), bound to a stand-in for its
device process (a thread that answers each frame's features after ``--features-ms`` and, for
frames with speech, its picture after ``--picture-ms``, copying the frame as the server's ring
reader does), and watched by a real :class:`~server.peer_pool.SessionFeed` whose frame rings
are real shared memory and whose messages go through a real :class:`~pipeline.ipc.channel.Channel`
to a thread that reads and drops them. The report: the process's CPU per session-frame, the
loop's lag (:class:`~server.loop_lag.LoopLag`), the garbage collector's pauses and the frames'
delivery after their release (``output_lag_ms``), per scenario.

    python bench/server_loop_cost.py --sessions 8,16,26 --talk conversational --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import heapq
import json
import multiprocessing
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.audio.stream_decode import make_decoder, parse_start  # noqa: E402
from pipeline.avatar.demo import ensure_demo_avatar  # noqa: E402
from pipeline.avatar.store import AvatarStore  # noqa: E402
from pipeline.ipc.channel import Channel  # noqa: E402
from pipeline.live.gc_pauses import GcPauses, freeze_startup  # noqa: E402
from pipeline.live.session import LiveSession  # noqa: E402
from server.loop_lag import LoopLag  # noqa: E402
from server.peer_pool import SessionFeed  # noqa: E402

CHUNK_SECONDS = 0.02
RATE = 16000


class StubDevice:
    """A device process's answers, from one thread: features after ``features_ms``, pictures of
    frames with speech after ``picture_ms`` (a copy of the avatar frame, as the ring reader makes)."""

    def __init__(self, features_ms: float, picture_ms: float) -> None:
        self.features_s = features_ms / 1000
        self.picture_s = picture_ms / 1000
        self._due: list[tuple[float, int, concurrent.futures.Future, Any]] = []
        self._lock = threading.Condition()
        self._count = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="stub-device", daemon=True)
        self._thread.start()


    def later(self, delay: float, future: concurrent.futures.Future, value: Any) -> None:
        with self._lock:
            self._count += 1
            heapq.heappush(self._due, (time.monotonic() + delay, self._count, future, value))
            self._lock.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stop and (not self._due or self._due[0][0] > time.monotonic()):
                    self._lock.wait(None if not self._due else max(0.0, self._due[0][0] - time.monotonic()))
                if self._stop:
                    return
                ready = []
                now = time.monotonic()
                while self._due and self._due[0][0] <= now:
                    ready.append(heapq.heappop(self._due))
            for _, _, future, value in ready:
                if not future.done():
                    future.set_result(value() if callable(value) else value)

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(timeout=2)


class StubStream:
    """A session's stream on the stub device: what :class:`~pipeline.live.device_link.RemoteStream`
    offers, sending each frame's message (its 200 ms audio window) down a real channel as it does."""

    def __init__(self, device: StubDevice, avatar: Any, channel: Channel, key: str) -> None:
        self.device = device
        self.avatar = avatar
        self.channel = channel
        self.key = key

    def submit(self, frame: Any, avatar_index: int, deadline: float, compose: bool) -> tuple[Any, Any]:
        features: concurrent.futures.Future = concurrent.futures.Future()
        picture: concurrent.futures.Future = concurrent.futures.Future()
        window = np.ascontiguousarray(frame.window, dtype=np.float32).tobytes()
        self.channel.send(("frame", self.key, frame.index, window, frame.speech, avatar_index, deadline, compose,
                           time.monotonic()))
        self.device.later(self.device.features_s, features, bool(frame.speech))
        if frame.speech and compose:
            source = self.avatar.frames[avatar_index]
            self.device.later(self.device.picture_s, picture, lambda: source.copy())
        else:
            picture.set_result(None)
        return features, picture

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass


def speech_plan(seconds: float, talk: str, seed: int) -> list[tuple[float, float]]:
    """(start, end) seconds of speech: ``all`` talks with 0.3 s pauses, ``conversational``
    alternates 1-4 s utterances with equal silences from a random point of the cycle."""
    rng = np.random.default_rng(seed)
    spans = []
    t = float(rng.uniform(0, 4)) if talk == "conversational" else 0.0
    while t < seconds:
        length = float(rng.uniform(1, 4))
        spans.append((t, min(seconds, t + length)))
        t += length + (length if talk == "conversational" else 0.3)
    return spans


def voice(seconds: float, seed: int) -> np.ndarray:
    """A voiced test signal the VAD takes for speech: a wobbling 140 Hz buzz with harmonics."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = 140 + 20 * np.sin(2 * np.pi * 3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    wave = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t) ** 2)
    wave += 0.01 * rng.standard_normal(len(t))
    return (np.clip(wave * 0.3, -1, 1) * 32767).astype(np.int16)


async def run_scenario(sessions: int, talk: str, seconds: float, avatar: Any, args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    device = StubDevice(args.features_ms, args.picture_ms)
    channel, to_device = _drained_channel("stub-peers"), _drained_channel("stub-device")
    worker = SimpleNamespace(channel=channel, feeds={})
    lag, pauses = LoopLag(), GcPauses()
    lives, feeds, pushers = [], [], []
    signal = voice(8.0, 0)
    try:
        for k in range(sessions):
            live = LiveSession(avatar, None, None, jitter_seconds=0.02, processing_seconds=0.09,
                               remote=StubStream(device, avatar, to_device, f"s{k}"))
            live.start()
            feed = SessionFeed(f"s{k}", live, worker, None)  # type: ignore[arg-type]
            worker.feeds[f"s{k}"] = feed
            lives.append(live)
            feeds.append(feed)
        await asyncio.sleep(1.0)  # the clocks run; the window starts with everyone connected
        lag.start()
        pauses.install()
        cpu0, wall0 = time.process_time(), time.monotonic()
        loop_cpu0 = time.thread_time()  # this coroutine runs on the loop's thread: the loop's own CPU
        frames0 = sum(live.stats.frames for live in lives)
        for k, live in enumerate(lives):
            pushers.append(loop.create_task(_push(live, speech_plan(seconds, talk, k), signal, seconds)))
        await asyncio.sleep(seconds)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        loop_cpu = time.thread_time() - loop_cpu0
        frames = sum(live.stats.frames for live in lives) - frames0
        active = sum(live.stats.active_frames for live in lives)
        result = {
            "sessions": sessions,
            "talk": talk,
            "seconds": round(wall, 2),
            "frames": frames,
            "active_frames": active,
            "cpu_percent": round(100 * cpu / wall, 1),
            "cpu_us_per_frame": round(1e6 * cpu / max(1, frames), 1),
            # the event loop's thread alone: what a slow loop is made of (the rest is channel
            # threads, the stub device and the collector)
            "loop_cpu_percent": round(100 * loop_cpu / wall, 1),
            "loop_cpu_us_per_frame": round(1e6 * loop_cpu / max(1, frames), 1),
            "late_percent": round(100 * sum(f.late for f in feeds) / max(1, sum(f.sent for f in feeds)), 2),
            "loop_lag_ms": lag.describe(),
            "gc": pauses.describe(),
            "sent_ms_p95_median": float(np.median([f.lags_ms()["sent_p95"] or 0.0 for f in feeds])),
            "ready_ms_p50_median": float(np.median([f.lags_ms()["ready_p50"] or 0.0 for f in feeds])),
        }
    finally:
        for task in pushers:
            task.cancel()
        await lag.stop()
        pauses.uninstall()
        for feed in feeds:
            await feed.close()
        for live in lives:
            await live.close()
        channel.close()
        to_device.close()
        device.close()
    return result


async def _push(live: LiveSession, spans: list[tuple[float, float]], signal: np.ndarray, seconds: float) -> None:
    """20 ms s16le chunks in real time through the WebSocket's decoder; nothing in silences."""
    decoder = make_decoder(parse_start({"type": "start", "format": "pcm_s16le", "sample_rate": RATE, "channels": 1}))
    loop = asyncio.get_running_loop()
    start = loop.time()
    step = int(CHUNK_SECONDS * RATE)
    for begin, end in spans:
        offset = 0
        t = begin
        while t < end and t < seconds:
            delay = start + t - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            chunk = signal[offset % (len(signal) - step): offset % (len(signal) - step) + step]
            for piece in decoder.feed(chunk.tobytes()):
                live.push(piece.planar, piece.sample_rate, piece.layout, enforce_limit=False)
            offset += step
            t += CHUNK_SECONDS
        live.end_of_input()


def _drained_channel(name: str) -> Channel:
    """A channel whose other end a thread reads and drops (the peer or device process's end)."""
    ours, theirs = multiprocessing.Pipe(duplex=True)
    threading.Thread(target=_drain, args=(theirs,), daemon=True).start()
    return Channel(ours, name)


def _drain(conn: Any) -> None:
    """The peer process's end: read and drop (the pickling and writing stay on our side)."""
    try:
        while True:
            conn.recv()
    except (EOFError, OSError):
        pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", default="8,16,26", help="comma-separated session counts, one scenario each")
    parser.add_argument("--talk", choices=("all", "conversational"), default="conversational")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per scenario")
    parser.add_argument("--features-ms", type=float, default=20.0, help="the stub device's features delay")
    parser.add_argument("--picture-ms", type=float, default=60.0, help="its picture delay (frames with speech)")
    parser.add_argument("--avatars", type=Path, default=ROOT / "avatars")
    parser.add_argument("--no-freeze", action="store_true",
                        help="leave start-up's objects in the garbage collector's walks (the server freezes them)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--switch-ms", type=float, default=0.5,
                        help="sys.setswitchinterval in ms (the server's server.switch_interval_ms, default 0.5)")
    parser.add_argument("--gil-rivals", type=int, default=0,
                        help="threads that each want the GIL in bursts (0.2 ms of Python every ~1.2 ms), standing in "
                             "for the main process's channel threads on a loaded server (default 0)")
    args = parser.parse_args(argv)
    try:
        args.counts = [int(n) for n in args.sessions.split(",")]
    except ValueError:
        parser.error(f"--sessions: not a list of counts: {args.sessions!r}")
    if not args.counts or min(args.counts) < 1 or args.seconds <= 0 or args.features_ms < 0 or args.picture_ms < 0:
        parser.error("--sessions need counts >= 1; --seconds > 0; the delays >= 0")
    if args.switch_ms <= 0 or args.gil_rivals < 0:
        parser.error("--switch-ms must be > 0 and --gil-rivals >= 0")
    return args


def start_gil_rivals(count: int, stop: threading.Event) -> list[threading.Thread]:
    """Threads that hold the GIL for 0.2 ms of Python, then sleep ~1 ms, until ``stop``: what
    the server's channel threads do to its loop in bursts (pickling, copies, callbacks)."""

    def rival() -> None:
        while not stop.is_set():
            until = time.perf_counter() + 0.0002
            while time.perf_counter() < until:
                pass
            time.sleep(0.001)

    threads = [threading.Thread(target=rival, name=f"gil-rival-{k}", daemon=True) for k in range(count)]
    for thread in threads:
        thread.start()
    return threads


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.setswitchinterval(args.switch_ms / 1000)
    avatar = ensure_demo_avatar(AvatarStore(args.avatars))
    if not args.no_freeze:  # as the server does once ready (server/app.py)
        freeze_startup()
    try:
        import uvloop  # the server's loop (uvicorn picks it when installed)

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    results = []
    stop = threading.Event()
    rivals = start_gil_rivals(args.gil_rivals, stop)
    try:
        for count in args.counts:
            results.append(runner(run_scenario(count, args.talk, args.seconds, avatar, args)))
    finally:
        stop.set()
        for thread in rivals:
            thread.join()
    for count, result in zip(args.counts, results, strict=True):
        lag = result["loop_lag_ms"]
        print(f"{count:3d} x {args.talk}: {result['frames']} frames ({result['active_frames']} with speech) in "
              f"{result['seconds']} s; CPU {result['cpu_percent']} % of a core, {result['cpu_us_per_frame']} us "
              f"per frame (the loop's thread {result['loop_cpu_us_per_frame']} us); loop lag p50/p99/max {lag['p50_ms']}/{lag['p99_ms']}/{lag['max_ms']} ms; "
              f"GC longest {result['gc']['pause_max_ms']} ms ({result['gc']['collections'][2]} full); "
              f"late {result['late_percent']} %; sent p95 {result['sent_ms_p95_median']} ms after release",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
