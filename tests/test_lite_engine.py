"""The lite engine: features close in silence, open with speech without flicker; the warp moves
the mouth and nothing above the nose; the compositor touches only the face box."""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.audio.windows import FrameWindower
from pipeline.compositor import Compositor, face_crop
from pipeline.engines.base import FrameRequest
from pipeline.engines.lite import LiteEngine, LiteFeaturizer
from tests.speech import espeak


def frames_of(audio: np.ndarray):
    windower = FrameWindower()
    return windower.push(audio) + windower.finish()


def openness(audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats = LiteFeaturizer().features(frames_of(audio))
    return np.array([f.data[0] for f in feats]), np.array([f.active for f in feats])


def test_closed_and_inactive_in_silence_and_noise() -> None:
    rng = np.random.default_rng(0)
    for audio in (np.zeros(16000, np.float32), (rng.standard_normal(16000) * 0.002).astype(np.float32)):
        opened, active = openness(audio)
        assert opened.max() < 0.01 and not active.any()


def test_opens_with_speech_without_flicker_and_closes_after() -> None:
    speech, _ = espeak("Open wide and say ah, then close again.", sample_rate=16000)
    silence = np.zeros(16000, np.float32)
    opened, active = openness(np.concatenate([silence, speech, silence]))
    start, end = 25, 25 + len(speech) // 640
    assert opened[:start].max() < 0.01 and not active[:start - 2].any()
    assert opened[start:end].max() > 0.6 and (opened[start:end] > 0.3).mean() > 0.3
    assert np.abs(np.diff(opened)).max() < 0.8  # attack/release keep it from jumping
    # Inside speech, closing to zero and reopening within one frame would be flicker.
    assert np.abs(np.diff(opened, 2)).max() < 1.2
    assert not active[end + 8 :].any(), "inactive again within ~0.3 s after speech"
    assert opened[end + 8 :].max() == 0.0


def test_reset_returns_to_rest() -> None:
    speech, _ = espeak("ah", sample_rate=16000)
    featurizer = LiteFeaturizer()
    featurizer.features(frames_of(speech))
    featurizer.reset()
    assert featurizer.state.openness == 0.0


def test_warp_moves_the_mouth_only(demo_avatar) -> None:
    engine = LiteEngine()
    engine.load_avatar(demo_avatar)
    rest, wide = engine.generate([
        FrameRequest(demo_avatar, 0, np.zeros(3, np.float32)),
        FrameRequest(demo_avatar, 0, np.array([1.0, 0.3, 0.0], np.float32)),
    ])
    crop = face_crop(demo_avatar, 0)
    assert rest.shape == (256, 256, 3) and rest.dtype == np.uint8
    np.testing.assert_array_equal(rest, crop)  # identity at rest
    x1, y1, x2, y2 = demo_avatar.face_boxes[0]
    scale = np.array([256 / (x2 - x1), 256 / (y2 - y1)])
    mouth = (demo_avatar.landmarks[0][48:68] - [x1, y1]) * scale
    mx1, my1 = mouth.min(axis=0).astype(int)
    mx2, my2 = mouth.max(axis=0).astype(int)
    diff = np.abs(wide.astype(int) - crop.astype(int))
    assert diff[my1:my2, mx1:mx2].mean() > 25, "the open mouth differs clearly"
    nose_y = int((demo_avatar.landmarks[0][33, 1] - y1) * scale[1])
    assert diff[: nose_y - 1].max() == 0, "nothing above the nose moves"
    assert wide[my1:my2, mx1:mx2].mean() < crop[my1:my2, mx1:mx2].mean() - 10, "a dark mouth interior"


def test_compositor_changes_only_the_face_box(demo_avatar) -> None:
    before = np.array(demo_avatar.frames[0])
    compositor = Compositor(demo_avatar)
    white = np.full((256, 256, 3), 255, np.uint8)
    out = compositor.compose(0, white)
    np.testing.assert_array_equal(np.array(demo_avatar.frames[0]), before)  # never mutates the avatar
    x1, y1, x2, y2 = demo_avatar.face_boxes[0]
    outside = np.ones(out.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    np.testing.assert_array_equal(out[outside], before[outside])
    # Where the mask is full, the generated pixel wins; where it is zero, the original stays.
    full = cv2.resize(demo_avatar.masks[0], (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
    box = out[y1:y2, x1:x2]
    assert (box[full == 255] >= 250).all()
    np.testing.assert_array_equal(box[full == 0], before[y1:y2, x1:x2][full == 0])
