"""Is the compiled VAE decode's speed a property of each compile? Fresh compiles, side by side.

Two H200 runs of bench/gpu_costs.py timed the same compiled VAE decode (diffusers' layers,
batch 24, replayed from a CUDA graph) at 44.3 and 34.9 ms, and two load tests of one build held
16 all-talking sessions in one and missed them in the other (docs/benchmarks.md, "Load test on
the H200: findings"). The decode is ~85 % of a frame's GPU time, so a 20 % spread between
compiles decides whether 16 sessions fit. This compiles the decode in fresh processes, each with
an empty inductor cache (no kernel or autotuning choice carried over), and times each the way
the engine runs it:

  default     the engine's compile: torch.compile(decode), dynamic batch, channels-last, fp16
  eager       no compile, the same CUDA graph replay: the control (does the process or the GPU
              vary, not the compile?)
  pointwise   default + ``max_autotune_pointwise``: every pointwise/reduction kernel benchmarks
              all its launch configurations (more autotuning, longer compile)
  coordinate  default + ``coordinate_descent_tuning``: each kernel's configuration refined by
              coordinate descent after the first choice
  autotune    default + ``max_autotune``: convolutions benchmarked against inductor's Triton
              templates too (much longer compile)
  folded      default with the upsamplers as 2x2 phase convolutions (engine.vae_upsample: folded)
  transposed  default with the upsamplers as stride-2 transposed convolutions (engine.vae_upsample:
              transposed); transposed-coordinate: and coordinate descent

Each run reports GPU ms per batch (median of 30 graph replays) at the batches asked and the
kernels that took the most GPU time in three un-graphed calls (torch.profiler), so a fast and a
slow compile can be compared kernel by kernel.

    python -m bench.vae_compile --device cuda:0 --models /tmp/mt --out $OUT --runs 4
    python -m bench.vae_compile --report $OUT/vae_compile.json   # here: docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = ("default", "eager", "pointwise", "coordinate", "autotune", "folded", "transposed", "transposed-coordinate")
SECTION = "VAE decode: compile to compile (H200)"
INDUCTOR_OPTIONS = {
    "pointwise": {"max_autotune_pointwise": True},
    "coordinate": {"coordinate_descent_tuning": True},
    "autotune": {"max_autotune": True},
    "transposed-coordinate": {"coordinate_descent_tuning": True},
}
UPSAMPLE_FORM = {"folded": "phases", "transposed": "transposed", "transposed-coordinate": "transposed"}  # else as loaded


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One fresh process: load the VAE as the engine does, compile (or not), time, profile."""
    import torch

    from bench.gpu_costs import replayed_ms
    from pipeline.engines.musetalk.loader import load_vae, resolve_device, resolve_dtype

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    variant = args.child
    for key, value in INDUCTOR_OPTIONS.get(variant, {}).items():
        setattr(torch._inductor.config, key, value)
    vae = load_vae(Path(args.models), device, dtype)[0]
    if variant in UPSAMPLE_FORM:
        from pipeline.engines.musetalk.upsample import fold_upsamplers

        vae = fold_upsamplers(vae, UPSAMPLE_FORM[variant])[0]
    channels_last = device.type == "cuda"
    if channels_last:
        vae.to(memory_format=torch.channels_last)
    decode = lambda z: vae.decode(z).sample  # noqa: E731 - the engine's own decode call
    compiled = variant != "eager"
    if compiled:
        decode = torch.compile(decode, dynamic=None)
    batches = [int(b) for b in args.batches.split(",")]
    gen = torch.Generator(device="cpu").manual_seed(3)

    def latents(n: int) -> torch.Tensor:
        z = (torch.randn(n, 4, 32, 32, generator=gen) / 0.18215).to(device, dtype)
        z = z.contiguous(memory_format=torch.channels_last) if channels_last else z
        if compiled:
            torch._dynamo.maybe_mark_dynamic(z, 0)
        return z

    result: dict[str, Any] = {"variant": variant, "index": args.index, "ms": {}}
    t = time.perf_counter()
    with torch.inference_mode():
        decode(latents(batches[0]))  # the compile (and its autotuning) happens at the largest batch, as in the engine
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result["compile_s"] = round(time.perf_counter() - t, 1)
        for n in batches:
            z = latents(n)
            result["ms"][str(n)] = round(replayed_ms(lambda z=z: decode(z), device)[0], 2)
        if device.type == "cuda":
            result["kernels"], result["kernel_kinds"] = top_kernels(decode, latents(batches[0]), device)
    return result


