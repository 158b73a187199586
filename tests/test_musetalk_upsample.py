"""The VAE decoder's folded upsampling layers (pipeline/engines/musetalk/upsample.py) compute
diffusers' nearest-2x + 3x3 convolution exactly (float64), leave the loaded model untouched, and
give the engine the same frames."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers import AutoencoderKL  # noqa: E402
from diffusers.models.upsampling import Upsample2D  # noqa: E402

from pipeline.engines.base import FrameRequest  # noqa: E402
from pipeline.engines.musetalk.synthetic import vae_config, write_synthetic_checkpoints  # noqa: E402
from pipeline.engines.musetalk.upsample import FORMS, fold_upsamplers, foldable  # noqa: E402


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize(
    ("channels", "out_channels", "height", "width", "bias"),
    [(8, 8, 5, 7, True), (6, 10, 4, 4, True), (4, 4, 1, 1, False), (3, 5, 2, 9, False)],
)
def test_folded_layer_equals_nearest_upsample_then_conv(form, channels, out_channels, height, width, bias) -> None:
    torch.manual_seed(channels * 100 + height)
    layer = Upsample2D(channels, use_conv=True, out_channels=out_channels, bias=bias).double()
    x = torch.randn(3, channels, height, width, dtype=torch.float64)
    want = layer(x)
    folded = FORMS[form](layer.conv)
    got = folded(x)
    assert got.shape == want.shape == (3, out_channels, 2 * height, 2 * width)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # channels-last in, channels-last out (the engine's layout on a GPU), same numbers
    got_cl = folded(x.contiguous(memory_format=torch.channels_last))
    assert got_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got_cl, want, rtol=0, atol=1e-12)


def test_only_nearest_2x_with_a_plain_3x3_convolution_is_folded() -> None:
    assert foldable(Upsample2D(4, use_conv=True)) is not None
    assert foldable(Upsample2D(4, use_conv=False)) is None  # no convolution to fold
    assert foldable(Upsample2D(4, use_conv_transpose=True)) is None
    assert foldable(Upsample2D(4, use_conv=True, interpolate=False)) is None
    assert foldable(Upsample2D(4, use_conv=True, norm_type="rms_norm", eps=1e-5, elementwise_affine=True)) is None
    assert foldable(Upsample2D(4, use_conv=True, kernel_size=1, padding=0)) is None
    assert foldable(torch.nn.Conv2d(4, 4, 3, padding=1)) is None
    for layer in FORMS.values():
        with pytest.raises(ValueError, match="output_size"):
            layer(Upsample2D(4, use_conv=True).conv)(torch.zeros(1, 4, 2, 2), (5, 5))


@pytest.mark.parametrize("form", sorted(FORMS))
def test_folded_vae_decodes_like_the_loaded_one_and_leaves_it_as_loaded(form) -> None:
    torch.manual_seed(0)
    config = {k: v for k, v in vae_config(tiny=True).items() if not k.startswith("_")}
    vae = AutoencoderKL(**config).double().eval()
    folded, count = fold_upsamplers(vae, form)
    assert count == len(vae.decoder.up_blocks) - 1 == len(config["block_out_channels"]) - 1
    assert all(isinstance(block.upsamplers[0], Upsample2D) for block in vae.decoder.up_blocks[:-1])
    assert all(isinstance(block.upsamplers[0], FORMS[form]) for block in folded.decoder.up_blocks[:-1])
    # everything but the folded layers is shared, not copied
    assert folded.encoder is vae.encoder and folded.decoder.mid_block is vae.decoder.mid_block
    assert folded.decoder.up_blocks[0].resnets is vae.decoder.up_blocks[0].resnets
    z = torch.randn(2, config["latent_channels"], 16, 16, dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(folded.decode(z).sample, vae.decode(z).sample, rtol=0, atol=1e-10)


def test_engine_with_folded_upsampling_makes_the_reference_frames(tmp_path: Path) -> None:
    from pipeline.engines.musetalk.engine import MuseTalkEngine
    from tests.test_musetalk import make_avatar

    models = write_synthetic_checkpoints(tmp_path / "models", tiny=True, seed=4)
    avatar = make_avatar(tmp_path, "fold", shift=0)
    tokens = torch.randn(3, 50, 384, generator=torch.Generator().manual_seed(5))
    requests = [FrameRequest(avatar, i, tokens[i]) for i in range(3)]
    frames = {}
    for mode in ("reference", "folded", "transposed"):
        engine = MuseTalkEngine(models_dir=models, device="cpu", dtype="fp32", vae_upsample=mode)
        try:
            assert engine.vae_upsample == mode
            frames[mode] = engine.generate_float(requests)
        finally:
            engine.close()
    torch.testing.assert_close(frames["folded"], frames["reference"], rtol=0, atol=1e-5)
    torch.testing.assert_close(frames["transposed"], frames["reference"], rtol=0, atol=1e-5)
