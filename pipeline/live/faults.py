"""Telling a broken device from a failed batch.

Why a distinction: an ordinary exception in a batch (a bad request, a bug tied to one avatar's
data) fails that batch's frames and the worker carries on with the next batch. A *device* fault
is different. CUDA errors are sticky (every later call on that context fails too), a
device-side assert leaves the context unusable, and an out-of-memory error on a GPU that was
calibrated with room to spare means something else holds the memory. Carrying on would turn
every frame of every session bound there into a failure, while admission kept sending new
sessions to the device. So on a device fault the worker stops, the device pool takes the device
out of rotation, and the sessions bound to it end with the reason; other devices keep serving.

This module never imports torch: the lite engine runs without it. Torch's error types are
looked up only when torch is already loaded (an engine that raises them has loaded it).
"""

from __future__ import annotations

import sys

from pipeline.errors import LipstreamError

#: Substrings of RuntimeError messages that torch uses for device failures.
DEVICE_FAULT_MARKERS = ("CUDA error", "CUDA out of memory", "device-side assert", "cuDNN error")


class DeviceFailure(RuntimeError):
    """Raised by an engine (or a test's fault injection) to say its device is unusable."""


class DeviceFailed(LipstreamError):
    """Work could not be served because its device failed and was taken out of rotation."""

    http_status = 503


def is_device_fault(exc: BaseException) -> bool:
    """True when ``exc`` means the device itself is broken, not just this batch."""
    if isinstance(exc, DeviceFailure):
        return True
    torch = sys.modules.get("torch")
    if torch is not None:
        kinds = tuple(
            kind
            for kind in (
                getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None),
                getattr(torch, "AcceleratorError", None),
            )
            if isinstance(kind, type)
        )
        if kinds and isinstance(exc, kinds):
            return True
    if isinstance(exc, RuntimeError):
        text = str(exc)
        return any(marker in text for marker in DEVICE_FAULT_MARKERS)
    return False


def describe_fault(exc: BaseException, limit: int = 300) -> str:
    """One line for people: the exception's first line (torch appends pages of hints)."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
