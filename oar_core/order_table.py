"""The extracted-orders table: one Parquet part per token shard, queried lazily with Polars.

    import polars as pl
    orders = pl.scan_parquet("data/orders/*.parquet")       # works while extraction is still running
    orders.filter(pl.col("label") == 3).select("image_id", "nll_extracted").collect()

CLI: `python -m oar_core.order_table data/orders {summary,heatmap,per-class,closest-to-raster,first-positions}`.
"""
from __future__ import annotations

import argparse
import fcntl
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

META_CKPT, META_PARAMS, META_CRC = b"oar.checkpoint_hash", b"oar.params_hash", b"oar.page_checksums"
RERUN = "rerun `dvc repro extract_orders`"


def write_part(path: Path, table: pa.Table, ckpt_hash: str, params_hash: str) -> None:
    table = table.replace_schema_metadata({META_CKPT: ckpt_hash.encode(), META_PARAMS: params_hash.encode(),
                                           META_CRC: b"crc32"})
    # temp name ends in .tmp, so `*.parquet` globs never see a half-written part; the lock tells another run's
    # remove_stale_temps that this temp file is live (its mtime check covers the instants around the lock)
    with atomic_path(path) as tmp, tmp.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        pq.write_table(table, tmp, write_page_checksum=True)


def read_part(path, columns: list[str] | None = None) -> pa.Table:
    """A part read whole, every page checked against its CRC: bytes flipped under an intact footer decode
    to plausible garbage otherwise (polars does not check the CRCs)."""
    try:
        return pq.read_table(path, columns=columns, page_checksum_verification=True)
    except Exception as e:  # truncated, bit-flipped or foreign: pyarrow raises OSError or Arrow*Error
        raise ValueError(f"{path}: corrupt orders part ({type(e).__name__}: {' '.join(str(e).split())}); "
                         f"{RERUN}, which redoes it") from None


def part_is_current(path: Path, ckpt_hash: str, params_hash: str, ids: list[str]) -> bool:
    """A part a restarted run can skip: made by the same checkpoint and params, holding exactly `ids` (its
    shard's, in order), and reading back completely under the checksums written with it. Anything else
    (missing, corrupt, from another shard layout or from a writer without checksums) is redone."""
    try:
        table = read_part(path)
    except ValueError:
        return False
    meta = table.schema.metadata or {}
    return (meta.get(META_CKPT) == ckpt_hash.encode() and meta.get(META_PARAMS) == params_hash.encode()
            and meta.get(META_CRC) == b"crc32" and table.column("image_id").to_pylist() == list(ids))


def parts(orders_dir: str | Path) -> list[Path]:
    found = sorted(Path(orders_dir).glob("*.parquet"))
    if not found:
        raise FileNotFoundError(f"{orders_dir}: no orders parts (*.parquet); run `dvc repro extract_orders` first")
    return found


def scan(orders_dir: str | Path) -> pl.LazyFrame:
    return pl.scan_parquet([str(p) for p in parts(orders_dir)])


def orders_for_ids(orders_dir, ids: list[str], N: int, missing_ok: bool = False) -> torch.Tensor | None:
    """(len(ids), N) orders matched to `ids` by image id; checks every part reads back intact, that no image
    has two rows (a join would then return extra rows and shift every later one onto a neighbour's order)
    and that every row is a permutation of the grid."""
    table = pl.concat([pl.from_arrow(read_part(f, ["image_id", "permutation"])).with_columns(part=pl.lit(f.name))
                       for f in parts(orders_dir)])
    dup = table.filter(pl.col("image_id").is_duplicated())
    if len(dup):
        first = dup.filter(pl.col("image_id") == dup["image_id"][0])
        raise ValueError(f"{orders_dir}: {dup['image_id'].n_unique()} image(s) have more than one row, e.g. "
                         f"{first['image_id'][0]!r}: {len(first)} rows in "
                         f"{', '.join(first['part'].unique(maintain_order=True))}; {RERUN}")
    want = pl.DataFrame({"image_id": ids, "_row": np.arange(len(ids))})
    got = want.join(table.drop("part"), on="image_id", how="left")
    missing = got.filter(pl.col("permutation").is_null())
    if len(missing):
        if missing_ok and len(missing) == len(ids):
            return None
        raise ValueError(f"{orders_dir}: no extracted order for {len(missing)} image(s), "
                         f"e.g. {missing['image_id'][0]!r}; "
                         f"{RERUN} on the current shards")
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


def save_heatmaps(heat: dict, path, title: str = "mean generation step", class_names: list[str] | None = None) -> None:
    """(H, W) mean-generation-step maps side by side, one per key (a class id, named by `class_names` when given;
    or any label), on one colour scale from 0, under `title`: the report's heat maps and the CLI's --png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
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
