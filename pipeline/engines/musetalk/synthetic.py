"""Random-weight checkpoints in the official MuseTalk v1.5 file layout.

Why: CI has no GPU and may not download the real weights (several GB, separate licences), yet the
loader must be proven against the exact files a user puts in ``models/``. These writers produce the
same paths, configs, key names and (for ``tiny=False``) the same shapes as the official downloads,
filled with random numbers. ``tiny=True`` keeps every structure (block types, attention, the
384-wide audio tokens, the 8-in/4-out UNet, the 8x VAE) but shrinks channel widths so that a CPU
can run a forward pass in a test. The GPU benchmarks use the full-size variant to time the real
architecture without the real weights.

Weights are drawn directly from the model's shapes (normal / sqrt(fan_in), norms 1, biases 0)
rather than through the modules' own initialisers: for the 850 M-parameter UNet that is ~3x
faster on a small CPU and keeps activations finite in fp16.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from pipeline.engines.musetalk.loader import DTYPES, build_unet, build_vae, build_whisper_encoder

# shared/MUSETALK_V15.md, "UNet config (musetalk.json)"; key order as in the official file.
UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# stabilityai/sd-vae-ft-mse config.json
VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.4.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# openai/whisper-tiny config.json (the fields transformers reads)
WHISPER_CONFIG: dict[str, Any] = {
    "_name_or_path": "openai/whisper-tiny",
    "activation_dropout": 0.0,
    "activation_function": "gelu",
    "architectures": ["WhisperForConditionalGeneration"],
    "attention_dropout": 0.0,
    "begin_suppress_tokens": [220, 50257],
    "bos_token_id": 50257,
    "d_model": 384,
    "decoder_attention_heads": 6,
    "decoder_ffn_dim": 1536,
    "decoder_layerdrop": 0.0,
    "decoder_layers": 4,
    "decoder_start_token_id": 50258,
    "dropout": 0.0,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "encoder_layerdrop": 0.0,
    "encoder_layers": 4,
    "eos_token_id": 50257,
    "init_std": 0.02,
    "is_encoder_decoder": True,
    "max_length": 448,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "model_type": "whisper",
    "num_hidden_layers": 4,
    "num_mel_bins": 80,
    "pad_token_id": 50257,
    "scale_embedding": False,
    "torch_dtype": "float32",
    "use_cache": True,
    "vocab_size": 51865,
}

# openai/whisper-tiny preprocessor_config.json (mel_filters omitted: transformers recomputes them)
PREPROCESSOR_CONFIG: dict[str, Any] = {
    "chunk_length": 30,
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 80,
    "hop_length": 160,
    "n_fft": 400,
    "n_samples": 480000,
    "nb_max_frames": 3000,
    "padding_side": "right",
    "padding_value": 0.0,
    "processor_class": "WhisperProcessor",
    "return_attention_mask": False,
    "sampling_rate": 16000,
}

# Tiny variants: same block types and interfaces, narrow channels.
TINY_UNET_OVERRIDES: dict[str, Any] = {"block_out_channels": [32, 32, 64, 64], "norm_num_groups": 8}
TINY_VAE_OVERRIDES: dict[str, Any] = {"block_out_channels": [16, 16, 32, 32], "norm_num_groups": 8}


# Micro variants (tests/test_musetalk_live.py: a whole live session on a 2-core CI machine): on top
# of tiny, one layer per block, single-head attention, an 8-wide VAE, and a Whisper encoder whose
# feed-forward is 64 wide. Still the official interfaces: 8-in/4-out UNet over 32x32 latents,
# 384-wide audio tokens, 4 encoder layers (5 hidden states) over 1500 positions, 8x VAE.
MICRO_OVERRIDES: dict[str, dict[str, Any]] = {
    "unet": {"block_out_channels": [8, 8, 16, 16], "norm_num_groups": 4, "layers_per_block": 1, "attention_head_dim": 1},
    "vae": {"block_out_channels": [8, 8, 8, 8], "norm_num_groups": 4, "layers_per_block": 1},
    "whisper": {"encoder_ffn_dim": 64, "decoder_ffn_dim": 64},
}


def unet_config(tiny: bool = False) -> dict[str, Any]:
    return {**UNET_CONFIG, **(TINY_UNET_OVERRIDES if tiny else {})}


def vae_config(tiny: bool = False) -> dict[str, Any]:
    return {**VAE_CONFIG, **(TINY_VAE_OVERRIDES if tiny else {})}


def random_state_dict(
    module: torch.nn.Module, generator: torch.Generator, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Random tensors with the module's state-dict shapes (the module may live on ``meta``)."""
    out: dict[str, torch.Tensor] = {}
    for name, ref in module.state_dict().items():
        shape = tuple(ref.shape)
        if len(shape) <= 1:
            fill = 1.0 if name.endswith("weight") else 0.0  # 1-D weights are norm scales here
            out[name] = torch.full(shape, fill, dtype=dtype)
            continue
        fan_in = math.prod(shape[1:])
        out[name] = (torch.randn(shape, generator=generator) / math.sqrt(fan_in)).to(dtype)
    return out


