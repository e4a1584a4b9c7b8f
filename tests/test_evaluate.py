"""Sample + evaluate stages on tiny inputs built here (real Fashion-MNIST images, untrained tiny models)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oar_core.feature_net import INDOMAIN_NAME, classifier_accuracy, load_classifier
from oar_core.fidelity import fidelity_metrics
from oar_core.image_shards import load_split
from oar_core.model import GPT, GPTConfig, save_gpt
from oar_core.params import EvaluateParams, FeatureNetParams, SampleModelParams, SampleParams, TokenizeParams
from pipeline.evaluate import run_evaluate
from pipeline.feature_net import run_feature_net
from pipeline.sample import run_sample
from tests.helpers import load_image_folder

MODELS = ["raster", "any-order", "any-order-confidence", "oar"]


@pytest.fixture(scope="module")
def classifier(fmnist_small, tmp_path_factory):
    """The feature_net stage at 60 steps."""
    root = tmp_path_factory.mktemp("clf")
    summary = run_feature_net(FeatureNetParams(steps=60, batch_size=64), fmnist_small, root / "feature_net.pt",
                              root / "dvclive/feature_net", progress=False)
    assert summary["task"] == "classes"
    assert json.loads((root / "dvclive/feature_net/metrics.json").read_text()) == summary
    return root / "feature_net.pt", load_classifier(root / "feature_net.pt")[0]


def test_indomain_extractor_separates_real_from_noise(fmnist_small, classifier):
    path, model = classifier
    train_NHWC, _, _ = load_split(fmnist_small, "train")
    test_NHWC, test_labels, _ = load_split(fmnist_small, "test")
    assert classifier_accuracy(model, test_NHWC, test_labels) > 0.4  # 60 steps: far above chance (0.1)
    noise_NHWC = np.random.default_rng(0).integers(0, 256, test_NHWC.shape, dtype=np.uint8)
    real = fidelity_metrics(train_NHWC[:256], test_NHWC, INDOMAIN_NAME, str(path), kid_subset_size=50)
    fake = fidelity_metrics(noise_NHWC, test_NHWC, INDOMAIN_NAME, str(path), kid_subset_size=50)
    assert set(real) == {"fid", "kid", "kid_std", "is", "is_std", "precision", "recall"}
    assert real["fid"] * 10 < fake["fid"], (real, fake)
    assert real["kid"] < fake["kid"]
    # real images lie on the real manifold and cover it; noise covers none of it (in a 60-step classifier's
    # space noise features land inside real k-NN balls, so precision alone would not tell)
    assert real["precision"] > 0.5 and real["recall"] > 0.5 and fake["recall"] < 0.1, (real, fake)


def test_inception_score_spread_is_reported_only_when_there_are_splits(fmnist_small, classifier):
    """torch-fidelity splits IS over groups of 50 here: at 50 samples one split, whose std is 0.00 by construction
    (the report showed `± 0.00` in every row); no spread is reported then, a real one from 100 samples on."""
    train_NHWC, _, _ = load_split(fmnist_small, "train")
    test_NHWC, _, _ = load_split(fmnist_small, "test")
    few = fidelity_metrics(train_NHWC[:50], test_NHWC, INDOMAIN_NAME, str(classifier[0]), kid_subset_size=20)
    more = fidelity_metrics(train_NHWC[:100], test_NHWC, INDOMAIN_NAME, str(classifier[0]), kid_subset_size=20)
    assert "is_std" not in few and few["is"] > 1
    assert more["is_std"] > 0


@pytest.fixture(scope="module")
def pipeline_dir(fmnist_small, tmp_path_factory):
    """Tokenizer, shards, model checkpoints and samples of four tiny untrained models."""
    from oar_core.tokenizer import VQTokenizer, save_tokenizer
    from pipeline.tokenize import run_tokenize

    root = tmp_path_factory.mktemp("pipe")
    torch.manual_seed(0)
    save_tokenizer(root / "tokenizer.pt", VQTokenizer(28, 1, 7, codebook_size=16, code_dim=8, hidden=16))
    run_tokenize(TokenizeParams(out=str(root / "shards"), shard_size=1000), str(fmnist_small),
                 str(root / "tokenizer.pt"))
    cfg = GPTConfig(grid_h=7, grid_w=7, vocab_size=16, num_classes=10, n_layer=1, n_head=2, d_model=32)
    for kind in ("raster", "random", "oar"):
        save_gpt(root / f"{kind}.pt", GPT(cfg), order=kind)
    specs = [SampleModelParams(name=n, checkpoint=str(root / f"{c}.pt"), order=o) for n, c, o in
             [("raster", "raster", "raster"), ("any-order", "random", "random"),
              ("any-order-confidence", "random", "confidence"), ("oar", "oar", "confidence")]]
    sp = SampleParams(out_dir=str(root / "samples"), tokenizer=str(root / "tokenizer.pt"), models=specs,
                      n_per_model=40, batch_size=20)
    run_sample(sp, live_dir=str(root / "dvclive/sample"), progress=False)
    return root, sp


def test_sample_outputs_are_complete_and_deterministic(pipeline_dir, tmp_path):
    import pyarrow.parquet as pq

    root, sp = pipeline_dir
    folder = root / "samples" / "oar"
    assert len(list(folder.glob("0*.png"))) == 40 and (folder / "grid.png").exists()
    table = pq.read_table(folder / "orders.parquet").to_pydict()
    assert table["label"][:10] == list(range(10))  # class-balanced
    assert all(sorted(o) == list(range(49)) for o in table["order"])  # every order is a permutation
    assert str(pq.read_schema(folder / "orders.parquet").field("order").type) == "list<element: uint16>"
    # same seed -> same images
    again = sp.model_copy(update={"out_dir": str(tmp_path / "s"), "models": sp.models[3:]})
    run_sample(again, live_dir=str(tmp_path / "m"), progress=False)
    a, b = (load_image_folder(d, 28, 1) for d in (folder, tmp_path / "s" / "oar"))
    assert np.array_equal(a, b)


def test_evaluate_writes_metrics_per_model_with_feature_space(pipeline_dir, fmnist_small, classifier, tmp_path):
    root, _ = pipeline_dir
    p = EvaluateParams(out_dir=str(tmp_path / "reports"), kid_subset_size=20)
    run_evaluate(p, str(root / "samples"), str(fmnist_small), str(root / "shards"), str(tmp_path / "no-orders"),
                 str(root / "tokenizer.pt"), str(tmp_path / "dvclive"), str(tmp_path / "dvclive/evaluate"),
                 classifier[0],
                 progress=False)
    from oar_core.live import read_per_key

    metrics = read_per_key(tmp_path / "dvclive/evaluate")  # DVCLive's folders: <model>/metrics.json, a row each
    assert sorted(metrics) == sorted(MODELS + ["real_reference", "reconstruction", "feature_net"])
    labels = json.loads((tmp_path / "reports" / "metrics_labels.json").read_text())
    for m in MODELS + ["real_reference", "reconstruction"]:
        for key in ("fid_indomain", "kid_indomain", "kid_indomain_std", "is_indomain", "precision_indomain",
                    "recall_indomain"):
            assert isinstance(metrics[m][key], float) and math.isfinite(metrics[m][key]), (m, key)
        assert "is_indomain_std" not in metrics[m]  # 40 samples: one IS split, no spread to report
        assert labels[m]["feature_space"].startswith("in-domain classifier")
    for m in MODELS:  # untrained models: about log2(16) = 4 bits/token
        assert 3.0 < metrics[m]["nll_bits_per_token"] < 5.0
    assert labels["raster"]["nll_order"] == "raster order, exact"
    assert labels["any-order"]["nll_order"] == "random order, bound: mean over 2 random orders"
    assert labels["oar"]["nll_order"] == "confidence order, exact: its greedy location rule, teacher-forced"
    assert "oracle_order_bits_per_token" not in metrics["oar"]  # no extracted orders given: no diagnostic
    assert metrics["real_reference"]["fid_indomain"] < metrics["raster"]["fid_indomain"]
    # the tiny tokenizer loses detail: its reconstructions of the very same images score worse than they do
    assert metrics["real_reference"]["fid_indomain"] < metrics["reconstruction"]["fid_indomain"]
    # metrics JSON holds only numbers (DVC-friendly); the strings live in metrics_labels.json
    flat = [v for d in metrics.values() for v in d.values()]
    assert all(isinstance(v, (int, float)) for v in flat)
    assert "skipped: no local Inception weights" in labels["feature_space"]["inception"]
    report = (tmp_path / "reports" / "report.md").read_text()
    assert "skipped: no local Inception weights (set evaluate.inception_weights)" in report
    assert "| reconstruction |" in report and "Tokenizer floor: reconstructions score FID" in report
    for m in MODELS:  # confidence along its own greedy orders, for every model that chooses where to go
        has = {"greedy_confidence", "greedy_accuracy"} <= set(metrics[m])
        assert has == (labels[m]["sample_order"] != "raster"), m
    assert (tmp_path / "reports" / "figures" / "calibration.png").exists() and "![calibration]" in report
    for m in MODELS:
        assert (tmp_path / "reports" / "figures" / f"grid_{m}.png").exists()
        assert (tmp_path / "reports" / "figures" / f"strip_{m}.png").exists()
    assert (tmp_path / "reports" / "figures" / "heat_oar.png").exists()


@pytest.mark.slow  # three evaluate runs: about 45 s
def test_a_rerun_for_strip_steps_recomputes_no_metric(pipeline_dir, fmnist_small, classifier, tmp_path, monkeypatch,
                                                      capsys):
    """Run by DVC, evaluate keeps its slow results by a hash of their inputs: a rerun that only changed
    strip_steps redraws the strips and takes the metrics and likelihoods back, the same numbers; a changed input
    (here nll_orders) recomputes what reads it."""
    import pipeline.evaluate as evaluate
    from oar_core.live import read_per_key

    root, _ = pipeline_dir
    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # as `dvc repro` sets it

    def run(**kw):
        run_evaluate(EvaluateParams(out_dir="reports", kid_subset_size=20, **kw), str(root / "samples"),
                     str(fmnist_small), str(root / "shards"), None, str(root / "tokenizer.pt"), "dvclive",
                     "dvclive/evaluate", classifier[0], progress=False)
        return read_per_key("dvclive/evaluate")

    first = run(strip_steps=8)
    strip = (tmp_path / "reports/figures/strip_oar.png").read_bytes()
    calls = []
    real_nll = evaluate.sampler_nll
    monkeypatch.setattr(evaluate, "fidelity_metrics", lambda *a, **k: calls.append("fidelity") or 1 / 0)
    monkeypatch.setattr(evaluate, "sampler_nll", lambda *a, **k: calls.append("nll") or real_nll(*a, **k))
    assert run(strip_steps=4) == first and calls == []  # nothing recomputed
    assert (tmp_path / "reports/figures/strip_oar.png").read_bytes() != strip  # the strips are redrawn
    assert "likelihood oar: unchanged inputs, kept from an earlier run" in capsys.readouterr().err
    again = run(strip_steps=4, nll_orders=3)  # the likelihood bounds of stochastic samplers read nll_orders
    assert calls == ["nll"] * len(MODELS) and again["raster"] == first["raster"]


def _evaluate(root, fmnist_small, samples, tmp_path, classifier):
    p = EvaluateParams(out_dir=str(tmp_path / "r"), kid_subset_size=20)
    run_evaluate(p, str(samples), str(fmnist_small), str(root / "shards"), None, str(root / "tokenizer.pt"),
                 str(tmp_path / "dvclive"), str(tmp_path / "dvclive/evaluate"), classifier[0], progress=False)


def test_evaluate_missing_samples_says_how_to_fix(pipeline_dir, fmnist_small, classifier, tmp_path):
    root, _ = pipeline_dir
    with pytest.raises(ValueError, match=r"samples folder not found; run `dvc repro sample`"):
        _evaluate(root, fmnist_small, tmp_path / "nowhere", tmp_path, classifier)
    empty = tmp_path / "samples" / "oar"
    empty.mkdir(parents=True)
    (empty / "meta.json").write_text(json.dumps({"name": "oar", "order": "confidence", "checkpoint": "x"}))
    with pytest.raises(ValueError, match=r"samples/oar: no generated images .*dvc repro sample"):
        _evaluate(root, fmnist_small, tmp_path / "samples", tmp_path, classifier)


def test_evaluate_wrong_size_images_names_folder_and_fix(pipeline_dir, fmnist_small, classifier, tmp_path):
    import shutil

    root, _ = pipeline_dir
    samples = tmp_path / "samples"
    shutil.copytree(root / "samples", samples)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(samples / "any-order" / "00003.png")
    with pytest.raises(ValueError, match=r"any-order: 00003.png is 32x32 but the real test images are 28x28"):
        _evaluate(root, fmnist_small, samples, tmp_path, classifier)


def test_a_sample_rerun_leaves_exactly_the_listed_models_and_no_leftovers(pipeline_dir, tmp_path):
    import shutil

    root, sp = pipeline_dir
    out = tmp_path / "samples"
    shutil.copytree(root / "samples", out)  # four models of 40 images, as a previous run left them
    (out / ".oar.partial").mkdir()  # what a killed run leaves
    (out / ".meta.json.123.tmp").write_text("{")
    rerun = sp.model_copy(update={"out_dir": str(out), "models": sp.models[3:], "n_per_model": 10})
    run_sample(rerun, live_dir=str(tmp_path / "m"), progress=False)
    assert sorted(f.name for f in out.iterdir()) == ["oar"]  # models no longer listed are gone
    assert sorted(f.name for f in (out / "oar").iterdir()) == [f"{i:05d}.png" for i in range(10)] + [
        "grid.png", "meta.json", "orders.parquet"]  # none of the previous run's 40 images


def test_evaluate_sweeps_the_fidelity_caches_that_killed_runs_leaked():
    import os
    import tempfile

    from oar_core.fidelity import temp_cache_dir

    dead = Path(tempfile.gettempdir()) / "oar-fidelity-999999999-leak"  # above Linux's pid_max: never alive
    dead.mkdir(exist_ok=True)
    with temp_cache_dir() as mine:
        assert not dead.exists() and Path(mine).name.startswith(f"oar-fidelity-{os.getpid()}-")
        assert Path(mine).exists()


def test_sample_decodes_with_its_candidate_memory_budget(pipeline_dir, tmp_path, monkeypatch):
    from pipeline import sample as samples

    seen, real = [], samples.generate
    monkeypatch.setattr(samples, "generate", lambda *a, **k: seen.append(k["candidate_chunk_mb"]) or real(*a, **k))
    _, sp = pipeline_dir
    run_sample(sp.model_copy(update={"out_dir": str(tmp_path / "s"), "models": sp.models[3:], "n_per_model": 10,
                                     "candidate_chunk_mb": 0.5}), live_dir=str(tmp_path / "m"), progress=False)
    assert seen == [0.5]


@pytest.mark.slow  # two torchrun processes: `pytest -m slow`
def test_torchrun_ranks_draw_the_same_samples_as_one_process(pipeline_dir, tmp_path):
    """Two gloo CPU ranks split each model's batches and write byte-identical folders to one process's."""
    from tests.fixtures_pipeline import run_module, write_params

    _, sp = pipeline_dir
    p = sp.model_copy(update={"out_dir": "samples", "models": [sp.models[0], sp.models[3]], "n_per_model": 50,
                              "batch_size": 10})  # 5 batches: ranks take 3 and 2
    for name, launch in (("one", []), ("two", ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"])):
        (tmp_path / name).mkdir()
        write_params(tmp_path / name / "params.yaml", sample=p)
        r = run_module(launch + ["-m", "pipeline.sample"] if launch else ["pipeline.sample"], tmp_path / name)
        assert r.returncode == 0, r.stderr[-2000:]
        drawn = sorted(json.loads(ln.split(": ", 1)[1])["raster"]["images_this_process"]
                       for ln in r.stdout.splitlines() if ln.startswith("sample: "))
        assert drawn == ([50] if name == "one" else [20, 30])  # the ranks split the batches, not repeat them
    one, two = ({str(f.relative_to(tmp_path / d)): f.read_bytes() for f in sorted((tmp_path / d / "samples").rglob("*"))
                 if f.is_file()} for d in ("one", "two"))
    assert len(one) == 2 * (50 + 3) and one == two  # PNGs, orders.parquet, grid.png, meta.json per model


def test_samples_are_scored_from_disk_lazily_with_the_same_numbers(pipeline_dir, fmnist_small, classifier):
    from oar_core.fidelity import ImageFiles, image_folder

    root, _ = pipeline_dir
    lazy = image_folder(root / "samples" / "oar", 28, 1)
    assert isinstance(lazy, ImageFiles) and len(lazy) == 40  # nothing decoded yet: files, read per item
    test_NHWC, _, _ = load_split(fmnist_small, "test")
    eager = load_image_folder(root / "samples" / "oar", 28, 1)
    a, b = (fidelity_metrics(x, test_NHWC, INDOMAIN_NAME, str(classifier[0]), kid_subset_size=20)
            for x in (lazy, eager))
    assert a == b


def test_at_the_floor_names_only_models_within_the_reconstructions_kid_spread():
    from oar_core.report import at_the_floor

    metrics = {"reconstruction": {"kid_indomain": 0.10, "kid_indomain_std": 0.01},
               "near": {"kid_indomain": 0.12, "kid_indomain_std": 0.01},   # 0.02 apart, 2 std = 0.028
               "far": {"kid_indomain": 0.20, "kid_indomain_std": 0.01}}
    assert at_the_floor(metrics, ["near", "far"]) == ["near"]
    assert at_the_floor({"near": metrics["near"]}, ["near"]) == []  # no reconstruction row: no claim


def test_sample_decodes_in_parallel_steps_and_labels_its_likelihood(pipeline_dir, tmp_path):
    """`steps`/`schedule` of a sample.models entry reach the decode and meta.json; the NLL evaluate reports for it is
    the parallel sampler's bound, labelled as not the model's sequential NLL; too many steps is one clear error."""
    import pyarrow.parquet as pq

    from oar_core.likelihood import sampler_nll
    from oar_core.model import load_gpt
    from oar_core.token_shards import load_token_split

    root, sp = pipeline_dir
    spec = sp.models[0].model_copy(update={"name": "raster-7", "steps": 7, "schedule": "cosine"})
    run_sample(sp.model_copy(update={"out_dir": str(tmp_path / "s"), "models": [spec], "n_per_model": 10}),
               live_dir=str(tmp_path / "m"), progress=False)
    meta = json.loads((tmp_path / "s/raster-7/meta.json").read_text())
    assert (meta["steps"], meta["schedule"]) == (7, "cosine")
    assert all(list(o) == list(range(49)) for o in pq.read_table(tmp_path / "s/raster-7/orders.parquet")["order"]
               .to_pylist())
    model, _ = load_gpt(meta["checkpoint"])
    test_NN, test_labels, _ = load_token_split(root / "shards", "test")
    kw = dict(n_orders=1, batch_size=64, seed=0, device="cpu")
    par, label, _ = sampler_nll(model, meta, test_NN[:64], test_labels[:64], **kw)
    seq, seq_label, _ = sampler_nll(model, {**meta, "steps": None}, test_NN[:64], test_labels[:64], **kw)
    assert "parallel sampler (7 steps, cosine" in label and "not the model's sequential NLL" in label
    assert "parallel" not in seq_label and par != pytest.approx(seq, abs=1e-4)
    with pytest.raises(ValueError, match="sample.models raster-50: steps 50 is more than the model's 49 tokens"):
        run_sample(sp.model_copy(update={"out_dir": str(tmp_path / "t"), "n_per_model": 10,
                                         "models": [spec.model_copy(update={"name": "raster-50", "steps": 50})]}),
                   live_dir=str(tmp_path / "m"), progress=False)
