"""The official MuseTalk v1.5 blending mask: BiSeNet face parsing in 'jaw' mode on the crop.

Follows ``musetalk/utils/blending.py::get_image_prepare_material`` with
``musetalk/utils/face_parsing/__init__.py::FaceParsing(mode="jaw")`` (left/right cheek width 90,
the v1.5 scripts' defaults), step for step:

1. cut the crop box from the frame, black where it leaves the image (PIL's ``crop`` padding);
2. resize to 512x512 (PIL bilinear), RGB, ``ToTensor`` + ImageNet normalisation, BiSeNet, first
   output, argmax over the 19 classes;
3. 'jaw' mode: skin (1) is dilated downwards with a cone-shaped kernel (so the chin/jaw edge is
   covered generously), on the two side strips (cheeks, outside +-90 px of the 512 px centre) that
   dilated skin is eroded twice with a flat 35x3 ellipse (thinner cheeks), nose (10) is removed,
   and mouth, upper lip and lower lip (11, 12, 13) are added. Everything else (brows, eyes,
   ears, neck, hair, cloth, background) is 0. The 'raw' mode would be plain {1, 11, 12, 13}; the
   'neck' mode adds 14;
4. resize the 0/255 label mask back to the crop size (PIL's default for 'L' images, bicubic);
5. keep it only inside the face box, keep rows from 0.5 of the crop height down, Gaussian blur
   with kernel ``int(0.1 * crop_w // 2 * 2) + 1``.

Then, as :func:`pipeline.avatar.geometry.jaw_mask` (the landmark fallback) does, the blurred crop
mask is cut to the face box and resized to 256x256: outside the face box the official paste
leaves the original pixels, so only that part of the mask matters to the compositor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.avatar.geometry import UPPER_BOUNDARY_RATIO, _window, blur_kernel_size
from pipeline.avatar.model import CROP_SIZE

PARSE_SIZE = 512
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SKIN, NOSE = 1, 10
MOUTH_LIPS = (11, 12, 13)
CHEEK_WIDTH = 90  # --left_cheek_width / --right_cheek_width defaults of the v1.5 scripts


def _cone_kernel(cone_height: int = 21, tail_height: int = 12) -> np.ndarray:
    """FaceParsing's dilation kernel: a downward-opening cone (lower half of a 21-row triangle)
    on a vertical stem, 33x33."""
    total = cone_height + tail_height
    kernel = np.zeros((total, total), dtype=np.uint8)
    cx = total // 2
    for row in range(cone_height // 2, cone_height):
        width = 2 * (row - cone_height // 2) + 1
        kernel[row, cx - width // 2 : cx + width // 2 + 1] = 1
    base = int(kernel[cone_height - 1].sum())
    for row in range(cone_height, total):
        kernel[row, max(0, cx - base // 2) : min(total, cx + base // 2 + 1)] = 1
    return kernel


_KERNEL = _cone_kernel()
_CHEEK_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))


def _cheek_mask(left: int = CHEEK_WIDTH, right: int = CHEEK_WIDTH) -> np.ndarray:
    mask = np.zeros((PARSE_SIZE, PARSE_SIZE), dtype=np.uint8)
    c = PARSE_SIZE // 2
    cv2.rectangle(mask, (0, 0), (c - left, PARSE_SIZE), 255, -1)
    cv2.rectangle(mask, (c + right, 0), (PARSE_SIZE, PARSE_SIZE), 255, -1)
    return mask


_CHEEKS = _cheek_mask()


def jaw_labels_to_mask(parsing: np.ndarray) -> np.ndarray:
    """FaceParsing 'jaw' mode on a 512x512 label map: uint8 0/255."""
    face = np.where(parsing == SKIN, 255, 0).astype(np.uint8)
    dilated = cv2.dilate(face, _KERNEL, iterations=1)
    eroded = cv2.erode(dilated, _CHEEK_KERNEL, iterations=2)
    face = cv2.bitwise_or(cv2.bitwise_and(eroded, _CHEEKS), cv2.bitwise_and(dilated, cv2.bitwise_not(_CHEEKS)))
    keep = ((face == 255) & (parsing != NOSE)) | np.isin(parsing, MOUTH_LIPS)
    return np.where(keep, 255, 0).astype(np.uint8)


def parse_labels(model: Any, crop_bgr: np.ndarray) -> np.ndarray:
    """BiSeNet labels int64 [512, 512] of a BGR crop (any size)."""
    import torch
    from PIL import Image

    rgb = Image.fromarray(np.ascontiguousarray(crop_bgr[:, :, ::-1]))
    rgb = rgb.resize((PARSE_SIZE, PARSE_SIZE), Image.Resampling.BILINEAR)
    x = (np.asarray(rgb, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    param = next(model.parameters())
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None].to(param.device, param.dtype)
    with torch.inference_mode():
        out = model(t)[0]
    return out[0].argmax(0).cpu().numpy()


def parsing_jaw_mask(
    model: Any,
    frame_bgr: np.ndarray,
    face_box: np.ndarray | tuple[int, int, int, int],
    crop_box: np.ndarray | tuple[int, int, int, int],
    size: int = CROP_SIZE,
) -> np.ndarray:
    """The official v1.5 mask of one frame, in face-box coordinates: ``uint8 [size, size]``."""
    from PIL import Image

    fx1, fy1, fx2, fy2 = (int(v) for v in face_box)
    cx1, cy1, cx2, cy2 = (int(v) for v in crop_box)
    crop_w, crop_h = cx2 - cx1, cy2 - cy1
    if crop_w <= 0 or crop_h <= 0 or fx2 <= fx1 or fy2 <= fy1:
        return np.zeros((size, size), dtype=np.uint8)
    crop = _window_rgb(np.asarray(frame_bgr), cx1, cy1, cx2, cy2)
    parsed = jaw_labels_to_mask(parse_labels(model, crop))
    mask = np.asarray(Image.fromarray(parsed).resize((crop_w, crop_h), Image.Resampling.BICUBIC))

    inside = np.zeros((crop_h, crop_w), dtype=np.uint8)
    bx1, by1, bx2, by2 = fx1 - cx1, fy1 - cy1, fx2 - cx1, fy2 - cy1
    inside[max(by1, 0) : max(by2, 0), max(bx1, 0) : max(bx2, 0)] = 1
    mask = mask * inside
    mask[: int(crop_h * UPPER_BOUNDARY_RATIO)] = 0

    k = blur_kernel_size(crop_w)
    mask = cv2.GaussianBlur(mask, (k, k), 0)
    return cv2.resize(_window(mask, bx1, by1, bx2, by2), (size, size), interpolation=cv2.INTER_LINEAR)


def parsing_masks(model: Any, frames: np.ndarray, face_boxes: np.ndarray, crop_boxes: np.ndarray) -> np.ndarray:
    """:func:`parsing_jaw_mask` for every frame: uint8 [N, 256, 256]."""
    masks = np.zeros((len(frames), CROP_SIZE, CROP_SIZE), dtype=np.uint8)
    for i in range(len(frames)):
        masks[i] = parsing_jaw_mask(model, np.asarray(frames[i]), face_boxes[i], crop_boxes[i])
    return masks


def load_parsing_model(path: Path | str | None, device: str = "cpu") -> Any | None:
    """BiSeNet from ``path``, or None when no path is given, the file is absent or torch is not
    installed (the landmark mask is used then). A file that is there but wrong raises
    :class:`~pipeline.errors.EngineUnavailable` naming the file and key."""
    if path is None or not Path(path).is_file():
        return None
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    from pipeline.avatar.bisenet import load_bisenet

    return load_bisenet(path, device=device)


def _window_rgb(img: np.ndarray, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    """``img[y1:y2, x1:x2]`` padded with black where it leaves the image (PIL ``crop``)."""
    h, w = img.shape[:2]
    out = np.zeros((y2 - y1, x2 - x1, img.shape[2]), dtype=img.dtype)
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if sx2 > sx1 and sy2 > sy1:
        out[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = img[sy1:sy2, sx1:sx2]
    return out
