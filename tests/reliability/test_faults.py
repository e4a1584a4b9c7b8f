"""Faults: a stage SIGKILLed mid-run and rerun ends exactly where an uninterrupted run ends, and no
half-written file is ever visible under an output name. (`train`'s own kill test is tests/test_train.py.)"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from oar_core.checkpoint import load_checkpoint
from oar_core.dag import dag_stages
from oar_core.model import load_gpt
from oar_core.order_table import scan
from oar_core.params import (
    EvaluateParams,
    IngestParams,
    Params,
    SampleModelParams,
    SampleParams,
    TokenizeParams,
    TokenizerParams,
)
from tests.conftest import FMNIST_DIR, single_thread
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


@pytest.mark.slow  # a kill-and-resume (27 s); tests/test_extract.py resumes from a missing part in the default run
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


@pytest.mark.slow  # a whole dvc run or a kill-and-resume; the default run keeps the lighter tests of this
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
    (leftover,) = left
    assert leftover.startswith(".train-000000.parquet.") and leftover.endswith(".tmp")
    assert not list(out.glob("*.parquet"))  # the half-written bytes never appeared under the part's name
    with pytest.raises(FileNotFoundError, match="no orders parts"):
        scan(out)

    r = run_module(["pipeline.extract_orders", "--shards", str(tiny_shards)], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert files_under(out) == {"train-000000.parquet", "train-000001.parquet", "test-000000.parquet"}  # temp swept
    assert _part_bytes(out) == _part_bytes(ref_dir)


@pytest.mark.slow  # a whole dvc run or a kill-and-resume; the default run keeps the lighter tests of this
def test_finetune_killed_mid_run_resumes_to_identical_weights(reference_orders, any_order_model, tiny_shards, tmp_path):
    ref_dir, _ = reference_orders
    p = tiny_train_params("models/oar", order="given", init_from=str(any_order_model[0]),
                          steps=40, lr=1e-3, warmup_steps=5, random_mix=0.25, ckpt_every=5, eval_every=20)
    for d in ("straight", "killed"):
        (tmp_path / d).mkdir()
        write_params(tmp_path / d / "params.yaml", finetune=p)
    args = ["pipeline.train", "--stage", "finetune", "--shards", str(tiny_shards), "--orders-dir", str(ref_dir)]
    r = run_module(args, tmp_path / "straight")
    assert r.returncode == 0, r.stderr[-2000:]

    killed = tmp_path / "killed"
    ckpt = killed / "runs/finetune/last.pt"
    _kill_when(_popen(["-m", *args], killed), ckpt.exists)
    assert ckpt.exists() and not (killed / "models/oar/model.pt").exists(), "the kill came too late to test a resume"
    state = load_checkpoint(ckpt, "run checkpoint")  # the visible checkpoint is whole
    assert 0 < state["step"] < 40 and state["step"] % 5 == 0
    assert not [f for f in files_under(killed / "models")] and not (killed / "dvclive").exists()

    r = run_module(args, killed)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from runs/finetune/last.pt at step" in r.stdout + r.stderr
    a, b = (load_gpt(d / "models/oar/model.pt")[0].state_dict() for d in (tmp_path / "straight", killed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((tmp_path / d / "dvclive/finetune/metrics.json").read_text()) for d in ("straight", "killed"))
    for k in ("train_loss", "test_bits_per_token", "steps", "params", "step"):
        assert ma[k] == mb[k], k
    for name in ("train_loss.tsv", "test_bits_per_token.tsv"):  # DVCLive's step-wise curves, byte for byte
        curve = f"dvclive/finetune/plots/metrics/{name}"
        assert (tmp_path / "straight" / curve).read_bytes() == (killed / curve).read_bytes()
    assert not (killed / "runs/finetune/last.pt").exists()
    assert not [f for f in files_under(killed) if f.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------------------------
# SIGKILL mid-run for the stages that do not resume but must still never show a half-made result: ingest, tokenizer,
# tokenize, sample, evaluate. Each is killed as soon as it is demonstrably mid-work, then must show under its final
# names only whole files (each equal to what an uninterrupted run writes there) and no completion marker; the rerun
# sweeps the leftovers and ends byte-identical to an uninterrupted run of the same params.

DAG = Path(__file__).parents[2] / "dvc.yaml"  # stages sweep the `.*.tmp` leftovers inside their dvc.yaml outputs
TIMING = re.compile(r"seconds|_per_s$")  # keys of a metrics JSON that hold timings (train_seconds, images_per_s)


class _Run:
    """A stage as its own process, as DVC runs it, with its stderr gathered as it comes (to await progress lines)."""

    def __init__(self, args, cwd):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self._err: list[bytes] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self):
        for chunk in iter(lambda: os.read(self.proc.stderr.fileno(), 1 << 16), b""):
            self._err.append(chunk)

    @property
    def stderr(self) -> str:
        return b"".join(self._err).decode(errors="replace")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._reader.join(10)
        self.proc.stderr.close()


def _kill_mid_run(args, cwd: Path, ready, done, prepare=None, tries=3, timeout=180.0) -> _Run:
    """Start the stage in `cwd` and SIGKILL it the moment `ready(run)` holds. A run that reached `done()` before the
    signal landed (a poll starved on a busy 2-core box) shows nothing mid-run: start over from `prepare()`."""
    for _ in range(tries):
        if prepare is not None:
            prepare()
        run = _Run(args, cwd)
        deadline = time.time() + timeout
        while not ready(run) and run.proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        hit = ready(run)
        run.kill()
        rc = run.proc.returncode
        assert rc in (0, -signal.SIGKILL), f"{args[0]} failed on its own (exit {rc}):\n{run.stderr[-3000:]}"
        if rc == -signal.SIGKILL and hit and not done():
            return run
        assert rc == 0 or hit, f"{args[0]} never got mid-work in {timeout:.0f} s:\n{run.stderr[-3000:]}"
    pytest.fail(f"{args[0]} finished before the kill landed, {tries} times: no mid-run state to check")


def _workdir(path: Path, **sections) -> Path:
    """A stage's working folder: its params.yaml and the repo's dvc.yaml (for the start-of-run sweep)."""
    path.mkdir(parents=True)
    write_params(path / "params.yaml", **sections)
    shutil.copy(DAG, path / "dvc.yaml")
    return path


def _workdirs(tmp_path: Path, **sections) -> tuple[Path, Path]:
    """`straight` (the uninterrupted reference) and `killed`: same params.yaml, same dvc.yaml."""
    return _workdir(tmp_path / "straight", **sections), _workdir(tmp_path / "killed", **sections)


def _run_ok(args, cwd) -> subprocess.CompletedProcess:
    r = run_module(args, cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


class _Outs:
    """What dvc.yaml declares `stage` writes (outs, metrics, plots), read from the repo's dvc.yaml so the tests follow
    it. Whole top folders are scanned (`models`, `dvclive`, ...), so a hidden leftover beside an output is seen too.
    `markers`: what the stage writes last (default: its metrics), so a run that has them finished."""

    def __init__(self, stage: str, markers=()):
        spec = dag_stages(DAG, Params().model_dump(mode="json"))[stage]  # the tests use the default folders
        paths = {k: [next(iter(e)) if isinstance(e, dict) else e for e in spec.get(k) or []]
                 for k in ("outs", "metrics", "plots")}
        self.roots = sorted({Path(p).parts[0] for ps in paths.values() for p in ps})
        self.metrics, self.markers = paths["metrics"], list(markers) or paths["metrics"]
        assert self.markers, f"{stage}: no completion marker"

    def files(self, root: Path) -> dict[str, bytes]:
        """Every file under the output folders, hidden ones included, keyed by its path under `root`."""
        return {f"{o}/{rel}": (root / o / rel).read_bytes()
                for o in self.roots for rel in sorted(files_under(root / o))}

    def done(self, root: Path) -> bool:
        return all((root / m).exists() for m in self.markers)

    def clear(self, root: Path) -> None:
        for o in self.roots:
            shutil.rmtree(root / o, ignore_errors=True)

    def comparable(self, rel: str, data: bytes):
        """The bytes, or for a metrics JSON, its content without timings (nothing else may differ)."""
        if not (rel.endswith(".json") and any(rel == m or rel.startswith(f"{m}/") for m in self.metrics)):
            return data

        def drop(obj):
            return {k: drop(v) for k, v in obj.items() if not TIMING.search(k)} if isinstance(obj, dict) else obj

        return drop(json.loads(data))


def _leftover(rel: str) -> bool:
    """A hidden temp a killed run may leave: `.NAME.*.tmp` (atomic_path) or in/as `.NAME.partial` (sample, DVCLive)."""
    return any(p.startswith(".") and (p.endswith(".tmp") or p.endswith(".partial")) for p in Path(rel).parts)


def _assert_nothing_partial(killed: Path, straight: Path, o: _Outs) -> dict[str, bytes]:
    """After the kill: no completion marker, and besides hidden temps only files identical to the finished ones."""
    got, want = o.files(killed), o.files(straight)
    assert o.done(straight) and not any((killed / m).exists() for m in o.markers), o.markers
    for rel, data in got.items():
        if any(p.startswith(".") for p in Path(rel).parts):
            assert _leftover(rel), f"{rel}: a hidden file that is no temp of ours"
        else:
            assert rel in want, f"{rel}: visible after the kill, but an uninterrupted run writes no such file"
            assert o.comparable(rel, data) == o.comparable(rel, want[rel]), f"{rel}: visible but not the finished file"
    return got


def _assert_identical(killed: Path, straight: Path, o: _Outs) -> None:
    """After the rerun: the very files of an uninterrupted run (no leftover), byte for byte (metrics: but timings)."""
    got, want = o.files(killed), o.files(straight)
    assert sorted(got) == sorted(want), "the rerun left other files (leftovers swept?) than an uninterrupted run"
    for rel in want:
        assert o.comparable(rel, got[rel]) == o.comparable(rel, want[rel]), f"{rel} differs from the uninterrupted run"


def _has_files(folder: Path, pattern: str = "*") -> bool:
    return folder.is_dir() and any(f.is_file() for f in folder.glob(pattern))


@pytest.fixture(scope="module")
def ingest_7k(tmp_path_factory) -> Path:
    """6000 train / 1000 test Fashion-MNIST images: enough work that tokenizer and tokenize can be caught mid-run."""
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"{FMNIST_DIR} missing (install the Debian package dataset-fashion-mnist)")
    from pipeline.ingest import run_ingest

    out = tmp_path_factory.mktemp("ingest_7k")
    run_ingest(IngestParams(out_dir=str(out), max_train=6000, max_test=1000))
    return out


@pytest.mark.slow  # minutes of its own (a 7k or 60k-image ingest, a tokenizer, sample or evaluate run)
def test_ingest_killed_mid_write_reruns_to_identical_arrays(tmp_path):
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"{FMNIST_DIR} missing")
    # all of Fashion-MNIST (about 2 s): its 60 MB of arrays take long enough to write to be caught at it
    straight, killed = _workdirs(tmp_path, ingest=IngestParams(out_dir="data/ingest"))
    o = _Outs("ingest", markers=["data/ingest/manifest.json"])  # written last: "the rest is complete"
    _run_ok(["pipeline.ingest"], straight)
    out = killed / "data/ingest"
    _kill_mid_run(["pipeline.ingest"], killed, ready=lambda r: out.is_dir() and any(out.iterdir()),
                  done=lambda: o.done(killed), prepare=lambda: o.clear(killed))
    _assert_nothing_partial(killed, straight, o)
    from oar_core.image_shards import load_manifest

    with pytest.raises(FileNotFoundError, match="ingest manifest not found"):  # what the next stage would say
        load_manifest(out)

    _run_ok(["pipeline.ingest"], killed)
    _assert_identical(killed, straight, o)


TOKENIZER_PARAMS = TokenizerParams(codebook_size=64, steps=60, batch_size=64)  # ~3 s of training, ~1 s of evaluation


def _mid_training(run: _Run) -> bool:
    """The tokenizer's progress line shows steps done, and not all of them."""
    done = [(int(a), int(b)) for a, b in re.findall(r"tokenizer:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", run.stderr)]
    return bool(done) and 0 < done[-1][0] < done[-1][1]


