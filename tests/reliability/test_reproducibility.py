"""Reproducibility on CPU with a fixed thread count: same seed + params -> the same ingest arrays, tokenizer,
token shards (byte-identical), orders (byte-identical Parquet) and metrics. GPU caveats: README "Reliability"."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from oar_core.feature_net import INDOMAIN_NAME, save_classifier
from oar_core.fidelity import fidelity_metrics
from oar_core.image_shards import load_split
from oar_core.likelihood import sampler_bits
from oar_core.model import load_gpt
from oar_core.params import IngestParams, TokenizeParams, TokenizerParams
from oar_core.storage import file_hash
from oar_core.token_shards import load_tokens
from oar_core.tokenizer import load_tokenizer
from pipeline.extract_orders import run_extract
from pipeline.feature_net import train_classifier
from pipeline.ingest import run_ingest
from pipeline.tokenize import run_tokenize
from pipeline.tokenizer import run_tokenizer
from tests.conftest import FMNIST_DIR, single_thread
from tests.reliability.conftest import files_under


def _digests(root) -> dict[str, str]:
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in sorted(files_under(root))}


@pytest.mark.slow  # a whole dvc run or a kill-and-resume; the default run keeps the lighter tests of this
def test_ingest_tokenizer_tokenize_twice_give_identical_tokens(fmnist_small, tmp_path):
    runs = []
    for k in ("a", "b"):
        root = tmp_path / k
        ingest = run_ingest(IngestParams(source=str(FMNIST_DIR), out_dir=str(root / "ingest"),
                                         max_train=512, max_test=128))
        with single_thread():
            tok = run_tokenizer(TokenizerParams(codebook_size=64, steps=40, batch_size=64), root / "ingest",
                                root / "tokenizer.pt", root / "tokenizer.json")
            run_tokenize(TokenizeParams(out=str(root / "shards"), shard_size=256), root / "ingest",
                         root / "tokenizer.pt")
        runs.append((root, ingest, tok))
    (a, _, tok_a), (b, _, tok_b) = runs
    for split in ("train", "test"):  # ingest: identical arrays (and identical to the session fixture's ingest)
        for x, y, z in zip(load_split(a / "ingest", split), load_split(b / "ingest", split),
                           load_split(fmnist_small, split)):
            assert np.array_equal(x, y) and np.array_equal(x, z)
    assert _digests(a / "ingest") == _digests(b / "ingest")  # npz, manifest and report: byte-identical
    sa, sb = load_tokenizer(a / "tokenizer.pt").state_dict(), load_tokenizer(b / "tokenizer.pt").state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert tok_a["recon_mse"] == tok_b["recon_mse"]
    assert file_hash(a / "tokenizer.pt") == file_hash(b / "tokenizer.pt")  # even the checkpoint bytes
    # shards: byte-identical tars and meta.json (stable DVC hashes)
    assert _digests(a / "shards") == _digests(b / "shards") and len(files_under(a / "shards")) == 4


@pytest.mark.slow  # a whole dvc run or a kill-and-resume; the default run keeps the lighter tests of this
def test_extract_twice_gives_identical_parquet(reference_orders, tiny_shards, tmp_path, monkeypatch):
    """The reference ran as a stage subprocess (OMP_NUM_THREADS=1); this one in-process on one thread, with the
    very same params (out_dir is relative, and part of the params hash stored in every part)."""
    ref_dir, p = reference_orders
    monkeypatch.chdir(tmp_path)
    with single_thread():
        s = run_extract(p, str(tiny_shards))
    assert s["parts_written"] == 3
    assert _digests(tmp_path / "orders") == _digests(ref_dir)
    # a different seed changes nothing for greedy extraction except the random-order baseline column
    with single_thread():
        run_extract(p.model_copy(update={"out_dir": str(tmp_path / "seed1"), "seed": 1}), str(tiny_shards),
                    only_parts=["test-000000"])
    import polars as pl

    x, y = pl.read_parquet(ref_dir / "test-000000.parquet"), pl.read_parquet(tmp_path / "seed1/test-000000.parquet")
    assert x["permutation"].to_list() == y["permutation"].to_list()
    assert x["nll_random"].to_list() != y["nll_random"].to_list()


def test_metrics_twice_are_identical(fmnist_small, any_order_model, tiny_shards, tmp_path):
    train_NHWC, train_labels, _ = load_split(fmnist_small, "train")
    test_NHWC, _, _ = load_split(fmnist_small, "test")
    with single_thread():
        clfs = [train_classifier(train_NHWC, train_labels, steps=30, batch_size=64, seed=0, progress=False)
                for _ in range(2)]
        ca, cb = (c.state_dict() for c in clfs)
        assert all(torch.equal(ca[k], cb[k]) for k in ca)
        save_classifier(tmp_path / "clf.pt", clfs[0])
        gen = train_NHWC[:200]  # stands in for generated images
        m1, m2 = (fidelity_metrics(gen, test_NHWC, INDOMAIN_NAME, str(tmp_path / "clf.pt"), kid_subset_size=50, seed=0)
                  for _ in range(2))
        assert m1 == m2 and all(np.isfinite(v) for v in m1.values())
        model, _ = load_gpt(any_order_model[0])
        d = load_tokens(tiny_shards, "test")
        tok = torch.from_numpy(d["tokens"].astype(np.int64)).flatten(1)
        lab = torch.from_numpy(d["labels"])
        n1, n2 = (sampler_bits(model, tok, lab, "random", batch_size=64, seed=0) for _ in range(2))
    assert n1 == n2
    json.dumps(m1)  # plain floats: metrics JSON round-trips
