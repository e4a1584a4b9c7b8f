"""Atomic artifact writes, local-or-S3 paths, checkpoints."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import fsspec
import torch


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def fs_for(path: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path for a local path or URL (s3:// uses s3fs,
    which honours AWS_ENDPOINT_URL / FSSPEC_S3_ENDPOINT_URL for S3-compatible servers)."""
    fs, _, (p,) = fsspec.get_fs_token_paths(str(path))
    return fs, p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary local path beside `path`; rename it over `path` only if the block succeeds,
    so a half-written file is never visible under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Atomic for local paths; for S3 a single PUT is already all-or-nothing."""
    if is_remote(path):
        fs, p = fs_for(path)
        with fs.open(p, "wb") as f:
            f.write(data)
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def read_bytes(path: str | os.PathLike) -> bytes:
    fs, p = fs_for(path)
    with fs.open(p, "rb") as f:
        return f.read()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes_atomic(path, buf.getvalue())


def load_torch(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found; run the stage that produces it (e.g. `dvc repro`)") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise ValueError(f"{path}: unreadable {what} ({type(e).__name__}: {e}); delete it and rerun its stage") from None


def file_hash(path: str | os.PathLike) -> str:
    return hashlib.sha256(read_bytes(path)).hexdigest()[:16]


def list_files(prefix: str | os.PathLike, pattern: str) -> list[str]:
    """Sorted files matching `pattern` under a local folder or URL prefix, returned as usable paths/URLs."""
    fs, p = fs_for(prefix)
    found = sorted(fs.glob(f"{p.rstrip('/')}/{pattern}"))
    if is_remote(prefix):
        scheme = str(prefix).split("://", 1)[0]
        return [f"{scheme}://{f}" for f in found]
    return found


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 on CPU (where bf16 is faster but changes numerics we test against)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
