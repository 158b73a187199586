"""MuseTalk v1.5 audio conditioning: Whisper-tiny hidden states cut into 50x384 tokens per frame.

Two ways to the same numbers (shared/MUSETALK_V15.md, "Audio conditioning"):

- :func:`offline_features` is the official whole-file path, literally: 30 s segments from the start,
  ``WhisperFeatureExtractor`` log-mel, the encoder's 5 hidden states stacked, trimmed, padded with
  4 zero frames before and 12 after, 10 Whisper frames per video frame. It is the reference.
- :class:`MuseTalkFeaturizer` serves a live stream. Whisper's encoder attends over its whole 30 s
  input and adds an absolute positional embedding to every frame, so a frame's tokens depend on
  where in its window it sits and on everything else in that window. The featurizer keeps the
  stream since the start of the current official 30 s segment and encodes, for a group of frames,
  [segment start, the group's last frame + 120 ms lookahead] zero-padded to 30 s: each frame
  sits at the same position with the same past as in the whole-file path; only the audio after
  its lookahead is missing. When a whole clip is given in one call, the tokens are exactly the
  offline ones; frame by frame they differ slightly (bench/whisper_agreement.py measures how much,
  also for sliding windows of a fixed context, which are far worse; docs/benchmarks.md).

Cost: one encoder pass is a full 30 s window (~40 GFLOP) however little audio it holds, so it is
shared: all frames given to one :meth:`MuseTalkFeaturizer.features` call are served by
``ceil(span / frames_per_run)`` passes, and :meth:`WhisperBatcher.features` runs the passes of
many streams as one batch. Log-mel runs on the engine's device with ``torch.stft`` (the same maths
as ``WhisperFeatureExtractor``), not as a fresh 30 s numpy spectrogram per frame.

Tokens leave here WITHOUT the positional encoding; the engine adds it once, just before the UNet,
as the official inference does.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.audio.windows import AudioFrame
from pipeline.engines.base import Featurizer, FrameFeatures

SAMPLE_RATE = 16000
FPS = 25
WHISPER_FPS = 50
SAMPLES_PER_VIDEO_FRAME = SAMPLE_RATE // FPS  # 640
SAMPLES_PER_WHISPER_FRAME = SAMPLE_RATE // WHISPER_FPS  # 320 (two 10 ms mel hops)
N_SAMPLES = 30 * SAMPLE_RATE  # Whisper's fixed input: 30 s
N_MEL_FRAMES = 3000
N_WHISPER_FRAMES = 1500
N_HIDDEN = 5  # input to each of the 4 layers + the final layer-normed output
D_MODEL = 384
PAD_LEFT, PAD_RIGHT = 2, 2  # official audio_padding_length_left/right (in video frames)
WINDOW_WHISPER_FRAMES = 2 * (PAD_LEFT + PAD_RIGHT + 1)  # 10
N_TOKENS = WINDOW_WHISPER_FRAMES * N_HIDDEN  # 50
# Frame i reads Whisper frames [2i - 4, 2i + 6): the window starts 4 frames (80 ms) early.
LEAD_WHISPER_FRAMES = 2 * PAD_LEFT
# The last sample frame i needs: 120 ms past its start (== pipeline.audio.windows.WINDOW_AFTER).
LOOKAHEAD_SAMPLES = (WINDOW_WHISPER_FRAMES - LEAD_WHISPER_FRAMES) * SAMPLES_PER_WHISPER_FRAME  # 1920
WINDOW_BEFORE_SAMPLES = LEAD_WHISPER_FRAMES * SAMPLES_PER_WHISPER_FRAME  # 1280

# Chosen from bench/whisper_agreement.py on real speech (docs/benchmarks.md): see that section.
DEFAULT_CONTEXT_SECONDS: float | None = None  # the official 30 s segment grid
DEFAULT_FRAMES_PER_RUN = 25
DEFAULT_HANGOVER_SECONDS = 0.2


def positional_encoding(
    length: int = N_TOKENS, d_model: int = D_MODEL, *, device: Any = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The official sinusoidal PE rows [0, length): even channels sin, odd channels cos, max_len 5000.

    pe[pos, 2i] = sin(pos * exp(-ln(10000) * 2i / d)), pe[pos, 2i + 1] = cos(same); computed in
    fp32 like the official buffer, then cast.
    """
    position = torch.arange(length, dtype=torch.float32)[:, None]
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe.to(device=device, dtype=dtype)


