"""The engine interface every lip-sync engine implements.

An engine never knows about sessions or the network. It is used in two steps:

1. Per audio stream, a :class:`Featurizer` (stateful: smoothing, context) turns each video
   frame's audio window into :class:`FrameFeatures`. ``active=False`` means the frame needs no
   engine work at all and shows the idle avatar frame, so silence costs nothing.
2. Per device, a batch of :class:`FrameRequest` s, possibly from many sessions and avatars, goes
   through :meth:`Engine.generate`, which returns one 256x256 BGR face crop per request. The
   compositor (:mod:`pipeline.compositor`) blends each crop into its avatar frame.
   :meth:`Engine.compose` does both and returns full frames; an engine may override it to blend
   on its own device (the MuseTalk engine blends on the GPU and copies back only the face box).

A featurizer whose work is heavy (a neural encoder) says so with ``blocking = True``: live
sessions then never call it on the asyncio loop but through a per-device
:class:`~pipeline.live.feature_worker.FeatureWorker` thread, which also runs the jobs of all
sessions together through the featurizer's ``batcher`` (an object with
``features(jobs: [(featurizer, frames)]) -> [[FrameFeatures]]``) when it has one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from pipeline.audio.windows import AudioFrame
from pipeline.avatar.model import Avatar


@dataclass(frozen=True)
class FrameFeatures:
    """What one video frame's audio means to an engine."""

    active: bool  # False: no engine work, the idle avatar frame is shown unchanged
    data: Any  # engine-specific (lite: mouth parameters; musetalk: [50, 384] whisper tokens)


@dataclass(frozen=True)
class FrameRequest:
    """One face crop to generate: which avatar frame, driven by which features."""

    avatar: Avatar
    frame_index: int  # avatar frame (after the ping-pong cycle)
    features: Any  # FrameFeatures.data of an active frame


class Featurizer(ABC):
    """Turns a stream's audio frames into features; one instance per stream, in frame order."""

    #: True: :meth:`features` runs a model (milliseconds to seconds); keep it off the event loop.
    blocking: ClassVar[bool] = False
    #: Runs several streams' jobs in one pass (see the module docstring); None: one at a time.
    batcher: Any = None

    @abstractmethod
    def features(self, frames: Sequence[AudioFrame]) -> list[FrameFeatures]:
        """Features for consecutive frames of this stream (called in order, any batch size)."""

    def reset(self) -> None:
        """Forget all state (after an interrupt) so the next frame starts from rest."""


class Engine(ABC):
    """A lip-sync model bound to one device."""

    name: ClassVar[str]
    crop_size: ClassVar[int] = 256

    @abstractmethod
    def new_featurizer(self) -> Featurizer:
        """A fresh featurizer for one audio stream."""

    @abstractmethod
    def load_avatar(self, avatar: Avatar) -> None:
        """Prepare per-avatar state once (idempotent); shared by every stream of that avatar."""

    @abstractmethod
    def generate(self, requests: Sequence[FrameRequest]) -> list[np.ndarray]:
        """One uint8 BGR [crop_size, crop_size, 3] face crop per request, in order."""

    def calibration_features(self, n: int) -> list[Any]:
        """``n`` feature payloads (``FrameFeatures.data``) of *active* frames, for timing.

        The device pool times :meth:`compose` on them at start to learn how many talking
        sessions a device carries (:mod:`pipeline.live.calibration`), so they must cost what
        speech costs; random values of the right shape, dtype and device are fine. An engine
        without them can only run with a configured ``engine.capacity_sessions``.
        """
        raise NotImplementedError

    def compose(self, requests: Sequence[FrameRequest]) -> list[np.ndarray]:
        """One full uint8 BGR avatar frame per request, the generated face blended in, in order.

        Default: :meth:`generate`, then the CPU :class:`~pipeline.compositor.Compositor`
        (one per avatar, cached). Engines that can blend on their device override this.
        """
        crops = self.generate(requests)
        return [
            self._cpu_compositor(r.avatar).compose(r.frame_index, crop)
            for r, crop in zip(requests, crops, strict=True)
        ]

    def compose_staged(self, requests: Sequence[FrameRequest]) -> Callable[..., list[np.ndarray]]:
        """:meth:`compose` in two stages: the device's part now, and a function that finishes
        the frames on the CPU (pasting, copying) and returns them.

        Why: the batching worker calls the second stage on another thread, so the device starts
        its next batch while this one's frames are finished; an engine whose device work ends
        with the CPU work (the default: everything in stage one) gains nothing and loses
        nothing.

        The second stage takes an optional ``into``: per frame, an array of the frame's shape to
        write it in (shared memory a device process hands its server) or None; the frames it
        returns are then those arrays. An engine that pastes its frames together anyway writes
        them there directly instead of copying them twice."""
        frames = self.compose(requests)
        return lambda into=None: place_frames(frames, into)

    def _cpu_compositor(self, avatar: Avatar) -> Any:
        from pipeline.compositor import Compositor  # lazy: cv2 only when composing

        cache = self.__dict__.setdefault("_compositors", {})
        compositor = cache.get(avatar.id)
        if compositor is None or compositor.avatar is not avatar:
            compositor = cache[avatar.id] = Compositor(avatar)
        return compositor

    def close(self) -> None:
        """Release device memory and threads."""


def place_frames(frames: Sequence[np.ndarray], into: Sequence[np.ndarray | None] | None) -> list[np.ndarray]:
    """``frames`` copied into the arrays of ``into`` where it has one (see
    :meth:`Engine.compose_staged`): what the second stage of an engine without its own returns."""
    if into is None:
        return list(frames)
    if len(into) != len(frames):
        raise ValueError(f"{len(into)} destinations for {len(frames)} frames")
    placed: list[np.ndarray] = []
    for frame, dest in zip(frames, into, strict=True):
        if dest is None:
            placed.append(frame)
        else:
            np.copyto(dest, frame)
            placed.append(dest)
    return placed
