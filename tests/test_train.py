"""Training on real token shards: loss falls, exact resume after SIGKILL, 2-process DDP."""
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from oar_core.model import load_gpt
from tests.fixtures_pipeline import run_module, tiny_train_params, write_params


def test_loss_falls_and_artifacts_are_written(any_order_model, tmp_path):
    path, summary = any_order_model
    root = path.parents[2]
    from oar_core.live import read_curve, read_summary

    steps, losses = read_curve(root / "dvclive/train_random", "train_loss")  # DVCLive's step-wise curve
    assert losses[-1] < losses[0] - 0.5, losses
    assert summary["test_bits_per_token"] < math.log2(64) - 0.5  # well below a uniform guess over 64 codes
    assert read_summary(root / "dvclive/train_random") == {**summary, "step": 200}
    eval_steps, bits = read_curve(root / "dvclive/train_random", "test_bits_per_token")  # held-out, every 100 steps
    assert eval_steps == [100.0, 200.0] and bits[-1] == summary["test_bits_per_token"]
    assert not (root / "runs/train_random/last.pt").exists()  # finished runs leave no resumable state
    model, ckpt = load_gpt(path)
    assert ckpt["order"] == "random" and model.cfg.vocab_size == 64


def _state(path):
    return load_gpt(path)[0].state_dict()


def _two_workdirs(tmp_path, p, names):
    """Run folders that each hold the same train_random params."""
    dirs = [tmp_path / n for n in names]
    for d in dirs:
        d.mkdir()
        write_params(d / "params.yaml", train_random=p)
    return dirs


def test_resume_after_sigkill_matches_uninterrupted_run(tiny_shards, tmp_path):
    straight, killed = _two_workdirs(tmp_path, tiny_train_params("models/m", steps=40, ckpt_every=5, eval_every=20),
                                     ("straight", "killed"))
    args = ["pipeline.train", "--stage", "train_random", "--shards", str(tiny_shards)]
    assert run_module(args, straight).returncode == 0

    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=killed, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "runs/train_random/last.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (killed / "models/m/model.pt").exists(), "the kill came too late to test a resume"
    assert not list(ckpt.parent.glob("*.tmp")), "a temp file survived the kill under the run folder"
    resumed = run_module(args, killed)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout + resumed.stderr
    a, b = _state(straight / "models/m/model.pt"), _state(killed / "models/m/model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # DVCLive's files: the same full step-wise curves, byte for byte, and the same summary but for the timing
    from oar_core.live import curve_path, read_summary

    live_a, live_b = straight / "dvclive/train_random", killed / "dvclive/train_random"
    files = [sorted(p.relative_to(d) for p in d.rglob("*")) for d in (live_a, live_b)]
    assert files[0] == files[1]
    for name in ("train_loss", "test_bits_per_token"):
        assert curve_path(live_a, name).read_bytes() == curve_path(live_b, name).read_bytes()
    ma, mb = read_summary(live_a), read_summary(live_b)
    assert ma.pop("tokens_per_s") > 0 and mb.pop("tokens_per_s") > 0 and ma == mb and ma["step"] == 40
    assert [p.name for p in (killed / "dvclive").iterdir()] == ["train_random"]  # no staging folder left


@pytest.mark.slow  # two torchrun processes: `pytest -m slow`
def test_ddp_two_cpu_processes_match_one(tiny_shards, tmp_path):
    p = tiny_train_params("models/m", steps=4, eval_every=4, batch_size=16)
    one, two = _two_workdirs(tmp_path, p, ("one", "two"))
    args = ["pipeline.train", "--stage", "train_random", "--shards", str(tiny_shards)]
    assert run_module(args, one).returncode == 0
    ddp = run_module(["torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", *args], two)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    a, b = _state(one / "models/m/model.pt"), _state(two / "models/m/model.pt")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)  # averaged half-batch grads == full-batch grad


def test_given_order_requires_orders_table(tiny_shards, tmp_path):
    from pipeline.train import run_train

    with pytest.raises(FileNotFoundError, match="extract_orders"):
        run_train(tiny_train_params(tmp_path / "m", order="given"), "finetune", str(tiny_shards), tmp_path / "runs",
                  tmp_path / "dvclive", orders_dir=str(tmp_path / "none"))


def test_a_killed_run_does_not_resume_when_its_inputs_changed(any_order_model, tiny_shards, tmp_path, capsys,
                                                                monkeypatch):
    """Same params, but the checkpoint it starts from was replaced between the kill and the rerun (e.g.
    retrained): the stale weights must not be resumed. Unchanged inputs still resume."""
    import shutil

    from oar_core.model import GPT, save_gpt
    from pipeline import train
    from tests.conftest import single_thread

    init = tmp_path / "init.pt"
    shutil.copy(any_order_model[0], init)
    p = tiny_train_params(tmp_path / "m", steps=12, ckpt_every=4, eval_every=8, init_from=str(init))
    dirs = (str(tiny_shards), tmp_path / "runs", tmp_path / "dvclive")
    real_eval = train.heldout_bits

    def killed(*a, **k):
        raise KeyboardInterrupt  # at step 8, after the step-4 and before the step-8 checkpoint

    def run(stop: bool):
        monkeypatch.setattr(train, "heldout_bits", killed if stop else real_eval)
        with single_thread():
            try:
                train.run_train(p, "finetune", *dirs)
            except KeyboardInterrupt:
                pass
        return capsys.readouterr().out

    run(stop=True)
    assert "resuming" in run(stop=False)  # control: unchanged inputs resume
    run(stop=True)
    save_gpt(init, GPT(load_gpt(init)[0].cfg), stage="train_random", order="random")  # a different init_from
    out = run(stop=False)
    assert "resuming" not in out and "ignoring" in out


def test_finetune_rejects_a_model_section_that_differs_from_its_init_from(any_order_model, tiny_shards, tmp_path):
    from oar_core.params import ModelParams, TrainParams
    from oar_core.token_shards import load_meta
    from pipeline.train import build_model

    meta, path = load_meta(tiny_shards), str(any_order_model[0])
    cfg = load_gpt(path)[0].cfg
    same = ModelParams(n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model, mlp_ratio=cfg.mlp_ratio)
    assert build_model(TrainParams(init_from=path), meta).cfg == cfg  # no model section: the checkpoint's
    assert build_model(tiny_train_params(tmp_path, init_from=path, model=same), meta).cfg == cfg
    with pytest.raises(ValueError, match=rf"n_layer: {cfg.n_layer + 1} vs {cfg.n_layer}.*remove `model`"):
        deeper = same.model_copy(update={"n_layer": cfg.n_layer + 1})
        build_model(tiny_train_params(tmp_path, init_from=path, model=deeper), meta)


def test_an_unconditional_model_trains_on_labelled_shards(tiny_shards, tmp_path):
    """class_cond: false gives one (null) class row; the shards' labels 0..9 must not index past it."""
    from oar_core.params import ModelParams
    from pipeline.train import run_train
    from tests.conftest import single_thread

    p = tiny_train_params(tmp_path / "m", steps=20, eval_every=20, model=ModelParams(n_layer=1, n_head=2, d_model=32,
                                                                                     class_cond=False))
    with single_thread():
        summary = run_train(p, "train_random", str(tiny_shards), tmp_path / "runs", tmp_path / "dvclive")
    assert load_gpt(tmp_path / "m/model.pt")[0].cfg.num_classes == 0 and summary["test_bits_per_token"] > 0