def whisper_chunks(hidden: torch.Tensor, n_samples: int, fps: int = FPS) -> torch.Tensor:
    """Official windowing: hidden [T, 5, 384] of a whole clip -> [n_frames, 50, 384] tokens.

    Trim to floor(n/16000*50) Whisper frames, prepend 4 zero frames and append 12, take 10 frames
    from floor(i * 50/fps) for each video frame i, flatten time-major (token = 5 * time + layer).
    """
    num_frames = math.floor((n_samples / SAMPLE_RATE) * fps)
    actual = math.floor((n_samples / SAMPLE_RATE) * WHISPER_FPS)
    multiplier = WHISPER_FPS / fps
    p = math.ceil(multiplier)
    hidden = hidden[:actual]
    padded = torch.cat(
        [
            hidden.new_zeros((p * PAD_LEFT, *hidden.shape[1:])),
            hidden,
            hidden.new_zeros((p * 3 * PAD_RIGHT, *hidden.shape[1:])),
        ]
    )
    starts = [math.floor(i * multiplier) for i in range(num_frames)]
    if not starts:
        return hidden.new_zeros((0, N_TOKENS, hidden.shape[-1]))
    windows = torch.stack([padded[s : s + WINDOW_WHISPER_FRAMES] for s in starts])  # [n, 10, 5, 384]
    return windows.reshape(num_frames, WINDOW_WHISPER_FRAMES * hidden.shape[1], hidden.shape[-1])


class WhisperBatcher:
    """The Whisper encoder and log-mel of one engine, shared by all of its streams' featurizers.

    Thread-safe: encoder passes are serialised by a lock, so featurizers of different sessions
    may call in from worker threads. :meth:`features` is the batching entry point: it plans every
    stream's encoder windows, runs them together (``max_batch`` windows per pass), and hands
    each stream its tokens.

    On a GPU, :meth:`features` runs on its own CUDA stream and waits for it before returning: a
    feature pass then overlaps the UNet/VAE batch the engine's worker has in flight instead of
    queueing behind it on the default stream (measured: feature latency ~ one engine batch
    without it). The tokens it returns are complete when it returns.
    """

    def __init__(
        self, encoder: torch.nn.Module, feature_extractor: Any, *, max_batch: int = 8, cuda_graphs: bool = False
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        param = next(encoder.parameters())
        self.encoder = encoder
        self.feature_extractor = feature_extractor
        self.device = param.device
        self.dtype = param.dtype
        self.max_batch = max_batch
        self.n_layers = int(encoder.config.encoder_layers)
        n_fft = int(feature_extractor.n_fft)
        self._n_fft = n_fft
        self._hop = int(feature_extractor.hop_length)
        self._window = torch.hann_window(n_fft, device=self.device)
        # [n_fft/2 + 1, n_mels], slaney-normalised, exactly the extractor's own filters
        self._mel_filters = torch.as_tensor(
            np.asarray(feature_extractor.mel_filters), dtype=torch.float32
        ).to(self.device)
        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.encoder_windows = 0  # windows encoded so far (a cost counter for metrics and tests)
        # Whisper-tiny at a few windows is launch-bound: ~300 small kernels, each one Python call
        # holding the GIL that the engine's batch thread and the event loop also need. A CUDA
        # graph per batch size replays them all in one call.
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._graph_pool: Any = None

    # -- maths ------------------------------------------------------------------------------------

    def log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, <=480000] float32 16 kHz -> [B, 80, 3000] Whisper log-mel (zero-padded to 30 s).

        Same steps as ``WhisperFeatureExtractor`` (torch path): periodic Hann STFT (n_fft 400, hop
        160, centred, reflect padding), power, slaney mel filters, log10 clamped at 1e-10, floor at
        (max - 8) per window, then (x + 4) / 4.
        """
        if audio.dim() == 1:
            audio = audio[None]
        if audio.shape[-1] > N_SAMPLES:
            raise ValueError(f"a Whisper window holds at most {N_SAMPLES} samples, got {audio.shape[-1]}")
        audio = audio.to(device=self.device, dtype=torch.float32)
        audio = torch.nn.functional.pad(audio, (0, N_SAMPLES - audio.shape[-1]))
        stft = torch.stft(audio, self._n_fft, self._hop, window=self._window, return_complex=True)
        power = stft[..., :-1].abs() ** 2  # [B, 201, 3000]
        mel = self._mel_filters.T @ power  # [B, 80, 3000]
        log_spec = torch.clamp(mel, min=1e-10).log10()
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        log_spec = torch.maximum(log_spec, peak - 8.0)
        return (log_spec + 4.0) / 4.0

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """[B, 80, 3000] log-mel -> [B, 1500, 5, 384] stacked hidden states (encoder dtype)."""
        with self._lock, torch.inference_mode():
            mel = mel.to(device=self.device, dtype=self.dtype)
            self.encoder_windows += mel.shape[0]
            if self.cuda_graphs:
                with torch.cuda.device(self.device):
                    return self._replay(mel)
            return self._encode(mel)

    def _encode(self, mel: torch.Tensor) -> torch.Tensor:
        states = self.encoder(mel, output_hidden_states=True).hidden_states
        if len(states) != self.n_layers + 1:  # the official recipe relies on exactly this
            raise RuntimeError(f"Whisper encoder returned {len(states)} hidden states, expected {self.n_layers + 1}")
        return torch.stack(states, dim=2)

    def _replay(self, mel: torch.Tensor) -> torch.Tensor:
        size = mel.shape[0]
        entry = self._graphs.get(size)
        if entry is None:
            entry = self._graphs[size] = self._capture(mel)
        graph, static_in, static_out = entry
        static_in.copy_(mel)
        graph.replay()
        return static_out.clone()  # the next replay reuses the output buffer

    def _capture(self, mel: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        static_in = mel.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # outside the graph: cuDNN plans, lazy inits
                self._encode(static_in)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._graph_pool, stream=stream):
            static_out = self._encode(static_in)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return graph, static_in, static_out

    def encode_audio(self, windows: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Each 16 kHz window (<= 30 s) -> its [1500, 5, 384] hidden states, ``max_batch`` per pass."""
        out: list[torch.Tensor] = []
        for lo in range(0, len(windows), self.max_batch):
            group = windows[lo : lo + self.max_batch]
            # only the audio travels to the device; log_mel pads it to 30 s there
            batch = torch.zeros((len(group), max(1, *(len(w) for w in group))), dtype=torch.float32)
            for row, w in enumerate(group):
                batch[row, : len(w)] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
            with torch.inference_mode():
                hidden = self.encode(self.log_mel(batch))
            out.extend(hidden.unbind(0))
        return out

    # -- batching across streams ------------------------------------------------------------------

    def features(
        self, jobs: Sequence[tuple[MuseTalkFeaturizer, Sequence[AudioFrame]]]
    ) -> list[list[FrameFeatures]]:
        """Features for several streams' frames at once (one featurizer may appear more than once;
        its jobs are then taken in order). One batched encoder run serves them all."""
        plans = [featurizer._plan(frames) for featurizer, frames in jobs]
        windows = [w for plan in plans for w in plan.windows]
        if self._stream is None:
            return self._run_plans(plans, windows)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            results = self._run_plans(plans, windows)
        self._stream.synchronize()
        return results

    def _run_plans(self, plans: list[_Plan], windows: list[np.ndarray]) -> list[list[FrameFeatures]]:
        hidden = self.encode_audio(windows) if windows else []
        results: list[list[FrameFeatures]] = []
        pos = 0
        for plan in plans:
            n = len(plan.windows)
            results.append(plan.featurizer._finish(plan, hidden[pos : pos + n]))
            pos += n
        return results


