"""bench/gpu_costs.py's contention section, on tiny weights on the CPU: a check of the program.

Why: it runs on the lent GPU machine, whose minutes are few; a crash there (one capture of the
encoder's graphs beside the engine's launches did, in its profile step) costs a whole call. The
figures of a CPU run mean nothing and are not checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_contention_section_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run(
        [
            sys.executable, "-m", "bench.gpu_costs", "--device", "cpu", "--tiny", "--skip-warmup",
            "--models", str(tmp_path / "models"), "--work", str(tmp_path / "work"), "--out", str(out),
            "--sections", "contention", "--contention-batches", "2", "--contention-windows", "2",
            "--contention-reps", "1", "--contention-variants", "graphs,graphs-wait,profile",
            "--contention-engine", "compose,gpu",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads((out / "gpu_costs.json").read_text())
    cells = {(r["variant"], r["engine_batch"], r["engine_mode"]) for r in res["contention"]}
    assert cells == {(v, b, m) for v in ("graphs", "graphs-wait") for b, m in ((0, "-"), (2, "compose"), (2, "gpu"))}
    for row in res["contention"]:
        assert row["pass_p50_ms"] > 0 and row["windows"] == 2
        assert (row["engine_alone_ms"] is None) == (row["engine_batch"] == 0)
    assert "Self CPU" in res["contention_profile"]  # torch.profiler's table

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n")
    report = subprocess.run(
        [sys.executable, "-m", "bench.gpu_costs", "--report", str(out / "gpu_costs.json"), "--doc", str(doc)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    text = doc.read_text()
    assert "| run | encoder | windows |" in text and "| 1 | graphs-wait | 2 | yes | 2 | gpu |" in text


def test_upsample_section_times_every_form_and_reports_old_rows_too(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run(
        [
            sys.executable, "-m", "bench.gpu_costs", "--device", "cpu", "--tiny", "--skip-warmup",
            "--models", str(tmp_path / "models"), "--work", str(tmp_path / "work"), "--out", str(out),
            "--sections", "upsample", "--engine-batches", "2",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads((out / "gpu_costs.json").read_text())
    (row,) = res["upsample"]
    for form in ("reference", "folded", "transposed"):
        assert row[f"{form}_ms"] > 0
    # fp32 on a CPU: the forms equal the reference up to rounding, a pixel level at most
    assert row["max_pixel_diff"] <= 1 and row["transposed_max_pixel_diff"] <= 1
    # a report written before the transposed form keeps its rows, with dashes in the new columns
    old = {**res, "upsample": [{k: v for k, v in row.items() if not k.startswith("transposed")}]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n")
    for path in (out / "gpu_costs.json", tmp_path / "old.json"):
        report = subprocess.run(
            [sys.executable, "-m", "bench.gpu_costs", "--report", str(path), "--doc", str(doc)],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
        assert report.returncode == 0, report.stderr[-3000:]
        assert "| transposed ms |" in doc.read_text()
    assert "| - | - | - |" in doc.read_text()


def test_unknown_contention_names_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    for option, value in (("--contention-variants", "graphs,fast"), ("--contention-engine", "compose,turbo")):
        run = subprocess.run(
            [sys.executable, "-m", "bench.gpu_costs", "--device", "cpu", "--tiny", "--models", str(tmp_path / "m"),
             "--out", str(tmp_path / "out"), "--sections", "contention", option, value],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
        assert run.returncode == 2, run.stderr[-2000:]
        assert f"{option}: unknown {value.split(',')[1]}" in run.stderr
        assert not (tmp_path / "m").exists() and not (tmp_path / "out").exists()
