"""Host <-> GPU copies of a batch's small inputs and finished outputs that do not stall other threads.

Why: the engine thread's batch ended with ``out.cpu()`` (a copy into pageable memory) and began
with ``torch.tensor(indices).to(device, non_blocking=True)`` (pageable too, so not asynchronous
at all). A pageable copy waits in the CUDA driver for everything queued before it on the stream,
i.e. the whole UNet + VAE batch. On an H200 a feature pass that takes 8 ms alone took 187 ms
(about four batches) beside back-to-back batches of 24, and 17 ms eager passes 663 ms: the more
host calls a pass makes, the longer it waits, so it waits per call, not on the GPU
(bench/gpu_costs.py ``contention``; docs/benchmarks.md). Here both copies go through pinned
memory, and the engine thread waits for its batch on a blocking-sync event, asleep, instead of
inside a driver copy (so does the feature thread for its pass).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import torch

_asleep = threading.local()  # per thread: seconds spent in wait_asleep since the last take_asleep()


def index_tensor(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """int64 ``values`` on ``device``; from a GPU's view an asynchronous copy out of pinned memory."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """``tensor`` (finished on the current stream) as a numpy array, waited for on a blocking
    event. The array keeps its pinned buffer alive (the host allocator reuses it once freed)."""
    host = start_to_host(tensor)
    if tensor.device.type == "cuda":
        wait_asleep(torch.cuda.current_stream(tensor.device))
    return host.numpy()


def start_to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of ``tensor`` that a GPU's current stream fills later: pinned memory, the copy
    queued behind the work that makes ``tensor``. Read it only once the stream has got there (an
    event recorded after this call). On a CPU, ``tensor`` itself."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def wait_asleep(stream: torch.cuda.Stream) -> None:
    """Wait for the work queued on ``stream`` so far, asleep: ``stream.synchronize()`` spins a
    core for the whole wait (one GPU context on a many-core host), and a device process has two
    threads waiting on its GPU most of the time."""
    done = torch.cuda.Event(blocking=True)
    done.record(stream)
    wait_event_asleep(done)


def wait_event_asleep(event: torch.cuda.Event) -> None:
    """Wait for a recorded ``event`` (made with ``blocking=True``: asleep), counted for
    :func:`take_asleep`."""
    started = time.perf_counter()
    event.synchronize()
    _asleep.seconds = getattr(_asleep, "seconds", 0.0) + time.perf_counter() - started


def take_asleep() -> float:
    """Seconds this thread spent asleep in :func:`wait_asleep` since the last call (and resets).
    The engine thread's batch minus this is its host side: inputs, launches and GIL waits, with
    the GPU idle before the first launch (``batch_host`` in the device's stage times)."""
    seconds = getattr(_asleep, "seconds", 0.0)
    _asleep.seconds = 0.0
    return seconds
