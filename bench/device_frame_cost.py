"""CPU cost of one frame in a device process, silent or not, apart from any engine work.

Why: on an H200, 26 conversational sessions (half of them silent at any moment) all fell to the
same 15 fps with the GPU 82 % busy (docs/benchmarks.md, run 123325): a cost paid per frame by
silent frames too, not the GPU's. Every frame of every session crosses to its device process
(its 200 ms audio window), goes through the feature worker (VAD bookkeeping, the featurizer's
buffer) and comes back as a ``features`` message, talking or not. This runs that path alone: a
real :class:`~pipeline.live.device_link.DeviceLink` and device process with the tiny MuseTalk
layout on the CPU, N streams each sending a silent frame every 40 ms for S seconds, and reports
the device process's CPU per frame (from /proc), the server side's (this process's channel
threads) and the time from sending a frame to its ``features`` reply.

    .venv/bin/python bench/device_frame_cost.py --streams 16 26 --seconds 10
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.audio.windows import AudioFrame  # noqa: E402
from pipeline.avatar.store import AvatarStore  # noqa: E402
from pipeline.live.device_link import DeviceLink  # noqa: E402
from pipeline.live.device_process import DeviceSpec  # noqa: E402

FPS = 25
WINDOW = 3200  # samples of a frame's audio window (200 ms at 16 kHz)
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_SECOND


def run(link: DeviceLink, avatar, streams: int, seconds: float, first: int) -> dict[str, float]:
    opened = [link.open_stream(f"cost-{first}-{k}", avatar) for k in range(streams)]
    window = np.zeros(WINDOW, np.float32)
    replies: list[float] = []
    pending: list[tuple[float, concurrent.futures.Future]] = []
    frames = int(seconds * FPS)
    device_before, ours_before = cpu_seconds(link.process.pid), time.process_time()
    started = time.monotonic()
    for index in range(frames):
        due = started + index / FPS
        time.sleep(max(0.0, due - time.monotonic()))
        for stream in opened:
            sent = time.monotonic()
            features, _ = stream.submit(AudioFrame(index, window, False), 0, sent + 1.0, True)
            features.add_done_callback(lambda _f, sent=sent: replies.append(time.monotonic() - sent))
            pending.append((sent, features))
    for _, future in pending:
        future.result(timeout=30)
    elapsed = time.monotonic() - started
    device_cpu = cpu_seconds(link.process.pid) - device_before
    ours_cpu = time.process_time() - ours_before
    for stream in opened:
        stream.close()
    sent_frames = frames * streams
    replies.sort()
    return {
        "streams": streams,
        "frames": sent_frames,
        "seconds": elapsed,
        "device_cpu_percent": 100 * device_cpu / elapsed,
        "device_us_per_frame": 1e6 * device_cpu / sent_frames,
        "server_us_per_frame": 1e6 * ours_cpu / sent_frames,
        "reply_ms_p50": 1000 * statistics.median(replies),
        "reply_ms_p95": 1000 * replies[int(0.95 * (len(replies) - 1))],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[16, 26])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--avatars-dir", type=Path, default=ROOT / "avatars")
    parser.add_argument("--avatar", default="demo")
    parser.add_argument("--switch-interval-ms", type=float, default=0.5, help="the device process's GIL switch interval")
    args = parser.parse_args(argv)
    if min(args.streams) < 1 or args.seconds <= 0 or args.switch_interval_ms <= 0:
        parser.error("--streams must be >= 1, --seconds and --switch-interval-ms > 0")
    if not (args.avatars_dir / args.avatar).is_dir():
        parser.error(f"no avatar {args.avatar!r} under {args.avatars_dir} (make run prepares the demo)")
    from pipeline.engines.musetalk.synthetic import write_synthetic_checkpoints

    with tempfile.TemporaryDirectory() as tmp:
        models = write_synthetic_checkpoints(Path(tmp), tiny=True, seed=1)
        spec = DeviceSpec(
            name="cpu",
            engine="musetalk",
            engine_options={"device": "cpu", "dtype": "fp32", "models_dir": models, "batch_size": 8},
            avatars_dir=args.avatars_dir,
            batch_size=8,
            processing_seconds=0.09,
            headroom=0.9,
            switch_interval_ms=args.switch_interval_ms,
        )
        avatar = AvatarStore(args.avatars_dir).load(args.avatar)
        link = DeviceLink(spec)
        try:
            link.start(args.avatar, False)
            rows = [run(link, avatar, n, args.seconds, k) for k, n in enumerate(args.streams)]
        finally:
            link.close()
    print(f"silent frames through a device process (tiny MuseTalk, CPU), {args.seconds:g} s each, "
          f"switch interval {args.switch_interval_ms:g} ms")
    print("streams  frames/s  device CPU %  device us/frame  server us/frame  features reply p50/p95 ms")
    for r in rows:
        print(f"{r['streams']:7d}  {r['frames'] / r['seconds']:8.0f}  {r['device_cpu_percent']:11.1f}  "
              f"{r['device_us_per_frame']:15.0f}  {r['server_us_per_frame']:15.0f}  "
              f"{r['reply_ms_p50']:.1f} / {r['reply_ms_p95']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
