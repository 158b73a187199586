"""The batched CPU side of WhisperBatcher.features gives exactly the straightforward algorithm's numbers.

``WhisperBatcher.features`` plans windows as ranges of each featurizer's rolling buffer, copies
them once into a reusable host batch (clearing only what an earlier call left), encodes all passes
into one tensor and gathers every frame's tokens with one index computed in numpy
(pipeline/engines/musetalk/features.py, module docstring). The reference below is that module's
earlier per-stream code (as of commit b21da3d), its maths unchanged: each window read into a fresh
array, each pass's batch built from zeros, each run's tokens picked by its own torch ops. Both see
the same windows in the same passes of the same encoder, so tokens must be bit-identical (-0.0 of
the masked padding included) and the active flags equal.

A tiny random Whisper encoder (16 wide, 4 layers) keeps this to seconds on a CPU; in the long
scenario the reference does not run it again: it checks that each of its passes' audio batches
equals (shape and bits) the one the batched path sent, and takes that pass's hidden states.
:func:`test_encode_audio_equals_the_reference_batches` runs both through the encoder.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from pipeline.audio.windows import AudioFrame
from pipeline.engines.base import FrameFeatures
from pipeline.engines.musetalk import features as F

SR = 16000


@pytest.fixture(
    scope="module",
    params=[
        "cpu",
        pytest.param("cuda", marks=pytest.mark.gpu),
        pytest.param("cuda-graphs", marks=pytest.mark.gpu),
        # a second GPU while the current device stays cuda:0 (the 2 x H200 load test failed there)
        pytest.param("cuda-other", marks=pytest.mark.gpu),
    ],
)
def whisper(request: pytest.FixtureRequest) -> F.WhisperBatcher:
    """On a GPU: fp16, the pinned host batch and non_blocking copies; with and without CUDA graphs."""
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    if request.param != "cpu" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if request.param == "cuda-other" and torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    gpu = f"cuda:{torch.cuda.device_count() - 1}" if request.param == "cuda-other" else "cuda"
    torch.manual_seed(3)
    cfg = WhisperConfig(
        d_model=16,
        encoder_layers=4,
        encoder_attention_heads=1,
        encoder_ffn_dim=16,
        decoder_layers=1,
        decoder_attention_heads=1,
        decoder_ffn_dim=16,
        num_mel_bins=80,
        max_source_positions=1500,
    )
    encoder = WhisperEncoder(cfg).eval()
    if request.param != "cpu":
        encoder = encoder.to(gpu, torch.float16)
    # 3 windows per pass: calls below need 2-3 passes, and a run's two windows (a 30 s edge) can
    # fall into different passes
    return F.WhisperBatcher(
        encoder, WhisperFeatureExtractor(), max_batch=3, cuda_graphs=request.param == "cuda-graphs"
    )


# --- the reference: the module's earlier per-stream algorithm -----------------------------------------


class RefFeaturizer:
    """MuseTalkFeaturizer's planning and token picking as they were before the batched CPU path."""

    def __init__(
        self, whisper, *, context_seconds=None, frames_per_run=F.DEFAULT_FRAMES_PER_RUN, hangover_seconds=0.2
    ):
        self.whisper = whisper
        self.context_samples = None if context_seconds is None else round(context_seconds * SR)
        self.frames_per_run = frames_per_run
        self.hangover_frames = round(hangover_seconds * F.FPS)
        self._origin = None
        self._next = 0
        self._buf = np.zeros(0, dtype=np.float32)
        self._buf_start = 0
        self._buf_len = 0
        self._quiet = 1 << 30
        self.trims = 0

    def plan(self, frames):
        active, runs, current = [], [], None
        for slot, frame in enumerate(frames):
            if self._origin is None:
                self._origin = frame.index
            local = frame.index - self._origin
            assert local >= self._next
            self._next = local + 1
            self._write(local * 640 - 1280, frame.window)
            self._quiet = 0 if frame.speech else self._quiet + 1
            is_active = self._quiet <= self.hangover_frames
            active.append(is_active)
            if not is_active:
                continue
            if current is None or local - current["frames"][0] >= self.frames_per_run:
                current = {"slots": [], "frames": []}
                runs.append(current)
            current["slots"].append(slot)
            current["frames"].append(local)
        for run in runs:
            end = run["frames"][-1] * 640 + 1920
            run["starts"] = self._window_starts(run["frames"][0], run["frames"][-1], end)
            run["windows"] = [self._read(s, min(s + F.N_SAMPLES, end)) for s in run["starts"]]
        if frames:
            self._trim(self._window_starts(self._next, self._next, self._next * 640)[0])
        return active, runs

    def _window_starts(self, first, last, end):
        if self.context_samples is None:
            lo = max(0, 2 * first - 4) // 1500
            hi = max(0, 2 * last - 4 + 10 - 1) // 1500
            return [seg * F.N_SAMPLES for seg in range(lo, hi + 1)]
        start = (first * 640 - self.context_samples) // 320 * 320
        return [max(0, start, end - F.N_SAMPLES)]

    def finish(self, active, runs, hidden):
        out = [FrameFeatures(active=False, data=None) for _ in active]
        offsets = torch.arange(10)
        pos = 0
        for run in runs:
            states = hidden[pos : pos + len(run["windows"])]
            pos += len(run["windows"])
            stacked = states[0] if len(states) == 1 else torch.cat(list(states))
            global_idx = (torch.tensor(run["frames"])[:, None] * 2 - 4) + offsets
            starts = torch.tensor(run["starts"]) // 320
            which = (global_idx.clamp(min=0)[..., None] >= starts).sum(-1) - 1
            local_idx = which * 1500 + global_idx - starts[which]
            keep = (global_idx >= 0).to(device=stacked.device, dtype=stacked.dtype)
            picked = stacked[local_idx.clamp(min=0).to(stacked.device)]
            tokens = (picked * keep[:, :, None, None]).reshape(len(run["frames"]), 50, stacked.shape[-1])
            for k, slot in enumerate(run["slots"]):
                out[slot] = FrameFeatures(active=True, data=tokens[k])
        assert pos == len(hidden)
        return out

    def _write(self, start, samples):
        end = start + len(samples)
        lo = max(start, self._buf_start)
        if end <= lo:
            return
        need = end - self._buf_start
        if need > len(self._buf):
            grown = np.zeros(max(need, 2 * len(self._buf), SR), dtype=np.float32)
            grown[: self._buf_len] = self._buf[: self._buf_len]
            self._buf = grown
        self._buf[lo - self._buf_start : end - self._buf_start] = samples[lo - start :]
        self._buf_len = max(self._buf_len, need)

    def _read(self, start, end):
        out = np.zeros(end - start, dtype=np.float32)
        lo, hi = max(start, self._buf_start), min(end, self._buf_start + self._buf_len)
        if hi > lo:
            out[lo - start : hi - start] = self._buf[lo - self._buf_start : hi - self._buf_start]
        return out

    def _trim(self, keep_from):
        drop = keep_from - self._buf_start
        if drop <= 0 or drop < len(self._buf) // 2:
            return
        drop = min(drop, self._buf_len)
        self._buf[: self._buf_len - drop] = self._buf[drop : self._buf_len].copy()
        self._buf[self._buf_len - drop :] = 0.0
        self.trims += 1
        self._buf_start += drop
        self._buf_len -= drop


