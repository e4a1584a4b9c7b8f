"""Session fixtures for the model stages: real Fashion-MNIST tokens and a small trained any-order model.

Imported by the test modules that need them (pytest picks fixtures up from the importing module)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from oar_core.params import ModelParams, TrainParams

TINY_MODEL = ModelParams(n_layer=2, n_head=2, d_model=64)


def tiny_train_params(out_dir, **kw) -> TrainParams:
    base = dict(order="random", model=TINY_MODEL, out_dir=str(out_dir), steps=60, batch_size=32, lr=3e-3,
                min_lr=3e-4, warmup_steps=10, ckpt_every=20, eval_every=30, log_every=10, eval_batches=2)
    return TrainParams(**{**base, **kw})


def write_params(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump({k: v.model_dump(mode="json") for k, v in sections.items()}))
    return path


def run_module(args: list[str], cwd, timeout=300, **popen) -> subprocess.CompletedProcess:
    """A stage as its own process, as DVC / Prefect run it: one thread, so runs are reproducible and
    two test processes do not spin against each other on a 2-core machine."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **popen)


@pytest.fixture(scope="session")
def tiny_shards(fmnist_small, tmp_path_factory) -> Path:
    """Token shards of 512 train / 128 test real images (7x7 grid, 64 codes), 2 shards per split."""
    from oar_core.params import TokenizeParams, TokenizerParams
    from pipeline.tokenize import run_tokenize
    from pipeline.tokenizer import run_tokenizer
    from tests.conftest import single_thread

    root = tmp_path_factory.mktemp("tiny_shards")
    with single_thread():
        run_tokenizer(TokenizerParams(codebook_size=64, steps=150, batch_size=64), fmnist_small,
                      root / "tokenizer.pt", root / "dvclive/tokenizer")
        run_tokenize(TokenizeParams(out=str(root / "shards"), shard_size=256), fmnist_small, root / "tokenizer.pt")
    return root / "shards"


@pytest.fixture(scope="session")
def any_order_model(tiny_shards, tmp_path_factory) -> tuple[Path, dict]:
    """A small any-order model trained for a few hundred steps (so its orders are not noise)."""
    from pipeline.train import run_train
    from tests.conftest import single_thread

    root = tmp_path_factory.mktemp("any_order")
    p = tiny_train_params(root / "models/random", steps=200, eval_every=100)
    with single_thread():
        summary = run_train(p, "train_random", str(tiny_shards), root / "runs", root / "dvclive")
    return root / "models/random/model.pt", summary
