"""The server's processes run OpenCV on the caller's thread (pipeline/opencv_threads.py says why)."""

from __future__ import annotations

import subprocess
import sys


def test_use_serial_opencv_leaves_one_thread_in_a_fresh_process() -> None:
    code = (
        "import cv2; before = cv2.getNumThreads()\n"
        "from pipeline.opencv_threads import use_serial_opencv; use_serial_opencv()\n"
        "print(before, cv2.getNumThreads())"
    )
    before, after = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert int(after) == 1
    assert int(before) >= 1


def test_ring_write_bench_runs_and_rejects_bad_pool_sizes(capsys) -> None:  # noqa: ANN001
    import pytest

    from bench import ring_write_cost

    assert ring_write_cost.main(["--pools", "1", "--seconds", "0.2", "--rate", "100", "--writers", "2"]) == 0
    assert "pool   1:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:
        ring_write_cost.main(["--pools", "0"])
    assert bad.value.code == 2
    assert "not a list of thread counts >= 1" in capsys.readouterr().err