def offline_features(audio16k: np.ndarray, whisper: WhisperBatcher, fps: int = FPS) -> np.ndarray:
    """The official whole-file path: float32 [n_frames, 50, 384] tokens (no positional encoding).

    30 s segments from the start, each through ``WhisperFeatureExtractor`` itself (the reference
    the streaming path's torch log-mel is tested against), encoded, concatenated along time, cut
    by :func:`whisper_chunks`.
    """
    audio = np.asarray(audio16k, dtype=np.float32).reshape(-1)
    segments = [audio[i : i + N_SAMPLES] for i in range(0, len(audio), N_SAMPLES)]
    hidden_parts = []
    for segment in segments:
        mel = whisper.feature_extractor(
            segment, sampling_rate=SAMPLE_RATE, return_tensors="pt"
        ).input_features
        hidden_parts.append(whisper.encode(mel)[0])
    if not hidden_parts:
        return np.zeros((0, N_TOKENS, D_MODEL), dtype=np.float32)
    hidden = torch.cat(hidden_parts, dim=0)
    return whisper_chunks(hidden, len(audio), fps).float().cpu().numpy()


@dataclass
class _Run:
    """The encoder windows serving one group of frames."""

    starts: list[int] = field(default_factory=list)  # stream sample of each window's first sample
    windows: list[np.ndarray] = field(default_factory=list)  # float32 samples [start, start + len)
    slots: list[int] = field(default_factory=list)  # positions in the call's frame list
    frames: list[int] = field(default_factory=list)  # stream-local frame numbers


