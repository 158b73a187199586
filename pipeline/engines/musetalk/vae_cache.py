"""Per-avatar UNet input latents, computed once and cached beside the avatar.

Every generated frame needs its avatar frame's [8, 32, 32] latent (the VAE encoding of the face
crop with its lower half masked, then of the whole crop). Encoding costs two VAE encoder passes
per frame, so it happens once per avatar and VAE: the result is stored at
``<avatar>/musetalk/latents.safetensors`` (no pickle) with the VAE weight file's sha256 in its
metadata, loaded onto the device once and shared by every session of that avatar. A different
VAE file (another hash) means the cache is recomputed.

The official code samples the latent distribution (not its mean); so do we, with a fixed seed
per avatar frame (:func:`latent_noise`) so that the cached latents are reproducible and do not
depend on batch size or device.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline.avatar.model import CROP_SIZE, Avatar

log = logging.getLogger(__name__)

CACHE_DIR = "musetalk"
CACHE_FILE = "latents.safetensors"
FORMAT = "1"
SCALING_FACTOR = 0.18215  # sd-vae-ft-mse latent scale
LATENT_SEED = 20240415  # base seed of the per-frame latent noise
LATENT_SIZE = CROP_SIZE // 8  # 32


def face_crop(frame_bgr: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The frame cut at its face box (x1, y1, x2, y2 exclusive), resized to 256x256 with Lanczos."""
    h, w = frame_bgr.shape[:2]
    x1, y1, x2, y2 = (int(v) for v in box)
    x1, y1 = min(max(x1, 0), w - 1), min(max(y1, 0), h - 1)
    x2, y2 = min(max(x2, x1 + 1), w), min(max(y2, y1 + 1), h)
    crop = np.ascontiguousarray(frame_bgr[y1:y2, x1:x2])
    return cv2.resize(crop, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_LANCZOS4)


def vae_inputs(crop_bgr: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked, reference) float32 [3, 256, 256] in [-1, 1] from a 256x256 BGR crop.

    BGR -> RGB, /255; the masked copy has rows 128..255 set to 0 before (x - 0.5) / 0.5, so its
    lower half becomes -1 (the mouth region the UNet must paint).
    """
    rgb = torch.from_numpy(np.ascontiguousarray(crop_bgr[:, :, ::-1])).permute(2, 0, 1).float() / 255.0
    masked = rgb.clone()
    masked[:, CROP_SIZE // 2 :, :] = 0.0
    return (masked - 0.5) / 0.5, (rgb - 0.5) / 0.5


def latent_noise(frame_index: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard-normal draws that sample frame ``frame_index``'s (masked, reference) latents."""
    gen = torch.Generator().manual_seed(LATENT_SEED + int(frame_index))
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def encode_latents(
    vae: torch.nn.Module, frames_bgr: np.ndarray, face_boxes: np.ndarray, *, batch_size: int = 8
) -> torch.Tensor:
    """float32 [N, 8, 32, 32] on the CPU: 0.18215 * sample(masked), 0.18215 * sample(reference)."""
    param = next(vae.parameters())
    n = len(frames_bgr)
    out = torch.empty((n, 8, LATENT_SIZE, LATENT_SIZE), dtype=torch.float32)
    with torch.inference_mode():
        for lo in range(0, n, batch_size):
            idx = range(lo, min(n, lo + batch_size))
            pairs = [vae_inputs(face_crop(frames_bgr[i], face_boxes[i])) for i in idx]
            images = torch.stack([p[0] for p in pairs] + [p[1] for p in pairs])  # masked..., reference...
            dist = vae.encode(images.to(device=param.device, dtype=param.dtype)).latent_dist
            mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
            k = len(pairs)
            for j, i in enumerate(idx):
                noise_m, noise_r = latent_noise(i, tuple(mean.shape[1:]))
                out[i, :4] = SCALING_FACTOR * (mean[j] + std[j] * noise_m)
                out[i, 4:] = SCALING_FACTOR * (mean[k + j] + std[k + j] * noise_r)
    return out


def cache_path(avatar: Avatar) -> Path:
    return Path(avatar.root) / CACHE_DIR / CACHE_FILE


def geometry_hash(avatar: Avatar) -> str:
    """What the latents depend on besides the VAE: frame count and face boxes."""
    h = hashlib.sha256()
    h.update(str(tuple(avatar.frames.shape)).encode())
    h.update(np.ascontiguousarray(avatar.face_boxes, dtype=np.int32).tobytes())
    return h.hexdigest()


def load_or_compute_latents(
    avatar: Avatar, vae: torch.nn.Module, vae_sha256: str, *, batch_size: int = 8
) -> tuple[torch.Tensor, bool]:
    """float32 [N, 8, 32, 32] CPU latents of the avatar and whether they were freshly computed.

    The cache is used when its format, VAE hash and geometry hash match; otherwise the latents are
    computed and written atomically (temp file + rename). A read-only avatar directory only costs a
    warning: the latents are still returned.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = cache_path(avatar)
    meta_want = {"format": FORMAT, "vae_sha256": vae_sha256, "geometry_sha256": geometry_hash(avatar)}
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if all(meta.get(k) == v for k, v in meta_want.items()):
                    latents = f.get_tensor("latents")
                    if tuple(latents.shape) == (avatar.frame_count, 8, LATENT_SIZE, LATENT_SIZE):
                        return latents.float(), False
            log.info(
                "avatar %s: MuseTalk latents cache is stale (VAE or geometry changed); recomputing", avatar.id
            )
        except Exception as exc:  # noqa: BLE001 - a damaged cache is recomputed, never fatal
            log.warning(
                "avatar %s: unreadable MuseTalk latents cache %s (%s); recomputing", avatar.id, path, exc
            )
    latents = encode_latents(vae, avatar.frames, avatar.face_boxes, batch_size=batch_size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".latents-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({"latents": latents.contiguous()}, tmp, metadata=meta_want)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        log.warning(
            "avatar %s: cannot write MuseTalk latents cache %s (%s); kept in memory only",
            avatar.id,
            path,
            exc,
        )
    return latents, True
