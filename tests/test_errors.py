"""Faults a user meets turn into one line naming the file and the fix, never a traceback."""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from oar_core.storage import write_bytes_atomic
from oar_core.token_shards import load_meta, load_tokens
from pipeline._stage import stage_main


def test_a_corrupt_json_artifact_is_named(tmp_path):
    (tmp_path / "meta.json").write_text('{"grid_h": 7,')
    with pytest.raises(ValueError, match=r"meta\.json: corrupt JSON .*dvc repro tokenize"):
        load_meta(tmp_path)


def test_token_ids_past_the_codebook_name_the_shard(tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    meta = json.loads((shards / "meta.json").read_text())
    meta["codebook_size"] = 8  # the shards hold ids up to 63
    (shards / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"train-000000\.tar: token id \d+ >= codebook size 8"):
        load_tokens(shards, "train")


def test_disk_full_names_the_artifact_not_its_temp_file(tmp_path, monkeypatch):
    from pathlib import Path

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError) as e:
        write_bytes_atomic(tmp_path / "model.pt", b"x")
    assert e.value.filename == str(tmp_path / "model.pt") and not list(tmp_path.iterdir())


@pytest.mark.parametrize("fault,code,says", [
    (OSError(errno.ENOSPC, "No space left on device", "models/oar/model.pt"), 1,
     "error: [ingest] models/oar/model.pt: No space left on device (errno 28); check free space"),
    (KeyboardInterrupt(), 130, "error: [ingest] interrupted; nothing partial is visible, rerun to continue"),
])
def test_a_stage_turns_os_errors_and_ctrl_c_into_one_line(tmp_path, capsys, monkeypatch, fault, code, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("ingest: {}\n")

    def run(p, a):
        raise fault

    with pytest.raises(SystemExit) as e:
        stage_main("doc", "ingest", run, [])
    err = capsys.readouterr().err
    assert e.value.code == code and err.startswith(says) and err.count("\n") == 1


def test_a_stage_dies_with_the_dvc_that_started_it(tmp_path):
    """Killing `dvc repro` alone used to leave its stage running as an orphan that finished writing its outputs. A
    stand-in for dvc (a parent that sets DVC_STAGE, as dvc does, and starts the stage) is SIGKILLed mid-ingest: the
    stage must end within seconds instead of running on."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from tests.conftest import FMNIST_DIR

    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"{FMNIST_DIR} missing")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"ingest": {"out_dir": str(tmp_path / "out")}}))
    pid_file = tmp_path / "stage.pid"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys; "
        "p = subprocess.Popen([sys.executable, '-m', 'pipeline.ingest', '--params', sys.argv[1]], "
        "env={**os.environ, 'DVC_STAGE': 'ingest'}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
        "open(sys.argv[2], 'w').write(str(p.pid)); p.wait()"), str(tmp_path / "params.yaml"), str(pid_file)],
        cwd=Path(__file__).resolve().parents[1])
    deadline = time.time() + 120
    while time.time() < deadline and not any((tmp_path / "out").glob(".train-*.tmp")):  # mid-write of a shard
        time.sleep(0.05)
    assert any((tmp_path / "out").glob(".train-*.tmp")), "the stage never started writing"
    stage = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    gone = time.time() + 10
    while time.time() < gone and Path(f"/proc/{stage}").exists() and \
            Path(f"/proc/{stage}/stat").read_text().split()[2] != "Z":
        time.sleep(0.05)
    alive = Path(f"/proc/{stage}").exists() and Path(f"/proc/{stage}/stat").read_text().split()[2] != "Z"
    if alive:
        os.kill(stage, signal.SIGKILL)
    assert not alive, "the stage kept running after its dvc was killed"
    assert not (tmp_path / "out" / "manifest.json").exists()