def ref_encode_audio(whisper, windows, replay=None):
    out = []
    for lo in range(0, len(windows), whisper.max_batch):
        group = windows[lo : lo + whisper.max_batch]
        batch = torch.zeros((len(group), max(1, *(len(w) for w in group))), dtype=torch.float32)
        for row, w in enumerate(group):
            batch[row, : len(w)] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
        if replay is not None:
            hidden = replay.take(batch)
        else:
            with torch.inference_mode():
                hidden = whisper.encode(whisper.log_mel(batch))
        out.extend(hidden.unbind(0))
    return out


class Replay:
    """Records the batched path's encoder passes: (audio batch as sent, hidden states)."""

    def __init__(self, whisper, monkeypatch: pytest.MonkeyPatch) -> None:
        self.passes: list[list[torch.Tensor]] = []
        log_mel, encode = whisper.log_mel, whisper.encode

        def logged_log_mel(audio, positions=F.N_WHISPER_FRAMES):
            self.passes.append([audio.clone()])
            return log_mel(audio, positions)

        def logged_encode(mel, *, out=None, offsets=None):
            hidden = encode(mel, out=out, offsets=offsets)
            self.passes[-1].append(hidden.clone())
            return hidden

        monkeypatch.setattr(whisper, "log_mel", logged_log_mel)
        monkeypatch.setattr(whisper, "encode", logged_encode)

    def take(self, batch: torch.Tensor) -> torch.Tensor:
        audio, hidden = self.passes.pop(0)
        assert audio.shape == batch.shape and torch.equal(audio.cpu(), batch)
        return hidden


