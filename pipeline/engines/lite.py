"""The weight-free ``lite`` engine: mouth motion from loudness and spectrum, drawn by warping.

Why it exists: the whole server must run and be testable on any CPU with no model weights.
It is not a lip reader; it makes the mouth open with the voice, close in silence, and widen or
round a little with the brightness of the sound.

Features (per stream, :class:`LiteFeaturizer`): from each frame's own 40 ms of audio (the span
the frame is on screen, so the mouth never opens before the sound does), the RMS level in dBFS
is turned into *openness* relative to an adaptive level tracker (a quiet and a loud speaker both
open fully; noise 30 dB under the speech does not); the spectral centroid sets *width* (bright
"ee" sounds widen) and *rounding* (dark "oo" sounds purse). webrtcvad gates everything: without
speech the target is a closed mouth. A one-pole filter with a fast attack and a slower release
keeps it from flickering; once closed and silent, frames are inactive and cost nothing.

Rendering (:class:`LiteEngine`): per avatar frame, a displacement field is precomputed once on a
region around the mouth of the 256x256 face crop: lower lip, chin and jaw move down in
proportion to openness (zero above the lip line and tapering to zero at the region's edges, so
no seam), the lip corners move out or in with width and rounding. One ``cv2.remap`` of that
region applies it; the opening between the upper inner lip and the moved lower inner lip is
filled with a dark mouth interior and a hint of upper teeth.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.audio.windows import SAMPLES_PER_FRAME, WINDOW_BEFORE, AudioFrame
from pipeline.avatar.model import CROP_SIZE, Avatar
from pipeline.compositor import face_crop
from pipeline.engines.base import Engine, Featurizer, FrameFeatures, FrameRequest

# --------------------------------------------------------------------------- features
SPAN = slice(WINDOW_BEFORE, WINDOW_BEFORE + SAMPLES_PER_FRAME)  # the frame's own 40 ms
_HANN = np.hanning(SAMPLES_PER_FRAME).astype(np.float32)
_FREQS = np.fft.rfftfreq(SAMPLES_PER_FRAME, 1 / 16000).astype(np.float32)
_BAND = (_FREQS >= 150) & (_FREQS <= 6000)

LEVEL_RANGE_DB = 24.0  # openness goes 0 -> 1 over this many dB below the speaker's level
LEVEL_FLOOR_DB = -55.0  # quieter than this is never speech
ATTACK = 0.75  # share of the way to a higher target covered in one frame
RELEASE = 0.45  # ... to a lower one
REST = 0.02  # openness under which a silent frame counts as closed


@dataclass
class MouthState:
    openness: float = 0.0
    width: float = 0.0
    rounding: float = 0.0
    # Adaptive speaker level, starting at typical speech loudness: starting low would make the
    # faint start of the first word (breath, a fricative) open the mouth wide before the voice.
    level_db: float = -20.0


class LiteFeaturizer(Featurizer):
    """Mouth parameters ``float32 [openness 0..1, width -1..1, rounding 0..1]`` per frame."""

    def __init__(self) -> None:
        self.state = MouthState()

    def reset(self) -> None:
        self.state = MouthState()

    def features(self, frames: Sequence[AudioFrame]) -> list[FrameFeatures]:
        return [self._one(frame) for frame in frames]

    def _one(self, frame: AudioFrame) -> FrameFeatures:
        s = self.state
        span = frame.window[SPAN]
        rms = float(np.sqrt(np.mean(span * span)))
        db = 20.0 * math.log10(rms + 1e-9)
        if frame.speech and db > LEVEL_FLOOR_DB:
            # The level follows loud frames at once and sinks slowly, so it tracks the speaker.
            s.level_db = db if db > s.level_db else s.level_db - 0.05
            target = min(1.0, max(0.0, (db - (s.level_db - LEVEL_RANGE_DB)) / LEVEL_RANGE_DB))
            width, rounding = _timbre(span)
        else:
            target, width, rounding = 0.0, 0.0, 0.0
        rate = ATTACK if target > s.openness else RELEASE
        s.openness += (target - s.openness) * rate
        s.width += (width - s.width) * 0.5
        s.rounding += (rounding - s.rounding) * 0.5
        # Active means "the mouth is not at rest": a VAD false alarm on quiet noise leaves the
        # target at 0 and so costs no engine work.
        active = s.openness > REST
        if not active:
            s.openness = s.width = s.rounding = 0.0
        params = np.array([s.openness, s.width, s.rounding * s.openness], dtype=np.float32)
        return FrameFeatures(active, params)


def _timbre(span: np.ndarray) -> tuple[float, float]:
    """(width, rounding) from the spectral centroid: bright sounds widen, dark ones round."""
    power = np.abs(np.fft.rfft(span * _HANN)) ** 2
    band = power[_BAND]
    total = float(band.sum())
    if total <= 0:
        return 0.0, 0.0
    centroid = float((band * _FREQS[_BAND]).sum() / total)
    width = min(1.0, max(-1.0, (centroid - 1600.0) / 1200.0))
    rounding = min(1.0, max(0.0, (1000.0 - centroid) / 600.0))
    return width, rounding


# --------------------------------------------------------------------------- rendering
JAW_DROP = 0.3  # lower lip travel at full openness, as a share of the lip-line-to-chin height
CORNER_SHIFT = 0.07  # corner travel at full width/rounding, in mouth widths
INTERIOR = np.array([38, 30, 70], np.float32)  # dark red-brown, BGR
TEETH = np.array([205, 212, 220], np.float32)


@dataclass(frozen=True)
class _Rig:
    """Everything needed to animate one avatar frame, computed once."""

    crop: np.ndarray  # 256x256x3 uint8, read-only
    y0: int
    y1: int
    x0: int
    x1: int
    base_x: np.ndarray  # float32 ROI grid (absolute crop coordinates)
    base_y: np.ndarray
    drop: np.ndarray  # float32 ROI: downward displacement per unit openness (pixels)
    spread: np.ndarray  # float32 ROI: horizontal displacement per unit width (pixels)
    upper_inner: np.ndarray  # float32 [5, 2] points 60..64
    lower_inner: np.ndarray  # float32 [4, 2] points 64, 65, 66, 67 + back to 60
    lower_drop: np.ndarray  # float32 [N] drop of each lower inner point per unit openness
    mouth_width: float


def _build_rig(avatar: Avatar, index: int) -> _Rig:
    crop = face_crop(avatar, index)
    x1, y1, x2, y2 = (float(v) for v in avatar.face_boxes[index])
    scale = np.array([CROP_SIZE / max(x2 - x1, 1.0), CROP_SIZE / max(y2 - y1, 1.0)], np.float32)
    lm = (avatar.landmarks[index] - np.array([x1, y1], np.float32)) * scale
    mouth = lm[48:68]
    width = float(np.linalg.norm(lm[54] - lm[48]))
    cx = float(mouth[:, 0].mean())
    upper_y = float(lm[61:64, 1].mean())  # upper inner lip
    lower_y = float(lm[65:68, 1].mean())  # lower inner lip
    line_y = (upper_y + lower_y) / 2  # where the lips meet
    lip_y = float(lm[57, 1])  # bottom of the lower lip
    chin_y = float(max(lm[8, 1], lip_y + 0.1 * width))
    # The jaw's travel scales with the lower face, not the mouth: a broad smile is not a big jaw.
    travel = JAW_DROP * (chin_y - upper_y)

    # The region that may move: generous around the mouth, down past the chin.
    x0 = int(max(0, math.floor(cx - 1.25 * width)))
    xe = int(min(CROP_SIZE, math.ceil(cx + 1.25 * width)))
    y0 = int(max(0, math.floor(float(lm[33, 1]))))  # the nose tip: nothing above it moves
    ye = int(min(CROP_SIZE, math.ceil(chin_y + travel + 0.5 * width)))
    ys, xs = np.mgrid[y0:ye, x0:xe].astype(np.float32)

    # Vertical profile: 0 above the lip line, 1 from the lower inner lip down to the chin (the
    # lower lip moves as a whole), fading below the chin.
    rise = _smoothstep(upper_y, max(lower_y, upper_y + 2.0), ys)
    fade = 1.0 - _smoothstep(chin_y, chin_y + max(1.3 * travel, 0.35 * width), ys)
    # Horizontal profile: the jaw moves most under the mouth, little at the cheeks.
    side = np.exp(-(((xs - cx) / (0.85 * width)) ** 2))
    taper = _edge_taper(ys.shape, 6)
    drop = (travel * rise * fade * side * taper).astype(np.float32)

    # Corners: a bump centred on each lip corner, pushed outwards (width) or inwards (rounding).
    dist_y = (ys - line_y) / (0.4 * width)
    dist_x = (np.abs(xs - cx) - 0.5 * width) / (0.3 * width)
    around = np.exp(-(dist_y**2) - dist_x**2)
    spread = (CORNER_SHIFT * width * np.sign(xs - cx) * around * taper).astype(np.float32)

    upper = lm[60:65].astype(np.float32)
    lower = lm[[64, 65, 66, 67, 60]].astype(np.float32)
    # How far each lower inner lip point really moves: the field sampled where the point is.
    rows = np.clip(np.round(lower[:, 1]).astype(int) - y0, 0, drop.shape[0] - 1)
    cols = np.clip(np.round(lower[:, 0]).astype(int) - x0, 0, drop.shape[1] - 1)
    lower_drop = drop[rows, cols].astype(np.float32)
    return _Rig(crop, y0, ye, x0, xe, xs, ys, drop, spread, upper, lower, lower_drop, width)


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / max(edge1 - edge0, 1e-6), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _edge_taper(shape: tuple[int, ...], margin: int) -> np.ndarray:
    """1 inside, falling to 0 at the region's border, so the warp never shows an edge."""
    h, w = shape
    ty = np.minimum(np.arange(h), np.arange(h)[::-1]) / margin
    tx = np.minimum(np.arange(w), np.arange(w)[::-1]) / margin
    return np.clip(np.minimum(ty[:, None], tx[None, :]), 0, 1).astype(np.float32)