@pytest.fixture(scope="module")
def tokenizer_straight(ingest_7k, tmp_path_factory) -> Path:
    root = _workdir(tmp_path_factory.mktemp("tokenizer") / "straight", tokenizer=TOKENIZER_PARAMS)
    _run_ok(["pipeline.tokenizer", "--ingest-dir", str(ingest_7k)], root)
    return root


@pytest.mark.slow  # minutes of its own (a 7k or 60k-image ingest, a tokenizer, sample or evaluate run)
@pytest.mark.parametrize("when", ["training", "evaluating"])
def test_tokenizer_killed_mid_run_reruns_to_an_identical_checkpoint(tokenizer_straight, ingest_7k, tmp_path, when):
    """`training`: killed once its progress line shows steps done; `evaluating`: once models/tokenizer.pt is in
    place but the metrics (the stage's last write) are not."""
    killed = _workdir(tmp_path / "killed", tokenizer=TOKENIZER_PARAMS)
    args, o = ["pipeline.tokenizer", "--ingest-dir", str(ingest_7k)], _Outs("tokenizer")
    ckpt = killed / "models/tokenizer.pt"
    _kill_mid_run(args, killed, _mid_training if when == "training" else (lambda r: ckpt.exists()),
                  done=lambda: o.done(killed), prepare=lambda: o.clear(killed))
    got = _assert_nothing_partial(killed, tokenizer_straight, o)
    if when == "training":
        assert not [f for f in got if not _leftover(f)], f"visible while training: {sorted(got)}"
    else:
        assert "models/tokenizer.pt" in got  # whole: the byte check above

    _run_ok(args, killed)
    _assert_identical(killed, tokenizer_straight, o)  # the metrics: all but train_seconds


