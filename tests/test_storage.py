"""S3 storage against an in-process moto server (the `s3` fixture of tests/conftest.py):
a DVC S3 remote round-trip, and WebDataset token shards written to and read back from s3://."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def dvc(repo: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, env=os.environ)
    assert r.returncode == 0, f"dvc {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def new_repo(path: Path, endpoint: str, url: str) -> Path:
    path.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    dvc(path, "init", "-q")
    dvc(path, "remote", "add", "-d", "s3remote", url)
    dvc(path, "remote", "modify", "s3remote", "endpointurl", endpoint)  # credentials: AWS_* env (testing)
    return path


@pytest.mark.slow  # a whole dvc run or a kill-and-resume; the default run keeps the lighter tests of this
def test_dvc_s3_remote_push_pull_round_trip(tmp_path, s3, s3_prefix):
    import s3fs

    a = new_repo(tmp_path / "a", s3, f"{s3_prefix}/dvcstore")
    rng = np.random.default_rng(0)
    data = a / "data"
    (data / "nested").mkdir(parents=True)
    (data / "blob.bin").write_bytes(rng.bytes(300_000))
    (data / "nested" / "tokens.npy").write_bytes(rng.integers(0, 256, (64, 7, 7), dtype=np.uint16).tobytes())
    (data / "empty.txt").write_bytes(b"")
    original = tree_digest(data)
    dvc(a, "add", "data")
    assert "pushed" in dvc(a, "push")
    s3fs.S3FileSystem.clear_instance_cache()
    assert s3fs.S3FileSystem().find(s3_prefix.removeprefix("s3://") + "/dvcstore"), "nothing reached the bucket"

    # a second checkout with only the git-tracked files (.dvc/config, data.dvc) pulls identical bytes
    b = new_repo(tmp_path / "b", s3, f"{s3_prefix}/dvcstore")
    (b / "data.dvc").write_text((a / "data.dvc").read_text())
    dvc(b, "pull")
    assert tree_digest(b / "data") == original

    # and the first one, with its cache and workspace gone, gets them back too
    for p in [a / ".dvc" / "cache", data]:
        subprocess.run(["rm", "-rf", str(p)], check=True)
    dvc(a, "pull")
    assert tree_digest(data) == original
    assert "in sync" in dvc(a, "status", "--cloud")


def test_token_shards_round_trip_through_s3(tmp_path, s3_prefix):
    from oar_core import token_shards as shards
    from oar_core.storage import read_bytes
    from tests.helpers import write_shards

    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 512, (300, 7, 7)).astype(np.uint16)
    labels = rng.integers(0, 10, 300)
    ids = [f"Coat/img.{i}.png" for i in range(300)]  # dots and slashes: ids travel in id.txt, not in the key
    remote = write_shards(s3_prefix, "train", tokens, labels, ids, shard_size=128)
    local = write_shards(tmp_path, "train", tokens, labels, ids, shard_size=128)
    assert [p.rsplit("/", 1)[-1] for p in remote] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert shards.list_shards(s3_prefix, "train") == remote
    for r, loc in zip(remote, local):
        assert read_bytes(r) == Path(loc).read_bytes()  # byte-identical tars on S3 and on disk
    back = [shards.read_shard(p) for p in remote]
    np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in back]), tokens)
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b in back]), labels)
    assert [i for b in back for i in b["ids"]] == ids


def test_webdataset_reads_s3_shards(s3_prefix, monkeypatch):
    """The shards are plain WebDataset tars: the webdataset library iterates them straight from s3://.
    webdataset has no s3 opener of its own (it expects `pipe:aws s3 cp ...`); one line routes s3:// to fsspec."""
    wds = pytest.importorskip("webdataset")
    import fsspec
    from webdataset.gopen import gopen_schemes

    from tests.helpers import write_shards

    monkeypatch.setitem(gopen_schemes, "s3", lambda url, mode="rb", bufsize=8192, **kw: fsspec.open(url, mode).open())
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 256, (20, 7, 7)).astype(np.uint16)
    [url] = write_shards(s3_prefix, "test", tokens, np.arange(20) % 10, [f"id{i}" for i in range(20)], 64)
    samples = list(wds.WebDataset(url, shardshuffle=False).decode())
    assert [s["id.txt"] for s in samples] == [f"id{i}" for i in range(20)]
    np.testing.assert_array_equal(np.stack([s["tokens.npy"] for s in samples]), tokens)


def test_artifacts_get_the_usual_file_mode_not_the_temp_files_private_one(tmp_path):
    from oar_core.storage import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644  # as DVC restores it from its cache


@pytest.mark.parametrize("prefix", ["oar-live", "oar-fidelity"])
def test_scratch_folders_that_killed_runs_leaked_are_swept(prefix):
    import tempfile

    from oar_core.storage import temp_dir

    dead = Path(tempfile.gettempdir()) / f"{prefix}-999999999-leak"  # above Linux's pid_max: never alive
    dead.mkdir(exist_ok=True)
    with temp_dir(prefix) as mine:
        assert not dead.exists() and Path(mine).name.startswith(f"{prefix}-{os.getpid()}-")
