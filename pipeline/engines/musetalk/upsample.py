"""The VAE decoder's upsamplers as one 2x2 convolution on the small input: the same function,
less than half the arithmetic.

Each of the SD VAE decoder's three ``Upsample2D`` layers repeats every pixel 2x2 (nearest) and
then runs a 3x3 convolution over the result. At MuseTalk's 256x256 output those three
convolutions are ~170 of the decoder's ~620 GFLOP per frame, and the decoder is ~90 % of a
frame's GPU time (docs/benchmarks.md, "Where the GPU time goes").

Because the upsampled picture is piecewise constant, each of the four output phases
``y[2i + a, 2j + b]`` sees only a 2x2 neighbourhood of the input ``x``:

    rows, phase a = 0:  x[i - 1] * W[0]          + x[i] * (W[1] + W[2])
    rows, phase a = 1:  x[i] * (W[0] + W[1])     + x[i + 1] * W[2]

(columns alike, zero padding at the borders on both sides). Two forms compute that:

- ``phases``: one 2x2 convolution with 4x the output channels over ``x`` padded by one pixel,
  whose outputs, offset by the phase, interleave into ``y`` (a copy of the full-size output).
- ``transposed``: the same taps as one transposed convolution, stride 2, with the 4x4 kernel
  ``[W[2], W[1] + W[2], W[0] + W[1], W[0]]`` per axis (padding 1): the library writes ``y``
  directly, no interleave.

Both take 4 x 4 = 16 multiply-adds per input pixel and channel pair instead of 4 x 9 = 36
(0.45x), and the 4x larger upsampled input is never written. The result is the official
layer's up to floating-point rounding (the summed weights are added in fp32 and rounded once
to the model's dtype); tests/test_musetalk_upsample.py checks both forms.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# Row (and column) tap maps: _PHASE_TAPS[a][d][k] says whether the 3x3 kernel's row k reads the
# input row i + a - 1 + d for output phase a (derived in the module docstring).
_PHASE_TAPS = torch.tensor(
    [
        [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],  # a = 0: rows i-1, i
        [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]],  # a = 1: rows i, i+1
    ]
)


# Transposed-convolution taps: _TRANSPOSED_TAPS[k][kh] says whether the 3x3 kernel's row kh
# belongs to the stride-2 4-tap kernel's tap k (y[p] = sum_i x[i] K[p - 2 i + 1]).
_TRANSPOSED_TAPS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def transposed_kernel(weight: torch.Tensor) -> torch.Tensor:
    """[O, C, 3, 3] -> [C, O, 4, 4]: conv_transpose2d's weight (stride 2, padding 1) for
    nearest 2x then this 3x3 convolution, summed in fp32 (or the weight's dtype, if wider)."""
    w = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    taps = _TRANSPOSED_TAPS.to(device=w.device, dtype=w.dtype)
    return torch.einsum("hk,wl,ockl->cohw", taps, taps, w).contiguous()


def phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """[O, C, 3, 3] -> [4 * O, C, 2, 2]: the 2x2 kernel of phases (0,0), (0,1), (1,0), (1,1)
    stacked along the output channels, summed in fp32 (or the weight's dtype, if wider)."""
    w = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    taps = _PHASE_TAPS.to(device=w.device, dtype=w.dtype)
    # k[a, b, o, c, dh, dw] = sum_kh sum_kw taps[a, dh, kh] * taps[b, dw, kw] * w[o, c, kh, kw]
    k = torch.einsum("ahk,bwl,ockl->abochw", taps, taps, w)
    return k.reshape(4 * w.shape[0], w.shape[1], 2, 2)


class _FoldedForm(nn.Module):
    """Drop-in for diffusers' ``Upsample2D`` (nearest 2x, then a 3x3 convolution with padding
    1), built from a loaded layer's convolution without keeping a reference to it. A form
    supplies ``_upsample``; the output keeps the input's channels-last layout."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.channels = conv.in_channels
        self.out_channels = conv.out_channels

    def forward(self, hidden_states: torch.Tensor, output_size: object = None, *args: object, **kwargs: object) -> torch.Tensor:
        if output_size is not None:
            raise ValueError(f"{type(self).__name__} only upsamples by 2 (no output_size)")
        y = self._upsample(hidden_states)
        if hidden_states.is_contiguous(memory_format=torch.channels_last):  # a no-op where it already is
            y = y.contiguous(memory_format=torch.channels_last)
        return y

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FoldedUpsample2D(_FoldedForm):
    """The ``phases`` form: one 2x2 convolution per output phase, interleaved (module docstring)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__(conv)
        kernels = phase_kernels(conv.weight).to(conv.weight.dtype)
        self.weight = nn.Parameter(kernels, requires_grad=False)
        bias = conv.bias.detach().repeat(4) if conv.bias is not None else None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        o = self.out_channels
        z = F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias)  # [B, 4O, H+1, W+1]
        phases = [z[:, k * o : (k + 1) * o, a : a + h, c : c + w] for k, (a, c) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1)))]
        return torch.stack(phases, dim=-1).view(b, o, h, w, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(b, o, 2 * h, 2 * w)


class TransposedUpsample2D(_FoldedForm):
    """The ``transposed`` form: one stride-2 transposed convolution (module docstring)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__(conv)
        self.weight = nn.Parameter(transposed_kernel(conv.weight).to(conv.weight.dtype), requires_grad=False)
        self.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False) if conv.bias is not None else None

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, self.weight, self.bias, stride=2, padding=1)


FORMS: dict[str, type[nn.Module]] = {"phases": FoldedUpsample2D, "transposed": TransposedUpsample2D}


def foldable(module: nn.Module) -> nn.Conv2d | None:
    """The 3x3 convolution of a nearest-2x ``Upsample2D`` this module can replace, else None."""
    if type(module).__name__ != "Upsample2D":
        return None
    if not getattr(module, "interpolate", False) or not getattr(module, "use_conv", False):
        return None
    if getattr(module, "use_conv_transpose", False) or getattr(module, "norm", None) is not None:
        return None
    conv = getattr(module, "conv", None) or getattr(module, "Conv2d_0", None)
    if not isinstance(conv, nn.Conv2d):
        return None
    if conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.stride != (1, 1):
        return None
    if conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
        return None
    return conv


def fold_upsamplers(model: nn.Module, form: str = "phases") -> tuple[nn.Module, int]:
    """``model`` with every foldable ``Upsample2D`` replaced by ``form`` (:data:`FORMS`), and
    how many were.

    ``model`` itself is left as loaded (the avatar-latents encoder, the reference test and the
    official-style bench use it): the result is a copy of the modules on the path to each
    replaced layer, sharing every other module and weight with ``model``.
    """
    layer = FORMS[form]
    targets = [(name, conv) for name, module in model.named_modules() if (conv := foldable(module)) is not None]
    for name, conv in targets:
        model = _with_replaced(model, name.split("."), layer(conv))
    if targets:
        log.info("folded %d nearest-2x upsampling convolutions (%s)", len(targets), form)
    return model, len(targets)


def _with_replaced(module: nn.Module, path: list[str], new: nn.Module) -> nn.Module:
    clone = copy.copy(module)
    clone._modules = dict(module._modules)  # its own child table; parameters and buffers stay shared
    head = path[0]
    clone._modules[head] = new if len(path) == 1 else _with_replaced(module._modules[head], path[1:], new)
    return clone