def render_mouth(rig: _Rig, params: np.ndarray) -> np.ndarray:
    """The face crop with the mouth posed by ``params`` (openness, width, rounding)."""
    openness, width, rounding = (float(v) for v in params)
    out = rig.crop.copy()
    if openness <= 0.0 and abs(width) < 1e-3 and rounding <= 0.0:
        return out
    corners = width * (0.5 + 0.5 * openness) - 1.5 * rounding
    map_y = rig.base_y - rig.drop * openness
    map_x = rig.base_x - rig.spread * corners
    roi = cv2.remap(rig.crop, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    out[rig.y0 : rig.y1, rig.x0 : rig.x1] = roi
    _paint_interior(out, rig, openness, corners)
    return out


def _paint_interior(out: np.ndarray, rig: _Rig, openness: float, corners: float) -> None:
    gap = float(rig.lower_drop.max()) * openness
    if gap < 1.0:
        return
    upper = rig.upper_inner.copy()
    lower = rig.lower_inner.copy()
    lower[:, 1] += rig.lower_drop * openness
    cx = float(upper[:, 0].mean())
    for pts in (upper, lower):  # corners follow the horizontal warp
        pts[:, 0] += np.sign(pts[:, 0] - cx) * CORNER_SHIFT * rig.mouth_width * corners * 0.5
    polygon = np.concatenate([upper, lower[1:-1]])
    x0, y0 = np.floor(polygon.min(axis=0)).astype(int) - 2
    x1, y1 = np.ceil(polygon.max(axis=0)).astype(int) + 3
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, CROP_SIZE), min(y1, CROP_SIZE)
    if x1 <= x0 or y1 <= y0:
        return
    shift = 4  # sub-pixel polygon precision for smooth anti-aliased edges
    local = np.round((polygon - [x0, y0]) * (1 << shift)).astype(np.int32)
    alpha = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(alpha, [local], 255, lineType=cv2.LINE_AA, shift=shift)
    a = (alpha.astype(np.float32) / 255.0)[..., None]
    region = out[y0:y1, x0:x1].astype(np.float32)
    # Darker towards the back of the mouth, a strip of upper teeth under the upper lip.
    rows = np.arange(y1 - y0, dtype=np.float32)[:, None, None]
    top = float(upper[:, 1].min()) - y0
    depth = np.clip((rows - top) / max(gap, 1.0), 0, 1)
    colour = INTERIOR * (1.0 - 0.35 * depth)
    teeth = np.clip(1.0 - (rows - top) / max(0.22 * gap, 1.0), 0, 1) * min(1.0, openness * 1.5)
    colour = colour * (1 - teeth) + TEETH * teeth
    out[y0:y1, x0:x1] = (region * (1 - a) + colour * a).astype(np.uint8)


