"""Pictures and the one-page report: sample grids, generation strips, order heat maps, training curves,
and `report.md` that puts them beside the metrics table."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import torch

from oar_core.io import atomic_path, write_bytes_atomic
from oar_core.live import read_curve
from oar_core.order_table import mean_step_heatmap, save_heatmaps, scan  # noqa: F401 (evaluate saves heat maps here)
from oar_core.orders import step_of_position
from oar_core.samples import image_grid, save_png

GRAY = 128  # unfilled token patches in a partial canvas


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_fig(fig, path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)


# ---- generation strip ---------------------------------------------------------------------------------
def strip_steps(N: int, k: int) -> list[int]:
    """k canvas sizes from a few tokens to the full grid (evenly spaced in filled count)."""
    return sorted({max(1, round(N * (i + 1) / k)) for i in range(k)})


@torch.no_grad()
def partial_canvases(tokenizer, tokens_N: np.ndarray, order_N: np.ndarray, steps: list[int]) -> np.ndarray:
    """(len(steps), H, W, C) uint8: the image after t tokens of its order, unfilled patches gray.

    The decoder needs a token everywhere, so unfilled positions get the "blank" token (the code of an all-zero
    image: background on Fashion-MNIST) and are then painted gray so the viewer sees what is not generated yet."""
    from oar_core.samples import to_uint8_NHWC

    g, size = tokenizer.grid, tokenizer.image_size
    blank = int(tokenizer.encode(torch.zeros(1, tokenizer.channels, size, size)).flatten().mode().values)
    device = next(tokenizer.parameters()).device
    grids, masks = [], []
    for t in steps:
        filled_N = np.zeros(g * g, bool)
        filled_N[order_N[:t]] = True
        grids.append(np.where(filled_N, tokens_N, blank))
        masks.append(filled_N.reshape(g, g))
    images = to_uint8_NHWC(tokenizer.decode(torch.as_tensor(np.stack(grids), device=device).view(-1, g, g).long()))
    # nearest-upsample the token mask to pixels (a token covers size/grid pixels; grids that do not divide
    # the image size are handled by index arithmetic)
    rows = np.minimum(np.arange(size) * g // size, g - 1)
    for im, m in zip(images, masks):
        im[~m[rows][:, rows]] = GRAY
    return images


def generation_strip(tokenizer, tokens_N, order_N, k: int = 8, scale: int = 3) -> np.ndarray:
    N = len(order_N)
    canv = partial_canvases(tokenizer, np.asarray(tokens_N), np.asarray(order_N), strip_steps(N, k))
    strip = image_grid(canv, ncol=len(canv))
    return strip.repeat(scale, 0).repeat(scale, 1)


def save_strips(tokenizer, orders_parquet, path, k: int = 8, per_model: int = 3) -> None:
    """A few samples (different classes) of one model, each as a row of partial canvases."""
    df = pl.read_parquet(orders_parquet).unique("label", keep="first", maintain_order=True).head(per_model)
    rows = [generation_strip(tokenizer, r["tokens"], r["order"], k) for r in df.iter_rows(named=True)]
    save_png(path, np.concatenate(rows, 0))


# ---- heat maps ------------------------------------------------------------------------------------------
def step_heatmaps_from_orders(order_RN: np.ndarray, labels_R: np.ndarray) -> dict[int, np.ndarray]:
    """Per class: (H, W) mean generation step of each grid position (low = generated early)."""
    step_RN = step_of_position(torch.from_numpy(order_RN)).numpy()
    side = math.isqrt(order_RN.shape[1])
    return {int(k): step_RN[labels_R == k].mean(0).reshape(side, side) for k in np.unique(labels_R)}


def extracted_heatmaps(orders_dir) -> dict[int, np.ndarray]:
    """Per class mean step of the extracted (teacher-forced) training orders, via order_table."""
    labels = scan(orders_dir).select("label").unique().collect()["label"].sort().to_list()
    return {int(k): mean_step_heatmap(orders_dir, label=k, split="train") for k in labels}


# ---- training curves ------------------------------------------------------------------------------------
def save_training_curves(plots_dir, stages: list[str], path) -> list[str]:
    """Train loss and held-out bits/token of every stage that has DVCLive curves under `plots_dir`; returns the
    stages drawn."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    drawn = []
    pretrain_steps = read_curve(Path(plots_dir) / "train_random", "train_loss")[0][-1:] or [0.0]
    for stage in stages:
        xs, ys = read_curve(Path(plots_dir) / stage, "train_loss")
        tx, ty = read_curve(Path(plots_dir) / stage, "test_bits_per_token")
        if not xs and not tx:
            continue
        drawn.append(stage)
        # finetuning continues the any-order model: draw it after that model's steps, not from 0
        off = pretrain_steps[0] if stage.startswith("finetune") else 0.0
        ax1.plot([x + off for x in xs], ys, label=stage)
        ax2.plot([x + off for x in tx], ty, marker="o", ms=3, label=stage)
    ax1.set(title="train loss (nats/token)", xlabel="step")
    ax2.set(title="held-out bits/token", xlabel="step")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
    _save_fig(fig, path)
    return drawn