def kernel_kind(name: str) -> str:
    """cuDNN's convolutions (implicit GEMMs, forward and the transposed ones' dgrad) vs the rest."""
    lowered = name.lower()
    if any(mark in lowered for mark in ("xmma", "implicit_gemm", "fprop", "dgrad", "cudnn", "conv2d_", "triton_tem")):
        return "convolution"
    return "triton" if lowered.startswith("triton") else "other"


def top_kernels(decode, z, device, count: int = 14) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The kernels with the most GPU time over three un-graphed calls, ms per call; and all
    kernels' ms per call by :func:`kernel_kind`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    decode(z)
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            decode(z)
        torch.cuda.synchronize(device)
    rows = []
    kinds: dict[str, float] = {}
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None)
        if total is None:
            total = getattr(event, "cuda_time_total", 0)
        if total > 0:
            rows.append({"name": event.key[:120], "ms_per_call": round(total / 3 / 1000, 3), "calls": event.count // 3})
            kind = kernel_kind(event.key)
            kinds[kind] = round(kinds.get(kind, 0.0) + total / 3 / 1000, 3)
    rows.sort(key=lambda r: -r["ms_per_call"])
    return rows[:count], kinds


def parent(args: argparse.Namespace) -> int:
    from bench.musetalk_engine import ensure_synthetic_models, log

    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:  # before anything is written
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_synthetic_models(Path(args.models), tiny=args.tiny)
    import torch

    res: dict[str, Any] = {
        "env": {"gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")},
        "command": "python -m bench.vae_compile " + " ".join(sys.argv[1:]),
        "runs": [],
    }
    start = time.monotonic()
    # interleaved (run 0 of every variant, then run 1, ...): a run cut short by the budget still compares variants
    for index, variant in ((i, v) for i in range(args.runs) for v in variants):
        left = args.budget - (time.monotonic() - start)
        if left < 30:
            log(f"budget spent: stopping before {variant} #{index}")
            break
        with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
            cmd = [sys.executable, "-m", "bench.vae_compile", "--child", variant, "--index", str(index),
                   "--device", args.device, "--dtype", args.dtype, "--models", args.models, "--batches", args.batches]
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=left)
            except subprocess.TimeoutExpired:
                log(f"{variant} #{index}: out of time")
                break
        if proc.returncode != 0:
            log(f"{variant} #{index} failed (rc {proc.returncode}): {proc.stderr.strip()[-2000:]}")
            res["runs"].append({"variant": variant, "index": index, "error": proc.stderr.strip()[-500:]})
            continue
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        res["runs"].append(run)
        log(f"{variant} #{index}: compile {run['compile_s']} s; ms per batch {run['ms']}")
        (out / "vae_compile.json").write_text(json.dumps(res, indent=1))
    (out / "vae_compile.json").write_text(json.dumps(res, indent=1))
    for line in summary_lines(res):
        print(line)
    return 0


def summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Per variant and batch: every run's ms, their median and spread (max / min)."""
    rows = []
    ok = [r for r in res["runs"] if "ms" in r]
    for variant in dict.fromkeys(r["variant"] for r in ok):
        runs = [r for r in ok if r["variant"] == variant]
        for batch in runs[0]["ms"]:
            values = [r["ms"][batch] for r in runs if batch in r["ms"]]
            rows.append({
                "variant": variant, "batch": int(batch), "runs": values, "median": statistics.median(values),
                "spread": max(values) / min(values), "compile_s": statistics.median(r["compile_s"] for r in runs),
                "kinds": runs[0].get("kernel_kinds") if batch == next(iter(runs[0]["ms"])) else None,
            })
    return rows


