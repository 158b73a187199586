"""The real EngineWorker in front of a simulated GPU: how late-frame policies fare, on any CPU.

A GPU load test costs device time, which is scarce; the batching and skipping logic does not
need a GPU to be judged. Here the server's own :class:`~pipeline.live.worker.EngineWorker`
(batching, per-session share, skipping) takes frames from N simulated sessions at 25 fps; the
"engine" takes ``batch_ms(n) = base + per_frame * n`` in its first stage (as MuseTalk's waits
for the GPU) and a few ms of pasting in the second (default: the H200 figures of docs/benchmarks.md,
"Where the GPU time goes": UNet + VAE in a graph, ~1.5 + 2.0 n ms, plus ~0.3 ms per frame for
its Whisper window). With those it reproduces the load test's all-talking edge (16 sessions:
no late frame; 18 without skipping: nearly all late) but not its conversational figure exactly
(one seed per trial; the server adds feature-time jitter and CPU contention the model lacks),
and its case for keeping one frame (``one``) did not hold on an H200 (docs/benchmarks.md, run
``071645``): a model to compare rules with, not a predictor of a GPU. A frame is handed to the worker ``feature_ms`` after its audio is complete
and is due at its release time (audio complete + jitter + processing, the gpu.yaml 0.11 s);
sessions release frames in order, so a frame sent late can hold the next one back, as in the
server. Talk patterns are bench/load.py's own plans (``make_plan``: all talking, or
conversational: 1-4 s sentences and equal silences, each session at a random point of its
cycle), plus a 0.2 s VAD hangover.

    python -m bench.worker_sim --scenarios 16:all,18:all,29:conversational --policies none,batch,one
    python -m bench.worker_sim --scenarios 14:all,26:conversational --policies batch --handovers passes,bursts

Hand-overs (``--handovers``): ``frame`` (each frame ``feature_ms`` after its audio, on its own:
the model above), ``passes`` (a feature thread runs passes as the server's does: each takes every
frame whose audio is complete, lasts ``pass_ms + pass_window_ms`` per frame, then hands its
frames over one by one, each costing ``callback_us`` of Python with the GIL held, with the device
process's 0.5 ms switch interval), ``bursts`` (the same inside ``EngineWorker.burst()``, as the
server does since 2026-12-03: an idle worker waits for the whole pass).

Engines (``--engines``): ``waited`` (stage one returns when the batch is done on the GPU, as the
server's before 2026-12-04), ``overlapped`` (stage one returns once the batch is queued; the
worker's "Overlapped batches", ``engine.overlap_batches``). ``--host-ms``: the host side of each
batch before its GPU work starts (picking, stacking inputs, launching; ~7 ms at p50 on an H200 at
29 conversational sessions), during which a waited engine's GPU idles and an overlapped one's
runs the batch before. 0 (the default) leaves it out, as the figures before it did.

Policies: ``none`` (never skip), ``batch`` (the server's default: skip doomed frames, earliest
first, while more than a batch is queued), ``one`` (down to a single queued frame:
``engine.skip_keep_frames: 1``).
Figures go to stdout and, with --doc, to docs/benchmarks.md ("Late-frame policies, simulated").
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import json
import random
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.load import make_plan, parse_scenarios  # noqa: E402
from pipeline.engines.base import Engine, FrameRequest  # noqa: E402
from pipeline.live.worker import SKIPPED, EngineWorker  # noqa: E402

FRAME = 0.04
#: espeak-ng's lengths of bench/load.py's SENTENCES (the load test's speech), seconds
SENTENCE_SECONDS = [0.79, 0.73, 1.57, 2.06, 1.62, 3.42, 3.18, 3.72, 2.54, 2.67]
POLICIES = ("none", "batch", "one")
ENGINES = ("waited", "overlapped")
HANDOVERS = ("frame", "passes", "bursts")
SECTION = "Late-frame policies, simulated (the server's EngineWorker, a modelled H200)"
OVERLAP_CAVEAT = (
    " Overlapped against waited on an H200 (runs `102927` and `103258`, docs: \"2026-12-04, late morning\"):"
    " 29 conversational 0.1 % against 0.9 % late or held, mean batch 13.2 against 16.6; the model's host"
    " side and batch times are that run's stages (7 ms at p50 before each batch's GPU work), and it"
    " overstates the degraded shares but not the direction or the smaller batches."
)


class SimulatedGPU(Engine):
    """Stage one (the engine thread) takes the batch's host side, then queues its GPU time on a
    simulated device timeline and, unless ``overlapped``, waits for it, as MuseTalk's does (the
    blended face boxes reach the CPU); stage two (the finisher thread) waits for it if it has not,
    then pastes."""

    name = "simulated"

    def __init__(
        self, base_ms: float, per_frame_ms: float, paste_ms: float, host_ms: float = 0.0, overlapped: bool = False
    ) -> None:
        self.base_ms, self.per_frame_ms, self.paste_ms, self.host_ms = base_ms, per_frame_ms, paste_ms, host_ms
        self.overlapped_staging = overlapped  # the worker's cue (pipeline/live/worker.py)
        self.busy = 0.0
        self._device_free = 0.0  # time.perf_counter() when the device is done with what is queued
        self.last_batch_gpu: float | None = None

    def new_featurizer(self):  # pragma: no cover - not used
        raise NotImplementedError

    def load_avatar(self, avatar) -> None:
        pass

    def generate(self, requests):  # pragma: no cover - compose_staged is used
        raise NotImplementedError

    def compose(self, requests):
        return self.compose_staged(requests)()

    def compose_staged(self, requests):
        _sleep(self.host_ms / 1000)  # the host side: the device runs only what was queued before
        seconds = (self.base_ms + self.per_frame_ms * len(requests)) / 1000
        end = max(time.perf_counter(), self._device_free) + seconds
        self._device_free = end
        self.busy += seconds
        queued = _QueuedBatch(self, end, seconds, len(requests))
        if not self.overlapped_staging:
            queued.wait()
        return queued


class _QueuedBatch:
    """A simulated batch on the device: ``wait()`` sleeps until its end; calling it pastes."""

    def __init__(self, gpu: SimulatedGPU, end: float, seconds: float, size: int) -> None:
        self.gpu, self.end, self.seconds, self.size = gpu, end, seconds, size

    def wait(self) -> None:
        _sleep(self.end - time.perf_counter())
        self.gpu.last_batch_gpu = self.seconds  # as MuseTalk's wait reports its GPU time

    def __call__(self, into=None):
        self.wait()
        _sleep(self.gpu.paste_ms / 1000)
        return [None] * self.size


def _sleep(seconds: float) -> None:
    """time.sleep overshoots by up to a millisecond or so: sleep most of it, spin the rest."""
    end = time.perf_counter() + seconds
    while (left := end - time.perf_counter()) > 0:
        time.sleep(left - 0.0005 if left > 0.001 else 0)


def _spin(seconds: float) -> None:
    """Busy for ``seconds`` with the GIL held, as a callback's Python is."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@dataclass
