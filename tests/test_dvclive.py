"""Stage metrics and curves through DVCLive (oar_core/live.py), read back by DVC as a user reads them: a param
sweep queued with `dvc exp run --queue -S ...`, run by `dvc queue start`, compared with `dvc exp show` and
`dvc plots diff`, on the core stages at tiny size."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

from oar_core.live import curve_path, log_per_key, log_stage, read_curve, read_per_key, read_summary

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
STAGES = ["ingest", "tokenizer", "tokenize", "train_random"]
TINY = {"ingest": {"max_train": 256, "max_test": 64},
        "tokenizer": {"steps": 30, "batch_size": 64, "hidden": 16, "code_dim": 8, "codebook_size": 32},
        "tokenize": {"shard_size": 128},
        "train_random": {"steps": 10, "batch_size": 16, "warmup_steps": 2, "eval_every": 10, "ckpt_every": 10,
                         "log_every": 5, "eval_batches": 1}}
TINY_MODEL = {"n_layer": 1, "n_head": 2, "d_model": 32, "mlp_ratio": 2.0}


# ---- the layout ---------------------------------------------------------------------------------------------------
def test_a_stage_folder_is_dvclive_layout_and_is_replaced_whole(tmp_path):
    live = tmp_path / "dvclive/train_x"
    log_stage(live, {"steps": 10, "order": "random", "train_loss": 0.5, "test_bits_per_token": 3.25, "nothing": None},
              {"train_loss": [(5, 1.0), (10, 0.5)], "test_bits_per_token": [(10, 3.25)]})
    assert read_summary(live) == {"steps": 10, "order": "random", "train_loss": 0.5, "test_bits_per_token": 3.25,
                                  "nothing": None, "step": 10}
    assert curve_path(live, "train_loss").read_text() == "step\ttrain_loss\n5\t1.0\n10\t0.5\n"
    assert read_curve(live, "test_bits_per_token") == ([10.0], [3.25])
    assert read_curve(live, "not_logged") == ([], [])

    # a killed earlier run's staging folder, and a curve the new run does not log: both gone afterwards
    (tmp_path / "dvclive/.train_x.partial/plots").mkdir(parents=True)
    log_stage(live, {"steps": 5}, {"train_loss": [(5, 2.0)]})
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "dvclive/train_x/metrics.json", "dvclive/train_x/plots/metrics/train_loss.tsv"]
    assert read_summary(live) == {"steps": 5, "step": 5}

    log_stage(tmp_path / "dvclive/summary_only", {"a": 1})  # no curves: no "step", no plots folder
    assert read_summary(tmp_path / "dvclive/summary_only") == {"a": 1}
    assert not (tmp_path / "dvclive/summary_only/plots").exists()


def test_per_key_folders_give_one_metrics_file_per_model(tmp_path):
    log_per_key(tmp_path / "evaluate", {"raster": {"fid_indomain": 10.0}, "oar": {"fid_indomain": 8.0},
                                        "feature_net": {"test_accuracy": 0.9}})
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.json")) == [
        "evaluate/feature_net/metrics.json", "evaluate/oar/metrics.json", "evaluate/raster/metrics.json"]
    log_per_key(tmp_path / "evaluate", {"oar": {"fid_indomain": 7.0}})  # a model dropped from sample.models: gone
    assert read_per_key(tmp_path / "evaluate") == {"oar": {"fid_indomain": 7.0}}


def test_dvc_yaml_declares_the_files_the_stages_log():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in ("tokenizer", "train_raster", "train_random", "finetune", "feature_net"):
        assert {f"dvclive/{stage}/metrics.json": {"cache": False}} in stages[stage]["metrics"], stage
    for stage in ("train_raster", "train_random", "finetune"):
        plots = {next(iter(p)): next(iter(p.values())) for p in stages[stage]["plots"]}
        for name in ("train_loss", "test_bits_per_token"):
            props = plots[str(curve_path(f"dvclive/{stage}", name))]
            assert (props["x"], props["y"], props["cache"]) == ("step", name, False), (stage, name)
            assert str(curve_path(f"dvclive/{stage}", name)) in stages["evaluate"]["deps"]  # its training curves
    assert {"dvclive/evaluate": {"cache": False}} in stages["evaluate"]["metrics"]


# ---- a queued experiment, end to end ------------------------------------------------------------------------------
def run(cmd: list[str], cwd: Path, check: bool = True):
    import subprocess

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and r.returncode:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def dvc(repo: Path, *args: str, check: bool = True):
    return run([sys.executable, "-m", "dvc", *args], repo, check)


def wait_for_queue(repo: Path, timeout: float = 240.0) -> str:
    deadline = time.time() + timeout
    while True:
        status = dvc(repo, "queue", "status").stdout
        if not any(s in status for s in ("Queued", "Running")):
            return status
        assert time.time() < deadline, f"the queue did not finish in {timeout:.0f} s:\n{status}"
        time.sleep(2)


@pytest.fixture
def core_repo(tmp_path) -> Path:
    """A git + DVC repo with this checkout's core stages (ingest .. train_random) at tiny size, not yet run."""
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"{FMNIST} missing (install the Debian package dataset-fashion-mnist)")
    repo = tmp_path / "repo"
    repo.mkdir()
    for d in ("pipeline", "oar_core"):
        shutil.copytree(ROOT / d, repo / d, ignore=shutil.ignore_patterns("__pycache__"))
    dag = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    dag["stages"] = {s: dag["stages"][s] for s in STAGES}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dag, sort_keys=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = {s: {**params[s], **TINY[s]} for s in STAGES}
    params["train_random"]["model"] = {**params["train_random"]["model"], **TINY_MODEL}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    dvc(repo, "init", "-q")
    return repo