@dataclass
class _Plan:
    featurizer: MuseTalkFeaturizer
    active: list[bool]
    runs: list[_Run]

    @property
    def windows(self) -> list[np.ndarray]:
        return [w for run in self.runs for w in run.windows]


class MuseTalkFeaturizer(Featurizer):
    """Streaming MuseTalk tokens for one audio stream (see the module docstring for the why).

    ``context_seconds``: which past audio a frame's encoder window holds.

    - ``None`` (default): the official 30 s segment grid from the stream's start. A frame at
      t = 42 s is encoded in the window that starts at 30 s, exactly where the whole-file path
      puts it, so it gets the same Whisper positional embedding and the same past; only the
      future beyond its lookahead is missing. (A window straddling a segment edge is encoded
      as the two segments, as offline.)
    - a number: a sliding window of that much audio before the group's first frame. Measured
      far worse (docs/benchmarks.md): Whisper adds an absolute positional embedding to every
      frame, and sliding moves the frame to a different position than the model was trained
      on. Kept for measurements.

    ``frames_per_run``: most frames one encoder pass serves; all frames passed to one
    :meth:`features` call within that span share a pass (and its lookahead), so a caller that
    can wait a little (TTS faster than real time, offline render) passes frames in groups.
    Frames are active while the VAD hears speech and ``hangover_seconds`` after, so the lips
    close naturally instead of freezing mid-word; inactive frames get ``data=None`` and cost
    nothing. ``data`` of an active frame is a [50, 384] tensor on the engine's device, in its
    dtype, without the positional encoding.
    """

    blocking = True  # a Whisper encoder pass: never on the event loop

    def __init__(
        self,
        whisper: WhisperBatcher,
        *,
        context_seconds: float | None = DEFAULT_CONTEXT_SECONDS,
        frames_per_run: int = DEFAULT_FRAMES_PER_RUN,
        hangover_seconds: float = DEFAULT_HANGOVER_SECONDS,
    ) -> None:
        if context_seconds is not None and context_seconds < WINDOW_BEFORE_SAMPLES / SAMPLE_RATE:
            raise ValueError(
                f"context_seconds must be None or >= {WINDOW_BEFORE_SAMPLES / SAMPLE_RATE} (the 80 ms look-back)"
            )
        span = (frames_per_run - 1) * SAMPLES_PER_VIDEO_FRAME + WINDOW_BEFORE_SAMPLES + LOOKAHEAD_SAMPLES
        if frames_per_run < 1 or span > N_SAMPLES:
            raise ValueError("frames_per_run must be >= 1 and fit with its look-back and lookahead in 30 s")
        if hangover_seconds < 0:
            raise ValueError("hangover_seconds must be >= 0")
        self._whisper = whisper
        self.batcher = whisper  # a FeatureWorker runs many streams' frames through it at once
        self.context_samples = None if context_seconds is None else round(context_seconds * SAMPLE_RATE)
        self.frames_per_run = int(frames_per_run)
        self.hangover_frames = round(hangover_seconds * FPS)
        self.reset()

    def reset(self) -> None:
        self._origin: int | None = None  # AudioFrame.index of stream-local frame 0
        self._next = 0  # next expected stream-local frame
        self._buf = np.zeros(0, dtype=np.float32)  # stream samples [_buf_start, _buf_start + _buf_len)
        self._buf_start = 0
        self._buf_len = 0
        self._quiet = 1 << 30  # frames since the last speech frame

    def features(self, frames: Sequence[AudioFrame]) -> list[FrameFeatures]:
        return self._whisper.features([(self, frames)])[0]

    # -- planning: audio bookkeeping and window choice (no model work) ----------------------------

    def _plan(self, frames: Sequence[AudioFrame]) -> _Plan:
        active: list[bool] = []
        runs: list[_Run] = []
        current: _Run | None = None
        for slot, frame in enumerate(frames):
            if self._origin is None:
                self._origin = frame.index
            local = frame.index - self._origin
            if local < self._next:
                raise ValueError(
                    f"frames must come in order: got frame {frame.index} after {self._origin + self._next - 1}"
                )
            self._next = local + 1
            self._write(local * SAMPLES_PER_VIDEO_FRAME - WINDOW_BEFORE_SAMPLES, frame.window)
            self._quiet = 0 if frame.speech else self._quiet + 1
            is_active = self._quiet <= self.hangover_frames
            active.append(is_active)
            if not is_active:
                continue
            if current is None or local - current.frames[0] >= self.frames_per_run:
                current = _Run()
                runs.append(current)
            current.slots.append(slot)
            current.frames.append(local)
        for run in runs:
            end = run.frames[-1] * SAMPLES_PER_VIDEO_FRAME + LOOKAHEAD_SAMPLES
            run.starts = self._window_starts(run.frames[0], run.frames[-1], end)
            run.windows = [self._read(s, min(s + N_SAMPLES, end)) for s in run.starts]
        if frames:
            self._trim(self._window_starts(self._next, self._next, self._next * SAMPLES_PER_VIDEO_FRAME)[0])
        return _Plan(self, active, runs)

    def _window_starts(self, first: int, last: int, end: int) -> list[int]:
        """Start samples of the windows serving frames first..last with audio up to ``end``."""
        if self.context_samples is None:  # the official 30 s grid: one window per segment touched
            lo = max(0, 2 * first - LEAD_WHISPER_FRAMES) // N_WHISPER_FRAMES
            hi = max(0, 2 * last - LEAD_WHISPER_FRAMES + WINDOW_WHISPER_FRAMES - 1) // N_WHISPER_FRAMES
            return [seg * N_SAMPLES for seg in range(lo, hi + 1)]
        start = first * SAMPLES_PER_VIDEO_FRAME - self.context_samples
        start = start // SAMPLES_PER_WHISPER_FRAME * SAMPLES_PER_WHISPER_FRAME
        return [max(0, start, end - N_SAMPLES)]  # end - N_SAMPLES is on the 320 grid too

    def _finish(self, plan: _Plan, hidden: Sequence[torch.Tensor]) -> list[FrameFeatures]:
        out: list[FrameFeatures] = [FrameFeatures(active=False, data=None) for _ in plan.active]
        offsets = torch.arange(WINDOW_WHISPER_FRAMES)
        pos = 0
        for run in plan.runs:
            states = hidden[pos : pos + len(run.windows)]
            pos += len(run.windows)
            stacked = states[0] if len(states) == 1 else torch.cat(list(states))  # windows end to end
            global_idx = (torch.tensor(run.frames)[:, None] * 2 - LEAD_WHISPER_FRAMES) + offsets  # [K, 10]
            # which window holds each Whisper frame: the last one starting at or before it
            starts = torch.tensor(run.starts) // SAMPLES_PER_WHISPER_FRAME
            which = (global_idx.clamp(min=0)[..., None] >= starts).sum(-1) - 1
            local_idx = which * N_WHISPER_FRAMES + global_idx - starts[which]
            # Whisper frames before the stream start are the official zero padding; otherwise a
            # window always reaches back to the 80 ms look-back (checked in __init__).
            keep = (global_idx >= 0).to(device=stacked.device, dtype=stacked.dtype)
            picked = stacked[local_idx.clamp(min=0).to(stacked.device)]  # [K, 10, 5, 384]
            tokens = (picked * keep[:, :, None, None]).reshape(len(run.frames), N_TOKENS, stacked.shape[-1])
            for k, slot in enumerate(run.slots):
                out[slot] = FrameFeatures(active=True, data=tokens[k])
        if pos != len(hidden):
            raise RuntimeError("encoder outputs do not match the planned windows")
        return out

    # -- the rolling sample buffer ----------------------------------------------------------------

    def _write(self, start: int, samples: np.ndarray) -> None:
        """Put a frame's window at stream sample ``start`` (overlaps hold the same audio)."""
        end = start + len(samples)
        lo = max(start, self._buf_start)
        if end <= lo:
            return
        need = end - self._buf_start
        if need > len(self._buf):
            grown = np.zeros(max(need, 2 * len(self._buf), SAMPLE_RATE), dtype=np.float32)
            grown[: self._buf_len] = self._buf[: self._buf_len]
            self._buf = grown
        self._buf[lo - self._buf_start : end - self._buf_start] = samples[lo - start :]
        self._buf_len = max(self._buf_len, need)

    def _read(self, start: int, end: int) -> np.ndarray:
        out = np.zeros(end - start, dtype=np.float32)
        lo, hi = max(start, self._buf_start), min(end, self._buf_start + self._buf_len)
        if hi > lo:
            out[lo - start : hi - start] = self._buf[lo - self._buf_start : hi - self._buf_start]
        return out

    def _trim(self, keep_from: int) -> None:
        """Forget samples before ``keep_from`` once they are a good part of the buffer."""
        drop = keep_from - self._buf_start
        if drop <= 0 or drop < len(self._buf) // 2:
            return
        drop = min(drop, self._buf_len)
        self._buf[: self._buf_len - drop] = self._buf[drop : self._buf_len].copy()
        self._buf[self._buf_len - drop :] = 0.0  # a later gap in the stream must read as silence
        self._buf_start += drop
        self._buf_len -= drop
