"""Where one H200's time goes per talking session: the Whisper window pass vs UNet + VAE decode.

The load test found one GPU holding 14 all-talking sessions, not 16 (docs/benchmarks.md,
"Load test on the H200: findings"): the GPU was 83-86 % busy. This splits that time:

  whisper   GPU ms of one encoder pass (log-mel + 4 layers, CUDA graph) per window, at batches
            of 1-24 windows, for windows padded to 30 s (1500 positions, the official input)
            and trimmed to fewer positions (what a frame's audio needs; see
            pipeline/engines/musetalk/features.py, "trimmed windows")
  sessions  the simulated sessions of bench/musetalk_engine.py (FeatureWorker + EngineWorker in
            this process, streams at random places of their 30 s segments), padded vs trimmed
            windows: latency from a frame's complete audio to its composed picture, and the
            share over the processing budget (the server's jitter + processing, 0.11 s)
  engine    UNet alone, VAE decode alone and the whole compose (compiled, CUDA graphs) per frame
            at batches 8-24, with cuDNN's heuristic algorithm choice and with
            ``torch.backends.cudnn.benchmark`` (it times every algorithm once per shape)
  contention  wall ms of one feature pass as the server runs it (WhisperBatcher on its
            high-priority stream, waited for; N windows holding 1-29 s of audio) alone and
            while another thread runs the engine's batches back to back at batch B, and those
            batches' ms alone and beside the passes: whether a pass beside the engine's work
            costs what it costs alone (the load test's ``feature_pass`` stage, in the server)
  upsample  VAE decode with diffusers' upsampling layers vs the engine's folded and transposed
            ones (pipeline/engines/musetalk/upsample.py): GPU ms per batch and how many 8-bit
            pixel levels each differs from the reference by in fp16

Run on the device (full-size random weights, synthetic.py), figures as JSON in --out:

    python -m bench.gpu_costs --device cuda:0 --models /tmp/mt --out $OUT
    python -m bench.gpu_costs --report $OUT/gpu_costs.json   # here: docs/benchmarks.md section
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

from bench.musetalk_engine import (
    _f,
    add_engine_arguments,
    ensure_synthetic_models,
    log,
    new_engine,
    requests_for,
    save_avatar,
    session_trial,
)

SECTION = "Where the GPU time goes (H200, per talking session)"
SECTION_KEYS = ("whisper", "contention", "sessions", "engine", "upsample")
CONCATENATED = ("engine", "upsample", "contention")
#: How section_contention runs the encoder, and how the engine's batches end beside it.
CONTENTION_VARIANTS = ("graphs", "graphs-wait", "graphs-high", "eager", "profile")
CONTENTION_ENGINE = ("compose", "pageable", "gpu")  # their tables keep the rows of every run given to --report


def gpu_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median GPU milliseconds of ``fn`` (CUDA events around each call on the current stream;
    wall time on a CPU, where only --tiny runs: a check of the program, not figures)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
        return float(np.median(times))
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def replayed_ms(fn, device: torch.device) -> tuple[float, Any]:
    """GPU ms of ``fn`` replayed from a CUDA graph (as the engine runs it: no launch gaps), and
    its output; on a CPU, plain wall ms."""
    if device.type != "cuda":
        return gpu_ms(fn), fn()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        output = fn()
    return gpu_ms(graph.replay), output


def section_whisper(engine, res: dict[str, Any], batches: list[int], positions: list[int]) -> None:
    whisper = engine.whisper
    rows = []
    max_batch = whisper.max_batch
    for n in batches:
        whisper.max_batch = n  # one pass of n windows
        for p in positions:
            seconds = p * 320 / 16000
            audio = [np.random.default_rng(i).standard_normal(int(seconds * 16000)).astype(np.float32) * 0.1 for i in range(n)]
            if p == 1500:
                fn = lambda a=audio: whisper.encode_audio(a)  # noqa: E731 - the production path
            else:
                fn = lambda a=audio, p=p: whisper.encode_audio(a, positions=p)  # noqa: E731
            ms = gpu_ms(fn)
            rows.append({"batch": n, "positions": p, "ms": ms, "ms_per_window": ms / n})
            log(f"whisper batch {n} positions {p}: {ms:.2f} ms ({ms / n:.3f} ms/window)")
    whisper.max_batch = max_batch
    res["whisper"] = rows


def section_contention(
    engine,
    avatar,
    res: dict[str, Any],
    batches: list[int],
    windows: int,
    reps: int,
    variants: list[str],
    engine_modes: list[str],
) -> None:
    """Feature passes alone and beside back-to-back engine batches (module docstring), for each
    way of running the encoder in ``variants``: ``graphs`` (the server's: CUDA graphs captured on
    a normal-priority stream, replayed on the batcher's high-priority one), ``graphs-wait`` (the
    same, the pass first waiting for the engine's stream, as WhisperBatcher.features did), ``graphs-high``
    (captured on a high-priority stream), ``eager`` (no encoder graphs). ``profile``: the busiest
    calls of a few passes beside the largest batch, from torch.profiler, and which threads hold
    the GIL meanwhile (py-spy). ``engine_modes``: how the engine thread's batch ends (engine_batch)."""
    import threading

    from pipeline.engines.musetalk.transfer import wait_asleep

    whisper = engine.whisper
    rng = np.random.default_rng(7)
    audio = [rng.standard_normal(int(s * 16000)).astype(np.float32) * 0.1 for s in rng.uniform(1, 29, windows)]
    stream = whisper._stream
    cuda = stream is not None

    wait_current = False

    def one_pass() -> tuple[float, float | None]:
        """Wall seconds of one pass and the ms its stream spent from its first to its last op."""
        started = time.perf_counter()
        if not cuda:  # a CPU check of the program
            whisper.encode_audio(audio)
            return time.perf_counter() - started, None
        with torch.cuda.device(whisper.device):  # as WhisperBatcher.features: its own stream, waited for
            if wait_current:  # what features() did before: wait for the current stream (the engine's)
                stream.wait_stream(torch.cuda.current_stream(whisper.device))
            with torch.cuda.stream(stream):
                first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                first.record()
                whisper.encode_audio(audio)
                last.record()
            wait_asleep(stream)
        return time.perf_counter() - started, first.elapsed_time(last)

    def engine_batch(reqs, mode: str) -> None:
        """One batch of the engine thread: ``compose`` its part in the server (UNet, VAE, blend,
        the boxes to the CPU through pinned memory: pipeline/engines/musetalk/transfer.py);
        ``pageable`` UNet + VAE ending in a pageable ``.cpu()`` copy, as the blend did before;
        ``gpu`` UNet + VAE waited for on a blocking event, nothing copied."""
        if mode == "compose":
            engine.compose_staged(reqs).wait()  # the device part, waited for (overlapped or not)
            return
        faces = engine.generate_float(reqs)
        if mode == "pageable":
            faces.to(torch.uint8).cpu()
        elif cuda:
            wait_asleep(torch.cuda.current_stream(engine.device))

    def engine_loop(reqs, mode: str, stop: threading.Event, times: list[float]) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            engine_batch(reqs, mode)
            times.append(time.perf_counter() - started)

    def ms(values: list[float], q: float, scale: float = 1000) -> float | None:
        return float(np.percentile(values, q)) * scale if values else None

    def beside(batch: int, work: Any, mode: str = "compose") -> tuple[Any, list[float], list[float]]:
        """``work()`` while the engine runs batches of ``batch`` back to back (none: alone)."""
        alone: list[float] = []
        engine_ms: list[float] = []
        if not batch:
            return work(), alone, engine_ms
        reqs = requests_for(avatar, batch, engine.device, engine.dtype)
        for _ in range(3):
            engine_batch(reqs, mode)
        t = time.perf_counter()
        while time.perf_counter() - t < 1.0:
            s0 = time.perf_counter()
            engine_batch(reqs, mode)
            alone.append(time.perf_counter() - s0)
        stop = threading.Event()
        thread = threading.Thread(target=engine_loop, args=(reqs, mode, stop, engine_ms), daemon=True)
        thread.start()
        time.sleep(0.2)
        try:
            out = work()
        finally:
            stop.set()
            thread.join()
        return out, alone, engine_ms

    def passes() -> list[tuple[float, float | None]]:
        out = []
        for _ in range(reps):
            out.append(one_pass())
            time.sleep(0.01)
        return out

    rows = res.setdefault("contention", [])
    graphs, priority = whisper.cuda_graphs, whisper.capture_priority
    for variant in variants:
        if variant == "profile":
            continue
        wait_current = variant == "graphs-wait"
        whisper.cuda_graphs = graphs and variant != "eager"
        whisper.capture_priority = -1 if variant == "graphs-high" else 0
        whisper._graphs.clear()  # captured again on this variant's stream
        for _ in range(3):
            one_pass()
        cells = [(0, "-")] + [(batch, mode) for mode in engine_modes for batch in batches]
        for batch, mode in cells:
            timed, alone, engine_ms = beside(batch, passes, mode)
            wall = [w for w, _ in timed]
            span = [g for _, g in timed if g is not None]
            row = {
                "variant": variant, "engine_mode": mode, "engine_batch": batch, "windows": windows, "trim": whisper.trim,
                "pass_p50_ms": ms(wall, 50), "pass_p95_ms": ms(wall, 95), "stream_p50_ms": ms(span, 50, 1),
                "engine_alone_ms": ms(alone, 50), "engine_beside_ms": ms(engine_ms, 50),
            }
            rows.append(row)
            log(
                f"contention [{variant}]: {windows} windows beside engine batch {batch or '-'} ({mode}): pass p50 {_f(row['pass_p50_ms'])} "
                f"p95 {_f(row['pass_p95_ms'])} ms (its stream {_f(row['stream_p50_ms'])}); engine batch alone "
                f"{_f(row['engine_alone_ms'])}, beside the passes {_f(row['engine_beside_ms'])} ms"
            )
    whisper.cuda_graphs, whisper.capture_priority = graphs, priority
    wait_current = False
    whisper._graphs.clear()
    for _ in range(3):  # captured again alone: a capture beside the engine's launches fails
        one_pass()
    if "profile" in variants and batches:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

        def profiled() -> Any:
            for _ in range(3):
                one_pass()
            with profile(activities=activities) as prof:
                for _ in range(5):
                    one_pass()
            return prof

        prof, _, _ = beside(max(batches), profiled)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
        log("contention profile, 5 passes beside engine batch", max(batches), "\n" + table)
        res["contention_profile"] = table
        holders = gil_holders(lambda: beside(max(batches), passes))
        if holders:
            log("contention: who holds the GIL beside engine batch", max(batches), "(thread | innermost frames: samples)")
            for line in holders:
                log("  " + line)
            res["contention_gil"] = holders


def gil_holders(work: Any, seconds: int = 4, top: int = 20) -> list[str]:
    """py-spy's samples of this process's GIL-holding threads while ``work()`` runs, as the most
    frequent (thread, innermost three frames): a thread blocked in a CUDA call while holding the
    GIL would stall every other thread's launches. [] when py-spy is missing or cannot attach."""
    import collections
    import shutil
    import subprocess
    import tempfile

    near = (Path(sys.executable).parent / "py-spy", Path("/tmp/site/bin/py-spy"))  # a venv's, the device kit's
    spy = shutil.which("py-spy") or next((str(p) for p in near if p.exists()), None)
    if spy is None:
        return []
    raw = Path(tempfile.mkdtemp()) / "gil.raw"
    cmd = [spy, "record", "-p", str(os.getpid()), "-d", str(seconds), "-r", "200", "--gil", "--threads",
           "--nonblocking", "--format", "raw", "-o", str(raw)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # attached
    work()
    _, err = proc.communicate(timeout=60)
    if not raw.exists():
        log("py-spy failed:", err.strip()[-300:])
        return []
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        counts[frames[0] + " | " + " < ".join(f.split(" (")[0] for f in reversed(frames[-3:]))] += int(n)
    total = sum(counts.values()) or 1
    return [f"{key}: {n} ({100 * n / total:.0f} %)" for key, n in counts.most_common(top)]


def section_sessions(
    engine, avatar, res: dict[str, Any], counts: list[int], batches: list[int], budget: float, modes: list[str]
) -> None:
    session_trial(engine, avatar, 4, 2.0, max(batches))  # warm-up: threads, shapes
    rows = res.setdefault("sessions", [])
    trim = engine.whisper.trim
    for windows in modes:
        engine.whisper.trim = windows == "trimmed"
        for batch, n in ((b, n) for b in batches for n in counts):
            r = session_trial(engine, avatar, n, 6.0, batch, 1.0, budget)
            r["windows"] = windows
            r["batch"] = batch
            rows.append(r)
            log(
                f"sessions [{windows}, batch {batch}] n={n}: p50 {_f(r['p50_ms'])} p95 {_f(r['p95_ms'])} ms, late {_f(100 * (r['late_share'] or 0))} %, "
                f"features p95 {_f(r['features_p95_ms'])}, positions/window {r['encoder_positions_per_window']:.0f}, "
                f"backlog {r['backlog_at_end']}, busy {r['gpu_busy']:.2f}"
            )
    engine.whisper.trim = trim


def section_engine(engine, avatar, res: dict[str, Any], batches: list[int], label: str) -> None:
    rows = []
    for n in batches:
        reqs = requests_for(avatar, n, engine.device, engine.dtype)
        latents = torch.stack([engine._avatar_latents(r.avatar)[r.frame_index] for r in reqs])
        tokens = torch.stack([engine._tokens(r.features) for r in reqs]) + engine._pe
        unet = lambda: engine._unet(latents, engine._timestep, encoder_hidden_states=tokens)  # noqa: E731
        unet_ms = gpu_ms(unet)
        with torch.inference_mode():
            unet_graph_ms = replayed_ms(unet, engine.device)[0]
        z = torch.randn(n, 4, 32, 32, device=engine.device, dtype=engine.dtype)
        if engine.channels_last:  # as the UNet hands it over
            z = z.contiguous(memory_format=torch.channels_last)
        if engine.compile_mode == "default":
            torch._dynamo.maybe_mark_dynamic(z, 0)
        vae_ms = gpu_ms(lambda: engine._decode(z))
        with torch.inference_mode():
            vae_graph_ms = replayed_ms(lambda: engine._decode(z), engine.device)[0]
        graph_ms = gpu_ms(lambda: engine.generate_float(reqs))
        t = time.perf_counter()
        for _ in range(10):
            engine.compose(reqs)
        compose_ms = (time.perf_counter() - t) / 10 * 1000
        row = {
            "cudnn": label, "vae_upsample": engine.vae_upsample, "batch": n, "unet_ms": unet_ms, "unet_graph_ms": unet_graph_ms, "vae_ms": vae_ms, "vae_graph_ms": vae_graph_ms, "graph_ms": graph_ms,
            "compose_ms": compose_ms, "fps": n / compose_ms * 1000,
        }
        rows.append(row)
        log(f"engine [{label}] batch {n}: unet {unet_ms:.1f} (graph {unet_graph_ms:.1f}) vae {vae_ms:.1f} (graph {vae_graph_ms:.1f}) graph {graph_ms:.1f} compose {compose_ms:.1f} ms ({row['fps']:.0f} fps)")
    res.setdefault("engine", []).extend(rows)


def section_upsample(engine, res: dict[str, Any], batches: list[int], compiled: bool) -> None:
    """VAE decode with diffusers' upsampling layers vs the engine's other forms of them
    (pipeline/engines/musetalk/upsample.py: ``folded`` phases, ``transposed``), each compiled as
    the engine compiles it (dynamic batch, channels_last) and replayed from a CUDA graph per
    batch; and how far each form's fp16 pixels are from the reference's. Row keys without a
    prefix are the folded form's (the first rows had only it)."""
    from pipeline.engines.musetalk.upsample import fold_upsamplers

    vae = engine.models.vae
    forms = {"folded": fold_upsamplers(vae, "phases")[0], "transposed": fold_upsamplers(vae, "transposed")[0]}
    if engine.channels_last:
        for model in forms.values():
            model.to(memory_format=torch.channels_last)

    def decoder(model):
        fn = lambda z: model.decode(z).sample  # noqa: E731
        return torch.compile(fn, dynamic=None) if compiled else fn

    variants = {"reference": decoder(vae), **{name: decoder(model) for name, model in forms.items()}}
    gen = torch.Generator(device="cpu").manual_seed(3)
    pixels = lambda x: ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round()  # noqa: E731
    rows = []
    for n in batches:
        z = (torch.randn(n, 4, 32, 32, generator=gen) / 0.18215).to(engine.device, engine.dtype)
        if engine.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        outputs, row = {}, {"batch": n}
        for name, fn in variants.items():
            with torch.inference_mode():
                if compiled:
                    torch._dynamo.maybe_mark_dynamic(z, 0)
                row[f"{name}_ms"], outputs[name] = replayed_ms(lambda f=fn: f(z), engine.device)
        for name in forms:
            prefix = "" if name == "folded" else f"{name}_"
            diff = (pixels(outputs[name]) - pixels(outputs["reference"])).abs()
            row[f"{prefix}max_pixel_diff"] = float(diff.max())
            row[f"{prefix}mean_pixel_diff"] = float(diff.mean())
            row[f"{prefix}speedup"] = row["reference_ms"] / row[f"{name}_ms"]
        rows.append(row)
        log(f"upsample batch {n}: reference {row['reference_ms']:.1f} ms, folded {row['folded_ms']:.1f} ms "
            f"(x{row['speedup']:.2f}), transposed {row['transposed_ms']:.1f} ms (x{row['transposed_speedup']:.2f}); "
            f"pixels differ by {row['mean_pixel_diff']:.4f} / {row['transposed_mean_pixel_diff']:.4f} mean")
    res["upsample"] = rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(p, "/tmp/gpu-costs")
    p.add_argument("--whisper-batches", default="1,4,8,16,24")
    p.add_argument("--positions", default="1500,1250,1000,750,500,250")
    p.add_argument("--whisper-max-batch", type=int, default=8, help="the engine's whisper_batch (server default 8)")
    p.add_argument("--engine-batches", default="8,12,16,20,24")
    p.add_argument("--sections", default="whisper,sessions,engine,cudnn")
    p.add_argument("--sessions", default="14,16,18,20")
    p.add_argument("--session-batches", default="24", help="EngineWorker batch sizes (configs/gpu.yaml: 24)")
    p.add_argument("--windows", default="padded,trimmed", help="Whisper windows of the sessions section")
    p.add_argument("--contention-batches", default="8,16,24", help="engine batches the contention section runs beside the passes")
    p.add_argument("--contention-windows", type=int, default=16, help="windows per feature pass (one per talking session)")
    p.add_argument("--contention-reps", type=int, default=60)
    p.add_argument("--contention-variants", default="graphs,graphs-wait,profile", help=f"{', '.join(CONTENTION_VARIANTS)}: see section_contention")
    p.add_argument("--contention-engine", default="compose,pageable,gpu", help=f"how the engine's batches end: {', '.join(CONTENTION_ENGINE)} (section_contention)")
    p.add_argument("--budget", type=float, default=0.11, help="seconds from complete audio to picture")
    p.add_argument("--skip-warmup", action="store_true", help="capture only the batch sizes the sections use (a quick look: compiles on first use)")
    p.add_argument("--report", type=Path, nargs="+", help="write the docs/benchmarks.md section from gpu_costs.json files (sections of later files replace earlier ones)")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--command", default="python -m bench.gpu_costs --device cuda:0 --models /tmp/mt --out $OUT")
    args = p.parse_args(argv)
    if args.report:
        return report(args.report, args.doc, args.command)
    for option, given, known in (
        ("--contention-variants", args.contention_variants, CONTENTION_VARIANTS),
        ("--contention-engine", args.contention_engine, CONTENTION_ENGINE),
    ):
        unknown = [name for name in given.split(",") if name not in known]
        if unknown:  # refused before any weights or output are written
            p.error(f"{option}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    ints = lambda v: [int(x) for x in v.split(",") if x]  # noqa: E731
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_synthetic_models(Path(args.models), tiny=args.tiny)
    avatar = save_avatar(Path(args.work) / "avatars")
    res: dict[str, Any] = {
        "env": {"gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")},
        "command": "python -m bench.gpu_costs " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    sections = args.sections.split(",")
    top = max(ints(args.engine_batches) + ints(args.whisper_batches) + ints(args.session_batches))
    engine = new_engine(args, batch_size=top, whisper_batch=args.whisper_max_batch)
    engine.load_avatar(avatar)
    t = time.perf_counter()
    if not args.skip_warmup:
        engine.warmup(top)
    res["warmup_s"] = time.perf_counter() - t
    log("warm-up", round(res["warmup_s"], 1), "s")

    def save() -> None:
        (out / "gpu_costs.json").write_text(json.dumps(res, indent=1))

    if "upsample" in sections:
        section_upsample(engine, res, ints(args.engine_batches), compiled=engine.compile_mode != "none")
        save()
    if "whisper" in sections:
        section_whisper(engine, res, ints(args.whisper_batches), ints(args.positions))
        save()
    if "contention" in sections:
        section_contention(
            engine, avatar, res, ints(args.contention_batches), args.contention_windows, args.contention_reps,
            args.contention_variants.split(","), args.contention_engine.split(","),
        )
        save()
    if "sessions" in sections:
        section_sessions(
            engine, avatar, res, ints(args.sessions), ints(args.session_batches), args.budget, args.windows.split(",")
        )
        save()
    if "engine" in sections:
        section_engine(engine, avatar, res, ints(args.engine_batches), "heuristic")
        save()
    if "cudnn" in sections:
        torch.backends.cudnn.benchmark = True
        engine._graphs.clear()  # graphs hold the algorithms chosen at capture: capture again
        engine.warmup(top)
        section_engine(engine, avatar, res, ints(args.engine_batches), "benchmark")
        save()
    engine.close()
    return 0


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def report(paths: list[Path], doc: Path, command: str) -> int:
    from bench import _report

    runs = [json.loads(path.read_text()) for path in paths]
    r: dict[str, Any] = {}
    for number, run in enumerate(runs, 1):
        for key, value in run.items():
            if key in CONCATENATED:  # rows of every run, each marked with its run
                r.setdefault(key, []).extend({**row, "run": number} for row in value)
            else:
                r[key] = value
    env = r["env"]
    commands = "; ".join(
        f"run {number}: `{run.get('command', command)}` ({run['env']['date']}: {', '.join(k for k in SECTION_KEYS if k in run)})"
        for number, run in enumerate(runs, 1)
    )
    lines = [
        f"Device: {env['gpu']}, PyTorch {env['torch']}. Full-size MuseTalk v1.5 with random "
        f"weights (fp16, the engine's CUDA defaults: compile + CUDA graphs + channels_last). Commands: {commands}.",
        "",
    ]
    if r.get("whisper"):
        lines += [
            "Whisper encoder pass (log-mel + encoder, CUDA graph), GPU ms per window:",
            "",
        ]
        positions = sorted({x["positions"] for x in r["whisper"]}, reverse=True)
        batches = sorted({x["batch"] for x in r["whisper"]})
        lines.append("| windows per pass | " + " | ".join(f"{p} positions ({p * 0.02:.0f} s)" for p in positions) + " |")
        lines.append("|---|" + "---|" * len(positions))
        for b in batches:
            cells = {x["positions"]: x["ms_per_window"] for x in r["whisper"] if x["batch"] == b}
            lines.append(f"| {b} | " + " | ".join(f"{cells[p]:.3f}" if p in cells else "-" for p in positions) + " |")
        lines.append("")
    if r.get("contention"):
        lines += [
            "A feature pass as the server runs it (the Whisper windows of all talking sessions, one per session, "
            "holding 1-29 s of audio, on the batcher's high-priority stream, waited for) alone and while another "
            "thread runs the engine's batches back to back; wall ms. Encoder: `graphs` CUDA graphs, `eager` none, "
            "`waiting` the pass first waits for the current stream (the engine's, as WhisperBatcher.features did "
            "when these ran). Its end: how each engine batch ends on the engine thread (`compose`: the server's "
            "engine part):",
            "",
            "| run | encoder | windows | trimmed | engine batch beside | its end | pass p50 | pass p95 | its stream, first to last op, p50 | engine batch alone | engine batch beside the passes |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for x in r["contention"]:
            lines.append(
                f"| {x['run']} | {x.get('variant', 'graphs')} | {x['windows']} | {'yes' if x['trim'] else 'no'} | {x['engine_batch'] or 'none'} | {x.get('engine_mode', 'pageable')} | "
                f"{_f(x['pass_p50_ms'])} | {_f(x['pass_p95_ms'])} | {_f(x.get('stream_p50_ms'))} | {_f(x['engine_alone_ms'])} | "
                f"{_f(x['engine_beside_ms'])} |"
            )
        lines.append("")
    if r.get("sessions"):
        lines += [
            "Simulated talking sessions in one process (bench/musetalk_engine.py's session_trial: FeatureWorker + "
            "EngineWorker, each stream at a random place of its 30 s segment, 6 s each); latency from a "
            "frame's complete audio to its composed picture; late = over the 0.11 s processing budget:",
            "",
            "| Whisper windows | engine batch | sessions | p50 ms | p95 ms | late % | features p95 ms | positions per window | backlog at end | engine busy |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for x in r["sessions"]:
            lines.append(
                f"| {x['windows']} | {x.get('batch', 24)} | {x['sessions']} | {_f(x['p50_ms'])} | {_f(x['p95_ms'])} | {100 * (x['late_share'] or 0):.1f} | "
                f"{_f(x['features_p95_ms'])} | {x['encoder_positions_per_window']:.0f} | {x['backlog_at_end']} | {x['gpu_busy']:.2f} |"
            )
        lines.append("")
    if r.get("engine"):
        lines += [
            "UNet + VAE decode per batch (GPU ms). UNet and VAE decode alone are the compiled modules, launched "
            "kernel by kernel (launch-bound at small batches: the UNet column hardly grows) and replayed from a CUDA "
            "graph of their own (later runs); UNet + VAE (graph) is what the engine replays; compose = wall ms of the "
            "whole batch with blending and pasting:",
            "",
            "| run | VAE upsampling | cuDNN algorithms | batch | UNet | UNet (graph) | VAE decode | VAE (graph) | UNet + VAE (graph) | compose | frames/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for x in r["engine"]:
            lines.append(
                f"| {x['run']} | {x.get('vae_upsample', 'reference')} | {x['cudnn']} | {x['batch']} | {x['unet_ms']:.1f} | {_ms(x.get('unet_graph_ms'))} | "
                f"{x['vae_ms']:.1f} | {_ms(x.get('vae_graph_ms'))} | {x['graph_ms']:.1f} | "
                f"{x['compose_ms']:.1f} | {x['fps']:.0f} |"
            )
        lines.append("")
    if r.get("upsample"):
        lines += [
            "VAE decode with diffusers' upsampling layers (nearest 2x + 3x3 convolution) vs the engine's folded "
            "2x2 phase convolutions and stride-2 transposed convolutions (pipeline/engines/musetalk/upsample.py), "
            "each compiled and replayed from a CUDA graph, GPU ms per batch; and how far each decode's 8-bit pixels "
            "are from the reference's (random latents, fp16; transposed: runs from 2026-12-04 on):",
            "",
            "| run | batch | reference ms | folded ms | speed-up | pixel levels apart: mean / max | transposed ms | speed-up | pixel levels apart: mean / max |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for x in r["upsample"]:
            transposed = (
                f"{x['transposed_ms']:.1f} | {x['transposed_speedup']:.2f}x | "
                f"{x['transposed_mean_pixel_diff']:.4f} / {x['transposed_max_pixel_diff']:.0f}"
                if "transposed_ms" in x else "- | - | -"
            )
            lines.append(
                f"| {x['run']} | {x['batch']} | {x['reference_ms']:.1f} | {x['folded_ms']:.1f} | {x['speedup']:.2f}x | "
                f"{x['mean_pixel_diff']:.4f} / {x['max_pixel_diff']:.0f} | {transposed} |"
            )
        lines.append("")
    _report.write_section(SECTION, "\n".join(lines), doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
