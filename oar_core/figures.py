"""Every picture the project draws: PNG files, sample grids (torchvision's make_grid), generation strips of partial
canvases, mean-generation-step heat maps and training curves (matplotlib)."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import polars as pl
import torch
from PIL import Image

from oar_core.live import read_curve
from oar_core.orders import step_of_position
from oar_core.storage import atomic_path, write_bytes_atomic


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


def grid_from_folder(folder: Path, labels_N: np.ndarray, per_class: int = 8) -> np.ndarray:
    """class_grid of the images on disk, reading only the ones the grid shows."""
    classes = np.unique(labels_N)
    pick = (np.arange(min(len(labels_N), per_class * per_class)) if len(classes) == 1 else
            np.sort(np.concatenate([np.flatnonzero(labels_N == k)[:per_class] for k in classes])))
    images = np.stack([np.asarray(Image.open(folder / f"{i:05d}.png")) for i in pick])
    return class_grid(images.reshape(len(pick), *images.shape[1:3], -1), labels_N[pick], per_class)


GRAY = 128  # unfilled token patches in a partial canvas


# matplotlib and torchvision take seconds to import: imported where a picture is drawn
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_fig(fig, path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)


def strip_steps(N: int, k: int) -> list[int]:
    """k canvas sizes from a few tokens to the full grid (evenly spaced in filled count)."""
    return sorted({max(1, round(N * (i + 1) / k)) for i in range(k)})


@torch.no_grad()
def partial_canvases(tokenizer, tokens_N: np.ndarray, order_N: np.ndarray, steps: list[int]) -> np.ndarray:
    """(len(steps), H, W, C) uint8: the image after t tokens of its order, unfilled patches gray.

    The decoder needs a token everywhere, so unfilled positions get the "blank" token (the code of an all-zero
    image: background on Fashion-MNIST) and are then painted gray so the viewer sees what is not generated yet."""
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


def step_heatmaps_from_orders(order_RN: np.ndarray, labels_R: np.ndarray) -> dict[int, np.ndarray]:
    """Per class: (H, W) mean generation step of each grid position (low = generated early)."""
    step_RN = step_of_position(torch.from_numpy(order_RN)).numpy()
    side = math.isqrt(order_RN.shape[1])
    return {int(k): step_RN[labels_R == k].mean(0).reshape(side, side) for k in np.unique(labels_R)}


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
    ax1.set(title="train content loss (nats/token)", xlabel="step")  # without a location policy's loss
    ax2.set(title="held-out bits/token", xlabel="step")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
    _save_fig(fig, path)
    return drawn


def save_heatmaps(heat: dict, path, title: str = "mean generation step", class_names: list[str] | None = None) -> None:
    """(H, W) mean-generation-step maps side by side, one per key (a class id, named by `class_names` when given;
    or any label), on one colour scale from 0, under `title`: the report's heat maps and the CLI's --png."""
    plt = _plt()
    n = len(heat)
    vmax = max(float(h.max()) for h in heat.values())
    fig, axes = plt.subplots(1, n, figsize=(1.4 * n + 0.8, 1.9))
    axes = np.atleast_1d(axes)
    for ax, (k, h) in zip(axes, sorted(heat.items())):
        im = ax.imshow(h, cmap="viridis", vmin=0, vmax=vmax)
        name = class_names[k] if class_names and k < len(class_names) else str(k)
        ax.set_title(name, fontsize=7)
        ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(im, ax=list(axes), fraction=0.02, pad=0.01, label="mean step")
    fig.suptitle(title, fontsize=9, y=1.04)
    _save_fig(fig, path)


def save_calibration(per_model: dict[str, dict], path) -> None:
    """Mean confidence (dashed) and accuracy (solid) per generation step along each model's own greedy orders
    (oar_core.calibration): where the dashed line is above the solid one, the model is sure where it is not."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for i, (name, cal) in enumerate(per_model.items()):
        steps = range(1, len(cal["accuracy_per_step"]) + 1)
        ax.plot(steps, cal["accuracy_per_step"], color=f"C{i}", label=f"{name}: accuracy {cal['accuracy']:.3f}")
        ax.plot(steps, cal["confidence_per_step"], color=f"C{i}", ls="--",
                label=f"{name}: confidence {cal['confidence']:.3f}")
    ax.set(title="greedy own-order calibration", xlabel="generation step", ylabel="mean over held-out images",
           ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save_fig(fig, path)
