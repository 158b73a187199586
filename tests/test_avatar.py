"""Avatar preparation and storage: ids, geometry on the demo, videos with face-less frames,
refusals that leave nothing behind, and `avatar check` on good and damaged avatars."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from pipeline.avatar.check import check_avatar
from pipeline.avatar.demo import demo_image
from pipeline.avatar.ids import validate_avatar_id
from pipeline.avatar.prepare import prepare_avatar
from pipeline.avatar.store import AvatarStore
from pipeline.errors import AvatarExists, AvatarNotFound, InputError, InvalidAvatarId, NoFaceFound


@pytest.mark.parametrize("bad", ["../x", "a/b", "/abs", "A", "", "-lead", "x" * 65, "a b", "dot.dot"])
def test_invalid_ids_are_refused(bad: str) -> None:
    with pytest.raises(InvalidAvatarId, match="invalid avatar id"):
        validate_avatar_id(bad)


@pytest.mark.parametrize("good", ["demo", "a-b_1", "0", "x" * 64])
def test_valid_ids(good: str) -> None:
    assert validate_avatar_id(good) == good


def test_demo_geometry_is_plausible(demo_avatar) -> None:
    a = demo_avatar
    assert a.frame_count == 1 and a.size == (512, 512)
    x1, y1, x2, y2 = a.face_boxes[0]
    assert 0 <= x1 < x2 <= 512 and 0 <= y1 < y2 <= 512
    assert 60 <= x2 - x1 <= 400
    mouth = a.landmarks[0][48:68]
    assert (mouth[:, 0] > x1).all() and (mouth[:, 0] < x2).all()
    assert mouth[:, 1].min() > y1 + (y2 - y1) * 0.5, "the mouth sits in the lower half of the face box"
    cx1, cy1, cx2, cy2 = a.crop_boxes[0]
    assert cx2 - cx1 == cy2 - cy1, "crop boxes are square"
    mask = a.masks[0]
    assert mask.max() == 255
    rows = np.flatnonzero(mask.max(axis=1) > 0)
    assert rows.min() >= 96, "the jaw mask stays in the lower part of the face"


def _write_video(path: Path, frames: list[np.ndarray], fps: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_video_at_30fps_with_faceless_frames(tmp_path: Path) -> None:
    base = demo_image()
    frames = []
    for i in range(36):  # 1.2 s at 30 fps
        shifted = np.roll(base, i, axis=1)
        frames.append(np.zeros_like(base) if i in (10, 11, 12) else shifted)
    video = tmp_path / "clip.mp4"
    _write_video(video, frames, 30)
    store = AvatarStore(tmp_path / "avatars")
    avatar = prepare_avatar(video, "clip", store)
    assert avatar.frame_count == 30  # 1.2 s at 25 fps
    assert avatar.size == (512, 512)
    missing = avatar.meta["interpolated_frames"]
    assert missing and all(not avatar.detected[i] for i in missing)
    # Interpolated boxes lie between their neighbours with faces.
    first, last = min(missing) - 1, max(missing) + 1
    for i in missing:
        lo = np.minimum(avatar.face_boxes[first], avatar.face_boxes[last]) - 2
        hi = np.maximum(avatar.face_boxes[first], avatar.face_boxes[last]) + 2
        assert (avatar.face_boxes[i] >= lo).all() and (avatar.face_boxes[i] <= hi).all()
    # The face moves right by one pixel per source frame: boxes follow it.
    assert avatar.face_boxes[-1][0] > avatar.face_boxes[0][0] + 20
    assert avatar.cycle_length == 58 and avatar.cycle_index(29) == 29 and avatar.cycle_index(30) == 28


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_image_without_face_leaves_nothing(tmp_path: Path) -> None:
    image = tmp_path / "wall.png"
    cv2.imwrite(str(image), np.full((200, 300, 3), 127, np.uint8))
    store = AvatarStore(tmp_path / "avatars")
    with pytest.raises(NoFaceFound, match="no face"):
        prepare_avatar(image, "wall", store)
    assert _leftovers(tmp_path / "avatars") == []


@pytest.mark.parametrize("content", [b"", b"garbage" * 1000])
def test_unreadable_video_leaves_nothing(tmp_path: Path, content: bytes) -> None:
    video = tmp_path / "x.mp4"
    video.write_bytes(content)
    store = AvatarStore(tmp_path / "avatars")
    with pytest.raises(InputError, match="x.mp4"):
        prepare_avatar(video, "x", store)
    assert _leftovers(tmp_path / "avatars") == []


def test_store_roundtrip_and_refusals(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path / "avatars")
    prepare_avatar(demo_image(), "one", store, source_name="astronaut")
    assert [m["id"] for m in store.list()] == ["one"]
    with pytest.raises(AvatarExists):
        prepare_avatar(demo_image(), "one", store)
    prepare_avatar(demo_image()[:, ::-1].copy(), "one", store, overwrite=True)
    with pytest.raises(AvatarNotFound, match="unknown avatar 'two'"):
        store.load("two")
    store.delete("one")
    assert store.list() == [] and _leftovers(tmp_path / "avatars") == []
    with pytest.raises(AvatarNotFound):
        store.delete("one")


def test_check_reports_good_and_damaged(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path / "avatars")
    prepare_avatar(demo_image(), "good", store)
    rows = {row.item: row for row in check_avatar(store, "good")}
    assert all(rows[k].status == "ok" for k in ["avatar.json", "frames.npy", "geometry.safetensors", "masks.npy"])
    assert rows["engine lite"].status == "ok" and rows["engine musetalk"].status == "missing"
    prepare_avatar(demo_image(), "bad", store)
    frames = store.path("bad") / "frames.npy"
    frames.write_bytes(frames.read_bytes()[: frames.stat().st_size // 2])
    rows = {row.item: row for row in check_avatar(AvatarStore(tmp_path / "avatars"), "bad")}
    assert rows["frames.npy"].status == "invalid"
    assert rows["engine lite"].status == "invalid"


def test_video_is_resampled_by_timestamp(tmp_path: Path) -> None:
    """Output frame k shows the latest source frame at or before k/25 s; max_side and max_seconds
    are honoured and sizes come out even. Frames carry their source index as grey level."""
    from pipeline.avatar.video import normalise_frame, read_source_frames

    frames = [np.full((102, 164, 3), 6 * i, np.uint8) for i in range(36)]  # 1.2 s at 30 fps
    video = tmp_path / "ramp.mp4"
    _write_video(video, frames, 30)
    with av.open(str(video)) as container:  # the decoded level of each source frame, in order
        levels = [int(f.to_ndarray(format="bgr24")[50, 80, 0]) for f in container.decode(video=0)]
    assert len(set(levels)) == 36
    out = read_source_frames(video)
    assert out.shape == (30, 102, 164, 3)
    source_index = [levels.index(int(v)) for v in out[:, 50, 80, 0]]
    assert source_index == [(k * 30) // 25 for k in range(30)]
    short = read_source_frames(video, max_seconds=0.5, max_side=81)
    assert short.shape[0] == 12 and max(short.shape[1:3]) <= 81
    assert short.shape[1] % 2 == 0 and short.shape[2] % 2 == 0
    assert normalise_frame(np.zeros((101, 163, 3), np.uint8)).shape == (100, 162, 3)


def test_loads_are_shared_and_refreshed(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path / "avatars")
    first = prepare_avatar(demo_image(), "same", store)
    assert store.load("same") is first, "sessions share one memory-mapped avatar"
    assert isinstance(first.frames.base, np.memmap) and not first.frames.flags.writeable  # mapped, not read
    assert type(first.frames[0]) is np.ndarray  # a plain view: no memmap hooks per index
    replaced = prepare_avatar(demo_image()[:, ::-1].copy(), "same", store, overwrite=True)
    assert replaced is not first and store.load("same") is replaced
    assert not np.array_equal(np.asarray(replaced.frames[0]), np.asarray(first.frames[0]))


def test_list_skips_temp_and_damaged_dirs(tmp_path: Path) -> None:
    root = tmp_path / "avatars"
    store = AvatarStore(root)
    prepare_avatar(demo_image(), "real", store)
    (root / ".tmp-other-1234").mkdir()
    (root / "broken").mkdir()
    (root / "broken" / "avatar.json").write_text("{not json")
    assert [m["id"] for m in store.list()] == ["real"]
    with pytest.raises(AvatarNotFound, match=r"known: real\)"):
        store.load("nothere")


def test_losing_a_prepare_race_leaves_nothing(tmp_path: Path) -> None:
    """Two writers of one id: the second rename fails with AvatarExists and its temp dir goes;
    ensure_demo_avatar turns that into loading the winner's avatar."""
    from pipeline.avatar.demo import DEMO_ID, ensure_demo_avatar

    root = tmp_path / "avatars"
    loser = AvatarStore(root)
    with pytest.raises(AvatarExists):
        with loser.staging(DEMO_ID) as tmp:
            (tmp / "partial").write_bytes(b"x")
            winner = ensure_demo_avatar(AvatarStore(root))
    assert _leftovers(root) == ["demo"]
    assert ensure_demo_avatar(loser).meta["source"] == winner.meta["source"]


