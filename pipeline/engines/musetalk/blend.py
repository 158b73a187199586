"""Blending generated faces into avatar frames on the engine's device (GPU), in batches.

The CPU :class:`~pipeline.compositor.Compositor` is the reference: the 256x256 face is rounded to
uint8, resized to the face box with OpenCV (``INTER_AREA`` when the box is smaller than 256 in a
direction, else ``INTER_LINEAR``), and blended with the frame's mask (resized to the box,
``alpha = (mask * 256 + 127) // 255``) in fixed point: ``(face * a + frame * (256 - a) + 128) >> 8``,
only over the rows/columns where the mask is non-zero. Here the same steps run as tensor ops:

- Resizing is separable and linear, so it is two matrix products: ``rows @ face @ cols.T`` with
  ``rows`` [h, 256] and ``cols`` [w, 256] holding exactly OpenCV's interpolation weights (its
  area table, its bilinear and its area-enlarging coefficients, :func:`resize_matrix`). The
  matrices are cut to the blended region, so the product yields only the pixels that change, and
  every request of a batch (any box size) goes through one batched ``matmul``.
- The blend is the same integer formula, evaluated exactly in float32 (all terms < 2**24).

What differs from OpenCV: its uint8 bilinear path uses 11-bit fixed-point weights; ours are
float32, so a pixel may differ by one level (tests/test_musetalk.py measures it). The area path
is float in both.

Per avatar, built once (:class:`AvatarBlendCache`), kept on the device and shared by all
sessions: the original pixels of every frame's blend region, its mask, and an index into
de-duplicated row/column weight tables (boxes of a video avatar repeat a few sizes). Only the
finished regions (uint8) cross to the CPU, where they are pasted into a copy of the frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from pipeline.avatar.model import CROP_SIZE, Avatar
from pipeline.engines.musetalk.transfer import index_tensor, to_host


def resize_matrix(src: int, dst: int, mode: str) -> np.ndarray:
    """float64 [dst, src]: OpenCV's weights for resizing ``src`` pixels to ``dst`` along one axis.

    ``mode``: "area" (``INTER_AREA`` when shrinking in both directions: exact pixel-area
    coverage, ``computeResizeAreaTab``), "linear" (``INTER_LINEAR``: half-pixel centres, edge
    clamped), "area_up" (``INTER_AREA`` when either direction enlarges: OpenCV then uses its
    bilinear code with area-style coefficients on both axes).
    """
    m = np.zeros((dst, src), dtype=np.float64)
    scale = src / dst
    if mode == "area":
        for dx in range(dst):
            fsx1 = dx * scale
            fsx2 = fsx1 + scale
            cell = min(scale, src - fsx1)
            sx1, sx2 = math.ceil(fsx1), math.floor(fsx2)
            sx2 = min(sx2, src - 1)
            sx1 = min(sx1, sx2)
            if sx1 - fsx1 > 1e-3:
                m[dx, sx1 - 1] += (sx1 - fsx1) / cell
            for sx in range(sx1, sx2):
                m[dx, sx] += 1.0 / cell
            if fsx2 - sx2 > 1e-3:
                m[dx, sx2] += min(min(fsx2 - sx2, 1.0), cell) / cell
        return m
    if mode not in ("linear", "area_up"):
        raise ValueError(f"unknown resize mode {mode!r}")
    inv = dst / src
    for dx in range(dst):
        if mode == "linear":
            f = (dx + 0.5) * scale - 0.5
            sx = math.floor(f)
            f -= sx
        else:
            sx = math.floor(dx * scale)
            f = (dx + 1) - (sx + 1) * inv
            f = 0.0 if f <= 0 else f - math.floor(f)
        f = float(np.float32(f))  # OpenCV keeps the fraction in float
        if sx < 0:
            sx, f = 0, 0.0
        if sx >= src - 1:
            sx, f = src - 1, 0.0
        m[dx, sx] += 1.0 - f
        if f:
            m[dx, sx + 1] += f
    return m


def _modes(w: int, h: int) -> tuple[str, str]:
    """(column mode, row mode) the CPU compositor's choice of OpenCV interpolation implies."""
    if w < CROP_SIZE or h < CROP_SIZE:  # the compositor picks INTER_AREA
        mode = "area" if (w <= CROP_SIZE and h <= CROP_SIZE) else "area_up"
        return mode, mode
    return "linear", "linear"


