"""The weight-free ``lite`` engine: mouth motion from loudness and spectrum, drawn by warping.

Why it exists: the whole server must run and be testable on any CPU with no model weights. It is
not a lip reader; it makes the mouth open with the voice, close in silence, and widen or round a
little with the colour of the sound, without flicker and without touching the rest of the face.

Features (per stream, :class:`LiteFeaturizer`), float32 ``[openness 0..1, width -1..1,
rounding 0..1]`` per video frame, all from the frame's own 40 ms of audio (the span the frame is on
screen, so the mouth never opens before the sound does):

- *openness*: the RMS level (dBFS) placed between an adaptive floor and an adaptive speaker peak,
  through a power curve (vowels open wide, the consonant dips between them still show). The peak
  follows the speaker (fast up; down with a ~0.3 s time constant during the first second of
  sound, ~1.3 s after that; only on frames that carry sound), so a quiet and a loud speaker both
  open fully within a second or two; it starts at a typical speech level so that a faint first
  consonant does not open the mouth wide. The floor is
  the highest of ``peak - 24 dB``, a noise level + 10 dB (tracked on non-speech frames, and the
  quietest frame of the last 3 s), and -50 dBFS, so room noise keeps the mouth shut even when
  webrtcvad mistakes it for speech (it does, for hum and rumble).
- *width* / *rounding* from band energies: energy at 1.5-4 kHz with little at 0.7-1.5 kHz is a
  front vowel's high second formant ('ee': wide); energy concentrated under 700 Hz is a back
  rounded vowel ('oo': narrow, rounded). Weighted by how voiced the frame is, so fricatives leave
  the shape neutral.
- webrtcvad gates everything (no speech: the target is a closed mouth), then causal smoothing:
  a one-pole filter with a fast attack and a slower release plus a minimum closing step (rest is
  reached in bounded time), every step clamped to :data:`MAX_STEP`.
- ``active`` means "the mouth is off rest": once closed and silent, frames cost nothing, and a VAD
  false alarm that leaves the target at 0 costs nothing either.

Rendering (:class:`LiteEngine`): everything happens on the 256x256 face crop, in a frame aligned
with the mouth (``u`` from corner to corner, ``v`` perpendicular, down), so head roll is handled.
Per avatar frame a small *rig* is precomputed once: a region of interest (mouth, chin, lower
cheeks) and three displacement basis fields over it. A frame is then

    backward displacement = g * (lens(u) * Lmix + Bfix) * e_v  +  k * Fu * e_u

applied by one ``cv2.remap`` of that region, followed by an analytic, anti-aliased fill of the gap
between the lips. The field is defined directly in *output* coordinates (a backward map), which
makes the gap exact by construction: an output pixel just below the lip line whose source lies
above it is inside the opened mouth, and is painted. So the avatar's own lips and teeth stay
visible around the opening (the demo avatar smiles with her teeth showing; filling the polygon
between the inner lips would paint over them). ``g`` (the lip gap, from openness, scaled by the
nose-to-chin height, not the mouth width: a broad smile is not a big jaw) lowers the lower lip by
``g * lens(u)`` (0 at the mouth corners, which stay closed), carries the chin with a broad profile
that fades to zero before the crop's bottom edge and the cheeks, and lifts the upper lip a little.
Nothing moves above the nose, so the compositor's mask edge never shows a seam. ``k`` (from width
and rounding) stretches or squeezes the mouth horizontally about its centre.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import cv2
import numpy as np

from pipeline.audio.windows import SAMPLE_RATE, SAMPLES_PER_FRAME, WINDOW_BEFORE, AudioFrame
from pipeline.avatar.model import CROP_SIZE, Avatar
from pipeline.compositor import face_crop
from pipeline.engines.base import Engine, Featurizer, FrameFeatures, FrameRequest

# ---------------------------------------------------------------------------------------------
# Featurizer

#: Analysed part of each window: the frame's own 40 ms, [t, t + 40 ms).
SPAN = slice(WINDOW_BEFORE, WINDOW_BEFORE + SAMPLES_PER_FRAME)

ABS_FLOOR_DB = -50.0  # below this nothing is speech, whatever the VAD says
DYNAMIC_RANGE_DB = 24.0  # openness spans [peak - 24 dB, peak] at most
NOISE_MARGIN_DB = 10.0  # the floor sits this far above the tracked noise
MIN_SPAN_DB = 12.0  # the peak is kept at least this far above the floor
PEAK_INIT_DB = -22.0  # a typical normalised speech level, until the speaker is heard
PEAK_UP = 0.3  # per frame, towards a louder frame
PEAK_DOWN = 0.03  # per sounding frame, towards a quieter one (~1.3 s time constant)
PEAK_DOWN_FIRST = 0.12  # ... during the first second of a stream's sound: meet a quiet speaker fast
FIRST_FRAMES = 25
NOISE_INIT_DB = -65.0
NOISE_FOLLOW = 0.2  # per non-speech frame
NOISE_CREEP_DB = 0.05  # per speech frame: the noise estimate may only creep up while someone talks
RECENT_FRAMES = 75  # 3 s of frame levels: their minimum is a noise level the VAD cannot fool
SILENCE_DB = -100.0

OPEN_ATTACK = 0.6
OPEN_RELEASE = 0.45
OPEN_CURVE = 1.6  # level share -> openness exponent
SHAPE_RATE = 0.4
MIN_CLOSE_STEP = 0.04  # the release never crawls: rest is reached in bounded time
MIN_SHAPE_STEP = 0.03
MAX_STEP = 0.3  # no parameter moves more than this between two frames
REST = 0.02  # all parameters under this: the mouth is at rest and the frame is inactive

_FREQS = np.fft.rfftfreq(SAMPLES_PER_FRAME, 1.0 / SAMPLE_RATE)
_LOW = (_FREQS >= 150) & (_FREQS < 700)
_MID = (_FREQS >= 700) & (_FREQS < 1500)
_HIGH = (_FREQS >= 1500) & (_FREQS < 4000)
_HANN = np.hanning(SAMPLES_PER_FRAME).astype(np.float32)


def _smoothstep(x: np.ndarray | float) -> Any:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


@dataclass(frozen=True)
class FrameAnalysis:
    """Raw per-frame measurements, before normalisation and smoothing."""

    level_db: float
    low: float  # shares of the 150 Hz - 4 kHz energy
    mid: float
    high: float
    voicing: float  # share of all energy that lies in 150 Hz - 4 kHz


def analyse(window: np.ndarray) -> FrameAnalysis:
    """Level and band shares of the frame's own 40 ms of one audio window."""
    seg = np.asarray(window, dtype=np.float32)[SPAN]
    rms = float(np.sqrt(np.mean(seg.astype(np.float64) ** 2)))
    level = max(20.0 * np.log10(rms), SILENCE_DB) if rms > 0 else SILENCE_DB
    power = np.abs(np.fft.rfft(seg * _HANN)) ** 2
    low, mid, high = float(power[_LOW].sum()), float(power[_MID].sum()), float(power[_HIGH].sum())
    voiced = low + mid + high
    total = float(power.sum())
    if voiced <= 1e-12 or total <= 1e-12:
        return FrameAnalysis(level, 0.0, 0.0, 0.0, 0.0)
    return FrameAnalysis(level, low / voiced, mid / voiced, high / voiced, voiced / total)