class Frame:
    session: int
    index: int
    release: float
    done: float | None = None
    skipped: bool = False


@dataclass
class Trial:
    sessions: int
    talk: str
    policy: str
    handover: str = "frame"
    engine: str = "waited"
    frames: list[Frame] = field(default_factory=list)


def talking(talk: str, seconds: float, seed: int, hangover: float = 0.2) -> np.ndarray:
    """Per 40 ms frame: does the session need a picture? The load test's own talk plan
    (bench/load.py ``make_plan``) with its sentences' lengths, plus the VAD hangover."""
    active = np.zeros(int(seconds / FRAME), bool)
    for u in make_plan(talk, SENTENCE_SECONDS, seconds, seed):
        active[int(u.start / FRAME) : int((u.start + u.length + hangover) / FRAME)] = True
    return active


def run_trial(
    args: argparse.Namespace, sessions: int, talk: str, seconds: float, policy: str, seed: int, handover: str = "frame",
    engine: str = "waited",
) -> dict[str, Any]:
    rng = random.Random(seed)
    gpu = SimulatedGPU(
        args.base_ms, args.per_frame_ms + args.whisper_ms, args.paste_ms, args.host_ms, overlapped=engine == "overlapped"
    )
    worker = EngineWorker(
        gpu, batch_size=args.batch, name="sim", skip_late=policy != "none", skip_keep=1 if policy == "one" else 0,
        gather_seconds=args.gather_ms / 1000,
    )
    start = time.monotonic() + 0.2
    events: list[tuple[float, int, Frame]] = []
    for s in range(sessions):
        offset = rng.uniform(0, FRAME)  # sessions' clocks are not aligned
        for k, active in enumerate(talking(talk, seconds, seed * 1000 + s)):
            if active:
                complete = start + offset + k * FRAME
                frame = Frame(s, k, complete + args.budget)
                ready = complete + (args.feature_ms / 1000 if handover == "frame" else 0.0)
                events.append((ready, len(events), frame))
    heapq.heapify(events)
    trial = Trial(sessions, talk, policy, handover, engine)
    lock = threading.Lock()

    def finished(frame: Frame, future) -> None:
        with lock:
            frame.done = time.monotonic()
            frame.skipped = future.result() is SKIPPED

    def submit(frame: Frame) -> None:
        trial.frames.append(frame)
        worker.submit(FrameRequest(None, frame.index, None), frame.release, frame.session).add_done_callback(  # type: ignore[arg-type]
            lambda fut, f=frame: finished(f, fut)
        )

    while events:
        at = events[0][0]
        if (wait := at - time.monotonic()) > 0:
            time.sleep(wait)
        if handover == "frame":
            submit(heapq.heappop(events)[2])
            continue
        # a feature pass: every frame whose audio is complete now, handed over when it ends
        now = time.monotonic()
        taken = []
        while events and events[0][0] <= now:
            taken.append(heapq.heappop(events)[2])
        _sleep((args.pass_ms + args.pass_window_ms * len(taken)) / 1000)
        with worker.burst() if handover == "bursts" else contextlib.nullcontext():
            for frame in taken:
                _spin(args.callback_us / 1e6)
                submit(frame)
    deadline = time.monotonic() + 10
    while any(f.done is None for f in trial.frames) and time.monotonic() < deadline:
        time.sleep(0.05)
    busy = gpu.busy / seconds
    worker.close()
    summary = summarise(trial, busy, args.warmup)
    summary["mean_batch"] = worker.stats.frames / max(worker.stats.batches, 1)
    return summary


