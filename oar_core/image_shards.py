"""The ingest stage's output, read: WebDataset image shards {split}-NNNNNN.tar ({png, cls, id.txt}) listed by
manifest.json, streamed as uint8 batches (in order, or shuffled for training)."""
from __future__ import annotations

import itertools
import os
from typing import Iterator

import numpy as np
import torch

from oar_core import webds
from oar_core.storage import join, read_json

SPLITS = ("train", "test")


INGEST_RERUN = "rerun `dvc repro ingest` (or python -m pipeline.ingest)"


def load_manifest(in_dir: str | os.PathLike) -> dict:
    return read_json(join(str(in_dir), "manifest.json"),
                     "ingest manifest not found; run `dvc repro ingest` (or python -m pipeline.ingest)",
                     "rerun `dvc repro ingest` (or python -m pipeline.ingest)")


def _stack(samples: list[tuple]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    images, labels, ids = zip(*samples)
    images_BHWC = np.stack(images)
    return (images_BHWC[..., None] if images_BHWC.ndim == 3 else images_BHWC), np.asarray(labels, np.int64), list(ids)


def image_batches(in_dir, split: str, batch_size: int, seed: int | None = None, buffer: int = 0
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """Stream one split of the ingest shards as (images_BHWC uint8, labels_B int64, ids) batches: in order, or
    shuffled with `seed` (shard order, then a `buffer`-sample shuffle of the still-encoded samples). Memory: one batch
    plus the buffer, whatever the size of the split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    manifest = load_manifest(in_dir)
    urls = [join(str(in_dir), name) for name in manifest["shards"][split]]
    ds = webds.dataset(urls, INGEST_RERUN, seed)
    if seed is not None and buffer > 1:
        ds = ds.shuffle(buffer, initial=buffer, seed=seed)
    ds = ds.decode("l8" if manifest["channels"] == 1 else "rgb8").to_tuple("png", "cls", "id.txt")
    n = 0
    for images_BHWC, labels_B, ids in ds.batched(batch_size, collation_fn=_stack):
        n += len(ids)
        yield images_BHWC, labels_B, ids
    if n != manifest["counts"][split]:
        raise ValueError(f"{in_dir}: the {split} shards hold {n} images, manifest.json says "
                         f"{manifest['counts'][split]} (a truncated or replaced shard); {INGEST_RERUN}")


def endless_batches(in_dir, split: str, batch_size: int, seed: int, buffer: int) -> Iterator[np.ndarray]:
    """Shuffled image batches for training, epoch after epoch, each epoch shuffled by its own seed."""
    for epoch in itertools.count():
        for images_BHWC, _, _ in image_batches(in_dir, split, batch_size, seed + epoch, buffer):
            yield images_BHWC


def take(in_dir, split: str, idx) -> np.ndarray:
    """images_NHWC[idx] of one split, streamed: only the chosen images are ever held."""
    slot = {int(i): k for k, i in enumerate(idx)}
    out, start = [None] * len(slot), 0
    for images_BHWC, _, _ in image_batches(in_dir, split, 1000):
        for j in range(len(images_BHWC)):
            if start + j in slot:
                out[slot[start + j]] = images_BHWC[j]
        start += len(images_BHWC)
    return np.stack(out)


def load_split(in_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images_NHWC uint8, labels_N int64, ids_N str) of one split, all in memory (small splits; stages stream)."""
    batches = list(image_batches(in_dir, split, 1000))
    return (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]),
            np.asarray([i for b in batches for i in b[2]], dtype=str))


def to_float_BCHW(images_NHWC: np.ndarray | torch.Tensor, device=None) -> torch.Tensor:
    """uint8 (N,H,W,C) images -> float (N,C,H,W) in [0, 1], as the tokenizer and the feature network take them."""
    x = torch.as_tensor(np.asarray(images_NHWC)) if not torch.is_tensor(images_NHWC) else images_NHWC
    return x.to(device).permute(0, 3, 1, 2).float().div_(255.0)
