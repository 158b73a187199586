"""MuseTalk engine on a GPU: throughput, the official-style baseline, speed options, concurrent
live sessions, memory, and an offline render; full-size random weights (synthetic.py).

Run on the device (results as JSON in --out), then write docs/benchmarks.md here from the JSON:

    python -m bench.musetalk_engine --device cuda:0 --models /tmp/mt --out $OUT
    python -m bench.musetalk_engine --report results.json [--report-command "..."]

``--device cpu --tiny`` runs every section on tiny weights (a check of the program, not figures).

Sections (each guarded by the time budget, results written after each):
  variants    speed options at two batch sizes: eager, channels_last, CUDA graphs (each alone and
              together), classic attention vs SDPA, torch.compile; the best becomes the engine's
  sweep       frames/s and batch latency vs batch size (UNet + VAE decode + GPU blend + paste)
  official    the official realtime loop's style in this process: one session, eager fp16, batch
              20, decoded faces to the CPU, then per frame resize + paste + mask blend (PIL) in a
              second thread as the official script does; vs our engine at batch 20
  sessions    N simulated 25 fps sessions (Whisper features through the FeatureWorker, frames
              through an EngineWorker with deadlines); the largest N with p95 submit-to-frame
              latency < 250 ms and no backlog
  memory      device memory per avatar (latents + blend caches) and per session
  render      `lipstream render --engine musetalk` of 10 s of audio, checked with PyAV
"""

from __future__ import annotations

import argparse
import concurrent.futures
import heapq
import json
import os
import platform
import queue
import subprocess
import sys
import threading
import time
import wave
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from pipeline.avatar.model import Avatar
from pipeline.engines.base import FrameRequest

FPS = 25
SR = 16000
BATCHES = (1, 4, 8, 16, 32, 48, 64)


# ---------------------------------------------------------------------------------------- helpers


class Clock:
    def __init__(self, budget: float) -> None:
        self.start = time.perf_counter()
        self.budget = budget

    @property
    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)


def _f(x: float | None) -> str:
    return "-" if x is None or x == float("inf") else f"{x:.0f}"


