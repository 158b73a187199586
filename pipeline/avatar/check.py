"""``lipstream avatar check``: what is stored for an avatar, and whether each piece is usable.

Every file is checked on its own, so one damaged file is reported as such next to the good ones
instead of one exception hiding the rest. Engine caches are reported per engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.avatar.store import (
    GEOMETRY_FILE,
    MASKS_FILE,
    AvatarDamaged,
    AvatarStore,
    load_frames,
    load_geometry,
    load_masks,
    read_meta,
)
from pipeline.errors import LipstreamError

OK, MISSING, INVALID = "ok", "missing", "invalid"
LATENTS = Path("musetalk") / "latents.safetensors"


@dataclass(frozen=True)
class CheckRow:
    item: str
    status: str  # ok | missing | invalid
    detail: str


def check_avatar(store: AvatarStore, avatar_id: str) -> list[CheckRow]:
    """Rows for the base files, the mask kind and each engine; raises AvatarNotFound if absent."""
    if not store.exists(avatar_id):
        store.load(avatar_id)  # raises the store's AvatarNotFound with the known ids
    root = store.path(avatar_id)
    try:
        meta = read_meta(root, avatar_id)
    except AvatarDamaged as exc:
        return [CheckRow("avatar.json", INVALID, str(exc))]
    rows = [CheckRow("avatar.json", OK, f"format {meta['format_version']}, {meta['frame_count']} frames, "
                     f"{meta['width']}x{meta['height']}")]
    for name, loader in (("frames.npy", load_frames), (GEOMETRY_FILE, load_geometry), (MASKS_FILE, load_masks)):
        try:
            loader(root, meta)
            rows.append(CheckRow(name, OK, "readable, shapes match avatar.json"))
        except LipstreamError as exc:
            rows.append(CheckRow(name, MISSING if "is missing" in str(exc) else INVALID, str(exc)))
    rows.append(CheckRow("mask", OK, f"{meta.get('mask', 'landmark')} jaw mask"))
    base_ok = all(row.status == OK for row in rows)
    rows.append(CheckRow("engine lite", OK if base_ok else INVALID,
                         "ready: needs no cache" if base_ok else "needs the base files above"))
    rows.append(_musetalk_row(root))
    return rows


def _musetalk_row(root: Path) -> CheckRow:
    path = root / LATENTS
    if not path.is_file():
        return CheckRow("engine musetalk", MISSING,
                        "no VAE latents yet: built on first use by the musetalk engine (GPU extra + weights)")
    try:
        header_len = int.from_bytes(path.read_bytes()[:8], "little")
        header = json.loads(path.read_bytes()[8 : 8 + header_len])
        meta = header.get("__metadata__", {})
        shape = header["latents"]["shape"]
    except (ValueError, KeyError, OSError) as exc:
        return CheckRow("engine musetalk", INVALID, f"{LATENTS}: unreadable ({exc})")
    return CheckRow("engine musetalk", OK,
                    f"latents {shape} for VAE sha256 {meta.get('vae_sha256', '?')[:12]}…")
