"""Face box, crop box and blending mask of one avatar frame (MuseTalk v1.5 rules, pure functions).

Landmark indices are zero-based iBUG-68 (the order dlib and DWPose's face points share):
0..16 jaw outline (0 = the subject's right ear level, 8 = chin), 27..30 nose bridge (30 = tip),
31..35 nostril base, 36..47 eyes, 48..67 mouth. The official code's ``lm[29]`` is index 29 here.

Boxes are ``(x1, y1, x2, y2)`` with exclusive ends, as the official code slices
``frame[y1:y2, x1:x2]``.
"""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.avatar.model import CROP_SIZE

#: v1.5 lowers the face box's bottom edge by this many pixels (``--extra_margin`` default).
EXTRA_MARGIN = 10
#: Crop box half-size factor (``expand`` in the official blending code).
CROP_EXPAND = 1.5
#: The mask keeps rows from this fraction of the crop height down (``upper_boundary_ratio``).
UPPER_BOUNDARY_RATIO = 0.5

_JAW = np.arange(0, 17)
_NOSE = np.array([27, 31, 32, 33, 34, 35])
_NOSE_WIDEN = 1.25  # nostril-base points sit inside the visible nose wings
_MIN_BOX = 2  # a box narrower than this cannot be resized into a crop


def face_box(
    landmarks: np.ndarray,
    image_size: tuple[int, int],
    det_box: tuple[int, int, int, int] | np.ndarray | None = None,
    extra_margin: int = EXTRA_MARGIN,
) -> np.ndarray:
    """The region the engine regenerates: from the nose bridge mirrored upwards to below the chin.

    The top is placed as far above point 29 as the chin is below it, so the box centre (and with
    it the crop's 0.5 mask boundary) sits on the nose bridge whatever the head size. Unlike the
    official code we clamp the box to the image instead of falling back to the detector box when a
    landmark lies left of the image, because the compositor can only touch pixels that exist.
    The detector box (also clamped) is the fallback for a degenerate landmark box.

    Returns int32 ``[4]``; ``image_size`` is ``(width, height)``.
    """
    w_img, h_img = image_size
    lm = np.asarray(landmarks, dtype=np.float64)
    xs, ys = lm[:, 0], lm[:, 1]
    max_y = float(ys.max())
    y29 = float(lm[29, 1])
    x1 = int(round(float(xs.min())))
    x2 = int(round(float(xs.max())))
    y1 = int(round(max(0.0, y29 - (max_y - y29))))
    y2 = int(round(max_y)) + extra_margin
    box = _clamp_box((x1, y1, x2, y2), w_img, h_img)
    if _is_degenerate(box) and det_box is not None:
        dx1, dy1, dx2, dy2 = (int(v) for v in det_box)
        box = _clamp_box((dx1, dy1, dx2, dy2 + extra_margin), w_img, h_img)
    if _is_degenerate(box):
        box = _grow_to_min(box, w_img, h_img)
    return np.asarray(box, dtype=np.int32)