# ---- the markdown report --------------------------------------------------------------------------------
def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def metrics_table(metrics: dict, models: list[str], space: str) -> str:
    """Markdown rows: one per model, columns FID/KID/IS/precision/recall in `space` (indomain|inception), the
    valid NLL with how it was obtained, and the oracle-order diagnostic where there is one."""
    head = (f"| model | FID ({space}) | KID ({space}) | IS ({space}) | precision | recall | NLL bits/token (valid) "
            "| NLL: how | oracle order bits/token (diagnostic, not a likelihood) |\n"
            "|---|---|---|---|---|---|---|---|---|")
    rows = []
    for m in models + ["real_reference"]:
        d = metrics.get(m, {})
        if not d:
            continue
        kid = _fmt(d.get(f"kid_{space}"), 4) + (f" ± {d[f'kid_{space}_std']:.4f}" if f"kid_{space}_std" in d else "")
        is_ = _fmt(d.get(f"is_{space}"), 2) + (f" ± {d[f'is_{space}_std']:.2f}" if f"is_{space}_std" in d else "")
        rows.append(f"| {m} | {_fmt(d.get(f'fid_{space}'), 2)} | {kid} | {is_} | {_fmt(d.get(f'precision_{space}'))} "
                    f"| {_fmt(d.get(f'recall_{space}'))} | {_fmt(d.get('nll_bits_per_token'))} "
                    f"| {d.get('nll_order_label', '–')} | {_fmt(d.get('oracle_order_bits_per_token'))} |")
    return "\n".join([head] + rows)


def write_report(path, metrics: dict, labels: dict, models: list[str], figures: dict) -> None:
    """`figures`: {"grids": {model: rel}, "strips": {model: rel}, "heat_samples": {model: rel},
    "heat_extracted": rel|None, "curves": rel|None}; paths relative to the report's folder."""
    lines = ["# OAR evaluation report", ""]
    lines += ["## Metrics", "",
              f"Feature space: **{labels['feature_space']['indomain']}**. Not comparable with published "
              "(Inception) FID numbers; compare models with each other and with `real_reference` (real train "
              "images vs the same test images: the floor any model can reach at this sample size). Precision / recall: "
              "k-NN fidelity and diversity (torch-fidelity `prc`, same features). NLL: held-out bits/token of each "
              "model as it samples (its order and location rule, teacher-forced), an exact value or an upper bound "
              "on -log2 p(x); the oracle-order column scores along orders extracted by looking at the answer and is "
              "not a likelihood.", "",
              metrics_table({m: {**metrics.get(m, {}), "nll_order_label": labels.get(m, {}).get("nll_order", "–")}
                             for m in models + ["real_reference"]}, models, "indomain"), ""]
    lines += [f"Standard Inception metrics: **{labels['feature_space']['inception']}**", ""]
    if any("fid_inception" in metrics.get(m, {}) for m in models):
        lines += [metrics_table({m: metrics.get(m, {}) for m in models + ["real_reference"]}, models, "inception"), ""]
    lines += ["## Samples", "", "One column per class. Strips: one sample being generated in its order "
              "(gray = not generated yet).", "",
              "| model | samples | generation order (partial canvases) |", "|---|---|---|"]
    for m in models:
        g, s = figures["grids"].get(m), figures["strips"].get(m)
        lines.append(f"| {m} | {f'![{m}]({g})' if g else '–'} | {f'![{m} strip]({s})' if s else '–'} |")
    lines += ["", "## Where each model generates first", "",
              "Mean generation step per grid position and class (dark = early)."]
    if figures.get("heat_extracted"):
        lines += ["", "Extracted training orders (`data/orders`, teacher-forced, what OAR is finetuned on):", "",
                  f"![extracted orders]({figures['heat_extracted']})"]
    for m, rel in figures["heat_samples"].items():
        lines += ["", f"Sampling orders of `{m}`:", "", f"![{m} orders]({rel})"]
    if figures.get("curves"):
        lines += ["", "## Training curves", "", f"![training curves]({figures['curves']})"]
    lines.append("")
    write_bytes_atomic(path, "\n".join(lines).encode())
