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