def shape_targets(a: FrameAnalysis) -> tuple[float, float]:
    """(width, rounding) a frame's spectrum suggests; neutral for unvoiced frames."""
    spread = float(np.clip((a.high - 0.10) / 0.15, -1.0, 1.0)) * (1.0 - a.mid)
    rounding = float(np.clip((0.10 - a.high) / 0.08, 0.0, 1.0) * np.clip((0.35 - a.mid) / 0.2, 0.0, 1.0))
    return spread * a.voicing, rounding * a.voicing


def _approach(cur: float, target: float, rate_up: float, rate_down: float, min_down: float) -> float:
    """One smoothing step: proportional, at least ``min_down`` when falling, at most MAX_STEP."""
    diff = target - cur
    if diff >= 0:
        return cur + min(rate_up * diff, MAX_STEP)
    return cur - min(max(rate_down * -diff, min_down), -diff, MAX_STEP)


def _approach_signed(cur: float, target: float) -> float:
    """Smoothing for a signed parameter: towards zero like a release, away from it like an attack."""
    diff = target - cur
    if abs(target) < abs(cur) or target * cur < 0:
        step = min(max(SHAPE_RATE * abs(diff), MIN_SHAPE_STEP), abs(diff), MAX_STEP)
        return cur + (step if diff > 0 else -step)
    return cur + float(np.clip(SHAPE_RATE * diff, -MAX_STEP, MAX_STEP))


