"""MuseTalk v1.5 engine on the CPU: loader, features, latents cache, reference frame, batching.

Weights are synthetic (random) checkpoints written in the official layout by
``pipeline.engines.musetalk.synthetic``; nothing is downloaded (HF_HUB_OFFLINE). Skipped cleanly
when the ``gpu`` extra (torch, diffusers, transformers) is not installed.

Measured on the 2-core CI-like machine: writing the full-size checkpoints in fp16 (the UNet
file is 1.7 GB instead of 3.4 GB in fp32; 1.9 GB written in all) and loading them strictly
(memory-mapped, shapes checked before assignment, load < 1 s) takes ~20 s; the whole file ~50 s.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import cv2

from pipeline.audio.windows import AudioFrame, FrameWindower
from pipeline.avatar.model import Avatar
from pipeline.engines.base import FrameRequest
from pipeline.engines.model_files import MUSETALK_V15_FILES
from pipeline.engines.musetalk import features as F
from pipeline.engines.musetalk.loader import file_sha256, load_models, load_vae
from pipeline.engines.musetalk.synthetic import write_synthetic_checkpoints
from pipeline.errors import EngineUnavailable

SR = 16000


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_checkpoints(tmp_path_factory.mktemp("musetalk-tiny"), tiny=True, seed=1)


@pytest.fixture(scope="module")
def engine(tiny_dir: Path):
    from pipeline.engines.musetalk.engine import MuseTalkEngine

    eng = MuseTalkEngine(models_dir=tiny_dir, device="cpu", dtype="fp32", batch_size=4)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def whisper(engine) -> F.WhisperBatcher:
    """The literal official input (windows padded to 30 s): what offline_features is tested
    against. The engine's own batcher trims windows (tests/test_musetalk_features_batch.py)."""
    assert engine.whisper.trim
    return F.WhisperBatcher(engine.models.whisper, engine.models.feature_extractor, max_batch=engine.whisper.max_batch)


def make_avatar(root: Path, avatar_id: str, shift: int, n: int = 3) -> Avatar:
    """A small synthetic avatar: the astronaut photograph, shifted a little per frame."""
    from skimage import data

    img = np.ascontiguousarray(data.astronaut()[:, :, ::-1])
    frames = np.stack([np.roll(img, shift + 3 * i, axis=1) for i in range(n)])
    boxes = np.array([[170 + shift + 3 * i, 50, 290 + shift + 3 * i, 210] for i in range(n)], dtype=np.int32)
    return Avatar(
        id=avatar_id,
        root=root / avatar_id,
        frames=frames,
        face_boxes=boxes,
        crop_boxes=boxes.copy(),
        landmarks=np.zeros((n, 68, 2), np.float32),
        masks=np.full((n, 256, 256), 255, np.uint8),
        detected=np.ones(n, np.uint8),
        meta={"created": "2026-01-01T00:00:00Z"},
    )