def crop_box(face: np.ndarray | tuple[int, int, int, int], expand: float = CROP_EXPAND) -> np.ndarray:
    """Square blending region around the face box; may extend past the image (the official code
    lets PIL pad), which is why callers must never slice a frame with it unclipped."""
    x1, y1, x2, y2 = (int(v) for v in face)
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
    s = int(max(x2 - x1, y2 - y1) // 2 * expand)
    return np.asarray([cx - s, cy - s, cx + s, cy + s], dtype=np.int32)


def jaw_mask(
    landmarks: np.ndarray,
    face: np.ndarray | tuple[int, int, int, int],
    crop: np.ndarray | tuple[int, int, int, int],
    size: int = CROP_SIZE,
) -> np.ndarray:
    """Blending mask of one frame in face-box coordinates, ``uint8 [size, size]``, 255 = generated.

    Built like the official v1.5 'jaw' mask, step for step on the crop-box grid (so the blur has
    the official width), but with the face-parsing step replaced by landmark polygons:

    - BiSeNet 'jaw' mode marks the pixels it classifies as skin, mouth and lips (classes 1, 11,
      12, 13), excluding nose, neck, hair and background. We fill the jaw outline (points 0..16,
      closed across at ear level) and cut out the nose (bridge top 27 plus the nostril base
      31..35, widened to cover the wings). The differences: the outline is a polygon, not the
      true skin edge, so a little background or hair inside the jaw line can be marked and skin
      just outside it (a beard edge, a cheek past the outline in a turned head) is not; beards
      and glasses are treated as skin; the neck is never marked (as in 'jaw' mode).
    - Then exactly as the official code: keep only inside the face box, keep only rows from
      0.5 of the crop height down, Gaussian blur with kernel ``int(0.1 * crop_w // 2 * 2) + 1``.

    The blurred crop mask is then cut to the face box and resized to ``size`` x ``size``: outside
    the face box the official paste leaves the original pixels, so blending there is a no-op
    (see :mod:`pipeline.avatar.model`).
    """
    fx1, fy1, fx2, fy2 = (int(v) for v in face)
    cx1, cy1, cx2, cy2 = (int(v) for v in crop)
    crop_w, crop_h = cx2 - cx1, cy2 - cy1
    if crop_w <= 0 or crop_h <= 0 or fx2 <= fx1 or fy2 <= fy1:
        return np.zeros((size, size), dtype=np.uint8)
    offset = np.array([cx1, cy1], dtype=np.float64)
    lm = np.asarray(landmarks, dtype=np.float64) - offset

    mask = np.zeros((crop_h, crop_w), dtype=np.uint8)
    _fill(mask, lm[_JAW], 255)
    _fill(mask, _widen(lm[_NOSE], _NOSE_WIDEN), 0)

    inside = np.zeros_like(mask)
    bx1, by1, bx2, by2 = fx1 - cx1, fy1 - cy1, fx2 - cx1, fy2 - cy1
    inside[max(by1, 0) : max(by2, 0), max(bx1, 0) : max(bx2, 0)] = 1
    mask *= inside
    mask[: int(crop_h * UPPER_BOUNDARY_RATIO)] = 0

    k = blur_kernel_size(crop_w)
    mask = cv2.GaussianBlur(mask, (k, k), 0)
    face_part = _window(mask, bx1, by1, bx2, by2)
    return cv2.resize(face_part, (size, size), interpolation=cv2.INTER_LINEAR)


def blur_kernel_size(crop_w: int) -> int:
    """The official formula, kept verbatim (note the float floor division)."""
    return int(0.1 * crop_w // 2 * 2) + 1


def frame_geometry(
    landmarks: np.ndarray,
    image_size: tuple[int, int],
    det_box: np.ndarray | tuple[int, int, int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(face box, crop box, mask) of one frame, the three things the compositor needs."""
    fb = face_box(landmarks, image_size, det_box)
    cb = crop_box(fb)
    return fb, cb, jaw_mask(landmarks, fb, cb)


def _fill(mask: np.ndarray, pts: np.ndarray, value: int) -> None:
    """Fill a polygon with 4 fractional bits so interpolated (non-integer) landmarks stay smooth."""
    shift = 4
    fixed = np.round(pts * (1 << shift)).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(mask, [fixed], int(value), lineType=cv2.LINE_8, shift=shift)


def _widen(pts: np.ndarray, factor: float) -> np.ndarray:
    centre = pts.mean(axis=0)
    out = pts.copy()
    out[:, 0] = centre[0] + (pts[:, 0] - centre[0]) * factor
    return out


def _window(img: np.ndarray, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    """``img[y1:y2, x1:x2]`` with zeros where the window leaves the array (tiny face boxes can
    exceed their crop because of the official rounding of the half-size)."""
    h, w = img.shape[:2]
    out = np.zeros((y2 - y1, x2 - x1), dtype=img.dtype)
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if sx2 > sx1 and sy2 > sy1:
        out[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = img[sy1:sy2, sx1:sx2]
    return out


def _clamp_box(box: tuple[int, int, int, int], w: int, h: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box
    return max(0, min(x1, w)), max(0, min(y1, h)), max(0, min(x2, w)), max(0, min(y2, h))


def _is_degenerate(box: tuple[int, int, int, int]) -> bool:
    x1, y1, x2, y2 = box
    return x2 - x1 < _MIN_BOX or y2 - y1 < _MIN_BOX


def _grow_to_min(box: tuple[int, int, int, int], w: int, h: int) -> tuple[int, int, int, int]:
    """Last resort so downstream resizes never see an empty box; images are at least 2x2."""
    x1, y1, x2, y2 = box
    x1 = max(0, min(x1, w - _MIN_BOX))
    y1 = max(0, min(y1, h - _MIN_BOX))
    return x1, y1, max(x2, x1 + _MIN_BOX), max(y2, y1 + _MIN_BOX)
