"""BiSeNet face parsing (19 classes), the architecture of zllrunning/face-parsing.PyTorch that
MuseTalk ships as ``musetalk/utils/face_parsing/model.py``, so that the official
``face-parse-bisent/79999_iter.pth`` (a plain state dict, ~53 MB fp32, ~13.3 M parameters) loads
strictly.

Module names and shapes follow the original exactly (they are the state-dict keys):
``cp.resnet.*`` (ResNet-18 without ``fc``), ``cp.arm16/arm32`` (AttentionRefinementModule),
``cp.conv_head32/conv_head16/conv_avg`` (ConvBNReLU), ``ffm`` (FeatureFusionModule: ``convblk``,
``conv1``, ``conv2``) and the heads ``conv_out/conv_out16/conv_out32`` (BiSeNetOutput: ``conv``,
``conv_out``). The spatial path is absent, as in the original (the ResNet 1/8 feature replaces it).

The ResNet-18 backbone is defined here: the original initialises it from torchvision's
``resnet18-5c106cde.pth`` for training only; at inference every weight comes from
``79999_iter.pth``, so neither torchvision nor that file is needed. Weight initialisation code is
left out for the same reason.

Labels (CelebAMask-HQ order of the original): 0 background, 1 skin, 2 l_brow, 3 r_brow, 4 l_eye,
5 r_eye, 6 eye_g, 7 l_ear, 8 r_ear, 9 ear_r, 10 nose, 11 mouth, 12 u_lip, 13 l_lip, 14 neck,
15 neck_l, 16 cloth, 17 hair, 18 hat.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.engines.musetalk.loader import check_state_dict, read_state_dict
from pipeline.errors import EngineUnavailable

N_CLASSES = 19
#: Where the official file lives under the models directory (shared/MUSETALK_V15.md).
BISENET_FILE = "face-parse-bisent/79999_iter.pth"


class ConvBNReLU(nn.Module):
    def __init__(self, in_chan: int, out_chan: int, ks: int = 3, stride: int = 1, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chan, out_chan, kernel_size=ks, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BiSeNetOutput(nn.Module):
    def __init__(self, in_chan: int, mid_chan: int, n_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_chan, mid_chan, ks=3, stride=1, padding=1)
        self.conv_out = nn.Conv2d(mid_chan, n_classes, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class AttentionRefinementModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_chan, out_chan, ks=3, stride=1, padding=1)
        self.conv_atten = nn.Conv2d(out_chan, out_chan, kernel_size=1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_chan)
        self.sigmoid_atten = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        atten = F.adaptive_avg_pool2d(feat, output_size=(1, 1))
        atten = self.sigmoid_atten(self.bn_atten(self.conv_atten(atten)))
        return torch.mul(feat, atten)


class BasicBlock(nn.Module):
    def __init__(self, in_chan: int, out_chan: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chan, out_chan, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chan)
        self.conv2 = nn.Conv2d(out_chan, out_chan, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chan)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if in_chan != out_chan or stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chan, out_chan, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chan),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = F.relu(self.bn1(self.conv1(x)))
        residual = self.bn2(self.conv2(residual))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(shortcut + residual)


def _layer(in_chan: int, out_chan: int, bnum: int, stride: int = 1) -> nn.Sequential:
    layers = [BasicBlock(in_chan, out_chan, stride=stride)]
    layers += [BasicBlock(out_chan, out_chan, stride=1) for _ in range(bnum - 1)]
    return nn.Sequential(*layers)


class Resnet18(nn.Module):
    """ResNet-18 trunk returning the 1/8, 1/16 and 1/32 features (no avgpool/fc)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _layer(64, 64, bnum=2, stride=1)
        self.layer2 = _layer(64, 128, bnum=2, stride=2)
        self.layer3 = _layer(128, 256, bnum=2, stride=2)
        self.layer4 = _layer(256, 512, bnum=2, stride=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        feat8 = self.layer2(x)
        feat16 = self.layer3(feat8)
        feat32 = self.layer4(feat16)
        return feat8, feat16, feat32


class ContextPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.resnet = Resnet18()
        self.arm16 = AttentionRefinementModule(256, 128)
        self.arm32 = AttentionRefinementModule(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128, ks=3, stride=1, padding=1)
        self.conv_head16 = ConvBNReLU(128, 128, ks=3, stride=1, padding=1)
        self.conv_avg = ConvBNReLU(512, 128, ks=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        h8, w8 = feat8.shape[2:]
        h16, w16 = feat16.shape[2:]
        h32, w32 = feat32.shape[2:]

        avg = self.conv_avg(F.adaptive_avg_pool2d(feat32, output_size=(1, 1)))
        avg_up = F.interpolate(avg, (h32, w32), mode="nearest")

        feat32_sum = self.arm32(feat32) + avg_up
        feat32_up = self.conv_head32(F.interpolate(feat32_sum, (h16, w16), mode="nearest"))

        feat16_sum = self.arm16(feat16) + feat32_up
        feat16_up = self.conv_head16(F.interpolate(feat16_sum, (h8, w8), mode="nearest"))
        return feat8, feat16_up, feat32_up  # x8, x8, x16


class FeatureFusionModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int) -> None:
        super().__init__()
        self.convblk = ConvBNReLU(in_chan, out_chan, ks=1, stride=1, padding=0)
        self.conv1 = nn.Conv2d(out_chan, out_chan // 4, kernel_size=1, stride=1, padding=0, bias=False)
        self.conv2 = nn.Conv2d(out_chan // 4, out_chan, kernel_size=1, stride=1, padding=0, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.sigmoid = nn.Sigmoid()

    def forward(self, fsp: torch.Tensor, fcp: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        atten = F.adaptive_avg_pool2d(feat, output_size=(1, 1))
        atten = self.sigmoid(self.conv2(self.relu(self.conv1(atten))))
        return torch.mul(feat, atten) + feat


class BiSeNet(nn.Module):
    """``forward(x)`` returns ``(out, out16, out32)`` logits ``[B, n_classes, H, W]``; inference
    uses only the first (the auxiliary heads exist so the checkpoint loads strictly)."""

    def __init__(self, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusionModule(256, 256)
        self.conv_out = BiSeNetOutput(256, 256, n_classes)
        self.conv_out16 = BiSeNetOutput(128, 64, n_classes)
        self.conv_out32 = BiSeNetOutput(128, 64, n_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, w = x.shape[2:]
        feat_res8, feat_cp8, feat_cp16 = self.cp(x)
        feat_fuse = self.ffm(feat_res8, feat_cp8)  # the res 1/8 feature stands in for the spatial path
        outs = (self.conv_out(feat_fuse), self.conv_out16(feat_cp8), self.conv_out32(feat_cp16))
        return tuple(F.interpolate(o, (h, w), mode="bilinear", align_corners=True) for o in outs)  # type: ignore[return-value]


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def load_bisenet(path: Path | str, device: str | torch.device = "cpu") -> BiSeNet:
    """Build BiSeNet(19) and load ``path`` strictly, in eval mode on ``device`` (fp32).

    Raises :class:`EngineUnavailable` naming the file and the first missing/unexpected key or
    wrong shape (expected vs found). BatchNorm ``num_batches_tracked`` counters are not compared:
    they carry no inference state and files saved by old PyTorch versions lack them.
    """
    path = Path(path)
    rel = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    state = read_state_dict(path.parent, path.name)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    model = BiSeNet(N_CLASSES)
    expected = {k: v.shape for k, v in model.state_dict().items() if not _is_counter(k)}
    found = {k: v for k, v in state.items() if not _is_counter(k)}
    try:
        check_state_dict(rel, expected, found)
    except EngineUnavailable as exc:
        raise EngineUnavailable(f"{exc} (file {path})") from None
    result = model.load_state_dict({k: v.float() for k, v in found.items()}, strict=False)
    leftover = [k for k in result.missing_keys if not _is_counter(k)] + list(result.unexpected_keys)
    if leftover:  # cannot happen after check_state_dict; kept as a guard
        raise EngineUnavailable(f"{rel}: key mismatch {leftover[:3]} (file {path})")
    return model.to(device).eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
