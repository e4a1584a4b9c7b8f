"""Stage `complete`: every `sample.models` entry completes the same held-out test images under fixed masks
(params `complete.masks`), so that evaluate can measure what an any-order model does that raster cannot.

The first `complete.n_images` test images are tokenized; per mask a token is known when its patch lies wholly
outside the region to generate (as `python -m pipeline.edit` decides). No class is given (the null class: the
known tokens are all a model knows, so the feature net's accuracy on a completion says whether it kept what the
visible part shows); sample's temperature and top-k apply. A model trained in one fixed order (raster) completes in
that order with the known tokens teacher-forced (oar_core.completion). Writes under complete.out_dir:
    masked/<mask>/00000.png ...         the inputs, tokens to generate painted gray
    models/<model>/<mask>/00000.png ... the completions
    meta.json                           per model and mask: known/generated tokens, missing-token bits/token (or why
                                        not), seconds; the test labels and masks
"""
from __future__ import annotations

import time
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from oar_core.completion import (
    check_pair,
    complete,
    fixed_training_order,
    known_first,
    known_from_region,
    masked_picture,
    missing_bits,
)
from oar_core.figures import png_bytes, to_uint8_NHWC
from oar_core.image_shards import load_split, to_float_BCHW
from oar_core.likelihood import is_deterministic
from oar_core.model import load_gpt
from oar_core.params import CompleteParams, CompletionMask, SampleParams, load_params
from oar_core.runtime import autocast, pick_device
from oar_core.storage import remove_path, swap_in, write_json
from oar_core.tokenizer import load_tokenizer
from pipeline._stage import stage_main


def known_masks(mask: CompletionMask, n: int, size: int, grid: int, seed: int) -> np.ndarray:
    """(n, grid*grid) bool: the tokens each image keeps under `mask` (the same for all, or drawn per image)."""
    N = grid * grid
    if mask.random is not None:
        g = np.random.default_rng(zlib.crc32(f"{seed}/{mask.name}".encode()))
        k = N - max(1, round(mask.random * N))
        known = np.zeros((n, N), bool)
        np.put_along_axis(known, np.argsort(g.random((n, N)), 1)[:, :k], True, 1)
        return known
    x0, y0, x1, y1 = (round(v * size) for v in mask.box)
    region = np.zeros((size, size), bool)
    region[y0:y1, x0:x1] = True
    known = known_from_region(~region if mask.mode == "outpaint" else region, grid)
    if known.all() or not known.any():
        raise ValueError(f"complete.masks {mask.name!r}: box {list(mask.box)} leaves "
                         f"{'nothing to generate' if known.all() else 'no token known'} at {size}x{size} pixels and a "
                         f"{grid}x{grid} grid; widen or shrink it")
    return np.broadcast_to(known, (n, N)).copy()


def groups(known_MN: np.ndarray) -> list[np.ndarray]:
    """Image indices grouped by known-token count (a decode batch shares one count)."""
    counts = known_MN.sum(1)
    return [np.flatnonzero(counts == c) for c in np.unique(counts)]


