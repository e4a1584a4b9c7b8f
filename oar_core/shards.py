"""WebDataset shards of token grids (local folder or s3:// prefix).

Layout under `prefix`:
  {split}-{i:06d}.tar   samples keyed `{split}-{global_index:08d}` with fields
                        tokens.npy (H,W) uint16, cls (label as text), id.txt (the ingest image id)
  meta.json             grid_h, grid_w, codebook_size, num_classes, class_names, counts, shards, shard_counts
Sample keys are index-based because ids are relative paths ("Coat/a.b.png") and WebDataset splits the
key from the field at the first dot; the real id travels in id.txt.
"""
from __future__ import annotations

import io
import tarfile
import time

import numpy as np
import torch

from oar_core.data import load_manifest, load_split
from oar_core.io import (
    file_hash,
    fs_for,
    is_remote,
    join,
    list_files,
    pick_device,
    read_bytes,
    read_json,
    storage_errors,
    write_bytes_atomic,
    write_json,
)
from oar_core.params import TokenizeParams
from oar_core.tokenizer import encode_all, load_tokenizer

FIELDS = ("tokens.npy", "cls", "id.txt")
RERUN_HINT = "rerun `dvc repro tokenize` (or python -m pipeline.tokenize) to rewrite the shards"


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """An in-memory tar; mtime/uid fixed so the same tokens always give byte-identical shards (stable DVC hashes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields in samples:
            for field, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def write_shards(out_prefix, split: str, tokens_NHW: np.ndarray, labels, ids, shard_size: int) -> list[str]:
    """Write one split as shards of `shard_size` samples; each shard appears atomically (local temp + rename,
    S3 single PUT). Shards of this split left over from an earlier, larger run are removed."""
    tokens_NHW = np.asarray(tokens_NHW, dtype=np.uint16)
    labels = np.asarray(labels, dtype=np.int64)
    ids = [str(i) for i in ids]
    if not (len(tokens_NHW) == len(labels) == len(ids)):
        raise ValueError(f"write_shards: tokens ({len(tokens_NHW)}), labels ({len(labels)}) and ids ({len(ids)}) "
                         f"differ in length")
    paths = []
    for i, start in enumerate(range(0, len(ids), shard_size)):
        samples = [
            (f"{split}-{g:08d}", {"tokens.npy": _npy_bytes(tokens_NHW[g]), "cls": str(int(labels[g])).encode(),
                                  "id.txt": ids[g].encode()})
            for g in range(start, min(start + shard_size, len(ids)))
        ]
        path = join(out_prefix, shard_name(split, i))
        write_bytes_atomic(path, _tar_bytes(samples))
        paths.append(path)
    _remove_stale(out_prefix, split, keep=set(paths))
    return paths


def _remove_stale(prefix, split: str, keep: set[str]) -> None:
    for path in list_shards(prefix, split):
        if path not in keep and join(prefix, path.rsplit("/", 1)[-1]) not in keep:
            fs, p = fs_for(path)
            fs.rm(p)


def list_shards(prefix, split: str) -> list[str]:
    fs, _ = fs_for(prefix)
    if is_remote(prefix):
        fs.invalidate_cache()  # another process (or instance) may have written shards since we last listed
    try:
        return list_files(prefix, f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar")
    except FileNotFoundError:
        return []


def read_shard(path) -> dict:
    """Samples of one shard, in order: {tokens (n,H,W) uint16, labels (n,) int64, ids list[str]}."""
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: shard not found; {RERUN_HINT}") from None
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                key, _, field = member.name.partition(".")
                f = tar.extractfile(member)
                if f is None:
                    continue
                samples.setdefault(key, {})[field] = f.read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{path}: corrupt or truncated shard ({type(e).__name__}: {e}); {RERUN_HINT}") from None
    tokens, labels, ids = [], [], []
    for key in sorted(samples):
        fields = samples[key]
        missing = [f for f in FIELDS if f not in fields]
        if missing:
            raise ValueError(f"{path}: sample {key} lacks {missing} (truncated or foreign shard); {RERUN_HINT}")
        try:
            tokens.append(np.load(io.BytesIO(fields["tokens.npy"]), allow_pickle=False))
            labels.append(int(fields["cls"]))
        except ValueError as e:
            raise ValueError(f"{path}: sample {key} is unreadable ({e}); {RERUN_HINT}") from None
        ids.append(fields["id.txt"].decode())
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
    with storage_errors(meta_path, "replace"):
        fs, mp = fs_for(meta_path)
        if fs.exists(mp):
            fs.rm(mp)  # while shards are being replaced, no meta.json may vouch for them
    shards, shard_counts, counts = {}, {}, {}
    for split in ("train", "test"):
        images_NHWC, labels_N, ids_N = load_split(ingest_dir, split)
        tokens_NHW = encode_all(model, images_NHWC, device, desc=f"tokenize {split}")
        paths = write_shards(p.out, split, tokens_NHW, labels_N, ids_N, p.shard_size)
        shards[split] = [path.rsplit("/", 1)[-1] for path in paths]
        shard_counts[split] = [min(p.shard_size, len(ids_N) - i * p.shard_size) for i in range(len(paths))]
        counts[split] = int(len(ids_N))
    meta = {
        "grid_h": model.grid, "grid_w": model.grid, "codebook_size": model.codebook_size,
        "num_classes": manifest["num_classes"], "class_names": manifest["class_names"],
        "image_size": manifest["image_size"], "channels": manifest["channels"],
        "counts": counts, "shards": shards, "shard_counts": shard_counts,
        "tokenizer_hash": file_hash(tokenizer),
    }
    write_json(meta_path, meta)  # last: readers treat meta.json as "the shard set is complete"
    return {**meta, "out": p.out, "seconds": round(time.time() - t0, 2)}


def load_token_split(prefix, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(tokens_NN int64 in raster order, labels_N, ids) of one split, as the models take them."""
    d = load_tokens(prefix, split)
    tokens_NN = torch.from_numpy(d["tokens"].astype(np.int64)).flatten(1)
    return tokens_NN, torch.from_numpy(np.asarray(d["labels"], dtype=np.int64)), list(d["ids"])
