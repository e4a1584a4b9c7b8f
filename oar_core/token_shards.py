"""WebDataset shards of token grids (local folder or s3:// prefix).

Layout under `prefix`:
  {split}-{i:06d}.tar   samples keyed `{split}-{global_index:08d}` with fields
                        tokens.npy (H,W) uint16, cls (label as text), id.txt (the ingest image id)
  meta.json             grid_h, grid_w, codebook_size, num_classes, class_names, counts, shards, shard_counts
Written and read with the `webdataset` library (oar_core/webds.py). Sample keys are index-based because ids are
relative paths ("Coat/a.b.png") and WebDataset splits the key from the field at the first dot; the real id travels
in id.txt."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from oar_core import webds
from oar_core.storage import is_remote, join, read_json
from oar_core.webds import list_shards

FIELDS = ("tokens.npy", "cls", "id.txt")


RERUN_HINT = "rerun `dvc repro tokenize` (or python -m pipeline.tokenize) to rewrite the shards"


def token_sample(split: str, g: int, tokens_HW, label, id_) -> dict:
    return {"__key__": f"{split}-{g:08d}", "tokens.npy": np.asarray(tokens_HW, dtype=np.uint16), "cls": int(label),
            "id.txt": str(id_)}


def read_shard(path) -> dict:
    """Samples of one shard, in order: {tokens (n,H,W) uint16, labels (n,) int64, ids list[str]}."""
    if not is_remote(path) and not Path(path).exists():
        raise FileNotFoundError(f"{path}: shard not found; {RERUN_HINT}")
    tokens, labels, ids = [], [], []
    for sample in webds.dataset([str(path)], RERUN_HINT):
        missing = [f for f in FIELDS if f not in sample]
        if missing:
            raise ValueError(f"{path}: sample {sample['__key__']} lacks {missing} (truncated or foreign shard); "
                             f"{RERUN_HINT}")
        try:
            tokens.append(np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False))
            labels.append(int(sample["cls"]))
        except ValueError as e:
            raise ValueError(f"{path}: sample {sample['__key__']} is unreadable ({e}); {RERUN_HINT}") from None
        ids.append(sample["id.txt"].decode())
    tokens_nHW = np.stack(tokens).astype(np.uint16) if tokens else np.zeros((0, 0, 0), np.uint16)
    return {"tokens": tokens_nHW, "labels": np.asarray(labels, dtype=np.int64), "ids": ids}


def load_meta(prefix) -> dict:
    return read_json(join(prefix, "meta.json"), f"shard metadata not found; {RERUN_HINT}", RERUN_HINT)


def load_tokens(prefix, split: str) -> dict:
    """All shards of a split, concatenated in order. Uses meta.json's shard list and per-shard counts when
    present, so a shard cut short exactly at a sample boundary (which tar cannot detect) is still caught."""
    try:
        meta = load_meta(prefix)
    except FileNotFoundError:
        meta = None
    if meta is not None:
        names = meta["shards"][split]
        paths = [join(prefix, n) for n in names]
        expected = meta.get("shard_counts", {}).get(split, [None] * len(names))
    else:
        paths = list_shards(prefix, split)
        expected = [None] * len(paths)
    if not paths:
        raise FileNotFoundError(f"{prefix}: no {split} shards found; {RERUN_HINT}")
    parts = []
    V = meta.get("codebook_size") if meta else None
    for path, n in zip(paths, expected):
        part = read_shard(path)
        if n is not None and len(part["ids"]) != n:
            raise ValueError(f"{path}: has {len(part['ids'])} samples, meta.json says {n} (truncated); {RERUN_HINT}")
        if V is not None and len(part["ids"]) and int(part["tokens"].max()) >= V:  # would index past the embedding
            raise ValueError(f"{path}: token id {int(part['tokens'].max())} >= codebook size {V} of meta.json (shards "
                             f"from another tokenizer?); {RERUN_HINT}")
        parts.append(part)
    parts = [pt for pt in parts if len(pt["ids"])]
    return {
        "tokens": np.concatenate([pt["tokens"] for pt in parts]),
        "labels": np.concatenate([pt["labels"] for pt in parts]),
        "ids": [i for pt in parts for i in pt["ids"]],
    }


def load_token_split(prefix, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(tokens_NN int64 in raster order, labels_N, ids) of one split, as the models take them."""
    d = load_tokens(prefix, split)
    tokens_NN = torch.from_numpy(d["tokens"].astype(np.int64)).flatten(1)
    return tokens_NN, torch.from_numpy(np.asarray(d["labels"], dtype=np.int64)), list(d["ids"])