def write_pngs(folder: Path, images_NHWC: np.ndarray, index: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in zip(index, images_NHWC):
        (folder / f"{i:05d}.png").write_bytes(png_bytes(im))


@torch.no_grad()
def run_complete(p: CompleteParams, sp: SampleParams, ingest_dir: str, progress: bool = True) -> dict:
    device = pick_device()
    tokenizer = load_tokenizer(sp.tokenizer, device)
    images_NHWC, labels_N, _ = load_split(ingest_dir, "test")
    images_NHWC, labels_N = images_NHWC[:p.n_images], labels_N[:p.n_images]
    n, grid, size = len(images_NHWC), tokenizer.grid, tokenizer.image_size
    if images_NHWC.shape[1] != size:
        raise ValueError(f"{ingest_dir}: test images are {images_NHWC.shape[1]} pixels but {sp.tokenizer} takes "
                         f"{size}; rerun `dvc repro` so the tokenizer matches ingest")
    tokens_NN = torch.cat([tokenizer.encode(to_float_BCHW(images_NHWC[i:i + p.batch_size], device)).flatten(1)
                           for i in range(0, n, p.batch_size)])
    known = {m.name: known_masks(m, n, size, grid, p.seed) for m in p.masks}
    out = Path(p.out_dir)
    tmp = out.parent / f".{out.name}.partial"
    remove_path(tmp)
    for m in p.masks:
        write_pngs(tmp / "masked" / m.name, np.stack([masked_picture(im, k, grid) for im, k in
                                                      zip(images_NHWC, known[m.name])]), np.arange(n))
    meta = {"n_images": n, "labels": labels_N.tolist(), "masks": [m.model_dump(mode="json") for m in p.masks],
            "models": {}}
    for spec in sp.models:
        model, ckpt = load_gpt(spec.checkpoint, device)
        check_pair(model, tokenizer, spec.checkpoint, sp.tokenizer)
        fixed = fixed_training_order(ckpt)
        null_B = lambda B: torch.full((B,), model.null_class, dtype=torch.long, device=device)  # noqa: E731
        per_mask = {}
        for m in tqdm(p.masks, desc=f"complete {spec.name}", unit="mask", disable=not progress):
            t0, bits = time.time(), []
            g = torch.Generator().manual_seed(zlib.crc32(f"{p.seed}/{spec.name}/{m.name}".encode()))
            computable = fixed is None or all(known_first(fixed, k, grid, grid) for k in known[m.name])
            for idx in groups(known[m.name]):
                for b in range(0, len(idx), p.batch_size):
                    ib = idx[b:b + p.batch_size]
                    tok_BN = tokens_NN[ib]
                    known_BN = torch.as_tensor(known[m.name][ib], device=device)
                    kw = dict(order=spec.order, location=spec.location, generator=g, teacher_force_in=fixed,
                              steps=spec.steps, schedule=spec.schedule)
                    with autocast(device):
                        res = complete(model, null_B(len(ib)), tok_BN, known_BN, temperature=sp.temperature,
                                       top_k=sp.top_k, candidate_chunk_mb=sp.candidate_chunk_mb, **kw)
                        if computable:
                            bits.append(missing_bits(model, tok_BN, null_B(len(ib)), known_BN, **kw).cpu())
                    write_pngs(tmp / "models" / spec.name / m.name,
                               to_uint8_NHWC(tokenizer.decode(res["tokens"].view(-1, grid, grid)).float()), ib)
            k = known[m.name].sum(1)
            per_mask[m.name] = {
                "known_tokens_mean": float(k.mean()), "generated_tokens_mean": float(grid * grid - k.mean()),
                "missing_bits_per_token": float(torch.cat(bits).mean()) if computable else None,
                "missing_bits_how": missing_bits_how(spec.order, spec.location, fixed, computable),
                "seconds": round(time.time() - t0, 2)}
        meta["models"][spec.name] = {"checkpoint": spec.checkpoint, "order": fixed or spec.order,
                                     "teacher_forced": bool(fixed), "masks": per_mask}
    write_json(tmp / "meta.json", meta)
    swap_in(tmp, out)
    return {name: {mask: {k: v for k, v in d.items() if k in ("missing_bits_per_token", "seconds")}
                   for mask, d in mm["masks"].items()} for name, mm in meta["models"].items()}


def missing_bits_how(order: str, location, fixed: str | None, computable: bool) -> str:
    if fixed:
        return (f"exact: {fixed} order, every known token comes first" if computable else
                f"not computable: trained in {fixed} order only, its missing tokens cannot see the known tokens "
                f"that come after them in that order, so it has no p(missing given known)")
    if is_deterministic(order, location):
        return f"exact: known tokens first, then the {order} order"
    return f"bound: known tokens first, then one {order} order per image drawn by the sampler's own rule"


def main(argv=None):
    return stage_main(__doc__, "complete", lambda p, a: run_complete(p, load_params(a.params).sample, a.ingest_dir),
                      argv, lambda ap: ap.add_argument("--ingest-dir", help="default: from params.yaml"))


if __name__ == "__main__":
    main()
