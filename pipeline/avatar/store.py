"""The avatars directory: atomic writes, validated memory-mapped loads, listing and deletion.

Layout and field meanings: :mod:`pipeline.avatar.model`. Two rules shape this module:

- A reader never sees a half-written avatar. Everything is written into ``<root>/.tmp-<id>-<rand>``
  (inside the root, so the final ``os.rename`` stays on one file system and is atomic), then
  renamed to ``<root>/<id>``. Any failure removes the temp dir. Dot-dirs are never listed.
- Loading trusts nothing on disk: no pickle (``allow_pickle=False``, safetensors), and every array's
  dtype and shape is checked against ``avatar.json`` before a session can index into it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np

from pipeline.avatar.ids import is_valid_avatar_id, validate_avatar_id
from pipeline.avatar.model import CROP_SIZE, FORMAT_VERSION, Avatar
from pipeline.errors import AvatarExists, AvatarNotFound, LipstreamError

META_FILE = "avatar.json"
FRAMES_FILE = "frames.npy"
GEOMETRY_FILE = "geometry.safetensors"
MASKS_FILE = "masks.npy"
PREVIEW_FILE = "preview.jpg"
BASE_FILES = (META_FILE, FRAMES_FILE, GEOMETRY_FILE, MASKS_FILE)

TEMP_PREFIX = ".tmp-"
_STALE_TEMP_SECONDS = 24 * 3600  # a temp dir this old belongs to a killed process


class AvatarDamaged(LipstreamError):
    """An avatar directory exists but its files are missing, truncated or inconsistent."""

    http_status = 500


class AvatarStore:
    """Prepared avatars under one root directory (``avatars/`` by default)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._cache: dict[str, tuple[tuple[int, int], Avatar]] = {}
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- lookups

    def path(self, avatar_id: str) -> Path:
        return self.root / validate_avatar_id(avatar_id)

    def exists(self, avatar_id: str) -> bool:
        return (self.path(avatar_id) / META_FILE).is_file()

    def ids(self) -> list[str]:
        return [m["id"] for m in self.list()]

    def list(self) -> list[dict[str, Any]]:
        """``avatar.json`` of every avatar whose metadata is readable and current, sorted by id.

        Only the metadata is read, so listing stays cheap with many long avatars; :meth:`load`
        does the full check.
        """
        if not self.root.is_dir():
            return []
        out = []
        for entry in sorted(self.root.iterdir(), key=lambda p: p.name):
            if not is_valid_avatar_id(entry.name) or not entry.is_dir():
                continue
            try:
                meta = read_meta(entry, entry.name)
            except AvatarDamaged:
                continue
            out.append(meta)
        return out

    def load(self, avatar_id: str) -> Avatar:
        """The avatar, memory-mapped; repeated loads return the same object while unchanged on disk.

        Sharing one object matters: every session of an avatar then indexes the same memmaps, and
        engines key their per-avatar caches on it.
        """
        avatar_dir = self.path(avatar_id)
        meta_path = avatar_dir / META_FILE
        try:
            st = meta_path.stat()
        except OSError:
            raise self._not_found(avatar_id) from None
        stamp = (st.st_ino, st.st_mtime_ns)
        with self._lock:
            hit = self._cache.get(avatar_id)
            if hit is not None and hit[0] == stamp:
                return hit[1]
        avatar = _load_avatar(avatar_dir, avatar_id)
        with self._lock:
            self._cache[avatar_id] = (stamp, avatar)
        return avatar

    def delete(self, avatar_id: str) -> None:
        """Remove an avatar. It disappears atomically (renamed to a dot-dir first), so a
        concurrent :meth:`list` never sees half of it; open memmaps stay valid until dropped."""
        target = self.path(avatar_id)
        if not target.is_dir():
            raise self._not_found(avatar_id)
        doomed = self.root / f".del-{avatar_id}-{secrets.token_hex(4)}"
        try:
            os.rename(target, doomed)
        except FileNotFoundError:
            raise self._not_found(avatar_id) from None
        with self._lock:
            self._cache.pop(avatar_id, None)
        shutil.rmtree(doomed, ignore_errors=True)

    # ----------------------------------------------------------------- writing

    @contextlib.contextmanager
    def staging(self, avatar_id: str, *, overwrite: bool = False) -> Iterator[Path]:
        """A fresh temp dir to write an avatar into; committed by rename when the block ends.

        On any exception (including :class:`AvatarExists` at commit, when another writer won a
        race) the temp dir is removed and the exception propagates. With ``overwrite`` an existing
        avatar is replaced; readers see either the old or the new one, except for the instant
        between two renames where the id is absent.
        """
        validate_avatar_id(avatar_id)
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()
        tmp = self.root / f"{TEMP_PREFIX}{avatar_id}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            yield tmp
            _fsync_dir(tmp)
            self._commit(tmp, avatar_id, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def save(
        self,
        avatar_id: str,
        *,
        frames: np.ndarray,
        face_boxes: np.ndarray,
        crop_boxes: np.ndarray,
        landmarks: np.ndarray,
        detected: np.ndarray,
        masks: np.ndarray,
        meta: dict[str, Any],
        overwrite: bool = False,
    ) -> Avatar:
        """Write an avatar held in memory (atomically) and return it loaded from disk."""
        with self.staging(avatar_id, overwrite=overwrite) as tmp:
            with FrameWriter(tmp / FRAMES_FILE) as fw:
                for frame in frames:
                    fw.write(frame)
            write_geometry(tmp, face_boxes, crop_boxes, landmarks, detected)
            write_masks(tmp, masks)
            write_preview(tmp, frames[0])
            write_meta(tmp, meta)
        return self.load(avatar_id)

    def _commit(self, tmp: Path, avatar_id: str, overwrite: bool) -> None:
        target = self.root / avatar_id
        try:
            os.rename(tmp, target)  # replaces only an empty directory
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            if not overwrite:
                raise AvatarExists(f"avatar {avatar_id!r} already exists (use overwrite to replace it)") from None
            old = self.root / f".old-{avatar_id}-{secrets.token_hex(4)}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(self.root)
        with self._lock:
            self._cache.pop(avatar_id, None)

    def _remove_stale_temps(self) -> None:
        """Temp dirs left by killed processes would otherwise pile up (they are never listed)."""
        now = time.time()
        for entry in self.root.glob(".*-*"):
            if not entry.name.startswith((TEMP_PREFIX, ".old-", ".del-")):
                continue
            with contextlib.suppress(OSError):
                if now - entry.stat().st_mtime > _STALE_TEMP_SECONDS:
                    shutil.rmtree(entry, ignore_errors=True)

    def _not_found(self, avatar_id: str) -> AvatarNotFound:
        known = self.ids()
        shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "") if known else "none"
        return AvatarNotFound(f"unknown avatar {avatar_id!r} (known: {shown})")


