"""The MuseTalk v1.5 engine: one UNet pass at timestep 0 + VAE decode per frame, batched.

Per request: latents [8, 32, 32] of its avatar frame (vae_cache) and audio tokens [50, 384] of its
audio frame (features, positional encoding added here, once) -> UNet -> [4, 32, 32] -> / 0.18215 ->
VAE decoder -> (x / 2 + 0.5).clamp(0, 1) * 255, rounded, RGB -> BGR. Requests of any avatars and
sessions mix freely in one batch; all per-avatar state lives on the engine's device.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.avatar.model import Avatar
from pipeline.engines.base import Engine, FrameRequest
from pipeline.engines.musetalk.features import (
    D_MODEL,
    DEFAULT_CONTEXT_SECONDS,
    DEFAULT_FRAMES_PER_RUN,
    DEFAULT_HANGOVER_SECONDS,
    N_TOKENS,
    MuseTalkFeaturizer,
    WhisperBatcher,
    positional_encoding,
)
from pipeline.engines.musetalk.loader import DTYPES, load_models, resolve_device
from pipeline.engines.musetalk.vae_cache import SCALING_FACTOR, load_or_compute_latents
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


class MuseTalkEngine(Engine):
    """MuseTalk v1.5 on one device (``"cpu"``, ``"cuda:N"``); fp16 by default, fp32 on a CPU.

    Options (all validated): ``models_dir`` (official layout), ``batch_size`` (most frames per
    UNet/VAE pass), ``context_seconds`` / ``frames_per_run`` / ``hangover_seconds`` (streaming
    audio features, see :class:`~pipeline.engines.musetalk.features.MuseTalkFeaturizer`),
    ``whisper_batch`` (most 30 s windows per encoder pass), ``latents_batch`` (frames per VAE
    encode when an avatar's cache is built). Unknown options are logged and ignored, so a newer
    config still starts an older engine.
    """

    name = "musetalk"

    def __init__(
        self,
        *,
        device: str = "cpu",
        dtype: str = "fp16",
        models_dir: str | Path = "models",
        batch_size: int = 16,
        context_seconds: float | None = DEFAULT_CONTEXT_SECONDS,
        frames_per_run: int = DEFAULT_FRAMES_PER_RUN,
        hangover_seconds: float = DEFAULT_HANGOVER_SECONDS,
        whisper_batch: int = 8,
        latents_batch: int = 8,
        **options: Any,
    ) -> None:
        if options:
            log.warning("musetalk engine: ignoring unknown option(s) %s", ", ".join(sorted(options)))
        if dtype not in DTYPES:
            raise ConfigError(f"musetalk dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        for key, value in (
            ("batch_size", batch_size),
            ("whisper_batch", whisper_batch),
            ("latents_batch", latents_batch),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"musetalk {key} must be a positive integer, got {value!r}")
        dev = resolve_device(device)
        if dev.type == "cpu" and dtype == "fp16":
            log.info("musetalk engine on cpu: fp16 is slow or unsupported there, using fp32")
            dtype = "fp32"
        self.device = dev
        self.dtype = DTYPES[dtype]
        self.batch_size = batch_size
        self.latents_batch = latents_batch
        self._featurizer_options = {
            "context_seconds": None if context_seconds is None else float(context_seconds),
            "frames_per_run": int(frames_per_run),
            "hangover_seconds": float(hangover_seconds),
        }
        # fail now on bad featurizer options rather than at a session's first frame
        try:
            MuseTalkFeaturizer(None, **self._featurizer_options)  # type: ignore[arg-type]  # checks only
        except ValueError as exc:
            raise ConfigError(f"musetalk {exc}") from None

        self.models = load_models(models_dir, device=dev, dtype=self.dtype)
        self.whisper = WhisperBatcher(
            self.models.whisper, self.models.feature_extractor, max_batch=whisper_batch
        )
        self._pe = positional_encoding(device=dev, dtype=self.dtype)  # [50, 384]
        self._latents: dict[tuple[str, str], torch.Tensor] = {}
        self._avatar_lock = threading.Lock()
        self._run_lock = threading.Lock()

    # -- Engine interface --------------------------------------------------------------------------

    def new_featurizer(self) -> MuseTalkFeaturizer:
        return MuseTalkFeaturizer(self.whisper, **self._featurizer_options)

    def load_avatar(self, avatar: Avatar) -> None:
        self._avatar_latents(avatar)

    def generate(self, requests: Sequence[FrameRequest]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for lo in range(0, len(requests), self.batch_size):
            images = self.generate_float(requests[lo : lo + self.batch_size])  # [B, 3, 256, 256] in [0, 1]
            pixels = (images * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).flip(-1).cpu().numpy()
            out.extend(np.ascontiguousarray(p) for p in pixels)
        return out

    def close(self) -> None:
        self._latents.clear()
        self.models = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- internals ---------------------------------------------------------------------------------

    def generate_float(self, requests: Sequence[FrameRequest]) -> torch.Tensor:
        """The decoded faces before uint8 rounding: float32 RGB [B, 3, 256, 256] in [0, 1], on the
        engine's device (exposed for the reference test and for GPU-side blending)."""
        if not requests:
            return torch.zeros((0, 3, self.crop_size, self.crop_size), device=self.device)
        latents = torch.stack([self._avatar_latents(r.avatar)[r.frame_index] for r in requests])
        tokens = torch.stack([self._tokens(r.features) for r in requests]) + self._pe
        unet, vae = self.models.unet, self.models.vae
        with self._run_lock, torch.inference_mode():
            timestep = torch.zeros((), device=self.device, dtype=torch.long)
            pred = unet(latents, timestep, encoder_hidden_states=tokens).sample  # [B, 4, 32, 32]
            image = vae.decode(pred / SCALING_FACTOR).sample
            return (image.float() / 2 + 0.5).clamp(0, 1)

    def _tokens(self, features: Any) -> torch.Tensor:
        t = torch.as_tensor(features)
        if tuple(t.shape) != (N_TOKENS, D_MODEL):
            raise ValueError(f"musetalk features must be [{N_TOKENS}, {D_MODEL}], got {list(t.shape)}")
        return t.to(device=self.device, dtype=self.dtype)

    def _avatar_latents(self, avatar: Avatar) -> torch.Tensor:
        key = (str(Path(avatar.root).resolve()), str(avatar.meta.get("created", "")))
        latents = self._latents.get(key)
        if latents is not None and latents.shape[0] == avatar.frame_count:
            return latents
        with self._avatar_lock:
            latents = self._latents.get(key)
            if latents is None or latents.shape[0] != avatar.frame_count:
                with self._run_lock:
                    cpu, fresh = load_or_compute_latents(
                        avatar, self.models.vae, self.models.vae_sha256, batch_size=self.latents_batch
                    )
                log.info(
                    "avatar %s: MuseTalk latents %s (%d frames)",
                    avatar.id,
                    "computed" if fresh else "loaded",
                    len(cpu),
                )
                latents = cpu.to(device=self.device, dtype=self.dtype)
                self._latents[key] = latents
        return latents
