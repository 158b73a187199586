"""Lite engine throughput on ONE core at the demo avatar's resolution, and render real-time factor.

    python bench/lite_engine.py [--frames 2000] [--write [docs/benchmarks.md]]

Pins itself to one core (affinity + single-threaded OpenCV/BLAS) before importing numpy, so
the figure is per core: a machine's session capacity is roughly cores x this / 25.
"""

from __future__ import annotations

import os

os.environ.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

import argparse  # noqa: E402
import datetime  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
cv2.setNumThreads(1)

from bench._report import DOC, cpu_name, write_section  # noqa: E402
from pipeline.audio.windows import FrameWindower  # noqa: E402
from pipeline.avatar.demo import ensure_demo_avatar  # noqa: E402
from pipeline.avatar.store import AvatarStore  # noqa: E402
from pipeline.compositor import Compositor  # noqa: E402
from pipeline.engines.base import FrameRequest  # noqa: E402
from pipeline.engines.lite import LiteEngine, LiteFeaturizer  # noqa: E402
from pipeline.render import render_to_file  # noqa: E402
from tests.speech import speech_clip  # noqa: E402


def rate(n: int, fn) -> float:  # noqa: ANN001
    fn(min(n, 50))  # warm caches (face crop, rig, mask)
    start = time.perf_counter()
    fn(n)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument(
        "--write", nargs="?", const=str(DOC), default=None, metavar="MD",
        help="write the section into this markdown file (default docs/benchmarks.md)",
    )
    args = parser.parse_args()
    n = args.frames

    tmp = Path(tempfile.mkdtemp(prefix="lipstream-bench-"))
    avatar = ensure_demo_avatar(AvatarStore(tmp / "avatars"))
    engine = LiteEngine()
    engine.load_avatar(avatar)
    compositor = Compositor(avatar)
    rng = np.random.default_rng(0)
    params = np.column_stack([rng.uniform(0.1, 1, n), rng.uniform(-1, 1, n), rng.uniform(0, 0.5, n)]).astype(np.float32)
    requests = [FrameRequest(avatar, 0, p) for p in params]

    clip = speech_clip(tmp / "speech.wav", text="The quick brown fox jumps over the lazy dog. " * 2,
                       silence_before=0.5, silence_after=0.5)
    windower = FrameWindower()
    from pipeline.audio.decode import decode_audio

    audio_frames = windower.push(decode_audio(clip.path).mono16k) + windower.finish()

    def featurize(k: int) -> None:
        f = LiteFeaturizer()
        for i in range(k):
            f.features([audio_frames[i % len(audio_frames)]])

    def generate(batch: int):
        def run(k: int) -> None:
            for i in range(0, k, batch):
                engine.generate(requests[i : i + batch])
        return run

    crops = engine.generate(requests[:64])

    def compose(k: int) -> None:
        for i in range(k):
            compositor.compose(0, crops[i % 64])

    def both(k: int) -> None:
        for i in range(k):
            compositor.compose(0, engine.generate([requests[i]])[0])

    rows = [
        ("featurizer (VAD flags given, per frame)", rate(n, featurize)),
        ("engine generate, batch 1", rate(n, generate(1))),
        ("engine generate, batch 16", rate(n, generate(16))),
        ("compositor compose", rate(n, compose)),
        ("engine + compositor (the acceptance figure)", rate(n, both)),
    ]
    out = tmp / "render.mp4"
    result = render_to_file(avatar, clip.path, out, engine, batch_size=16)
    rtf = result.duration / result.seconds

    cmd = "python bench/lite_engine.py" + (f" --frames {n}" if n != 2000 else "") + " --write"
    lines = [
        f"Date: {datetime.date.today()}. Device: {cpu_name()}, pinned to 1 core "
        f"(OpenCV/BLAS single-threaded). Avatar: demo, 512x512, face box "
        f"{int(avatar.face_boxes[0][2] - avatar.face_boxes[0][0])}x{int(avatar.face_boxes[0][3] - avatar.face_boxes[0][1])} px. "
        f"Command: `{cmd}`.",
        "",
        "| stage | frames/s on one core |",
        "|---|---|",
        *[f"| {name} | {fps:,.0f} |" for name, fps in rows],
        "",
        f"Offline render (`render_to_file`, {result.duration:.1f} s of espeak-ng speech, {result.frames} frames, "
        f"{result.active_frames} active, H.264 veryfast crf 20 + AAC): {result.seconds:.2f} s, "
        f"**{rtf:.1f}x real time** on one core (x264 encoding dominates).",
        "",
        "Target (issue 2): >= 100 frames/s per core for engine + compositor.",
    ]
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section("Lite engine (CPU)", body, Path(args.write))


if __name__ == "__main__":
    main()
