"""The extracted-orders table: one Parquet part per token shard, each written with page checksums.

    from oar_core.order_table import scan
    orders = scan("data/orders")             # every part checked against its checksums, no image twice
    orders.filter(pl.col("label") == 3).select("image_id", "nll_extracted").collect()
    pl.scan_parquet("data/orders/*.parquet")  # plain Polars: lazy and works mid-extraction, but checks nothing

Queries and their CLI: `oar_core.order_queries`."""
from __future__ import annotations

import fcntl
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from oar_core.orders import is_permutation
from oar_core.storage import atomic_path

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


def extracted_by(orders_dir: str | Path) -> dict[str, str | None]:
    """{part name: content hash of the checkpoint that extracted it (storage.file_hash), None if it records none},
    read from each part's footer."""
    return {f.name: (h.decode() if (h := (pq.read_schema(f).metadata or {}).get(META_CKPT)) else None)
            for f in parts(orders_dir)}


def read_table(orders_dir: str | Path, columns: list[str] | None = None) -> pl.DataFrame:
    """Every part read whole under its page checksums (a flipped bit is an error, not a plausible number), with a
    `part` column, and no image twice (a duplicated part would count it twice and shift joins)."""
    cols = None if columns is None else list(dict.fromkeys(["image_id", *columns]))
    table = pl.concat([pl.from_arrow(read_part(f, cols)).with_columns(part=pl.lit(f.name))
                       for f in parts(orders_dir)], how="vertical_relaxed")
    dup = table.filter(pl.col("image_id").is_duplicated())
    if len(dup):
        first = dup.filter(pl.col("image_id") == dup["image_id"][0])
        raise ValueError(f"{orders_dir}: {dup['image_id'].n_unique()} image(s) have more than one row, e.g. "
                         f"{first['image_id'][0]!r}: {len(first)} rows in "
                         f"{', '.join(first['part'].unique(maintain_order=True))}; {RERUN}")
    return table


def scan(orders_dir: str | Path, columns: list[str] | None = None) -> pl.LazyFrame:
    """The verified table (read_table) as a LazyFrame, for the project's queries. (Polars' own
    `pl.scan_parquet` reads parts without their checksums.)"""
    return read_table(orders_dir, columns).lazy()


def orders_for_ids(orders_dir, ids: list[str], N: int, missing_ok: bool = False) -> torch.Tensor | None:
    """(len(ids), N) orders matched to `ids` by image id; checks every part reads back intact, that no image
    has two rows (a join would then return extra rows and shift every later one onto a neighbour's order)
    and that every row is a permutation of the grid."""
    table = read_table(orders_dir, ["permutation"])
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
