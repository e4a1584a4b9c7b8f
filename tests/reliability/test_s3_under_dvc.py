"""What `dvc repro` shows for an s3:// ingest source at an endpoint that never answers (README "Your own data",
docs/bad_inputs.md): DVC lists the dependency itself, with its own client and timeouts, before the stage starts, so
the line is DVC's (no stage code runs first: DVC hashes every dependency before a stage's command). Pinned here so
the documented behaviour stays true, and so a change of how S3 sources are declared shows up."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from oar_core.params import Params
from tests.reliability.test_bad_input import _s3_env, silent_endpoint  # noqa: F401 (a fixture)

REPO = Path(__file__).parents[2]


@pytest.mark.slow  # about 40 s: botocore's own read timeout, twice
def test_dvc_repro_with_a_silent_s3_source_fails_in_dvcs_own_words(tmp_path, silent_endpoint):  # noqa: F811
    for name in ("dvc.yaml", "pipeline", "oar_core"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, tmp_path / name)
    params = Params().model_dump(mode="json")
    params["ingest"].update(source="s3://oar-data/images", s3_timeout_s=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
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