def test_noise_image_has_no_face(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    store = AvatarStore(tmp_path / "avatars")
    with pytest.raises(NoFaceFound, match=r"no face found in 'noise' \(checked 1 frame\)"):
        prepare_avatar(noise, "noise", store, source_name="noise")
    assert _leftovers(tmp_path / "avatars") == []


def test_geometry_formulas() -> None:
    from pipeline.avatar.geometry import blur_kernel_size, crop_box, face_box

    lm = np.zeros((68, 2), np.float32)
    lm[:, 0] = np.linspace(100, 200, 68)
    lm[:, 1] = np.linspace(150, 250, 68)
    lm[29] = (150, 180)
    # top mirrors the chin distance above point 29; bottom gets the v1.5 margin of 10 px
    assert face_box(lm, (400, 400)).tolist() == [100, 180 - (250 - 180), 200, 260]
    assert face_box(lm, (190, 255)).tolist() == [100, 110, 190, 255], "clamped to the image"
    degenerate = np.full((68, 2), 50, np.float32)
    assert face_box(degenerate, (400, 400), det_box=(40, 40, 90, 90)).tolist() == [40, 40, 90, 100]
    assert crop_box((100, 110, 200, 260)).tolist() == [150 - 112, 185 - 112, 150 + 112, 185 + 112]
    assert blur_kernel_size(300) == 31 and blur_kernel_size(256) == 25


def test_check_unknown_avatar(tmp_path: Path) -> None:
    with pytest.raises(AvatarNotFound):
        check_avatar(AvatarStore(tmp_path / "avatars"), "ghost")
    with pytest.raises(InvalidAvatarId):
        check_avatar(AvatarStore(tmp_path / "avatars"), "../ghost")