class LiteEngine(Engine):
    """Weight-free CPU engine; options are accepted for interface symmetry and ignored."""

    name = "lite"

    def __init__(self, **_options: object) -> None:
        self._rigs: dict[tuple[int, int], _Rig] = {}
        self._avatars: dict[int, Avatar] = {}  # keeps rigged avatars alive while their keys are used
        self._lock = threading.Lock()

    def new_featurizer(self) -> LiteFeaturizer:
        return LiteFeaturizer()

    def load_avatar(self, avatar: Avatar) -> None:
        """Rigs are built lazily per frame (a long video avatar would otherwise stall start-up)."""
        with self._lock:
            self._avatars[id(avatar)] = avatar

    def _rig(self, avatar: Avatar, index: int) -> _Rig:
        key = (id(avatar), index)
        rig = self._rigs.get(key)
        if rig is None:
            rig = _build_rig(avatar, index)
            with self._lock:
                self._avatars[id(avatar)] = avatar
                self._rigs[key] = rig
        return rig

    def generate(self, requests: Sequence[FrameRequest]) -> list[np.ndarray]:
        return [render_mouth(self._rig(r.avatar, r.frame_index), r.features) for r in requests]

    def close(self) -> None:
        with self._lock:
            self._rigs.clear()
            self._avatars.clear()