def ref_features(whisper, jobs, replay=None, stats=None):
    plans = [(featurizer, *featurizer.plan(frames)) for featurizer, frames in jobs]
    windows = [w for _, _, runs in plans for run in runs for w in run["windows"]]
    if stats is not None:  # what the call exercised
        pos = 0
        for _, active, runs in plans:
            stats["masked"] += sum(f < 2 for run in runs for f in run["frames"])
            for run in runs:
                if len(run["starts"]) > 1:
                    stats["two_windows"] += 1
                    stats["split_over_passes"] += pos // whisper.max_batch != (pos + 1) // whisper.max_batch
                pos += len(run["starts"])
        stats["passes"] += math.ceil(len(windows) / whisper.max_batch)
        stats["duplicates"] += len(jobs) - len({id(f) for f, _ in jobs})
    hidden = ref_encode_audio(whisper, windows, replay) if windows else []
    results, pos = [], 0
    for featurizer, active, runs in plans:
        n = sum(len(run["windows"]) for run in runs)
        results.append(featurizer.finish(active, runs, hidden[pos : pos + n]))
        pos += n
    return results


# --- streams ----------------------------------------------------------------------------------------


def windows_of(audio: np.ndarray, n_frames: int) -> list[np.ndarray]:
    """Frame i's window [i*640 - 1280, i*640 + 1920) of ``audio``, zero outside it."""
    padded = np.concatenate([np.zeros(1280, np.float32), audio, np.zeros(n_frames * 640 + 3200, np.float32)])
    return [padded[i * 640 : i * 640 + 3200].copy() for i in range(n_frames)]


