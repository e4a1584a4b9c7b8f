"""Each process on its own device: torchrun ranks by LOCAL_RANK, fan-out workers by their index."""
from __future__ import annotations

import pytest
import torch

from oar_core import runtime as io
from oar_core.params import ExtractParams
from pipeline import extract_orders as extract


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert io.pick_device(5) == torch.device("cpu")


def test_workers_and_ranks_get_their_own_card(four_gpus, monkeypatch):
    assert io.pick_device() == torch.device("cuda", 0)
    assert [io.pick_device(i) for i in range(6)] == [torch.device("cuda", i % 4) for i in range(6)]
    monkeypatch.setenv("LOCAL_RANK", "3")  # torchrun's rank wins over a worker index
    assert io.pick_device(1) == torch.device("cuda", 3)


def test_extraction_worker_asks_for_its_own_device(monkeypatch):
    asked = []

    class Stop(Exception):
        pass

    def record(*args):
        asked.append(args)
        raise Stop

    monkeypatch.setattr(extract, "pick_device", record)
    with pytest.raises(Stop):
        extract.run_extract(ExtractParams(), "unused", num_workers=3, worker_index=2)
    assert asked == [(2,)]