def log(*args: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_avatar_arrays(n: int = 50, width: int = 1280, height: int = 720) -> dict[str, np.ndarray]:
    """A 720p avatar from the astronaut photograph (scaled to 720x720, centred), a synthetic face
    box on her face and a soft jaw-like mask (lower half, blurred), shifted a little per frame."""
    import cv2
    from skimage import data

    face = cv2.resize(np.ascontiguousarray(data.astronaut()[:, :, ::-1]), (height, height), interpolation=cv2.INTER_AREA)
    canvas = np.full((height, width, 3), 40, np.uint8)
    x0 = (width - height) // 2
    canvas[:, x0 : x0 + height] = face
    s = height / 512
    box = np.array([x0 + 170 * s, 50 * s, x0 + 290 * s, 210 * s]).round().astype(np.int32)
    frames, boxes = [], []
    for i in range(n):
        dx = round(4 * np.sin(2 * np.pi * i / n))
        frames.append(np.roll(canvas, dx, axis=1))
        boxes.append(box + np.array([dx, 0, dx, 0], np.int32))
    yy, xx = np.mgrid[0:256, 0:256]
    soft = ((yy > 128) & (((xx - 128) / 110.0) ** 2 + ((yy - 150) / 100.0) ** 2 < 1)).astype(np.uint8) * 255
    mask = cv2.GaussianBlur(soft, (31, 31), 0)
    boxes_arr = np.stack(boxes)
    cw = (boxes_arr[:, 2] - boxes_arr[:, 0]) // 2 * 3 // 2
    cx, cy = (boxes_arr[:, 0] + boxes_arr[:, 2]) // 2, (boxes_arr[:, 1] + boxes_arr[:, 3]) // 2
    crop = np.stack([cx - cw, cy - cw, cx + cw, cy + cw], 1).astype(np.int32)
    return {
        "frames": np.stack(frames),
        "face_boxes": boxes_arr,
        "crop_boxes": crop,
        "landmarks": np.zeros((n, 68, 2), np.float32),
        "detected": np.ones(n, np.uint8),
        "masks": np.repeat(mask[None], n, 0),
    }


def save_avatar(avatars_dir: Path, avatar_id: str = "bench") -> Avatar:
    from pipeline.avatar.model import FORMAT_VERSION
    from pipeline.avatar.store import AvatarStore

    arrays = make_avatar_arrays()
    n, h, w = arrays["frames"].shape[:3]
    meta = {
        "format_version": FORMAT_VERSION,
        "id": avatar_id,
        "source": {"name": "astronaut-720p-synthetic-box", "sha256": ""},
        "fps": FPS,
        "frame_count": n,
        "cycle_length": 2 * n - 2,
        "width": w,
        "height": h,
        "created": "2026-01-01T00:00:00Z",
        "mask": "synthetic",
    }
    return AvatarStore(avatars_dir).save(avatar_id, meta=meta, overwrite=True, **arrays)


def speechy(seconds: float, seed: int = 0) -> np.ndarray:
    """Syllable-like harmonic bursts (no espeak needed)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    voice = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / SR) / k for k in range(1, 8))
    env = np.clip(np.sin(2 * np.pi * 3.1 * t + rng.uniform(0, 6)), 0, None) ** 2
    return (0.3 * voice * env + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def new_engine(args: argparse.Namespace, **options: Any):
    from pipeline.engines.musetalk.engine import MuseTalkEngine

    opts = {"batch_size": 64, "warmup": False, **options}
    return MuseTalkEngine(models_dir=args.models, device=args.device, dtype=args.dtype, **opts)


def requests_for(avatar: Avatar, n: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> list[FrameRequest]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, 50, 384, generator=gen).to(device=device, dtype=dtype)
    return [FrameRequest(avatar, (seed + i) % avatar.frame_count, tokens[i]) for i in range(n)]


def time_compose(engine, avatar: Avatar, batch: int, reps: int, warmup: int = 2) -> dict[str, float]:
    reqs = requests_for(avatar, batch, engine.device, engine.dtype)
    for _ in range(warmup):
        engine.compose(reqs)
    sync(engine.device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        frames = engine.compose(reqs)  # returns numpy frames: the work is done when it returns
        times.append(time.perf_counter() - t)
    assert len(frames) == batch and frames[0].shape == avatar.frames[0].shape
    med = float(np.median(times))
    return {"batch": batch, "latency_ms": med * 1000, "p90_ms": float(np.percentile(times, 90)) * 1000, "fps": batch / med}


def time_gpu_only(engine, avatar: Avatar, batch: int, reps: int) -> float:
    """Median seconds of UNet + VAE decode alone (generate_float), for the gap analysis."""
    reqs = requests_for(avatar, batch, engine.device, engine.dtype)
    for _ in range(2):
        engine.generate_float(reqs)
    sync(engine.device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        engine.generate_float(reqs)
        sync(engine.device)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


# --------------------------------------------------------------------------------------- sections

VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("eager", {"channels_last": False, "cuda_graphs": False, "compile": "none"}),
    ("channels_last", {"channels_last": True, "cuda_graphs": False, "compile": "none"}),
    ("cuda_graphs", {"channels_last": False, "cuda_graphs": True, "compile": "none"}),
    ("channels_last+cuda_graphs", {"channels_last": True, "cuda_graphs": True, "compile": "none"}),
    ("classic_attention+channels_last", {"channels_last": True, "cuda_graphs": False, "compile": "none", "attention": "classic"}),
]
COMPILE_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("compile_static+channels_last", {"channels_last": True, "cuda_graphs": False, "compile": "static"}),
    ("compile_static+channels_last+cuda_graphs", {"channels_last": True, "cuda_graphs": True, "compile": "static"}),
    ("compile_dynamic+channels_last+cuda_graphs", {"channels_last": True, "cuda_graphs": True, "compile": "default"}),
]


def section_variants(args, avatar, res, clock, compile_only: bool = False) -> None:
    sizes = (8, 32) if not args.tiny else (2, 4)
    out = res.setdefault("variants", {})
    todo = list(COMPILE_VARIANTS) if compile_only else list(VARIANTS)
    if args.variants:
        wanted = args.variants.split(",")
        todo = [(n, o) for n, o in VARIANTS + COMPILE_VARIANTS if n in wanted]
    if args.device == "cpu":
        todo = [(n, o) for n, o in todo if not o.get("cuda_graphs")]
    for name, opts in todo:
        if name in out:
            continue
        if clock.left < (240 if "compile" in name else 60):
            log("variants: skipping", name, "(budget)")
            out[name] = {"skipped": "time budget"}
            continue
        t = time.perf_counter()
        try:
            engine = new_engine(args, **opts)
            engine.load_avatar(avatar)
            first = time.perf_counter()
            warm = engine.warmup(max(sizes)) if "compile" in name else None
            rows = [time_compose(engine, avatar, b, reps=args.reps) for b in sizes]
            out[name] = {
                "options": opts,
                "rows": rows,
                "setup_s": first - t,
                "warm_s": time.perf_counter() - first,
                "warmup_s": warm,
            }
            log("variant", name, " ".join(f"b{r['batch']}={r['fps']:.1f}fps/{r['latency_ms']:.1f}ms" for r in rows))
            engine.close()
            del engine
        except Exception as exc:  # noqa: BLE001 - a failing option is a result too
            log("variant", name, "failed:", repr(exc)[:300])
            out[name] = {"options": opts, "error": repr(exc)[:500]}
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        save(res, args)


def best_variant(res: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    scored = []
    for name, v in res.get("variants", {}).items():
        if "rows" in v:
            scored.append((sum(r["fps"] for r in v["rows"]), name, v["options"]))
    if not scored:
        return "eager", {}
    scored.sort(reverse=True)
    return scored[0][1], scored[0][2]


def section_sweep(args, avatar, res, clock, engine) -> None:
    rows = []
    for b in args.sweep_batches if not args.tiny else (1, 4, 8):
        if clock.left < 30:
            break
        row = time_compose(engine, avatar, b, reps=args.reps)
        row["gpu_ms"] = time_gpu_only(engine, avatar, b, reps=max(3, args.reps // 2)) * 1000
        rows.append(row)
        log(f"sweep b={b}: {row['fps']:.1f} fps, batch {row['latency_ms']:.1f} ms (GPU part {row['gpu_ms']:.1f} ms)")
    res["sweep"] = rows
    save(res, args)


def official_style(args, avatar: Avatar, batch: int, batches: int) -> dict[str, float]:
    """The official realtime loop's shape: eager fp16 UNet + VAE per batch of 20 in the main
    thread; decoded faces to the CPU as uint8 BGR; a second thread resizes each face to its box
    (cv2 bilinear), pastes it into the crop box and blends the crop into a copy of the frame with
    the crop-sized mask (PIL ``paste`` with a mask), one frame at a time."""
    import cv2
    from PIL import Image

    engine = new_engine(args, channels_last=False, cuda_graphs=False, compile="none", gpu_blend=False)
    engine.load_avatar(avatar)
    # official per-frame precomputation: crop box and a crop-sized "L" mask image
    masks, crops = [], []
    for i in range(avatar.frame_count):
        x1, y1, x2, y2 = (int(v) for v in avatar.face_boxes[i])
        cx1, cy1, cx2, cy2 = (int(v) for v in avatar.crop_boxes[i])
        m = np.zeros((cy2 - cy1, cx2 - cx1), np.uint8)
        m[y1 - cy1 : y2 - cy1, x1 - cx1 : x2 - cx1] = cv2.resize(avatar.masks[i], (x2 - x1, y2 - y1))
        masks.append(Image.fromarray(m))
        crops.append((cx1, cy1, cx2, cy2))
    frames_pil = [avatar.frames[i] for i in range(avatar.frame_count)]

    def blend_one(idx: int, face: np.ndarray) -> np.ndarray:
        x1, y1, x2, y2 = (int(v) for v in avatar.face_boxes[idx])
        res = cv2.resize(face.astype(np.uint8), (x2 - x1, y2 - y1))
        body = Image.fromarray(frames_pil[idx][:, :, ::-1])
        cx1, cy1, cx2, cy2 = crops[idx]
        face_large = body.crop((cx1, cy1, cx2, cy2))
        face_large.paste(Image.fromarray(res[:, :, ::-1]), (x1 - cx1, y1 - cy1, x2 - cx1, y2 - cy1))
        body.paste(face_large, (cx1, cy1), masks[idx])
        return np.array(body)[:, :, ::-1]

    q: queue.Queue = queue.Queue()
    done = []

    def consumer() -> None:
        while True:
            item = q.get()
            if item is None:
                return
            idx, face = item
            done.append(blend_one(idx, face))

    reqs = requests_for(avatar, batch, engine.device, engine.dtype)
    unet, vae = engine.models.unet, engine.models.vae
    latents = engine._avatar_latents(avatar)

    def infer() -> np.ndarray:
        with torch.inference_mode():
            lat = torch.stack([latents[r.frame_index] for r in reqs])
            tok = torch.stack([r.features for r in reqs]) + engine._pe
            pred = unet(lat, engine._timestep, encoder_hidden_states=tok).sample
            image = vae.decode(pred / 0.18215).sample
            image = (image / 2 + 0.5).clamp(0, 1)
            return (image * 255).round().to(torch.uint8).permute(0, 2, 3, 1).flip(-1).cpu().numpy()

    for _ in range(2):
        faces = infer()
    for r, f in zip(reqs[:3], faces[:3], strict=False):
        blend_one(r.frame_index, f)
    worker = threading.Thread(target=consumer)
    worker.start()
    t = time.perf_counter()
    for _ in range(batches):
        faces = infer()
        for r, f in zip(reqs, faces, strict=True):
            q.put((r.frame_index, f))
    gen_done = time.perf_counter()
    q.put(None)
    worker.join()
    total = time.perf_counter() - t
    # the blend thread alone, for the record
    tb = time.perf_counter()
    for r, f in zip(reqs, faces, strict=True):
        blend_one(r.frame_index, f)
    blend_ms = (time.perf_counter() - tb) / batch * 1000
    engine.close()
    return {
        "batch": batch,
        "fps": batch * batches / total,
        "generate_only_fps": batch * batches / (gen_done - t),
        "cpu_blend_ms_per_frame": blend_ms,
        "frames": len(done),
    }


def section_official(args, avatar, res, clock, engine) -> None:
    batch = 20 if not args.tiny else 4
    batches = 15 if not args.tiny else 2
    off = official_style(args, avatar, batch, batches)
    ours = time_compose(engine, avatar, batch, reps=max(args.reps, 5))
    best = max(res.get("sweep", [ours]), key=lambda r: r["fps"])
    res["official"] = {"official": off, "ours_batch20": ours, "ours_best": best, "ratio_batch20": ours["fps"] / off["fps"], "ratio_best": best["fps"] / off["fps"]}
    log(f"official-style {off['fps']:.1f} fps; ours at 20: {ours['fps']:.1f} fps ({ours['fps'] / off['fps']:.2f}x); best {best['fps']:.1f} ({best['fps'] / off['fps']:.2f}x)")
    save(res, args)


def session_trial(
    engine, avatar: Avatar, n: int, seconds: float, batch: int, share: float = 1.0, budget: float = 0.25
) -> dict[str, Any]:
    """``n`` sessions, each submitting one frame every 40 ms (phases spread over the 40 ms):
    features through a FeatureWorker (real Whisper), then, for active frames, an EngineWorker
    frame with a deadline ``budget`` after submission. ``share``: the part of each session's
    time that is speech (speech/silence alternate in 4 s cycles, each session at its own phase;
    silent frames cost no engine work, as in the server). Latency: submit -> composed frame."""
    from pipeline.audio.windows import AudioFrame, FrameWindower
    from pipeline.live.feature_worker import FeatureWorker
    from pipeline.live.worker import EngineWorker

    ew = EngineWorker(engine, batch_size=batch, name=str(engine.device))
    fw = FeatureWorker(str(engine.device), burst=ew.burst)  # as a device process wires them
    featurizers = [engine.new_featurizer() for _ in range(n)]
    clip = speechy(seconds + 2, seed=3)
    windows = [f.window for f in FrameWindower().push(clip)]
    silence = np.zeros_like(windows[0])
    rng = np.random.default_rng(n)
    phases = rng.integers(0, 100, n)
    # Where each stream is in its 30 s Whisper segment, as in a server whose sessions have run
    # for a while: windows hold 0-30 s of audio (trimmed windows cost what they hold). The
    # stretch before is fed as silence (no encoder work).
    offsets = rng.integers(0, 750, n)
    for k, featurizer in enumerate(featurizers):
        featurizer.features([AudioFrame(j, silence, False) for j in range(int(offsets[k]))])
    lat: list[tuple[float, float]] = []  # (submit time, latency) of generated frames
    feat_lat: list[float] = []
    lock = threading.Lock()
    outstanding = [0]
    failures = [0]
    idle = [0]

    def on_frame(t_submit: float, fut: concurrent.futures.Future) -> None:
        with lock:
            outstanding[0] -= 1
            if fut.cancelled() or fut.exception() is not None:
                failures[0] += 1
            else:
                lat.append((t_submit, time.monotonic() - t_submit))

    def on_features(k: int, i: int, t_submit: float, fut: concurrent.futures.Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            with lock:
                outstanding[0] -= 1
                failures[0] += 1
            return
        with lock:
            feat_lat.append(time.monotonic() - t_submit)
        feats = fut.result()[0]
        if not feats.active:
            with lock:
                outstanding[0] -= 1
                idle[0] += 1
            return
        req = FrameRequest(avatar, avatar.cycle_index(i), feats.data)
        ef = ew.submit(req, t_submit + budget, k)
        ef.add_done_callback(lambda f: on_frame(t_submit, f))

    positions0, windows0 = engine.whisper.encoder_positions, engine.whisper.encoder_windows
    start = time.monotonic() + 0.05
    heap = [(start + k * 0.04 / n, k, 0) for k in range(n)]
    heapq.heapify(heap)
    end = start + seconds
    submitted = 0
    while heap:
        t_next, k, i = heapq.heappop(heap)
        if t_next >= end:
            continue
        delay = t_next - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        speaking = ((i + phases[k]) % 100) < share * 100
        frame = AudioFrame(int(offsets[k]) + i, windows[i % len(windows)] if speaking else silence, bool(speaking))
        now = time.monotonic()
        with lock:
            outstanding[0] += 1
        submitted += 1
        ff = fw.submit(featurizers[k], [frame], k)
        ff.add_done_callback(lambda f, k=k, i=i, now=now: on_features(k, i, now, f))
        heapq.heappush(heap, (t_next + 0.04, k, i + 1))
    backlog_at_end = outstanding[0]
    drain = time.monotonic() + 5
    while outstanding[0] > 0 and time.monotonic() < drain:
        time.sleep(0.01)
    fw.close()
    ew.close()
    steady = [l for t, l in lat if t > start + 1.0]  # skip the first second (warm-up)

    def pct(values: list[float], q: float) -> float | None:
        return float(np.percentile(values, q)) * 1000 if values else None

    return {
        "sessions": n,
        "share": share,
        "submitted": submitted,
        "generated": len(lat),
        "idle_frames": idle[0],
        "failures": failures[0],
        "backlog_at_end": backlog_at_end,
        "p50_ms": pct(steady, 50),
        "p95_ms": pct(steady, 95),
        "max_ms": pct(steady, 100),
        "features_p95_ms": pct(feat_lat, 95),
        "late_share": float(np.mean([l > budget for l in steady])) if steady else None,
        "encoder_positions_per_window": (engine.whisper.encoder_positions - positions0) / max(engine.whisper.encoder_windows - windows0, 1),
        "mean_batch": ew.stats.frames / max(ew.stats.batches, 1),
        "feature_passes": fw.passes,
        "gpu_busy": ew.stats.busy_seconds / seconds,
    }


def section_sessions(args, avatar, res, clock, engine) -> None:
    seconds = 6.0 if not args.tiny else 2.0
    batch = args.session_batch
    out = res.setdefault("sessions", {"batch": batch, "seconds": seconds, "trials": [], "max_sessions": {}})
    session_trial(engine, avatar, 4, 2.0 if not args.tiny else 1.0, batch)  # warm-up: Whisper shapes, threads

    def good(r: dict[str, Any]) -> bool:
        # falling behind: more frames in flight at the end than a 250 ms budget holds
        in_budget = r["sessions"] * FPS * 0.25
        return r["p95_ms"] is not None and r["p95_ms"] < 250 and r["backlog_at_end"] <= in_budget and r["failures"] == 0

    streams = [int(x) for x in args.whisper_streams.split(",")]
    series = [(share, st) for st in streams for share in [float(x) for x in args.speaking_shares.split(",")]]
    for share, st in series:
        if engine.device.type == "cuda":  # Whisper on its own CUDA stream, or on the default one
            engine.whisper._stream = engine.whisper.new_stream() if st else None
        ok_n, bad_n = 0, None
        n = max(1, round(args.sessions_start / max(share, 0.25)))
        while clock.left > seconds + 25:
            r = session_trial(engine, avatar, n, seconds, batch, share)
            r["whisper_stream"] = bool(st)
            out["trials"].append(r)
            log(
                f"sessions share={share} stream={st} n={n}: p50 {_f(r['p50_ms'])} p95 {_f(r['p95_ms'])} ms (features p95 "
                f"{_f(r['features_p95_ms'])}) backlog {r['backlog_at_end']} mean batch {r['mean_batch']:.1f} busy {r['gpu_busy']:.2f}"
            )
            save(res, args)
            if good(r):
                ok_n = max(ok_n, n)
                if bad_n is None:
                    n += args.sessions_step
                elif bad_n - ok_n <= 1:
                    break
                else:
                    n = (ok_n + bad_n) // 2
            else:
                bad_n = n if bad_n is None else min(bad_n, n)
                if bad_n - ok_n <= 1 or n <= 1:
                    break
                n = (ok_n + bad_n) // 2
            if args.tiny and len(out["trials"]) >= 2:
                break
        out["max_sessions"][f"{share}" + ("" if len(streams) == 1 else f"/stream{st}")] = ok_n
        save(res, args)


def section_memory(args, avatar, res, engine) -> None:
    mem = engine.memory_bytes(avatar)
    out = {"avatar_latents_mb": mem["latents"] / 1e6, "avatar_blend_mb": mem["blend"] / 1e6, "frames": avatar.frame_count}
    out["per_frame_kb"] = (mem["latents"] + mem["blend"]) / avatar.frame_count / 1e3
    if engine.device.type == "cuda":
        out["weights_mb"] = sum(
            p.numel() * p.element_size() for m in (engine.models.unet, engine.models.vae, engine.models.whisper) for p in m.parameters()
        ) / 1e6
        # a session's device state: none persists (featurizer audio lives on the CPU); per
        # frame in flight: one Whisper window's hidden states [1500, 5, 384] until its tokens are cut
        out["whisper_window_mb"] = 1500 * 5 * 384 * torch.finfo(engine.dtype).bits / 8 / 1e6
        out["tokens_per_frame_kb"] = 50 * 384 * torch.finfo(engine.dtype).bits / 8 / 1e3
        out["max_allocated_gb"] = torch.cuda.max_memory_allocated(engine.device) / 1e9
    res["memory"] = out
    log("memory", out)
    save(res, args)


def section_render(args, res, avatars_dir: Path) -> None:
    import av

    audio = speechy(10.0, seed=5)
    wav = Path(args.work) / "speech10s.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype(np.int16).tobytes())
    cfg = Path(args.work) / "render.yaml"
    cfg.write_text(
        "avatars:\n"
        f"  dir: {avatars_dir}\n"
        "engine:\n"
        "  name: musetalk\n"
        f"  devices: [{'cuda:0' if args.device.startswith('cuda') else 'cpu'}]\n"
        f"  dtype: {args.dtype}\n"
        f"  batch_size: {16 if not args.tiny else 4}\n"
        f"  models_dir: {args.models}\n"
    )
    out = Path(args.work) / "render.mp4"
    cmd = [sys.executable, "-m", "server.cli", "--config", str(cfg), "render", "--engine", "musetalk",
           "--avatar", "bench", "--audio", str(wav), "--out", str(out), "--quiet"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    wall = time.perf_counter() - t
    r: dict[str, Any] = {"command": "lipstream --config render.yaml render --engine musetalk --avatar bench --audio speech10s.wav --out render.mp4",
                         "rc": proc.returncode, "wall_s": wall, "stdout": proc.stdout[-500:], "stderr": proc.stderr[-1500:]}
    if proc.returncode == 0:
        with av.open(str(out)) as c:
            v = c.streams.video[0]
            a = c.streams.audio[0]
            n = sum(1 for _ in c.decode(video=0))
            r.update({"frames": n, "expected_frames": int(len(audio) / SR * FPS), "video_codec": v.codec_context.name,
                      "audio_codec": a.codec_context.name, "width": v.codec_context.width, "height": v.codec_context.height,
                      "audio_rate": a.codec_context.sample_rate, "duration_s": float(c.duration / 1e6) if c.duration else None,
                      "size_mb": out.stat().st_size / 1e6})
    res["render"] = r
    log("render", {k: v for k, v in r.items() if k not in ("stderr",)})
    if proc.returncode != 0:
        log(proc.stderr[-3000:])
    save(res, args)


# ------------------------------------------------------------------------------------------- main


def save(res: dict[str, Any], args: argparse.Namespace) -> None:
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(res, indent=1, default=str))


def run(args: argparse.Namespace) -> None:
    clock = Clock(args.budget)
    res: dict[str, Any] = {}
    if (Path(args.out) / "results.json").is_file() and args.resume:
        res = json.loads((Path(args.out) / "results.json").read_text())
    dev = torch.device(args.device)
    env = {"python": platform.python_version(), "torch": torch.__version__, "date": date.today().isoformat(), "tiny": args.tiny}
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
        env["cuda"] = torch.version.cuda
    res["env"] = env
    log("env", env)
    ensure_synthetic_models(Path(args.models), tiny=args.tiny)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    avatars_dir = Path(args.work) / "avatars"
    avatar = save_avatar(avatars_dir)
    log("avatar", avatar.size, avatar.frame_count, "frames, face box", avatar.face_boxes[0].tolist())
    sections = args.sections.split(",")

    if "render" in sections and args.render_first:
        section_render(args, res, avatars_dir)
    if "variants" in sections:
        section_variants(args, avatar, res, clock)
    name, opts = best_variant(res)
    if args.force_options:
        name, opts = "forced", json.loads(args.force_options)
    res["chosen"] = {"name": name, "options": opts}
    log("chosen", name, opts)
    need_engine = any(s in sections for s in ("sweep", "official", "sessions", "memory"))
    if need_engine:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        top = max(args.sweep_batches) if not args.tiny else 8
        try:
            engine = new_engine(args, **opts)
            engine.load_avatar(avatar)
            res["chosen"]["warmup_s"] = engine.warmup(max(top, args.session_batch))
        except Exception as exc:  # noqa: BLE001 - fall back to the plain CUDA-graph engine
            log("chosen options failed:", repr(exc)[:1000])
            res["chosen"] = {"name": "cuda_graphs (fallback)", "options": {"cuda_graphs": True, "channels_last": False, "compile": "none"}, "error": repr(exc)[:1000]}
            engine = new_engine(args, **res["chosen"]["options"])
            engine.load_avatar(avatar)
            res["chosen"]["warmup_s"] = engine.warmup(max(top, args.session_batch))
        log("warm-up", res["chosen"]["warmup_s"])
        save(res, args)
        if "sweep" in sections and clock.left > 40:
            section_sweep(args, avatar, res, clock, engine)
        if "official" in sections and clock.left > 40:
            section_official(args, avatar, res, clock, engine)
        if "memory" in sections:
            section_memory(args, avatar, res, engine)
        if "render" in sections and not args.render_first and clock.left > 30:
            section_render(args, res, avatars_dir)
        if "sessions" in sections and clock.left > 40:
            section_sessions(args, avatar, res, clock, engine)
        engine.close()
    elif "render" in sections and not args.render_first and clock.left > 30:
        section_render(args, res, avatars_dir)
    if args.compile:
        section_variants(args, avatar, res, clock, compile_only=True)
    res["elapsed_s"] = time.perf_counter() - clock.start
    save(res, args)
    log("done in", round(res["elapsed_s"], 1), "s")


# ------------------------------------------------------------------------------------------ report


def report(path: Path, command: str, render_command: str, doc: Path | None = None) -> None:
    from bench import _report

    def write_section(title: str, body: str) -> None:
        _report.write_section(title, body, doc or _report.DOC)

    r = json.loads(path.read_text())
    env = r["env"]
    head = (
        f"Device: {env.get('gpu', 'cpu')} (CUDA {env.get('cuda')}), PyTorch {env['torch']}, Python {env['python']}; "
        f"{env['date']}. Full-size MuseTalk v1.5 architecture with random weights (synthetic.py, fp16); "
        "avatar 1280x720 (astronaut photograph scaled into a 720p frame, synthetic face box "
        f"and soft jaw mask). Commands: `{command}`.\n"
    )
    lines = [head]
    v = r.get("variants", {})
    if v:
        lines.append("### Speed options (frames/s of compose: UNet + VAE decode + GPU blend + paste)\n")
        sizes = next((tuple(x["batch"] for x in e["rows"]) for e in v.values() if "rows" in e), ())
        lines.append("| option | " + " | ".join(f"batch {b}: fps (batch ms)" for b in sizes) + " |")
        lines.append("|---|" + "---|" * len(sizes))
        for name, e in v.items():
            if "rows" in e:
                cells = [f"{x['fps']:.1f} ({x['latency_ms']:.1f})" for x in e["rows"]]
                if e.get("note"):
                    cells[-1] += f" [{e['note']}]"
            else:
                cells = [e.get("error", e.get("skipped", ""))[:80]] + [""] * (len(sizes) - 1)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append(f"\nChosen (engine default on CUDA): **{r['chosen']['name']}** `{r['chosen']['options']}`.\n")
    if r.get("sweep"):
        lines.append("### Throughput vs batch size (chosen options)\n")
        lines.append("| batch | frames/s | batch latency ms (median) | p90 ms | UNet+VAE alone ms |")
        lines.append("|---|---|---|---|---|")
        for x in r["sweep"]:
            lines.append(f"| {x['batch']} | {x['fps']:.1f} | {x['latency_ms']:.1f} | {x['p90_ms']:.1f} | {x['gpu_ms']:.1f} |")
        lines.append("")
    o = r.get("official")
    if o:
        off = o["official"]
        lines.append("### Against the official realtime loop's style (same process, same weights)\n")
        lines.append(
            f"Official style (one session, eager fp16, batch 20, faces to the CPU, per-frame cv2 resize + PIL paste/mask blend in a second thread): "
            f"**{off['fps']:.1f} frames/s** (generation alone {off['generate_only_fps']:.1f}; CPU blend {off['cpu_blend_ms_per_frame']:.2f} ms/frame). "
            f"Ours at batch 20: **{o['ours_batch20']['fps']:.1f} frames/s ({o['ratio_batch20']:.2f}x)**; ours at the best batch "
            f"({o['ours_best']['batch']}): {o['ours_best']['fps']:.1f} frames/s ({o['ratio_best']:.2f}x).\n"
        )
    s = r.get("sessions")
    if s:
        lines.append("### Concurrent 25 fps sessions\n")
        def label(key: str) -> str:
            share, _, stream = key.partition("/")
            where = {"stream0": " (Whisper on the default CUDA stream)", "stream1": " (Whisper on its own stream)"}.get(stream, "")
            return f"{float(share):.0%} speech{where}"

        maxes = ", ".join(f"{label(k)}: **{v}**" for k, v in s["max_sessions"].items())
        lines.append(
            f"Simulated in the bench process: each session submits a frame every 40 ms (phases spread) to the FeatureWorker "
            f"(real Whisper; all sessions' windows batched); active frames go to the EngineWorker (EDF, max batch {s['batch']}) with a "
            f"250 ms deadline; latency from submission to the composed full frame; {s['seconds']:.0f} s per trial, the first second "
            f"skipped; a trial fails at p95 >= 250 ms or when more frames are in flight at its end than 250 ms of frames (falling behind); speech and silence alternate in 4 s cycles at each session's own phase (silence costs no engine work). "
            f"Most sessions with p95 < 250 ms and no backlog: {maxes}.\n"
        )
        lines.append("| Whisper stream | speech share | sessions | p50 ms | p95 ms | max ms | features p95 ms | in flight at end | mean batch | GPU worker busy |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for t in sorted(s["trials"], key=lambda t: (-t.get("whisper_stream", True), -t.get("share", 1.0), t["sessions"])):
            lines.append(
                f"| {'own' if t.get('whisper_stream', True) else 'default'} | {t.get('share', 1.0):.0%} | {t['sessions']} | {_f(t['p50_ms'])} | {_f(t['p95_ms'])} | {_f(t['max_ms'])} | "
                f"{_f(t.get('features_p95_ms'))} | {t['backlog_at_end']} | {t['mean_batch']:.1f} | {t['gpu_busy']:.0%} |"
            )
        lines.append("")
    m = r.get("memory")
    if m:
        lines.append("### Memory\n")
        lines.append(
            f"Per avatar ({m['frames']} frames, 720p): latents {m['avatar_latents_mb']:.1f} MB + blend caches "
            f"{m['avatar_blend_mb']:.1f} MB on the GPU ({m['per_frame_kb']:.0f} KB per frame). Weights "
            f"{m.get('weights_mb', 0):.0f} MB. Per session: no persistent GPU state (the featurizer's audio is on the CPU); "
            f"in flight, one Whisper window's hidden states ({m.get('whisper_window_mb', 0):.1f} MB) per pass and "
            f"{m.get('tokens_per_frame_kb', 0):.0f} KB of tokens per frame. Peak allocated during the run: {m.get('max_allocated_gb', 0):.1f} GB.\n"
        )
    if r.get("notes"):
        lines.append("### Reading the figures\n")
        lines.append(r["notes"].strip() + "\n")
    write_section("MuseTalk engine (GPU)", "\n".join(lines))
    rr = r.get("render")
    if rr:
        body = (
            f"Device: {env.get('gpu', 'cpu')}; {env['date']}. `{rr['command']}` (config: engine.device cuda:0, dtype fp16, "
            f"batch_size 16, full-size random weights; 10 s of synthetic speech; the 1280x720 bench avatar). Command of the run: `{render_command}`.\n\n"
        )
        if rr.get("rc") == 0:
            body += (
                f"Wrote a valid MP4: {rr['frames']} video frames (expected {rr['expected_frames']}), {rr['video_codec']} "
                f"{rr['width']}x{rr['height']} + {rr['audio_codec']} {rr['audio_rate']} Hz, {rr['duration_s']:.2f} s, "
                f"{rr['size_mb']:.1f} MB; wall time {rr['wall_s']:.1f} s including process start and model loading "
                f"(CLI: {rr['stdout'].strip()}).\n"
            )
        else:
            body += f"Failed (rc {rr['rc']}): {rr['stderr'][-400:]}\n"
        if r.get("render_notes"):
            body += "\n" + r["render_notes"].strip() + "\n"
        write_section("MuseTalk render (GPU)", body)


def add_engine_arguments(p: argparse.ArgumentParser, out: str) -> None:
    """The options every GPU bench shares: where the engine runs, its weights, work and output
    folders (``new_engine`` and ``ensure_synthetic_models`` read them)."""
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--tiny", action="store_true", help="tiny weights (a CPU check of the program)")
    p.add_argument("--models", default="/tmp/musetalk-bench-models")
    p.add_argument("--work", default="/tmp/musetalk-bench-work")
    p.add_argument("--out", default=os.environ.get("OUT", out))


def ensure_synthetic_models(models: Path, tiny: bool = False) -> None:
    """Full-size (or tiny) random weights in the official layout, written once into ``models``."""
    if (models / "musetalkV15" / "unet.pth").is_file():
        return
    from pipeline.engines.musetalk.synthetic import write_synthetic_checkpoints

    t = time.perf_counter()
    write_synthetic_checkpoints(models, tiny=tiny, seed=0, dtype="fp32" if tiny else "fp16")
    log(f"wrote synthetic checkpoints in {time.perf_counter() - t:.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(p, "/tmp/musetalk-bench-out")
    p.add_argument("--sections", default="variants,sweep,official,memory,sessions,render")
    p.add_argument("--budget", type=float, default=540.0, help="seconds; sections are skipped past it")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also time torch.compile variants (slow to build)")
    p.add_argument("--session-batch", type=int, default=48)
    p.add_argument("--sessions-start", type=int, default=4)
    p.add_argument("--sessions-step", type=int, default=2)
    p.add_argument("--sweep-batches", type=lambda v: [int(x) for x in v.split(",")], default=list(BATCHES))
    p.add_argument("--speaking-shares", default="1.0,0.5")
    p.add_argument("--whisper-streams", default="1", help="1: Whisper on its own CUDA stream; 0: default stream; both: 0,1")
    p.add_argument("--variants", default="", help="comma-separated variant names (default: all non-compile ones)")
    p.add_argument("--force-options", default="", help="JSON engine options instead of the best variant")
    p.add_argument("--render-first", action="store_true")
    p.add_argument("--resume", action="store_true", help="keep sections already in --out/results.json")
    p.add_argument("--report", type=Path, help="write docs/benchmarks.md sections from a results.json")
    p.add_argument("--report-command", default="python -m bench.musetalk_engine --device cuda:0 --out $OUT")
    p.add_argument("--report-render-command", default="")
    p.add_argument("--doc", type=Path, default=None, help="markdown file for --report (default docs/benchmarks.md)")
    args = p.parse_args()
    if args.report:
        report(args.report, args.report_command, args.report_render_command or args.report_command, args.doc)
        return
    run(args)


if __name__ == "__main__":
    main()
