"""Faults: a stage SIGKILLed mid-run and rerun ends exactly where an uninterrupted run ends, and no
half-written file is ever visible under an output name. (`train`'s own kill test is tests/test_train.py.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from oar_core.io import load_torch
from oar_core.model import load_gpt
from oar_core.order_table import scan
from tests.fixtures_pipeline import tiny_train_params
from tests.reliability.conftest import files_under, run_module, write_params


def _popen(args, cwd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


def _kill_when(proc, ready, timeout=180.0):
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.stderr.read()


def _part_bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.parquet"))}


def test_extract_orders_killed_between_parts_resumes_to_identical_rows(reference_orders, tiny_shards, tmp_path):
    ref_dir, p = reference_orders
    write_params(tmp_path / "params.yaml", extract_orders=p)
    out = tmp_path / "orders"
    proc = _popen(["-m", "pipeline.extract_orders", "--shards", str(tiny_shards)], tmp_path)
    _kill_when(proc, lambda: len(list(out.glob("*.parquet"))) >= 1)
    done = sorted(out.glob("*.parquet"))
    assert 1 <= len(done) < 3, f"the kill came too late to test a resume ({len(done)} parts)"
    # what is visible under a final name is complete: every finished part reads back whole
    for f in done:
        assert pq.read_table(f).num_rows == 256
    assert len(scan(out).collect()) == 256 * len(done)  # a reader mid-run sees only whole parts

    r = run_module(["pipeline.extract_orders", "--shards", str(tiny_shards)], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"'parts_skipped': {len(done)}" in r.stdout.replace('"', "'") or f'"parts_skipped": {len(done)}' in r.stdout
    assert _part_bytes(out) == _part_bytes(ref_dir)  # identical rows, byte for byte
    assert pl.read_parquet(out / "*.parquet").equals(pl.read_parquet(ref_dir / "*.parquet"))
    assert not [f for f in files_under(out) if f.endswith(".tmp")]


KILL_DURING_WRITE = """
import os, signal, sys
import pyarrow.parquet as pq

def half_written_then_killed(table, where, **kw):
    with open(where, "wb") as f:  # a few bytes of a part, then the power goes
        f.write(b"PAR1" + bytes(200))
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

pq.write_table = half_written_then_killed
from pipeline.extract_orders import main
main(["--shards", sys.argv[1]])
"""


def test_extract_orders_killed_while_writing_a_part_leaves_no_visible_part(reference_orders, tiny_shards, tmp_path):
    ref_dir, p = reference_orders
    write_params(tmp_path / "params.yaml", extract_orders=p)
    (tmp_path / "kill_during_write.py").write_text(KILL_DURING_WRITE)
    r = subprocess.run([sys.executable, "kill_during_write.py", str(tiny_shards)], cwd=tmp_path, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])},
                       timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    out = tmp_path / "orders"
    left = files_under(out)
    assert len(left) == 1 and next(iter(left)).startswith(".train-000000.parquet.") and next(iter(left)).endswith(".tmp")
    assert not list(out.glob("*.parquet"))  # the half-written bytes never appeared under the part's name
    with pytest.raises(FileNotFoundError, match="no orders parts"):
        scan(out)

    r = run_module(["pipeline.extract_orders", "--shards", str(tiny_shards)], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert files_under(out) == {"train-000000.parquet", "train-000001.parquet", "test-000000.parquet"}  # temp swept
    assert _part_bytes(out) == _part_bytes(ref_dir)


def test_finetune_killed_mid_run_resumes_to_identical_weights(reference_orders, any_order_model, tiny_shards, tmp_path):
    ref_dir, _ = reference_orders
    p = tiny_train_params("models/oar", order="given", orders_dir=str(ref_dir), init_from=str(any_order_model[0]),
                          steps=40, lr=1e-3, warmup_steps=5, random_mix=0.25, ckpt_every=5, eval_every=20)
    for d in ("straight", "killed"):
        (tmp_path / d).mkdir()
        write_params(tmp_path / d / "params.yaml", finetune=p)
    args = ["pipeline.train", "--stage", "finetune", "--shards", str(tiny_shards)]
    r = run_module(args, tmp_path / "straight")
    assert r.returncode == 0, r.stderr[-2000:]

    killed = tmp_path / "killed"
    ckpt = killed / "runs/finetune/last.pt"
    _kill_when(_popen(["-m", *args], killed), ckpt.exists)
    assert ckpt.exists() and not (killed / "models/oar/model.pt").exists(), "the kill came too late to test a resume"
    state = load_torch(ckpt, "run checkpoint")  # the visible checkpoint is whole
    assert 0 < state["step"] < 40 and state["step"] % 5 == 0
    assert not [f for f in files_under(killed / "models")] and not (killed / "dvclive").exists()

    r = run_module(args, killed)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming from runs/finetune/last.pt at step" in r.stdout + r.stderr
    a, b = load_gpt(tmp_path / "straight/models/oar/model.pt")[0].state_dict(), load_gpt(killed / "models/oar/model.pt")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    import json

    ma, mb = (json.loads((tmp_path / d / "dvclive/finetune/metrics.json").read_text()) for d in ("straight", "killed"))
    for k in ("train_loss", "test_bits_per_token", "steps", "params", "step"):
        assert ma[k] == mb[k], k
    for name in ("train_loss.tsv", "test_bits_per_token.tsv"):  # DVCLive's step-wise curves, byte for byte
        curve = f"dvclive/finetune/plots/metrics/{name}"
        assert (tmp_path / "straight" / curve).read_bytes() == (killed / curve).read_bytes()
    assert not (killed / "runs/finetune/last.pt").exists()
    assert not [f for f in files_under(killed) if f.endswith(".tmp")]
