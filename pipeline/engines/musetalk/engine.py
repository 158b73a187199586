"""The MuseTalk v1.5 engine: one UNet pass at timestep 0 + VAE decode per frame, batched.

Per request: latents [8, 32, 32] of its avatar frame (vae_cache) and audio tokens [50, 384] of its
audio frame (features, positional encoding added here, once) -> UNet -> [4, 32, 32] -> / 0.18215 ->
VAE decoder -> (x / 2 + 0.5).clamp(0, 1) * 255, rounded, RGB -> BGR. Requests of any avatars and
sessions mix freely in one batch; all per-avatar state lives on the engine's device.

:meth:`MuseTalkEngine.compose` also blends on the device (:mod:`.blend`): only the finished
face-box regions (uint8) cross to the CPU, which pastes them into copies of the frames.

Speed options (bench/musetalk_engine.py measures each; docs/benchmarks.md): ``channels_last``
(NHWC convolutions, cuDNN's fast layout for fp16), ``cuda_graphs`` (UNet + VAE decode captured
once per padded batch size and replayed: no per-kernel launch cost), ``compile`` (torch.compile
of both models: "default" compiles once with a dynamic batch dimension, "static" and
"max-autotune" once per padded batch size), ``attention`` ("sdpa", diffusers' default, or "classic" for the explicit
softmax(QK^T)V the older official code ran). With graphs or compile, batches are padded up to a
few fixed sizes (every size up to ``batch_size`` with a dynamic compile or none, where a size
costs only a graph capture; 1, 2, 4, 8, 12, 16, 20, 24, 32, 40, 48, 64, ... with static compiles)
so only those shapes are captured;
``warmup`` (default on a GPU) captures or compiles them all when the engine starts, so the first
sessions do not stall on it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.avatar.model import Avatar
from pipeline.engines.base import Engine, FrameRequest
from pipeline.engines.musetalk.blend import AvatarBlendCache
from pipeline.engines.musetalk.features import (
    D_MODEL,
    DEFAULT_CONTEXT_SECONDS,
    DEFAULT_FRAMES_PER_RUN,
    DEFAULT_HANGOVER_SECONDS,
    MAX_CROP_POSITIONS,
    MIN_CROP_POSITIONS,
    N_TOKENS,
    SAMPLE_RATE,
    WHISPER_FPS,
    MuseTalkFeaturizer,
    WhisperBatcher,
    positional_encoding,
    run_positions,
)
from pipeline.engines.musetalk.loader import DTYPES, load_models, resolve_device
from pipeline.engines.musetalk.transfer import index_tensor, start_to_host, take_asleep, to_host, wait_event_asleep
from pipeline.engines.musetalk.upsample import fold_upsamplers
from pipeline.engines.musetalk.vae_cache import SCALING_FACTOR, load_or_compute_latents
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


class MuseTalkEngine(Engine):
    """MuseTalk v1.5 on one device (``"cpu"``, ``"cuda:N"``); fp16 by default, fp32 on a CPU.

    Options (all validated): ``models_dir`` (official layout), ``batch_size`` (most frames per
    UNet/VAE pass), ``context_seconds`` / ``frames_per_run`` / ``hangover_seconds`` (streaming
    audio features, see :class:`~pipeline.engines.musetalk.features.MuseTalkFeaturizer`),
    ``whisper_batch`` (most windows per encoder pass), ``whisper_windows`` ("trimmed": each
    window encoded over the positions its audio needs, or "padded": Whisper's full 30 s input;
    :class:`~pipeline.engines.musetalk.features.WhisperBatcher`), ``whisper_crop_seconds``
    (trimmed windows cut to their last this many seconds, at their place in the segment; None:
    the whole segment so far), ``vae_upsample`` ("folded":
    the VAE decoder's nearest-2x + 3x3 convolutions as one 2x2 convolution per output phase, the
    same function with 0.45x the arithmetic, :mod:`.upsample`, no faster on an H200 for its
    interleave; "transposed": the same taps as one stride-2 transposed convolution, the CUDA
    default; "reference": diffusers' layers as loaded, the CPU default: docs/design-notes.md),
    ``latents_batch`` (frames per VAE
    encode when an avatar's cache is built), ``gpu_blend`` (blend on the engine's device in
    :meth:`compose`; default True), ``channels_last`` / ``cuda_graphs`` / ``compile`` /
    ``attention`` (speed, module docstring; None picks :data:`CUDA_DEFAULTS` on a GPU and off on
    a CPU; ``vae_upsample`` None likewise: transposed on a GPU, reference on a CPU),
    ``compile_tuning`` (:data:`COMPILE_TUNING`: more tuning of the compiled decode's kernels, a
    longer start), ``overlap_batches`` (:meth:`compose_staged` returns once a batch is queued on
    the device, so the batching worker prepares the next one meanwhile; None: on a GPU with
    ``gpu_blend``). Unknown options are logged and ignored, so a newer config still starts an older engine.
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
        whisper_windows: str = "trimmed",
        whisper_crop_seconds: float | None = None,
        vae_upsample: str | None = None,
        latents_batch: int = 8,
        gpu_blend: bool = True,
        channels_last: bool | None = None,
        cuda_graphs: bool | None = None,
        compile: str | None = None,  # the option's name in configs (shadows the builtin here only)
        compile_tuning: str = "none",
        overlap_batches: bool | None = None,
        attention: str = "sdpa",
        warmup: bool | None = None,
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
        on_cuda = dev.type == "cuda"
        if channels_last is None:
            channels_last = on_cuda and CUDA_DEFAULTS["channels_last"]
        if cuda_graphs is None:
            cuda_graphs = on_cuda and CUDA_DEFAULTS["cuda_graphs"]
        if compile is None:
            compile = CUDA_DEFAULTS["compile"] if on_cuda else "none"
        if compile not in COMPILE_MODES:
            raise ConfigError(f"musetalk compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
        if whisper_windows not in WHISPER_WINDOWS:
            raise ConfigError(f"musetalk whisper_windows must be one of {', '.join(WHISPER_WINDOWS)}, got {whisper_windows!r}")
        crop_positions = None
        if whisper_crop_seconds is not None:
            crop_positions = _crop_positions(whisper_crop_seconds, whisper_windows, context_seconds, frames_per_run)
        if vae_upsample is None:
            vae_upsample = CUDA_DEFAULTS["vae_upsample"] if on_cuda else "reference"
        if vae_upsample not in VAE_UPSAMPLE:
            raise ConfigError(f"musetalk vae_upsample must be one of {', '.join(VAE_UPSAMPLE)}, got {vae_upsample!r}")
        if compile_tuning not in COMPILE_TUNING:
            raise ConfigError(f"musetalk compile_tuning must be one of {', '.join(COMPILE_TUNING)}, got {compile_tuning!r}")
        if compile_tuning != "none" and compile == "none":
            raise ConfigError(f"musetalk compile_tuning {compile_tuning!r} tunes compiled kernels: it needs compile, which is 'none'")
        if attention not in ("sdpa", "classic"):
            raise ConfigError(f"musetalk attention must be 'sdpa' or 'classic', got {attention!r}")
        if cuda_graphs and not on_cuda:
            raise ConfigError("musetalk cuda_graphs needs a cuda device")
        if overlap_batches is None:
            overlap_batches = on_cuda and bool(gpu_blend) and CUDA_DEFAULTS["overlap_batches"]
        if overlap_batches and not gpu_blend:
            raise ConfigError("musetalk overlap_batches needs gpu_blend: a CPU blend waits for the device anyway")
        self.device = dev
        self.dtype = DTYPES[dtype]
        self.gpu_blend = bool(gpu_blend)
        # the batching worker's cue (pipeline/live/worker.py, "Overlapped batches"): stage one
        # returns with the batch queued on the device, its finish waits for it
        self.overlapped_staging = bool(overlap_batches)
        # seconds the last batch's wait slept on the GPU (cuda only; the worker's batch_host stage)
        self.last_batch_asleep: float | None = None
        # and, from CUDA events on its stream, how long the GPU took for it and how long the
        # stream sat idle between the previous batch and this one (the worker's gpu_batch and
        # gpu_idle stages: how much of the GPU's time the batches leave unused)
        self.last_batch_gpu: float | None = None
        self.last_batch_idle: float | None = None
        self._last_batch_end: Any = None
        self.channels_last = bool(channels_last)
        self.cuda_graphs = bool(cuda_graphs)
        self.compile_mode = compile
        self.compile_tuning = compile_tuning
        self.attention = attention
        self.vae_upsample = vae_upsample
        self.batch_size = batch_size
        # Batches run at their own size up to batch_size when that costs only a graph capture
        # (a shape-generic compile or none): padding a batch of 17 to 20 was ~8 % of the GPU at
        # 16 talking sessions (bench/gpu_costs.py: ~2 ms per padded frame). Static compiles
        # compile per size, so they keep the few PADDED_SIZES.
        self._exact_sizes = batch_size if compile in ("none", "default") else 0
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
            self.models.whisper, self.models.feature_extractor, max_batch=whisper_batch,
            cuda_graphs=bool(self.cuda_graphs), trim=whisper_windows == "trimmed", crop_positions=crop_positions,
        )
        self._pe = positional_encoding(device=dev, dtype=self.dtype)  # [50, 384]
        self._latents: dict[tuple[str, str], torch.Tensor] = {}
        self._blends: dict[tuple[str, str], AvatarBlendCache] = {}
        self._avatar_lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._timestep = torch.zeros((), device=dev, dtype=torch.long)
        self._graphs: dict[int, _Graph] = {}
        self._graph_pool: Any = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._prepare_models()
        if warmup if warmup is not None else on_cuda:
            self.warmup()

    # -- Engine interface --------------------------------------------------------------------------

    def new_featurizer(self) -> MuseTalkFeaturizer:
        return MuseTalkFeaturizer(self.whisper, **self._featurizer_options)

    def load_avatar(self, avatar: Avatar) -> None:
        self._avatar_latents(avatar)
        if self.gpu_blend:
            self._avatar_blend(avatar)

    def calibration_features(self, n: int) -> list[torch.Tensor]:
        """Random [50, 384] audio tokens on the engine's device: the UNet's cost does not depend on
        their values."""
        gen = torch.Generator().manual_seed(0)
        return [
            torch.randn(N_TOKENS, D_MODEL, generator=gen).to(device=self.device, dtype=self.dtype) for _ in range(n)
        ]

    def compose(self, requests: Sequence[FrameRequest]) -> list[np.ndarray]:
        """Full frames: generation and blending on the device, pasting the face boxes on the CPU."""
        return self.compose_staged(requests)()

    def compose_staged(self, requests: Sequence[FrameRequest]) -> Callable[..., list[np.ndarray]]:
        """Stage one: UNet, VAE and the blend on the device, the blended face boxes copied to the
        CPU. Stage two (returned, a :class:`_QueuedBatch`): wait for the device, then paste each
        box into a copy of its avatar frame (made in the frame's ``into`` array where one is
        given). With ``overlap_batches`` stage one returns as soon as the batch is queued on the
        device; otherwise it waits for it, and the timings are the engine thread's."""
        if not self.gpu_blend:
            return super().compose_staged(requests)
        begun = self._gpu_mark()
        pastes: list[tuple[AvatarBlendCache, int, torch.Tensor, int]] = []  # (cache, frame, host regions, row)
        for lo in range(0, len(requests), self.batch_size):
            chunk = requests[lo : lo + self.batch_size]
            faces = self.generate_float(chunk)
            places: list[tuple[AvatarBlendCache, torch.Tensor, int] | None] = [None] * len(chunk)
            groups: dict[int, list[int]] = {}
            caches: dict[int, AvatarBlendCache] = {}
            for k, r in enumerate(chunk):
                cache = self._avatar_blend(r.avatar)
                caches[id(cache)] = cache
                groups.setdefault(id(cache), []).append(k)
            for key, members in groups.items():
                cache = caches[key]
                picked = faces if len(members) == len(chunk) else faces[index_tensor(members, faces.device)]
                with self._on_device():
                    host = start_to_host(cache.blend_on_device([chunk[k].frame_index for k in members], picked))
                for row, k in enumerate(members):
                    places[k] = (cache, host, row)
            for r, place in zip(chunk, places, strict=True):
                assert place is not None
                pastes.append((place[0], r.frame_index, place[1], place[2]))
        queued = _QueuedBatch(self, pastes, begun, self._gpu_mark(blocking=True))
        if not self.overlapped_staging:
            queued.wait()
        return queued

    def _gpu_mark(self, blocking: bool = False) -> Any:
        """A timing event recorded now on the engine's stream (None off CUDA); ``blocking``: one
        that a thread waits for asleep (:func:`~.transfer.wait_asleep`)."""
        if self.device.type != "cuda":
            return None
        with self._on_device():
            event = torch.cuda.Event(enable_timing=True, blocking=blocking)
            event.record()
        return event

    def _time_batch(self, begun: Any, ended: Any) -> None:
        """``last_batch_gpu`` / ``last_batch_idle`` from a batch's first and last events (the
        last one done): its time on the stream, and the stream's idle time before it. Called in
        batch order (the batches' waits run on one thread)."""
        if begun is None:
            return
        try:
            self.last_batch_gpu = begun.elapsed_time(ended) / 1000
            previous, self._last_batch_end = self._last_batch_end, ended
            self.last_batch_idle = None if previous is None else max(0.0, previous.elapsed_time(begun) / 1000)
        except RuntimeError as exc:  # a figure, never worth a batch (a device fault shows in the next one)
            log.warning("musetalk: timing a batch on %s failed: %s", self.device, exc)
            self.last_batch_gpu = self.last_batch_idle = None
            self._last_batch_end = None

    def _paste_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(PASTE_THREADS, thread_name_prefix="musetalk-paste")
        return self._pool

    def warmup(self, max_batch: int | None = None) -> float:
        """Run (capture, compile) every padded batch size up to ``max_batch`` (default: the
        engine's batch size) once on dummy inputs; returns the seconds it took."""
        started = time.perf_counter()
        top = max_batch or self.batch_size
        minimum = 2 if self.compile_mode != "none" else 1
        if self.cuda_graphs or self.compile_mode in ("static", "max-autotune"):
            sizes = sorted({padded_size(n, minimum, self._exact_sizes) for n in range(1, top + 1)})
        else:
            sizes = [max(top, minimum)]
        latent = torch.zeros((1, 8, 32, 32), device=self.device, dtype=self.dtype)
        token = torch.zeros((1, N_TOKENS, D_MODEL), device=self.device, dtype=self.dtype)
        with self._run_lock, torch.inference_mode(), self._on_device():
            # Largest first, so the dynamic-batch compile (on the first call) takes its kernel
            # configurations from the largest batch, the one that matters under load. Graphs
            # share one memory pool; the capture order does not change its size
            # (bench/graph_memory.py on an H200: 59.8 GB either way without compile).
            for size in sorted(sizes, reverse=True):
                latents, tokens = latent.expand(size, -1, -1, -1), token.expand(size, -1, -1)
                if self.cuda_graphs:
                    self._graph_forward(latents, tokens)
                else:
                    self._forward(latents.contiguous(), tokens.contiguous())
        # The feature path: cuDNN and cuFFT plan every new batch size and length of windows on
        # first use (and CUDA graphs are captured). Left to the first speech, that stalled every
        # session ~2 s (and again when a larger group of sessions first spoke at once) on an
        # H200; plan them all now.
        silence = np.zeros(SAMPLE_RATE, np.float32)
        for n in range(self.whisper.max_batch, 0, -1):  # largest first, as above
            for positions in reversed(self.whisper.lengths):
                self.whisper.encode_audio([silence] * n, positions=positions)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        log.info("musetalk: warm-up of batch sizes %s (Whisper 1-%d) took %.1f s", sizes, self.whisper.max_batch, seconds)
        return seconds

    def memory_bytes(self, avatar: Avatar) -> dict[str, int]:
        """Device memory this avatar's state holds: latents and blend caches (benchmarks)."""
        key = _avatar_key(avatar)
        latents = self._latents.get(key)
        blend = self._blends.get(key)
        return {
            "latents": 0 if latents is None else latents.numel() * latents.element_size(),
            "blend": 0 if blend is None else blend.nbytes,
        }

    def generate(self, requests: Sequence[FrameRequest]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for lo in range(0, len(requests), self.batch_size):
            images = self.generate_float(requests[lo : lo + self.batch_size])  # [B, 3, 256, 256] in [0, 1]
            pixels = to_host((images * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).flip(-1))
            out.extend(np.ascontiguousarray(p) for p in pixels)
        return out

    def close(self) -> None:
        self._latents.clear()
        self._blends.clear()
        self._graphs.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
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
        with self._run_lock, torch.inference_mode(), self._on_device():
            n = latents.shape[0]
            if self.cuda_graphs:
                return self._graph_forward(latents, tokens)
            if self.compile_mode in ("static", "max-autotune"):  # one compiled graph per padded size
                size = padded_size(n, minimum=2)
                if size != n:
                    latents = torch.cat([latents, latents[:1].expand(size - n, -1, -1, -1)])
                    tokens = torch.cat([tokens, tokens[:1].expand(size - n, -1, -1)])
                return self._forward(latents, tokens)[:n]
            if self.compile_mode == "default" and n == 1:  # batch 1 would be specialised: pad to 2
                return self._forward(latents.expand(2, -1, -1, -1), tokens.expand(2, -1, -1))[:1]
            return self._forward(latents, tokens)

    def _forward(self, latents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        else:
            latents = latents.contiguous()
        tokens = tokens.contiguous()
        if self.compile_mode == "default":  # one graph for every batch size
            torch._dynamo.maybe_mark_dynamic(latents, 0)
            torch._dynamo.maybe_mark_dynamic(tokens, 0)
        pred = self._unet(latents, self._timestep, encoder_hidden_states=tokens).sample  # [B, 4, 32, 32]
        z = pred / SCALING_FACTOR
        if self.compile_mode == "default":
            torch._dynamo.maybe_mark_dynamic(z, 0)
        image = self._decode(z)
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def _graph_forward(self, latents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        n = latents.shape[0]
        size = padded_size(n, 2 if self.compile_mode != "none" else 1, self._exact_sizes)
        graph = self._graphs.get(size)
        if graph is None:
            graph = self._graphs[size] = self._capture(size, latents[:1], tokens[:1])
        graph.latents[:n].copy_(latents)
        graph.tokens[:n].copy_(tokens)
        graph.graph.replay()
        # the output buffer is reused by the next replay: hand out a copy
        return graph.output[:n].clone()

    def _capture(self, size: int, latent: torch.Tensor, token: torch.Tensor) -> _Graph:
        """Capture UNet + VAE decode at batch ``size`` (graphs share one memory pool: they are
        replayed one at a time on one stream, and each output is copied before the next)."""
        static_latents = latent.expand(size, -1, -1, -1).clone()
        static_tokens = token.expand(size, -1, -1).clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (cuDNN plans, lazy inits)
                self._forward(static_latents, static_tokens)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: work that other threads (the feature worker) launch meanwhile is neither
        # captured nor an error. The capture stream is this device's: torch's default capture
        # stream is one per process, made on whichever device captured first, so an engine on
        # cuda:1 beside one on cuda:0 would capture on the wrong device.
        with torch.cuda.graph(graph, pool=self._graph_pool, stream=stream, capture_error_mode="thread_local"):
            output = self._forward(static_latents, static_tokens)
        log.info("musetalk: captured a CUDA graph for batch %d", size)
        return _Graph(graph, static_latents, static_tokens, output)

    def _on_device(self) -> contextlib.AbstractContextManager[Any]:
        """Makes this engine's GPU the thread's current device while it runs (the worker threads
        of several engines each start on cuda:0), so graph capture, replay and the allocator's
        pools all use the right device."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _prepare_models(self) -> None:
        unet, vae = self.models.unet, self.models.vae
        # the decode path's own view of the VAE; models.vae stays as loaded
        decoder_vae = vae if self.vae_upsample == "reference" else fold_upsamplers(vae, UPSAMPLE_FORMS[self.vae_upsample])[0]
        if self.attention == "classic":
            from diffusers.models.attention_processor import AttnProcessor

            unet.set_attn_processor(AttnProcessor())
        if self.channels_last:
            unet.to(memory_format=torch.channels_last)
            vae.to(memory_format=torch.channels_last)
            decoder_vae.to(memory_format=torch.channels_last)  # the folded layers' own weights
        self._unet = unet
        self._decode = lambda z: decoder_vae.decode(z).sample
        if self.compile_mode != "none":
            mode = "max-autotune-no-cudagraphs" if self.compile_mode == "max-autotune" else None
            dynamic = None if self.compile_mode == "default" else False  # default: marked dims only
            # Tuning is for the decode only (~70 % of a frame's GPU time): with the UNet tuned
            # too, an H200 had not compiled the first batch size after 260 s (against 95 s for
            # every size untuned). torch.compile takes a mode or inductor options, not both;
            # max-autotune's mode already refines its kernels by coordinate descent.
            options = COMPILE_TUNING[self.compile_tuning] if mode is None else None
            self._unet = torch.compile(unet, mode=mode, dynamic=dynamic)
            self._decode = torch.compile(lambda z: decoder_vae.decode(z).sample, mode=mode, dynamic=dynamic, options=options)

    def _tokens(self, features: Any) -> torch.Tensor:
        t = torch.as_tensor(features)
        if tuple(t.shape) != (N_TOKENS, D_MODEL):
            raise ValueError(f"musetalk features must be [{N_TOKENS}, {D_MODEL}], got {list(t.shape)}")
        if t.is_cuda:
            # made on the Whisper batcher's stream, read here on this one: without the mark the
            # allocator could give their memory to the next feature pass (which does not wait
            # for this stream) before this stream has read them
            t.record_stream(torch.cuda.current_stream(t.device))
        return t.to(device=self.device, dtype=self.dtype)

    def _avatar_blend(self, avatar: Avatar) -> AvatarBlendCache:
        key = _avatar_key(avatar)
        cache = self._blends.get(key)
        if cache is not None and cache.avatar is avatar:
            return cache
        with self._avatar_lock:
            cache = self._blends.get(key)
            if cache is None or cache.avatar is not avatar:
                cache = self._blends[key] = AvatarBlendCache.build(avatar, self.device)
                log.info("avatar %s: blend cache on %s, %.1f MB", avatar.id, self.device, cache.nbytes / 1e6)
        return cache

    def _avatar_latents(self, avatar: Avatar) -> torch.Tensor:
        key = _avatar_key(avatar)
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


#: What a cuda device gets when an option is left unset (chosen by bench/musetalk_engine.py).
# The VAE's upsamplers as stride-2 transposed convolutions: the decode 11 % faster on an H200 and
# 2.4 -> 2.1-2.2 ms of GPU per frame in the server (docs/benchmarks.md, "Load test on the H200:
# findings", 2026-12-04 morning); the same function up to fp16 rounding (tests/test_musetalk_upsample.py).
# Overlapped batches: the worker prepares a batch while the GPU runs the one before, instead of
# leaving it idle for its host side (see pipeline/live/worker.py).
CUDA_DEFAULTS: dict[str, Any] = {
    "channels_last": True, "cuda_graphs": True, "compile": "default", "vae_upsample": "transposed",
    "overlap_batches": True,
}
PASTE_THREADS = 4
WHISPER_WINDOWS = ("trimmed", "padded")
# engine.vae_upsample -> the upsample module's form (reference: diffusers' layers as loaded)
UPSAMPLE_FORMS = {"folded": "phases", "transposed": "transposed"}
VAE_UPSAMPLE = ("reference", *UPSAMPLE_FORMS)
COMPILE_MODES = ("none", "default", "static", "max-autotune")
# engine.compile_tuning -> torch.compile's inductor options for the VAE decode. "coordinate": each
# generated kernel's launch configuration refined by coordinate descent (the decode 5 % faster
# on an H200 timed alone, its compile 20 -> 120 s: docs/benchmarks.md, "VAE decode: compile to
# compile"; not yet load-tested).
COMPILE_TUNING: dict[str, dict[str, Any] | None] = {"none": None, "coordinate": {"coordinate_descent_tuning": True}}
#: Batch sizes compiled or captured; a batch is padded up to the next one.
PADDED_SIZES = (1, 2, 4, 8, 12, 16, 20, 24, 32, 40, 48, 64, 96, 128, 192, 256)


def _crop_positions(seconds: Any, windows: str, context_seconds: float | None, frames_per_run: int) -> int:
    """``whisper_crop_seconds`` as Whisper positions, or a ConfigError saying why it cannot be."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ConfigError(f"musetalk whisper_crop_seconds must be a positive number of seconds, got {seconds!r}")
    if windows != "trimmed":
        raise ConfigError("musetalk whisper_crop_seconds needs whisper_windows: trimmed")
    if context_seconds is not None:
        raise ConfigError("musetalk whisper_crop_seconds needs context_seconds unset (the 30 s grid)")
    positions = round(seconds * WHISPER_FPS)
    least = max(MIN_CROP_POSITIONS, run_positions(frames_per_run))
    if not least <= positions <= MAX_CROP_POSITIONS:
        raise ConfigError(
            f"musetalk whisper_crop_seconds must be from {least / WHISPER_FPS:g} (frames_per_run {frames_per_run}) "
            f"to {MAX_CROP_POSITIONS / WHISPER_FPS:g} s, got {seconds!r}"
        )
    return positions


def padded_size(n: int, minimum: int = 1, exact_up_to: int = 0) -> int:
    """The batch size ``n`` frames run at: ``n`` itself up to ``exact_up_to`` (a CUDA graph per
    size is cheap when the compiled model is shape-generic), else the next of PADDED_SIZES."""
    n = max(n, minimum)
    if n <= exact_up_to:
        return n
    for size in PADDED_SIZES:
        if size >= n:
            return size
    return n


def _avatar_key(avatar: Avatar) -> tuple[str, str]:
    # Looked up for every batch: resolving the path each time (realpath: a stat per component)
    # was ~6% of the GIL-holding time of a loaded GPU server (py-spy, H200 load test). Keep it
    # on the avatar object, which is loaded once and shared by its sessions.
    key = avatar.__dict__.get("_musetalk_key")
    if key is None:
        key = avatar.__dict__["_musetalk_key"] = (str(Path(avatar.root).resolve()), str(avatar.meta.get("created", "")))
    return key


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    latents: torch.Tensor
    tokens: torch.Tensor
    output: torch.Tensor


class _QueuedBatch:
    """A batch's stage two (:meth:`MuseTalkEngine.compose_staged`): its blended face boxes are on
    their way to pinned host memory, ``ended`` marks the stream past their copy."""

    def __init__(
        self, engine: MuseTalkEngine, pastes: list[tuple[AvatarBlendCache, int, torch.Tensor, int]], begun: Any, ended: Any
    ) -> None:
        self._engine = engine
        self._pastes = pastes
        self._begun = begun
        self._ended = ended
        self._waited = False

    def wait(self) -> None:
        """Block, asleep, until the device is done with the batch; then set the engine's
        ``last_batch_asleep`` / ``last_batch_gpu`` / ``last_batch_idle`` for it (on this thread:
        the worker reads them here, after the wait). Idempotent."""
        if self._waited:
            return
        self._waited = True
        engine = self._engine
        if self._ended is None:  # a CPU device: done when stage one returned
            engine.last_batch_asleep = None
            return
        take_asleep()
        wait_event_asleep(self._ended)
        engine.last_batch_asleep = take_asleep()
        engine._time_batch(self._begun, self._ended)

    def __call__(self, into: Sequence[np.ndarray | None] | None = None) -> list[np.ndarray]:
        self.wait()
        outs = [None] * len(self._pastes) if into is None else list(into)
        if len(outs) != len(self._pastes):
            raise ValueError(f"{len(outs)} destinations for {len(self._pastes)} frames")
        jobs = [(cache, index, host.numpy()[row], out) for (cache, index, host, row), out in zip(self._pastes, outs, strict=True)]
        # full-frame copies are memory-bound numpy copies (the GIL is released): a few threads
        if len(jobs) > 2:
            return list(self._engine._paste_pool().map(lambda job: job[0].paste(job[1], job[2], job[3]), jobs))
        return [cache.paste(index, region, out) for cache, index, region, out in jobs]