def speechy(seconds: float, seed: int = 0) -> np.ndarray:
    """Syllable-like bursts of harmonic sound (no espeak needed): varied, loud enough for log-mel."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    voice = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / SR) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * 3.1 * t + rng.uniform(0, 6)), 0, None) ** 2
    return (0.3 * voice * envelope + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def audio_frames(audio: np.ndarray, speech: bool = True) -> list[AudioFrame]:
    w = FrameWindower()
    return [AudioFrame(f.index, f.window, speech) for f in w.push(audio) + w.finish()]


# --- loader ---------------------------------------------------------------------------------------------


def test_full_size_synthetic_checkpoints_load_strictly(tmp_path: Path) -> None:
    # fp16 files: the loader must accept them; full official shapes.
    root = write_synthetic_checkpoints(tmp_path, tiny=False, dtype="fp16")
    for f in MUSETALK_V15_FILES:
        assert f.find(root) is not None or not f.required, f.path
    models = load_models(root, device="cpu", dtype="fp16")
    assert models.version == "v15"
    n_unet = sum(p.numel() for p in models.unet.parameters())
    assert 8.0e8 < n_unet < 9.0e8  # "about 850 M parameters"
    assert tuple(models.unet.conv_in.weight.shape) == (320, 8, 3, 3)
    assert tuple(models.unet.conv_out.weight.shape) == (4, 320, 3, 3)
    assert models.unet.config.cross_attention_dim == 384
    assert tuple(models.vae.decoder.conv_out.weight.shape) == (3, 128, 3, 3)
    assert models.whisper.config.d_model == 384 and len(models.whisper.layers) == 4
    assert models.feature_extractor.feature_size == 80
    assert len(models.vae_sha256) == 64
    del models


def _broken_copy(tiny_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "models"
    shutil.copytree(tiny_dir, dst)
    return dst


def _edit(path: Path, edit) -> None:
    sd = torch.load(path, weights_only=True)
    edit(sd)
    torch.save(sd, path)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (
            "wrong_shape",
            "musetalkV15/unet.pth: conv_in.weight has shape [32, 4, 3, 3], expected [32, 8, 3, 3]",
        ),
        ("missing_key", "musetalkV15/unet.pth: missing key conv_in.bias, expected shape [32]"),
        ("unexpected_key", "musetalkV15/unet.pth: unexpected key extra.weight with shape [3]"),
        ("missing_unet", "musetalkV15/unet.pth: file not found"),
        ("missing_vae", "sd-vae/diffusion_pytorch_model.bin: file not found"),
        ("missing_preprocessor", "whisper/preprocessor_config.json: file not found"),
        (
            "whisper_shape",
            "whisper/pytorch_model.bin: model.encoder.conv1.weight has shape [384, 64, 3], expected [384, 80, 3]",
        ),
        (
            "vae_missing",
            "sd-vae/diffusion_pytorch_model.bin: missing key decoder.conv_out.bias, expected shape [3]",
        ),
        ("corrupt", "musetalkV15/unet.pth: cannot be read as a weights file"),
        ("bad_config", "musetalkV15/musetalk.json: not valid JSON"),
    ],
)
def test_loader_errors_name_file_key_and_shapes(
    tiny_dir: Path, tmp_path: Path, case: str, expected: str
) -> None:
    root = _broken_copy(tiny_dir, tmp_path)
    unet = root / "musetalkV15/unet.pth"
    if case == "wrong_shape":
        _edit(unet, lambda sd: sd.__setitem__("conv_in.weight", torch.zeros(32, 4, 3, 3)))
    elif case == "missing_key":
        _edit(unet, lambda sd: sd.pop("conv_in.bias"))
    elif case == "unexpected_key":
        _edit(unet, lambda sd: sd.__setitem__("extra.weight", torch.zeros(3)))
    elif case == "missing_unet":
        unet.unlink()
    elif case == "missing_vae":
        (root / "sd-vae/diffusion_pytorch_model.bin").unlink()
    elif case == "missing_preprocessor":
        (root / "whisper/preprocessor_config.json").unlink()
    elif case == "whisper_shape":
        _edit(
            root / "whisper/pytorch_model.bin",
            lambda sd: sd.__setitem__("model.encoder.conv1.weight", torch.zeros(384, 64, 3)),
        )
    elif case == "vae_missing":
        _edit(root / "sd-vae/diffusion_pytorch_model.bin", lambda sd: sd.pop("decoder.conv_out.bias"))
    elif case == "corrupt":
        unet.write_bytes(b"not a checkpoint")
    elif case == "bad_config":
        (root / "musetalkV15/musetalk.json").write_text("{")
    with pytest.raises(EngineUnavailable) as info:
        load_models(root)
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_loader_accepts_whisper_decoder_keys_safetensors_vae_and_v1_layout(tmp_path: Path) -> None:
    root = write_synthetic_checkpoints(tmp_path, tiny=True, version="v1", vae_format="safetensors")
    _edit(
        root / "whisper/pytorch_model.bin",
        lambda sd: sd.__setitem__("model.decoder.embed_tokens.weight", torch.zeros(5, 384)),
    )
    models = load_models(root)
    assert models.version == "v1"
    assert models.vae_sha256 == file_sha256(root / "sd-vae/diffusion_pytorch_model.safetensors")


def test_registry_and_engine_options(tiny_dir: Path, tmp_path: Path) -> None:
    from pipeline.engines.registry import available_engines, create_engine
    from pipeline.errors import ConfigError

    assert "musetalk" in available_engines()
    with pytest.raises(EngineUnavailable, match="does not exist"):
        create_engine("musetalk", models_dir=tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="dtype"):
        create_engine("musetalk", models_dir=tiny_dir, dtype="int8")
    with pytest.raises(ConfigError, match="batch_size"):
        create_engine("musetalk", models_dir=tiny_dir, batch_size=0)
    with pytest.raises(ConfigError, match="context_seconds"):
        create_engine("musetalk", models_dir=tiny_dir, context_seconds=0.01)
    with pytest.raises(ConfigError, match="whisper_windows"):
        create_engine("musetalk", models_dir=tiny_dir, whisper_windows="cropped")
    for bad, why in (
        ({"whisper_crop_seconds": 0}, "positive number"),
        ({"whisper_crop_seconds": "5"}, "positive number"),
        ({"whisper_crop_seconds": 5, "whisper_windows": "padded"}, "trimmed"),
        ({"whisper_crop_seconds": 5, "context_seconds": 2.0}, "context_seconds unset"),
        ({"whisper_crop_seconds": 1.0}, r"from 1\.16 \(frames_per_run 25\)"),
        ({"whisper_crop_seconds": 30}, "to 29.92 s"),
    ):
        with pytest.raises(ConfigError, match=why):
            create_engine("musetalk", models_dir=tiny_dir, **bad)
    cropped = create_engine("musetalk", models_dir=tiny_dir, whisper_crop_seconds=5, frames_per_run=5)
    try:
        assert cropped.whisper.crop == 250 and cropped.whisper.lengths == [254]
    finally:
        cropped.close()


# --- the reference frame, straight from the spec ------------------------------------------------


def test_generate_matches_spec_reference(engine, tmp_path: Path) -> None:
    from pipeline.engines.musetalk.vae_cache import LATENT_SEED

    avatar = make_avatar(tmp_path, "ref", shift=0)
    i = 1
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randn(50, 384, generator=gen)

    # positional encoding, written out: even channels sin, odd channels cos
    pe = torch.zeros(50, 384)
    for pos in range(50):
        for c in range(0, 384, 2):
            angle = pos * math.exp(-math.log(10000.0) * c / 384)
            pe[pos, c] = math.sin(angle)
            pe[pos, c + 1] = math.cos(angle)

    # face crop, masked and reference copies
    x1, y1, x2, y2 = avatar.face_boxes[i]
    crop = cv2.resize(avatar.frames[i][y1:y2, x1:x2], (256, 256), interpolation=cv2.INTER_LANCZOS4)
    rgb = crop[:, :, ::-1].astype(np.float64) / 255.0
    masked = rgb.copy()
    masked[128:256] = 0.0

    def to_input(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(((a - 0.5) / 0.5).transpose(2, 0, 1)[None], dtype=torch.float32)

    unet, vae = engine.models.unet, engine.models.vae
    with torch.inference_mode():
        d_masked = vae.encode(to_input(masked)).latent_dist
        d_ref = vae.encode(to_input(rgb)).latent_dist
        noise = torch.Generator().manual_seed(LATENT_SEED + i)  # the engine's documented draws
        n_masked, n_ref = torch.randn(4, 32, 32, generator=noise), torch.randn(4, 32, 32, generator=noise)
        latent = torch.cat(
            [0.18215 * (d_masked.mean + d_masked.std * n_masked), 0.18215 * (d_ref.mean + d_ref.std * n_ref)],
            dim=1,
        )
        pred = unet(latent, 0, encoder_hidden_states=(tokens + pe)[None]).sample
        reference = (vae.decode(pred / 0.18215).sample / 2 + 0.5).clamp(0, 1)

    got = engine.generate_float([FrameRequest(avatar, i, tokens)])
    assert got.shape == (1, 3, 256, 256)
    scale = float(reference.abs().max())
    assert torch.allclose(got, reference, atol=1e-4 * max(scale, 1.0)), float((got - reference).abs().max())

    u8 = engine.generate([FrameRequest(avatar, i, tokens)])[0]
    ref_u8 = (reference[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()[:, :, ::-1]
    assert u8.shape == (256, 256, 3) and u8.dtype == np.uint8
    assert np.abs(u8.astype(int) - ref_u8.astype(int)).max() <= 1


def test_generate_batches_two_avatars(engine, tmp_path: Path, whisper) -> None:
    a, b = make_avatar(tmp_path, "alice", shift=0), make_avatar(tmp_path, "bob", shift=40, n=2)
    feats = [f.data for f in engine.new_featurizer().features(audio_frames(speechy(0.4)))]
    requests = [
        FrameRequest(a, 0, feats[0]),
        FrameRequest(b, 1, feats[1]),
        FrameRequest(a, 2, feats[2]),
        FrameRequest(b, 0, feats[3]),
        FrameRequest(a, 1, feats[4]),
    ]  # batch_size 4: two passes
    out = engine.generate(requests)
    assert len(out) == 5
    assert all(o.shape == (256, 256, 3) and o.dtype == np.uint8 and o.flags.c_contiguous for o in out)
    alone = engine.generate([requests[1]])[0]  # batch composition does not change a frame
    assert np.abs(alone.astype(int) - out[1].astype(int)).max() <= 1
    assert engine.generate([]) == []


# --- audio features -------------------------------------------------------------------------------------


def test_whisper_chunks_window_each_frame_reads_frames_2i_minus_4_to_2i_plus_6() -> None:
    n_samples = int(1.37 * SR)  # 68 Whisper frames, 34 video frames
    actual = n_samples * 50 // SR
    hidden = torch.zeros(1500, 5, 384)
    for t in range(1500):
        for layer in range(5):
            hidden[t, layer] = 1000 * (t + 1) + layer  # value says (time, layer); 0 = padding
    out = F.whisper_chunks(hidden, n_samples)
    assert out.shape == (n_samples * 25 // SR, 50, 384)
    for i in range(out.shape[0]):
        for token in range(50):
            t, layer = 2 * i - 4 + token // 5, token % 5
            want = 1000 * (t + 1) + layer if 0 <= t < actual else 0
            assert float(out[i, token, 0]) == want, (i, token)


def test_positional_encoding_formula() -> None:
    pe = F.positional_encoding()
    assert pe.shape == (50, 384)
    assert float(pe[0, 0]) == 0.0 and float(pe[0, 1]) == 1.0
    assert math.isclose(float(pe[7, 10]), math.sin(7 * math.exp(-math.log(10000.0) * 10 / 384)), rel_tol=1e-5)
    assert math.isclose(float(pe[7, 11]), math.cos(7 * math.exp(-math.log(10000.0) * 10 / 384)), rel_tol=1e-5)


def test_torch_log_mel_equals_feature_extractor(whisper) -> None:
    clips = [speechy(3.3, seed=1), speechy(30.0, seed=2)[: 30 * SR], 0.001 * speechy(1.0, seed=3)]
    ours = whisper.log_mel(torch.stack([torch.from_numpy(np.pad(c, (0, 30 * SR - len(c)))) for c in clips]))
    for row, clip in enumerate(clips):
        theirs = whisper.feature_extractor(clip, sampling_rate=SR, return_tensors="np").input_features[0]
        assert ours.shape[1:] == theirs.shape == (80, 3000)
        np.testing.assert_allclose(ours[row].cpu().numpy(), theirs, atol=1e-3)


def test_encoder_hidden_states_are_layer_inputs_and_final_norm(whisper) -> None:
    mel = whisper.log_mel(torch.from_numpy(speechy(2.0)))
    stacked = whisper.encode(mel)
    assert stacked.shape == (1, 1500, 5, 384)
    enc = whisper.encoder
    with torch.inference_mode():
        h = torch.nn.functional.gelu(enc.conv2(torch.nn.functional.gelu(enc.conv1(mel))))
        h = h.permute(0, 2, 1) + enc.embed_positions.weight
        manual = [h]
        for layer in enc.layers:
            h = layer(h, None)
            h = h[0] if isinstance(h, tuple) else h
            manual.append(h)
        manual[-1] = enc.layer_norm(manual[-1])
    for k in range(5):
        torch.testing.assert_close(stacked[0, :, k], manual[k][0], atol=1e-4, rtol=1e-4)


def test_offline_features_shape_and_padding(whisper) -> None:
    audio = speechy(2.3)
    feats = F.offline_features(audio, whisper)
    assert feats.shape == (57, 50, 384) and feats.dtype == np.float32
    assert not feats[0, :20].any() and feats[0, 20:].any()  # frame 0: 4 zero Whisper frames first
    assert not feats[1, :10].any() and feats[1, 10:].any()
    assert F.offline_features(np.zeros(100, np.float32), whisper).shape == (0, 50, 384)


def _stream(featurizer, frames, group: int) -> np.ndarray:
    out = []
    for lo in range(0, len(frames), group):
        out += [f.data.float().numpy() for f in featurizer.features(frames[lo : lo + group])]
    return np.stack(out)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_streaming_equals_offline_when_the_window_holds_the_whole_clip(whisper) -> None:
    audio = speechy(2.5, seed=4)
    offline = F.offline_features(audio, whisper)
    frames = audio_frames(audio)
    usable = (len(audio) // 320 - 6) // 2 + 1  # frames whose window ends inside the trimmed file
    for context in (None, 8.0):  # the 30 s grid and a sliding window longer than the clip
        feat = F.MuseTalkFeaturizer(whisper, context_seconds=context, frames_per_run=100)
        before = whisper.encoder_windows
        streamed = _stream(feat, frames, group=len(frames))
        assert whisper.encoder_windows - before == 1  # one 30 s window served all 62 frames
        np.testing.assert_allclose(streamed[:usable], offline[:usable], atol=2e-4, rtol=1e-4)


def test_streaming_frame_by_frame_is_close_to_offline(whisper) -> None:
    audio = speechy(3.0, seed=5)
    offline = F.offline_features(audio, whisper)
    frames = audio_frames(audio)
    n = len(frames) - 3  # the last frames of offline read zero padding past the file's end
    grid = F.MuseTalkFeaturizer(whisper, frames_per_run=5)
    before = whisper.encoder_windows
    by_five = _stream(grid, frames, group=5)
    assert whisper.encoder_windows - before == math.ceil(len(frames) / 5)
    # Several streams (and several groups of one stream) in one batched encoder call give the
    # same tokens as separate calls.
    a, b = F.MuseTalkFeaturizer(whisper, frames_per_run=5), F.MuseTalkFeaturizer(whisper, frames_per_run=5)
    jobs = [(f, frames[lo : lo + 5]) for lo in range(0, 25, 5) for f in (a, b)]
    batched = whisper.features(jobs)
    for j, (f, group) in enumerate(jobs):
        lo = group[0].index
        got = np.stack([x.data.float().numpy() for x in batched[j]])
        np.testing.assert_allclose(got, by_five[lo : lo + len(group)], atol=1e-4, rtol=1e-4)
    cos = _cos(by_five[:n], offline[:n])
    # Random synthetic Whisper weights; real tiny.en figures are in docs/benchmarks.md.
    assert cos.min() > 0.8, cos.min()


def test_segment_grid_matches_offline_across_the_30s_edge(whisper) -> None:
    audio = speechy(31.0, seed=6)
    offline = F.offline_features(audio, whisper)
    frames = audio_frames(audio)
    edge = [f for f in frames if 740 <= f.index < 760]  # Whisper frame 1500 = 30 s = video frame 750
    feat = F.MuseTalkFeaturizer(whisper, frames_per_run=25)
    silent = [AudioFrame(f.index, f.window, False) for f in frames if f.index < 740]
    assert all(not x.active for x in feat.features(silent))  # silence: no encoder work
    before = whisper.encoder_windows
    got = np.stack([x.data.float().numpy() for x in feat.features(edge)])
    assert whisper.encoder_windows - before == 2  # the group straddles two official segments
    # the first segment is complete in the stream (all of it is past), so frames whose tokens
    # lie in it match offline exactly; later ones lack only the future beyond the lookahead
    np.testing.assert_allclose(got[:5], offline[740:745], atol=2e-4, rtol=1e-4)
    assert _cos(got, offline[740:760]).min() > 0.8


def test_featurizer_hangover_order_and_reset(whisper) -> None:
    audio = speechy(1.2)
    frames = audio_frames(audio)
    flags = [5 <= f.index < 10 for f in frames]
    frames = [AudioFrame(f.index, f.window, s) for f, s in zip(frames, flags, strict=True)]
    feat = F.MuseTalkFeaturizer(whisper, hangover_seconds=0.2)
    out = feat.features(frames)
    assert [x.active for x in out] == [5 <= i < 15 for i in range(len(frames))]  # 5-frame hangover
    assert all((x.data is None) != x.active for x in out)
    assert all(tuple(x.data.shape) == (50, 384) for x in out if x.active)
    with pytest.raises(ValueError, match="in order"):
        feat.features(frames[:1])
    feat.reset()
    again = feat.features(frames)  # after reset the stream restarts at its next frame
    for x, y in zip(out, again, strict=True):
        assert x.active == y.active
        if x.active:
            torch.testing.assert_close(x.data, y.data)


# --- latents cache ---------------------------------------------------------------------------------------


def test_latents_cache_written_reloaded_and_keyed_by_vae_hash(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from pipeline.engines.musetalk.vae_cache import cache_path, load_or_compute_latents

    root = _broken_copy(tiny_dir, tmp_path)
    avatar = make_avatar(tmp_path, "cached", shift=10, n=2)
    vae, sha = load_vae(root, torch.device("cpu"), torch.float32)
    first, fresh = load_or_compute_latents(avatar, vae, sha)
    assert fresh and first.shape == (2, 8, 32, 32)
    path = cache_path(avatar)
    assert path == avatar.root / "musetalk" / "latents.safetensors" and path.is_file()
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["vae_sha256"] == sha and f.metadata()["format"] == "1"
    assert not list(path.parent.glob(".latents-*"))  # the temp file was renamed away

    again, fresh = load_or_compute_latents(avatar, vae, sha)
    assert not fresh and torch.equal(again, first)

    # another VAE file (another hash) -> recomputed
    write_synthetic_checkpoints(tmp_path / "other", tiny=True, seed=99)
    shutil.copy(
        tmp_path / "other/sd-vae/diffusion_pytorch_model.bin", root / "sd-vae/diffusion_pytorch_model.bin"
    )
    vae2, sha2 = load_vae(root, torch.device("cpu"), torch.float32)
    assert sha2 != sha
    third, fresh = load_or_compute_latents(avatar, vae2, sha2)
    assert fresh and not torch.allclose(third, first)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["vae_sha256"] == sha2

    # deterministic: the same VAE gives the same latents from scratch
    path.unlink()
    fourth, fresh = load_or_compute_latents(avatar, vae2, sha2)
    assert fresh and torch.equal(fourth, third)


# --- GPU ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_tiny_engine_on_cuda_fp16_matches_cpu(tiny_dir: Path, engine, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from pipeline.engines.musetalk.engine import MuseTalkEngine

    gpu = MuseTalkEngine(models_dir=tiny_dir, device="cuda:0", dtype="fp16")
    avatar = make_avatar(tmp_path, "gpu", shift=0, n=2)
    frames = audio_frames(speechy(0.5))
    cpu_feats = engine.new_featurizer().features(frames)
    gpu_feats = gpu.new_featurizer().features(frames)
    assert gpu_feats[0].data.device.type == "cuda" and gpu_feats[0].data.dtype == torch.float16
    assert (
        _cos(
            np.stack([f.data.float().cpu().numpy() for f in gpu_feats]),
            np.stack([f.data.numpy() for f in cpu_feats]),
        ).min()
        > 0.99
    )
    reqs = [FrameRequest(avatar, i % 2, cpu_feats[i].data) for i in range(4)]
    a = engine.generate_float(reqs)
    b = gpu.generate_float(reqs).cpu()
    assert (a - b).abs().mean() < 0.02
    gpu.close()


@pytest.mark.gpu
def test_composed_batches_are_timed_on_the_gpus_clock(tiny_dir: Path, engine, tmp_path: Path) -> None:
    """The worker's gpu_batch and gpu_idle stages: a batch's time on the engine's stream, and how
    long the stream sat idle since the previous batch. Eager (no compile, no graphs), so that
    it runs in seconds: the events do not depend on how the batch was launched."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from pipeline.engines.musetalk.engine import MuseTalkEngine

    gpu = MuseTalkEngine(models_dir=tiny_dir, device="cuda:0", dtype="fp16", compile="none", cuda_graphs=False)
    avatar = make_avatar(tmp_path, "timed", shift=0, n=2)
    feats = engine.new_featurizer().features(audio_frames(speechy(0.5)))
    reqs = [FrameRequest(avatar, i % 2, feats[i].data) for i in range(4)]
    gpu.load_avatar(avatar)
    gpu.compose_staged(reqs)()
    assert gpu.last_batch_gpu is not None and gpu.last_batch_gpu > 0 and gpu.last_batch_idle is None
    time.sleep(0.05)
    gpu.compose_staged(reqs)()
    assert gpu.last_batch_idle is not None and gpu.last_batch_idle >= 0.04
    gpu.close()


