"""The extracted-orders table: one Parquet part per token shard, queried lazily with Polars.

    import polars as pl
    orders = pl.scan_parquet("data/orders/*.parquet")       # works while extraction is still running
    orders.filter(pl.col("label") == 3).select("image_id", "nll_extracted").collect()

CLI: `python -m oar_core.order_table data/orders {summary,heatmap,per-class,closest-to-raster,first-positions}`.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from oar_core.io import atomic_path
from oar_core.orders import is_permutation, kendall_tau_to_raster, step_of_position

META_CKPT, META_PARAMS = b"oar.checkpoint_hash", b"oar.params_hash"


def write_part(path: Path, table: pa.Table, ckpt_hash: str, params_hash: str) -> None:
    table = table.replace_schema_metadata({META_CKPT: ckpt_hash.encode(), META_PARAMS: params_hash.encode()})
    # temp name ends in .tmp, so `*.parquet` globs never see a half-written part
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def part_is_current(path: Path, ckpt_hash: str, params_hash: str) -> bool:
    """A finished part made by the same checkpoint and params (so a restarted run can skip it)."""
    if not Path(path).exists():
        return False
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:
        return False  # unreadable: redo it
    return meta.get(META_CKPT) == ckpt_hash.encode() and meta.get(META_PARAMS) == params_hash.encode()


def scan(orders_dir: str | Path) -> pl.LazyFrame:
    parts = sorted(Path(orders_dir).glob("*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{orders_dir}: no orders parts (*.parquet); run `dvc repro extract_orders` first")
    return pl.scan_parquet([str(p) for p in parts])


def orders_for_ids(orders_dir, ids: list[str], N: int, missing_ok: bool = False) -> torch.Tensor | None:
    """(len(ids), N) orders aligned with `ids`; checks that every row is a permutation of the grid."""
    want = pl.DataFrame({"image_id": ids, "_row": np.arange(len(ids))})
    got = want.join(scan(orders_dir).select("image_id", "permutation").collect(), on="image_id", how="left")
    missing = got.filter(pl.col("permutation").is_null())
    if len(missing):
        if missing_ok and len(missing) == len(ids):
            return None
        raise ValueError(f"{orders_dir}: no extracted order for {len(missing)} image(s), e.g. {missing['image_id'][0]!r}; "
                         "rerun `dvc repro extract_orders` on the current shards")
    got = got.sort("_row")
    lengths = got["permutation"].list.len()
    if (lengths != N).any():
        raise ValueError(f"{orders_dir}: permutations have {lengths.unique().to_list()} entries but the grid has {N} "
                         "tokens; the table was extracted for another grid: rerun `dvc repro extract_orders`")
    order_RN = torch.from_numpy(np.stack(got["permutation"].to_numpy()).astype(np.int64))
    bad = ~is_permutation(order_RN, N)
    if bad.any():
        raise ValueError(f"{orders_dir}: {int(bad.sum())} row(s) are not permutations of 0..{N - 1}, e.g. image "
                         f"{got['image_id'][int(bad.nonzero()[0])]!r}; rerun `dvc repro extract_orders`")
    return order_RN


# ---- questions users ask ----------------------------------------------------------------------------
def _steps(df: pl.DataFrame) -> np.ndarray:
    """(R, N) step at which each position was generated."""
    return step_of_position(torch.from_numpy(np.stack(df["permutation"].to_numpy()).astype(np.int64))).numpy()


def mean_step_heatmap(orders_dir, label: int | None = None, split: str | None = "train") -> np.ndarray:
    """(H, W) mean generation step per grid position (low = generated early)."""
    lf = scan(orders_dir)
    if split:
        lf = lf.filter(pl.col("split") == split)
    if label is not None:
        lf = lf.filter(pl.col("label") == label)
    df = lf.select("permutation").collect()
    if not len(df):
        raise ValueError(f"{orders_dir}: no rows for split={split!r} label={label!r}")
    mean_N = _steps(df).mean(0)
    side = math.isqrt(len(mean_N))
    return mean_N.reshape(side, side)


def per_class(orders_dir) -> pl.DataFrame:
    """Per class: image count, mean NLL under extracted vs random order, mean first position."""
    return (scan(orders_dir)
            .group_by("label")
            .agg(pl.len().alias("images"), pl.col("nll_extracted").mean(), pl.col("nll_random").mean(),
                 pl.col("permutation").list.first().mean().alias("mean_first_position"))
            .sort("label").collect())


def closest_to_raster(orders_dir, n: int = 10) -> pl.DataFrame:
    """Images whose extracted order is most raster-like (Kendall tau to raster order)."""
    df = scan(orders_dir).select("image_id", "label", "permutation").collect()
    taus = [kendall_tau_to_raster(np.asarray(p)) for p in df["permutation"].to_list()]
    return (df.with_columns(pl.Series("tau_to_raster", taus)).drop("permutation")
            .sort("tau_to_raster", descending=True).head(n))


def first_positions(orders_dir) -> pl.DataFrame:
    """How often each grid position is generated first."""
    return (scan(orders_dir).select(pl.col("permutation").list.first().alias("position"))
            .group_by("position").agg(pl.len().alias("count")).sort("count", descending=True).collect())


def save_heatmap(heat_HW: np.ndarray, path, title: str = "mean generation step") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.2, 3))
    im = ax.imshow(heat_HW, cmap="viridis")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(im, ax=ax, fraction=0.046)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m oar_core.order_table", description="Query an extracted-orders table.")
    ap.add_argument("orders_dir")
    ap.add_argument("query", choices=["summary", "heatmap", "per-class", "closest-to-raster", "first-positions"])
    ap.add_argument("--label", type=int, default=None)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--png", default=None, help="heatmap: also save it as this PNG")
    a = ap.parse_args(argv)
    pl.Config.set_tbl_rows(50)
    try:
        if a.query == "summary":
            print(scan(a.orders_dir).group_by("split").agg(pl.len().alias("images"), pl.col("nll_extracted").mean(),
                                                            pl.col("nll_random").mean()).sort("split").collect())
        elif a.query == "heatmap":
            heat = mean_step_heatmap(a.orders_dir, a.label)
            print(np.array2string(heat, precision=1, max_line_width=200))
            if a.png:
                save_heatmap(heat, a.png)
        elif a.query == "per-class":
            print(per_class(a.orders_dir))
        elif a.query == "closest-to-raster":
            print(closest_to_raster(a.orders_dir, a.n))
        else:
            print(first_positions(a.orders_dir).head(a.n))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
