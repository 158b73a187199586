"""The lite engine: features close in silence and noise, open with speech of any loudness without
flicker, close again and go inactive; the warp is the identity at rest, opens a dark mouth, and
moves nothing above the nose (also for a tilted head)."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from pipeline.audio.windows import SAMPLES_PER_FRAME, FrameWindower
from pipeline.avatar.geometry import frame_geometry
from pipeline.avatar.model import Avatar
from pipeline.compositor import face_crop
from pipeline.engines.base import FrameRequest
from pipeline.engines.lite import MAX_STEP, LiteEngine, LiteFeaturizer, crop_landmarks
from pipeline.engines.registry import create_engine
from tests.speech import espeak

SENTENCE = "Open wide and say ah, then close again."


def frames_of(audio: np.ndarray):
    windower = FrameWindower()
    return windower.push(audio) + windower.finish()


def run(audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(params [N, 3], active [N]) of a fresh featurizer over ``audio`` (16 kHz)."""
    feats = LiteFeaturizer().features(frames_of(audio))
    return np.array([f.data for f in feats]), np.array([f.active for f in feats])


@pytest.fixture(scope="module")
def sentence() -> np.ndarray:
    speech, _ = espeak(SENTENCE, sample_rate=16000)
    return speech


def with_silence(speech: np.ndarray) -> tuple[np.ndarray, int, int]:
    """1 s of silence, the speech, 1 s of silence; and the speech's first/last frame."""
    silence = np.zeros(16000, np.float32)
    return np.concatenate([silence, speech, silence]), 25, 25 + len(speech) // SAMPLES_PER_FRAME


def brown_noise(db: float, seconds: float, seed: int = 0) -> np.ndarray:
    """Rumble-like noise at ``db`` dBFS RMS; webrtcvad takes a fifth of it at -40 dBFS for speech."""
    rng = np.random.default_rng(seed)
    y = np.cumsum(rng.standard_normal(int(seconds * 16000)))
    y -= np.convolve(y, np.ones(400) / 400, "same")
    return (y / y.std() * 10 ** (db / 20)).astype(np.float32)


# ------------------------------------------------------------------------------------ features


def test_closed_and_inactive_in_silence_and_low_noise() -> None:
    rng = np.random.default_rng(0)
    for audio in (np.zeros(16000, np.float32), (rng.standard_normal(32000) * 0.002).astype(np.float32)):
        params, active = run(audio)
        assert params.shape[1] == 3 and params.dtype == np.float32
        assert np.abs(params).max() < 0.01 and not active.any()


@pytest.mark.parametrize("db", [-40, -30])
def test_vad_false_alarms_on_noise_keep_the_mouth_shut(db: float) -> None:
    noise = brown_noise(db, 5.0)
    speech_flags = np.array([f.speech for f in frames_of(noise)])
    assert speech_flags.mean() > 0.1, "the premise: webrtcvad calls some of this noise speech"
    params, active = run(noise)
    assert np.abs(params).max() == 0.0 and not active.any()


def test_speech_over_noise_still_opens(sentence: np.ndarray) -> None:
    audio, start, end = with_silence(sentence)
    opened = run(audio + brown_noise(-40, len(audio) / 16000, seed=1))[0][:, 0]
    assert opened[:start].max() == 0.0
    assert opened[start:end].max() > 0.6 and (opened[start:end] > 0.3).mean() > 0.3


def test_opens_with_speech_without_flicker_and_closes_after(sentence: np.ndarray) -> None:
    audio, start, end = with_silence(sentence)
    params, active = run(audio)
    opened = params[:, 0]
    assert opened[:start].max() < 0.01 and not active[: start - 2].any(), "not before the sound"
    assert opened[start:end].max() > 0.6 and (opened[start:end] > 0.3).mean() > 0.3
    assert np.abs(np.diff(params, axis=0)).max() <= MAX_STEP + 1e-6 < 0.35, "no jumps"
    assert np.abs(np.diff(opened, 2)).max() < 2 * MAX_STEP + 1e-6, "no open-close-open flicker"
    assert not active[end + 8 :].any(), "inactive again within ~0.3 s after speech"
    assert np.abs(params[end + 8 :]).max() == 0.0


@pytest.mark.parametrize("gain", [0.1, 2.5])
def test_quiet_and_loud_speakers_both_open(sentence: np.ndarray, gain: float) -> None:
    audio, start, end = with_silence(np.clip(sentence * gain, -1, 1))
    opened = run(audio)[0][:, 0]
    assert opened[start:end].max() > 0.6
    assert (opened[start:end] > 0.3).mean() > 0.3


