"""The compositor blends exactly inside the mask and nowhere else, copes with face boxes that
leave the image, never writes into the avatar; face crops are Lanczos cuts of the face box."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.avatar.model import Avatar
from pipeline.compositor import Compositor, face_crop

H, W = 120, 160


def synthetic_avatar(boxes: list[tuple[int, int, int, int]], seed: int = 0) -> Avatar:
    """Random frames (read-only, like a memmap), the given face boxes, and a mask per frame that
    is 0 in the top half, 255 in a bottom-centre block and a ramp in between."""
    rng = np.random.default_rng(seed)
    n = len(boxes)
    frames = rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8)
    frames.setflags(write=False)
    mask = np.zeros((256, 256), np.uint8)
    mask[128:, :] = np.linspace(0, 255, 256, dtype=np.uint8)[None, :]  # a horizontal ramp
    mask[180:250, 60:200] = 255
    masks = np.repeat(mask[None], n, axis=0)
    return Avatar(
        id="synthetic",
        root=Path("."),
        frames=frames,
        face_boxes=np.array(boxes, np.int32),
        crop_boxes=np.array(boxes, np.int32),
        landmarks=np.zeros((n, 68, 2), np.float32),
        masks=masks,
        detected=np.ones(n, np.uint8),
    )


def full_mask(avatar: Avatar, i: int) -> np.ndarray:
    x1, y1, x2, y2 = (int(v) for v in avatar.face_boxes[i])
    return cv2.resize(avatar.masks[i], (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)


def test_blend_is_exact_inside_and_outside_the_mask() -> None:
    avatar = synthetic_avatar([(40, 20, 120, 110)])
    before = np.array(avatar.frames[0])
    colour = np.array([10, 200, 77], np.uint8)
    face = np.empty((256, 256, 3), np.uint8)
    face[...] = colour
    out = Compositor(avatar).compose(0, face)
    assert out.shape == before.shape and out.dtype == np.uint8
    x1, y1, x2, y2 = avatar.face_boxes[0]
    outside = np.ones((H, W), bool)
    outside[y1:y2, x1:x2] = False
    np.testing.assert_array_equal(out[outside], before[outside])
    mask = full_mask(avatar, 0)
    box, orig = out[y1:y2, x1:x2].astype(int), before[y1:y2, x1:x2].astype(int)
    assert (mask == 255).sum() > 1000 and (mask == 0).sum() > 1000
    np.testing.assert_array_equal(box[mask == 255], np.broadcast_to(colour, box[mask == 255].shape))
    np.testing.assert_array_equal(box[mask == 0], orig[mask == 0])
    # In between: the alpha blend, to within fixed-point rounding.
    a = (mask.astype(float) / 255.0)[..., None]
    expected = colour * a + orig * (1 - a)
    assert np.abs(box - expected).max() <= 1.0


def test_textured_face_lands_where_the_box_is() -> None:
    avatar = synthetic_avatar([(30, 10, 150, 115)])
    face = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    out = Compositor(avatar).compose(0, face)
    x1, y1, x2, y2 = avatar.face_boxes[0]
    resized = cv2.resize(face, (x2 - x1, y2 - y1), interpolation=cv2.INTER_AREA)
    full = full_mask(avatar, 0) == 255
    np.testing.assert_array_equal(out[y1:y2, x1:x2][full], resized[full])


def test_never_mutates_the_avatar_and_returns_new_frames() -> None:
    avatar = synthetic_avatar([(40, 20, 120, 110), (42, 22, 122, 112)])
    before = np.array(avatar.frames)
    compositor = Compositor(avatar)
    face = np.full((256, 256, 3), 255, np.uint8)
    a, b = compositor.compose(0, face), compositor.compose(0, face)
    np.testing.assert_array_equal(np.array(avatar.frames), before)
    assert not np.shares_memory(a, avatar.frames) and not np.shares_memory(a, b)
    a[...] = 0  # the caller may write into what it got
    np.testing.assert_array_equal(compositor.compose(0, face), b)
    np.testing.assert_array_equal(compositor.idle(1), before[1])


@pytest.mark.parametrize(
    "box",
    [(-30, -20, 60, 70), (100, 50, 200, 150), (-10, 60, 170, 140), (170, 130, 260, 230)],
    ids=["top-left", "bottom-right", "wider-than-image", "fully-outside"],
)
def test_face_box_leaving_the_image(box: tuple[int, int, int, int]) -> None:
    avatar = synthetic_avatar([box])
    before = np.array(avatar.frames[0])
    colour = np.array([1, 2, 3], np.uint8)
    face = np.empty((256, 256, 3), np.uint8)
    face[...] = colour
    out = Compositor(avatar).compose(0, face)
    assert out.shape == before.shape
    x1, y1, x2, y2 = box
    vx1, vy1, vx2, vy2 = max(x1, 0), max(y1, 0), min(x2, W), min(y2, H)
    outside = np.ones((H, W), bool)
    if vx2 > vx1 and vy2 > vy1:
        outside[vy1:vy2, vx1:vx2] = False
        # The visible part lines up with the full box: mask rows/cols are those of the full box.
        mask = full_mask(avatar, 0)[vy1 - y1 : vy2 - y1, vx1 - x1 : vx2 - x1]
        region = out[vy1:vy2, vx1:vx2]
        np.testing.assert_array_equal(region[mask == 255], np.broadcast_to(colour, region[mask == 255].shape))
        np.testing.assert_array_equal(region[mask == 0], before[vy1:vy2, vx1:vx2][mask == 0])
    np.testing.assert_array_equal(out[outside], before[outside])


def test_rejects_a_wrong_face() -> None:
    compositor = Compositor(synthetic_avatar([(40, 20, 120, 110)]))
    with pytest.raises(ValueError, match="256"):
        compositor.compose(0, np.zeros((128, 128, 3), np.uint8))
    with pytest.raises(ValueError):
        compositor.compose(0, np.zeros((256, 256, 3), np.float32))


def test_mask_cache_is_bounded() -> None:
    avatar = synthetic_avatar([(40, 20, 120, 110), (41, 21, 121, 111), (42, 22, 122, 112)])
    compositor = Compositor(avatar, mask_cache=2)
    face = np.full((256, 256, 3), 9, np.uint8)
    first = compositor.compose(0, face)
    for i in (1, 2, 0, 1):
        compositor.compose(i, face)
    assert len(compositor._plans) == 2
    np.testing.assert_array_equal(compositor.compose(0, face), first)


def test_face_crop_is_a_cached_lanczos_cut() -> None:
    avatar = synthetic_avatar([(40, 20, 120, 110)])
    crop = face_crop(avatar, 0)
    assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8
    assert not crop.flags.writeable, "shared by every engine and session: read-only"
    assert face_crop(avatar, 0) is crop
    x1, y1, x2, y2 = avatar.face_boxes[0]
    expected = cv2.resize(np.array(avatar.frames[0])[y1:y2, x1:x2], (256, 256), interpolation=cv2.INTER_LANCZOS4)
    np.testing.assert_array_equal(crop, expected)
    # Another avatar object never gets this one's crop, even at the same frame index.
    other = synthetic_avatar([(40, 20, 120, 110)], seed=5)
    assert not np.array_equal(face_crop(other, 0), crop)


def test_face_crop_outside_the_image_replicates_the_edge() -> None:
    avatar = synthetic_avatar([(-20, -10, 60, 70)])
    frame = np.array(avatar.frames[0])
    padded = np.pad(frame, ((10, 0), (20, 0), (0, 0)), mode="edge")[:80, :80]
    expected = cv2.resize(padded, (256, 256), interpolation=cv2.INTER_LANCZOS4)
    np.testing.assert_array_equal(face_crop(avatar, 0), expected)


def test_demo_avatar_round_trip(demo_avatar: Avatar) -> None:
    """Compositing the avatar's own crop changes the frame only by resampling, inside the mask."""
    before = np.array(demo_avatar.frames[0])
    out = Compositor(demo_avatar).compose(0, np.array(face_crop(demo_avatar, 0)))
    np.testing.assert_array_equal(np.array(demo_avatar.frames[0]), before)
    x1, y1, x2, y2 = demo_avatar.face_boxes[0]
    outside = np.ones(out.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    np.testing.assert_array_equal(out[outside], before[outside])
    diff = np.abs(out.astype(int) - before.astype(int))[y1:y2, x1:x2]
    assert diff.mean() < 3, "down- and up-sampling the face is nearly lossless"