def legacy_vae_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename VAE attention keys to the pre-0.14 diffusers names that sd-vae-ft-mse's file uses."""
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if ".attentions." in key:
            for new, old in renames.items():
                key = key.replace(new, old)
        out[key] = value
    return out


def write_synthetic_checkpoints(
    models_dir: Path | str,
    *,
    tiny: bool,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
    version: str = "v15",
    vae_format: str = "bin",
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write random UNet, VAE and Whisper checkpoints in the official layout under ``models_dir``.

    ``dtype`` is the dtype of the stored tensors (fp16 halves the 3.4 GB full-size UNet file).
    ``version`` "v15" writes ``musetalkV15/unet.pth``, "v1" writes ``musetalk/pytorch_model.bin``.
    ``vae_format`` "bin" (with the legacy attention key names of the real sd-vae-ft-mse file) or
    "safetensors" (current names). The Whisper file holds only ``model.encoder.*`` keys: the
    decoder of the real file is ignored by the loader anyway. ``overrides`` ({"unet": {...},
    "vae": {...}, "whisper": {...}}, e.g. :data:`MICRO_OVERRIDES`) change the configs further.
    """
    overrides = overrides or {}
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    root = Path(models_dir)
    gen = torch.Generator().manual_seed(seed)

    unet_dir, unet_file = {"v15": ("musetalkV15", "unet.pth"), "v1": ("musetalk", "pytorch_model.bin")}[
        version
    ]
    (root / unet_dir).mkdir(parents=True, exist_ok=True)
    ucfg = {**unet_config(tiny), **overrides.get("unet", {})}
    _write_json(root / unet_dir / "musetalk.json", ucfg)
    torch.save(random_state_dict(build_unet(ucfg), gen, dtype), root / unet_dir / unet_file)

    (root / "sd-vae").mkdir(parents=True, exist_ok=True)
    vcfg = {**vae_config(tiny), **overrides.get("vae", {})}
    _write_json(root / "sd-vae" / "config.json", vcfg)
    vae_sd = random_state_dict(build_vae(vcfg), gen, dtype)
    if vae_format == "bin":
        torch.save(legacy_vae_keys(vae_sd), root / "sd-vae" / "diffusion_pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(vae_sd, str(root / "sd-vae" / "diffusion_pytorch_model.safetensors"))

    wcfg = {**WHISPER_CONFIG, **overrides.get("whisper", {})}
    write_whisper_configs(root / "whisper", **overrides.get("whisper", {}))
    enc_sd = random_state_dict(build_whisper_encoder(wcfg), gen, dtype)
    # Real whisper-tiny encoders use sinusoidal positions; random ones would do, but these keep
    # the synthetic encoder's attention closer to the real one's behaviour in tests.
    enc_sd["embed_positions.weight"] = whisper_sinusoids(1500, 384).to(dtype)
    torch.save({f"model.encoder.{k}": v for k, v in enc_sd.items()}, root / "whisper" / "pytorch_model.bin")
    return root


def write_whisper_configs(whisper_dir: Path, **overrides: Any) -> None:
    """config.json and preprocessor_config.json of whisper-tiny (``overrides`` go into config.json)."""
    whisper_dir.mkdir(parents=True, exist_ok=True)
    _write_json(whisper_dir / "config.json", {**WHISPER_CONFIG, **overrides})
    _write_json(whisper_dir / "preprocessor_config.json", PREPROCESSOR_CONFIG)


def whisper_sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positional embedding (openai/whisper ``sinusoids``)."""
    log_inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-log_inc * torch.arange(channels // 2, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