def voice(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 110 + 30 * rng.uniform() + 40 * np.sin(2 * np.pi * 0.7 * t)
    tone = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / SR) / k for k in range(1, 5))
    env = np.clip(np.sin(2 * np.pi * 3.1 * t + rng.uniform(0, 6)), 0, None) ** 2
    return (0.3 * tone * env + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


class Stream:
    """One test stream: its frames, and a new featurizer and a reference one with the same options."""

    def __init__(self, whisper, *, seed, seconds, first_index, speech, options, jumbled=False, gap=None):
        rng = np.random.default_rng(seed)
        n = int(seconds * F.FPS)
        if jumbled:  # each window its own noise: overlaps disagree, the last write must win
            wins = [rng.standard_normal(3200).astype(np.float32) * 0.2 for _ in range(n)]
        else:
            wins = windows_of(voice(seconds + 1, seed), n)
        local = list(range(n))
        if gap is not None:  # frames gap[0]..gap[1]-1 never come: their audio reads as silence
            local = [i for i in local if not gap[0] <= i < gap[1]]
        self.frames = [AudioFrame(first_index + i, wins[i], bool(speech(i, rng))) for i in local]
        self.new = F.MuseTalkFeaturizer(whisper, **options)
        self.ref = RefFeaturizer(whisper, **options)
        self.pos = 0

    def take(self, n: int) -> list[AudioFrame]:
        out = self.frames[self.pos : self.pos + n]
        self.pos += len(out)
        return out


def assert_same(got: list[list[FrameFeatures]], want: list[list[FrameFeatures]], whisper) -> int:
    """Same flags, bit-identical tokens; returns how many active frames were compared."""
    assert len(got) == len(want)
    compared = 0
    for g_job, w_job in zip(got, want, strict=True):
        assert [x.active for x in g_job] == [x.active for x in w_job]
        for g, w in zip(g_job, w_job, strict=True):
            if not w.active:
                assert g.data is None
                continue
            assert g.data.shape == (50, whisper._d_model) and g.data.dtype == whisper.dtype
            assert g.data.device == whisper.device
            assert torch.equal(g.data, w.data)
            bits = torch.int32 if g.data.element_size() == 4 else torch.int16
            assert torch.equal(g.data.view(bits), w.data.view(bits))  # -0.0 too
            compared += 1
    return compared


def make_streams(whisper) -> list[Stream]:
    talk = lambda i, rng: (i // 9) % 3 != 2  # 2 of every 3 stretches of 9 frames
    return [
        # starts speaking at its first frame: frames 0 and 1 read the zero padding
        Stream(whisper, seed=1, seconds=1.2, first_index=0, speech=lambda i, rng: True, options={}),
        # talks across the 30 s segment edge (video frame 750): runs of two windows
        Stream(whisper, seed=2, seconds=30.8, first_index=1000, speech=lambda i, rng: i >= 735, options={}),
        # the same edge with small runs and a hangover of 0.2 s after each stretch
        Stream(
            whisper,
            seed=3,
            seconds=30.9,
            first_index=7,
            speech=lambda i, rng: i >= 738 and talk(i, rng),
            options={"frames_per_run": 5},
        ),
        # a sliding 1 s context, random speech, a gap in its frames
        Stream(
            whisper,
            seed=4,
            seconds=2.0,
            first_index=50,
            speech=lambda i, rng: rng.uniform() < 0.6,
            options={"context_seconds": 1.0, "frames_per_run": 8, "hangover_seconds": 0.08},
            gap=(20, 27),
        ),
        # windows that disagree where they overlap, and a 2 s context
        Stream(
            whisper,
            seed=5,
            seconds=1.5,
            first_index=3,
            speech=talk,
            options={"context_seconds": 2.0},
            jumbled=True,
        ),
        # silent at first, then talking
        Stream(whisper, seed=6, seconds=1.5, first_index=400, speech=lambda i, rng: i >= 12, options={}),
    ]


@pytest.mark.parametrize("mirror", [False, True], ids=["host-batch", "mirrors"])
def test_batched_features_equal_the_per_stream_reference(whisper, mirror: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bit for bit the per-stream reference, building the encoder's windows in the host batch or
    from the streams' audio kept on the device (WhisperBatcher.mirror: a GPU's default)."""
    monkeypatch.setattr(whisper, "mirror", mirror)
    streams = make_streams(whisper)
    mirrored = 0
    replay = Replay(whisper, monkeypatch)
    # fast-forward the two long streams to just before the 30 s edge: silent frames, no encoder
    for s in streams[1:3]:
        frames = s.take(735)
        assert not any(x.active for x in s.new.features(frames))
        assert not any(x.active for x in ref_features(whisper, [(s.ref, frames)])[0])
    rng = np.random.default_rng(0)
    compared = calls = 0
    stats = dict.fromkeys(("masked", "two_windows", "split_over_passes", "passes", "duplicates"), 0)
    before = whisper.encoder_windows
    while any(s.pos < len(s.frames) for s in streams):
        pending: list[list[tuple[Stream, list[AudioFrame]]]] = []
        for k, s in enumerate(streams):
            n = 1 if rng.uniform() < 0.7 else int(rng.integers(2, 12))  # mostly one frame per job
            parts = [n]
            if k in (1, 4) and calls % 3 == 0:  # twice in one call: two jobs of consecutive frames
                parts = [n, int(rng.integers(1, 4))]
            jobs = [(s, frames) for frames in (s.take(m) for m in parts) if frames]
            if jobs:
                pending.append(jobs)
        jobs_new, jobs_ref = [], []
        while pending:  # the streams interleaved at random, each one's jobs in order
            k = int(rng.integers(len(pending)))
            s, frames = pending[k].pop(0)
            jobs_new.append((s.new, frames))
            jobs_ref.append((s.ref, frames))
            if not pending[k]:
                pending.pop(k)
        got = whisper.features(jobs_new)
        mirrored += sum(s.new._mirror is not None for s in streams)
        want = ref_features(whisper, jobs_ref, replay, stats)
        assert not replay.passes  # the reference made exactly the same passes
        compared += assert_same(got, want, whisper)
        calls += 1
    assert calls > 15 and compared > 150
    assert stats["passes"] > 1.5 * calls and whisper.encoder_windows - before > 2 * calls
    assert stats["masked"] >= 2 and stats["duplicates"] > 5
    assert stats["two_windows"] > 3 and stats["split_over_passes"] > 0
    # at the 30 s edge a plan trims its own buffer after choosing windows that read the old one
    assert streams[1].ref.trims and streams[2].ref.trims
    # the mirrors served most calls (a stream twice in one call falls back to the host batch)
    assert mirrored > 3 * calls if mirror else mirrored == 0


def test_encode_audio_equals_the_reference_batches(whisper) -> None:
    rng = np.random.default_rng(1)
    lengths = [SR, 30 * SR, 7, 5 * SR + 3, 2 * SR, 640]
    windows = [rng.standard_normal(n).astype(np.float32) for n in lengths]
    for chosen in (windows, windows[2:5], windows[:1], windows[::-1]):  # the host batch shrinks and grows
        got = whisper.encode_audio(chosen)
        want = ref_encode_audio(whisper, chosen)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)
    assert whisper.encode_audio([]) == []


def test_comparison_catches_an_off_by_one(whisper, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference comparison is sharp: one Whisper frame off, for one frame, is caught."""
    original = F._gather_index

    def shifted(plans, n_windows):
        index, keep = original(plans, n_windows)
        index = index.copy()
        index[-1] += 1  # the last token row of the last frame reads the next Whisper frame
        return index, keep

    s = Stream(whisper, seed=9, seconds=1.0, first_index=0, speech=lambda i, rng: True, options={})
    jobs = [(s.new, s.frames[:10])]
    want = ref_features(whisper, [(s.ref, s.frames[:10])])
    monkeypatch.setattr(F, "_gather_index", shifted)
    got = whisper.features(jobs)
    with pytest.raises(AssertionError):
        assert_same(got, want, whisper)
    assert all(torch.equal(g.data, w.data) for g, w in zip(got[0][:-1], want[0][:-1], strict=True))


# --- the host batch's bookkeeping -----------------------------------------------------------------------


def test_subtract_intervals_equals_a_mask() -> None:
    rng = np.random.default_rng(2)

    def intervals(n):
        cuts = np.sort(rng.choice(200, size=2 * n, replace=False))
        return [(int(a), int(b)) for a, b in cuts.reshape(-1, 2)]

    for _ in range(300):
        stale, fresh = intervals(int(rng.integers(0, 6))), intervals(int(rng.integers(0, 6)))
        want = np.zeros(200, bool)
        for a, b in stale:
            want[a:b] = True
        for a, b in fresh:
            want[a:b] = False
        got = np.zeros(200, bool)
        parts = F._subtract(stale, fresh)
        for a, b in parts:
            assert a < b and not got[a:b].any()
            got[a:b] = True
        assert np.array_equal(got, want), (stale, fresh, parts)


def test_staging_rows_are_exactly_the_zero_padded_windows() -> None:
    """Fill after fill (more, fewer, longer, shorter windows), each pass's [rows, width] view holds
    each window at its row's start and zeros everywhere else."""
    rng = np.random.default_rng(3)
    staging = F._Staging(pinned=False)
    for _ in range(60):
        sources, rows = [], []
        for _ in range(int(rng.integers(1, 8))):
            length = int(rng.integers(1, 4000))
            count = int(rng.integers(0, length + 1))
            pad = int(rng.integers(0, length - count + 1))
            src = rng.standard_normal(count + 50).astype(np.float32) + 5.0  # never zero
            offset = int(rng.integers(0, 51))
            sources.append((src, offset, pad, count, length))
            row = np.zeros(length, np.float32)
            row[pad : pad + count] = src[offset : offset + count]
            rows.append(row)
        passes = [min(3, len(sources) - lo) for lo in range(0, len(sources), 3)]
        groups = staging.fill(sources, passes)
        k = 0
        for n, offset, width in groups:
            assert offset % 16 == 0 and width == max(len(r) for r in rows[k : k + n])
            batch = staging.audio[offset : offset + n * width].view(n, width).numpy()
            for r in range(n):
                want = np.zeros(width, np.float32)
                want[: len(rows[k + r])] = rows[k + r]
                assert np.array_equal(batch[r], want)
            k += n
        assert k == len(sources)
    assert math.isfinite(float(staging.audio.sum()))


# --- trimmed windows (WhisperBatcher(trim=True)) -------------------------------------------------


def trimmed_like(whisper) -> F.WhisperBatcher:
    return F.WhisperBatcher(
        whisper.encoder, whisper.feature_extractor, max_batch=3, cuda_graphs=whisper.cuda_graphs, trim=True
    )


def ref_trimmed_hidden(whisper, window: np.ndarray) -> torch.Tensor:
    """One window by the definition: its first positions_for(len) positions, alone in a pass;
    NaN past them, so a token read from beyond what was encoded poisons the comparison."""
    positions = whisper.positions_for(len(window))
    audio = torch.from_numpy(np.ascontiguousarray(window, dtype=np.float32))[None]
    with torch.inference_mode():
        mel = whisper.log_mel(audio, positions)
        assert mel.shape[-1] == 2 * positions
        hidden = whisper.encode(mel)[0]
    full = torch.full((F.N_WHISPER_FRAMES, *hidden.shape[1:]), float("nan"), dtype=hidden.dtype, device=hidden.device)
    full[:positions] = hidden
    return full


def test_trimmed_positions_and_log_mel() -> None:
    batcher = F.WhisperBatcher.__new__(F.WhisperBatcher)
    batcher.trim = True
    batcher.crop = 260  # cropped: every window the same length, 4 positions of silence after its audio
    assert {batcher.positions_for(n) for n in (0, 320 * 100, 320 * 260)} == {264} and batcher.lengths == [264]
    batcher.crop = None
    # the audio's positions + 2, rounded up to 500; a full 30 s window keeps all 1500
    assert [batcher.positions_for(n) for n in (0, 1, 320 * 498, 320 * 499, 320 * 1000, 30 * SR)] == [
        500, 500, 500, 1000, 1500, 1500,
    ]
    batcher.trim = False
    assert batcher.positions_for(320) == 1500


def test_trimmed_log_mel_is_the_head_of_the_padded_one(whisper) -> None:
    rng = np.random.default_rng(3)
    for positions, seconds in ((500, 0.3), (500, 9.9), (750, 12.0), (1000, 19.5)):
        audio = torch.from_numpy(voice(seconds, int(seconds * 10))[: int(seconds * SR)] + 0 * rng.uniform())
        head = whisper.log_mel(audio, positions)
        full = whisper.log_mel(audio)
        assert head.shape == (1, 80, 2 * positions) and full.shape == (1, 80, 3000)
        torch.testing.assert_close(head, full[:, :, : 2 * positions], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        whisper.log_mel(torch.zeros(500 * 320 + 400), 500)


def test_encoder_over_all_positions_is_the_encoders_own_forward(whisper) -> None:
    """The trimmed path runs the encoder's modules by hand; over all 1500 positions it must give
    what WhisperEncoder.forward gives (so over fewer it is the same computation, cut short)."""
    mel = whisper.log_mel(torch.from_numpy(voice(3.0, 9)))
    with torch.inference_mode():
        official = whisper.encoder(mel.to(whisper.dtype), output_hidden_states=True).hidden_states
        ours = whisper._encode_positions(mel.to(whisper.dtype))
    assert len(ours) == len(official) == 5
    for a, b in zip(ours, official, strict=True):
        torch.testing.assert_close(a, b, atol=1e-3 if whisper.dtype == torch.float16 else 1e-5, rtol=1e-3)


def test_trimmed_features_follow_their_definition(whisper) -> None:
    """Streams of every kind through a trimming batcher: each frame's tokens are those of its
    windows encoded alone over their own positions; the windows were encoded sorted by length
    in passes of one length, over far fewer positions than padded ones."""
    trim = trimmed_like(whisper)
    # and one that starts talking 12 s into its first segment (a 750-position window)
    streams = make_streams(trim) + [
        Stream(trim, seed=7, seconds=13.0, first_index=20, speech=lambda i, rng: i >= 300, options={})
    ]
    for s, n in ((streams[1], 735), (streams[2], 735), (streams[-1], 300)):  # silent stretches
        frames = s.take(n)
        s.new.features(frames)
        s.ref.plan(frames)
    rng = np.random.default_rng(4)
    tol = {"atol": 2e-2, "rtol": 1e-2} if trim.dtype == torch.float16 else {"atol": 1e-5, "rtol": 1e-4}
    compared = calls = 0
    lengths: set[int] = set()
    while any(s.pos < len(s.frames) for s in streams):
        jobs = [(s, s.take(1 if rng.uniform() < 0.7 else int(rng.integers(2, 6)))) for s in streams]
        jobs = [(s, frames) for s, frames in jobs if frames]
        got = trim.features([(s.new, frames) for s, frames in jobs])
        for (s, frames), g_job in zip(jobs, got, strict=True):
            active, runs = s.ref.plan(frames)
            windows = [w for run in runs for w in run["windows"]]
            lengths.update(trim.positions_for(len(w)) for w in windows)
            hidden = [ref_trimmed_hidden(trim, w) for w in windows]
            want = s.ref.finish(active, runs, hidden)
            assert [x.active for x in g_job] == [x.active for x in want]
            for g, w in zip(g_job, want, strict=True):
                if w.active:
                    assert not torch.isnan(w.data).any()  # the definition read only encoded positions
                    torch.testing.assert_close(g.data, w.data, **tol)
                    compared += 1
        calls += 1
    assert calls > 15 and compared > 150
    assert lengths == {500, 1000, 1500}  # short windows, 30 s edges, and between
    assert trim.encoder_positions < 0.6 * F.N_WHISPER_FRAMES * trim.encoder_windows


def test_trimmed_encode_audio_sorts_windows_into_passes_of_one_length(whisper, monkeypatch) -> None:
    trim = trimmed_like(whisper)
    shapes: list[tuple[int, int]] = []
    encode = trim.encode

    def logged(mel, *, out=None, offsets=None):
        shapes.append((mel.shape[0], mel.shape[-1] // 2))
        return encode(mel, out=out, offsets=offsets)

    monkeypatch.setattr(trim, "encode", logged)
    rng = np.random.default_rng(5)
    lengths = [SR, 30 * SR, 7, 12 * SR, 2 * SR, 640, 11 * SR, 3 * SR]
    windows = [rng.standard_normal(n).astype(np.float32) for n in lengths]
    got = trim.encode_audio(windows)
    # 1500 (30 s), 1000 (12 s, 11 s), 500 x 5 in passes of at most 3
    assert shapes == [(1, 1500), (2, 1000), (3, 500), (2, 500)]
    for w, g in zip(windows, got, strict=True):
        want = ref_trimmed_hidden(trim, w)[: trim.positions_for(len(w))]
        assert g.shape == want.shape
        torch.testing.assert_close(g, want, atol=2e-2 if trim.dtype == torch.float16 else 1e-5, rtol=1e-3)


def test_a_pass_does_not_wait_for_the_engines_stream(whisper) -> None:
    """On a GPU a feature pass runs on its own stream without waiting for the current one (on the
    feature thread that is the engine's, busy with a UNet/VAE batch), and its tokens are complete
    when it returns; they equal the tokens of a pass made while that stream is idle."""
    if whisper.device.type != "cuda":
        pytest.skip("the CUDA stream path")
    stream = Stream(whisper, seed=9, seconds=1.0, first_index=0, speech=lambda i, rng: True, options={})
    twin = Stream(whisper, seed=9, seconds=1.0, first_index=0, speech=lambda i, rng: True, options={})
    frames = stream.take(10)
    want = whisper.features([(twin.new, twin.take(10))])
    with torch.cuda.device(whisper.device):
        busy = torch.cuda.current_stream(whisper.device)
        torch.cuda._sleep(int(5e9))  # seconds of GPU clock cycles on the current stream
        got = whisper.features([(stream.new, frames)])
        still_busy = not busy.query()  # read before anything else waits for it
        tokens = [f.data.float().cpu() for f in got[0] if f.active]  # complete: no further wait needed
        busy.synchronize()
    assert still_busy, "the pass waited for the current stream"
    assert_same(got, want, whisper)
    assert len(tokens) == 10


def cropped_like(whisper, crop: int) -> F.WhisperBatcher:
    return F.WhisperBatcher(
        whisper.encoder, whisper.feature_extractor, max_batch=3, cuda_graphs=whisper.cuda_graphs, trim=True,
        crop_positions=crop,
    )


def ref_cropped_tokens(whisper, audio: np.ndarray, i: int, crop: int) -> torch.Tensor:
    """Frame ``i``'s tokens by the definition of a cropped window, one frame per call: for each 30 s
    segment its Whisper frames [2i - 4, 2i + 6) touch, the last ``crop`` positions of the segment's
    stream audio up to the frame's lookahead and 4 of silence (at the segment's end: its last
    ``crop + 4`` positions of audio), encoded alone with the positional embedding rows of their
    place in the segment (the encoder's modules called here, not WhisperBatcher.encode)."""
    enc = whisper.encoder
    end = 640 * i + 1920
    rows = []
    for j in range(2 * i - 4, 2 * i + 6):
        if j < 0:
            rows.append(torch.zeros(F.N_HIDDEN, whisper._d_model, dtype=whisper.dtype, device=whisper.device))
            continue
        seg = j // F.N_WHISPER_FRAMES
        stop = min((seg + 1) * F.N_SAMPLES, end)
        positions = crop + 4
        start = max(seg * F.N_SAMPLES, min(stop - crop * 320, (seg + 1) * F.N_SAMPLES - positions * 320))
        first = (start - seg * F.N_SAMPLES) // 320
        window = torch.from_numpy(np.ascontiguousarray(audio[start:stop], dtype=np.float32))[None]
        with torch.inference_mode():
            mel = whisper.log_mel(window, positions).to(device=whisper.device, dtype=whisper.dtype)
            x = torch.nn.functional.gelu(enc.conv1(mel))
            x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
            x = x + enc.embed_positions.weight[first : first + positions]
            states = [x]
            for layer in enc.layers:
                x = layer(x, None, **whisper._layer_kwargs)
                x = x[0] if isinstance(x, tuple) else x
                states.append(x)
            states[-1] = enc.layer_norm(x)
            rows.append(torch.stack(states, dim=2)[0, j - seg * F.N_WHISPER_FRAMES - first])
    return torch.stack(rows).reshape(F.N_TOKENS, whisper._d_model)


@pytest.mark.parametrize("mirror", [False, True], ids=["host-batch", "mirrors"])
def test_cropped_windows_follow_their_definition(whisper, mirror: bool) -> None:
    """WhisperBatcher(crop_positions): each frame's tokens are those of the last ``crop`` positions
    before its lookahead at their place in the segment (frames at the stream's start, deep in a
    segment, across the 30 s edge); every window costs exactly ``crop`` positions."""
    crop = 70
    batcher = cropped_like(whisper, crop)
    batcher.mirror = mirror
    audio = voice(31.0, 11)
    n = int(30.8 * F.FPS)
    wins = windows_of(audio, n)
    talk = set(range(0, 6)) | set(range(300, 304)) | set(range(744, n))  # start, deep, the edge
    featurizer = F.MuseTalkFeaturizer(batcher, hangover_seconds=0)
    tol = {"atol": 2e-2, "rtol": 1e-2} if batcher.dtype == torch.float16 else {"atol": 1e-5, "rtol": 1e-4}
    compared = 0
    for i in range(n):
        (got,) = featurizer.features([AudioFrame(i, wins[i], i in talk)])
        if i not in talk:
            assert not got.active
            continue
        torch.testing.assert_close(got.data, ref_cropped_tokens(batcher, audio, i, crop), **tol)
        compared += 1
    assert compared == len(talk)
    assert batcher.encoder_positions == (crop + 4) * batcher.encoder_windows
    assert batcher.encoder_windows > len(talk)  # frames at the edge read two windows


def test_cropped_windows_refuse_what_they_cannot_serve(whisper) -> None:
    with pytest.raises(ValueError, match="trimming"):
        F.WhisperBatcher(whisper.encoder, whisper.feature_extractor, crop_positions=100)
    with pytest.raises(ValueError, match="positions"):
        cropped_like(whisper, 1497)
    batcher = cropped_like(whisper, 40)
    with pytest.raises(ValueError, match="grid"):
        F.MuseTalkFeaturizer(batcher, context_seconds=2.0, frames_per_run=5)
    with pytest.raises(ValueError, match="needs 58 positions"):
        F.MuseTalkFeaturizer(batcher, frames_per_run=25)
    F.MuseTalkFeaturizer(batcher, frames_per_run=16)  # 40 positions: fits