def summary_lines(res: dict[str, Any]) -> list[str]:
    lines = [
        "| variant | batch | runs (GPU ms per batch, each a fresh compile) | median | max / min | compile s (median) | un-graphed ms: convolutions / Triton / other (first run) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary(res):
        runs = ", ".join(f"{v:.1f}" for v in row["runs"])
        kinds = row.get("kinds")
        split = " / ".join(f"{kinds.get(k, 0.0):.1f}" for k in ("convolution", "triton", "other")) if kinds else "-"
        lines.append(f"| {row['variant']} | {row['batch']} | {runs} | {row['median']:.1f} | {row['spread']:.2f}x | {row['compile_s']:.0f} | {split} |")
    return lines


def kernel_lines(res: dict[str, Any]) -> list[str]:
    """The fastest and the slowest default compile's top kernels side by side."""
    runs = [r for r in res["runs"] if r.get("variant") == "default" and r.get("kernels")]
    if len(runs) < 2:
        return []
    first = next(iter(runs[0]["ms"]))
    fast, slow = min(runs, key=lambda r: r["ms"][first]), max(runs, key=lambda r: r["ms"][first])
    lines = [
        f"Kernels of the fastest ({fast['ms'][first]:.1f} ms) and slowest ({slow['ms'][first]:.1f} ms) default compile, batch {first}, GPU ms per call (un-graphed):",
        "",
        "| kernel | calls | fastest compile | slowest compile |",
        "|---|---|---|---|",
    ]
    slow_by_name = {k["name"]: k for k in slow["kernels"]}
    names = list(dict.fromkeys([k["name"] for k in fast["kernels"]] + [k["name"] for k in slow["kernels"]]))
    fast_by_name = {k["name"]: k for k in fast["kernels"]}
    for name in names:
        f, s = fast_by_name.get(name), slow_by_name.get(name)
        calls = (f or s)["calls"]
        lines.append(f"| `{name[:80]}` | {calls} | {f['ms_per_call'] if f else '-'} | {s['ms_per_call'] if s else '-'} |")
    return lines


def report(path: Path, doc: Path, section: str = SECTION) -> int:
    from bench import _report

    res = json.loads(path.read_text())
    env = res["env"]
    body = [
        f"Device: {env['gpu']}, PyTorch {env['torch']}; {env['date']}. Full-size sd-vae-ft-mse decoder with random weights, fp16, channels-last, a 32x32 latent to a 256x256 face. Command: `{res['command']}` (bench/device/vae_compile.sh on the lent machine). Every run is its own process with an empty inductor cache.",
        "",
        *summary_lines(res),
        "",
        *kernel_lines(res),
    ]
    _report.write_section(section, "\n".join(body).rstrip(), doc)
    print(f"wrote section {section!r} of {doc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--tiny", action="store_true", help="tiny weights (a CPU check of the program)")
    p.add_argument("--models", default="/tmp/mt")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/vae-compile"))
    p.add_argument("--runs", type=int, default=4, help="fresh compiles of each variant")
    p.add_argument("--variants", default="default,eager,pointwise,coordinate")
    p.add_argument("--batches", default="24,16", help="batch sizes timed; the first is the one compiled at")
    p.add_argument("--budget", type=float, default=420, help="seconds for all the runs")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--report", type=Path, help="write the docs/benchmarks.md section from a vae_compile.json")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--section", default=SECTION, help="the docs/benchmarks.md section --report writes (a new one keeps earlier runs' tables)")
    args = p.parse_args(argv)
    if args.report:
        return report(args.report, args.doc, args.section)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    return parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
