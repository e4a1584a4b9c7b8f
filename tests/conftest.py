"""Shared session fixtures: a tiny Fashion-MNIST ingest and an in-process S3 (moto)."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import pytest

# the session fixtures of the model stages (tiny shards, a trained any-order model), defined once for every module
pytest_plugins = ["tests.fixtures_pipeline"]

# every `dvc` command a test runs would otherwise fork an analytics daemon that spins trying to reach the network
# (seen: one at 79% of a core in `ps` while the suite ran on the 2-core machine)
os.environ["DVC_NO_ANALYTICS"] = "1"

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
S3_BUCKET = "oar-test"


@contextlib.contextmanager
def single_thread():
    """Train small test models on one thread. On a shared 2-core box, two OpenMP threads competing with
    another busy process spin-wait on each other: measured 193 s vs 11 s for the same 200-step run."""
    import torch

    saved_env, saved_n = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"  # oar_core's set_cpu_threads() defers to an explicit setting
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved_n)
        if saved_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_env


@pytest.fixture(scope="session")
def fmnist_small(tmp_path_factory) -> Path:
    """Ingest output dir with the first 512 train / 128 test Fashion-MNIST images."""
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"{FMNIST_DIR} missing (install the Debian package dataset-fashion-mnist)")
    from oar_core.params import IngestParams
    from pipeline.ingest import run_ingest

    out = tmp_path_factory.mktemp("fmnist_small")
    run_ingest(IngestParams(source=str(FMNIST_DIR), out_dir=str(out), max_train=512, max_test=128))
    return out


@pytest.fixture(scope="session")
def s3():
    """Endpoint URL of a moto S3 server running in this process, with bucket `oar-test` created.

    s3fs goes through aiobotocore, which honours AWS_ENDPOINT_URL (botocore >= 1.31), so plain `s3://`
    paths in the code under test reach moto without any endpoint plumbing. The env is restored afterwards."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_SESSION_TOKEN", "AWS_PROFILE"]}
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(env)
    # fsspec caches filesystem instances (and their clients/endpoints) per argument set: start clean
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(S3_BUCKET)
    try:
        yield endpoint
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_prefix(s3, request):
    """A fresh s3:// prefix in the moto bucket for one test."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")
    return f"s3://{S3_BUCKET}/{name}"
