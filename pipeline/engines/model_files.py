"""The files of the official MuseTalk v1.5 layout under the models directory (shared/MUSETALK_V15.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelFile:
    path: str  # relative to the models directory
    what: str
    required: bool = True
    alternatives: tuple[str, ...] = ()  # other accepted names for the same file

    def find(self, models_dir: Path) -> Path | None:
        for name in (self.path, *self.alternatives):
            candidate = models_dir / name
            if candidate.is_file():
                return candidate
        return None


MUSETALK_V15_FILES: tuple[ModelFile, ...] = (
    ModelFile("musetalkV15/unet.pth", "MuseTalk v1.5 UNet state dict"),
    ModelFile("musetalkV15/musetalk.json", "MuseTalk v1.5 UNet config"),
    ModelFile("sd-vae/config.json", "sd-vae-ft-mse config"),
    ModelFile(
        "sd-vae/diffusion_pytorch_model.bin",
        "sd-vae-ft-mse weights",
        alternatives=("sd-vae/diffusion_pytorch_model.safetensors",),
    ),
    ModelFile("whisper/config.json", "whisper-tiny config"),
    ModelFile("whisper/pytorch_model.bin", "whisper-tiny weights", alternatives=("whisper/model.safetensors",)),
    ModelFile("whisper/preprocessor_config.json", "whisper-tiny feature extractor"),
    ModelFile("face-parse-bisent/79999_iter.pth", "BiSeNet face parsing (better masks)", required=False),
)
