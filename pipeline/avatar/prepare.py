"""Preparing an avatar from an image or a video: frames, landmarks, boxes, masks, metadata.

Done once per avatar (CPU, roughly 0.03-0.1 s per frame, dominated by face detection); sessions
then only read the result. The whole preparation happens inside the store's temp dir, so a
failure at any step (bad file, no face, full disk, Ctrl-C) leaves nothing behind.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.avatar import geometry
from pipeline.avatar.ids import validate_avatar_id
from pipeline.avatar.landmarks import FaceLandmarker, default_landmarker
from pipeline.avatar.model import CROP_SIZE, FORMAT_VERSION, FPS, Avatar, cycle_length
from pipeline.avatar.parsing_mask import load_parsing_model, parsing_masks
from pipeline.avatar.store import (
    FRAMES_FILE,
    AvatarStore,
    FrameWriter,
    write_geometry,
    write_masks,
    write_meta,
    write_preview,
)
from pipeline.avatar.video import (
    DEFAULT_MAX_SECONDS,
    DEFAULT_MAX_SIDE,
    iter_source_frames,
    normalise_array,
)
from pipeline.errors import AvatarExists, InputError, NoFaceFound

Progress = Callable[[int, int], None]


def prepare_avatar(
    source: Path | str | np.ndarray,
    avatar_id: str,
    store: AvatarStore,
    *,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    max_side: int = DEFAULT_MAX_SIDE,
    overwrite: bool = False,
    progress: Progress | None = None,
    source_name: str | None = None,
    landmarker: FaceLandmarker | None = None,
    parsing_model_path: Path | None = None,
) -> Avatar:
    """Prepare ``source`` as avatar ``avatar_id`` in ``store`` and return it loaded.

    ``source`` is an image or video file, or a BGR uint8 array (``[H, W, 3]`` image or
    ``[N, H, W, 3]`` frames already at 25 fps). ``progress(done, total)`` is called once per frame
    during face detection (the slow step). Frames where no face is found take landmarks
    interpolated from the nearest frames with one (listed in ``interpolated_frames``).

    ``parsing_model_path`` (optional) is BiSeNet's ``79999_iter.pth``: when the file exists and
    torch is installed, masks are the official face-parsing 'jaw' masks ("mask": "bisenet" in
    avatar.json); otherwise the landmark jaw mask ("landmark").

    Raises InvalidAvatarId, AvatarExists, InputError (unreadable source), NoFaceFound,
    EngineUnavailable (a parsing weights file that is there but does not load strictly).
    """
    validate_avatar_id(avatar_id)  # before anything touches the disk
    if not overwrite and store.exists(avatar_id):
        raise AvatarExists(f"avatar {avatar_id!r} already exists (use overwrite to replace it)")
    if max_seconds <= 0 or max_side < 16:
        raise InputError(f"invalid limits: max_seconds={max_seconds} must be > 0, max_side={max_side} >= 16")
    name, frames_in, digest = _open_source(source, source_name, max_seconds, max_side)
    marker = landmarker or default_landmarker()
    parser = load_parsing_model(parsing_model_path)

    with store.staging(avatar_id, overwrite=overwrite) as tmp:
        with FrameWriter(tmp / FRAMES_FILE) as writer:
            for frame in frames_in:
                writer.write(frame)
        if writer.count == 0:
            raise InputError(f"cannot read {name!r}: it holds no frames")
        frames = np.load(tmp / FRAMES_FILE, mmap_mode="r", allow_pickle=False)
        n, h, w = frames.shape[:3]
        landmarks, det_boxes, detected = detect_all(frames, marker, progress)
        if not detected.any():
            raise NoFaceFound(f"no face found in {name!r} (checked {n} frame{'s' if n != 1 else ''})")
        landmarks = interpolate_missing(landmarks, detected)
        det_boxes = interpolate_missing(det_boxes.astype(np.float64), detected)
        face_boxes, crop_boxes, masks = compute_geometry(landmarks, det_boxes, (w, h))
        if parser is not None:
            masks = parsing_masks(parser, frames, face_boxes, crop_boxes)
        write_geometry(tmp, face_boxes, crop_boxes, landmarks, detected.astype(np.uint8))
        write_masks(tmp, masks)
        write_preview(tmp, np.asarray(frames[0]))
        write_meta(tmp, _meta(avatar_id, name, digest(), n, w, h, detected, parser is not None))
        del frames  # drop the memmap before the directory is renamed or removed
    return store.load(avatar_id)


def detect_all(
    frames: np.ndarray, marker: FaceLandmarker, progress: Progress | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Landmarks float32 [N, 68, 2], detector boxes int32 [N, 4], found bool [N] (zeros where not)."""
    n = len(frames)
    landmarks = np.zeros((n, 68, 2), dtype=np.float32)
    boxes = np.zeros((n, 4), dtype=np.int32)
    found = np.zeros(n, dtype=bool)
    if progress:
        progress(0, n)
    for i in range(n):
        hit = marker.detect(np.asarray(frames[i]))
        if hit is not None:
            landmarks[i], boxes[i] = hit
            found[i] = True
        if progress:
            progress(i + 1, n)
    return landmarks, boxes, found


