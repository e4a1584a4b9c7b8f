"""Checkpoint files: tensors and plain data written atomically, read back with a clear line when missing or foreign."""
from __future__ import annotations

import io
import os
from typing import Any

import torch

from oar_core.storage import read_bytes, write_bytes_atomic


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes_atomic(path, buf.getvalue())


def load_torch(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found; run the stage that produces it "
                                f"(e.g. `dvc repro`)") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise ValueError(f"{path}: unreadable {what} ({type(e).__name__}: {e}); delete it and rerun its "
                         f"stage") from None
