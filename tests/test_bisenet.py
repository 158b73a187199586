"""BiSeNet face parsing: strict loading of 79999_iter.pth, the 'jaw' mask, and prepare integration.

Uses synthetic random weights saved in the official layout (the real file is not downloaded).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pipeline.avatar.bisenet import BISENET_FILE, BiSeNet, count_parameters, load_bisenet
from pipeline.avatar.check import check_avatar
from pipeline.avatar.demo import demo_image
from pipeline.avatar.geometry import blur_kernel_size
from pipeline.avatar.parsing_mask import jaw_labels_to_mask, parsing_jaw_mask
from pipeline.avatar.prepare import prepare_avatar
from pipeline.avatar.store import AvatarStore, load_masks
from pipeline.errors import EngineUnavailable


@pytest.fixture(scope="module")
def state() -> dict:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in BiSeNet(19).state_dict().items()}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, state: dict) -> Path:
    root = tmp_path_factory.mktemp("models")
    path = root / BISENET_FILE
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return root


def _save(tmp_path: Path, sd: dict) -> Path:
    path = tmp_path / BISENET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


def test_official_key_layout_and_size(state: dict) -> None:
    model = BiSeNet(19)
    assert 13_200_000 < count_parameters(model) < 13_400_000  # 79999_iter.pth is ~53 MB fp32
    for key, shape in {
        "cp.resnet.conv1.weight": (64, 3, 7, 7),
        "cp.resnet.layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "cp.resnet.layer4.1.bn2.running_var": (512,),
        "cp.arm16.conv.conv.weight": (128, 256, 3, 3),
        "cp.arm32.conv_atten.weight": (128, 128, 1, 1),
        "cp.conv_avg.conv.weight": (128, 512, 1, 1),
        "ffm.convblk.conv.weight": (256, 256, 1, 1),
        "ffm.conv1.weight": (64, 256, 1, 1),
        "conv_out.conv.conv.weight": (256, 256, 3, 3),
        "conv_out.conv_out.weight": (19, 256, 1, 1),
        "conv_out16.conv_out.weight": (19, 64, 1, 1),
        "conv_out32.conv.conv.weight": (64, 128, 3, 3),
    }.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith(("cp.resnet.fc", "sp.")) for k in state)


def test_loads_strictly(models_dir: Path, state: dict, tmp_path: Path) -> None:
    model = load_bisenet(models_dir / BISENET_FILE)
    assert not model.training
    got = model.state_dict()
    assert torch.equal(got["conv_out.conv_out.weight"], state["conv_out.conv_out.weight"])
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, 64, 64))
    assert [tuple(o.shape) for o in out] == [(1, 19, 64, 64)] * 3
    # files from old PyTorch versions have no BatchNorm counters
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    load_bisenet(_save(tmp_path, old))


def test_wrong_files_name_file_key_and_shapes(state: dict, tmp_path: Path) -> None:
    bad = dict(state)
    bad["ffm.conv1.weight"] = torch.zeros(32, 256, 1, 1)
    with pytest.raises(EngineUnavailable, match=r"79999_iter\.pth.*ffm\.conv1\.weight.*32, 256, 1, 1.*expected.*64, 256, 1, 1"):
        load_bisenet(_save(tmp_path, bad))

    missing = {k: v for k, v in state.items() if k != "cp.arm16.conv.conv.weight"}
    with pytest.raises(EngineUnavailable, match=r"79999_iter\.pth: missing key cp\.arm16\.conv\.conv\.weight.*128, 256, 3, 3"):
        load_bisenet(_save(tmp_path, missing))

    extra = dict(state)
    extra["sp.conv1.conv.weight"] = torch.zeros(64, 3, 7, 7)
    with pytest.raises(EngineUnavailable, match=r"unexpected key sp\.conv1\.conv\.weight with shape.*64, 3, 7, 7"):
        load_bisenet(_save(tmp_path, extra))

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(EngineUnavailable, match="junk.pth"):
        load_bisenet(tmp_path / "junk.pth")


def test_jaw_mode_classes() -> None:
    labels = np.zeros((512, 512), dtype=np.int64)
    labels[100:400, 150:360] = 1  # skin
    labels[150:200, 190:230] = 4  # an eye, inside the skin
    labels[200:280, 230:280] = 10  # nose
    labels[300:340, 210:300] = 12  # upper lip
    labels[450:500, 150:360] = 14  # neck, below the dilation reach
    labels[20:60, 20:60] = 11  # a lone "mouth" blob is kept whatever surrounds it
    mask = jaw_labels_to_mask(labels)
    assert set(np.unique(mask)) <= {0, 255}
    assert mask[250, 256] == 0  # nose removed
    assert mask[320, 256] == 255 and mask[40, 40] == 255  # lips / mouth added
    # the cone kernel reaches 16 px up (21 px wide there) and 6 px down (1 px wide): skin grows
    # into the lower rows of an eye above it and barely past the chin edge
    assert mask[175, 210] == 0 and mask[190, 210] == 255
    assert mask[404, 256] == 255 and mask[410, 256] == 0
    assert mask[480, 256] == 0  # neck not included
    assert mask[250, 450] == 0  # background


def _zero_rows(face: np.ndarray, crop: np.ndarray) -> int:
    """Rows of the 256 grid that lie above the 0.5 crop boundary by more than the blur radius."""
    fy1, fy2 = int(face[1]), int(face[3])
    crop_w, crop_h = int(crop[2] - crop[0]), int(crop[3] - crop[1])
    first = int(crop[1]) + int(crop_h * 0.5) - blur_kernel_size(crop_w) // 2 - 1
    return max(0, int(256 * (first - fy1) / (fy2 - fy1)) - 1)


def test_parsing_mask_on_demo_avatar(models_dir: Path, demo_avatar) -> None:
    model = load_bisenet(models_dir / BISENET_FILE)
    face, crop = demo_avatar.face_boxes[0], demo_avatar.crop_boxes[0]
    mask = parsing_jaw_mask(model, demo_avatar.frames[0], face, crop)
    assert mask.dtype == np.uint8 and mask.shape == (256, 256)
    rows = _zero_rows(face, crop)
    assert rows >= 80  # the crop is centred on the face box: about its upper half
    assert not mask[:rows].any()


class _AllSkin(torch.nn.Module):
    """Stands in for BiSeNet: every pixel is skin (class 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 19, *x.shape[2:])
        logits[:, 1] = 1
        return logits, logits, logits


