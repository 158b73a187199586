"""Composed frames in shared memory between the server and its worker processes.

:class:`FrameRing`: a session's released frames, written by the server, read by its peer process.
:class:`ResultRing`: frames a device process composed, written there, copied out by the server.

Why shared memory: a 720p BGR frame is 2.7 MB; pickling 25 of them a second per session through
a pipe would cost more CPU than encoding them. For a session's ring, the server copies each released frame into the
next slot of a small ring and sends only the slot number; the peer process turns the slot into
an ``av.VideoFrame`` (its own copy) as soon as the message arrives, long before the ring wraps
(``slots`` x 40 ms later).

Why the arrays are made with :func:`_frames_over`: an array made with ``np.ndarray(buffer=shm.buf)``
does not hold the mapping, so ``shm.close()`` unmaps it under any array still in use, and the next
write into it kills the process with SIGSEGV. That happened in the GPU load test: a session's feed
closed its ring on the event loop while the channel's sending thread was converting a frame into
it (runs 104136 and 134952, at the end of a scenario, when 29 sessions were deleted at once).
Arrays from ``np.frombuffer`` hold the mapping: closing under one then fails (BufferError, caught)
and the mapping goes with the last array. :class:`FrameRing` also makes its closing wait for a
write in progress, so the segment is unmapped at once.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from multiprocessing import shared_memory

import cv2
import numpy as np

log = logging.getLogger("lipstream.ipc")

DEFAULT_SLOTS = 8


class _Segment(shared_memory.SharedMemory):
    """A shared-memory segment whose finalizer stays quiet while an array over it lives.

    Why: a ring dropped in a reference cycle has every finalizer in the cycle run in no set
    order; the segment's own, run before the ring's, found the ring's frames still mapped and
    printed "Exception ignored ... BufferError" (seen in the GPU load test's server log). The
    mapping then goes with the last array, and the ring's ``__del__`` says that it leaked."""

    def __del__(self) -> None:
        try:
            self.close()
        except BufferError:
            pass


def _frames_over(shm: shared_memory.SharedMemory, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
    """A uint8 array of ``shape`` over ``shm`` from byte ``offset``, holding the mapping while it
    (or any view of it) lives; the module docstring says why not ``np.ndarray(buffer=...)``."""
    count = int(np.prod(shape))
    return np.frombuffer(shm.buf, dtype=np.uint8, count=count, offset=offset).reshape(shape)


class _SharedRing:
    """What both rings do with their segment: name it, release it (unmap; unlink if it is the
    owner's), and close themselves if dropped open.

    Why the last: a ring dropped without ``close()`` leaks (an owner's name stays in /dev/shm
    until the process exits), and its arrays must go before the segment's own finalizer runs
    (else "Exception ignored ... BufferError"). Said in the log, because it is a leak."""

    KIND = "ring"
    _shm: shared_memory.SharedMemory
    owner: bool

    @property
    def name(self) -> str:
        return self._shm.name

    def close(self) -> None:
        raise NotImplementedError

    def _is_open(self) -> bool:
        raise NotImplementedError

    def _release_segment(self) -> None:
        try:
            self._shm.close()
        except BufferError:  # an array over it is still in use (a slot being pasted into, a view
            pass  # being copied): the mapping stays until the last such array is gone
        if self.owner:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass

    def __del__(self) -> None:
        if not self._is_open():  # closed, or never fully made
            return
        try:
            log.warning("%s %s %s was dropped without being closed (closing it now)", self.KIND, self.name,
                        "created here" if self.owner else "attached here")
        except Exception:  # noqa: BLE001 - at interpreter exit logging may be gone; the close still runs
            pass
        self.close()


class FrameRing(_SharedRing):
    """``slots`` frames of one picture shape in one shared-memory segment.

    A BGR picture of even width and height is stored as I420 (``yuv420p``: the Y plane, then U
    and V at half resolution, ``[h * 3 / 2, w]`` bytes), converted by OpenCV as it is written;
    other pictures are stored as they are (``bgr24`` for BGR). Why: the peers' VP8 encoder takes
    I420, and aiortc converted every BGR frame with libswscale in its encoding thread (~0.4 ms a
    512x512 frame on the development CPU against 0.04 ms for OpenCV's conversion); the slot is
    also half the size, so both processes copy half as much (bench/peer_frame_cost.py).
    """

    KIND = "frame ring"

    def __init__(
        self, shm: shared_memory.SharedMemory, shape: tuple[int, ...], slots: int, owner: bool,
        pixel_format: str = "bgr24", image_shape: tuple[int, ...] | None = None,
    ) -> None:
        self._shm = shm
        self.shape = tuple(shape)  # a slot's array (I420: [h * 3 / 2, w])
        self.image_shape = tuple(image_shape or shape)  # the pictures written
        self.pixel_format = pixel_format
        self.slots = slots
        self.owner = owner
        self._frames: np.ndarray | None = _frames_over(shm, (slots, *self.shape))
        # Held while a frame is written (the channel's sending thread) and while the ring closes
        # (the event loop): closing waits for the write, and a write after it finds no frames.
        self._lock = threading.Lock()

    @classmethod
    def create(cls, image_shape: tuple[int, ...], slots: int = DEFAULT_SLOTS, i420: bool = True) -> FrameRing:
        """``i420``: store even BGR pictures as I420 (the class docstring says why)."""
        image_shape = tuple(image_shape)
        if i420 and len(image_shape) == 3 and image_shape[2] == 3 and image_shape[0] % 2 == 0 and image_shape[1] % 2 == 0:
            pixel_format, shape = "yuv420p", (image_shape[0] * 3 // 2, image_shape[1])
        else:  # I420 halves both sides: odd sizes (and anything not BGR) stay as written
            pixel_format, shape = ("bgr24" if image_shape[-1:] == (3,) else "raw"), image_shape
        size = slots * int(np.prod(shape))
        shm = _Segment(name=f"lipstream-{secrets.token_hex(6)}", create=True, size=size)
        return cls(shm, shape, slots, owner=True, pixel_format=pixel_format, image_shape=image_shape)

    @classmethod
    def attach(cls, name: str, shape: tuple[int, ...], slots: int, pixel_format: str = "bgr24") -> FrameRing:
        # A spawned peer process shares the server's resource tracker, which keeps one entry
        # per name: attaching registers nothing new, and only the owner's unlink removes it.
        shm = _Segment(name=name)
        return cls(shm, shape, slots, owner=False, pixel_format=pixel_format)

    def describe(self) -> tuple[str, tuple[int, ...], int, str]:
        """What a reader needs to :meth:`attach`."""
        return self.name, self.shape, self.slots, self.pixel_format

    def write(self, index: int, image: np.ndarray) -> int:
        """Convert or copy frame ``index`` into its slot; returns the slot."""
        self.check(image)
        slot = self.slot_of(index)
        with self._lock:  # (no reference to the frames outlives it: close() unmaps right after)
            if self._frames is not None:  # closed meanwhile (its session's feed ended): nobody reads it
                if self.pixel_format == "yuv420p":
                    cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420, dst=self._frames[slot])
                else:
                    np.copyto(self._frames[slot], image)
        return slot

    def check(self, image: np.ndarray) -> None:
        """Raise ValueError unless ``image`` fits a slot (before handing its copy elsewhere)."""
        if image.shape != self.image_shape:
            raise ValueError(f"frame shape {image.shape} does not fit the ring's {self.image_shape}")

    def slot_of(self, index: int) -> int:
        return index % self.slots

    def view(self, slot: int) -> np.ndarray:
        """The slot's frame as stored (:attr:`pixel_format`), without a copy (valid until the ring wraps)."""
        if self._frames is None:
            raise ValueError("the ring is closed")
        return self._frames[slot]

    def close(self) -> None:
        with self._lock:  # after a write in progress
            self._frames = None
        self._release_segment()

    def _is_open(self) -> bool:
        return getattr(self, "_frames", None) is not None


class ResultRing(_SharedRing):
    """Composed frames handed from a device process (the writer) to the server (the reader).

    Unlike a session's :class:`FrameRing`, frames arrive at the engine's pace, a batch at a time,
    and the reader copies each one out as soon as its message arrives. The reader marks every
    frame it is done with (copied, or not wanted) in a small header, and the writer waits for a
    slot's previous frame to be marked before reusing the slot: a slow reader slows the writer
    instead of losing frames. A frame overwritten anyway (the writer gave up waiting, e.g. the
    reader is stuck) is detected by its stamp and reported as missing, never shown torn.

    Layout of the segment: ``int64 [2, slots]`` (frame number written into each slot, frame
    number the reader released from each slot), then the frames. Frame numbers start at 1.
    """

    HEADER = 16  # bytes per slot: written + released stamps
    KIND = "result ring"

    def __init__(self, shm: shared_memory.SharedMemory, shape: tuple[int, ...], slots: int, owner: bool) -> None:
        self._shm = shm
        self.shape = tuple(shape)
        self.slots = slots
        self.owner = owner
        self._stamps = np.frombuffer(shm.buf, dtype=np.int64, count=2 * slots).reshape(2, slots)
        self._frames = _frames_over(shm, (slots, *self.shape), offset=self.HEADER * slots)
        self._next = 1
        self._lock = threading.Lock()
        # How often, and how long in all, the writer waited for the reader to release a slot: a
        # device held up by a slow server process (its reading thread, a garbage collection)
        self.waits = 0
        self.wait_seconds = 0.0
        self._closed = False

    @classmethod
    def create(cls, shape: tuple[int, ...], slots: int) -> ResultRing:
        size = slots * (cls.HEADER + int(np.prod(shape)))
        shm = _Segment(name=f"lipstream-r-{secrets.token_hex(6)}", create=True, size=size)
        ring = cls(shm, shape, slots, owner=True)
        ring._stamps[:] = 0
        return ring

    @classmethod
    def attach(cls, name: str, shape: tuple[int, ...], slots: int) -> ResultRing:
        return cls(_Segment(name=name), shape, slots, owner=False)

    def describe(self) -> tuple[str, tuple[int, ...], int]:
        return self.name, self.shape, self.slots

    # -- writer --------------------------------------------------------------------------------------

    def put(self, image: np.ndarray, timeout: float = 2.0) -> tuple[int, int]:
        """Copy ``image`` into the next slot once the reader released its previous frame (or
        ``timeout`` passed); returns ``(slot, frame number)``."""
        if image.shape != self.shape:
            raise ValueError(f"frame shape {image.shape} does not fit the ring's {self.shape}")
        placed = self.reserve(timeout)
        np.copyto(placed.array, image)
        placed.commit()
        return placed.slot, placed.number

    def reserve(self, timeout: float = 2.0) -> ResultSlot:
        """The next slot, to be written in place and then committed (or abandoned).

        Why: a device process that pastes its faces straight into the slot saves a full-frame
        copy per frame on its finishing thread, which runs a batch's frames one after another
        (on an H200 at 26 sessions, :meth:`put`'s copies were 40 % of that thread's samples).
        Slots are handed out in frame-number order; writing them may happen on any threads."""
        with self._lock:
            number = self._next
            self._next += 1
            slot = (number - 1) % self.slots
            previous = number - self.slots
            if previous > 0 and self._stamps[1, slot] < previous:
                started = time.monotonic()
                deadline = started + timeout
                while self._stamps[1, slot] < previous and time.monotonic() < deadline:
                    time.sleep(0.0005)
                self.waits += 1
                self.wait_seconds += time.monotonic() - started
                if self._stamps[1, slot] < previous:
                    log.warning("result ring %s: frame %d not read within %.1f s; overwriting it", self.name, previous, timeout)
            self._stamps[0, slot] = 0  # torn until committed
        return ResultSlot(self, slot, number, self._frames[slot])

    # -- reader --------------------------------------------------------------------------------------

    def take(self, slot: int, number: int) -> np.ndarray | None:
        """A copy of frame ``number`` from ``slot`` and the slot released; None if it was
        overwritten meanwhile."""
        image = None
        if self._stamps[0, slot] == number:
            copy = self._frames[slot].copy()
            if self._stamps[0, slot] == number:
                image = copy
        self.release(slot, number)
        return image

    def release(self, slot: int, number: int) -> None:
        """The reader is done with frame ``number`` (taken, or not wanted)."""
        if self._stamps[1, slot] < number:
            self._stamps[1, slot] = number

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        del self._frames, self._stamps
        self._release_segment()

    def _is_open(self) -> bool:
        return not getattr(self, "_closed", True)


class ResultSlot:
    """One reserved slot of a :class:`ResultRing`: write :attr:`array`, then :meth:`commit` it
    (the reader may take it from then on) or :meth:`abandon` it (the frame was not made: the slot
    counts as read, so the writer does not wait for a reader that will never come)."""

    __slots__ = ("ring", "slot", "number", "array")

    def __init__(self, ring: ResultRing, slot: int, number: int, array: np.ndarray) -> None:
        self.ring = ring
        self.slot = slot
        self.number = number
        self.array = array

    def commit(self) -> None:
        self.ring._stamps[0, self.slot] = self.number

    def abandon(self) -> None:
        self.ring.release(self.slot, self.number)