# --- CTranslate2 Whisper conversion (bench tooling) --------------------------------------------------


def _write_ct2(path: Path, variables: dict[str, np.ndarray], aliases: list[tuple[str, str]]) -> None:
    """A CTranslate2 model.bin (binary version 6), written the way ctranslate2.specs does."""
    import struct

    ids = {
        np.dtype("float32"): 0,
        np.dtype("int8"): 1,
        np.dtype("int16"): 2,
        np.dtype("int32"): 3,
        np.dtype("float16"): 4,
    }

    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<H", len(raw) + 1) + raw + b"\0"

    out = (
        struct.pack("<I", 6)
        + string("WhisperSpec")
        + struct.pack("<I", 3)
        + struct.pack("<I", len(variables))
    )
    for name, v in variables.items():
        out += string(name) + struct.pack("<B", v.ndim) + b"".join(struct.pack("<I", d) for d in v.shape)
        out += struct.pack("<B", ids[v.dtype]) + struct.pack("<I", v.nbytes) + v.tobytes()
    out += struct.pack("<I", len(aliases)) + b"".join(string(a) + string(t) for a, t in aliases)
    path.write_bytes(out)


def test_ct2_whisper_encoder_round_trip(tmp_path: Path) -> None:
    from pipeline.engines.musetalk.ct2_whisper import convert_ct2_whisper
    from pipeline.engines.musetalk.loader import build_whisper_encoder, load_whisper
    from pipeline.engines.musetalk.synthetic import WHISPER_CONFIG, random_state_dict

    cfg = {
        **WHISPER_CONFIG,
        "d_model": 16,
        "encoder_layers": 2,
        "num_hidden_layers": 2,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 32,
    }
    hf = {
        k: v.numpy()
        for k, v in random_state_dict(
            build_whisper_encoder(cfg), torch.Generator().manual_seed(3), torch.float16
        ).items()
    }
    hf = {k: v + np.float16(0.01) if v.ndim == 1 else v for k, v in hf.items()}  # no all-zero biases
    var: dict[str, np.ndarray] = {
        "decoder/embeddings/weight": np.zeros((10, 16), np.float16),
        "encoder/conv1/weight": hf["conv1.weight"],
        "encoder/conv1/bias": hf["conv1.bias"],
        "encoder/conv2/weight": hf["conv2.weight"],
        "encoder/conv2/bias": hf["conv2.bias"],
        "encoder/position_encodings/encodings": hf["embed_positions.weight"],
        "encoder/layer_norm/gamma": hf["layer_norm.weight"],
        "encoder/layer_norm/beta": hf["layer_norm.bias"],
        "encoder/num_heads": np.array(2, np.int16),
    }
    for i in range(2):
        a, L = f"layers.{i}.self_attn", f"encoder/layer_{i}"
        var[f"{L}/self_attention/linear_0/weight"] = np.concatenate(
            [hf[f"{a}.q_proj.weight"], hf[f"{a}.k_proj.weight"], hf[f"{a}.v_proj.weight"]]
        )
        var[f"{L}/self_attention/linear_0/bias"] = np.concatenate(
            [hf[f"{a}.q_proj.bias"], np.zeros(16, np.float16), hf[f"{a}.v_proj.bias"]]
        )
        var[f"{L}/self_attention/linear_1/weight"] = hf[f"{a}.out_proj.weight"]
        var[f"{L}/self_attention/linear_1/bias"] = hf[f"{a}.out_proj.bias"]
        var[f"{L}/self_attention/layer_norm/gamma"] = hf[f"layers.{i}.self_attn_layer_norm.weight"]
        var[f"{L}/self_attention/layer_norm/beta"] = hf[f"layers.{i}.self_attn_layer_norm.bias"]
        for ct2, name in (("linear_0", "fc1"), ("linear_1", "fc2")):
            var[f"{L}/ffn/{ct2}/weight"] = hf[f"layers.{i}.{name}.weight"]
            var[f"{L}/ffn/{ct2}/bias"] = hf[f"layers.{i}.{name}.bias"]
        var[f"{L}/ffn/layer_norm/gamma"] = hf[f"layers.{i}.final_layer_norm.weight"]
        var[f"{L}/ffn/layer_norm/beta"] = hf[f"layers.{i}.final_layer_norm.bias"]
    # one int8-quantised weight, as `ct2-transformers-converter --quantization int8` writes them
    w = hf["layers.1.fc2.weight"].astype(np.float32)
    scale = (127.0 / np.abs(w).max(axis=1)).astype(np.float32)
    var["encoder/layer_1/ffn/linear_1/weight"] = np.round(w * scale[:, None]).astype(np.int8)
    var["encoder/layer_1/ffn/linear_1/weight_scale"] = scale
    (tmp_path / "ct2").mkdir()
    _write_ct2(tmp_path / "ct2/model.bin", var, [("decoder/projection/weight", "decoder/embeddings/weight")])

    convert_ct2_whisper(tmp_path / "ct2", tmp_path / "models/whisper")
    encoder, _ = load_whisper(tmp_path / "models", torch.device("cpu"), torch.float32)
    got = {k: v.numpy() for k, v in encoder.state_dict().items()}
    assert set(got) == set(hf)
    for key, want in hf.items():
        tol = 0.01 * np.abs(want).max() if key == "layers.1.fc2.weight" else 0  # int8 rounding
        np.testing.assert_allclose(got[key], want.astype(np.float32), atol=tol, err_msg=key)