@dataclass
class MouthState:
    """A stream's smoothed mouth and its level trackers."""

    openness: float = 0.0
    width: float = 0.0
    rounding: float = 0.0
    peak_db: float = PEAK_INIT_DB
    noise_db: float = NOISE_INIT_DB
    sounding_frames: int = 0  # speech frames above the floor so far
    recent_db: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_FRAMES))

    @property
    def floor_db(self) -> float:
        """Level at which the mouth starts to open.

        Two noise estimates: levels of frames the VAD calls non-speech, and the quietest frame of
        the last 3 s (speech always has quieter moments within 3 s; steady noise does not). The
        second catches noise the VAD takes for speech, from a stream's very first frame.
        """
        noise = max(self.noise_db, min(self.recent_db, default=SILENCE_DB))
        return max(self.peak_db - DYNAMIC_RANGE_DB, noise + NOISE_MARGIN_DB, ABS_FLOOR_DB)


class LiteFeaturizer(Featurizer):
    """Audio frames -> smoothed mouth parameters ``float32 [openness, width, rounding]``."""

    def __init__(self) -> None:
        self.state = MouthState()

    def reset(self) -> None:
        self.state = MouthState()

    def features(self, frames: Sequence[AudioFrame]) -> list[FrameFeatures]:
        return [self._step(frame) for frame in frames]

    def _step(self, frame: AudioFrame) -> FrameFeatures:
        s = self.state
        a = analyse(frame.window)
        _track_levels(s, a.level_db, frame.speech)
        floor = s.floor_db
        if frame.speech and a.level_db > floor:
            span = max(s.peak_db - floor, MIN_SPAN_DB)
            # A power curve: vowels open wide, the dips of consonants between them show.
            target_open = float(np.clip((a.level_db - floor) / span, 0.0, 1.0)) ** OPEN_CURVE
            width_t, round_t = shape_targets(a)
            presence = min(1.0, 3.0 * target_open)  # near-silent frames keep a neutral shape
            width_t, round_t = width_t * presence, round_t * presence
        else:
            target_open = width_t = round_t = 0.0
        s.openness = _approach(s.openness, target_open, OPEN_ATTACK, OPEN_RELEASE, MIN_CLOSE_STEP)
        s.width = _approach_signed(s.width, width_t)
        s.rounding = _approach(s.rounding, round_t, SHAPE_RATE, SHAPE_RATE, MIN_SHAPE_STEP)
        active = max(s.openness, abs(s.width), s.rounding) > REST
        if not active:
            s.openness = s.width = s.rounding = 0.0
        params = np.array([s.openness, s.width, s.rounding], dtype=np.float32)
        return FrameFeatures(active=active, data=params)


def _track_levels(s: MouthState, level: float, speech: bool) -> None:
    """Noise level from non-speech frames; the speaker's peak from speech frames that carry sound."""
    s.recent_db.append(level)
    if not speech:
        s.noise_db += NOISE_FOLLOW * (level - s.noise_db)
    elif level > SILENCE_DB:
        s.noise_db = min(level, s.noise_db + NOISE_CREEP_DB)
    if speech and level > max(s.noise_db + NOISE_MARGIN_DB, ABS_FLOOR_DB):
        down = PEAK_DOWN_FIRST if s.sounding_frames < FIRST_FRAMES else PEAK_DOWN
        s.peak_db += (PEAK_UP if level > s.peak_db else down) * (level - s.peak_db)
        s.sounding_frames += 1
    s.peak_db = max(s.peak_db, s.noise_db + NOISE_MARGIN_DB + MIN_SPAN_DB, ABS_FLOOR_DB + MIN_SPAN_DB)


