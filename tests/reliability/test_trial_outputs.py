"""A trial run (`--params probe.yaml` naming other outputs) writes only inside the outputs its params name: the
pipeline's tracked DVCLive files and its resume state stay byte for byte as they were (issue 21, finding 7)."""
import shutil
from pathlib import Path

import torch

from oar_core.checkpoint import save_checkpoint
from oar_core.params import Params
from pipeline._stage import own_roots
from tests.conftest import single_thread
from tests.fixtures_pipeline import tiny_train_params, write_params

REPO = Path(__file__).parents[2]


def _repo(root: Path, **sections) -> Path:
    """A folder holding the repository's dvc.yaml and a full params.yaml (defaults, but for `sections`)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    p = Params()
    write_params(root / "params.yaml", **{k: sections.get(k, getattr(p, k)) for k in Params.model_fields})
    return root


def _snapshot(root: Path, *tops: str) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for t in tops for f in (root / t).rglob("*") if f.is_file()}


def test_a_trial_with_its_own_out_dir_leaves_the_pipelines_metrics_and_resume_state_alone(tiny_shards, tmp_path,
                                                                                          monkeypatch):
    p = tiny_train_params("models/random", steps=6, ckpt_every=3, eval_every=3, log_every=3)
    repo = _repo(tmp_path / "repo", train_random=p)
    write_params(repo / "probe.yaml", **{**{k: getattr(Params(), k) for k in Params.model_fields},
                                         "train_random": p.model_copy(update={"out_dir": "models/probe"})})
    live = repo / "dvclive/train_random"  # what a finished pipeline run left, tracked in Git
    (live / "plots/metrics").mkdir(parents=True)
    (live / "metrics.json").write_text('{"test_bits_per_token": 4.2}\n')
    (live / "plots/metrics/train_loss.tsv").write_text("step\ttrain_loss\n25\t3.5\n")
    # the pipeline's own killed run, waiting to be resumed by `dvc repro` (another digest than the trial's)
    state = {"digest": "pipeline-run", "model": {"w": torch.zeros(2)}, "opt": {}, "step": 3,
             "history": {"loss": [], "test_bits": []}}
    save_checkpoint(repo / "runs/train_random/last.pt", state)
    before = _snapshot(repo, "dvclive", "runs")

    from pipeline.train import main

    monkeypatch.chdir(repo)
    with single_thread():  # in this process: no second torch import (the stage's own process is tested elsewhere)
        main(["--stage", "train_random", "--shards", str(tiny_shards), "--params", "probe.yaml"])
    assert _snapshot(repo, "dvclive", "runs") == before  # old code: dvclive/train_random rewritten, last.pt deleted
    trial = repo / "models/probe"
    assert (trial / "model.pt").exists()
    assert (trial / "dvclive/train_random/metrics.json").exists()  # the trial's own metrics, inside its out_dir
    assert not (trial / "runs/train_random/last.pt").exists()  # finished: its resume state is gone


def test_every_stage_that_logs_follows_its_outputs(tmp_path, monkeypatch):
    repo = _repo(tmp_path / "repo")
    monkeypatch.chdir(repo)
    base = Params().model_dump(mode="json")
    (repo / "copy.yaml").write_text((repo / "params.yaml").read_text())
    pipeline = (Path("dvclive"), Path("runs"))
    for stage in ("train_raster", "train_random", "finetune", "sample", "evaluate"):
        trial = Params(**{**base, stage: {**base[stage], "out_dir": "elsewhere/x"}})
        assert own_roots(stage, Params(), "copy.yaml") == pipeline, stage  # the same outputs: the pipeline's run
        assert own_roots(stage, trial, "probe.yaml") == (Path("elsewhere/x/dvclive"), Path("elsewhere/x/runs")), stage
        assert own_roots(stage, trial, "params.yaml") == pipeline  # params.yaml itself: what `dvc repro` runs
        assert own_roots("tokenizer", trial, "probe.yaml") == pipeline  # fixed outputs (models/tokenizer.pt)
    monkeypatch.chdir(tmp_path)  # no dvc.yaml here: nothing is tracked, the usual layout
    trial = Params(**{**base, "train_random": {**base["train_random"], "out_dir": "y"}})
    assert own_roots("train_random", trial, "probe.yaml") == pipeline


def test_a_sampled_model_cannot_take_the_trials_metrics_folder_name(tmp_path):
    import pytest

    from oar_core.params import ParamsError, load_params

    (tmp_path / "params.yaml").write_text("sample:\n  models:\n  - {name: dvclive, checkpoint: m.pt, order: raster}\n")
    with pytest.raises(ParamsError, match="plain folder names other than 'dvclive'"):
        load_params(tmp_path / "params.yaml")