@pytest.mark.slow  # minutes of its own (a 7k or 60k-image ingest, a tokenizer, sample or evaluate run)
def test_tokenize_killed_between_shards_reruns_to_identical_shards(ingest_7k, tiny_shards, tmp_path):
    from oar_core.token_shards import load_meta, read_shard

    p = TokenizeParams(out="data/shards", shard_size=500)  # 12 train + 2 test shards
    straight, killed = _workdirs(tmp_path, tokenize=p)
    args = ["pipeline.tokenize", "--ingest-dir", str(ingest_7k),
            "--tokenizer", str(tiny_shards.parent / "tokenizer.pt")]
    o, shards = _Outs("tokenize", markers=["data/shards/meta.json"]), killed / "data/shards"  # meta.json: last
    _run_ok(args, straight)
    _kill_mid_run(args, killed, ready=lambda r: _has_files(shards, "train-*.tar"), done=lambda: o.done(killed),
                  prepare=lambda: o.clear(killed))
    got = _assert_nothing_partial(killed, straight, o)
    visible = sorted(Path(f).name for f in got if not _leftover(f))
    assert visible, "killed once a shard was in place, yet none is"
    for name in visible:  # every shard under its name reads back whole
        assert len(read_shard(shards / name)["ids"]) == 500
    with pytest.raises(FileNotFoundError, match="shard metadata not found"):  # train/extract refuse the half set
        load_meta(shards)

    _run_ok(args, killed)
    _assert_identical(killed, straight, o)


