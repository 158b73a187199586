"""Shared fixtures: a demo avatar prepared once per run, and espeak-ng speech clips."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.speech import SpeechClip, speech_clip


@pytest.fixture(scope="session")
def avatars_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An avatars directory holding the prepared demo avatar, shared by the whole run."""
    from pipeline.avatar.demo import ensure_demo_avatar
    from pipeline.avatar.store import AvatarStore

    root = tmp_path_factory.mktemp("avatars")
    ensure_demo_avatar(AvatarStore(root))
    return root


@pytest.fixture(scope="session")
def demo_avatar(avatars_root: Path):
    from pipeline.avatar.store import AvatarStore

    return AvatarStore(avatars_root).load("demo")


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> SpeechClip:
    """~4.6 s of espeak-ng speech with 1 s of silence before and after, 22050 Hz mono wav."""
    return speech_clip(tmp_path_factory.mktemp("speech") / "speech.wav")


@pytest.fixture(scope="session")
def mouth_roi(demo_avatar) -> tuple[int, int, int, int]:
    """The demo avatar's mouth (landmarks 48..67) with an 8 px margin: where lip motion shows."""
    points = demo_avatar.landmarks[0][48:68]
    x1, y1 = points.min(axis=0) - 8
    x2, y2 = points.max(axis=0) + 8
    return int(x1), int(y1), int(x2), int(y2)
