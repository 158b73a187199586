"""Blends generated 256x256 face crops back into an avatar's full frames, and cuts the crops out.

The last CPU stage of every generated frame, so it is written for speed on one core:

- The per-frame alpha mask (stored 256x256 in face-box coordinates, see
  :mod:`pipeline.avatar.model`) is resized to the face box once and cached (bounded LRU), already
  converted to the 0..256 fixed-point weight the blend uses and cut to the rows/columns where it is
  non-zero. For the jaw mask that is roughly the lower half of the face box, so most of the box is
  never touched.
- The blend is integer arithmetic in uint16: ``(face * a + frame * (256 - a) + 128) >> 8`` with
  ``a`` in 0..256. Using 256 (not 255) as "fully generated" makes the two ends exact: mask 255 ->
  the generated pixel, mask 0 -> the original pixel, bit for bit; the products stay below 2**16.
- Everything outside the face box is a plain copy of the avatar frame.

Resizing the generated face to the face box: ``INTER_AREA`` when the box is smaller than 256 in a
direction (it averages all covered source pixels, so the 256-pixel face does not alias into moiré
on skin texture and teeth as bilinear sampling does when it skips pixels), ``INTER_LINEAR`` when
enlarging (AREA degenerates to nearest-neighbour-like blockiness there; bilinear is what the
official blend uses and is smooth). A box smaller in one direction and larger in the other uses
AREA, because aliasing is the more visible artefact.

Face boxes that stick out of the image (the avatar store clamps them, but a hand-made avatar may
not) are handled by blending only the visible part: the face and mask are resized to the full
box first, so the visible part lines up with where it would have been.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.avatar.model import CROP_SIZE, Avatar

#: Resized masks kept per compositor. Each is at most box_h x box_w x 3 uint16 (for a 200 px face
#: box ~240 KB), so the default keeps a few hundred frames' worth in ~60 MB.
DEFAULT_MASK_CACHE = 256
#: Face crops kept by :func:`face_crop` across all avatars (196 KB each: ~100 MB at most).
DEFAULT_CROP_CACHE = 512


@dataclass(frozen=True)
class _BlendPlan:
    """Where and how one avatar frame is blended; derived from its face box and mask only."""

    box: tuple[int, int, int, int]  # full face box (x1, y1, x2, y2), may exceed the image
    size: tuple[int, int]  # (w, h) of the full face box
    # Region to blend, in box coordinates (rows/cols of the resized face), non-empty mask only:
    by0: int
    by1: int
    bx0: int
    bx1: int
    alpha: np.ndarray | None  # uint16 [by1-by0, bx1-bx0, 3], 0..256; None: nothing to blend
    interpolation: int


class Compositor:
    """Turns (avatar frame index, generated face crop) into a full output frame for one avatar.

    Thread-safe: the mask cache is guarded by a lock, and compose never writes shared arrays.
    """

    def __init__(self, avatar: Avatar, mask_cache: int = DEFAULT_MASK_CACHE) -> None:
        self.avatar = avatar
        self._plans: OrderedDict[int, _BlendPlan] = OrderedDict()
        self._max_plans = max(1, int(mask_cache))
        self._lock = threading.Lock()

    def idle(self, frame_index: int) -> np.ndarray:
        """The avatar frame unchanged (no copy: may be a read-only memmap, do not write into it)."""
        return self.avatar.frames[frame_index]

    def compose(self, frame_index: int, face: np.ndarray) -> np.ndarray:
        """A new uint8 BGR full frame: ``face`` (256x256x3 BGR) blended into the face box."""
        if face.shape != (CROP_SIZE, CROP_SIZE, 3) or face.dtype != np.uint8:
            raise ValueError(f"face must be uint8 [{CROP_SIZE}, {CROP_SIZE}, 3], got {face.dtype} {face.shape}")
        out = np.array(self.avatar.frames[frame_index], copy=True)
        plan = self._plan(frame_index)
        if plan.alpha is None:
            return out
        w, h = plan.size
        resized = cv2.resize(face, (w, h), interpolation=plan.interpolation)
        x1, y1 = plan.box[0], plan.box[1]
        region = out[y1 + plan.by0 : y1 + plan.by1, x1 + plan.bx0 : x1 + plan.bx1]
        gen = resized[plan.by0 : plan.by1, plan.bx0 : plan.bx1]
        region[...] = _blend(gen, region, plan.alpha)
        return out

    def _plan(self, frame_index: int) -> _BlendPlan:
        with self._lock:
            plan = self._plans.get(frame_index)
            if plan is not None:
                self._plans.move_to_end(frame_index)
                return plan
        plan = _make_plan(self.avatar, frame_index)
        with self._lock:
            self._plans[frame_index] = plan
            while len(self._plans) > self._max_plans:
                self._plans.popitem(last=False)
        return plan


def _blend(gen: np.ndarray, orig: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Fixed-point alpha blend; exact at alpha 0 and 256 (see the module docstring)."""
    acc = gen.astype(np.uint16)
    acc *= alpha
    rest = np.uint16(256) - alpha
    rest *= orig
    acc += rest
    acc += np.uint16(128)
    acc >>= 8
    return acc.astype(np.uint8)