# --- blending on the engine's device -----------------------------------------------------------------


def blend_avatar(root: Path) -> Avatar:
    """Frames with every resize case of the compositor: shrinking (INTER_AREA), enlarging
    (INTER_LINEAR), mixed (AREA enlarging one way), a box past the image edge, and soft masks."""
    from skimage import data

    img = np.ascontiguousarray(data.astronaut()[:, :, ::-1])
    boxes = np.array(
        [[170, 50, 290, 210], [100, 60, 400, 340], [150, 40, 350, 330], [400, 300, 560, 470], [180, 60, 308, 188]],
        dtype=np.int32,
    )
    n = len(boxes)
    frames = np.stack([np.roll(img, 5 * i, axis=0) for i in range(n)])
    yy, xx = np.mgrid[0:256, 0:256]
    masks = []
    for i in range(n):
        soft = np.clip((yy - 100 - 10 * i) * 3, 0, 255) * (np.abs(xx - 128) < 100 - 5 * i)
        masks.append(cv2.GaussianBlur(soft.astype(np.uint8), (21, 21), 0))
    return Avatar(
        id="blend",
        root=root / "blend",
        frames=frames,
        face_boxes=boxes,
        crop_boxes=boxes.copy(),
        landmarks=np.zeros((n, 68, 2), np.float32),
        masks=np.stack(masks),
        detected=np.ones(n, np.uint8),
        meta={"created": "2026-01-02T00:00:00Z"},
    )


def test_resize_matrices_equal_opencv() -> None:
    from pipeline.engines.musetalk.blend import resize_matrix

    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, (256, 256), dtype=np.uint8)
    for dst in (120, 128, 160, 200, 255, 256, 280, 300, 333):
        for mode, interp in (("area", cv2.INTER_AREA), ("linear", cv2.INTER_LINEAR)):
            if mode == "area" and dst > 256:
                continue
            m = resize_matrix(256, dst, mode)
            ours = np.clip(np.floor(m @ src.astype(np.float64) @ m.T + 0.5), 0, 255)
            ref = cv2.resize(src, (dst, dst), interpolation=interp).astype(np.float64)
            assert np.abs(ours - ref).max() <= 1, (dst, mode)
            # OpenCV sums area weights in float32 and rounds bilinear weights to 11-bit fixed point
            assert np.mean(ours != ref) < (0.05 if mode == "area" else 0.2), (dst, mode)
    # enlarging one way with INTER_AREA: OpenCV's area-style bilinear on both axes
    rows, cols = resize_matrix(256, 300, "area_up"), resize_matrix(256, 200, "area_up")
    ours = np.clip(np.floor(rows @ src.astype(np.float64) @ cols.T + 0.5), 0, 255)
    ref = cv2.resize(src, (200, 300), interpolation=cv2.INTER_AREA).astype(np.float64)
    assert np.abs(ours - ref).max() <= 1


