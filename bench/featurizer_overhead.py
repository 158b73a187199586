"""Python/CPU cost of one WhisperBatcher.features() call: the live feature thread's path, encoder excluded.

A live server's feature thread calls ``WhisperBatcher.features(jobs)`` every 40 ms with one job of
one frame per session. Profiled on a GPU at 16 sessions, the CPU side of that call (planning,
reading windows, building the batch, picking tokens) was ~24 % of a GIL-bound process; the encoder
itself is small GPU work. This measures that CPU side, before and after the batched rewrite:

- "before": pipeline/engines/musetalk/features.py as of ``--before`` (a git revision, read with
  ``git show`` into a temporary module: no checkout of the working tree);
- "after": the working tree's module.

Both run the same sessions on the same tiny random Whisper encoder (tests' micro layout: 384 wide,
4 layers, 64-wide feed-forward), with ``log_mel`` and ``encode`` replaced by stubs
(``--encoder stub``, the default): log_mel only moves the audio batch to the device (the copy it
starts with), encode returns preallocated hidden states of the right shape (the batched path's
``out=``, unwritten). What is timed is thus everything but the encoder's own work. ``--encoder real``
runs the real encoder too (on a GPU: wall time per call with the device work in it; the CPU time
then equals it, as the final stream synchronize spins).

Sessions are spread over the 30 s Whisper segment (session k has talked k/n of it, silently fast-
forwarded untimed), so their windows hold 0-30 s of audio as on a server that has run a while; each
timed call gives every session its next frame, speech. Reported: mean and median wall ms per call,
the thread's CPU ms per call, and us per session (median wall / sessions); each the median of
``--repeat`` interleaved runs.

    .venv/bin/python bench/featurizer_overhead.py                       # 16 and 32 sessions, CPU
    .venv/bin/python bench/featurizer_overhead.py --device cuda --encoder real

The lent GPU machine gets no .git: there, pass the old module as a file, made here with
``git show b21da3d:pipeline/engines/musetalk/features.py > bench-results/featurizer_overhead/features_before.py``
(an ignored folder: carry it) and ``--before bench-results/featurizer_overhead/features_before.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.audio.windows import AudioFrame
from pipeline.engines.musetalk import features as after

MODULE = "pipeline/engines/musetalk/features.py"
# the last commit with the per-stream CPU path (the module's last change before the rewrite)
DEFAULT_BEFORE = "b21da3d"


def load_before(rev: str) -> ModuleType:
    """The module as of git revision ``rev`` (or from the file ``rev``, where git is not at hand)."""
    if Path(rev).is_file():
        path = Path(rev)
    else:
        source = subprocess.run(
            ["git", "show", f"{rev}:{MODULE}"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
        path = Path(tempfile.mkdtemp(prefix="features-before-")) / "features_before.py"
        path.write_text(source)
    spec = importlib.util.spec_from_file_location("features_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["features_before"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def tiny_encoder(device: str, dtype: torch.dtype):
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    cfg = WhisperConfig(
        d_model=384,
        encoder_layers=4,
        encoder_attention_heads=6,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=6,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        max_source_positions=1500,
    )
    return WhisperEncoder(cfg).eval().to(device, dtype), WhisperFeatureExtractor()


def stub_encoder(batcher, max_windows: int) -> None:  # max_windows: one pass (before) at most
    """log_mel: only the audio's copy to the device; encode: preallocated hidden states."""
    hidden = torch.randn(
        (max_windows, 1500, batcher.n_layers + 1, int(batcher.encoder.config.d_model)), device=batcher.device
    ).to(batcher.dtype)

    def log_mel(audio, positions=None):  # (positions: trimmed windows' encoder length, since 2026-12-03)
        return audio.to(device=batcher.device, dtype=torch.float32)

    def encode(mel, *, out=None):
        batcher.encoder_windows += mel.shape[0]
        return out if out is not None else hidden[: mel.shape[0]]

    batcher.log_mel = log_mel
    batcher.encode = encode


def run(module: ModuleType, args, sessions: int) -> dict[str, float]:
    encoder, extractor = tiny_encoder(args.device, torch.float16 if args.device != "cpu" else torch.float32)
    batcher = module.WhisperBatcher(encoder, extractor, max_batch=args.max_batch)
    if args.encoder == "stub":
        stub_encoder(batcher, args.max_batch)
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(16000 * 70)).astype(np.float32)
    padded = np.concatenate([np.zeros(1280, np.float32), audio])

    def frame(local: int, speech: bool) -> AudioFrame:
        at = local * 640 % (len(audio) - 64000)
        return AudioFrame(local, padded[at : at + 3200], speech)

    feats = [module.MuseTalkFeaturizer(batcher) for _ in range(sessions)]
    nxt = [0] * sessions
    for k, f in enumerate(feats):  # fast-forward, untimed: session k has talked k/n of a segment
        n = k * 750 // sessions
        if n:
            f.features([frame(i, False) for i in range(n)])
        nxt[k] = n
    times, cpu = [], []
    for call in range(args.warmup + args.calls):
        jobs = [(f, [frame(nxt[k], True)]) for k, f in enumerate(feats)]
        t0, c0 = time.perf_counter(), time.thread_time()
        out = batcher.features(jobs)
        t1, c1 = time.perf_counter(), time.thread_time()
        assert all(r[0].active for r in out)
        for k in range(sessions):
            nxt[k] += 1
        if call >= args.warmup:
            times.append(t1 - t0)
            cpu.append(c1 - c0)
    return {
        "mean_ms": 1e3 * statistics.fmean(times),
        "median_ms": 1e3 * statistics.median(times),
        "cpu_ms": 1e3 * statistics.fmean(cpu),
        "us_per_session": 1e6 * statistics.median(times) / sessions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--calls", type=int, default=200, help="timed calls per variant")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--max-batch", type=int, default=8, help="WhisperBatcher max_batch (the engine's default)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--encoder", choices=["stub", "real"], default="stub")
    parser.add_argument(
        "--before", default=DEFAULT_BEFORE, help="git revision (or file) of the 'before' module"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each variant, interleaved; the median is shown"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    before = load_before(args.before)
    print(
        f"device {args.device}, encoder {args.encoder}, max_batch {args.max_batch}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.calls} calls after {args.warmup}; one frame per session per call"
    )
    print(
        f"{'sessions':>8} {'variant':>8} {'mean ms':>8} {'median ms':>9} {'cpu ms':>7} {'us/session':>10}  medians of the runs"
    )
    for sessions in args.sessions:
        runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
        for _ in range(args.repeat):  # interleaved: both variants see the same machine state
            for name, module in (("before", before), ("after", after)):
                runs[name].append(run(module, args, sessions))
        for name, results in runs.items():
            r = {key: statistics.median(x[key] for x in results) for key in results[0]}
            print(
                f"{sessions:>8} {name:>8} {r['mean_ms']:>8.2f} {r['median_ms']:>9.2f} {r['cpu_ms']:>7.2f} "
                f"{r['us_per_session']:>10.1f}  " + " ".join(f"{x['median_ms']:.2f}" for x in results)
            )


if __name__ == "__main__":
    main()
