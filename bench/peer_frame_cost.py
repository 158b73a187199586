"""What each outgoing WebRTC frame costs, step by step, before and after the peers' I420 rings.

Why: on an H200 the four peer processes were the largest CPU consumers of the server at 26
conversational sessions (~23 % of a core per session, 1.35-1.6 cores each; docs/benchmarks.md),
and a profile of one (run 181148) had its event loop holding the GIL mostly in the frame's copy
out of the ring (``VideoFrame.from_ndarray``) and aiortc's Python audio level. This times, per
frame of the demo avatar's size, the old and the new way of each step:

- the server's write into the session's ring (its channel thread): a BGR copy, or OpenCV's
  conversion to I420;
- the peer process's frame out of the ring: ``from_ndarray`` on its event loop, or a copy
  wrapped by ``from_numpy_buffer`` on its channel's receiving thread;
- the VP8 encode (aiortc's encoding thread): of a BGR frame (aiortc converts it with
  libswscale first), or of the I420 frame as it is;
- the audio level of each 20 ms Opus frame (the event loop, twice per video frame): aiortc's
  Python loop, or numpy.

    python bench/peer_frame_cost.py [--frames 300] [--side 512] [--write-doc]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import av  # noqa: E402
from aiortc.codecs.vpx import Vp8Encoder  # noqa: E402
from aiortc.rtp import compute_audio_level_dbov  # noqa: E402

from bench._report import cpu_name, write_section  # noqa: E402
from pipeline.ipc.frame_ring import FrameRing  # noqa: E402
from server.webrtc import audio_level_dbov  # noqa: E402

TITLE = "Outgoing WebRTC frame, step by step (CPU)"


def pictures(side: int, count: int) -> list[np.ndarray]:
    """A portrait whose mouth region changes every frame, as a talking avatar's does."""
    from skimage import data, transform

    face = (transform.resize(data.astronaut(), (side, side), anti_aliasing=True) * 255).astype(np.uint8)[:, :, ::-1]
    out = []
    for i in range(count):
        frame = np.ascontiguousarray(face)
        mouth = frame[side * 5 // 8 : side * 6 // 8, side * 3 // 8 : side * 5 // 8]
        mouth[:] = np.roll(mouth, i % 7, axis=0)
        out.append(frame)
    return out


def per_call(step: Callable[[int], object], calls: int) -> float:
    """Mean microseconds per call (after a short warm-up)."""
    for i in range(min(20, calls)):
        step(i)
    started = time.perf_counter()
    for i in range(calls):
        step(i)
    return (time.perf_counter() - started) / calls * 1e6


def measure(side: int, frames: int) -> list[tuple[str, str, float, float]]:
    """(step, where it runs, old us, new us) per frame."""
    images = pictures(side, 16)
    bgr, i420 = FrameRing.create((side, side, 3), i420=False), FrameRing.create((side, side, 3))
    try:
        rows = [(
            "frame into the session's ring",
            "server, channel thread",
            per_call(lambda i: bgr.write(i, images[i % 16]), frames),
            per_call(lambda i: i420.write(i, images[i % 16]), frames),
        )]
        rows.append((
            "frame out of the ring",
            "peer process: its event loop before, its channel's receiving thread now",
            per_call(lambda i: av.VideoFrame.from_ndarray(bgr.view(i % 8), format="bgr24"), frames),
            per_call(lambda i: av.VideoFrame.from_numpy_buffer(i420.view(i % 8).copy(), format="yuv420p"), frames),
        ))

        def encoder(ring: FrameRing) -> Callable[[int], object]:
            vp8, ready = Vp8Encoder(), []
            for i, image in enumerate(images):
                ring.write(i, image)
                ready.append(av.VideoFrame.from_numpy_buffer(ring.view(i % 8).copy(), format=ring.pixel_format))

            def encode(i: int) -> object:
                frame = ready[i % len(ready)]
                frame.pts, frame.time_base = i * 3600, Fraction(1, 90000)
                return vp8.encode(frame)

            return encode

        rows.append((
            "VP8 encode (a BGR frame: aiortc converts it to I420 first)",
            "peer process, encoding thread",
            per_call(encoder(bgr), frames),
            per_call(encoder(i420), frames),
        ))
        rng = np.random.default_rng(0)
        audio = av.AudioFrame.from_ndarray(rng.normal(0, 3000, (1, 960)).astype(np.int16), format="s16", layout="mono")
        audio.sample_rate = 48000
        rows.append((
            "audio level, two 20 ms frames",
            "peer process, event loop",
            2 * per_call(lambda i: compute_audio_level_dbov(audio), frames * 4),
            2 * per_call(lambda i: audio_level_dbov(audio), frames * 4),
        ))
        return rows
    finally:
        bgr.close()
        i420.close()


def table(rows: list[tuple[str, str, float, float]]) -> str:
    lines = [
        "| step per frame | runs in | before us | now us |",
        "|---|---|---|---|",
    ]
    lines += [f"| {step} | {where} | {old:.0f} | {new:.0f} |" for step, where, old, new in rows]
    old, new = sum(r[2] for r in rows[1:]), sum(r[3] for r in rows[1:])
    lines.append(
        f"| the peer process, all of the above but the ring write | | {old:.0f} | {new:.0f} "
        f"({100 * (old - new) / old:.0f} % less; {25 * (old - new) / 1e4:.1f} % of a core less per session at 25 fps) |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=300, help="calls per step")
    parser.add_argument("--side", type=int, default=512, help="the picture's side (the demo avatar: 512)")
    parser.add_argument("--write-doc", action="store_true", help="update its section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    rows = measure(args.side, args.frames)
    text = table(rows)
    print(text)
    if args.write_doc:
        command = "python bench/peer_frame_cost.py" + (" " + " ".join(argv or sys.argv[1:])).replace(" --write-doc", "")
        body = (
            f"Date: {datetime.date.today()}. Device: {cpu_name()} (one thread). Command: `{command.strip()}`. A {args.side}x{args.side} "
            f"BGR picture whose mouth region changes every frame; mean of {args.frames} calls per step.\n\n{text}\n"
        )
        write_section(TITLE, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
