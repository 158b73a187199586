"""Prepares a load test of the MuseTalk engine on a machine that has none of its data: synthetic
weights, an avatar, and the server's config file. Run by bench/device/gpu_load.sh (from the
repository root); it can be run alone:

    python bench/device/prepare.py --work /tmp/lipstream-load --devices cuda:0 [--avatar demo]
                                   [--set sessions.processing_seconds=0.25 ...] [--tiny-cpu]

- Weights: full-size MuseTalk v1.5 with random values (pipeline/engines/musetalk/synthetic.py,
  fp16, the official file layout) in ``WORK/models``, written once (kept if already there).
  ``--tiny-cpu``: the micro configuration the CPU tests use, for a dry run of the kit on a CPU.
- Avatar, in ``WORK/avatars``: ``demo`` is the repository's prepared demo avatar (512x512, one
  frame, dlib landmarks and mask), copied from ``avatars/demo`` (carry it: the device machine
  has no dlib to prepare it); ``synth512`` / ``synth720`` are built here without dlib as
  bench/musetalk_engine.py builds its bench avatar (the astronaut photograph, a synthetic face
  box and jaw mask, 50 frames shifted a little each), 512x512 or 1280x720, with lip landmarks
  placed in the jaw mask so that bench/load.py watches the generated mouth region.
- Config, ``WORK/server.yaml``: configs/gpu.yaml (or ``--base``) with the models and avatars
  directories, the avatar as the default (its latents are made at start), the devices (as
  ``engine.devices``, a list, or the older ``engine.device`` when the server's config still has
  that: server/config.py decides), and ``--set`` overrides (YAML values). bench/load.py sets host,
  port, loopback WebRTC and max_sessions itself.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

AVATARS = {"demo": None, "synth512": (512, 512), "synth720": (1280, 720)}


def log(*args: Any) -> None:
    print(f"[prepare {time.strftime('%H:%M:%S')}]", *args, flush=True)


def write_weights(models: Path, tiny: bool) -> None:
    marker = models / "musetalkV15" / "unet.pth"
    if marker.is_file():
        log(f"weights already in {models}")
        return
    import torch

    from pipeline.engines.musetalk.synthetic import MICRO_OVERRIDES, write_synthetic_checkpoints

    t = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if tiny:
        write_synthetic_checkpoints(models, tiny=True, seed=2, overrides=MICRO_OVERRIDES)
    else:
        write_synthetic_checkpoints(models, tiny=False, seed=0, dtype="fp16")
    size = sum(f.stat().st_size for f in models.rglob("*") if f.is_file())
    log(f"wrote {'micro' if tiny else 'full-size'} synthetic weights ({size / 1e9:.2f} GB) in "
        f"{time.perf_counter() - t:.1f} s")


def synthetic_avatar(avatars: Path, avatar_id: str, width: int, height: int) -> None:
    """bench/musetalk_engine.py's bench avatar at this size, with lip landmarks in the jaw mask."""
    from bench.musetalk_engine import FPS, make_avatar_arrays
    from pipeline.avatar.model import FORMAT_VERSION
    from pipeline.avatar.store import AvatarStore

    arrays = make_avatar_arrays(width=width, height=height)
    boxes = arrays["face_boxes"].astype(np.float32)
    n = len(boxes)
    # 20 lip points (48..67) on an ellipse at 70-85 % of the face box's height, 30-70 % of its
    # width: inside the jaw mask, where the generated face replaces the photograph.
    angle = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    fx = 0.5 + 0.2 * np.cos(angle)
    fy = 0.775 + 0.075 * np.sin(angle)
    w = (boxes[:, 2] - boxes[:, 0])[:, None]
    h = (boxes[:, 3] - boxes[:, 1])[:, None]
    lips = np.stack([boxes[:, :1] + fx[None] * w, boxes[:, 1:2] + fy[None] * h], axis=-1)
    arrays["landmarks"][:, 48:68] = lips.astype(np.float32)
    meta = {
        "format_version": FORMAT_VERSION,
        "id": avatar_id,
        "source": {"name": f"astronaut-{width}x{height}-synthetic-box", "sha256": ""},
        "fps": FPS,
        "frame_count": n,
        "cycle_length": 2 * n - 2,
        "width": width,
        "height": height,
        "created": "2026-01-01T00:00:00Z",
        "mask": "synthetic",
    }
    AvatarStore(avatars).save(avatar_id, meta=meta, overwrite=True, **arrays)


def prepare_avatar(avatars: Path, avatar_id: str) -> None:
    avatars.mkdir(parents=True, exist_ok=True)
    if avatar_id == "demo":
        source = ROOT / "avatars" / "demo"
        if not (source / "avatar.json").is_file():
            raise SystemExit("avatars/demo is missing: prepare it where dlib is (bench/device/fetch_wheels.sh "
                             "does) and carry it, or use --avatar synth512")
        if (avatars / "demo").resolve() != source.resolve():
            shutil.rmtree(avatars / "demo", ignore_errors=True)
            shutil.copytree(source, avatars / "demo")
    else:
        width, height = AVATARS[avatar_id]
        synthetic_avatar(avatars, avatar_id, width, height)
    meta = json.loads((avatars / avatar_id / "avatar.json").read_text())
    log(f"avatar {avatar_id}: {meta['width']}x{meta['height']}, {meta['frame_count']} frames, in {avatars}")


def parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def write_config(args: argparse.Namespace, models: Path, avatars: Path) -> Path:
    import yaml

    from server.config import EngineConfig

    data: dict[str, Any] = yaml.safe_load(args.base.read_text()) or {}
    engine = data.setdefault("engine", {})
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    engine.pop("device", None)
    engine.pop("devices", None)
    fields = EngineConfig.model_fields
    if "devices" in fields:
        engine["devices"] = devices
    elif len(devices) == 1:
        engine["device"] = devices[0]
    else:
        raise SystemExit(f"this server's config has engine.device (one device), not engine.devices: "
                         f"cannot run on {devices}")
    engine["name"] = "musetalk"
    engine["models_dir"] = str(models)
    if args.tiny_cpu:
        engine.update({"dtype": "fp32", "batch_size": 8})
        data.setdefault("sessions", {})["processing_seconds"] = 2.0
        data.setdefault("limits", {})["audio_buffer_seconds"] = 8
    data.setdefault("avatars", {}).update({"dir": str(avatars), "default": args.avatar})
    data.setdefault("server", {})["log_level"] = args.log_level
    for item in args.set:
        key, _, value = item.partition("=")
        parts = key.strip().split(".")
        if not _ or len(parts) < 2:
            raise SystemExit(f"--set {item!r}: expected section.key=value")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = parse_value(value)
    path = args.work / "server.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    log(f"config {path}:\n" + yaml.safe_dump(data, sort_keys=False).rstrip())
    from server.config import load_settings

    load_settings(path)  # a wrong key fails here, before minutes of server start
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lipstream-load"))
    parser.add_argument("--devices", default="cuda:0", help="comma-separated, e.g. cuda:0,cuda:1")
    parser.add_argument("--avatar", choices=sorted(AVATARS), default="demo")
    parser.add_argument("--base", type=Path, default=ROOT / "configs" / "gpu.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--log-level", default="info", help="the server's (its log comes back in results.tgz)")
    parser.add_argument("--tiny-cpu", action="store_true", help="micro weights, fp32, for a CPU dry run")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    models, avatars = args.work / ("models-micro" if args.tiny_cpu else "models"), args.work / "avatars"
    write_weights(models, args.tiny_cpu)
    prepare_avatar(avatars, args.avatar)
    write_config(args, models, avatars)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
