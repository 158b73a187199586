"""A session's composed frames in shared memory, written by the server, read by its peer process.

Why shared memory: a 720p BGR frame is 2.7 MB; pickling 25 of them a second per session through
a pipe would cost more CPU than encoding them. The server copies each released frame into the
next slot of a small ring and sends only the slot number; the peer process turns the slot into
an ``av.VideoFrame`` (its own copy) as soon as the message arrives, long before the ring wraps
(``slots`` x 40 ms later).
"""

from __future__ import annotations

import secrets
from multiprocessing import shared_memory

import numpy as np

DEFAULT_SLOTS = 8


class FrameRing:
    """``slots`` uint8 frames of one shape in one shared-memory segment."""

    def __init__(self, shm: shared_memory.SharedMemory, shape: tuple[int, ...], slots: int, owner: bool) -> None:
        self._shm = shm
        self.shape = tuple(shape)
        self.slots = slots
        self.owner = owner
        self._frames = np.ndarray((slots, *self.shape), dtype=np.uint8, buffer=shm.buf)

    @classmethod
    def create(cls, shape: tuple[int, ...], slots: int = DEFAULT_SLOTS) -> FrameRing:
        size = slots * int(np.prod(shape))
        shm = shared_memory.SharedMemory(name=f"lipstream-{secrets.token_hex(6)}", create=True, size=size)
        return cls(shm, shape, slots, owner=True)

    @classmethod
    def attach(cls, name: str, shape: tuple[int, ...], slots: int) -> FrameRing:
        # A spawned peer process shares the server's resource tracker, which keeps one entry
        # per name: attaching registers nothing new, and only the owner's unlink removes it.
        shm = shared_memory.SharedMemory(name=name)
        return cls(shm, shape, slots, owner=False)

    @property
    def name(self) -> str:
        return self._shm.name

    def describe(self) -> tuple[str, tuple[int, ...], int]:
        """What a reader needs to :meth:`attach`."""
        return self.name, self.shape, self.slots

    def write(self, index: int, image: np.ndarray) -> int:
        """Copy frame ``index`` into its slot; returns the slot."""
        if image.shape != self.shape:
            raise ValueError(f"frame shape {image.shape} does not fit the ring's {self.shape}")
        slot = index % self.slots
        np.copyto(self._frames[slot], image)
        return slot

    def view(self, slot: int) -> np.ndarray:
        """The slot's frame, without a copy (valid until the ring wraps)."""
        return self._frames[slot]

    def close(self) -> None:
        del self._frames
        try:
            self._shm.close()
        except BufferError:  # a view still in use somewhere: the mapping goes with the process
            pass
        if self.owner:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass
