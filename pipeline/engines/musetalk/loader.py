"""Loads the official MuseTalk v1.5 files (shared/MUSETALK_V15.md) onto a device, strictly.

Why not ``from_pretrained``: the official UNet is a bare ``unet.pth`` state dict, and a wrong file
(another UNet, a v1.0 file under the v1.5 name, a truncated download) must fail with one line
that names the file, the key and the expected vs found shape, before anything is half-loaded.
So every architecture is built from its config on the ``meta`` device (no memory, no random
init), the checkpoint's keys and shapes are compared with the model's, and only then the tensors
are assigned (memory-mapped where the format allows, so a 3.4 GB file is not copied twice).

Accepted: fp32, fp16 or bf16 tensors in any file; the model is cast to the requested dtype.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import EngineUnavailable

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

UNET_V15 = ("musetalkV15/unet.pth", "musetalkV15/musetalk.json")
UNET_V1 = ("musetalk/pytorch_model.bin", "musetalk/musetalk.json")
VAE_CONFIG = "sd-vae/config.json"
VAE_WEIGHTS = ("sd-vae/diffusion_pytorch_model.bin", "sd-vae/diffusion_pytorch_model.safetensors")
WHISPER_CONFIG = "whisper/config.json"
WHISPER_WEIGHTS = ("whisper/pytorch_model.bin", "whisper/model.safetensors")
WHISPER_PREPROCESSOR = "whisper/preprocessor_config.json"

# Whisper prefixes in the order they are tried: WhisperForConditionalGeneration (the official
# openai/whisper-tiny file), WhisperModel, a bare WhisperEncoder.
_WHISPER_PREFIXES = ("model.encoder.", "encoder.", "")


@dataclass
class MuseTalkModels:
    """Everything the engine runs, on one device in one dtype."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    whisper: Any  # transformers WhisperEncoder
    feature_extractor: Any  # transformers.WhisperFeatureExtractor
    vae_sha256: str
    device: torch.device
    dtype: torch.dtype
    version: str  # "v15" or "v1" (which UNet file was found)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise EngineUnavailable(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device, checked to exist (a CPU-only torch build says so instead of crashing later)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EngineUnavailable(f"bad device {device!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineUnavailable(f"device {device!r} asked for, but this torch has no usable CUDA device")
        index = dev.index or 0
        if index >= torch.cuda.device_count():
            raise EngineUnavailable(
                f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s)"
            )
        dev = torch.device("cuda", index)
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise EngineUnavailable(f"device {device!r} asked for, but MPS is not available")
    return dev


def load_models(
    models_dir: Path | str, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32"
) -> MuseTalkModels:
    """UNet + VAE + Whisper encoder from the official layout under ``models_dir``."""
    root = Path(models_dir)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if not root.is_dir():
        raise EngineUnavailable(
            f"models directory {root} does not exist (see README: downloading the MuseTalk weights)"
        )
    unet, version = load_unet(root, dev, dt)
    vae, vae_sha = load_vae(root, dev, dt)
    whisper, extractor = load_whisper(root, dev, dt)
    return MuseTalkModels(unet, vae, whisper, extractor, vae_sha, dev, dt, version)


# --- architectures from configs (on the meta device: no memory, no init) --------------------------


def build_unet(config: Mapping[str, Any]) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(config))


def build_vae(config: Mapping[str, Any]) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL.from_config(dict(config))


def build_whisper_encoder(config: Mapping[str, Any] | Any) -> torch.nn.Module:
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = config if isinstance(config, WhisperConfig) else WhisperConfig.from_dict(dict(config))
    # sdpa: one fused attention kernel on GPU; numerically the same maths as eager.
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        return WhisperEncoder(cfg)


# --- the three parts --------------------------------------------------------------------------------


def load_unet(root: Path, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, str]:
    """The v1.5 UNet, or the v1.0 one when only that layout is present."""
    weights, config, version = *UNET_V15, "v15"
    if not (root / weights).is_file() and (root / UNET_V1[0]).is_file():
        weights, config, version = *UNET_V1, "v1"
        log.warning(
            "MuseTalk v1.0 UNet found (%s); it is driven by v1.5-style Whisper features, which v1.0 "
            "was not trained with: expect weaker lip sync than with musetalkV15/unet.pth",
            weights,
        )
    cfg = _read_json(root, config)
    model = _build(lambda: build_unet(cfg), config, "UNet2DConditionModel")
    state = read_state_dict(root, weights)
    _assign(model, state, weights)
    return _place(model, device, dtype), version


def load_vae(root: Path, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, str]:
    """sd-vae-ft-mse and the sha256 of its weight file (the latents cache key)."""
    cfg = _read_json(root, VAE_CONFIG)
    model = _build(lambda: build_vae(cfg), VAE_CONFIG, "AutoencoderKL")
    weights = _first_existing(root, VAE_WEIGHTS)
    state = convert_legacy_vae_keys(read_state_dict(root, weights))
    _assign(model, state, weights)
    return _place(model, device, dtype), file_sha256(root / weights)


def load_whisper(root: Path, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    """The whisper-tiny encoder (decoder keys in the file are ignored) and its feature extractor."""
    from transformers import WhisperFeatureExtractor

    cfg = _read_json(root, WHISPER_CONFIG)
    model = _build(lambda: build_whisper_encoder(cfg), WHISPER_CONFIG, "WhisperEncoder")
    weights = _first_existing(root, WHISPER_WEIGHTS)
    state = read_state_dict(root, weights)
    prefix = next((p for p in _WHISPER_PREFIXES if f"{p}conv1.weight" in state), None)
    if prefix is None:
        raise EngineUnavailable(
            f"{weights}: no Whisper encoder in this file (looked for model.encoder.conv1.weight, "
            "encoder.conv1.weight, conv1.weight)"
        )
    encoder_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if prefix == "":  # a bare encoder file: everything in it must be the encoder's
        encoder_state = dict(state)
    _assign(model, encoder_state, weights, key_prefix=prefix)

    _read_json(root, WHISPER_PREPROCESSOR)  # a clear message when missing or broken
    try:
        extractor = WhisperFeatureExtractor.from_pretrained(str(root / "whisper"), local_files_only=True)
    except Exception as exc:
        raise EngineUnavailable(
            f"{WHISPER_PREPROCESSOR}: cannot build WhisperFeatureExtractor: {_one_line(exc)}"
        ) from exc
    expect = {
        "feature_size": model.config.num_mel_bins,
        "sampling_rate": 16000,
        "hop_length": 160,
        "n_samples": 480000,
    }
    for name, value in expect.items():
        if getattr(extractor, name) != value:
            raise EngineUnavailable(
                f"{WHISPER_PREPROCESSOR}: {name} is {getattr(extractor, name)}, expected {value}"
            )
    if model.config.d_model != 384 or model.config.encoder_layers != 4:
        log.warning(
            "whisper/config.json is not whisper-tiny (d_model %s, %s layers)",
            model.config.d_model,
            model.config.encoder_layers,
        )
    return _place(model, device, dtype), extractor


# --- files ---------------------------------------------------------------------------------------------


def read_state_dict(root: Path, rel: str) -> dict[str, torch.Tensor]:
    """A flat ``name -> tensor`` dict from a .pth/.bin (weights only: no code runs) or .safetensors."""
    path = root / rel
    if not path.is_file():
        raise EngineUnavailable(f"{rel}: file not found under {root}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EngineUnavailable(f"{rel}: cannot be read as a weights file: {_one_line(exc)}") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EngineUnavailable(f"{rel}: not a plain state dict of tensors")
    return dict(state)


def check_state_dict(
    rel: str, expected: Mapping[str, torch.Size], found: Mapping[str, torch.Tensor], key_prefix: str = ""
) -> None:
    """Raise :class:`EngineUnavailable` naming the first missing/unexpected key or wrong shape."""
    missing = [k for k in expected if k not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        k = missing[0]
        raise EngineUnavailable(
            f"{rel}: missing key {key_prefix}{k}, expected shape {_shape(expected[k])}{more}"
        )
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        k = unexpected[0]
        raise EngineUnavailable(
            f"{rel}: unexpected key {key_prefix}{k} with shape {_shape(found[k].shape)}{more}; "
            "the file does not match its config"
        )
    for k, shape in expected.items():
        if tuple(found[k].shape) != tuple(shape):
            raise EngineUnavailable(
                f"{rel}: {key_prefix}{k} has shape {_shape(found[k].shape)}, expected {_shape(shape)}"
            )
    for k, t in found.items():
        if not t.is_floating_point():
            raise EngineUnavailable(
                f"{rel}: {key_prefix}{k} has dtype {t.dtype}, expected a floating point type"
            )


def convert_legacy_vae_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the pre-0.14 diffusers VAE attention names (sd-vae-ft-mse's .bin uses them) to current ones.

    query/key/value/proj_attn -> to_q/to_k/to_v/to_out.0; 1x1-conv shaped [C, C, 1, 1] weights of
    even older exports become the [C, C] linear weights diffusers expects.
    """
    renames = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if ".attentions." in name and len(parts) >= 2 and parts[-2] in renames:
            name = ".".join([*parts[:-2], renames[parts[-2]], parts[-1]])
            if tensor.dim() == 4 and tensor.shape[2:] == (1, 1):
                tensor = tensor[:, :, 0, 0]
        out[name] = tensor
    return out


_HASH_CACHE: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def file_sha256(path: Path | str) -> str:
    """sha256 of a file, cached per (path, size, mtime) so a 335 MB VAE is hashed once per process."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    with _HASH_LOCK:
        if key in _HASH_CACHE:
            return _HASH_CACHE[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    with _HASH_LOCK:
        _HASH_CACHE[key] = digest
    return digest


# --- helpers -------------------------------------------------------------------------------------------


def _read_json(root: Path, rel: str) -> dict[str, Any]:
    path = root / rel
    if not path.is_file():
        raise EngineUnavailable(f"{rel}: file not found under {root}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EngineUnavailable(f"{rel}: not valid JSON: {_one_line(exc)}") from exc
    if not isinstance(data, dict):
        raise EngineUnavailable(f"{rel}: expected a JSON object")
    return data


def _first_existing(root: Path, names: tuple[str, ...]) -> str:
    for name in names:
        if (root / name).is_file():
            return name
    raise EngineUnavailable(f"{names[0]}: file not found under {root} (nor {', '.join(names[1:])})")


def _build(factory: Any, config_rel: str, what: str) -> torch.nn.Module:
    try:
        return factory()
    except Exception as exc:
        raise EngineUnavailable(f"{config_rel}: cannot build {what} from it: {_one_line(exc)}") from exc


def _assign(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], rel: str, key_prefix: str = ""
) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(rel, expected, state, key_prefix)
    model.load_state_dict(dict(state), strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a non-persistent buffer the state dict cannot fill: a library change, not a user error
        raise RuntimeError(f"{rel}: {leftover[0]} was not filled by the state dict")


def _place(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    # torch's own .to: diffusers' override only adds a warning about fp32-pinned modules, which
    # these models do not have.
    model = torch.nn.Module.to(model, device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def _shape(shape: Any) -> str:
    return str([int(d) for d in shape])


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


__all__ = [
    "DTYPES",
    "MuseTalkModels",
    "build_unet",
    "build_vae",
    "build_whisper_encoder",
    "check_state_dict",
    "convert_legacy_vae_keys",
    "file_sha256",
    "load_models",
    "load_unet",
    "load_vae",
    "load_whisper",
    "read_state_dict",
    "resolve_device",
    "resolve_dtype",
]
