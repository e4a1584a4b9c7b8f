"""Stage `sample`: generate class-balanced images from every model, in its order, and keep the orders.

Per model (params `sample.models`: name, checkpoint, order) it writes under `<out_dir>/<name>/`:
    00000.png ...           the decoded images (uint8, the ingest size and channels)
    orders.parquet          index, label, file, order list<uint16> (position per step), scores list<float32>,
                            tokens list<uint16> (raster layout; lets the report redraw partial canvases)
    grid.png                a sample grid, one column per class
    meta.json               checkpoint, order, params and timing (evaluate reads it to know what it scores)
Deterministic: every model draws from its own generator seeded by (seed, model name).
"""
from __future__ import annotations

import io
import math
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm

from oar_core.io import autocast, file_hash, pick_device, read_json, write_bytes_atomic, write_json
from oar_core.location import LocationRule
from oar_core.model import GPT, load_gpt
from oar_core.params import SampleModelParams, SampleParams
from oar_core.sampling import generate


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """0,1,..,K-1,0,1,.. so every class gets n/K images (and any prefix is balanced too)."""
    return torch.arange(n) % max(1, num_classes)


def model_seed(seed: int, name: str) -> int:
    # a stable per-model seed: adding or reordering models never changes another model's samples
    return seed * 1_000_003 + zlib.crc32(name.encode()) % 1_000_003


