"""Reading an avatar source (image or video) as BGR frames on the 25 fps avatar clock.

Why resample by timestamp instead of taking every decoded frame: the session clock shows avatar
frame ``i`` at ``i * 40 ms``, so a 30 fps or variable-rate source must be mapped onto that grid or
the idle motion would play at the wrong speed. Output frame ``k`` is the source frame shown at
``k / 25`` s: the latest one whose presentation time is ``<= k / 25`` (times are exact fractions,
so 30 -> 25 fps never drifts). The output lasts as long as the source (the last frame's duration
included), so a 1.2 s clip gives ``floor(1.2 * 25) = 30`` frames.

Frames are streamed (one decoded frame held at a time) because a minute of 1080p is ~9 GB; the
caller decides where they go (prepare writes them straight to disk).

Every frame is made even in both dimensions (last row/column dropped) because H.264 in yuv420p,
which every output path encodes to, cannot represent odd sizes.
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from pipeline.avatar.model import FPS
from pipeline.errors import InputError

DEFAULT_MAX_SECONDS = 60.0
DEFAULT_MAX_SIDE = 1920
MIN_SIDE = 16  # smaller than any face the detector can find; reject early with a clear message

_ROTATE = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}


def iter_source_frames(
    path: Path,
    *,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    max_side: int = DEFAULT_MAX_SIDE,
    name: str | None = None,
) -> Iterator[np.ndarray]:
    """Yield the source's frames, BGR uint8, normalised (25 fps, size limit, even dimensions).

    An image gives one frame. Raises :class:`InputError` naming the file if it cannot be read or
    holds no decodable frame (possibly after some frames were yielded, for a file that breaks
    midway: a partial avatar would silently differ from the video the user gave).
    """
    path = Path(path)
    shown = name or path.name
    if not path.is_file():
        raise InputError(f"cannot read video {shown!r}: no such file")
    if cv2.haveImageReader(str(path)):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise InputError(f"cannot read image {shown!r}: the file is damaged or not an image")
        yield normalise_frame(image, max_side, name=shown)
        return
    yield from _iter_video(path, shown, max_seconds=max_seconds, max_side=max_side)


def read_source_frames(
    path: Path,
    *,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    max_side: int = DEFAULT_MAX_SIDE,
    name: str | None = None,
) -> np.ndarray:
    """All frames as one ``uint8 [N, H, W, 3]`` array (convenient for short clips and tests)."""
    return np.stack(list(iter_source_frames(path, max_seconds=max_seconds, max_side=max_side, name=name)))


def normalise_frame(image: np.ndarray, max_side: int = DEFAULT_MAX_SIDE, *, name: str = "image") -> np.ndarray:
    """Downscale so the longest side is at most ``max_side`` (aspect kept), then make both sides
    even by dropping the last row/column. Returns a C-contiguous BGR uint8 array."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(f"cannot use {name!r}: expected uint8 BGR [H, W, 3], got {image.dtype} {list(image.shape)}")
    h, w = image.shape[:2]
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        h, w = image.shape[:2]
    image = image[: h - h % 2, : w - w % 2]
    if min(image.shape[:2]) < MIN_SIDE:
        raise InputError(f"cannot use {name!r}: {w}x{h} is too small (need at least {MIN_SIDE} px a side)")
    return np.ascontiguousarray(image)


def normalise_array(source: np.ndarray, max_side: int = DEFAULT_MAX_SIDE, *, name: str = "array") -> Iterator[np.ndarray]:
    """Frames of an in-memory source: ``[H, W, 3]`` is an image, ``[N, H, W, 3]`` frames already
    on the 25 fps clock."""
    arr = np.asarray(source)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[0] == 0:
        raise InputError(f"cannot use {name!r}: expected uint8 [H, W, 3] or [N, H, W, 3], got {list(arr.shape)}")
    for frame in arr:
        yield normalise_frame(frame, max_side, name=name)


def _iter_video(path: Path, shown: str, *, max_seconds: float, max_side: int) -> Iterator[np.ndarray]:
    import av

    limit = max(1, int(Fraction(max_seconds).limit_denominator(1000) * FPS))
    emitted = 0
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"cannot read video {shown!r}: {_reason(e)}") from None
    with container:
        if not container.streams.video:
            raise InputError(f"cannot read video {shown!r}: it has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or Fraction(FPS)
        frame_dur = Fraction(1) / Fraction(rate)
        t0: Fraction | None = None
        held = None  # (av frame, its time, converted array or None)
        try:
            for i, frame in enumerate(container.decode(stream)):
                t = _frame_time(frame, stream, i, frame_dur)
                if t0 is None:
                    t0 = t
                t -= t0
                if held is not None:
                    while emitted < limit and Fraction(emitted, FPS) < t:
                        held = _convert(held, max_side, shown)
                        yield held[2]
                        emitted += 1
                    if emitted >= limit:
                        break
                    t = max(t, held[1])
                held = (frame, t, None)
        except (av.FFmpegError, OSError, ValueError) as e:
            raise InputError(f"cannot read video {shown!r}: {_reason(e)}") from None
        if held is None:
            raise InputError(f"cannot read video {shown!r}: no video frame could be decoded")
        end = held[1] + _frame_duration(held[0], stream, frame_dur)
        while emitted < limit and (Fraction(emitted, FPS) < end or emitted == 0):
            held = _convert(held, max_side, shown)
            yield held[2]
            emitted += 1


def _convert(held: tuple, max_side: int, shown: str) -> tuple:
    """Convert lazily: source frames that fall between two output ticks are never converted."""
    frame, t, arr = held
    if arr is None:
        arr = frame.to_ndarray(format="bgr24")
        quarter_turns = round((frame.rotation or 0) / 90) % 4
        if quarter_turns:
            arr = cv2.rotate(arr, _ROTATE[quarter_turns])
        arr = normalise_frame(arr, max_side, name=shown)
    return frame, t, arr


def _frame_time(frame, stream, index: int, frame_dur: Fraction) -> Fraction:  # type: ignore[no-untyped-def]
    tb = frame.time_base or stream.time_base
    if frame.pts is None or tb is None:
        return index * frame_dur
    return frame.pts * Fraction(tb)


def _frame_duration(frame, stream, fallback: Fraction) -> Fraction:  # type: ignore[no-untyped-def]
    tb = frame.time_base or stream.time_base
    if frame.duration and tb:
        return frame.duration * Fraction(tb)
    return fallback


def _reason(e: BaseException) -> str:
    """One line: FFmpeg errors carry the file name again in str(e), so prefer their strerror."""
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return " ".join(str(text).split())
