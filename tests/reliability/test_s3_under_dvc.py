"""S3 under `dvc repro` (README "Your own data", docs/bad_inputs.md).

An s3:// ingest source at an endpoint that never answers: DVC lists the dependency itself, with its own client and
timeouts, before the stage starts, so the line is DVC's (no stage code runs first: DVC hashes every dependency
before a stage's command). Pinned here so the documented behaviour stays true, and so a change of how S3 sources
are declared shows up.

An s3:// output (`tokenize.out`): DVC 3 runs the stage and only then refuses to record it; the stage refuses first,
with one line naming the key."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from oar_core.params import Params
from tests.conftest import S3_BUCKET
from tests.reliability.conftest import error_line
from tests.reliability.test_bad_input import _s3_env, silent_endpoint  # noqa: F401 (a fixture)

REPO = Path(__file__).parents[2]


def _pipeline_copy(root: Path, **sections) -> None:
    for name in ("dvc.yaml", "pipeline", "oar_core"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, root / name)
    params = Params().model_dump(mode="json")
    for section, values in sections.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.mark.slow  # about 40 s: botocore's own read timeout, twice
def test_dvc_repro_with_a_silent_s3_source_fails_in_dvcs_own_words(tmp_path, silent_endpoint):  # noqa: F811
    _pipeline_copy(tmp_path, ingest={"source": "s3://oar-data/images", "s3_timeout_s": 1})
    env = {**os.environ, **_s3_env(silent_endpoint), "OMP_NUM_THREADS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True, env=env)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "dvc", "repro", "ingest"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    took = time.time() - t0
    assert r.returncode != 0
    says = f"ERROR: failed to reproduce 'ingest': Read timeout on endpoint URL: \"{silent_endpoint}/oar-data"
    assert says in r.stderr, r.stderr[-2000:]
    assert "Running stage 'ingest'" not in r.stdout + r.stderr  # the stage never started: its own line never comes
    assert took < 120, took  # AWS_MAX_ATTEMPTS=2 bounds DVC's wait too (ingest.s3_timeout_s does not reach DVC)


def test_an_s3_output_is_refused_under_dvc_before_any_work(tmp_path):
    """Under DVC (DVC_STAGE set, as `dvc repro` sets it) the stage names the key and the way out, and touches
    nothing: the endpoint is a closed port, so any attempt would have failed with an S3 line instead. The same params
    without DVC go to S3 (tests/test_s3.py)."""
    _pipeline_copy(tmp_path, tokenize={"out": "s3://oar-data/shards"})
    env = {**os.environ, "DVC_STAGE": "tokenize", "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1",
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "pipeline.tokenize"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    line = error_line(r, "tokenize")
    assert line.startswith("error: [tokenize] tokenize.out: s3://oar-data/shards is an output of this stage, and "
                           "DVC 3 cannot record an output outside the repository; under dvc keep tokenize.out a "
                           "local path"), line
    assert "run `python -m pipeline.tokenize` without dvc" in line, line
    assert {p.name for p in tmp_path.iterdir()} == {"dvc.yaml", "pipeline", "oar_core", "params.yaml"}


@pytest.mark.slow  # about 30 s: ingest and a 30-step tokenizer, then the refusal
def test_dvc_repro_with_an_s3_output_stops_at_that_stage_with_one_line(tmp_path, s3):
    """The real thing against a moto S3 server: before the fix DVC ran tokenize, wrote the shards to S3 and then
    failed with "Saving cached external output ... is not supported since DVC 3.0"."""
    import s3fs

    dag = yaml.safe_load((REPO / "dvc.yaml").read_text())
    _pipeline_copy(tmp_path, ingest={"max_train": 256, "max_test": 64},
                   tokenizer={"steps": 30, "batch_size": 64, "hidden": 16, "code_dim": 8, "codebook_size": 32},
                   tokenize={"out": f"s3://{S3_BUCKET}/dvc-out/shards"})
    dag["stages"] = {s: dag["stages"][s] for s in ("ingest", "tokenizer", "tokenize")}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dag, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True, env=env)
    r = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode != 0
    assert "error: [tokenize] tokenize.out: s3://oar-test/dvc-out/shards is an output of this stage" in r.stderr, \
        r.stderr[-2000:]
    assert "ERROR: failed to reproduce 'tokenize'" in r.stderr
    assert "not supported since DVC 3.0" not in r.stderr
    s3fs.S3FileSystem.clear_instance_cache()
    assert not s3fs.S3FileSystem().exists(f"{S3_BUCKET}/dvc-out")  # nothing written
    assert "tokenize" not in yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]