def to_uint8_NHWC(images_BCHW: torch.Tensor) -> np.ndarray:
    return (images_BCHW.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def png_bytes(image_HWC: np.ndarray) -> bytes:
    img = Image.fromarray(image_HWC[..., 0] if image_HWC.shape[-1] == 1 else image_HWC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_grid(images_NHWC: np.ndarray, ncol: int) -> np.ndarray:
    """torchvision's make_grid for uint8 NHWC arrays: rows of `ncol` images (at least 2 images) with 2-pixel white
    gaps, so black-background images stay separable. (rows*(H+2)+2, ncol*(W+2)+2, C) uint8."""
    from torchvision.utils import make_grid  # torchvision takes seconds to import; only grids need it

    grid_CHW = make_grid(torch.from_numpy(images_NHWC).permute(0, 3, 1, 2), nrow=ncol, padding=2, pad_value=255)
    return grid_CHW[: images_NHWC.shape[-1]].permute(1, 2, 0).numpy()  # make_grid turns 1 channel into 3


def class_grid(images_NHWC: np.ndarray, labels_N: np.ndarray, per_class: int = 8) -> np.ndarray:
    """One column per class, `per_class` rows: the layout people compare across models at a glance. One class
    (an unconditional model) fills a square of up to per_class x per_class images instead of a single column."""
    classes = np.unique(labels_N)
    if len(classes) == 1:
        n = min(len(images_NHWC), per_class * per_class)
        return image_grid(images_NHWC[:n], ncol=math.ceil(math.sqrt(n)))
    cols = [images_NHWC[labels_N == k][:per_class] for k in classes]
    rows = min(len(c) for c in cols)
    ordered = np.stack([cols[j][i] for i in range(rows) for j in range(len(classes))])
    return image_grid(ordered, ncol=len(classes))


def save_png(path, image_HWC: np.ndarray) -> None:
    write_bytes_atomic(path, png_bytes(image_HWC))


@torch.no_grad()
def sample_model(model: GPT, tokenizer, spec: SampleModelParams, p: SampleParams, device,
                 progress: bool = True) -> dict:
    """Generate p.n_per_model images with `spec.order`; returns labels, tokens, orders, scores, images."""
    g = torch.Generator().manual_seed(model_seed(p.seed, spec.name))
    labels_N = balanced_labels(p.n_per_model, model.cfg.num_classes)
    H, W = model.cfg.grid_h, model.cfg.grid_w
    out = {"tokens": [], "order": [], "scores": [], "images": []}
    batches = range(0, p.n_per_model, p.batch_size)
    for i in tqdm(batches, desc=f"sample {spec.name}", unit="batch", disable=not progress):
        labels_B = labels_N[i: i + p.batch_size].to(device)
        with autocast(device):
            res = generate(model, labels_B, order=spec.order, temperature=p.temperature, top_k=p.top_k,
                           cfg_scale=p.cfg_scale, cfg_schedule=p.cfg_schedule,
                           location=LocationRule(**spec.location.model_dump()), generator=g, progress=progress,
                           candidate_chunk_mb=p.candidate_chunk_mb)
        tokens_BN = res["tokens"]
        images_BCHW = tokenizer.decode(tokens_BN.view(-1, H, W)).float()
        out["images"].append(to_uint8_NHWC(images_BCHW))
        for k in ("tokens", "order", "scores"):
            out[k].append(res[k].float().cpu() if k == "scores" else res[k].cpu())
    return {"labels": labels_N.numpy(), "images": np.concatenate(out["images"]),
            **{k: torch.cat(out[k]).numpy() for k in ("tokens", "order", "scores")}}


def orders_table(res: dict, files: list[str]) -> pa.Table:
    return pa.table({
        "index": pa.array(np.arange(len(files)), pa.int64()),
        "label": pa.array(res["labels"], pa.int64()),
        "file": pa.array(files, pa.string()),
        "order": pa.array(list(res["order"].astype(np.uint16)), pa.list_(pa.uint16())),
        "scores": pa.array(list(res["scores"].astype(np.float32)), pa.list_(pa.float32())),
        "tokens": pa.array(list(res["tokens"].astype(np.uint16)), pa.list_(pa.uint16())),
    })


def write_model_samples(folder: Path, res: dict, meta: dict) -> None:
    """Write one model's samples into a hidden folder, then swap it in whole: a killed or rerun stage never leaves
    old and new images mixed under the model's name."""
    tmp, old = folder.parent / f".{folder.name}.partial", folder.parent / f".{folder.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = [f"{i:05d}.png" for i in range(len(res["images"]))]
    for name, im in zip(files, res["images"]):
        (tmp / name).write_bytes(png_bytes(im))
    pq.write_table(orders_table(res, files), tmp / "orders.parquet")
    (tmp / "grid.png").write_bytes(png_bytes(class_grid(res["images"], res["labels"])))
    write_json(tmp / "meta.json", meta)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def tidy_samples_dir(out_dir: Path, names: list[str]) -> list[str]:
    """Remove what a killed run left (hidden .partial/.old folders, .tmp files) and the folders of models no longer
    in sample.models, so evaluate sees exactly the models listed. Returns what was removed."""
    gone = []
    for f in sorted(out_dir.iterdir()) if out_dir.is_dir() else []:
        if f.name.startswith(".") or (f.is_dir() and f.name not in names):
            shutil.rmtree(f) if f.is_dir() else f.unlink()
            gone.append(f.name)
    return gone


def load_sample_meta(folder) -> dict:
    fix = "rerun `dvc repro sample` (or python -m pipeline.sample)"
    try:
        return read_json(Path(folder) / "meta.json", f"no meta.json, so these samples are incomplete or not from the "
                                                     f"sample stage; {fix}", fix)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None


def run_sample(p: SampleParams, metrics_dir: str = "metrics", progress: bool = True) -> dict:
    from oar_core.tokenizer import load_tokenizer

    device = pick_device()
    tokenizer = load_tokenizer(p.tokenizer, device)
    removed = tidy_samples_dir(Path(p.out_dir), [m.name for m in p.models])
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
        t0 = time.time()
        res = sample_model(model, tokenizer, spec, p, device, progress)
        seconds = time.time() - t0
        meta = {"name": spec.name, "checkpoint": spec.checkpoint, "checkpoint_hash": file_hash(spec.checkpoint),
                "order": spec.order, "location": spec.location.model_dump(mode="json"),
                "trained_order": ckpt.get("order"), "n": int(len(res["labels"])),
                "num_classes": model.cfg.num_classes, "params": p.model_dump(mode="json")}
        write_model_samples(Path(p.out_dir) / spec.name, res, meta)
        summary[spec.name] = {"seconds": round(seconds, 2), "images_per_s": round(len(res["labels"]) / seconds, 2)}
    write_json(Path(metrics_dir) / "sample.json", summary)
    return summary
