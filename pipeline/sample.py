"""Stage `sample`: generate class-balanced images from every model, in its order, and keep the orders.

Per model (params `sample.models`: name, checkpoint, order, location rule, parallel steps) it writes under
`<out_dir>/<name>/`:
    00000.png ...           the decoded images (uint8, the ingest size and channels)
    orders.parquet          index, label, file, order list<uint16> (position per step), scores list<float32>,
                            tokens list<uint16> (raster layout; lets the report redraw partial canvases)
    grid.png                a sample grid, one column per class
    meta.json               checkpoint, order and params (evaluate reads it to know what it scores)
Deterministic: every batch draws from its own generator seeded by (seed, model name, batch index), so the images
are the same whether one process draws them or `torchrun --nproc_per_node K -m pipeline.sample` splits them."""
from __future__ import annotations

import math
import os
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from tqdm import tqdm

from oar_core.decode import generate
from oar_core.figures import grid_from_folder, png_bytes, to_uint8_NHWC
from oar_core.live import log_per_key
from oar_core.model import GPT, load_gpt
from oar_core.names import LocationRule
from oar_core.params import SampleModelParams, SampleParams
from oar_core.runtime import autocast, barrier, pick_device
from oar_core.storage import file_hash, remove_path, swap_in, write_json
from oar_core.tokenizer import load_tokenizer
from pipeline._stage import stage_main


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """0,1,..,K-1,0,1,.. so every class gets n/K images (and any prefix is balanced too)."""
    return torch.arange(n) % max(1, num_classes)


def batch_seed(seed: int, name: str, b: int) -> int:
    # one generator per batch: a batch's samples do not depend on which process draws it, or on the batches before
    return zlib.crc32(f"{seed}/{name}/{b}".encode())


@torch.no_grad()
def draw_batches(model: GPT, tokenizer, spec: SampleModelParams, p: SampleParams, device, batches: list[int],
                 progress: bool = True):
    """For each batch index b in `batches`: (b, labels_B, tokens/order/scores (B, N) arrays, images_BHWC uint8)."""
    labels_N = balanced_labels(p.n_per_model, model.cfg.num_classes)
    H, W = model.cfg.grid_h, model.cfg.grid_w
    for b in tqdm(batches, desc=f"sample {spec.name}", unit="batch", disable=not progress):
        labels_B = labels_N[b * p.batch_size: (b + 1) * p.batch_size].to(device)
        g = torch.Generator().manual_seed(batch_seed(p.seed, spec.name, b))
        with autocast(device):
            res = generate(model, labels_B, order=spec.order, temperature=p.temperature, top_k=p.top_k,
                           cfg_scale=p.cfg_scale, cfg_schedule=p.cfg_schedule,
                           location=LocationRule(**spec.location.model_dump()), generator=g, progress=progress,
                           candidate_chunk_mb=p.candidate_chunk_mb, steps=spec.steps, schedule=spec.schedule)
        images_BHWC = to_uint8_NHWC(tokenizer.decode(res["tokens"].view(-1, H, W)).float())
        yield b, labels_B.cpu().numpy(), {k: res[k].float().cpu().numpy() if k == "scores" else res[k].cpu().numpy()
                                           for k in ("tokens", "order", "scores")}, images_BHWC


def n_batches(p: SampleParams) -> int:
    return math.ceil(p.n_per_model / p.batch_size)


def orders_table(res: dict, files: list[str]) -> pa.Table:
    return pa.table({
        "index": pa.array(np.arange(len(files)), pa.int64()),
        "label": pa.array(res["labels"], pa.int64()),
        "file": pa.array(files, pa.string()),
        "order": pa.array(list(res["order"].astype(np.uint16)), pa.list_(pa.uint16())),
        "scores": pa.array(list(res["scores"].astype(np.float32)), pa.list_(pa.float32())),
        "tokens": pa.array(list(res["tokens"].astype(np.uint16)), pa.list_(pa.uint16())),
    })