def _sample_params(any_order_model, tiny_shards) -> SampleParams:
    ckpt = str(any_order_model[0])
    models = [SampleModelParams(name="raster", checkpoint=ckpt, order="raster"),
              SampleModelParams(name="any-order", checkpoint=ckpt, order="random"),
              SampleModelParams(name="oar", checkpoint=ckpt, order="confidence")]
    return SampleParams(out_dir="samples", tokenizer=str(tiny_shards.parent / "tokenizer.pt"), models=models,
                        n_per_model=20, batch_size=10)


@pytest.fixture(scope="module")
def sampled(any_order_model, tiny_shards, tmp_path_factory) -> Path:
    """An uninterrupted `python -m pipeline.sample` run (3 models x 20 images): the sample test's reference and the
    evaluate test's input."""
    root = _workdir(tmp_path_factory.mktemp("sample") / "straight", sample=_sample_params(any_order_model, tiny_shards))
    _run_ok(["pipeline.sample"], root)
    return root


@pytest.mark.slow  # minutes of its own (a 7k or 60k-image ingest, a tokenizer, sample or evaluate run)
def test_sample_killed_between_models_reruns_to_identical_images(sampled, any_order_model, tiny_shards, tmp_path):
    killed = _workdir(tmp_path / "killed", sample=_sample_params(any_order_model, tiny_shards))
    o, samples, names = _Outs("sample"), killed / "samples", ["raster", "any-order", "oar"]
    # killed once the first model's folder is swapped in, while the next one is being drawn
    _kill_mid_run(["pipeline.sample"], killed, ready=lambda r: any((samples / m).is_dir() for m in names),
                  done=lambda: o.done(killed) or all((samples / m).is_dir() for m in names),
                  prepare=lambda: o.clear(killed))
    got = _assert_nothing_partial(killed, sampled, o)
    models = {Path(f).parts[1] for f in got if f.startswith("samples/") and not _leftover(f)}
    assert models and models < set(names), models
    for m in models:  # a visible model folder is complete: 20 images, the orders table, the grid and meta.json
        assert len(files_under(samples / m)) == 20 + 3

    leftovers = sorted(f.name for f in samples.iterdir() if f.name.startswith("."))  # e.g. `.any-order.partial`
    r = _run_ok(["pipeline.sample"], killed)
    if leftovers:
        assert f"removed from samples: {', '.join(leftovers)}" in r.stdout, r.stdout
    _assert_identical(killed, sampled, o)  # the metrics: all but seconds and images_per_s


