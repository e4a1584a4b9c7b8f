"""The complete stage and its metrics (oar_core/completion_report.py) on tiny untrained models and real test images."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from oar_core.completion_report import completion_metrics
from oar_core.feature_net import load_classifier
from oar_core.image_shards import load_split
from oar_core.model import GPT, GPTConfig, save_gpt
from oar_core.params import CompleteParams, CompletionMask, FeatureNetParams, SampleModelParams, SampleParams
from pipeline.complete import run_complete
from pipeline.feature_net import run_feature_net
from tests.conftest import single_thread

MASKS = ["bottom_half", "top_half", "random_half"]  # raster can score the first alone; the last: a count per image


@pytest.fixture(scope="module")
def completed(fmnist_small, tmp_path_factory):
    from oar_core.tokenizer import VQTokenizer, save_tokenizer

    root = tmp_path_factory.mktemp("complete")
    torch.manual_seed(0)
    save_tokenizer(root / "tokenizer.pt", VQTokenizer(28, 1, 7, codebook_size=16, code_dim=8, hidden=16))
    cfg = GPTConfig(grid_h=7, grid_w=7, vocab_size=16, num_classes=10, n_layer=1, n_head=2, d_model=32)
    for kind in ("raster", "random"):
        save_gpt(root / f"{kind}.pt", GPT(cfg), order=kind)
    specs = [SampleModelParams(name="raster", checkpoint=str(root / "raster.pt"), order="raster"),
             SampleModelParams(name="any-order", checkpoint=str(root / "random.pt"), order="random"),
             SampleModelParams(name="greedy", checkpoint=str(root / "random.pt"), order="confidence")]
    sp = SampleParams(tokenizer=str(root / "tokenizer.pt"), models=specs)
    p = CompleteParams(out_dir=str(root / "completions"), n_images=20, batch_size=8,
                       masks=[m for m in CompleteParams().masks if m.name in MASKS])
    with single_thread():
        summary = run_complete(p, sp, str(fmnist_small), progress=False)
    return root, summary


def test_every_model_completes_every_mask(completed):
    root, summary = completed
    out = root / "completions"
    for mask in MASKS:
        assert len(list((out / "masked" / mask).glob("*.png"))) == 20
        for model in ("raster", "any-order", "greedy"):
            files = sorted((out / "models" / model / mask).glob("*.png"))
            assert len(files) == 20 and Image.open(files[0]).size == (28, 28)
    # an untrained 16-code model: about log2(16) = 4 bits/token, for every mask the model can score
    for model in ("any-order", "greedy"):
        assert all(2 < summary[model][m]["missing_bits_per_token"] < 6 for m in MASKS), summary[model]
    # raster: only where every known token comes before every missing one in raster order
    assert 2 < summary["raster"]["bottom_half"]["missing_bits_per_token"] < 6
    assert all(summary["raster"][m]["missing_bits_per_token"] is None for m in MASKS if m != "bottom_half")


def test_the_masks_keep_what_they_say():
    from pipeline.complete import known_masks

    known = lambda name: known_masks(next(m for m in CompleteParams().masks if m.name == name), 3, 28, 7, 0)  # noqa: E731
    assert (known("bottom_half")[0].reshape(7, 7)[:3].all() and not known("bottom_half")[0].reshape(7, 7)[3:].any())
    assert known("outpaint_top_left")[0].reshape(7, 7)[:3, :3].all() and known("outpaint_top_left")[0].sum() == 9
    rnd = known("random_half")
    assert (rnd.sum(1) == 25).all() and not (rnd[0] == rnd[1]).all()  # the same count, other tokens per image


def test_mask_params_are_checked():
    with pytest.raises(ValueError, match="give box"):
        CompletionMask(name="x", box=(0, 0, 1, 1), random=0.5)
    with pytest.raises(ValueError, match="needs 0 <= x0 < x1 <= 1"):
        CompletionMask(name="x", box=(0.5, 0, 0.2, 1))
    with pytest.raises(ValueError, match="unique plain folder names"):
        CompleteParams(masks=[CompletionMask(name="a", random=0.5), CompletionMask(name="a", random=0.3)])


@pytest.mark.slow  # ~35 s (a feature net, nine torch-fidelity runs); the e2e DAG test covers the wiring by default
def test_completion_metrics_and_report_section(completed, fmnist_small, tmp_path):
    root, _ = completed
    with single_thread():
        run_feature_net(FeatureNetParams(steps=20, batch_size=64), fmnist_small, tmp_path / "fn.pt",
                        tmp_path / "live", progress=False)
    clf, _ = load_classifier(tmp_path / "fn.pt")
    test_NHWC, _, _ = load_split(fmnist_small, "test")
    metrics, lines = completion_metrics(root / "completions", test_NHWC, clf, str(tmp_path / "fn.pt"), 10, 0,
                                        tmp_path / "figures")
    assert sorted(metrics) == ["complete_any-order", "complete_greedy", "complete_raster"]
    for mask in MASKS:
        d = metrics["complete_any-order"]
        assert all(math.isfinite(d[f"{mask}_{k}"]) for k in ("fid_indomain", "precision_indomain", "accuracy"))
        assert 0 <= d[f"{mask}_accuracy"] <= 1
        picture = np.asarray(Image.open(tmp_path / "figures" / f"complete_{mask}.png"))
        assert picture.shape[0] == 2 * (5 * 30 + 2)  # originals, masked, 3 models
        assert f"![completions {mask}](figures/complete_{mask}.png)" in lines
    assert "top_half_missing_bits_per_token" not in metrics["complete_raster"]  # not computable: left out
    assert any("not computable: trained in raster order only" in line for line in lines)


def test_evaluate_without_completions_says_so(tmp_path):
    metrics, lines = completion_metrics(tmp_path / "none", np.zeros((10, 28, 28, 1), np.uint8), None, "x", 10, 0,
                                        tmp_path)
    assert metrics == {} and "Skipped: no completions in" in lines[2]