def draw_model_samples(model: GPT, tokenizer, spec: SampleModelParams, p: SampleParams, device, meta: dict,
                       rank: int = 0, world: int = 1, progress: bool = True) -> None:
    """Draw one model's samples into a hidden folder, streaming each batch's PNGs to disk (memory stays flat at any
    n_per_model), then swap the folder in whole: a killed or rerun stage never leaves old and new images mixed under
    the model's name. Under torchrun each of the `world` ranks draws every world-th batch into the same folder and
    rank 0 writes the table, the grid and meta.json: the same bytes as one process."""
    folder = Path(p.out_dir) / spec.name
    tmp = folder.parent / f".{folder.name}.partial"
    if rank == 0:
        remove_path(tmp)
        tmp.mkdir(parents=True)
    barrier(world)
    rows: dict[str, list] = {"index": [], "labels": [], "tokens": [], "order": [], "scores": []}
    for b, labels_B, res, images_BHWC in draw_batches(model, tokenizer, spec, p, device,
                                                      list(range(rank, n_batches(p), world)), progress):
        index_B = np.arange(b * p.batch_size, b * p.batch_size + len(labels_B))
        for i, im in zip(index_B, images_BHWC):
            (tmp / f"{i:05d}.png").write_bytes(png_bytes(im))
        for k, v in [("index", index_B), ("labels", labels_B), *res.items()]:
            rows[k].append(v)
    np.savez(tmp / f".rows-{rank}.npz", **{k: np.concatenate(v) if v else np.zeros(0) for k, v in rows.items()})
    barrier(world)
    if rank == 0:
        parts = [np.load(tmp / f".rows-{r}.npz") for r in range(world)]
        index_N = np.concatenate([pt["index"] for pt in parts]).astype(np.int64)
        by_index = np.argsort(index_N)
        res = {k: np.concatenate([pt[k] for pt in parts if len(pt["index"])])[by_index]
               for k in ("labels", "tokens", "order", "scores")}
        for r in range(world):
            (tmp / f".rows-{r}.npz").unlink()
        files = [f"{i:05d}.png" for i in range(len(index_N))]
        pq.write_table(orders_table(res, files), tmp / "orders.parquet")
        (tmp / "grid.png").write_bytes(png_bytes(grid_from_folder(tmp, res["labels"])))
        write_json(tmp / "meta.json", {**meta, "n": len(files)})
        swap_in(tmp, folder)
    barrier(world)


def tidy_samples_dir(out_dir: Path, names: list[str]) -> list[str]:
    """Remove what a killed run left (hidden .partial/.old folders, .tmp files) and the folders of models no longer
    in sample.models, so evaluate sees exactly the models listed. Returns what was removed."""
    gone = []
    for f in sorted(out_dir.iterdir()) if out_dir.is_dir() else []:
        if f.name.startswith(".") or (f.is_dir() and f.name not in (*names, "dvclive")):  # a trial's metrics
            remove_path(f)
            gone.append(f.name)
    return gone


def run_sample(p: SampleParams, live_dir: str = "dvclive/sample", progress: bool = True) -> dict:
    """Every model's samples, then each model's speed in DVCLive's layout: `<live_dir>/<model>/metrics.json`."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:  # torchrun: ranks only meet at barriers (gloo works with CPU and GPU ranks alike)
        dist.init_process_group("gloo")
    device = pick_device()
    tokenizer = load_tokenizer(p.tokenizer, device)
    removed = tidy_samples_dir(Path(p.out_dir), [m.name for m in p.models]) if rank == 0 else []
    if removed and progress:
        print(f"[sample] removed from {p.out_dir}: {', '.join(removed)} (leftovers of a killed run, or models no "
              f"longer in sample.models)", flush=True)
    summary = {}
    for spec in p.models:
        model, ckpt = load_gpt(spec.checkpoint, device)
        if (model.cfg.grid_h, model.cfg.vocab_size) != (tokenizer.grid, tokenizer.codebook_size):
            raise ValueError(f"{spec.checkpoint}: model grid {model.cfg.grid_h}/vocab {model.cfg.vocab_size} does not "
                             f"match the tokenizer {p.tokenizer} (grid {tokenizer.grid}/codebook "
                             f"{tokenizer.codebook_size}); retrain the model on this tokenizer's shards")
        if spec.steps is not None and spec.steps > model.cfg.n_tokens:
            raise ValueError(f"sample.models {spec.name}: steps {spec.steps} is more than the model's "
                             f"{model.cfg.n_tokens} tokens; use at most {model.cfg.n_tokens} (or null: one per step)")
        t0 = time.time()
        meta = {"name": spec.name, "checkpoint": spec.checkpoint, "checkpoint_hash": file_hash(spec.checkpoint),
                "order": spec.order, "location": spec.location.model_dump(mode="json"), "steps": spec.steps,
                "schedule": spec.schedule,
                "trained_order": ckpt.get("order"), "num_classes": model.cfg.num_classes,
                "params": p.model_dump(mode="json")}
        draw_model_samples(model, tokenizer, spec, p, device, meta, rank, world, progress)
        seconds = time.time() - t0
        mine = sum(min(p.batch_size, p.n_per_model - b * p.batch_size) for b in range(rank, n_batches(p), world))
        summary[spec.name] = {"seconds": round(seconds, 2), "images_per_s": round(p.n_per_model / seconds, 2),
                              "images_this_process": mine}
    if rank == 0:
        log_per_key(live_dir, summary)  # a row per model in `dvc metrics show dvclive/sample`
    if world > 1:
        dist.destroy_process_group()
    return summary


def main(argv=None):
    return stage_main(__doc__, "sample", lambda p, a: run_sample(p, a.live_dir or a.live_root / "sample"), argv,
                      lambda ap: ap.add_argument("--live-dir", help="default: dvclive/sample (a trial's: "
                                                                    "<sample.out_dir>/dvclive/sample)"))


if __name__ == "__main__":
    main()
