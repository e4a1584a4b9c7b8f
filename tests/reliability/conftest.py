"""Fixtures shared by the reliability tests.

The session fixtures of tests/fixtures_pipeline.py come from tests/conftest.py's `pytest_plugins`, so every module
shares one tiny token set and one any-order model."""
from __future__ import annotations

import pytest

from tests.fixtures_pipeline import run_module, write_params


def error_line(proc, stage: str) -> str:
    """The stage failed cleanly: exit 1, no traceback, and stderr ends in exactly one `error: [stage] ...` line."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.rstrip().splitlines()[-1]
    assert last.startswith(f"error: [{stage}] "), proc.stderr[-2000:]
    assert sum(ln.startswith("error:") for ln in proc.stderr.splitlines()) == 1
    return last


def files_under(root) -> set[str]:
    """Every file (hidden ones included) under `root`, relative; empty if it does not exist."""
    from pathlib import Path

    root = Path(root)
    return {str(f.relative_to(root)) for f in root.rglob("*") if f.is_file()} if root.exists() else set()


@pytest.fixture(scope="session")
def reference_orders(any_order_model, tiny_shards, tmp_path_factory):
    """An uninterrupted `python -m pipeline.extract_orders` run over the tiny shards (3 parts, 640 rows):
    the reference that killed-and-resumed and repeated runs must reproduce exactly."""
    from oar_core.params import ExtractParams

    root = tmp_path_factory.mktemp("reference_orders")
    p = ExtractParams(checkpoint=str(any_order_model[0]), out_dir="orders", batch_size=64)
    write_params(root / "params.yaml", extract_orders=p)
    r = run_module(["pipeline.extract_orders", "--shards", str(tiny_shards)], root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((root / "orders").glob("*.parquet"))) == 3
    return root / "orders", p