# ---------------------------------------------------------------------------------------------
# Renderer

GAP_PER_FACE = 0.30  # lip gap at openness 1, as a share of the nose-to-chin distance
UPPER_LIFT = 0.15  # the upper lip rises by this share of the gap
WIDTH_GAIN = 0.10  # horizontal stretch of the mouth at width +1
ROUND_GAIN = 0.14  # horizontal squeeze at rounding 1
BORDER_FADE = 8.0  # px: displacement is zero at the crop's edges
INTERIOR_TOP = np.array([48, 42, 98], dtype=np.float32)  # BGR, just under the upper lip
INTERIOR_BOTTOM = np.array([18, 14, 34], dtype=np.float32)  # BGR, deep in the mouth
TEETH = np.array([178, 188, 198], dtype=np.float32)
DEFAULT_CACHE_FRAMES = 256


@dataclass
class MouthRig:
    """Per-avatar-frame precomputation: the crop, the mouth frame and the basis fields on the ROI."""

    crop: np.ndarray  # uint8 [256, 256, 3], read-only
    roi: tuple[int, int, int, int]  # x0, y0, x1, y1 in crop pixels (exclusive end)
    xs: np.ndarray  # float32 [1, w]: crop x of the ROI columns
    ys: np.ndarray  # float32 [h, 1]
    e_u: tuple[float, float]  # unit vector along the mouth (right corner direction)
    e_v: tuple[float, float]  # unit vector perpendicular, pointing down the face
    ur: np.ndarray  # (u - centre) / inner half-width
    dv: np.ndarray  # signed distance below the lip line (px)
    lmix: np.ndarray  # lens-shaped part of the vertical field (per unit gap)
    bfix: np.ndarray  # broad jaw part of the vertical field (per unit gap)
    fu: np.ndarray  # horizontal stretch field (px per unit k)
    gap_max: float  # lip gap in px at openness 1
    paint: tuple[int, int, int, int]  # sub-ROI (r0, r1, c0, c1) where the mouth can open
    landmarks: np.ndarray  # float32 [68, 2] in crop pixels


def crop_landmarks(avatar: Avatar, frame_index: int) -> np.ndarray:
    """The frame's landmarks in 256x256 face-crop pixels (the crop is an anisotropic resize)."""
    x1, y1, x2, y2 = (float(v) for v in avatar.face_boxes[frame_index])
    scale = np.array([CROP_SIZE / max(x2 - x1, 1.0), CROP_SIZE / max(y2 - y1, 1.0)], dtype=np.float32)
    lm = np.asarray(avatar.landmarks[frame_index], dtype=np.float32)
    return (lm - np.array([x1, y1], dtype=np.float32)) * scale