def test_gpu_blend_path_equals_cpu_compositor(tiny_dir: Path, tmp_path: Path) -> None:
    """The engine's device blend (run here on the CPU device) against generate + CPU Compositor."""
    from pipeline.compositor import Compositor
    from pipeline.engines.base import Engine
    from pipeline.engines.musetalk.engine import MuseTalkEngine

    eng = MuseTalkEngine(models_dir=tiny_dir, device="cpu", dtype="fp32", batch_size=3)
    try:
        avatar = blend_avatar(tmp_path)
        other = make_avatar(tmp_path, "other", shift=10)
        eng.load_avatar(avatar)
        eng.load_avatar(other)
        gen = torch.Generator().manual_seed(11)
        requests = [FrameRequest(avatar, i, torch.randn(50, 384, generator=gen)) for i in range(avatar.frame_count)]
        requests.insert(2, FrameRequest(other, 1, torch.randn(50, 384, generator=gen)))  # mixed avatars
        got = eng.compose(requests)
        crops = eng.generate(requests)
        compositors = {a.id: Compositor(a) for a in (avatar, other)}
        want = [compositors[r.avatar.id].compose(r.frame_index, c) for r, c in zip(requests, crops, strict=True)]
        default = Engine.compose(eng, requests)  # the base class path: generate + CPU compositor
        for g, w, d in zip(got, want, default, strict=True):
            assert g.shape == w.shape and g.dtype == np.uint8
            diff = np.abs(g.astype(int) - w.astype(int))
            assert diff.max() <= 2, diff.max()  # OpenCV's fixed-point bilinear vs our float32 weights
            assert np.mean(diff > 0) < 0.03 and diff.mean() < 0.05, (np.mean(diff > 0), diff.mean())
            assert np.array_equal(d, w)
        # outside the blended region the frame is the avatar frame, bit for bit
        k = 0 if requests[0].avatar is avatar else 1
        x1, y1, x2, y2 = avatar.face_boxes[0]
        untouched = np.ones(avatar.frames[0].shape[:2], bool)
        untouched[y1:y2, x1:x2] = False
        assert np.array_equal(got[k][untouched], avatar.frames[0][untouched])
        # stage two can write the frames into given arrays (a device process's shared memory)
        into = [np.zeros_like(frame) for frame in got[:2]] + [None] * (len(got) - 2)
        placed = eng.compose_staged(requests)(into)
        assert placed[0] is into[0] and placed[1] is into[1]
        for g, p in zip(got, placed, strict=True):
            assert np.array_equal(g, p)
        with pytest.raises(ValueError, match="destinations"):
            eng.compose_staged(requests)(into[:1])
        memory = eng.memory_bytes(avatar)
        assert memory["latents"] > 0 and memory["blend"] > 0
        assert not eng.overlapped_staging  # on a CPU the default waits in stage one
    finally:
        eng.close()
    # overlapped: stage one only queues (on a CPU it is done anyway); stage two waits, then
    # pastes the same frames; through a worker too
    from pipeline.live.worker import EngineWorker

    over = MuseTalkEngine(models_dir=tiny_dir, device="cpu", dtype="fp32", batch_size=3, overlap_batches=True)
    worker = EngineWorker(over, batch_size=3, name="overlap")
    try:
        over.load_avatar(avatar)
        over.load_avatar(other)
        staged = over.compose_staged(requests)
        staged.wait()
        for g, o in zip(got, staged(), strict=True):
            assert np.array_equal(g, o)
        assert worker.overlapped
        futures = [worker.submit(r, time.monotonic() + 1000, f"s{k}") for k, r in enumerate(requests)]
        for g, f in zip(got, futures, strict=True):
            assert np.array_equal(g, f.result(timeout=120))
    finally:
        worker.close()
        over.close()
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="overlap_batches needs gpu_blend"):
        MuseTalkEngine(models_dir=tiny_dir, device="cpu", dtype="fp32", overlap_batches=True, gpu_blend=False)