def summarise(trial: Trial, busy: float, warmup: float) -> dict[str, Any]:
    """Late = sent after its release time: in each session frames go out in order, so a frame
    is sent at max(its release, its picture, the previous frame sent); skipped frames are sent
    on time with the last picture but count as degraded (as bench/load.py counts them)."""
    by_session: dict[int, list[Frame]] = {}
    for f in sorted(trial.frames, key=lambda f: (f.session, f.index)):
        by_session.setdefault(f.session, []).append(f)
    shares, late_total, skipped_total, counted = [], 0, 0, 0
    t0 = min(f.release for f in trial.frames) + warmup
    for frames in by_session.values():
        sent_prev, late, skipped, n = 0.0, 0, 0, 0
        for f in frames:
            done = f.done if f.done is not None else float("inf")
            sent = f.release if f.skipped else max(f.release, done, sent_prev)
            sent_prev = sent
            if f.release < t0:
                continue
            n += 1
            skipped += f.skipped
            late += (not f.skipped) and sent > f.release + 0.001
        counted += n
        late_total += late
        skipped_total += skipped
        shares.append(100 * (late + skipped) / max(n, 1))
    return {
        "sessions": trial.sessions, "talk": trial.talk, "policy": trial.policy, "handover": trial.handover,
        "engine": trial.engine,
        "late_pct": 100 * late_total / max(counted, 1), "skipped_pct": 100 * skipped_total / max(counted, 1),
        "degraded_pct": 100 * (late_total + skipped_total) / max(counted, 1),
        "worst_session_pct": max(shares) if shares else 0.0, "gpu_busy": busy,
    }


