"""The whole DAG with the CLI, as a user runs it: `dvc repro` from nothing to metrics and report, then
`dvc repro` again does nothing, and a sampling param change reruns only sample and evaluate."""
import json
import shutil
from pathlib import Path

import pytest
import yaml

from oar_core.live import read_per_key, read_summary
from tests.test_flows import ROOT, TINY, TINY_TRAIN, dvc, ran_stages, sh

ALL_STAGES = ["ingest", "tokenizer", "tokenize", "train_raster", "train_random", "extract_orders", "finetune",
              "sample", "complete", "feature_net", "evaluate"]


@pytest.fixture(scope="module")
def full_repo(tmp_path_factory):
    return full_repo_files(tmp_path_factory.mktemp("full_repo"))


def full_repo_files(repo: Path) -> Path:
    """A git + DVC repo holding this checkout's whole pipeline at tiny sizes, not yet run."""
    for d in ("pipeline", "oar_core"):
        shutil.copytree(ROOT / d, repo / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    for section in ("train_raster", "train_random", "finetune"):
        params[section].update({k: v for k, v in TINY_TRAIN.items() if k != "model"})
        if "model" in params[section]:
            params[section]["model"].update(TINY_TRAIN["model"])
    params["sample"].update(n_per_model=20, batch_size=20)
    params["feature_net"].update(steps=20)
    params["evaluate"].update(kid_subset_size=10, strip_steps=3)
    params["complete"].update(n_images=10, masks=[m for m in params["complete"]["masks"]
                                                  if m["name"] in ("bottom_half", "random_half")])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], repo)
    dvc(repo, "init", "-q")
    return repo


def test_dvc_repro_runs_every_stage_then_nothing_then_only_what_a_change_touches(full_repo):
    first = dvc(full_repo, "repro").stdout
    assert ran_stages(first) == ALL_STAGES, first
    metrics = read_per_key(full_repo / "dvclive/evaluate")  # DVCLive: dvclive/evaluate/<model>/metrics.json
    names = [m["name"] for m in yaml.safe_load((full_repo / "params.yaml").read_text())["sample"]["models"]]
    for model in names:
        assert metrics[model]["fid_indomain"] >= 0 and metrics[model]["nll_bits_per_token"] > 0
        assert 0 <= metrics[model]["precision_indomain"] <= 1 and 0 <= metrics[model]["recall_indomain"] <= 1
    shown = next(iter(json.loads(dvc(full_repo, "metrics", "show", "--json").stdout).values()))["data"]  # workspace
    for model in names:  # one metrics file, so one row of `dvc metrics show`, per model
        assert shown[f"dvclive/evaluate/{model}/metrics.json"]["data"]["fid_indomain"] == metrics[model]["fid_indomain"]
    assert shown["dvclive/train_random/metrics.json"]["data"]["test_bits_per_token"] > 0
    table = dvc(full_repo, "metrics", "show", "dvclive/evaluate").stdout  # evaluate alone: a row per model
    assert all(any(line.startswith(f"dvclive/evaluate/{m}/metrics.json") for line in table.splitlines()) for m in names)
    report = (full_repo / "reports/report.md").read_text()
    assert "figures/training_curves.png" in report  # the curves DVCLive logged reach the report
    assert "skipped: no local Inception weights" in report
    for model in names:  # completions: a row per model, a metric per mask
        assert 0 <= metrics[f"complete_{model}"]["random_half_accuracy"] <= 1
    assert "## Completions" in report and "![completions bottom_half](figures/complete_bottom_half.png)" in report
    assert all((full_repo / "reports" / line.split("](")[1].split(")")[0]).exists()
               for line in report.splitlines() if "](figures/" in line)  # every picture the report shows exists

    assert ran_stages(dvc(full_repo, "repro").stdout) == []

    params = yaml.safe_load((full_repo / "params.yaml").read_text())
    params["sample"]["temperature"] = 0.9
    (full_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran_stages(dvc(full_repo, "repro").stdout) == ["sample", "complete", "evaluate"]


# (file, a line inside the function edited, what runs that code): what `dvc status` must call stale afterwards
EDITS = [
    ("oar_core/image_sources.py", "def decode_image(", ["ingest"]),  # an ingest-only function
    ("pipeline/tokenizer.py", "def train_tokenizer(", ["tokenizer"]),  # the tokenizer's training loop
    ("oar_core/location.py", "def log_q(", ["extract_orders", "sample", "complete", "evaluate"]),  # a location rule
    ("oar_core/report.py", "def write_report(", ["evaluate"]),  # the report
]


@pytest.mark.parametrize("path,function,stale", EDITS, ids=[e[0] for e in EDITS])
def test_an_edit_makes_stale_only_the_stages_that_run_that_code(full_repo, path, function, stale):
    """After a finished `dvc repro`, an edit inside one function makes `dvc status` name exactly the stages whose
    scripts run it: editing ingest, the tokenizer's training or the report never retrains a model."""
    if ran_stages(dvc(full_repo, "repro").stdout) == ALL_STAGES:  # this test alone: the first run
        assert ran_stages(dvc(full_repo, "repro").stdout) == []
    f = full_repo / path
    original = f.read_text()
    head, tail = original.split(function, 1)
    f.write_text(head + function + tail.replace(":\n", ":\n    # an edit\n", 1))
    try:
        status = json.loads(dvc(full_repo, "status", "--json").stdout)
    finally:
        f.write_text(original)
    assert sorted(status) == sorted(stale), status
    assert json.loads(dvc(full_repo, "status", "--json").stdout) == {}


@pytest.mark.slow  # a second whole-DAG dvc repro: `pytest -m slow`
def test_an_unconditional_model_on_a_folder_without_class_sub_folders_runs_the_whole_dag(tmp_path_factory):
    """`class_cond: false` on a flat folder of PNGs (one class, no labels to learn): every stage runs, the models
    are unconditional, and evaluate's feature space is learned without labels (a one-class classifier would
    give meaningless features)."""
    import gzip

    import numpy as np
    from PIL import Image

    from oar_core.model import load_gpt

    raw = gzip.decompress(Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").read_bytes())
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:320]
    repo = tmp_path_factory.mktemp("unconditional_repo")
    (repo / "images").mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(repo / "images" / f"img{i:04d}.png")
    full_repo_files(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["ingest"].update(source="images", test_fraction=0.2, max_train=None, max_test=None)
    for section in ("train_raster", "train_random"):
        params[section]["model"]["class_cond"] = False
    params["feature_net"]["steps"] = 200
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    assert ran_stages(dvc(repo, "repro").stdout) == ALL_STAGES
    assert json.loads((repo / "data/ingest/manifest.json").read_text())["num_classes"] == 1
    for m in ("raster", "random", "oar"):
        assert load_gpt(repo / f"models/{m}/model.pt")[0].cfg.num_classes == 0
    metrics = read_per_key(repo / "dvclive/evaluate")
    for m in params["sample"]["models"]:
        assert metrics[m["name"]]["fid_indomain"] >= 0 and metrics[m["name"]]["nll_bits_per_token"] > 0
    net = read_summary(repo / "dvclive/feature_net")
    assert net["task"] == "rotation" and net["test_accuracy"] > 0.5  # rotations of clothes: far above chance (0.25)
    assert "rotation" in (repo / "reports/report.md").read_text()
    assert Image.open(repo / "samples/oar/grid.png").width > 4 * 28  # a square of samples, not one class column