def test_spectrum_sets_width_and_rounding() -> None:
    def mean_shape(text: str) -> tuple[float, float]:
        speech, _ = espeak(text, sample_rate=16000)
        params, active = run(speech)
        return float(params[active, 1].mean()), float(params[active, 2].mean())

    ee_width, ee_round = mean_shape("ee ee ee, see me")
    oo_width, oo_round = mean_shape("oo oo oo, who knew")
    assert ee_width > oo_width + 0.2, "front vowels are wider"
    assert oo_round > ee_round + 0.1, "back rounded vowels are rounder"


def test_batching_does_not_change_features(sentence: np.ndarray) -> None:
    frames = frames_of(sentence)
    whole = LiteFeaturizer().features(frames)
    featurizer = LiteFeaturizer()
    one_by_one = [f for frame in frames for f in featurizer.features([frame])]
    assert [f.active for f in whole] == [f.active for f in one_by_one]
    np.testing.assert_array_equal(np.array([f.data for f in whole]), np.array([f.data for f in one_by_one]))


def test_reset_returns_to_rest(sentence: np.ndarray) -> None:
    frames = frames_of(sentence)
    featurizer = LiteFeaturizer()
    mid = len(frames) // 2
    assert featurizer.features(frames[:mid])[-1].active
    featurizer.reset()
    assert featurizer.state.openness == 0.0
    # After a reset the stream behaves exactly like a fresh one.
    again = featurizer.features(frames)
    fresh = LiteFeaturizer().features(frames)
    np.testing.assert_array_equal(np.array([f.data for f in again]), np.array([f.data for f in fresh]))


# ------------------------------------------------------------------------------------ rendering


def mouth_box(avatar: Avatar, index: int = 0) -> tuple[int, int, int, int]:
    mouth = crop_landmarks(avatar, index)[48:68]
    (x1, y1), (x2, y2) = mouth.min(axis=0).astype(int), mouth.max(axis=0).astype(int)
    return x1, y1, x2, y2


def test_engine_is_registered_and_shapes(demo_avatar: Avatar) -> None:
    engine = create_engine("lite")
    assert isinstance(engine, LiteEngine) and engine.name == "lite"
    engine.load_avatar(demo_avatar)
    params = [np.array([o, w, r], np.float32) for o, w, r in [(0, 0, 0), (0.5, 0.2, 0), (1, -1, 1)]]
    out = engine.generate([FrameRequest(demo_avatar, 0, p) for p in params])
    assert len(out) == 3 and all(o.shape == (256, 256, 3) and o.dtype == np.uint8 for o in out)
    singles = [engine.generate([FrameRequest(demo_avatar, 0, p)])[0] for p in params]
    for batched, single in zip(out, singles, strict=True):
        np.testing.assert_array_equal(batched, single)  # requests in a batch are independent


def test_warp_moves_the_mouth_only(demo_avatar: Avatar) -> None:
    engine = LiteEngine()
    engine.load_avatar(demo_avatar)
    crop = face_crop(demo_avatar, 0)
    before = crop.copy()
    rest, wide = engine.generate([
        FrameRequest(demo_avatar, 0, np.zeros(3, np.float32)),
        FrameRequest(demo_avatar, 0, np.array([1.0, 0.3, 0.0], np.float32)),
    ])
    np.testing.assert_array_equal(rest, crop)  # identity at rest
    np.testing.assert_array_equal(crop, before)  # the cached crop is never drawn on
    mx1, my1, mx2, my2 = mouth_box(demo_avatar)
    diff = np.abs(wide.astype(int) - crop.astype(int))
    assert diff[my1:my2, mx1:mx2].mean() > 25, "the open mouth differs clearly"
    nose_y = int(crop_landmarks(demo_avatar, 0)[33, 1])
    assert diff[: nose_y - 1].max() == 0, "nothing above the nose moves"
    assert wide[my1:my2, mx1:mx2].mean() < crop[my1:my2, mx1:mx2].mean() - 10, "a dark mouth interior"


def test_mouth_opens_progressively(demo_avatar: Avatar) -> None:
    engine = LiteEngine()
    mx1, my1, mx2, my2 = mouth_box(demo_avatar)
    grey = [
        cv2.cvtColor(engine.generate([FrameRequest(demo_avatar, 0, np.array([o, 0, 0], np.float32))])[0],
                     cv2.COLOR_BGR2GRAY)[my1 : my2 + 20, mx1:mx2]
        for o in (0.0, 0.1, 0.3, 0.6, 1.0)
    ]  # fmt: skip
    dark = [int((g < 60).sum()) for g in grey]
    assert dark == sorted(dark) and dark[-1] > dark[0] + 500, dark
    # Small steps of openness give small changes (the warp is continuous, no popping).
    small = np.abs(grey[1].astype(int) - grey[0].astype(int)).mean()
    assert small < np.abs(grey[4].astype(int) - grey[0].astype(int)).mean() / 4