@dataclass
class AvatarBlendCache:
    """One avatar's blend state on a device (see the module docstring)."""

    avatar: Avatar
    region: torch.Tensor  # uint8 [N, Rh, Rw, 3]: original pixels of each frame's blend region
    mask: torch.Tensor  # uint8 [N, Rh, Rw]: resized mask over the region (0 in the padding)
    row_table: torch.Tensor  # float32 [R, Rh, 256]
    col_table: torch.Tensor  # float32 [C, Rw, 256]
    row_index: torch.Tensor  # long [N] (on the device)
    col_index: torch.Tensor  # long [N]
    places: list[tuple[int, int, int, int] | None]  # per frame (y, x, rh, rw) in the image; None: nothing

    @property
    def nbytes(self) -> int:
        tensors = (self.region, self.mask, self.row_table, self.col_table, self.row_index, self.col_index)
        return sum(t.numel() * t.element_size() for t in tensors)

    @classmethod
    def build(cls, avatar: Avatar, device: torch.device) -> AvatarBlendCache:
        from pipeline.compositor import _make_plan  # the CPU compositor's own geometry and masks

        n = avatar.frame_count
        plans = [_make_plan(avatar, i) for i in range(n)]
        sizes = [(p.by1 - p.by0, p.bx1 - p.bx0) if p.alpha is not None else (0, 0) for p in plans]
        rh = max(1, max(s[0] for s in sizes))
        rw = max(1, max(s[1] for s in sizes))
        region = np.zeros((n, rh, rw, 3), np.uint8)
        mask = np.zeros((n, rh, rw), np.uint8)
        rows: dict[tuple, int] = {}
        cols: dict[tuple, int] = {}
        row_mats: list[np.ndarray] = []
        col_mats: list[np.ndarray] = []
        row_index = np.zeros(n, np.int64)
        col_index = np.zeros(n, np.int64)
        places: list[tuple[int, int, int, int] | None] = []
        for i, plan in enumerate(plans):
            if plan.alpha is None:
                places.append(None)
                continue
            h_i, w_i = sizes[i]
            w, h = plan.size
            col_mode, row_mode = _modes(w, h)
            x1, y1 = plan.box[0], plan.box[1]
            y, x = y1 + plan.by0, x1 + plan.bx0
            places.append((y, x, h_i, w_i))
            region[i, :h_i, :w_i] = avatar.frames[i][y : y + h_i, x : x + w_i]
            # the mask exactly as the CPU compositor resizes it (its alpha is derived from this)
            resized_mask = cv2.resize(np.asarray(avatar.masks[i]), (w, h), interpolation=cv2.INTER_LINEAR)
            mask[i, :h_i, :w_i] = resized_mask[plan.by0 : plan.by1, plan.bx0 : plan.bx1]
            for key, table, mats, size, lo, n_out, mode, index in (
                ((h, plan.by0, plan.by1, row_mode), rows, row_mats, h, plan.by0, h_i, row_mode, row_index),
                ((w, plan.bx0, plan.bx1, col_mode), cols, col_mats, w, plan.bx0, w_i, col_mode, col_index),
            ):
                k = table.get(key)
                if k is None:
                    k = table[key] = len(mats)
                    full = resize_matrix(CROP_SIZE, size, mode)[lo : lo + n_out]
                    pad = rh if mats is row_mats else rw
                    padded = np.zeros((pad, CROP_SIZE), np.float64)
                    padded[:n_out] = full
                    mats.append(padded)
                index[i] = k
        if not row_mats:
            row_mats.append(np.zeros((rh, CROP_SIZE)))
            col_mats.append(np.zeros((rw, CROP_SIZE)))
        f32 = torch.float32
        return cls(
            avatar=avatar,
            region=torch.from_numpy(region).to(device),
            mask=torch.from_numpy(mask).to(device),
            row_table=torch.from_numpy(np.stack(row_mats)).to(device=device, dtype=f32),
            col_table=torch.from_numpy(np.stack(col_mats)).to(device=device, dtype=f32),
            row_index=torch.from_numpy(row_index).to(device),
            col_index=torch.from_numpy(col_index).to(device),
            places=places,
        )

    def blend(self, frame_indices: list[int], faces: torch.Tensor) -> np.ndarray:
        """uint8 [B, Rh, Rw, 3] finished blend regions (on the CPU) for RGB faces in [0, 1]
        ``faces`` [B, 3, 256, 256] (any float dtype, on the device)."""
        return to_host(self.blend_on_device(frame_indices, faces))

    def blend_on_device(self, frame_indices: list[int], faces: torch.Tensor) -> torch.Tensor:
        """:meth:`blend`'s regions left on the device (uint8, queued on its current stream), for
        a caller that copies them out without waiting (the engine's overlapped batches)."""
        idx = index_tensor(frame_indices, self.region.device)
        with torch.inference_mode():
            # the CPU path rounds the decoded face to uint8 first; so do we (exact in float32)
            q = (faces.float() * 255.0).round().flip(1)  # RGB -> BGR, [B, 3, 256, 256]
            rows = self.row_table[self.row_index[idx]]  # [B, Rh, 256]
            cols = self.col_table[self.col_index[idx]]  # [B, Rw, 256]
            resized = torch.matmul(torch.matmul(rows[:, None], q), cols[:, None].transpose(-1, -2))
            gen = torch.floor(resized + 0.5).clamp_(0, 255).permute(0, 2, 3, 1)  # [B, Rh, Rw, 3], ties up as OpenCV
            m = self.mask[idx].float()
            alpha = torch.floor((m * 256 + 127) / 255)[..., None]  # 0..256
            orig = self.region[idx].float()
            out = torch.floor((gen * alpha + orig * (256 - alpha) + 128) / 256)
            return out.to(torch.uint8)

    def paste(self, frame_index: int, region: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """A copy of the avatar frame with ``region`` (from :meth:`blend`) pasted in; made in
        ``out`` when given (an array of the frame's shape, e.g. a slot of shared memory)."""
        if out is None:
            out = np.array(self.avatar.frames[frame_index], copy=True)
        else:
            np.copyto(out, self.avatar.frames[frame_index])
        place = self.places[frame_index]
        if place is not None:
            y, x, h, w = place
            out[y : y + h, x : x + w] = region[:h, :w]
        return out