# --------------------------------------------------------------------- file formats


class FrameWriter:
    """Streams frames into ``frames.npy`` without knowing their count in advance.

    A minute of 1080p is ~9 GB, so frames go straight to disk. The ``.npy`` header (which holds
    the shape) is reserved as a fixed 128 bytes and filled in on close; readers see a normal
    version-1.0 ``.npy`` file. Frames of a different size than the first (a resolution change
    mid-video) are resized to the first's size.
    """

    HEADER_BYTES = 128

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.count = 0
        self.shape: tuple[int, int, int] | None = None
        self._f: BinaryIO = open(self.path, "wb")
        self._f.write(b"\0" * self.HEADER_BYTES)

    def write(self, frame: np.ndarray) -> None:
        if self.shape is None:
            self.shape = tuple(frame.shape)  # type: ignore[assignment]
        elif frame.shape != self.shape:
            frame = cv2.resize(frame, (self.shape[1], self.shape[0]), interpolation=cv2.INTER_AREA)
        self._f.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
        self.count += 1

    def close(self) -> None:
        if self._f.closed:
            return
        try:
            if self.shape is not None:
                self._f.seek(0)
                self._f.write(_npy_header((self.count, *self.shape), self.HEADER_BYTES))
                self._f.flush()
                os.fsync(self._f.fileno())
        finally:
            self._f.close()

    def __enter__(self) -> FrameWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _npy_header(shape: tuple[int, ...], total: int) -> bytes:
    d = "{'descr': '|u1', 'fortran_order': False, 'shape': (%s), }" % "".join(f"{n}, " for n in shape)
    body_len = total - 10
    if len(d) + 1 > body_len:
        raise ValueError(f"npy header for shape {shape} does not fit in {total} bytes")
    body = d.ljust(body_len - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", body_len) + body.encode("latin1")


def write_geometry(
    avatar_dir: Path,
    face_boxes: np.ndarray,
    crop_boxes: np.ndarray,
    landmarks: np.ndarray,
    detected: np.ndarray,
) -> None:
    from safetensors.numpy import save_file

    tensors = {
        "face_boxes": np.ascontiguousarray(face_boxes, dtype=np.int32),
        "crop_boxes": np.ascontiguousarray(crop_boxes, dtype=np.int32),
        "landmarks": np.ascontiguousarray(landmarks, dtype=np.float32),
        "detected": np.ascontiguousarray(detected, dtype=np.uint8),
    }
    path = avatar_dir / GEOMETRY_FILE
    save_file(tensors, str(path), metadata={"format_version": str(FORMAT_VERSION)})
    _fsync_file(path)


def write_masks(avatar_dir: Path, masks: np.ndarray) -> None:
    path = avatar_dir / MASKS_FILE
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(masks, dtype=np.uint8), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def write_preview(avatar_dir: Path, frame: np.ndarray) -> None:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(frame), [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("JPEG encoding of the preview failed")
    (avatar_dir / PREVIEW_FILE).write_bytes(buf.tobytes())


def write_meta(avatar_dir: Path, meta: dict[str, Any]) -> None:
    path = avatar_dir / META_FILE
    path.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    _fsync_file(path)


# --------------------------------------------------------------------- reading


def read_meta(avatar_dir: Path, avatar_id: str) -> dict[str, Any]:
    """``avatar.json``, checked for the fields every reader relies on."""
    try:
        meta = json.loads((avatar_dir / META_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AvatarDamaged(f"avatar {avatar_id!r} is damaged: {META_FILE} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AvatarDamaged(f"avatar {avatar_id!r} is damaged: {META_FILE}: {_one_line(e)}") from None
    if not isinstance(meta, dict):
        raise AvatarDamaged(f"avatar {avatar_id!r} is damaged: {META_FILE} is not a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise AvatarDamaged(
            f"avatar {avatar_id!r} has format version {version!r}; this lipstream reads version "
            f"{FORMAT_VERSION}: prepare it again"
        )
    for key in ("frame_count", "width", "height"):
        if not isinstance(meta.get(key), int) or meta[key] <= 0:
            raise AvatarDamaged(f"avatar {avatar_id!r} is damaged: {META_FILE} has no valid {key!r}")
    if meta.get("id") != avatar_id:
        raise AvatarDamaged(f"avatar {avatar_id!r} is damaged: {META_FILE} names id {meta.get('id')!r}")
    return meta


def load_frames(avatar_dir: Path, meta: dict[str, Any]) -> np.ndarray:
    n, h, w = meta["frame_count"], meta["height"], meta["width"]
    return _load_npy(avatar_dir / FRAMES_FILE, np.uint8, (n, h, w, 3), meta["id"])


def load_masks(avatar_dir: Path, meta: dict[str, Any]) -> np.ndarray:
    return _load_npy(avatar_dir / MASKS_FILE, np.uint8, (meta["frame_count"], CROP_SIZE, CROP_SIZE), meta["id"])


def load_geometry(avatar_dir: Path, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    n, avatar_id = meta["frame_count"], meta["id"]
    path = avatar_dir / GEOMETRY_FILE
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise AvatarDamaged(f"avatar {avatar_id!r} is damaged: {GEOMETRY_FILE} is missing") from None
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise AvatarDamaged(f"avatar {avatar_id!r} is damaged: {GEOMETRY_FILE}: {_one_line(e)}") from None
    expected = {
        "face_boxes": (np.int32, (n, 4)),
        "crop_boxes": (np.int32, (n, 4)),
        "landmarks": (np.float32, (n, 68, 2)),
        "detected": (np.uint8, (n,)),
    }
    for key, (dtype, shape) in expected.items():
        arr = tensors.get(key)
        if arr is None:
            raise AvatarDamaged(f"avatar {avatar_id!r} is damaged: {GEOMETRY_FILE} has no {key!r}")
        _check_array(arr, dtype, shape, f"{GEOMETRY_FILE}:{key}", avatar_id)
    return tensors


def _load_npy(path: Path, dtype: type, shape: tuple[int, ...], avatar_id: str) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise AvatarDamaged(f"avatar {avatar_id!r} is damaged: {path.name} is missing") from None
    except (OSError, ValueError) as e:  # truncated files fail the mmap length check
        raise AvatarDamaged(f"avatar {avatar_id!r} is damaged: {path.name}: {_one_line(e)}") from None
    _check_array(arr, dtype, shape, path.name, avatar_id)
    # A plain ndarray over the same mapping: indexing a np.memmap runs Python hooks
    # (__array_finalize__) under the GIL, ~0.9 us against 0.09 us a frame or mask, and the
    # device processes' paste threads spent 6-11 % of their samples in them on an H200.
    return np.asarray(arr)


def _check_array(arr: np.ndarray, dtype: type, shape: tuple[int, ...], what: str, avatar_id: str) -> None:
    if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != shape:
        raise AvatarDamaged(
            f"avatar {avatar_id!r} is damaged: {what} is {arr.dtype} {list(arr.shape)}, "
            f"expected {np.dtype(dtype)} {list(shape)}"
        )


def _load_avatar(avatar_dir: Path, avatar_id: str) -> Avatar:
    meta = read_meta(avatar_dir, avatar_id)
    frames = load_frames(avatar_dir, meta)
    geometry = load_geometry(avatar_dir, meta)
    masks = load_masks(avatar_dir, meta)
    return Avatar(
        id=avatar_id,
        root=avatar_dir,
        frames=frames,
        face_boxes=geometry["face_boxes"],
        crop_boxes=geometry["crop_boxes"],
        landmarks=geometry["landmarks"],
        masks=masks,
        detected=geometry["detected"],
        meta=meta,
    )


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make the renames durable; not all file systems allow fsync on a directory."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
