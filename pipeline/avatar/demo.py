"""The built-in demo avatar, so the server works out of the box with nothing downloaded.

Its source is scikit-image's ``astronaut`` photograph (Eileen Collins, a NASA photograph in the
public domain) that ships inside the scikit-image package: 512x512, one frontal face of about
90 px. Being a still, the demo avatar has a single frame (no idle motion).
"""

from __future__ import annotations

import numpy as np

from pipeline.avatar.model import Avatar
from pipeline.avatar.store import AvatarDamaged, AvatarStore
from pipeline.errors import AvatarExists, AvatarNotFound

DEMO_ID = "demo"
DEMO_SOURCE_NAME = "skimage.data.astronaut"


def demo_image() -> np.ndarray:
    """The astronaut photograph as BGR uint8 [512, 512, 3]."""
    from skimage import data

    rgb = data.astronaut()
    return np.ascontiguousarray(rgb[:, :, ::-1])


def ensure_demo_avatar(store: AvatarStore) -> Avatar:
    """Load the demo avatar, preparing it first if it is missing or damaged.

    Safe when several processes start at once (e.g. server workers, parallel test runs): each may
    prepare it, the first rename wins, and the losers load the winner's copy.
    """
    from pipeline.avatar.prepare import prepare_avatar

    try:
        return store.load(DEMO_ID)
    except AvatarNotFound:
        # a directory without avatar.json is debris (not a prepared avatar): replace it
        overwrite = store.path(DEMO_ID).exists()
    except AvatarDamaged:
        overwrite = True  # e.g. an older format version, or a file truncated by a full disk
    try:
        return prepare_avatar(
            demo_image(), DEMO_ID, store, overwrite=overwrite, source_name=DEMO_SOURCE_NAME
        )
    except AvatarExists:
        return store.load(DEMO_ID)