def test_all_skin_mask_is_the_lower_face_box(demo_avatar) -> None:
    face, crop = demo_avatar.face_boxes[0], demo_avatar.crop_boxes[0]
    mask = parsing_jaw_mask(_AllSkin(), demo_avatar.frames[0], face, crop)
    rows = _zero_rows(face, crop)
    assert not mask[:rows].any()
    assert mask[200:240, 60:196].min() > 200  # lower middle of the face box: generated
    assert mask[-1, 128] > 64  # the blur softens the edge of the face box


def test_prepare_uses_bisenet_when_weights_exist(models_dir: Path, tmp_path: Path) -> None:
    store = AvatarStore(tmp_path / "avatars")
    avatar = prepare_avatar(demo_image(), "parsed", store, parsing_model_path=models_dir / BISENET_FILE)
    meta = json.loads((avatar.root / "avatar.json").read_text())
    assert meta["mask"] == "bisenet"
    masks = load_masks(avatar.root, meta)
    assert masks.shape == (1, 256, 256) and masks.dtype == np.uint8
    rows = {row.item: row for row in check_avatar(store, "parsed")}
    assert rows["mask"].status == "ok" and rows["mask"].detail.startswith("bisenet")
    assert rows["masks.npy"].status == "ok"

    fallback = prepare_avatar(demo_image(), "landmark", store, parsing_model_path=tmp_path / "absent.pth")
    assert json.loads((fallback.root / "avatar.json").read_text())["mask"] == "landmark"
    assert {row.item: row for row in check_avatar(store, "landmark")}["mask"].detail.startswith("landmark")


def test_prepare_refuses_a_broken_weights_file(tmp_path: Path) -> None:
    path = tmp_path / BISENET_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(b"truncated")
    store = AvatarStore(tmp_path / "avatars")
    with pytest.raises(EngineUnavailable, match="79999_iter.pth"):
        prepare_avatar(demo_image(), "broken", store, parsing_model_path=path)
    assert not store.exists("broken")