def build_rig(crop: np.ndarray, lm: np.ndarray) -> MouthRig:
    """Precompute the mouth-aligned coordinates and displacement basis for one crop."""
    lm = lm.astype(np.float64)
    left, right = lm[48], lm[54]
    axis = right - left
    mouth_w = float(np.hypot(*axis))
    if mouth_w < 4.0:  # degenerate landmarks: a tiny horizontal mouth at the usual place
        left, right = np.array([100.0, 190.0]), np.array([156.0, 190.0])
        axis, mouth_w = right - left, 56.0
    e_u = axis / mouth_w
    e_v = np.array([-e_u[1], e_u[0]])
    origin = (left + right) / 2.0
    hw = mouth_w / 2.0

    def to_uv(p: np.ndarray) -> tuple[float, float]:
        d = np.asarray(p) - origin
        return float(d @ e_u), float(d @ e_v)

    # Lip line: midline between the inner lips, from corner to corner.
    mids = [lm[48], lm[60], (lm[61] + lm[67]) / 2, (lm[62] + lm[66]) / 2, (lm[63] + lm[65]) / 2, lm[64], lm[54]]
    line = sorted(to_uv(p) for p in mids)
    line_u = np.array([p[0] for p in line])
    line_v = np.array([p[1] for p in line])
    u60, u64 = to_uv(lm[60])[0], to_uv(lm[64])[0]
    uc, hw_in = (u60 + u64) / 2.0, max(abs(u64 - u60) / 2.0, 2.0)
    v_line_c = float(np.interp(uc, line_u, line_v))
    v_nose = to_uv(lm[33])[1]
    v_chin = to_uv(lm[8])[1]
    v_lower_lip = to_uv(lm[57])[1]
    up_dist = max(v_line_c - v_nose, 4.0)  # lip line to nose base
    gap_max = GAP_PER_FACE * max(v_chin - v_nose, 8.0)
    s_jaw = max(1.5 * gap_max, 1.2 * (v_lower_lip - v_line_c), 4.0)  # lip -> jaw profile blend

    roi = _roi(origin, e_u, e_v, uc, hw, v_line_c - up_dist - 2.0)
    x0, y0, x1, y1 = roi
    xs = np.arange(x0, x1, dtype=np.float32)[None, :]
    ys = np.arange(y0, y1, dtype=np.float32)[:, None]
    dx, dy = xs - np.float32(origin[0]), ys - np.float32(origin[1])
    u = dx * np.float32(e_u[0]) + dy * np.float32(e_u[1])
    v = dx * np.float32(e_v[0]) + dy * np.float32(e_v[1])
    line_at = np.interp(u, line_u, line_v)
    dv = (v - line_at).astype(np.float32)
    # Room above the lip line, per column: nothing may move at or above the nose base.
    room_up = np.maximum(line_at - v_nose, 2.0)
    ur = ((u - uc) / hw_in).astype(np.float32)

    # Vertical fade: full motion down to halfway between lip line and chin, zero at the crop bottom.
    bottom = CROP_SIZE - 2.0
    fade_from = min(float(origin[1] + e_v[1] * (v_line_c + 0.45 * (v_chin - v_line_c))), bottom - 8.0)
    fade = 1.0 - _smoothstep((ys - fade_from) / (bottom - fade_from))
    edge = _smoothstep(np.minimum(xs, CROP_SIZE - 1 - xs) / BORDER_FADE) * _smoothstep(
        np.minimum(ys, CROP_SIZE - 1 - ys) / BORDER_FADE
    )
    fade = fade * edge
    below = dv >= 0
    r = _smoothstep(dv / s_jaw)
    broad = 1.0 - _smoothstep((np.abs(u - uc) - hw) / (1.2 * hw))
    fade_up = 1.0 - _smoothstep(-dv / room_up)
    lmix = np.where(below, (1.0 - r) * fade, -UPPER_LIFT * fade_up * edge).astype(np.float32)
    bfix = np.where(below, broad * r * fade, 0.0).astype(np.float32)

    # Horizontal stretch: linear across the mouth, back to zero at twice the half-width.
    uu = u - uc
    au = np.abs(uu)
    phi = np.where(au <= hw, uu, np.sign(uu) * hw * (1.0 - _smoothstep((au - hw) / hw)))
    lip_band = max(v_lower_lip - v_line_c, 4.0) + 0.5 * gap_max
    v_mask = np.where(below, 1.0 - _smoothstep((dv - lip_band) / lip_band), fade_up)
    fu = (phi * v_mask * np.where(below, fade, edge)).astype(np.float32)

    paint = _paint_box(ur, dv, gap_max)
    return MouthRig(
        crop=crop,
        roi=roi,
        xs=xs,
        ys=ys,
        e_u=(float(e_u[0]), float(e_u[1])),
        e_v=(float(e_v[0]), float(e_v[1])),
        ur=ur,
        dv=dv,
        lmix=lmix,
        bfix=bfix,
        fu=fu,
        gap_max=float(gap_max),
        paint=paint,
        landmarks=lm.astype(np.float32),
    )


def _roi(
    origin: np.ndarray, e_u: np.ndarray, e_v: np.ndarray, uc: float, hw: float, v_top: float
) -> tuple[int, int, int, int]:
    """Bounding box (clipped to the crop) of the mouth-frame rectangle the fields live in."""
    u_lo, u_hi = uc - 2.2 * hw - 2.0, uc + 2.2 * hw + 2.0
    v_hi = 2.0 * CROP_SIZE  # down to (and past) the crop's bottom edge
    pts = [origin + a * e_u + b * e_v for a in (u_lo, u_hi) for b in (v_top, v_hi)]
    xs_, ys_ = [p[0] for p in pts], [p[1] for p in pts]
    x0 = int(np.clip(np.floor(min(xs_)), 0, CROP_SIZE - 1))
    x1 = int(np.clip(np.ceil(max(xs_)) + 1, x0 + 1, CROP_SIZE))
    y0 = int(np.clip(np.floor(min(ys_)), 0, CROP_SIZE - 1))
    y1 = int(np.clip(np.ceil(max(ys_)) + 1, y0 + 1, CROP_SIZE))
    return x0, y0, x1, y1


