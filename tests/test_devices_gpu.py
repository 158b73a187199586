"""The device pool on real GPUs (skipped without CUDA): every visible GPU in one pool.

Checks what CPU tests cannot: a MuseTalk engine per GPU (CUDA graphs captured on each GPU's own
stream), the same requests giving the same pictures on every GPU, calibration on the GPU, a real
``torch.OutOfMemoryError`` taking one GPU out of rotation while the others compose, and torch's
error for a device-side assert counting as a device fault.

Tiny random weights by default (a minute or two); ``DEVICE_POOL_FULL_SIZE=1`` uses the full-size
architecture and batch 48 and prints each GPU's calibration table (what docs/design-notes.md
quotes): ``DEVICE_POOL_FULL_SIZE=1 pytest -m gpu -s tests/test_devices_gpu.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_pool_of_every_gpu(tmp_path: Path) -> None:
    from pipeline.avatar.store import AvatarStore
    from pipeline.engines.base import FrameRequest
    from pipeline.engines.musetalk.engine import MuseTalkEngine
    from pipeline.engines.musetalk.synthetic import write_synthetic_checkpoints
    from pipeline.live.devices import DevicePool
    from pipeline.live.faults import DeviceFailed

    full = os.environ.get("DEVICE_POOL_FULL_SIZE") == "1"
    batch = 48 if full else 8
    models = write_synthetic_checkpoints(tmp_path / "models", tiny=not full, seed=0, dtype=torch.float16)
    avatar = AvatarStore(tmp_path / "avatars").save("gpu", meta=_meta(), overwrite=True, **_arrays())
    names = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    pool = DevicePool(
        names,
        lambda device: MuseTalkEngine(models_dir=models, device=device, dtype="fp16", batch_size=batch),
        engine_name="musetalk",
        batch_size=batch,
        processing_seconds=0.25,
        headroom=0.8,
    )
    started = time.perf_counter()
    pool.start(avatar)
    try:
        described = pool.describe()
        print(json.dumps({"start_seconds": round(time.perf_counter() - started, 1), "devices": described}, indent=1))
        assert all(d["state"] == "ready" and d["capacity_source"] == "calibrated" for d in described)

        gen = torch.Generator().manual_seed(1)
        requests = [FrameRequest(avatar, i % avatar.frame_count, torch.randn(50, 384, generator=gen)) for i in range(6)]
        pictures = {name: pool.devices[name].engine.compose(requests) for name in names}
        for name in names[1:]:  # fp16 on different GPUs: equal up to rounding
            worst = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(pictures[names[0]], pictures[name]))
            assert worst <= 8, f"{name} differs from {names[0]} by {worst}"

        heard: list[tuple[str, str]] = []
        pool.add_failure_listener(lambda name, reason: heard.append((name, reason)))
        last = pool.devices[names[-1]]
        engine = last.engine
        # the worker runs a batch through compose_staged (stage one on its thread): out of memory there
        engine.compose_staged = lambda r: [torch.empty(1 << 46, dtype=torch.uint8, device=engine.device)]  # type: ignore[method-assign]
        with pytest.raises(DeviceFailed, match=f"device {last.name} failed: OutOfMemoryError: CUDA out of memory"):
            last.worker.submit(requests[0], time.monotonic(), "s").result(60)
        assert last.state == "failed" and heard and heard[0][0] == last.name
        if len(names) > 1:
            assert pool.devices[names[0]].worker.submit(requests[0], time.monotonic(), "t").result(60).ndim == 3
    finally:
        pool.close()

    # a device-side assert poisons the CUDA context: in a child process
    code = (
        "import torch\nfrom pipeline.live.faults import is_device_fault\n"
        "x = torch.zeros(4, device='cuda')\n"
        "try:\n    x[torch.tensor([9], device='cuda')]; torch.cuda.synchronize()\n"
        "except Exception as exc:\n    print(type(exc).__name__, is_device_fault(exc))\n"
    )
    root = Path(__file__).resolve().parent.parent
    child = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=root, capture_output=True, text=True, timeout=120
    )
    assert child.stdout.split()[-1:] == ["True"], child.stdout + child.stderr


def _arrays(n: int = 8) -> dict[str, np.ndarray]:
    """A 256x256-faced synthetic avatar: a gradient picture, a centred face box, a soft mask."""
    frames = np.zeros((n, 512, 512, 3), np.uint8)
    frames[..., 0] = np.linspace(0, 255, 512, dtype=np.uint8)[None, None, :]
    frames[..., 1] = np.linspace(0, 255, 512, dtype=np.uint8)[None, :, None]
    boxes = np.tile(np.array([128, 128, 384, 384], np.int32), (n, 1))
    mask = np.zeros((256, 256), np.uint8)
    mask[128:, 32:224] = 255
    return {
        "frames": frames,
        "face_boxes": boxes,
        "crop_boxes": np.tile(np.array([64, 64, 448, 448], np.int32), (n, 1)),
        "landmarks": np.zeros((n, 68, 2), np.float32),
        "detected": np.ones(n, np.uint8),
        "masks": np.repeat(mask[None], n, 0),
    }


def _meta(n: int = 8) -> dict:
    from pipeline.avatar.model import FORMAT_VERSION

    return {
        "format_version": FORMAT_VERSION, "id": "gpu", "source": {"name": "synthetic", "sha256": ""}, "fps": 25,
        "frame_count": n, "cycle_length": 2 * n - 2, "width": 512, "height": 512,
        "created": "2026-01-01T00:00:00Z", "mask": "synthetic",
    }
