"""bench/pyspy_summary.py: py-spy's collapsed stacks per thread, as the device kits bring them back."""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import pyspy_summary  # noqa: E402

RAW = """\
thread (0x7f01): engine-cuda:0;Thread.run (threading.py:982);EngineWorker._run (pipeline/live/worker.py:360);wait_asleep (pipeline/engines/musetalk/transfer.py:50) 30
thread (0x7f01): engine-cuda:0;Thread.run (threading.py:982);EngineWorker._run (pipeline/live/worker.py:361);EngineWorker._run (pipeline/live/worker.py:362);stack (torch/functional.py:10) 10
thread (0x7f02): features-cuda:0;Thread.run (threading.py:982);FeatureWorker._compute (pipeline/live/feature_worker.py:182) 60
"""


def test_samples_per_thread_self_and_our_functions_inclusive(tmp_path: Path, capsys) -> None:
    threads = pyspy_summary.parse(RAW.splitlines())
    assert set(threads) == {"engine-cuda:0", "features-cuda:0"}
    engine = threads["engine-cuda:0"]
    assert engine.samples == 40
    assert engine.leaf == {"wait_asleep (pipeline/engines/musetalk/transfer.py)": 30, "stack (torch/functional.py)": 10}
    # a function of ours on the stack twice in one sample (recursion, two lines) counts once
    assert engine.ours["EngineWorker._run (pipeline/live/worker.py)"] == 40
    assert "stack (torch/functional.py)" not in engine.ours and "Thread.run (threading.py)" not in engine.ours

    raw = tmp_path / "device-gil.raw"
    raw.write_text(RAW)
    archive = tmp_path / "profile.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(raw, arcname="./device-gil.raw")
    assert pyspy_summary.main([str(archive), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "== profile.tgz:device-gil.raw: 100 samples, 2 threads" in out
    assert out.index("-- features-cuda:0: 60 samples (60.0 %)") < out.index("-- engine-cuda:0: 40 samples (40.0 %)")
    assert " 75.0 %  wait_asleep (pipeline/engines/musetalk/transfer.py)" in out


def test_stacks_without_thread_names_go_to_all_threads() -> None:
    """``py-spy record --gil`` without --threads: the stacks start at a function, not a thread."""
    gil = "Thread.run (threading.py:982);EngineWorker._run (pipeline/live/worker.py:360) 7\nmain (server/cli.py:12) 3\n"
    threads = pyspy_summary.parse(gil.splitlines())
    assert set(threads) == {pyspy_summary.ALL_THREADS} and threads[pyspy_summary.ALL_THREADS].samples == 10
    assert threads[pyspy_summary.ALL_THREADS].leaf["EngineWorker._run (pipeline/live/worker.py)"] == 7
    # a thread sampled in native code only: its samples are shown as such, not lost
    native = pyspy_summary.parse(["thread (0x1): MainThread 5"])
    assert native["MainThread"].samples == 5 and native["MainThread"].leaf == {pyspy_summary.NO_FRAME: 5}


def test_a_file_that_is_not_collapsed_stacks_is_refused(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "flame.svg"
    bad.write_text("<svg>not a profile</svg>\n")
    assert pyspy_summary.main([str(bad)]) == 2
    assert "no sample count" in capsys.readouterr().err
