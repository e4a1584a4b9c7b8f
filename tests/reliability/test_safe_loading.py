"""Safe loading: no file the pipeline reads as a checkpoint can run code (issue 21).

A malicious checkpoint is a real-looking torch.save pickle (a model's config and state dict) plus one object whose
__reduce__ opens a marker file for writing: unpickling it with torch.load(weights_only=False) creates the marker
(test_the_payload_runs_under_an_unsafe_load proves it, so its absence below means something). Every entry point that
takes a checkpoint is pointed at it and must fail with one clear line and no marker. The payload-free control, the
same file without the payload, must be refused the same way (an old pickle: the conversion command) or, for the
Inception weights, get past the safe load to the next check: the tests see the difference between the two only
through the marker, which is the point."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from unittest import mock

import pytest
import safetensors.torch
import torch

from oar_core.checkpoint import convert, load_checkpoint, save_checkpoint
from oar_core.feature_net import SmallCNN, load_classifier
from oar_core.fidelity import INCEPTION_NAME, inception_weights_file, read_inception_weights, temp_cache_dir
from oar_core.model import GPT, GPTConfig, load_gpt
from oar_core.params import (
    EvaluateParams,
    ExtractParams,
    FeatureNetParams,
    SampleModelParams,
    SampleParams,
    TokenizerParams,
)
from oar_core.tokenizer import VQTokenizer, load_tokenizer
from tests.fixtures_pipeline import tiny_train_params
from tests.reliability.conftest import error_line, run_module, write_params

CFG = GPTConfig(grid_h=7, grid_w=7, vocab_size=64, num_classes=10, n_layer=1, n_head=2, d_model=16)


class Payload:
    """Unpickled, it opens `marker` for writing: the file appearing is the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def pickle_checkpoint(path: Path, marker: Path | None) -> Path:
    """A model checkpoint as the old save_gpt wrote it (torch.save of config + state dict + extras), with the payload
    in one extra field, or (marker None) the payload-free control."""
    torch.manual_seed(0)
    old = {"config": asdict(CFG), "state_dict": GPT(CFG).state_dict(), "stage": "train_random", "order": "random",
           "steps": 1, "note": Payload(marker) if marker else "harmless"}
    torch.save(old, path)
    return path


@pytest.fixture(params=["payload", "control"])
def planted(request, tmp_path) -> tuple[Path, Path, bool]:
    """(checkpoint, marker, has_payload) in tmp_path/planted/ (outside the stage's working folder)."""
    (tmp_path / "planted").mkdir()
    marker = tmp_path / "planted" / "PWNED"
    evil = request.param == "payload"
    return pickle_checkpoint(tmp_path / "planted" / "ckpt.pt", marker if evil else None), marker, evil


def test_the_payload_runs_under_an_unsafe_load(tmp_path):
    marker = tmp_path / "PWNED"
    path = pickle_checkpoint(tmp_path / "evil.pt", marker)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what oar_core.checkpoint.load_torch did before: the code runs
    assert marker.exists()