def _fidelity_caches(pid: int) -> list[Path]:
    return sorted(Path(tempfile.gettempdir()).glob(f"oar-fidelity-{pid}-*"))


@pytest.fixture(scope="module")
def evaluate_setup(fmnist_small, tmp_path_factory) -> tuple[EvaluateParams, list[str]]:
    """Tiny evaluate params, plus the arguments naming its in-domain feature network: the feature_net stage's
    checkpoint (trained here, 40 steps) where that stage exists, else evaluate trains its own classifier."""
    tiny = dict(kid_subset_size=10, nll_batch_size=128, nll_orders=1, strip_steps=4)
    if "feature_net" not in Params.model_fields:
        return EvaluateParams(**tiny, classifier_steps=40, classifier_batch_size=64), []
    from oar_core.params import FeatureNetParams
    from pipeline.feature_net import run_feature_net

    root = tmp_path_factory.mktemp("feature_net")
    with single_thread():
        run_feature_net(FeatureNetParams(steps=40, batch_size=64), str(fmnist_small), root / "feature_net.pt",
                        root / "feature_net.json", progress=False)
    return EvaluateParams(**tiny), ["--feature-net", str(root / "feature_net.pt")]


def _evaluate_args(sampled, fmnist_small, tiny_shards, feature_net) -> list[str]:
    return ["pipeline.evaluate", "--samples", str(sampled / "samples"), "--ingest-dir", str(fmnist_small),
            "--shards", str(tiny_shards), "--orders-dir", "no-orders", "--tokenizer",
            str(tiny_shards.parent / "tokenizer.pt"), "--plots-dir", "no-plots", *feature_net]


@pytest.fixture(scope="module")
def evaluate_straight(sampled, evaluate_setup, fmnist_small, tiny_shards, tmp_path_factory) -> Path:
    p, feature_net = evaluate_setup
    root = _workdir(tmp_path_factory.mktemp("evaluate") / "straight", evaluate=p)
    _run_ok(_evaluate_args(sampled, fmnist_small, tiny_shards, feature_net), root)
    return root


@pytest.mark.slow  # minutes of its own (a 7k or 60k-image ingest, a tokenizer, sample or evaluate run)
@pytest.mark.parametrize("when", ["fidelity", "figures"])
def test_evaluate_killed_mid_run_reruns_to_identical_reports(evaluate_straight, sampled, evaluate_setup, fmnist_small,
                                                             tiny_shards, tmp_path, when):
    """`fidelity`: killed while torch-fidelity works in its per-run temp cache (which the kill leaks and the next run
    must sweep); `figures`: once the first figure is in reports/figures, before report.md and the metrics."""
    p, feature_net = evaluate_setup
    killed = _workdir(tmp_path / "killed", evaluate=p)
    args, o = _evaluate_args(sampled, fmnist_small, tiny_shards, feature_net), _Outs("evaluate")
    ready = ((lambda r: _fidelity_caches(r.proc.pid)) if when == "fidelity" else
             (lambda r: _has_files(killed / "reports/figures", "*.png")))
    run = _kill_mid_run(args, killed, ready, done=lambda: o.done(killed), prepare=lambda: o.clear(killed))
    leaked = _fidelity_caches(run.proc.pid)
    if when == "fidelity":
        assert leaked and all(d.is_dir() for d in leaked), "the killed run left no fidelity cache to sweep"
    got = _assert_nothing_partial(killed, evaluate_straight, o)
    assert "reports/report.md" not in got
    if when == "figures":
        assert any(f.startswith("reports/figures/") and not _leftover(f) for f in got)

    _run_ok(args, killed)
    assert not any(d.exists() for d in leaked), f"the next run did not sweep the killed run's cache {leaked}"
    _assert_identical(killed, evaluate_straight, o)


# ------------------------------------------------------------------------------------------------------------------
# `dvc push` to the S3 remote (the in-process moto server of tests/conftest.py) SIGKILLed mid-push.

