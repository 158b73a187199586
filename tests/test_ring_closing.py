"""Closing a shared-memory ring while another thread still uses it must never crash the process.

The GPU load test lost its server to a SIGSEGV (runs 104136 and 134952): a session's feed closed
its frame ring on the event loop while the channel's sending thread was converting a frame into
it, and ``SharedMemory.close`` unmapped the segment under that write.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from multiprocessing import shared_memory

import numpy as np
import pytest

from pipeline.ipc import frame_ring
from pipeline.ipc.frame_ring import FrameRing

#: Run in a child process: a use after unmapping is a SIGSEGV, which would end pytest itself.
_USE_AFTER_CLOSE = textwrap.dedent(
    """
    import numpy as np
    from pipeline.ipc.frame_ring import FrameRing, ResultRing

    ring = FrameRing.create((8, 8, 3), slots=2)
    reader = FrameRing.attach(*ring.describe())
    written_slot = ring._frames[1]  # as the sending thread holds it inside a write
    read_slot = reader.view(0)  # as a peer process holds it while copying a frame out
    ring.close()
    reader.close()
    written_slot[:] = 7
    read_slot[:] = 9
    assert int(written_slot.sum()) == 7 * written_slot.size and int(read_slot.sum()) == 9 * read_slot.size

    results = ResultRing.create((4, 6, 3), slots=2)
    pasting = results.reserve()  # a device's finisher pastes faces straight into this slot
    results.close()
    pasting.array[:] = 5
    assert int(pasting.array.sum()) == 5 * pasting.array.size
    print("survived")
    """
)


def test_closing_a_ring_under_an_array_in_use_keeps_the_mapping_until_it_is_gone() -> None:
    done = subprocess.run([sys.executable, "-c", _USE_AFTER_CLOSE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "survived" in done.stdout, (
        f"the child ended with {done.returncode} (-11: SIGSEGV, a write into an unmapped ring): {done.stderr[-2000:]}"
    )


def test_closing_waits_for_a_write_in_progress_and_later_writes_touch_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    ring = FrameRing.create((16, 16, 3), slots=2)
    name = ring.name
    entered = threading.Event()
    events: list[str] = []
    convert = frame_ring.cv2.cvtColor

    def slow_convert(*args, **kwargs):
        entered.set()
        time.sleep(0.2)
        result = convert(*args, **kwargs)
        events.append("written")
        return result

    monkeypatch.setattr(frame_ring.cv2, "cvtColor", slow_convert)
    picture = np.full((16, 16, 3), 200, np.uint8)
    writer = threading.Thread(target=ring.write, args=(0, picture))
    writer.start()
    assert entered.wait(5)
    ring.close()
    events.append("closed")
    writer.join(5)
    assert events == ["written", "closed"]

    assert ring.write(1, picture) == 1  # its session's feed ended: the frame goes nowhere
    assert events == ["written", "closed"]  # nothing was converted into the closed ring
    with pytest.raises(ValueError, match="closed"):
        ring.view(0)
    with pytest.raises(FileNotFoundError):  # the owner unlinked it once the write was done
        shared_memory.SharedMemory(name=name)


def test_a_ring_dropped_without_closing_is_closed_and_said_quietly() -> None:
    """A leaked ring in a reference cycle: its segment's finalizer may run first, while the ring's
    frames still map it; that printed "Exception ignored ... BufferError" in the GPU load test.
    Now the segment stays quiet, the ring is closed (an owner's name unlinked) and the leak is
    logged. Run in a child: "Exception ignored" goes straight to its stderr."""
    code = textwrap.dedent(
        """
        import gc, logging
        from multiprocessing import shared_memory
        from pipeline.ipc.frame_ring import FrameRing, ResultRing

        logging.basicConfig(level=logging.WARNING)
        names = []
        for make in (lambda: FrameRing.create((8, 8, 3)), lambda: ResultRing.create((4, 6, 3), 2)):
            ring = make()
            names.append(ring.name)
            holder = {"ring": ring}
            holder["self"] = holder  # a cycle: only the collector frees it
            del ring, holder
        gc.collect()
        for name in names:
            try:
                shared_memory.SharedMemory(name=name)
            except FileNotFoundError:
                continue
            raise SystemExit(f"{name} is still in /dev/shm")
        print("collected")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "collected" in done.stdout, done.stderr[-2000:]
    assert "Exception ignored" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.count("was dropped without being closed") == 2, done.stderr[-2000:]