def report(rows: list[dict[str, Any]], args: argparse.Namespace, argv: list[str]) -> str:
    lines = [
        f"Command: `python -m bench.worker_sim {shlex.join(argv)}` ({time.strftime('%Y-%m-%d')}, on this "
        f"machine's CPU: the GPU is a model). Batches take {args.base_ms} + {args.per_frame_ms + args.whisper_ms:.2f} n ms "
        f"(UNet + VAE + Whisper per frame, H200) after {args.host_ms} ms of host side; frames reach the worker {args.feature_ms} ms after their audio "
        f"and are due {args.budget * 1000:.0f} ms after it; batch {args.batch}; {args.seconds:.0f} s per trial (unless a scenario says), the first "
        f"{args.warmup:.0f} s not counted; degraded = late + skipped frames, mean of {args.repeats} trials.",
        "",
        "| sessions | talk | policy | hand-over | engine | late % | skipped % | degraded % | worst session % | GPU busy | mean batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    caveat = (
        "Checked on an H200 (docs: \"16 all-talking did not repeat; keeping one frame is worse on the GPU\", run `071645`): `one` was worse there, not better (16 all-talking 13.3 % degraded, 29 conversational 78 %): its small batches cost more GPU time per frame and the model lacks how frames bunch (sessions' clocks, batched Whisper passes) and the server's CPU contention. Use it to compare rules, not to predict a GPU."
    )
    if any(r.get("engine") == "overlapped" for r in rows):
        caveat += OVERLAP_CAVEAT
    for r in rows:
        lines.append(
            f"| {r['sessions']} | {r['talk']} | {r['policy']} | {r.get('handover', 'frame')} | {r.get('engine', 'waited')} | "
            f"{r['late_pct']:.1f} | "
            f"{r['skipped_pct']:.1f} | {r['degraded_pct']:.1f} | {r['worst_session_pct']:.1f} | {r['gpu_busy']:.2f} | "
            f"{r.get('mean_batch', float('nan')):.1f} |"
        )
    return "\n".join([*lines, "", caveat])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="16:all,18:all,29:conversational", help="N:talk,... as bench/load.py's (talk: all | conversational)")
    p.add_argument("--policies", default="none,batch,one")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--base-ms", type=float, default=1.5)
    p.add_argument("--per-frame-ms", type=float, default=2.0)
    p.add_argument("--whisper-ms", type=float, default=0.3, help="GPU time per frame the Whisper window takes from the batches")
    p.add_argument("--paste-ms", type=float, default=4.0, help="the CPU end of a batch (finisher thread)")
    p.add_argument("--feature-ms", type=float, default=20.0)
    p.add_argument("--budget", type=float, default=0.11, help="seconds from complete audio to release")
    p.add_argument("--gather-ms", type=float, default=0.0, help="EngineWorker(gather_seconds): most an idle worker waits for a fuller batch")
    p.add_argument("--handovers", default="frame", help=f"comma-separated: {', '.join(HANDOVERS)} (module docstring)")
    p.add_argument("--pass-ms", type=float, default=3.0, help="a feature pass's fixed time (passes, bursts)")
    p.add_argument("--pass-window-ms", type=float, default=0.4, help="a feature pass's time per frame (passes, bursts)")
    p.add_argument("--callback-us", type=float, default=60.0, help="Python per handed-over frame, GIL held (passes, bursts)")
    p.add_argument("--switch-interval-ms", type=float, default=0.5, help="this process's GIL switch interval (a device process's)")
    p.add_argument("--engines", default="waited", help=f"comma-separated: {', '.join(ENGINES)} (module docstring)")
    p.add_argument("--host-ms", type=float, default=0.0, help="each batch's host side before its GPU work (module docstring)")
    p.add_argument("--json", type=Path)
    p.add_argument("--doc", action="store_true", help="write the docs/benchmarks.md section")
    p.add_argument("--section", default=SECTION, help="the docs section --doc writes")
    args = p.parse_args(argv)
    if args.gather_ms < 0 or args.switch_interval_ms <= 0:
        p.error("--gather-ms must be >= 0 and --switch-interval-ms > 0")
    try:
        scenarios = parse_scenarios(args.scenarios, "ws", args.seconds)  # the load test's own syntax
    except ValueError as exc:
        p.error(str(exc))
    policies = args.policies.split(",")
    if unknown := [x for x in policies if x not in POLICIES]:
        p.error(f"unknown policies {unknown}: choose from {', '.join(POLICIES)}")
    handovers = args.handovers.split(",")
    if unknown := [x for x in handovers if x not in HANDOVERS]:
        p.error(f"unknown hand-overs {unknown}: choose from {', '.join(HANDOVERS)}")
    engines = args.engines.split(",")
    if unknown := [x for x in engines if x not in ENGINES]:
        p.error(f"unknown engines {unknown}: choose from {', '.join(ENGINES)}")
    if args.host_ms < 0:
        p.error("--host-ms must be >= 0")
    previous = sys.getswitchinterval()
    sys.setswitchinterval(args.switch_interval_ms / 1000)
    try:
        rows = simulate(args, scenarios, policies, handovers, engines)
    finally:
        sys.setswitchinterval(previous)  # (main() also runs inside the test process)
    text = report(rows, args, argv if argv is not None else sys.argv[1:])
    print(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.doc:
        from bench import _report

        _report.write_section(args.section, text)
    return 0


def simulate(
    args: argparse.Namespace, scenarios: list[dict[str, Any]], policies: list[str], handovers: list[str],
    engines: list[str] = ["waited"],  # noqa: B006 - read only
) -> list[dict[str, Any]]:
    rows = []
    for scenario in scenarios:
        n, talk, seconds = scenario["sessions"], scenario["talk"], scenario["duration"]
        for policy, handover, engine in itertools.product(policies, handovers, engines):
            trials = [run_trial(args, n, talk, seconds, policy, seed, handover, engine) for seed in range(args.repeats)]
            row = {k: (float(np.mean([t[k] for t in trials])) if isinstance(v, float) else v) for k, v in trials[0].items()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
