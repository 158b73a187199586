"""What the event loop's per-chunk audio calls cost when another thread wants the GIL.

Why: on the H200 the server's loop ran 8-13 ms late at the median with 26 conversational
sessions while its process used ~60 % of a core (docs/benchmarks.md, "2026-12-03, late
night"). A call that releases the GIL (PyAV's ``AudioResampler.resample`` does, around
``swr_convert``) hands it to any thread waiting for it, and the loop gets it back only when
that thread lets go: up to the switch interval later. The server's main process has a dozen
threads (the channels' senders and readers) that want the GIL in bursts. This times each of
the loop's per-chunk audio steps alone and beside one thread that always wants the GIL (the
worst case), at the server's switch interval (``server.switch_interval_ms``); the live output
now takes the polyphase row (pipeline/audio/upsample.py) where its input allows.

    python bench/gil_release_cost.py [--calls 2000] [--switch-ms 0.5]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.audio.decode import MonoResampler  # noqa: E402
from pipeline.audio.upsample import OutputResampler  # noqa: E402
from pipeline.audio.windows import FrameWindower  # noqa: E402

CHUNK = 320  # 20 ms at 16 kHz, what the audio WebSocket's clients send


def steps() -> dict[str, Callable[[np.ndarray], object]]:
    """One session's per-chunk work on the loop, step by step (pipeline/live/session.py)."""
    to48k, from48k, windower = MonoResampler(48000), MonoResampler(16000), FrameWindower()
    output = OutputResampler(48000)
    return {
        "16 kHz -> 48 kHz output (PyAV)": lambda x: to48k.push_planar(x[None, :], 16000, "mono"),
        "16 kHz -> 48 kHz output (polyphase)": lambda x: output.push_planar(x[None, :], 16000, "mono"),
        "48 kHz -> 16 kHz features (PyAV)": lambda x: from48k.push_planar(np.repeat(x, 3)[None, :], 48000, "mono"),
        "windower + VAD (numpy, webrtcvad)": lambda x: windower.push(x),
        "48 kHz int16 conversion (numpy)": lambda x: np.clip(np.repeat(x, 3) * 32767.0, -32768, 32767).astype(np.int16),
    }


def time_calls(step: Callable[[np.ndarray], object], chunks: list[np.ndarray], calls: int) -> float:
    """Mean microseconds per call."""
    for chunk in chunks[:20]:
        step(chunk)
    started = time.perf_counter()
    for i in range(calls):
        step(chunks[i % len(chunks)])
    return (time.perf_counter() - started) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--switch-ms", type=float, default=0.5, help="sys.setswitchinterval, ms (the server's default)")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.switch_ms <= 0:
        parser.error("--calls must be >= 1 and --switch-ms > 0")
    sys.setswitchinterval(args.switch_ms / 1000)
    rng = np.random.default_rng(0)
    chunks = [(0.1 * rng.standard_normal(CHUNK)).astype(np.float32) for _ in range(50)]
    alone = {name: time_calls(step, chunks, args.calls) for name, step in steps().items()}
    stop = threading.Event()

    def wants_the_gil() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    rival = threading.Thread(target=wants_the_gil, daemon=True)
    rival.start()
    try:
        beside = {name: time_calls(step, chunks, args.calls) for name, step in steps().items()}
    finally:
        stop.set()
        rival.join()
    print(f"us per {CHUNK}-sample chunk, switch interval {args.switch_ms:g} ms, {args.calls} calls each")
    print(f"{'step':40s} {'alone':>8s} {'beside a thread wanting the GIL':>32s}")
    for name in alone:
        print(f"{name:40s} {alone[name]:8.1f} {beside[name]:32.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
