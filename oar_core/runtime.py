"""Where a process computes: its device (CPU, or its own GPU under torchrun / a fan-out), bf16 autocast on CUDA, and
the torchrun barrier."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def pick_device(worker_index: int | None = None) -> torch.device:
    """CPU, or this process's own GPU: LOCAL_RANK under torchrun, else the worker index of a fan-out (several
    workers on one machine each take their own card), modulo the visible cards (so a launcher that sets
    CUDA_VISIBLE_DEVICES per worker, leaving one card visible, also works)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", worker_index or 0))
    return torch.device("cuda", index % torch.cuda.device_count())


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 on CPU (where bf16 is faster but changes numerics we test against)."""
    if torch.device(device).type == "cuda":  # also accepts "cpu"/"cuda" strings (metrics' default device="cpu")
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
