"""CPU of the server's frame writes into the sessions' I420 rings, by OpenCV's thread pool size.

Why: after the rings began holding I420 (the conversion ``cv2.cvtColor(BGR2YUV_I420)`` runs on
the channels' sending threads), the server's main process on a 16-core H200 host used ~2.7
cores at 26 conversational sessions, where it had used ~0.5 (docs/benchmarks.md, 2026-12-04).
OpenCV's default pool fans each call over every core, and its workers spin between calls; the
server now runs OpenCV serially (pipeline/opencv_threads.py). This writes the demo avatar's
frames from ``--writers`` threads at ``--rate`` frames/s in all (26 sessions: 650), as the
channels' sending threads do, and reports the process's CPU per frame for each pool size.

    python bench/ring_write_cost.py [--pools 16,4,1] [--writers 4] [--rate 650] [--seconds 3] [--write-doc]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import cpu_name, write_section  # noqa: E402
from pipeline.ipc.frame_ring import FrameRing  # noqa: E402

TITLE = "Frame writes into the sessions' rings, by OpenCV pool size (CPU)"


def process_cpu() -> float:
    times = os.times()
    return times.user + times.system


def measure(pool: int, writers: int, rate: float, seconds: float, side: int) -> tuple[float, float]:
    """(CPU us per frame, wall us per write) with OpenCV's pool at ``pool`` threads."""
    cv2.setNumThreads(pool)
    image = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    rings = [FrameRing.create((side, side, 3), 8, i420=True) for _ in range(writers)]
    per_writer = max(1, int(rate * seconds / writers))
    interval = writers / rate
    walls: list[float] = []

    def write(ring: FrameRing) -> None:
        start = time.perf_counter()
        for i in range(per_writer):
            t0 = time.perf_counter()
            ring.write(i, image)
            walls.append(time.perf_counter() - t0)
            delay = start + (i + 1) * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)

    try:
        write(rings[0])  # warm-up: the pool's threads start
        walls.clear()
        cpu0 = process_cpu()
        threads = [threading.Thread(target=write, args=(ring,)) for ring in rings]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        cpu = process_cpu() - cpu0
    finally:
        for ring in rings:
            ring.close()  # the owner's close unlinks
    return 1e6 * cpu / (per_writer * writers), 1e6 * float(np.median(walls))


def pool_sizes(text: str) -> list[int]:
    """``--pools``: comma-separated thread counts, each at least 1."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"not a list of thread counts >= 1: {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pools", type=pool_sizes, default=f"{os.cpu_count()},1", help="OpenCV pool sizes to compare")
    parser.add_argument("--writers", type=int, default=4, help="writing threads (the peer processes' channels)")
    parser.add_argument("--rate", type=float, default=650.0, help="frames/s over all writers (26 sessions: 650)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--side", type=int, default=512, help="the picture's side (the demo avatar: 512)")
    parser.add_argument("--write-doc", action="store_true", help="update its section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    rows = []
    for pool in args.pools:
        cpu_us, wall_us = measure(pool, args.writers, args.rate, args.seconds, args.side)
        rows.append((pool, cpu_us, wall_us, cpu_us * args.rate / 1e4))
        print(f"pool {pool:>3}: {cpu_us:8.0f} us CPU per frame, write {wall_us:6.0f} us (median), "
              f"{cpu_us * args.rate / 1e4:6.1f} % of a core at {args.rate:g} frames/s")
    given = argv if argv is not None else sys.argv[1:]
    command = "python bench/ring_write_cost.py " + " ".join(a for a in given if a != "--write-doc")
    body = "\n".join([
        f"Date: {datetime.date.today()}. Device: {cpu_name()} ({os.cpu_count()} cores). Command: `{command.strip()}`. "
        f"{args.writers} threads write {args.side}x{args.side} BGR frames into I420 rings at {args.rate:g} "
        "frames/s in all, as the channels' sending threads do; CPU is the whole process's (os.times).",
        "",
        "| OpenCV pool threads | CPU per frame, us | write, median us | % of a core at this rate |",
        "|---|---|---|---|",
        *(f"| {pool} | {cpu:.0f} | {wall:.0f} | {share:.1f} |" for pool, cpu, wall, share in rows),
    ])
    if args.write_doc:
        write_section(TITLE, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