def _dvc(repo: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, env=os.environ,
                       timeout=300)
    assert r.returncode == 0, f"dvc {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _dvc_repo(path: Path, endpoint: str, url: str) -> Path:
    """A git + DVC repo whose default remote is `url` on the moto endpoint (credentials: the AWS_* env, `testing`).
    The remote is written into .dvc/config directly: what `dvc remote add -d` + `dvc remote modify endpointurl`
    write, without two more DVC start-ups."""
    path.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    _dvc(path, "init", "-q")
    with (path / ".dvc/config").open("a") as f:
        f.write(f"[core]\n    remote = s3remote\n['remote \"s3remote\"']\n"
                f"    url = {url}\n    endpointurl = {endpoint}\n")
    return path


def _remote_objects(client, bucket: str, prefix: str) -> dict[str, bytes]:
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _count_objects(client, bucket: str, prefix: str) -> int:
    return sum(page.get("KeyCount", 0) for page in
               client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix))


def _assert_content_addressed(objects: dict[str, bytes]) -> None:
    """Every object in the remote is whole: DVC stores a file under files/md5/<md5 of its bytes>, a directory listing
    under files/md5/<md5 of the listing>.dir, so a truncated or mixed object cannot hash to its own key."""
    for key, data in objects.items():
        m = re.search(r"/files/md5/([0-9a-f]{2})/([0-9a-f]{30})(\.dir)?$", key)
        assert m, f"{key}: not a DVC content-addressed object"
        assert hashlib.md5(data).hexdigest() == m[1] + m[2], f"{key}: its bytes do not hash to its name (partial?)"


@pytest.mark.slow  # a whole dvc run or a kill-and-resume; the default run keeps the lighter tests of this
def test_dvc_push_killed_mid_push_reruns_to_an_intact_remote(tmp_path, s3, s3_prefix):
    import boto3

    url = f"{s3_prefix}/dvcstore"
    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    client = boto3.client("s3", endpoint_url=s3)
    a = _dvc_repo(tmp_path / "a", s3, url)
    rng = np.random.default_rng(0)
    n = 400  # small files, one PUT each (about 200/s to moto): the push is caught a few dozen objects in
    for i in range(n):
        f = a / "data" / f"{i // 100:02d}" / f"{i:04d}.bin"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(rng.bytes(int(rng.integers(1, 4096))))
    original = {rel: (a / "data" / rel).read_bytes() for rel in files_under(a / "data")}
    _dvc(a, "add", "-q", "data")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], cwd=a, check=True)
    subprocess.run([*git, "commit", "-qm", "data"], cwd=a, check=True)

    proc = subprocess.Popen([sys.executable, "-m", "dvc", "push"], cwd=a, env=os.environ, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _count_objects(client, bucket, prefix) < 10 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"dvc push ended on its own (exit {proc.returncode}) before the kill"
    # a PUT whose body was sent before the kill can still land a moment later (the server finishes it): let the
    # remote settle before taking what arrived, or the rerun's count is off by that object
    partial, settled = _remote_objects(client, bucket, prefix), None
    while settled != partial:
        time.sleep(0.5)
        settled, partial = partial, _remote_objects(client, bucket, prefix)
    assert 10 <= len(partial) < n + 1, f"{len(partial)} of {n + 1} objects: the kill was not mid-push"
    _assert_content_addressed(partial)  # what did arrive is whole
    # DVC uploads a directory's listing (.dir) only after all its files: a remote never lists a folder it lacks files of
    assert not any(k.endswith(".dir") for k in partial)
    assert "new:" in _dvc(a, "status", "-c")  # the repo sees the remote lacks the rest (no stale "pushed" record)

    assert f"{n + 1 - len(partial)} files pushed" in _dvc(a, "push")  # exactly what was missing, no lock left behind
    final = _remote_objects(client, bucket, prefix)
    assert len(final) == n + 1 and sum(k.endswith(".dir") for k in final) == 1
    _assert_content_addressed(final)
    assert all(final[k] == v for k, v in partial.items())
    assert "in sync" in _dvc(a, "status", "-c")

    # a fresh clone (git only: .dvc/config, data.dvc) pulls the very same bytes
    b = tmp_path / "b"
    subprocess.run(["git", "clone", "-q", str(a), str(b)], check=True)
    _dvc(b, "pull", "-q")
    assert {rel: (b / "data" / rel).read_bytes() for rel in files_under(b / "data")} == original