def _make_plan(avatar: Avatar, frame_index: int) -> _BlendPlan:
    """Resize the frame's mask to its face box and cut it to the visible, non-zero part."""
    x1, y1, x2, y2 = (int(v) for v in avatar.face_boxes[frame_index])
    img_w, img_h = avatar.size
    w, h = x2 - x1, y2 - y1
    box = (x1, y1, x2, y2)
    interpolation = cv2.INTER_AREA if (w < CROP_SIZE or h < CROP_SIZE) else cv2.INTER_LINEAR
    empty = _BlendPlan(box, (max(w, 1), max(h, 1)), 0, 0, 0, 0, None, interpolation)
    if w <= 0 or h <= 0:
        return empty
    mask = cv2.resize(np.asarray(avatar.masks[frame_index]), (w, h), interpolation=cv2.INTER_LINEAR)
    # Visible part of the box, in box coordinates.
    vx0, vy0 = max(0, -x1), max(0, -y1)
    vx1, vy1 = min(w, img_w - x1), min(h, img_h - y1)
    if vx1 <= vx0 or vy1 <= vy0:
        return empty
    visible = mask[vy0:vy1, vx0:vx1]
    rows = np.flatnonzero(visible.any(axis=1))
    cols = np.flatnonzero(visible.any(axis=0))
    if len(rows) == 0:
        return empty
    by0, by1 = vy0 + int(rows[0]), vy0 + int(rows[-1]) + 1
    bx0, bx1 = vx0 + int(cols[0]), vx0 + int(cols[-1]) + 1
    a = mask[by0:by1, bx0:bx1].astype(np.uint16)
    a = (a * 256 + 127) // 255  # 0..255 -> 0..256, 255 -> 256 exactly
    alpha = np.ascontiguousarray(np.repeat(a[:, :, None], 3, axis=2))
    return _BlendPlan(box, (w, h), by0, by1, bx0, bx1, alpha, interpolation)


# --------------------------------------------------------------------------------------------
# Face crops (engine input)

_crop_lock = threading.Lock()
_crop_cache: OrderedDict[tuple[int, int], tuple[weakref.ref[Avatar], np.ndarray]] = OrderedDict()
_crop_cache_max = DEFAULT_CROP_CACHE


def face_crop(avatar: Avatar, frame_index: int) -> np.ndarray:
    """The avatar frame cut at its face box and resized to 256x256 with Lanczos (as MuseTalk does).

    Cached (bounded LRU shared by all avatars) and returned read-only, because every engine and
    every session asks for the same crops over and over and a Lanczos resize is the single most
    expensive step of the lite engine. The cache is keyed by the avatar object's identity; a
    weak reference guards against a new avatar reusing a dead one's id().
    """
    key = (id(avatar), int(frame_index))
    with _crop_lock:
        hit = _crop_cache.get(key)
        if hit is not None and hit[0]() is avatar:
            _crop_cache.move_to_end(key)
            return hit[1]
    crop = _cut_face(avatar, int(frame_index))
    crop.setflags(write=False)
    with _crop_lock:
        _crop_cache[key] = (weakref.ref(avatar), crop)
        _crop_cache.move_to_end(key)
        while len(_crop_cache) > _crop_cache_max:
            _crop_cache.popitem(last=False)
    return crop


def set_face_crop_cache_size(n: int) -> None:
    """Bound the shared face-crop cache to ``n`` crops (196 KB each)."""
    global _crop_cache_max
    with _crop_lock:
        _crop_cache_max = max(1, int(n))
        while len(_crop_cache) > _crop_cache_max:
            _crop_cache.popitem(last=False)


def _cut_face(avatar: Avatar, frame_index: int) -> np.ndarray:
    """Face box window of the frame (edge pixels replicated where the box leaves the image)."""
    frame = avatar.frames[frame_index]
    img_h, img_w = frame.shape[:2]
    x1, y1, x2, y2 = (int(v) for v in avatar.face_boxes[frame_index])
    w, h = max(x2 - x1, 1), max(y2 - y1, 1)
    if 0 <= x1 and 0 <= y1 and x1 + w <= img_w and y1 + h <= img_h:
        window = np.asarray(frame[y1 : y1 + h, x1 : x1 + w])
    else:
        rows = np.clip(np.arange(y1, y1 + h), 0, img_h - 1)
        cols = np.clip(np.arange(x1, x1 + w), 0, img_w - 1)
        window = np.asarray(frame)[np.ix_(rows, cols)]
    return cv2.resize(window, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_LANCZOS4)