def interpolate_missing(values: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Fill rows where ``found`` is False linearly between the nearest found rows before and after
    (holding the first/last found row at the ends), so a blink-length detector miss or a hand in
    front of the face moves the box smoothly instead of jumping."""
    out = np.array(values, dtype=np.float32 if values.dtype == np.float32 else np.float64)
    idx = np.flatnonzero(found)
    missing = np.flatnonzero(~found)
    if len(idx) == 0 or len(missing) == 0:
        return out
    flat = out.reshape(len(out), -1)
    for col in range(flat.shape[1]):
        flat[missing, col] = np.interp(missing, idx, flat[idx, col])
    return out


def compute_geometry(
    landmarks: np.ndarray, det_boxes: np.ndarray, image_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Face boxes int32 [N, 4], crop boxes int32 [N, 4], masks uint8 [N, 256, 256]."""
    n = len(landmarks)
    face_boxes = np.zeros((n, 4), dtype=np.int32)
    crop_boxes = np.zeros((n, 4), dtype=np.int32)
    masks = np.zeros((n, CROP_SIZE, CROP_SIZE), dtype=np.uint8)
    for i in range(n):
        det = np.round(det_boxes[i]).astype(np.int32)
        face_boxes[i], crop_boxes[i], masks[i] = geometry.frame_geometry(landmarks[i], image_size, det)
    return face_boxes, crop_boxes, masks


def _open_source(
    source: Path | str | np.ndarray, source_name: str | None, max_seconds: float, max_side: int
) -> tuple[str, Iterator[np.ndarray], Callable[[], str]]:
    """(display name, lazy frame iterator, source hash function).

    The hash is taken of the file's bytes (not the decoded frames) so it identifies exactly what
    the user gave, and lazily so a bad file fails on decoding with the clearer message.
    """
    if isinstance(source, np.ndarray):
        name = source_name or "array"
        arr = source
        return name, normalise_array(arr, max_side, name=name), lambda: _sha256_array(arr)
    path = Path(source)
    name = source_name or path.name
    frames = iter_source_frames(path, max_seconds=max_seconds, max_side=max_side, name=name)
    return name, frames, lambda: _sha256_file(path)


def _meta(
    avatar_id: str, name: str, sha256: str, n: int, w: int, h: int, detected: np.ndarray, bisenet: bool = False
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "id": avatar_id,
        "source": {"name": name, "sha256": sha256},
        "fps": FPS,
        "frame_count": int(n),
        "cycle_length": cycle_length(int(n)),
        "width": int(w),
        "height": int(h),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "mask": "bisenet" if bisenet else "landmark",
        "landmarks": "dlib-68",
        "interpolated_frames": [int(i) for i in np.flatnonzero(~detected)],
    }


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_array(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