@pytest.mark.slow  # a queued dvc exp sweep of three trainings: `pytest -m slow`
def test_a_queued_param_sweep_shows_its_params_metrics_and_step_wise_curves(core_repo):
    repo = core_repo
    dvc(repo, "repro")  # in a repository with no commit yet: DVCLive must not need one
    live = repo / "dvclive/train_random"
    assert read_curve(live, "train_loss")[0] == [5.0, 10.0] and read_curve(live, "test_bits_per_token")[0] == [10.0]
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)
    assert json.loads(dvc(repo, "status", "--json").stdout or "{}") == {}  # the logged files are the recorded outputs

    dvc(repo, "exp", "run", "--queue", "-S", "train_random.steps=12")
    dvc(repo, "queue", "start")
    status = wait_for_queue(repo)
    if "Failed" in status or "Success" not in status:
        names = [ln.split()[1] for ln in status.splitlines()[1:] if len(ln.split()) > 3]
        pytest.fail(status + "".join(dvc(repo, "queue", "logs", n, check=False).stdout for n in names))

    rows = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    baseline = next(r for r in rows if r["rev"] != "workspace")
    [exp] = [rev for e in baseline["experiments"] for rev in e["revs"]]
    assert exp["data"]["params"]["params.yaml"]["data"]["train_random"]["steps"] == 12
    got = exp["data"]["metrics"]["dvclive/train_random/metrics.json"]["data"]
    assert got["steps"] == got["step"] == 12 and 0 < got["test_bits_per_token"] < 6 and got["train_loss"] > 0
    base = baseline["data"]["metrics"]["dvclive/train_random/metrics.json"]["data"]
    assert base["step"] == 10 and base["test_bits_per_token"] == read_summary(live)["test_bits_per_token"]
    assert "dvclive/tokenizer/metrics.json" in exp["data"]["metrics"]  # upstream stages' metrics come along

    # the step-wise curves of both revisions, as `dvc plots diff` gives them to a renderer
    plots = json.loads(dvc(repo, "plots", "diff", "HEAD", exp["name"], "--json").stdout)["data"]
    for name, steps in (("train_loss", {"HEAD": [5, 10], exp["name"]: [5, 10, 12]}),
                        ("test_bits_per_token", {"HEAD": [10], exp["name"]: [10, 12]})):
        [plot] = plots[str(curve_path("dvclive/train_random", name))]
        values = plot["content"]["data"]["values"]
        for rev, want in steps.items():
            assert [int(v["step"]) for v in values if v["rev"] == rev] == want, (name, rev, values)
        assert all(float(v[name]) > 0 for v in values)
    assert read_summary(live)["step"] == 10  # the queued run left the workspace alone
