"""WebDataset shards of token grids (local folder or s3:// prefix).

Layout under `prefix`:
  {split}-{i:06d}.tar   samples keyed `{split}-{global_index:08d}` with fields
                        tokens.npy (H,W) uint16, cls (label as text), id.txt (the ingest image id)
  meta.json             grid_h, grid_w, codebook_size, num_classes, class_names, counts, shards, shard_counts
Written and read with the `webdataset` library (oar_core/webds.py). Sample keys are index-based because ids are
relative paths ("Coat/a.b.png") and WebDataset splits the key from the field at the first dot; the real id travels
in id.txt.
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from oar_core import webds
from oar_core.data import SPLITS, image_batches, load_manifest
from oar_core.io import file_hash, is_remote, join, pick_device, read_json, remove_file, write_json
from oar_core.params import TokenizeParams
from oar_core.tokenizer import load_tokenizer, to_float_BCHW
from oar_core.webds import list_shards, shard_writer

FIELDS = ("tokens.npy", "cls", "id.txt")
RERUN_HINT = "rerun `dvc repro tokenize` (or python -m pipeline.tokenize) to rewrite the shards"


def write_shards(out_prefix, split: str, tokens_NHW: np.ndarray, labels, ids, shard_size: int) -> list[str]:
    """Write in-memory token grids as shards of `shard_size` samples (see webds.shard_writer); returns their paths."""
    if not (len(tokens_NHW) == len(labels) == len(ids)):
        raise ValueError(f"write_shards: tokens ({len(tokens_NHW)}), labels ({len(labels)}) and ids ({len(ids)}) "
                         f"differ in length")
    with shard_writer(out_prefix, split, shard_size) as (writer, published):
        for g, (tokens_HW, label, id_) in enumerate(zip(tokens_NHW, labels, ids)):
            writer.write(_sample(split, g, tokens_HW, label, id_))
    return [join(out_prefix, n) for n in published]


def _sample(split: str, g: int, tokens_HW, label, id_) -> dict:
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


def run_tokenize(p: TokenizeParams, ingest_dir="data/ingest", tokenizer="models/tokenizer.pt") -> dict:
    """Stream the ingest shards through the tokenizer into token shards, a batch at a time."""
    manifest = load_manifest(ingest_dir)
    device = pick_device()
    model = load_tokenizer(tokenizer, device)
    if model.channels != manifest["channels"] or model.image_size != manifest["image_size"]:
        raise ValueError(
            f"{tokenizer}: tokenizer is for {model.image_size}x{model.image_size}x{model.channels} images but "
            f"{ingest_dir} holds {manifest['image_size']}x{manifest['image_size']}x{manifest['channels']}; "
            f"rerun `dvc repro tokenizer` after changing ingest params"
        )
    t0 = time.time()
    meta_path = join(p.out, "meta.json")
    remove_file(meta_path)  # while shards are being replaced, no meta.json may vouch for them
    published = {}
    for split in SPLITS:
        g = 0
        bar = tqdm(total=manifest["counts"][split], desc=f"tokenize {split}", unit="img", leave=False, mininterval=1.0)
        with shard_writer(p.out, split, p.shard_size) as (writer, published[split]):
            for images_BHWC, labels_B, ids in image_batches(ingest_dir, split, p.batch_size):
                tokens_BHW = model.encode(to_float_BCHW(images_BHWC, device)).cpu().numpy()
                for tokens_HW, label, id_ in zip(tokens_BHW, labels_B, ids):
                    writer.write(_sample(split, g, tokens_HW, label, id_))
                    g += 1
                bar.update(len(ids))
        bar.close()
    meta = {
        "grid_h": model.grid, "grid_w": model.grid, "codebook_size": model.codebook_size,
        "num_classes": manifest["num_classes"], "class_names": manifest["class_names"],
        "image_size": manifest["image_size"], "channels": manifest["channels"],
        "counts": {s: sum(published[s].values()) for s in SPLITS}, "shards": {s: list(published[s]) for s in SPLITS},
        "shard_counts": {s: list(published[s].values()) for s in SPLITS},
        "tokenizer_hash": file_hash(tokenizer),
    }
    write_json(meta_path, meta)  # last: readers treat meta.json as "the shard set is complete"
    return {**meta, "out": p.out, "seconds": round(time.time() - t0, 2)}


def load_token_split(prefix, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(tokens_NN int64 in raster order, labels_N, ids) of one split, as the models take them."""
    d = load_tokens(prefix, split)
    tokens_NN = torch.from_numpy(d["tokens"].astype(np.int64)).flatten(1)
    return tokens_NN, torch.from_numpy(np.asarray(d["labels"], dtype=np.int64)), list(d["ids"])