def test_width_and_rounding_move_the_corners(demo_avatar: Avatar) -> None:
    engine = LiteEngine()
    wide, narrow = engine.generate([
        FrameRequest(demo_avatar, 0, np.array([0.0, 1.0, 0.0], np.float32)),
        FrameRequest(demo_avatar, 0, np.array([0.0, -0.5, 1.0], np.float32)),
    ])
    crop = face_crop(demo_avatar, 0).astype(int)
    mx1, my1, mx2, my2 = mouth_box(demo_avatar)
    for out in (wide, narrow):
        diff = np.abs(out.astype(int) - crop)
        corners = diff[my1:my2, mx1 - 8 : mx1 + 8].mean() + diff[my1:my2, mx2 - 8 : mx2 + 8].mean()
        assert corners > 4, "the corners move"
        assert diff[: int(crop_landmarks(demo_avatar, 0)[33, 1]) - 1].max() == 0
    assert np.abs(wide.astype(int) - narrow.astype(int))[my1:my2, mx1:mx2].mean() > 3


def rotated_avatar(avatar: Avatar, degrees: float) -> Avatar:
    """The demo avatar with its head rolled by ``degrees`` (frame and landmarks rotated together)."""
    frame = np.array(avatar.frames[0])
    h, w = frame.shape[:2]
    lm = avatar.landmarks[0]
    m = cv2.getRotationMatrix2D(tuple(map(float, lm[30])), degrees, 1.0)
    rotated = cv2.warpAffine(frame, m, (w, h), borderMode=cv2.BORDER_REFLECT)
    lm_r = (np.c_[lm, np.ones(68)] @ m.T).astype(np.float32)
    fb, cb, mask = frame_geometry(lm_r, (w, h))
    return dataclasses.replace(
        avatar, id="rolled", frames=rotated[None], face_boxes=fb[None], crop_boxes=cb[None],
        landmarks=lm_r[None], masks=mask[None], detected=np.ones(1, np.uint8),
    )  # fmt: skip


def test_tilted_head_opens_along_the_face(demo_avatar: Avatar) -> None:
    avatar = rotated_avatar(demo_avatar, 20.0)
    engine = LiteEngine()
    engine.load_avatar(avatar)
    crop = face_crop(avatar, 0)
    out = engine.generate([FrameRequest(avatar, 0, np.array([1.0, 0.0, 0.0], np.float32))])[0]
    diff = np.abs(out.astype(int) - crop.astype(int)).max(axis=2)
    lm = crop_landmarks(avatar, 0)
    e_u = (lm[54] - lm[48]) / np.linalg.norm(lm[54] - lm[48])
    e_v = np.array([-e_u[1], e_u[0]])  # down the (tilted) face
    ys, xs = np.nonzero(diff > 0)
    v = (np.c_[xs, ys] - lm[33]) @ e_v
    assert len(v) > 1000 and v.min() > -1.5, "nothing above the nose base moves, in the face's own frame"
    # The mouth opened: many changed pixels between the lip corners, below the lip line.
    mx1, my1, mx2, my2 = mouth_box(avatar)
    assert diff[my1:my2, mx1:mx2].mean() > 20


def test_rig_cache_is_bounded(demo_avatar: Avatar) -> None:
    frames = np.repeat(np.array(demo_avatar.frames[:1]), 3, axis=0)
    avatar = dataclasses.replace(
        demo_avatar, id="three", frames=frames,
        face_boxes=np.repeat(demo_avatar.face_boxes[:1], 3, axis=0),
        crop_boxes=np.repeat(demo_avatar.crop_boxes[:1], 3, axis=0),
        landmarks=np.repeat(demo_avatar.landmarks[:1], 3, axis=0),
        masks=np.repeat(demo_avatar.masks[:1], 3, axis=0), detected=np.ones(3, np.uint8),
    )  # fmt: skip
    engine = LiteEngine(cache_frames=2)
    p = np.array([0.5, 0, 0], np.float32)
    outs = engine.generate([FrameRequest(avatar, i, p) for i in (0, 1, 2, 0)])
    assert len(engine._rigs) == 2
    np.testing.assert_array_equal(outs[0], outs[3])  # a rebuilt rig renders the same
