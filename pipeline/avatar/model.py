"""The in-memory form of a prepared avatar and the on-disk layout it is stored in.

Layout of ``<avatars_dir>/<id>/`` (format version :data:`FORMAT_VERSION`; no pickle anywhere):

- ``avatar.json``          metadata: format_version, id, source (name, sha256), fps, frame_count,
                           cycle_length, width, height, created (ISO 8601 UTC), mask ("landmark"
                           or "bisenet").
- ``frames.npy``           uint8 [N, H, W, 3] BGR, the normalised 25 fps frames (memory-mapped on
                           load, so sessions share the page cache instead of copies).
- ``geometry.safetensors`` face_boxes int32 [N, 4] (x1, y1, x2, y2, exclusive end), crop_boxes
                           int32 [N, 4] (may extend past the image), landmarks float32 [N, 68, 2]
                           (iBUG order, image pixels), detected uint8 [N] (1 = face found in that
                           frame, 0 = box interpolated from neighbours).
- ``masks.npy``            uint8 [N, 256, 256] blending mask in *face-box* coordinates (the same
                           grid as a generated face crop), 255 = take the generated pixel.
- ``preview.jpg``          the first frame, for pickers.
- ``<engine>/...``         engine caches (e.g. ``musetalk/latents.safetensors``).

Why masks live in face-box coordinates: the official blend pastes the generated face into the
crop box and alpha-blends the whole crop, but outside the face box the pasted crop equals the
original frame, so blending there is a no-op. Keeping only the face-box part is exactly
equivalent and lets the compositor touch only the pixels that can change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
FPS = 25
CROP_SIZE = 256  # generated face crops and masks are CROP_SIZE x CROP_SIZE


@dataclass
class Avatar:
    """A prepared avatar; arrays are indexed by avatar frame (0..frame_count-1)."""

    id: str
    root: Path
    frames: np.ndarray  # uint8 [N, H, W, 3] BGR (often a read-only view of a memory-mapped file)
    face_boxes: np.ndarray  # int32 [N, 4]
    crop_boxes: np.ndarray  # int32 [N, 4]
    landmarks: np.ndarray  # float32 [N, 68, 2]
    masks: np.ndarray  # uint8 [N, 256, 256]
    detected: np.ndarray  # uint8 [N]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def frame_count(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the avatar's frames."""
        return int(self.frames.shape[2]), int(self.frames.shape[1])

    @property
    def cycle_length(self) -> int:
        """Length of the ping-pong idle cycle (forward then backward, ends not repeated)."""
        return cycle_length(self.frame_count)

    def cycle_index(self, video_frame: int) -> int:
        """Avatar frame shown at output video frame ``video_frame``."""
        return pingpong_index(video_frame, self.frame_count)


def cycle_length(n: int) -> int:
    return 1 if n <= 1 else 2 * n - 2


def pingpong_index(i: int, n: int) -> int:
    """Forward then backward over ``n`` frames, so the idle loop never jumps: 0,1,..,n-1,n-2,..,1,0,1..."""
    if n <= 1:
        return 0
    k = i % (2 * n - 2)
    return k if k < n else 2 * n - 2 - k
