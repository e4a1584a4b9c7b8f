"""Stage `extract_orders`: per-image generation orders from the any-order model, as Parquet parts.

    python -m pipeline.extract_orders
    torchrun --nproc_per_node 4 -m pipeline.extract_orders       # one process per GPU, same table as one process

Fan out over machines with --num-workers N --worker-index i (each writes its own shards' parts)."""
from __future__ import annotations

import os
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from oar_core.extract import extract_batch, random_order_bits
from oar_core.model import load_gpt
from oar_core.order_table import part_is_current, write_part
from oar_core.params import ExtractParams
from oar_core.runtime import autocast, pick_device
from oar_core.storage import file_hash, remove_stale_temps
from oar_core.token_shards import load_meta, read_shard
from oar_core.webds import list_shards
from pipeline._stage import stage_main


def run_extract(p: ExtractParams, shards: str, num_workers: int = 1, worker_index: int = 0,
                only_parts: list[str] | None = None) -> dict:
    """Write one Parquet part per shard (skipping parts already current); this worker takes every
    `num_workers`-th shard starting at `worker_index`, so workers on many machines share one table. Under
    `torchrun` each rank is a worker (on its own GPU): parts depend only on their shard, so the table is
    byte-identical to a one-process run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if num_workers > 1:
            raise ValueError("launched by torchrun and given --num-workers: use one way of splitting the work")
        num_workers, worker_index = world, int(os.environ["RANK"])
    if not 0 <= worker_index < num_workers:
        raise ValueError(f"worker_index {worker_index} must be in [0, num_workers={num_workers})")
    device = pick_device(worker_index)
    model, _ = load_gpt(p.checkpoint, device)
    meta = load_meta(shards)
    if (model.cfg.grid_h, model.cfg.grid_w) != (meta["grid_h"], meta["grid_w"]):
        raise ValueError(f"{p.checkpoint}: model grid {model.cfg.grid_h}x{model.cfg.grid_w} does not match shards "
                         f"{meta['grid_h']}x{meta['grid_w']}; retrain it on these shards")
    if model.cfg.vocab_size != meta["codebook_size"]:  # a smaller vocab would crash mid-extraction on a gather
        raise ValueError(f"{p.checkpoint}: model vocab {model.cfg.vocab_size} does not match the shards' codebook "
                         f"{meta['codebook_size']} ({shards}); retrain it on these shards")
    ckpt_hash, params_hash = file_hash(p.checkpoint), p.digest()
    all_jobs = [(split, s) for split in p.splits for s in list_shards(shards, split)]
    jobs = [j for i, j in enumerate(all_jobs) if i % num_workers == worker_index]
    if only_parts is not None:
        jobs = [j for j in jobs if Path(j[1]).stem in only_parts]
    # parts of shards that no longer exist would poison the table; one process sees the whole job list (workers
    # started by hand on several machines may each see only their own shards, so they leave the table alone)
    if (num_workers == 1 or world > 1 and worker_index == 0) and only_parts is None:
        remove_stale_temps(p.out_dir)  # temp files of a killed earlier run; a live writer's are kept
        keep = {Path(s).stem for _, s in all_jobs}
        for old in Path(p.out_dir).glob("*.parquet"):
            if old.stem not in keep:
                old.unlink()
    done = skipped = images = tied = 0
    t0 = time.time()
    for split, shard in jobs:
        part = Path(p.out_dir) / f"{Path(shard).stem}.parquet"
        d = read_shard(shard)  # a part is current only if it holds exactly its shard's ids
        if part_is_current(part, ckpt_hash, params_hash, d["ids"]):
            skipped += 1
            continue
        tokens_NN = torch.from_numpy(d["tokens"].astype(np.int64)).flatten(1)
        labels_N = torch.from_numpy(np.asarray(d["labels"], dtype=np.int64))
        # per shard, so shards do not share random orders, and from its name, so any worker draws the same
        g = torch.Generator().manual_seed(zlib.crc32(f"{p.seed}/{part.stem}".encode()))
        cols = {"order": [], "scores": [], "nll": [], "nll_random": []}
        for i in tqdm(range(0, len(tokens_NN), p.batch_size), desc=f"extract {part.stem}", unit="batch", mininterval=2):
            tok_BN, lab_B = tokens_NN[i : i + p.batch_size].to(device), labels_N[i : i + p.batch_size].to(device)
            with autocast(device):
                out = extract_batch(model, tok_BN, lab_B, p.location, g, candidate_chunk_mb=p.candidate_chunk_mb)
                nll_random_B = random_order_bits(model, tok_BN, lab_B, g)
            tied += int((out["logq"] < 0).sum())  # a greedy step's log q is -log(number of tied best positions)
            cols["order"].append(out["order"].cpu())
            cols["scores"].append(out["scores"].cpu())
            cols["nll"].append(out["nll_bits"].cpu())
            cols["nll_random"].append(nll_random_B.cpu())
        n = len(labels_N)
        table = pa.table({
            "image_id": pa.array(d["ids"], pa.string()),
            "split": pa.array([split] * n, pa.string()),
            "shard": pa.array([Path(shard).name] * n, pa.string()),
            "label": pa.array(labels_N.numpy(), pa.int64()),
            "permutation": pa.array(list(torch.cat(cols["order"]).numpy().astype(np.uint16)), pa.list_(pa.uint16())),
            "step_scores": pa.array(list(torch.cat(cols["scores"]).numpy().astype(np.float32)), pa.list_(pa.float32())),
            "nll_extracted": pa.array(torch.cat(cols["nll"]).numpy().astype(np.float32), pa.float32()),
            "nll_random": pa.array(torch.cat(cols["nll_random"]).numpy().astype(np.float32), pa.float32()),
            "checkpoint_hash": pa.array([ckpt_hash] * n, pa.string()),
            "params_hash": pa.array([params_hash] * n, pa.string()),
        })
        write_part(part, table, ckpt_hash, params_hash)
        done, images = done + 1, images + n
    elapsed = time.time() - t0
    greedy_steps = images * (model.cfg.n_tokens - 1) if p.location.temperature == 0 else 0  # the last has no choice
    return {"parts_written": done, "parts_skipped": skipped, "images": images,
            "images_per_s": round(images / elapsed, 2) if images else None, "checkpoint_hash": ckpt_hash,
            "tied_steps": tied if greedy_steps else None,
            "tied_step_fraction": round(tied / greedy_steps, 6) if greedy_steps else None}


def _args(ap):
    ap.add_argument("--shards", help="default: from params.yaml")
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--worker-index", type=int, default=0)


def main(argv=None):
    return stage_main(__doc__, "extract_orders",
                      lambda p, a: run_extract(p, a.shards, a.num_workers, a.worker_index), argv, _args)


if __name__ == "__main__":
    main()