def _one_line(e: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_library_loaders_refuse_it(planted):
    path, marker, _ = planted
    for load in (load_gpt, load_tokenizer, load_classifier, load_checkpoint):
        with pytest.raises(ValueError) as e:
            load(path)
        msg = _one_line(e, path)
        assert "old pickle format, not loaded" in msg
        assert f"`python -m oar_core.checkpoint convert {shlex.quote(str(path))}`" in msg
    assert not marker.exists()


def test_inception_weights_are_read_without_running_code(planted):
    path, marker, evil = planted
    with pytest.raises(ValueError) as e:
        read_inception_weights(str(path))
    msg = _one_line(e, path)
    if evil:  # torch's weights-only unpickler names the global it refused
        assert "refused by torch's weights-only loader" in msg and "GLOBAL io.open" in msg, msg
    else:  # the control loads safely and fails the next check: a config is not an Inception state dict
        assert "not a state dict (names -> tensors)" in msg, msg
    assert "evaluate.inception_weights: null" in msg
    assert not marker.exists()


# every stage parameter that names a checkpoint, and the training run's own resumable checkpoint: (stage, module
# args, params sections given the planted path, the output that must not appear)
def _stage_cases(path: Path, tiny_shards: Path, fmnist: Path) -> dict:
    tokenizer = str(tiny_shards.parent / "tokenizer.pt")
    p = str(path)
    return {
        "tokenizer.checkpoint": ("tokenizer", ["pipeline.tokenizer", "--ingest-dir", str(fmnist)],
                                 {"tokenizer": TokenizerParams(checkpoint=p, codebook_size=64)},
                                 "models/tokenizer.pt"),
        "feature_net.checkpoint": ("feature_net", ["pipeline.feature_net", "--ingest-dir", str(fmnist)],
                                   {"feature_net": FeatureNetParams(checkpoint=p)}, "models/feature_net.pt"),
        "finetune.init_from": ("finetune", ["pipeline.train", "--stage", "finetune", "--shards", str(tiny_shards)],
                               {"finetune": tiny_train_params("models/oar", init_from=p, steps=5)}, "models/oar"),
        "extract_orders.checkpoint": ("extract_orders", ["pipeline.extract_orders", "--shards", str(tiny_shards)],
                                      {"extract_orders": ExtractParams(checkpoint=p, out_dir="orders")}, "orders"),
        "sample.models[].checkpoint": ("sample", ["pipeline.sample"], {"sample": SampleParams(
            tokenizer=tokenizer, n_per_model=10, models=[SampleModelParams(name="m", checkpoint=p, order="random")])},
            "samples"),
        "sample.tokenizer": ("sample", ["pipeline.sample"], {"sample": SampleParams(
            tokenizer=p, n_per_model=10, models=[SampleModelParams(name="m", checkpoint=p, order="random")])},
            "samples"),
        "evaluate.inception_weights": ("evaluate", ["pipeline.evaluate"],
                                       {"evaluate": EvaluateParams(inception_weights=p)}, "reports"),
        "runs/<stage>/last.pt": ("train_random", ["pipeline.train", "--stage", "train_random", "--shards",
                                                  str(tiny_shards)],
                                 {"train_random": tiny_train_params("models/m", steps=5)}, "models/m"),
    }


@pytest.mark.parametrize("entry", ["tokenizer.checkpoint", "feature_net.checkpoint", "finetune.init_from",
                                   "extract_orders.checkpoint", "sample.models[].checkpoint", "sample.tokenizer",
                                   "evaluate.inception_weights", "runs/<stage>/last.pt"])
def test_stages_refuse_it_in_one_line(entry, planted, tiny_shards, fmnist_small, tmp_path):
    path, marker, evil = planted
    work = tmp_path / "work"
    work.mkdir()
    if entry == "runs/<stage>/last.pt":  # a file planted where an interrupted run leaves its checkpoint
        (work / "runs/train_random").mkdir(parents=True)
        path = path.rename(work / "runs/train_random/last.pt")
    stage, args, sections, output = _stage_cases(path, tiny_shards, fmnist_small)[entry]
    write_params(work / "params.yaml", **sections)
    line = error_line(run_module(args, work), stage)
    name = "runs/train_random/last.pt" if entry == "runs/<stage>/last.pt" else str(path)
    assert name in line, line
    if entry == "evaluate.inception_weights":
        assert ("GLOBAL io.open" if evil else "not a state dict") in line, line
    else:
        assert "old pickle format, not loaded" in line and "python -m oar_core.checkpoint convert" in line, line
    if entry == "runs/<stage>/last.pt":
        assert "or delete it (the run then starts over)" in line and path.exists()  # refused, not silently dropped
    assert not marker.exists()
    assert not (work / output).exists()


# ------------------------------------------------------------------------------------------- old checkpoints
def _convert_cli(message: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the conversion command exactly as the refusal spells it."""
    (cmd,) = re.findall(r"`(python -m oar_core\.checkpoint convert [^`]+)`", message)
    argv = shlex.split(cmd)
    return subprocess.run([sys.executable, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _old_run_checkpoint() -> tuple[dict, torch.optim.Optimizer]:
    """What the old pipeline.train wrote to runs/<stage>/last.pt: model, AdamW state (int-keyed, tuple betas), step,
    history."""
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    tokens_BN, order_BN = torch.randint(0, 64, (2, 49)), torch.stack([torch.randperm(49) for _ in range(2)])
    logits_BNV, target_BN = model(tokens_BN, order_BN, torch.tensor([1, 2]))
    torch.nn.functional.cross_entropy(logits_BNV.flatten(0, 1), target_BN.flatten()).backward()
    opt.step()
    return {"digest": "0123", "model": model.state_dict(), "opt": opt.state_dict(), "step": 1,
            "history": {"loss": [(1, 4.1)], "test_bits": [(1, float("nan"))]}}, opt


@pytest.mark.slow  # a whole dvc run or a kill-and-resume; the default run keeps the lighter tests of this
def test_old_checkpoints_are_refused_with_a_conversion_command_that_works(tmp_path):
    folder = tmp_path / "old ckpts"  # a space: the command in the message must be quoted
    folder.mkdir()
    torch.manual_seed(0)
    gpt = pickle_checkpoint(folder / "model.pt", None)
    tok_model = VQTokenizer(28, 1, 7, codebook_size=16, code_dim=8, hidden=16)
    tok = folder / "tokenizer.pt"
    torch.save({"kind": "oar-vq-tokenizer", "config": dict(tok_model.config), "state_dict": tok_model.state_dict()},
               tok)
    cnn = SmallCNN()
    net = folder / "feature_net.pt"
    torch.save({"kind": "oar-indomain-cnn", "config": cnn.config, "state_dict": cnn.state_dict(), "steps": 3,
                "test_accuracy": 0.5}, net)
    run_state, opt = _old_run_checkpoint()
    run = folder / "last.pt"
    torch.save(run_state, run)

    for path, load in ((gpt, load_gpt), (tok, load_tokenizer), (net, load_classifier), (run, load_checkpoint)):
        with pytest.raises(ValueError) as e:
            load(path)
        r = _convert_cli(_one_line(e, path), tmp_path)
        assert r.returncode == 0 and f"{path}: converted to safetensors" in r.stdout, r.stderr
        assert path.read_bytes()[8:10] == b'{"'  # rewritten in place, as safetensors

    model, ckpt = load_gpt(gpt)
    torch.manual_seed(0)  # as pickle_checkpoint made it
    ref = GPT(CFG).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    assert (ckpt["stage"], ckpt["order"], ckpt["steps"], ckpt["note"]) == ("train_random", "random", 1, "harmless")
    assert load_tokenizer(tok).config == tok_model.config
    assert load_classifier(net)[1]["test_accuracy"] == 0.5
    state = load_checkpoint(run)  # the optimizer state comes back exactly: int keys, tuple betas, the nan
    want = opt.state_dict()
    assert state["opt"]["param_groups"] == want["param_groups"] and state["opt"]["state"].keys() == want["state"].keys()
    assert all(torch.equal(state["opt"]["state"][i][k], v) for i, s in want["state"].items() for k, v in s.items())
    assert state["history"]["loss"] == [(1, 4.1)] and str(state["history"]["test_bits"]) == "[(1, nan)]"
    fresh = torch.optim.AdamW(GPT(CFG).parameters(), lr=1e-3)
    fresh.load_state_dict(state["opt"])
    assert len(fresh.state) == len(want["state"])  # no state silently dropped (str keys would be)

    r = _convert_cli(f"`python -m oar_core.checkpoint convert {shlex.quote(str(gpt))}`", tmp_path)
    assert r.returncode == 0 and "already a safetensors checkpoint" in r.stdout, r.stderr


def test_the_conversion_refuses_a_payload(tmp_path):
    marker = tmp_path / "PWNED"
    path = pickle_checkpoint(tmp_path / "evil.pt", marker)
    before = path.read_bytes()
    r = _convert_cli(f"`python -m oar_core.checkpoint convert {path}`", tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"error: {path}: refused by torch's weights-only loader") and "GLOBAL io.open" in line
    assert not marker.exists() and path.read_bytes() == before  # left as it was
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk.pt: neither an old torch checkpoint nor a safetensors one"):
        convert(tmp_path / "junk.pt")


def test_unreadable_and_foreign_files_are_one_line(tmp_path):
    save_checkpoint(tmp_path / "good.pt", {"state_dict": {"w": torch.ones(3)}})
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:-4])
    safetensors.torch.save_file({"w": torch.ones(3)}, tmp_path / "plain.safetensors")  # no oar metadata
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 64)
    cases = {"cut.pt": r"unreadable checkpoint \(truncated or corrupt safetensors: .*\); delete it and rerun its stage",
             "plain.safetensors": r"a safetensors file without oar's metadata, so not a checkpoint written by this",
             "junk.pt": r"unreadable checkpoint \(neither a safetensors checkpoint nor an old torch one\)"}
    for name, pattern in cases.items():
        with pytest.raises(ValueError, match=pattern) as e:
            load_checkpoint(tmp_path / name)
        _one_line(e, tmp_path / name)
    assert torch.equal(load_checkpoint(tmp_path / "good.pt")["state_dict"]["w"], torch.ones(3))


# ------------------------------------------------------------------------------------------- Inception weights
@pytest.fixture(scope="module")
def inception_pth(tmp_path_factory) -> tuple[Path, dict]:
    """A torch-fidelity Inception-v3 weights file in its release format (a torch.save'd state dict), random weights:
    the module is built with its weight loading stubbed out (a test-only shortcut: the real file is 95 MB to fetch)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(0)
    with mock.patch.object(torch, "load", return_value={}), \
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = FeatureExtractorInceptionV3(INCEPTION_NAME, ["2048"], feature_extractor_weights_path="stub")
    state = {k: v.clone() for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05.pth"
    torch.save(state, path)
    return path, state


def test_inception_weights_reach_torch_fidelity_as_a_private_verified_copy(inception_pth, tmp_path):
    from torch_fidelity.utils import create_feature_extractor

    user, state = inception_pth
    weights = read_inception_weights(str(user))
    assert weights.keys() == state.keys()
    marker = tmp_path / "PWNED"
    swapped = tmp_path / "swapped.pth"  # the user's file replaced by a payload after the check: never read again
    swapped.write_bytes(user.read_bytes())
    loaded = read_inception_weights(str(swapped))
    pickle_checkpoint(swapped, marker)
    with temp_cache_dir() as folder:
        copy = inception_weights_file(loaded, folder, str(swapped))
        assert Path(copy).parent == Path(folder) and os.stat(folder).st_mode & 0o077 == 0  # private to this user
        fe = create_feature_extractor(INCEPTION_NAME, ["2048"], cuda=False, feature_extractor_weights_path=copy)
        assert all(torch.equal(v, state[k]) for k, v in fe.state_dict().items())
    assert not marker.exists()

    safetensors.torch.save_file(state, tmp_path / "inception.safetensors")  # also taken as safetensors
    assert read_inception_weights(str(tmp_path / "inception.safetensors")).keys() == state.keys()


def test_inception_weights_of_another_network_are_one_line(tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    weights = read_inception_weights(str(tmp_path / "other.pth"))
    with temp_cache_dir() as folder, pytest.raises(ValueError) as e:
        inception_weights_file(weights, folder, str(tmp_path / "other.pth"))
    msg = _one_line(e, tmp_path / "other.pth")
    assert "not torch-fidelity's Inception-v3 weights" in msg and "Missing key" in msg, msg
    with pytest.raises(ValueError, match=r"missing.pth': file not found; point it at torch-fidelity's"):
        read_inception_weights(str(tmp_path / "missing.pth"))
