"""Questions users ask of an extracted-orders table (Polars over its Parquet parts), and their command line:

    python -m oar_core.order_queries data/orders summary | heatmap [--label K --png F] | per-class
    python -m oar_core.order_queries data/orders closest-to-raster | first-positions"""
from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import polars as pl
import torch

from oar_core.figures import save_heatmaps
from oar_core.order_table import scan
from oar_core.orders import kendall_tau_to_raster, step_of_position


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


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m oar_core.order_queries",
                                 description="Query an extracted-orders table.")
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
                save_heatmaps({"all labels" if a.label is None else f"label {a.label}": heat}, a.png)
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


def extracted_heatmaps(orders_dir) -> dict[int, np.ndarray]:
    """Per class mean step of the extracted (teacher-forced) training orders, via order_table."""
    labels = scan(orders_dir).select("label").unique().collect()["label"].sort().to_list()
    return {int(k): mean_step_heatmap(orders_dir, label=k, split="train") for k in labels}
