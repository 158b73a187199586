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

The CPU side of a :meth:`WhisperBatcher.features` call is kept to a few copies and a handful of
torch calls, whatever the number of streams: a live server's feature thread calls it every 40 ms
with one frame of each of its (8-32) sessions, in a process whose event loop and engine thread
need the same GIL (profiled on a GPU at 16 sessions: ~24 % of the process was this path, when it
copied each 30 s window twice and built ~15 small tensors per stream). So a plan names its
windows as ranges of the featurizer's rolling buffer; they are copied once, straight into one
reusable host batch (pinned on a GPU, sent with ``non_blocking``; only the parts an earlier call
left non-zero are cleared); the encoder writes every window's hidden states into one tensor; and
the Whisper frame indices of all frames of all streams are computed in numpy and gathered with one
``index_select``. The numbers are exactly those of the straightforward per-stream algorithm
(tests/test_musetalk_features_batch.py keeps it as the reference; bench/featurizer_overhead.py
measures the difference).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.audio.windows import AudioFrame
from pipeline.engines.base import Featurizer, FrameFeatures
from pipeline.engines.musetalk.transfer import wait_asleep

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

# Trimmed windows (WhisperBatcher(trim=True), the engine's ``whisper_windows: trimmed``): a window
# is encoded over the positions its audio fills plus TRIM_MARGIN_POSITIONS, rounded up to a
# multiple of POSITION_BUCKET, instead of all 1500. Each length is a pass of its own (windows of
# different lengths cannot share one without changing each other's numbers), and a pass has a
# fixed cost of ~1 ms on an H200 (bench/gpu_costs.py: 4 windows of 250 positions take 1.3 ms,
# 4 of 750 1.6 ms, 4 of 1500 2.6 ms), so the buckets are coarse: 500, 1000, 1500. See the class docstring for the why.
POSITION_BUCKET = 500
TRIM_MARGIN_POSITIONS = 2
#: Cropped windows (WhisperBatcher(crop_positions), the engine's ``whisper_crop_seconds``): the
#: fewest positions a window may be cut to (a featurizer needs 2 per frame of a run, plus 10).
MIN_CROP_POSITIONS = 16
#: Positions of silence after a cropped window's audio (its frames' lookahead). Measured on real
#: speech (bench/whisper_agreement.py, docs/benchmarks.md): a window that ends exactly at the
#: lookahead agrees worse with the whole-file tokens (cos 0.923 at 5 s) than one with 2-6
#: positions of zeros after it (0.937-0.939), as Whisper's inputs always end in padding.
CROP_TAIL_POSITIONS = 4
#: The most positions a cropped window's audio may hold (its silent tail must fit the segment).
MAX_CROP_POSITIONS = N_WHISPER_FRAMES - CROP_TAIL_POSITIONS
#: Windows per encoder pass are padded up to one of these (one CUDA graph per size and length).
PASS_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def run_positions(frames: int) -> int:
    """Whisper frames that ``frames`` consecutive video frames read: what a cropped window must hold."""
    return 2 * (frames - 1) + WINDOW_WHISPER_FRAMES


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
    without it). The tokens it returns are complete when it returns; a consumer on another
    stream calls ``record_stream`` on them (the engine does), since the pass does not wait for
    other streams' work. Audio and gather indices
    go to the GPU from pinned host buffers with ``non_blocking`` copies, so the thread does not
    wait for the copies (a pageable copy would also wait for the stream's earlier work).

    ``trim``: encode each window over the positions its audio fills (+ a small margin, rounded
    up to :data:`POSITION_BUCKET`) instead of Whisper's fixed 1500. A live stream encodes one
    window per talking session per frame, and on the official 30 s grid a window holds 15 s of
    audio on average, so half of every padded pass is zeros; attention makes the cost of the
    rest quadratic in them. Positions keep their absolute embedding (a frame stays where the
    whole-file path puts it); what changes is that the frames no longer attend to ~15 s of
    padding. Measured against the whole-file reference on real speech (bench/whisper_agreement.py
    --windows padded,trimmed, docs/benchmarks.md) the trimmed windows agree *better* frame by frame than padded ones
    (the padding is no closer to the real future than nothing), at about half the positions.
    Windows that fill all 30 s (a segment's edge, whole-clip calls) are encoded exactly as before.
    Windows of one call are sorted by length, one pass (or more, ``max_batch`` at a time) per
    length: a window's numbers never depend on which other windows share its call.

    ``crop_positions`` (with ``trim``): a grid window holds only its last ``crop_positions``
    Whisper frames (ending at its frames' lookahead) and :data:`CROP_TAIL_POSITIONS` of silence,
    and each keeps the positional embedding of its place in the 30 s segment (the window's
    ``offset``; at a segment's end, where no silence fits, the window starts that much earlier
    instead). Every window then has the same length, whatever the stream's place in its
    segment, and costs that much instead of up to 1500 positions (a pass of 16 windows on an
    H200: 0.114 ms per window at 250 positions against 0.417 at 1000, section "Where the GPU
    time goes"). Measured against the whole-file reference on real speech
    (bench/whisper_agreement.py --windows cropped:5), the tokens agree better than with the
    segment's whole past from 5 s on (docs/benchmarks.md, "Cropped windows").
    """

    def __init__(
        self,
        encoder: torch.nn.Module,
        feature_extractor: Any,
        *,
        max_batch: int = 8,
        cuda_graphs: bool = False,
        trim: bool = False,
        crop_positions: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if crop_positions is not None and not (trim and MIN_CROP_POSITIONS <= crop_positions <= MAX_CROP_POSITIONS):
            raise ValueError(
                f"cropped windows need trimming and {MIN_CROP_POSITIONS}-{MAX_CROP_POSITIONS} positions, got {crop_positions}"
            )
        param = next(encoder.parameters())
        self.encoder = encoder
        self.feature_extractor = feature_extractor
        self.device = param.device
        self.dtype = param.dtype
        self.max_batch = max_batch
        self.trim = bool(trim)
        # Cropped windows: a grid window holds only its last ``crop`` positions (the audio up to
        # its frames' lookahead), each at its own place in the segment (class docstring).
        self.crop = crop_positions
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
        self._stream = self.new_stream() if self.device.type == "cuda" else None
        self.encoder_windows = 0  # windows encoded so far (a cost counter for metrics and tests)
        self.encoder_positions = 0  # and the positions they held (the cost trimming cuts)
        # Whisper-tiny at a few windows is launch-bound: ~300 small kernels, each one Python call
        # holding the GIL that the engine's batch thread and the event loop also need. A CUDA
        # graph per (batch size, window length) replays them all in one call.
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self._graph_pool: Any = None
        self.capture_priority = 0  # the priority of the stream graphs are captured on
        self._d_model = int(encoder.config.d_model)
        # transformers 4.x encoder layers take a positional layer_head_mask, 5.x do not
        self._layer_kwargs = (
            {"layer_head_mask": None}
            if "layer_head_mask" in inspect.signature(encoder.layers[0].forward).parameters
            else {}
        )
        # reusable host batches of encoder input (see _Staging); one per concurrent caller
        self._staging: list[_Staging] = []
        # Each stream's recent audio kept on the device (_Mirror), so a pass uploads only the
        # audio that is new since the last one and builds its windows there. On an H200 at 26
        # sessions, copying every window's whole audio (up to 30 s) into the host batch again
        # for every frame was a fifth of the feature thread's samples. On a CPU the host batch
        # is the device: nothing to gain (tests switch it on to check it against the host path).
        self.mirror = self.device.type == "cuda"

    def new_stream(self) -> torch.cuda.Stream:
        """The CUDA stream feature passes run on. High priority: a frame's features gate its
        UNet/VAE batch, so when both are queued on the GPU the short encoder kernels go first
        instead of waiting behind a 50 ms VAE batch's (a graph replayed into a stream takes that
        stream's priority)."""
        return torch.cuda.Stream(self.device, priority=-1)

    def positions_for(self, length: int) -> int:
        """Encoder positions a window of ``length`` samples is encoded over (1500 unless trimming)."""
        if not self.trim:
            return N_WHISPER_FRAMES
        if self.crop is not None:  # every window the same length (the featurizer cuts it so)
            return self.crop + CROP_TAIL_POSITIONS
        need = -(-length // SAMPLES_PER_WHISPER_FRAME) + TRIM_MARGIN_POSITIONS
        return min(N_WHISPER_FRAMES, -(-need // POSITION_BUCKET) * POSITION_BUCKET)

    @property
    def lengths(self) -> list[int]:
        """Every window length (in positions) this batcher encodes: what a warm-up plans."""
        if not self.trim:
            return [N_WHISPER_FRAMES]
        if self.crop is not None:
            return [self.crop + CROP_TAIL_POSITIONS]
        return [*range(POSITION_BUCKET, N_WHISPER_FRAMES, POSITION_BUCKET), N_WHISPER_FRAMES]

    # -- maths ------------------------------------------------------------------------------------

    def log_mel(self, audio: torch.Tensor, positions: int = N_WHISPER_FRAMES) -> torch.Tensor:
        """[B, <=480000] float32 16 kHz -> [B, 80, 2 * positions] Whisper log-mel (zero-padded).

        Same steps as ``WhisperFeatureExtractor`` (torch path): periodic Hann STFT (n_fft 400, hop
        160, centred, reflect padding), power, slaney mel filters, log10 clamped at 1e-10, floor at
        (max - 8) per window, then (x + 4) / 4. With fewer than 1500 positions the mel frames are
        the first ones of the padded 30 s, the same values: the audio is padded with zeros past
        the last frame's reach (so no reflection enters it), and the window's maximum is in the
        audio either way.
        """
        if audio.dim() == 1:
            audio = audio[None]
        if audio.shape[-1] > N_SAMPLES:
            raise ValueError(f"a Whisper window holds at most {N_SAMPLES} samples, got {audio.shape[-1]}")
        n_mel = 2 * positions
        length = N_SAMPLES if positions >= N_WHISPER_FRAMES else n_mel * self._hop + self._n_fft // 2
        if audio.shape[-1] > length:
            raise ValueError(f"{audio.shape[-1]} samples do not fit {positions} encoder positions")
        audio = audio.to(device=self.device, dtype=torch.float32)
        audio = torch.nn.functional.pad(audio, (0, length - audio.shape[-1]))
        stft = torch.stft(audio, self._n_fft, self._hop, window=self._window, return_complex=True)
        power = stft[..., :n_mel].abs() ** 2  # [B, 201, 2 * positions]
        mel = self._mel_filters.T @ power  # [B, 80, 2 * positions]
        log_spec = torch.clamp(mel, min=1e-10).log10()
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        log_spec = torch.maximum(log_spec, peak - 8.0)
        return (log_spec + 4.0) / 4.0

    def encode(
        self, mel: torch.Tensor, *, out: torch.Tensor | None = None, offsets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, 80, 2P] log-mel -> [B, P, 5, 384] stacked hidden states (encoder dtype); P is 1500
        (Whisper's input, the official path) or fewer (trimmed: the first P positions).

        ``out``: write them there (a slice of a larger batch: :meth:`features` keeps the windows of
        all its passes in one tensor, so one gather serves them all) and return it.
        ``offsets`` (cropped windows; int64 [B] on the device): the segment position of each
        window's first row; None: 0.
        """
        with self._lock, torch.inference_mode():
            mel = mel.to(device=self.device, dtype=self.dtype)
            self.encoder_windows += mel.shape[0]
            self.encoder_positions += mel.shape[0] * (mel.shape[-1] // 2)
            if self.crop is not None and offsets is None:  # one kind of graph per length
                offsets = torch.zeros(mel.shape[0], dtype=torch.long, device=self.device)
            if self.cuda_graphs:
                with torch.cuda.device(self.device):
                    return self._replay(mel, out, offsets)
            return self._encode(mel, out, offsets)

    def _encode(
        self, mel: torch.Tensor, out: torch.Tensor | None = None, offsets: torch.Tensor | None = None
    ) -> torch.Tensor:
        if mel.shape[-1] == N_MEL_FRAMES and offsets is None:
            states = self.encoder(mel, output_hidden_states=True).hidden_states
        else:
            states = self._encode_positions(mel, offsets)
        if len(states) != self.n_layers + 1:  # the official recipe relies on exactly this
            raise RuntimeError(f"Whisper encoder returned {len(states)} hidden states, expected {self.n_layers + 1}")
        shape = (mel.shape[0], states[0].shape[1], len(states), states[0].shape[-1])
        if out is not None and tuple(out.shape) != shape:
            raise RuntimeError(f"encoder output buffer is {list(out.shape)}, hidden states {list(shape)}")
        return torch.stack(states, dim=2, out=out)

    def _encode_positions(self, mel: torch.Tensor, offsets: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The encoder's own forward over the first ``mel.shape[-1] / 2`` positions: the same
        modules in the same order as ``WhisperEncoder.forward`` (which insists on 3000 mel frames),
        with the positional embedding's first rows (from row ``offsets[b]`` for window b where
        given); hidden states as ``output_hidden_states`` gives them (the input to each layer,
        then the layer-normed output)."""
        enc = self.encoder
        x = torch.nn.functional.gelu(enc.conv1(mel))
        x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        if offsets is None:
            x = x + enc.embed_positions.weight[: x.shape[1]]
        else:
            rows = offsets[:, None] + torch.arange(x.shape[1], device=x.device)
            x = x + enc.embed_positions.weight[rows]
        states = [x]
        for layer in enc.layers:
            x = layer(x, None, **self._layer_kwargs)
            if isinstance(x, tuple):  # transformers 4.x returns (hidden_states, ...)
                x = x[0]
            states.append(x)
        states[-1] = enc.layer_norm(x)
        return states

    def _replay(
        self, mel: torch.Tensor, out: torch.Tensor | None = None, offsets: torch.Tensor | None = None
    ) -> torch.Tensor:
        n = mel.shape[0]
        size = next((s for s in PASS_SIZES if s >= n), n)
        key = (size, mel.shape[-1], offsets is not None)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(mel[:1].expand(size, -1, -1), offsets is not None)
        graph, static_in, static_out, static_offsets = entry
        static_in[:n].copy_(mel)  # rows past n keep an earlier input: their output is not read
        if static_offsets is not None and offsets is not None:
            static_offsets[:n].copy_(offsets)
        graph.replay()
        if out is None:
            return static_out[:n].clone()  # the next replay reuses the output buffer
        return out.copy_(static_out[:n])

    def _capture(
        self, mel: torch.Tensor, with_offsets: bool = False
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        static_in = mel.clone()
        static_offsets = torch.zeros(mel.shape[0], dtype=torch.long, device=mel.device) if with_offsets else None
        stream = torch.cuda.Stream(self.device, priority=self.capture_priority)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # outside the graph: cuDNN plans, lazy inits
                self._encode(static_in, offsets=static_offsets)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._graph_pool, stream=stream):
            static_out = self._encode(static_in, offsets=static_offsets)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return graph, static_in, static_out, static_offsets

    def encode_audio(self, windows: Sequence[np.ndarray], positions: int | None = None) -> list[torch.Tensor]:
        """Each 16 kHz window (<= 30 s) -> its [P, 5, 384] hidden states, ``max_batch`` per pass
        (P = 1500, or what :meth:`positions_for` gives a trimmed window; ``positions`` forces one
        length for all, as a warm-up or a benchmark does)."""
        sources = [(w, 0, 0, len(w), len(w)) for w in (np.asarray(w).reshape(-1) for w in windows)]
        if not sources:
            return []
        order, passes = self._schedule(sources, positions)
        staging = self._take_staging()
        try:
            hidden = self._encode_sources(staging, [sources[i] for i in order], passes)
        finally:
            self._staging.append(staging)
        lengths = [p for n, p in passes for _ in range(n)]
        out: list[torch.Tensor] = [hidden[0]] * len(sources)
        for row, i in enumerate(order):
            out[i] = hidden[row, : lengths[row]]
        return out

    def _take_staging(self) -> _Staging:
        # a concurrent caller (encoder passes are serialised, planning and copies are not) gets its own
        return self._staging.pop() if self._staging else _Staging(pinned=self.device.type == "cuda")

    def _schedule(self, sources: Sequence[_Source], positions: int | None = None) -> tuple[list[int], list[tuple[int, int]]]:
        """The order windows are encoded in and the passes (windows, positions) that encode them:
        padded, consecutive windows ``max_batch`` at a time; trimmed, longest first, each pass one
        length."""
        if positions is None and not self.trim:
            positions = N_WHISPER_FRAMES
        if positions is not None:
            n = len(sources)
            return list(range(n)), [(min(self.max_batch, n - lo), positions) for lo in range(0, n, self.max_batch)]
        lengths = [self.positions_for(source[4]) for source in sources]
        order = sorted(range(len(sources)), key=lambda i: -lengths[i])
        passes: list[tuple[int, int]] = []
        for length in (lengths[i] for i in order):
            if passes and passes[-1][1] == length and passes[-1][0] < self.max_batch:
                passes[-1] = (passes[-1][0] + 1, length)
            else:
                passes.append((1, length))
        return order, passes

    def _encode_sources(
        self,
        staging: _Staging,
        sources: list[_Source],
        passes: list[tuple[int, int]],
        offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Windows -> [n, 1500, 5, 384] hidden states, pass after pass ((windows, positions) each,
        consecutive windows); a pass of fewer positions fills only the first ones of its rows.

        Each pass's input is [windows, longest window] (log_mel pads it on the device), filled in
        ``staging`` and sent as one ``non_blocking`` copy; the passes write into one tensor.
        """
        groups = staging.fill(sources, [n for n, _ in passes])

        def batch_of(k: int) -> torch.Tensor:
            n, offset, width = groups[k]
            batch = staging.audio[offset : offset + n * width].view(n, width)
            return batch.to(self.device, non_blocking=True) if self.device.type == "cuda" else batch

        # the staging buffer's event is made and recorded on the *current* device: make it ours
        with self._on_device():
            try:
                return self._encode_passes(len(sources), passes, offsets, batch_of)
            finally:
                staging.sent()

    def _encode_rows(
        self,
        rows: list[tuple[torch.Tensor, int, int]],
        passes: list[tuple[int, int]],
        offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`_encode_sources` for windows already on the device: ``rows`` are (a stream's
        mirror, offset of the window's first sample in it, window length), in pass order."""
        firsts = list(itertools.accumulate((n for n, _ in passes), initial=0))

        def batch_of(k: int) -> torch.Tensor:
            group = rows[firsts[k] : firsts[k + 1]]
            batch = torch.zeros((len(group), max(1, max(length for _, _, length in group))), device=self.device)
            for row, (tensor, offset, length) in enumerate(group):
                batch[row, :length].copy_(tensor[offset : offset + length])
            return batch

        return self._encode_passes(len(rows), passes, offsets, batch_of)

    def _encode_passes(
        self,
        n_windows: int,
        passes: list[tuple[int, int]],
        offsets: torch.Tensor | None,
        batch_of: Callable[[int], torch.Tensor],
    ) -> torch.Tensor:
        """The passes' windows (pass ``k``'s audio batch from ``batch_of(k)``) -> [n_windows,
        1500, 5, 384] hidden states in one tensor; a pass of fewer positions fills only the first
        ones of its rows."""
        with torch.inference_mode(), self._on_device():
            shape = (n_windows, N_WHISPER_FRAMES, self.n_layers + 1, self._d_model)
            hidden = torch.empty(shape, device=self.device, dtype=self.dtype)
            row = 0
            for k, (n, positions) in enumerate(passes):
                at = None if offsets is None else offsets[row : row + n]
                self.encode(self.log_mel(batch_of(k), positions), out=hidden[row : row + n, :positions], offsets=at)
                row += n
        return hidden

    def _on_device(self) -> contextlib.AbstractContextManager[Any]:
        """This engine's GPU as the current device (nothing on a CPU)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _mirror_rows(
        self, staging: _Staging, plans: Sequence[_Plan], order: Sequence[int]
    ) -> list[tuple[torch.Tensor, int, int]] | None:
        """Bring each speaking stream's :class:`_Mirror` up to date (one upload of the audio that
        is new or rewritten since its last call) and name every window as a range of it, in
        encoding ``order``; None (and the mirrors of this call's streams dropped) when the call
        does not fit them: a stream with two jobs in one call (its first plan's audio may differ
        from what the second wrote), windows wider than a mirror (a long backlog), or a window
        reaching before the audio its stream still keeps (there the host batch reads zeros,
        a mirror may still hold the audio; the featurizer's trimming never lets it happen). The rows
        are then exactly the host batch's (tests/test_musetalk_features_batch.py)."""
        speaking = [plan for plan in plans if plan.runs]
        owners = [id(plan.featurizer) for plan in speaking]
        spans = [plan.span() for plan in speaking]
        fits = all(hi - lo <= MIRROR_SAMPLES and lo >= plan.audio_start for plan, (lo, hi) in zip(speaking, spans))
        if len(set(owners)) < len(owners) or not fits:
            for plan in speaking:
                plan.featurizer._mirror = None
            return None
        uploads: list[_Source] = []
        targets: list[tuple[torch.Tensor, int, int]] = []
        windows: list[tuple[torch.Tensor, int, int]] = []
        for plan, (lo, hi) in zip(speaking, spans, strict=True):
            mirror = plan.featurizer._mirror
            if mirror is None or lo < mirror.start or hi > mirror.start + MIRROR_SAMPLES:
                mirror = plan.featurizer._mirror = _Mirror(self.device, lo)
            have_lo, have_hi = plan.audio_start, plan.audio_start + plan.audio_len
            a = max(min(mirror.synced, plan.dirty_from), have_lo, mirror.start)
            b = min(hi, have_hi)
            if b > a:
                uploads.append((plan.audio, a - plan.audio_start, 0, b - a, b - a))
                targets.append((mirror.tensor, a - mirror.start, b - a))
            mirror.synced = max(mirror.synced, b)
            for run in plan.runs:
                for start, end in zip(run.starts, run.ends, strict=True):
                    windows.append((mirror.tensor, start - mirror.start, end - start))
        try:
            if uploads:
                groups = staging.fill(uploads, [1] * len(uploads))
                size = groups[-1][1] + groups[-1][2]
                sent = staging.audio[:size]
                if self.device.type == "cuda":
                    sent = sent.to(self.device, non_blocking=True)
                for (_, offset, _), (tensor, at, count) in zip(groups, targets, strict=True):
                    tensor[at : at + count].copy_(sent[offset : offset + count])
        except BaseException:
            for plan in speaking:  # half-synced: start them afresh next time
                plan.featurizer._mirror = None
            raise
        finally:
            staging.sent()
        return [windows[i] for i in order]

    # -- batching across streams ------------------------------------------------------------------

    def features(
        self, jobs: Sequence[tuple[MuseTalkFeaturizer, Sequence[AudioFrame]]]
    ) -> list[list[FrameFeatures]]:
        """Features for several streams' frames at once (one featurizer may appear more than once;
        its jobs are then taken in order). One batched encoder run serves them all."""
        plans: list[_Plan] = []
        latest: dict[int, _Plan] = {}
        for featurizer, frames in jobs:
            earlier = latest.get(id(featurizer))
            if earlier is not None:
                earlier.detach()  # the next _plan may write into the buffer the earlier plan reads
            plan = latest[id(featurizer)] = featurizer._plan(frames)
            plans.append(plan)
        if not any(plan.runs for plan in plans):  # nobody speaks: no encoder work, no device work
            return [[_INACTIVE] * len(plan.active) for plan in plans]
        if self._stream is None:
            return self._run_plans(plans)
        # On this engine's GPU also for what takes the *current* device (pinned buffers' events):
        # with several GPUs in one process, the current one is often another (seen on cuda:1).
        # The pass does not wait for the current stream: everything it reads comes from pinned
        # host buffers, its own graphs or constants, and on the feature thread the current stream
        # is the engine's, so waiting for it meant waiting for the UNet/VAE batch in flight
        # (an H200 at batch 24: a pass of 9 ms on its stream took 41 ms). What it hands out is
        # read on the engine's stream, which marks it (record_stream) so that its memory is not
        # given to a later pass before that stream has read it.
        with torch.cuda.device(self.device):
            with torch.cuda.stream(self._stream):
                results = self._run_plans(plans)
            wait_asleep(self._stream)
        return results

    def _run_plans(self, plans: list[_Plan]) -> list[list[FrameFeatures]]:
        sources = [source for plan in plans for source in plan.sources()]
        index, keep = _gather_index(plans, len(sources))
        order, passes = self._schedule(sources)
        if self.trim:  # window w is encoded as row rank[w]
            rank = np.empty(len(order), dtype=np.int64)
            rank[order] = np.arange(len(order))
            index = rank[index // N_WHISPER_FRAMES] * N_WHISPER_FRAMES + index % N_WHISPER_FRAMES
            sources = [sources[i] for i in order]
        n_frames = len(index) // WINDOW_WHISPER_FRAMES
        parts = [index] if keep is None else [index, keep]
        if self.crop is not None:  # each window's place in its segment, in encoding order
            starts = np.asarray([s for plan in plans for run in plan.runs for s in run.starts], dtype=np.int64)
            parts.append(starts[order] % N_SAMPLES // SAMPLES_PER_WHISPER_FRAME)
        staging = self._take_staging()
        try:
            # the gather indices go first, on the same stream: the event after the audio covers them
            index_t = staging.indices(np.concatenate(parts) if len(parts) > 1 else index)
            if self.device.type == "cuda":
                index_t = index_t.to(self.device, non_blocking=True)
            offsets = None if self.crop is None else index_t[len(index_t) - len(sources) :]
            rows = self._mirror_rows(staging, plans, order) if self.mirror else None
            if rows is None:
                hidden = self._encode_sources(staging, sources, passes, offsets)
            else:
                hidden = self._encode_rows(rows, passes, offsets)
            # every window's 1500 frames end to end; 10 Whisper frames per video frame
            flat = hidden.view(-1, *hidden.shape[2:])  # [windows * 1500, 5, 384]
            picked = torch.index_select(flat, 0, index_t[: len(index)])
            picked = picked.view(n_frames, WINDOW_WHISPER_FRAMES, *hidden.shape[2:])
            if keep is not None:
                # Whisper frames before a stream's start are the official zero padding: x * 0, as
                # this path always computed them (the same bits, -0.0 included)
                mask = index_t[len(index) : 2 * len(index)].view(n_frames, WINDOW_WHISPER_FRAMES).to(hidden.dtype)
                picked = picked * mask[:, :, None, None]
        finally:
            self._staging.append(staging)  # on a CPU, index_t was read from it until here
        tokens = picked.view(n_frames, N_TOKENS, hidden.shape[-1]).unbind(0)
        results: list[list[FrameFeatures]] = []
        pos = 0
        for plan in plans:
            out = [_INACTIVE] * len(plan.active)
            for run in plan.runs:
                for slot in run.slots:
                    out[slot] = FrameFeatures(active=True, data=tokens[pos])
                    pos += 1
            results.append(out)
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


# -- the CPU side of a batched call: window sources, host staging, gather indices -------------------------

# One encoder window's audio: row = [pad zeros] + src[offset : offset + count] + zeros up to length.
_Source = tuple[np.ndarray, int, int, int, int]  # (src, offset, pad, count, length)

_INACTIVE = FrameFeatures(active=False, data=None)  # frozen: one instance serves every idle frame
_ALIGN = 16  # each pass's rows start on a 64-byte boundary of the host batch


class _Staging:
    """A reusable host batch: the encoder windows of one call, one pass's rows after another.

    Pinned when the encoder is on a GPU, so its copies are truly asynchronous; an event recorded
    after the last copy guards the next refill. It stays zero except where the last fill wrote
    audio, so a refill clears only what that fill left where this one needs zeros, not every
    row's tail (a session's window grows by one frame per call: its row is almost all rewritten).
    """

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self.audio = torch.zeros(0, dtype=torch.float32)
        self._audio_np = self.audio.numpy()
        self._index = torch.zeros(0, dtype=torch.int64)
        self._index_np = self._index.numpy()
        self._written: list[tuple[int, int]] = []  # where audio may be non-zero, sorted
        self._event: Any = None  # recorded after the last copy out of this batch
        self._pending = False

    def _ready(self) -> None:
        if self._pending:
            self._event.synchronize()
            self._pending = False

    def sent(self) -> None:
        """Every copy out of this batch is queued on the current stream."""
        if self.pinned:
            if self._event is None:
                self._event = torch.cuda.Event()
            self._event.record()
            self._pending = True

    def indices(self, values: np.ndarray) -> torch.Tensor:
        self._ready()
        if self._index.numel() < len(values):
            size = max(len(values), 2 * self._index.numel(), 4096)
            self._index = torch.zeros(size, dtype=torch.int64, pin_memory=self.pinned)
            self._index_np = self._index.numpy()
        self._index_np[: len(values)] = values
        return self._index[: len(values)]

    def fill(self, sources: Sequence[_Source], passes: Sequence[int]) -> list[tuple[int, int, int]]:
        """Copy the windows in, pass after pass (``passes``: windows in each, consecutive), each
        pass's rows as wide as its longest window: the passes' (rows, offset, width)."""
        self._ready()
        if sum(passes) != len(sources):
            raise ValueError(f"passes hold {sum(passes)} windows, not {len(sources)}")
        groups: list[tuple[int, int, int]] = []
        size = 0
        lo = 0
        for n in passes:
            width = max(1, max(source[4] for source in sources[lo : lo + n]))
            offset = -(-size // _ALIGN) * _ALIGN
            groups.append((n, offset, width))
            size = offset + n * width
            lo += n
        if self.audio.numel() < size:
            capacity = max(size, 2 * self.audio.numel())
            self.audio = torch.zeros(capacity, dtype=torch.float32, pin_memory=self.pinned)
            self._audio_np = self.audio.numpy()
            self._written = []
        buf = self._audio_np
        written: list[tuple[int, int]] = []
        k = 0
        for n, offset, width in groups:
            for row in range(n):
                src, start, pad, count, _ = sources[k]
                k += 1
                if count > 0:
                    at = offset + row * width + pad
                    buf[at : at + count] = src[start : start + count]
                    written.append((at, at + count))
        for a, b in _subtract(self._written, written):
            buf[a:b] = 0.0
        self._written = written
        return groups


def _subtract(stale: list[tuple[int, int]], fresh: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``stale`` that ``fresh`` does not cover (both sorted, disjoint intervals)."""
    out: list[tuple[int, int]] = []
    j, n = 0, len(fresh)
    for a, b in stale:
        while j < n and fresh[j][1] <= a:
            j += 1
        k = j
        while a < b and k < n and fresh[k][0] < b:
            fa, fb = fresh[k]
            if fa > a:
                out.append((a, fa))
            a = max(a, fb)
            k += 1
        if a < b:
            out.append((a, b))
    return out


def _gather_index(plans: Sequence[_Plan], n_windows: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows of the call's stacked hidden states ([window * 1500 + Whisper frame]) for every active
    frame of every plan, 10 per frame, in plan/run/frame order; and, only where some frame reads
    before its stream's start, the 0/1 mask of the official zero padding (after the indices).

    Frame ``i`` reads Whisper frames ``2i - 4 + [0, 10)`` of its stream; each is taken from the
    last window of its run that starts at or before it (its position in that window counts
    from the window's start). Frames before the stream start read row 0 of the run's first window
    and are masked to zero.
    """
    frames: list[int] = []
    counts: list[int] = []
    n_starts: list[int] = []
    starts: list[int] = []
    for plan in plans:
        for run in plan.runs:
            frames += run.frames
            counts.append(len(run.frames))
            n_starts.append(len(run.starts))
            starts += run.starts
    if len(starts) != n_windows:
        raise RuntimeError("encoder windows do not match the planned runs")
    n_runs, widest = len(counts), max(n_starts)
    n_win = np.asarray(n_starts, dtype=np.int64)
    first = np.cumsum(n_win) - n_win  # the run's first window in the call
    # [run, k]: start of the run's k-th window in Whisper frames; past its last window: never chosen
    table = np.full((n_runs, widest), np.iinfo(np.int64).max, dtype=np.int64)
    rows = np.repeat(np.arange(n_runs), n_win)
    in_whisper_frames = np.asarray(starts, dtype=np.int64) // SAMPLES_PER_WHISPER_FRAME
    table[rows, np.arange(len(starts)) - first[rows]] = in_whisper_frames
    run_of = np.repeat(np.arange(n_runs), counts)  # per frame
    offsets = np.arange(WINDOW_WHISPER_FRAMES)
    whisper = np.asarray(frames, dtype=np.int64)[:, None] * 2 - LEAD_WHISPER_FRAMES + offsets
    window_starts = table[run_of]  # [frames, widest]
    which = (np.maximum(whisper, 0)[:, :, None] >= window_starts[:, None, :]).sum(-1) - 1
    # -1 cannot happen (a window always reaches back to the 80 ms look-back, checked in
    # MuseTalkFeaturizer.__init__); it would take the run's last window, as negative indexing does
    n_win_of = n_win[run_of][:, None]
    chosen = np.take_along_axis(window_starts, np.where(which < 0, which + n_win_of, which), axis=1)
    local = np.maximum(which * N_WHISPER_FRAMES + whisper - chosen, 0)
    if local.size and (local >= n_win_of * N_WHISPER_FRAMES).any():
        raise RuntimeError("a frame's Whisper window lies past its run's encoder windows")
    index = (first[run_of][:, None] * N_WHISPER_FRAMES + local).reshape(-1)
    keep = None
    if whisper.size and whisper[:, 0].min() < 0:
        keep = (whisper >= 0).astype(np.int64).reshape(-1)
    return index, keep


#: Samples a stream's mirror holds: the two 30 s windows at a segment's edge and a backlog.
MIRROR_SAMPLES = 2 * N_SAMPLES + 4 * SAMPLE_RATE


class _Mirror:
    """A stream's audio on the engine's device (:meth:`WhisperBatcher._mirror_rows`): stream
    samples [start, start + MIRROR_SAMPLES); [start, synced) hold what the stream's buffer held
    when last uploaded, the rest zeros (what the host batch reads past a stream's audio)."""

    def __init__(self, device: torch.device, start: int) -> None:
        self.tensor = torch.zeros(MIRROR_SAMPLES, dtype=torch.float32, device=device)
        self.start = start
        self.synced = start


@dataclass
class _Run:
    """The encoder windows serving one group of frames."""

    starts: list[int] = field(default_factory=list)  # stream sample of each window's first sample
    ends: list[int] = field(default_factory=list)  # and one past its last
    slots: list[int] = field(default_factory=list)  # positions in the call's frame list
    frames: list[int] = field(default_factory=list)  # stream-local frame numbers


@dataclass
class _Plan:
    """One call's frames of one stream: which are active, which windows serve them, and where
    their audio is: ``audio`` holds stream samples [audio_start, audio_start + audio_len), the
    rest reads as zero.

    ``audio`` is the featurizer's buffer itself (no copy): valid until the featurizer's next
    :meth:`MuseTalkFeaturizer._plan`, which may write into it (a trim or a growth makes a new
    array). :meth:`WhisperBatcher.features` calls :meth:`detach` before that happens.
    """

    featurizer: MuseTalkFeaturizer
    active: list[bool]
    runs: list[_Run]
    audio: np.ndarray
    audio_start: int
    audio_len: int
    dirty_from: int = 1 << 62  # the earliest sample written since the stream's mirror was last synced

    def span(self) -> tuple[int, int]:
        """The stream samples [first, last) its windows cover."""
        return (
            min(s for run in self.runs for s in run.starts),
            max(e for run in self.runs for e in run.ends),
        )

    def sources(self) -> list[_Source]:
        """Each window as a range of ``audio`` (see :class:`_Staging`)."""
        out: list[_Source] = []
        have_lo, have_hi = self.audio_start, self.audio_start + self.audio_len
        for run in self.runs:
            for start, end in zip(run.starts, run.ends, strict=True):
                lo, hi = max(start, have_lo), min(end, have_hi)
                if hi > lo:
                    out.append((self.audio, lo - have_lo, lo - start, hi - lo, end - start))
                else:
                    out.append((self.audio, 0, 0, 0, end - start))
        return out

    @property
    def windows(self) -> list[np.ndarray]:
        """The windows as float32 arrays (stream samples [start, end)); for inspection and tests."""
        out = []
        for src, offset, pad, count, length in self.sources():
            window = np.zeros(length, dtype=np.float32)
            window[pad : pad + count] = src[offset : offset + count]
            out.append(window)
        return out

    def detach(self) -> None:
        """Keep a private copy of the audio the windows read, instead of the featurizer's buffer."""
        starts = [s for run in self.runs for s in run.starts]
        ends = [e for run in self.runs for e in run.ends]
        lo = max(min(starts, default=0), self.audio_start)
        hi = min(max(ends, default=0), self.audio_start + self.audio_len)
        hi = max(hi, lo)
        self.audio = self.audio[lo - self.audio_start : hi - self.audio_start].copy()
        self.audio_start, self.audio_len = lo, hi - lo


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
        crop = getattr(whisper, "crop", None)  # (whisper is None when an engine only checks options)
        if crop is not None:
            if context_seconds is not None:
                raise ValueError("cropped windows lie on the 30 s grid: context_seconds must be None")
            if run_positions(frames_per_run) > crop:
                raise ValueError(
                    f"a run of {frames_per_run} frames needs {run_positions(frames_per_run)} "
                    f"positions, more than the cropped windows' {crop}"
                )
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
        self._mirror: _Mirror | None = None  # this stream's audio on the device (WhisperBatcher.mirror)
        self._dirty_from = 1 << 62  # the earliest sample written since a plan last took it over

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
            run.ends = [min(self._window_limit(s), end) for s in run.starts]
        plan = _Plan(self, active, runs, self._buf, self._buf_start, self._buf_len)
        if runs:  # a speaking plan's call syncs the mirror (or drops it): the writes are its now
            plan.dirty_from, self._dirty_from = self._dirty_from, 1 << 62
        if frames:  # (a trim makes a new array: the plan keeps reading the one it names)
            self._trim(self._window_starts(self._next, self._next, self._next * SAMPLES_PER_VIDEO_FRAME)[0])
        return plan

    def _window_starts(self, first: int, last: int, end: int) -> list[int]:
        """Start samples of the windows serving frames first..last with audio up to ``end``."""
        if self.context_samples is None:  # the official 30 s grid: one window per segment touched
            lo = max(0, 2 * first - LEAD_WHISPER_FRAMES) // N_WHISPER_FRAMES
            hi = max(0, 2 * last - LEAD_WHISPER_FRAMES + WINDOW_WHISPER_FRAMES - 1) // N_WHISPER_FRAMES
            crop = self._whisper.crop
            if crop is None:
                return [seg * N_SAMPLES for seg in range(lo, hi + 1)]
            # cropped: the last ``crop`` positions of the segment's part up to ``end`` (on the
            # 320-sample grid: ``end`` and the segment starts are), and room for the silent tail
            # before the segment's end
            span, whole = crop * SAMPLES_PER_WHISPER_FRAME, (crop + CROP_TAIL_POSITIONS) * SAMPLES_PER_WHISPER_FRAME
            return [
                max(seg * N_SAMPLES, min(min((seg + 1) * N_SAMPLES, end) - span, (seg + 1) * N_SAMPLES - whole))
                for seg in range(lo, hi + 1)
            ]
        start = first * SAMPLES_PER_VIDEO_FRAME - self.context_samples
        start = start // SAMPLES_PER_WHISPER_FRAME * SAMPLES_PER_WHISPER_FRAME
        return [max(0, start, end - N_SAMPLES)]  # end - N_SAMPLES is on the 320 grid too

    def _window_limit(self, start: int) -> int:
        """One past the last sample a window starting at ``start`` may hold: its segment's end on
        the grid, 30 s on from it when sliding."""
        if self.context_samples is None:
            return (start // N_SAMPLES + 1) * N_SAMPLES
        return start + N_SAMPLES

    # -- the rolling sample buffer ----------------------------------------------------------------

    def _write(self, start: int, samples: np.ndarray) -> None:
        """Put a frame's window at stream sample ``start`` (overlaps hold the same audio).

        In place when it fits: a plan of this featurizer made earlier in the same batched call is
        detached first (WhisperBatcher.features)."""
        end = start + len(samples)
        lo = max(start, self._buf_start)
        if end <= lo:
            return
        self._dirty_from = min(self._dirty_from, lo)
        need = end - self._buf_start
        if need > len(self._buf):
            grown = np.zeros(max(need, 2 * len(self._buf), SAMPLE_RATE), dtype=np.float32)
            grown[: self._buf_len] = self._buf[: self._buf_len]
            self._buf = grown
        self._buf[lo - self._buf_start : end - self._buf_start] = samples[lo - start :]
        self._buf_len = max(self._buf_len, need)

    def _trim(self, keep_from: int) -> None:
        """Forget samples before ``keep_from`` once they are a good part of the buffer."""
        drop = keep_from - self._buf_start
        if drop <= 0 or drop < len(self._buf) // 2:
            return
        drop = min(drop, self._buf_len)
        # a new array (zero past the kept audio: a later gap in the stream must read as silence),
        # not a shift in place: a plan made before the trim still reads the old one
        kept = np.zeros(len(self._buf), dtype=np.float32)
        kept[: self._buf_len - drop] = self._buf[drop : self._buf_len]
        self._buf = kept
        self._buf_start += drop
        self._buf_len -= drop