# --- features off the event loop: the FeatureWorker -----------------------------------------------------


def test_feature_worker_batches_sessions_merges_backlog_and_keeps_order(engine) -> None:
    """Two streams through the worker (real tiny Whisper) give the same tokens as the same frames
    through the featurizers inline; a backlog of one stream shares encoder windows; futures
    resolve in submission order; reset runs in order and cancel drops queued jobs."""
    from pipeline.live.feature_worker import FeatureWorker

    frames_a = audio_frames(speechy(0.6, seed=1))
    frames_b = audio_frames(speechy(0.6, seed=2))
    inline_a, inline_b = engine.new_featurizer(), engine.new_featurizer()
    want_a = inline_a.features(frames_a[:6])
    want_b = inline_b.features(frames_b[:6])
    assert inline_a.blocking and inline_a.batcher is engine.whisper

    worker = FeatureWorker("cpu")
    try:
        fa, fb = engine.new_featurizer(), engine.new_featurizer()
        with worker._cv:  # hold the thread back so that everything is queued for one pass
            jobs = []
            for i in range(6):
                jobs.append(("a", i, worker.submit(fa, [frames_a[i]], "a")))
                jobs.append(("b", i, worker.submit(fb, [frames_b[i]], "b")))
        order: list[tuple[str, int]] = []
        for name, i, future in jobs:
            future.add_done_callback(lambda _, name=name, i=i: order.append((name, i)))
        before = engine.whisper.encoder_windows
        results = {(name, i): future.result(timeout=120)[0] for name, i, future in jobs}
        # one pass: each stream's 6 frames merged into one run of one 30 s window, both batched
        assert engine.whisper.encoder_windows - before == 2
        assert worker.passes == 1
        for i in range(6):
            for name, want in (("a", want_a), ("b", want_b)):
                got = results[(name, i)]
                assert got.active == want[i].active
                if got.active:
                    # merged frames see more lookahead than frame-by-frame ones: close, not equal
                    assert torch.allclose(got.data, want[i].data, atol=0.5)
        assert sorted(order) == sorted((n, i) for n, i, _ in jobs)

        # reset in order, cancel of queued jobs
        with worker._cv:
            late = worker.submit(fa, [frames_a[6]], "a")
            worker.reset(fa, "a")  # cancels the queued job above, then resets
            fresh = worker.submit(fa, [frames_a[0]], "a")  # frame 0 again: legal only after a reset
        assert late.cancelled()
        assert fresh.result(timeout=120)[0].active
    finally:
        worker.close()


def test_feature_worker_without_batcher_and_errors() -> None:
    from pipeline.engines.base import Featurizer, FrameFeatures
    from pipeline.live.feature_worker import FeatureWorker

    class Counting(Featurizer):
        blocking = True

        def __init__(self) -> None:
            self.calls: list[list[int]] = []

        def features(self, frames):
            if any(f.index < 0 for f in frames):
                raise ValueError("bad frame")
            self.calls.append([f.index for f in frames])
            time.sleep(0.02)
            return [FrameFeatures(active=f.speech, data=f.index) for f in frames]

    window = np.zeros(3200, np.float32)
    passes: list[tuple[int, float, bool]] = []  # (frames, seconds, any future resolved yet)
    futures: list = []
    worker = FeatureWorker(
        "test", on_pass=lambda frames, seconds: passes.append((frames, seconds, any(f.done() for f in futures)))
    )
    try:
        feat = Counting()
        with worker._cv:
            futures += [worker.submit(feat, [AudioFrame(i, window, True)], 1) for i in range(4)]
        assert [f.result(timeout=10)[0].data for f in futures] == [0, 1, 2, 3]
        assert feat.calls == [[0, 1, 2, 3]]  # the backlog went as one call
        # one pass of four frames, timed with the featurizer's call, reported before any resolved
        assert len(passes) == 1 and passes[0][0] == 4 and passes[0][1] >= 0.02 and not passes[0][2], passes
        bad = worker.submit(feat, [AudioFrame(-1, window, True)], 1)
        with pytest.raises(ValueError, match="bad frame"):
            bad.result(timeout=10)
        assert worker.submit(feat, [AudioFrame(5, window, True)], 1).result(timeout=10)[0].data == 5
        assert not worker.submit(feat, [AudioFrame(6, window, False)], 1).result(timeout=10)[0].active
        # reported: the backlog's pass and frame 5's; not the failed pass, nor the silent one
        assert [frames for frames, _, _ in passes] == [4, 1], passes
    finally:
        worker.close()
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit(feat, [AudioFrame(7, window, True)], 1)