def _paint_box(ur: np.ndarray, dv: np.ndarray, gap_max: float) -> tuple[int, int, int, int]:
    """Rows/cols of the ROI where the opened mouth can appear (lens support, gap height)."""
    margin = 1.0 / (1.0 - ROUND_GAIN)  # the lens widens when the mouth is stretched
    lim = gap_max * (1.0 + WIDTH_GAIN + ROUND_GAIN) * 1.2 + 2.0
    inside = (np.abs(ur) < margin * (1.0 + WIDTH_GAIN) + 0.05) & (dv > -UPPER_LIFT * lim - 2.0) & (dv < lim)
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if len(rows) == 0:
        return 0, 0, 0, 0
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def render_mouth(rig: MouthRig, params: np.ndarray) -> np.ndarray:
    """The rig's crop with the mouth set to ``params`` (openness, width, rounding); a new array."""
    openness = float(np.clip(params[0], 0.0, 1.0))
    width = float(np.clip(params[1], -1.0, 1.0))
    rounding = float(np.clip(params[2], 0.0, 1.0))
    k = WIDTH_GAIN * width - ROUND_GAIN * rounding
    g = rig.gap_max * openness * (1.0 - 0.2 * max(width, 0.0)) * (1.0 + 0.15 * rounding)
    out = np.array(rig.crop, copy=True)
    if g < 0.05 and abs(k) < 1e-3:
        return out  # rest: exactly the input crop
    x0, y0, x1, y1 = rig.roi
    q = rig.ur * np.float32(1.0 / (1.0 + k))
    lens = np.sqrt(np.clip(1.0 - q * q, 0.0, 1.0))
    bv = lens * rig.lmix
    bv += rig.bfix
    bv *= np.float32(g)
    bu = rig.fu * np.float32(k)
    map_x = rig.xs - (bu * np.float32(rig.e_u[0]) + bv * np.float32(rig.e_v[0]))
    map_y = rig.ys - (bu * np.float32(rig.e_u[1]) + bv * np.float32(rig.e_v[1]))
    roi = cv2.remap(rig.crop, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if g >= 0.05:
        _paint_interior(roi, rig, bv, lens, g, openness)
    out[y0:y1, x0:x1] = roi
    return out


def _paint_interior(
    roi: np.ndarray, rig: MouthRig, bv: np.ndarray, lens: np.ndarray, g: float, openness: float
) -> None:
    """Fill the gap between the lips (dark, shaded, a hint of upper teeth), anti-aliased.

    The gap in output coordinates is ``[bv, 0]`` above the lip line and ``[0, bv]`` below it
    (pixels there sample from across the line); coverage is the share of each pixel's vertical
    extent inside that interval, which anti-aliases both lip edges for free. Colour work is done
    only on the bounding box of non-zero coverage (a fraction of the precomputed paint box).
    """
    r0, r1, c0, c1 = rig.paint
    if r1 <= r0 or c1 <= c0:
        return
    dv = rig.dv[r0:r1, c0:c1]
    b = bv[r0:r1, c0:c1]
    cov = np.clip(np.minimum(dv + 0.5, np.maximum(b, 0.0)) - np.maximum(dv - 0.5, 0.0), 0.0, 1.0)
    cov += np.clip(np.minimum(dv + 0.5, 0.0) - np.maximum(dv - 0.5, np.minimum(b, 0.0)), 0.0, 1.0)
    rows, cols = np.flatnonzero(cov.any(axis=1)), np.flatnonzero(cov.any(axis=0))
    if len(rows) == 0:
        return
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    cov, dv = cov[y0:y1, x0:x1], dv[y0:y1, x0:x1]
    ln = lens[r0 + y0 : r0 + y1, c0 + x0 : c0 + x1]
    # Position inside the gap: 0 under the upper lip, 1 on the lower lip.
    t = np.clip((dv + np.float32(UPPER_LIFT * g) * ln) / (np.float32(g * (1.0 + UPPER_LIFT)) * ln + 1e-3), 0, 1)
    shade = 0.45 + 0.55 * ln  # darker towards the corners
    teeth = (np.float32(0.8 * _smoothstep((openness - 0.25) / 0.35)) * ln) * (1.0 - _smoothstep((t - 0.10) / 0.12))
    dark = (shade * (1.0 - teeth))[:, :, None]
    colour = (INTERIOR_TOP + (INTERIOR_BOTTOM - INTERIOR_TOP) * t[:, :, None]) * dark
    colour += (shade * teeth)[:, :, None] * TEETH
    a = cov[:, :, None]
    patch = roi[r0 + y0 : r0 + y1, c0 + x0 : c0 + x1]
    patch[...] = (patch * (1.0 - a) + colour * a + 0.5).clip(0, 255).astype(np.uint8)


class LiteEngine(Engine):
    """Weight-free CPU engine (see the module docstring); thread-safe, shares rigs across sessions."""

    name: ClassVar[str] = "lite"

    def __init__(self, cache_frames: int = DEFAULT_CACHE_FRAMES, **_options: object) -> None:
        """``cache_frames`` bounds the rig cache (~0.5 MB per avatar frame); other options are
        accepted for interface symmetry with the other engines and ignored (no weights, CPU only)."""
        self._max_rigs = max(1, int(cache_frames))
        self._rigs: OrderedDict[tuple[int, int], tuple[weakref.ref[Avatar], MouthRig]] = OrderedDict()
        self._lock = threading.Lock()

    def new_featurizer(self) -> LiteFeaturizer:
        return LiteFeaturizer()

    def load_avatar(self, avatar: Avatar) -> None:
        """Check the avatar has what the rig needs and warm its first frame (rigs are lazy)."""
        if avatar.landmarks.ndim != 3 or avatar.landmarks.shape[1:] != (68, 2):
            raise ValueError(f"avatar {avatar.id!r}: the lite engine needs 68 landmarks per frame")
        if avatar.frame_count:
            self.rig(avatar, 0)

    def rig(self, avatar: Avatar, frame_index: int) -> MouthRig:
        """The (cached) rig of one avatar frame; the cache is a bounded LRU keyed by identity."""
        key = (id(avatar), int(frame_index))
        with self._lock:
            hit = self._rigs.get(key)
            if hit is not None and hit[0]() is avatar:
                self._rigs.move_to_end(key)
                return hit[1]
        rig = build_rig(face_crop(avatar, frame_index), crop_landmarks(avatar, frame_index))
        with self._lock:
            self._rigs[key] = (weakref.ref(avatar), rig)
            self._rigs.move_to_end(key)
            while len(self._rigs) > self._max_rigs:
                self._rigs.popitem(last=False)
        return rig

    def calibration_features(self, n: int) -> list[np.ndarray]:
        """Open, shaped mouths (an open mouth costs the interior fill; a closed one less)."""
        rng = np.random.default_rng(0)
        return [
            np.array([rng.uniform(0.4, 1.0), rng.uniform(-0.6, 0.6), rng.uniform(0.0, 0.6)], dtype=np.float32)
            for _ in range(n)
        ]

    def generate(self, requests: Sequence[FrameRequest]) -> list[np.ndarray]:
        return [render_mouth(self.rig(r.avatar, r.frame_index), _params(r.features)) for r in requests]

    def close(self) -> None:
        with self._lock:
            self._rigs.clear()


def _params(features: Any) -> np.ndarray:
    data = features.data if isinstance(features, FrameFeatures) else features
    arr = np.asarray(data, dtype=np.float32).reshape(-1)
    if arr.shape[0] < 1:
        raise ValueError("lite features must be [openness, width, rounding]")
    out = np.zeros(3, dtype=np.float32)
    out[: min(3, arr.shape[0])] = arr[:3]
    return out
