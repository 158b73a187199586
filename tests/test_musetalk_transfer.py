"""Host <-> device copies of the engine's batches (pipeline/engines/musetalk/transfer.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.engines.musetalk.transfer import index_tensor, take_asleep, to_host, wait_asleep

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_index_tensor_and_to_host_round_trip(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dev = torch.device(device)
    idx = index_tensor([3, 0, 2], dev)
    assert idx.dtype == torch.int64 and idx.device.type == dev.type
    table = torch.arange(4 * 5 * 3, dtype=torch.uint8).view(4, 5, 3).to(dev)
    # a gathered, permuted, flipped batch: what the blend and generate hand over
    out = to_host(table[idx].permute(0, 2, 1).flip(-1))
    want = np.arange(60, dtype=np.uint8).reshape(4, 5, 3)[[3, 0, 2]].transpose(0, 2, 1)[..., ::-1]
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, want)
    if device == "cuda":
        assert torch.from_numpy(out).is_pinned()  # the copy was asynchronous, waited on an event


def test_index_tensor_rejects_what_is_not_an_index() -> None:
    with pytest.raises((TypeError, RuntimeError, ValueError)):
        index_tensor([1.5, "a"], torch.device("cpu"))  # type: ignore[list-item]


@pytest.mark.gpu
def test_wait_asleep_returns_when_the_streams_work_is_done() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(int(2e8))  # ~0.1 s of GPU clock cycles
        x = torch.ones(1000, device="cuda") * 3
    assert not stream.query()
    take_asleep()
    wait_asleep(stream)
    assert stream.query() and float(x.sum()) == 3000.0
    slept = take_asleep()  # this thread's sleep in it, for the engine's batch_host stage; then reset
    assert 0.0 < slept < 10.0 and take_asleep() == 0.0
