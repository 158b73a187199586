"""OpenCV without its own thread pool, in the server's processes.

The server calls OpenCV from many threads at once, each call small: a frame's BGR to I420
conversion into its session's ring (the channels' sending threads, ~650 calls/s at 26 sessions)
and the face resizes of a device process's paste threads. OpenCV's default pool splits every
such call across all the machine's cores, and its workers spin while they wait for the next
one: on a 16-core H200 host the server's main process went from ~0.5 to ~2.7 cores at 26
conversational sessions when the ring conversion arrived (run 20261204-015629's
process-cpu.log, against 20261203-235450's), for a conversion that costs ~50 us on one core.
The calls already run side by side on their own threads, so parallelism inside each buys
nothing. ``bench/ring_write_cost.py`` measures it.
"""

from __future__ import annotations

import cv2


def use_serial_opencv() -> None:
    """Make every OpenCV call in this process run on its caller's thread (process-wide)."""
    cv2.setNumThreads(1)
