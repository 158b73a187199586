"""GPU memory of the engine's CUDA graphs when every batch size is captured, by capture order.

The load test of 2026-12-03 showed the server's GPU memory at 45 GB once every batch size up to
24 had its own graph (17 GB with 8 padded sizes). Graphs share one memory pool; this captures
sizes 1..N smallest first and largest first, each in a fresh process, and prints the memory the
pool holds (full-size random weights, no compile: the pool's behaviour does not depend on it).

    python -m bench.graph_memory --models /tmp/mt --top 24
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(models: str, top: int, order: str) -> dict[str, float]:
    import torch

    sys.path.insert(0, str(ROOT))
    from pipeline.engines.musetalk.engine import MuseTalkEngine
    from pipeline.engines.musetalk.features import D_MODEL, N_TOKENS

    engine = MuseTalkEngine(models_dir=models, device="cuda:0", dtype="fp16", batch_size=top, compile="none", warmup=False)
    base = torch.cuda.memory_reserved(0)
    latent = torch.zeros((1, 8, 32, 32), device="cuda:0", dtype=torch.float16)
    token = torch.zeros((1, N_TOKENS, D_MODEL), device="cuda:0", dtype=torch.float16)
    sizes = range(1, top + 1) if order == "ascending" else range(top, 0, -1)
    with torch.inference_mode():
        for size in sizes:
            engine._graph_forward(latent.expand(size, -1, -1, -1), token.expand(size, -1, -1))
    torch.cuda.synchronize()
    return {"order": order, "graphs": len(engine._graphs), "pool_gb": (torch.cuda.memory_reserved(0) - base) / 1e9}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default="/tmp/mt")
    p.add_argument("--top", type=int, default=24)
    p.add_argument("--order", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.order:
        print(json.dumps(measure(args.models, args.top, args.order)), flush=True)
        return 0
    sys.path.insert(0, str(ROOT))
    from bench.musetalk_engine import ensure_synthetic_models

    ensure_synthetic_models(Path(args.models))
    for order in ("ascending", "descending"):
        cmd = [sys.executable, "-m", "bench.graph_memory", "--models", args.models, "--top", str(args.top), "--order", order]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ)
        print(out.stdout.strip().splitlines()[-1] if out.returncode == 0 else out.stderr[-2000:], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
