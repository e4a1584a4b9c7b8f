"""Stage `tokenizer`: train the VQ tokenizer on the ingested images, streamed (or adopt tokenizer.checkpoint / a
pretrained diffusers VQModel), then its reconstruction metrics (DVCLive: dvclive/tokenizer/metrics.json)."""
from __future__ import annotations

import math
import time
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from oar_core import vq_diffusers
from oar_core.image_shards import endless_batches, image_batches, load_manifest, to_float_BCHW
from oar_core.live import log_stage
from oar_core.params import TokenizerParams
from oar_core.runtime import pick_device
from oar_core.sudoku import GlyphTokenizer, board_size_of
from oar_core.tokenizer import VQTokenizer, load_tokenizer, save_tokenizer
from pipeline._stage import stage_main


def train_tokenizer(p: TokenizerParams, batches: Iterator[np.ndarray], image_size: int, channels: int,
                    device: torch.device | str = "cpu", progress: bool = True):
    """Train a VQTokenizer for p.steps on uint8 (B,H,W,C) batches drawn from `batches` (a stream: the data is never
    held whole). Returns (model in eval mode, history list)."""
    device = torch.device(device)
    torch.manual_seed(p.seed)
    model = VQTokenizer(image_size, channels, p.grid, p.codebook_size, p.code_dim, p.hidden).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=p.lr)
    # cosine decay to 10%: late small steps polish reconstructions without hurting the short schedule
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, p.steps) / max(1, p.steps))))
    history, t0 = [], time.time()
    model.train()
    bar = tqdm(range(p.steps), desc="tokenizer", unit="step", disable=not progress, mininterval=1.0)
    for step in bar:
        x_BCHW = to_float_BCHW(next(batches), device)
        _, losses, tokens_Bhw = model(x_BCHW)
        loss = losses["recon"] + p.commitment * losses["commit"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == p.steps - 1:
            used = tokens_Bhw.unique().numel() / p.codebook_size
            rec = {"step": step, "loss": loss.item(), "recon": losses["recon"].item(), "batch_usage": used,
                   "elapsed_s": time.time() - t0}
            history.append(rec)
            bar.set_postfix(recon=f"{rec['recon']:.4f}", usage=f"{used:.2f}")
    model.eval()
    return model, history


def mean_image(batches: Iterable[np.ndarray]) -> np.ndarray:
    """Per-pixel mean in [0,1] over a stream of uint8 (B,H,W,C) batches."""
    total, n = 0.0, 0
    for images_BHWC in batches:
        total = total + images_BHWC.astype(np.float64).sum(0)
        n += len(images_BHWC)
    return total / max(n, 1) / 255.0


@torch.no_grad()
def evaluate_tokenizer(model, test_batches: Iterable[np.ndarray], mean_HWC: np.ndarray, device) -> dict:
    """Reconstruction error (vs the train mean image as a baseline) and code usage over a stream of test batches."""
    model.eval()
    sq_err, base_err, n_px = 0.0, 0.0, 0
    counts_K = torch.zeros(model.codebook_size, dtype=torch.float64)
    for images_BHWC in test_batches:
        x_BCHW = to_float_BCHW(images_BHWC, device)
        tokens_Bhw = model.encode(x_BCHW)
        recon_BCHW = model.decode(tokens_Bhw)
        sq_err += (recon_BCHW - x_BCHW).pow(2).sum().item()
        base_err += float(((images_BHWC / 255.0 - mean_HWC) ** 2).sum())
        n_px += x_BCHW.numel()
        counts_K += torch.bincount(tokens_Bhw.flatten().cpu(), minlength=model.codebook_size).double()
    probs_K = counts_K / counts_K.sum()
    entropy = -(probs_K[probs_K > 0] * probs_K[probs_K > 0].log()).sum().item()
    mse = sq_err / n_px
    return {
        "recon_mse": mse,
        "baseline_mse": base_err / n_px,
        "psnr": 10 * math.log10(1.0 / max(mse, 1e-12)),
        "codebook_usage": float((counts_K > 0).double().mean()),
        "perplexity": math.exp(entropy),
        "codebook_size": model.codebook_size,
        "grid": model.grid,
    }


def check_compatible(model: VQTokenizer, manifest: dict, p: TokenizerParams, path) -> None:
    """A user-supplied checkpoint must fit the ingested data and the configured grid."""
    problems = []
    if model.channels != manifest["channels"]:
        problems.append(f"channels {model.channels} != data channels {manifest['channels']} (ingest.channels)")
    if model.image_size != manifest["image_size"]:
        problems.append(f"image_size {model.image_size} != data image_size {manifest['image_size']} "
                        f"(ingest.image_size)")
    if model.grid != p.grid:
        problems.append(f"grid {model.grid} != tokenizer.grid {p.grid}")
    if problems:
        raise ValueError(f"{path}: tokenizer checkpoint does not fit this pipeline: {'; '.join(problems)}; "
                         f"change those params or use a matching checkpoint")


def run_tokenizer(p: TokenizerParams, ingest_dir: str, out="models/tokenizer.pt",
                  metrics="dvclive/tokenizer") -> dict:
    """Train (or adopt) the tokenizer on the ingest shards, streamed; its summary goes to DVCLive's
    `<metrics>/metrics.json`."""
    manifest = load_manifest(ingest_dir)
    device = pick_device()
    t0 = time.time()
    if p.kind == "diffusers_vq":
        model = vq_diffusers.from_pretrained_dir(p.checkpoint, manifest["image_size"]).to(device)
        if model.channels != manifest["channels"]:
            raise ValueError(f"{p.checkpoint}: the VQModel takes {model.channels}-channel images, the ingested ones "
                             f"have {manifest['channels']}; set ingest.channels: {model.channels}")
        save_tokenizer(out, model)  # self-contained: later stages never need the folder
        history, source = [], p.checkpoint
    elif p.kind == "glyph":  # nothing to learn: each cell patch is one of the board's digit glyphs
        if board_size_of(manifest["source"]) != p.grid:
            raise ValueError(f"tokenizer.kind glyph draws the Sudoku digits of a board of tokenizer.grid ({p.grid}) "
                             f"cells a side; ingest.source {manifest['source']!r} is not such a board: set "
                             f"tokenizer.grid to its board size, or another tokenizer.kind")
        model = GlyphTokenizer(manifest["image_size"], manifest["channels"], p.grid).to(device)
        save_tokenizer(out, model)
        history, source = [], "glyph"
    elif p.checkpoint:
        model = load_tokenizer(p.checkpoint, device)  # safetensors only: the user's file runs no code
        check_compatible(model, manifest, p, p.checkpoint)
        # re-saved from the loaded weights, not copied byte for byte: the artifact holds only what was read safely
        save_tokenizer(out, model)
        history, source = [], p.checkpoint
    else:
        stream = endless_batches(ingest_dir, "train", p.batch_size, p.seed, p.shuffle_buffer)
        model, history = train_tokenizer(p, stream, manifest["image_size"], manifest["channels"], device)
        save_tokenizer(out, model)
        source = "trained"
    mean_HWC = mean_image(b for b, _, _ in image_batches(ingest_dir, "train", 1000))
    result = evaluate_tokenizer(model, (b for b, _, _ in image_batches(ingest_dir, "test", 1000)), mean_HWC, device)
    result.update(train_seconds=round(time.time() - t0, 2), kind=p.kind,
                  steps=0 if p.checkpoint or p.kind == "glyph" else p.steps)
    log_stage(metrics, result)
    return {**result, "source": source, "out": str(out), "metrics": str(metrics), "history": history,
            "threads": torch.get_num_threads()}


def _args(ap):
    ap.add_argument("--ingest-dir", help="default: from params.yaml")
    ap.add_argument("--out", default="models/tokenizer.pt")
    ap.add_argument("--metrics", default="dvclive/tokenizer", help="DVCLive folder for its metrics.json")


def main(argv=None):
    return stage_main(__doc__, "tokenizer", lambda p, a: run_tokenizer(p, a.ingest_dir, a.out, a.metrics), argv, _args,
                      summary=lambda r: (
                          f"({r['source']}) -> {r['out']}: recon_mse={r['recon_mse']:.4f} (mean-image baseline "
                          f"{r['baseline_mse']:.4f}) psnr={r['psnr']:.1f}dB usage={r['codebook_usage']:.2f} "
                          f"perplexity={r['perplexity']:.0f}/{r['codebook_size']} grid={r['grid']} "
                          f"in {r['train_seconds']:.0f}s"))


if __name__ == "__main__":
    main()