def test_compile_tuning_reaches_both_compiles(tiny_dir: Path, monkeypatch) -> None:
    """engine.compile_tuning becomes torch.compile's inductor options for the decode (the UNet
    tuned too took minutes more); the max-autotune mode (which tunes by itself, and excludes
    options) gets none."""
    import torch

    from pipeline.engines.musetalk.engine import MuseTalkEngine

    calls: list[dict] = []

    def fake_compile(fn, **kwargs):  # noqa: ANN001, ANN202
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    for compile_mode, tuning, want in (
        ("default", "coordinate", {"coordinate_descent_tuning": True}),
        ("default", "none", None),
        ("max-autotune", "coordinate", None),
    ):
        calls.clear()
        eng = MuseTalkEngine(models_dir=tiny_dir, device="cpu", dtype="fp32", compile=compile_mode, compile_tuning=tuning, warmup=False)
        try:
            unet, decode = calls
            assert unet.get("options") is None and decode["options"] == want, (compile_mode, tuning, calls)
        finally:
            eng.close()


def test_engine_speed_options_and_gpu_config(tiny_dir: Path) -> None:
    from pipeline.engines.musetalk.engine import CUDA_DEFAULTS, MuseTalkEngine, padded_size
    from pipeline.errors import ConfigError
    from server.config import Settings, load_settings

    with pytest.raises(ConfigError, match="cuda_graphs needs a cuda device"):
        MuseTalkEngine(models_dir=tiny_dir, device="cpu", cuda_graphs=True)
    with pytest.raises(ConfigError, match="compile must be one of"):
        MuseTalkEngine(models_dir=tiny_dir, device="cpu", compile="fast")
    with pytest.raises(ConfigError, match="attention"):
        MuseTalkEngine(models_dir=tiny_dir, device="cpu", attention="flash")
    with pytest.raises(ConfigError, match="vae_upsample"):
        MuseTalkEngine(models_dir=tiny_dir, device="cpu", vae_upsample="bilinear")
    eng = MuseTalkEngine(models_dir=tiny_dir, device="cpu", dtype="fp32")
    try:  # a CPU gets none of the GPU speed options unless asked
        assert (eng.channels_last, eng.cuda_graphs, eng.compile_mode, eng.vae_upsample) == (False, False, "none", "reference")
        assert not eng.overlapped_staging
    finally:
        eng.close()
    assert set(CUDA_DEFAULTS) == {"channels_last", "cuda_graphs", "compile", "vae_upsample", "overlap_batches"}
    with pytest.raises(ConfigError, match="compile_tuning must be one of"):
        MuseTalkEngine(models_dir=tiny_dir, device="cpu", compile="default", compile_tuning="exhaustive")
    with pytest.raises(ConfigError, match="needs compile"):
        MuseTalkEngine(models_dir=tiny_dir, device="cpu", compile_tuning="coordinate")
    assert [padded_size(n) for n in (1, 3, 17, 33, 48, 300)] == [1, 4, 20, 40, 48, 300]
    assert padded_size(1, minimum=2) == 2
    assert [padded_size(n, 2, exact_up_to=24) for n in (1, 3, 17, 24, 25, 33)] == [2, 3, 17, 24, 32, 40]

    gpu = load_settings(Path(__file__).resolve().parent.parent / "configs" / "gpu.yaml")
    assert (gpu.engine.name, gpu.engine.devices, gpu.engine.dtype) == ("musetalk", ["cuda:0"], "fp16")
    assert gpu.sessions.processing_seconds > Settings().sessions.processing_seconds  # a GPU needs more than the CPU default


def test_warmup_plans_every_whisper_batch_size(tiny_dir: Path) -> None:
    """The feature path's batch sizes are run once at start (a GPU plans each on first use)."""
    from pipeline.engines.musetalk.engine import MuseTalkEngine

    eng = MuseTalkEngine(models_dir=tiny_dir, device="cpu", dtype="fp32", batch_size=2, whisper_batch=3)
    assert eng.whisper.encoder_windows == 0  # no warm-up on a CPU by default
    eng.warmup()
    # every batch size at every trimmed window length (500, 1000 and 1500 positions)
    assert eng.whisper.lengths == [500, 1000, 1500]
    assert eng.whisper.encoder_windows == (1 + 2 + 3) * 3
    padded = MuseTalkEngine(
        models_dir=tiny_dir, device="cpu", dtype="fp32", batch_size=2, whisper_batch=3, whisper_windows="padded"
    )
    padded.warmup()
    assert padded.whisper.encoder_windows == 1 + 2 + 3


@pytest.mark.gpu
def test_whisper_cuda_graphs_replay_the_eager_encoder(tiny_dir: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from pipeline.engines.musetalk.engine import MuseTalkEngine

    gpu = MuseTalkEngine(models_dir=tiny_dir, device="cuda:0", dtype="fp16", warmup=False)
    assert gpu.whisper.cuda_graphs
    windows = [speechy(0.5 + 0.25 * i) for i in range(3)] + [speechy(12.0), speechy(30.0)]
    graphed = [h.float().cpu() for h in gpu.whisper.encode_audio(windows)]
    assert [len(h) for h in graphed] == [500, 500, 500, 1000, 1500]  # trimmed, three graph shapes
    gpu.whisper.cuda_graphs = False
    eager = [h.float().cpu() for h in gpu.whisper.encode_audio(windows)]
    for a, b in zip(graphed, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)
