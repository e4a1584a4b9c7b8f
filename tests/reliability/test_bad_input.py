"""Bad input: every case fails (or degrades) with one clear line naming the file/field and the fix, and
leaves no partial artifact behind."""
from __future__ import annotations

import io
import os
import re
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from oar_core.checkpoint import load_checkpoint, save_checkpoint
from oar_core.image_shards import load_split
from oar_core.model import GPT, GPTConfig, load_gpt, save_gpt
from oar_core.order_table import orders_for_ids
from oar_core.params import ExtractParams, IngestParams
from oar_core.token_shards import load_tokens, read_shard
from pipeline.ingest import run_ingest
from tests.conftest import single_thread
from tests.fixtures_pipeline import tiny_train_params
from tests.reliability.conftest import error_line, files_under, run_module, write_params

N = 49


# ---------------------------------------------------------------------------------------------- params.yaml
@pytest.mark.parametrize("body,keys", [
    ("ingest:\n  image_size: 3\n  on_size_mismatch: crop\n", ["ingest.image_size", "ingest.on_size_mismatch"]),
    ("ingest:\n  out_dir: out\n  image_sise: 28\ntokenizer:\n  grid: 7\n  codebok_size: 64\n",
     ["ingest.image_sise", "tokenizer.codebok_size"]),
], ids=["bad-values", "unknown-keys"])
def test_invalid_params_fail_before_any_work(tmp_path, body, keys):
    (tmp_path / "params.yaml").write_text(body)
    r = run_module(["pipeline.ingest", "--params", "params.yaml"], tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    head, *problems = r.stderr.strip().splitlines()
    # one header line naming the file, then one line per offending key (dotted path + what is wrong)
    assert head.startswith("error: [ingest] params.yaml: invalid parameters") and "fix these keys" in head
    assert len(problems) == len(keys)
    for key, line in zip(sorted(keys), sorted(problems)):
        assert line.strip().startswith(f"{key}:"), line
    if "image_sise" in body:
        assert all("unknown key (check spelling" in ln for ln in problems)
    else:
        assert "greater than or equal to 8" in r.stderr and "'resize' or 'reject'" in r.stderr
    assert files_under(tmp_path) == {"params.yaml"}  # nothing was written (not even out_dir)


def test_params_yaml_not_yaml_or_missing(tmp_path):
    (tmp_path / "params.yaml").write_text("ingest: [unclosed\n")
    r = run_module(["pipeline.tokenize", "--params", "params.yaml"], tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "params.yaml: not valid YAML" in r.stderr
    r = run_module(["pipeline.tokenize", "--params", "nope.yaml"], tmp_path)
    assert "nope.yaml: not found; run from the repository root or pass --params" in error_line(r, "tokenize")


# ---------------------------------------------------------------------------------------------- image folders
def _png(arr, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, **kw).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


def test_missing_and_empty_image_folder(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"nope: image folder not found; set ingest.source"):
        run_ingest(IngestParams(source=str(tmp_path / "nope"), out_dir=str(out)))
    (tmp_path / "empty" / "Coat").mkdir(parents=True)
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"empty: no images found .* put images there or point ingest.source else"):
        run_ingest(IngestParams(source=str(tmp_path / "empty"), out_dir=str(out)))
    assert not out.exists()
    # and as a stage: one line
    write_params(tmp_path / "params.yaml", ingest=IngestParams(source=str(tmp_path / "empty"), out_dir="out"))
    assert "no images found" in error_line(run_module(["pipeline.ingest"], tmp_path), "ingest")
    assert not out.exists()


def test_corrupt_and_truncated_images_are_skipped_and_reported(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    good = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(40)]
    for c in ("Bag", "Coat"):
        (src / c).mkdir(parents=True)
    for i, a in enumerate(good):
        (src / ("Bag" if i % 2 else "Coat") / f"ok{i:02d}.png").write_bytes(_png(a))
    full = _png(good[0])
    bad = {"Bag/truncated.png": full[: len(full) // 2], "Bag/empty.png": b"", "Coat/text.jpg": b"not an image\n",
           "Coat/truncated.jpg": _jpeg(Image.fromarray(good[1]))[:300], "Coat/notes.txt": b"hello"}
    for rel, data in bad.items():
        (src / rel).write_bytes(data)
    out = tmp_path / "out"
    s = run_ingest(IngestParams(source=str(src), out_dir=str(out), test_fraction=0.25))
    assert s["counts"]["train"] + s["counts"]["test"] == 40 and s["n_skipped"] == len(bad)
    import json

    report = {e["file"]: e["reason"] for e in json.loads((out / "report.json").read_text())["skipped"]}
    assert set(report) == set(bad)
    assert report["Coat/notes.txt"].startswith("unsupported extension")
    assert report["Bag/empty.png"].startswith("empty file (0 bytes)")
    assert report["Coat/text.jpg"].startswith("not an image: the content is text")
    for rel in ("Bag/truncated.png", "Coat/truncated.jpg"):
        assert report[rel].startswith("truncated or corrupt"), report[rel]
    assert files_under(out) == {"train-000000.tar", "test-000000.tar", "report.json", "manifest.json"}

    # fatal only when nothing usable is left: then only report.json (the reasons) is written
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    for rel, data in bad.items():
        (only_bad / rel.replace("/", "_")).write_bytes(data)
    out2 = tmp_path / "out2"
    write_params(tmp_path / "params.yaml", ingest=IngestParams(source=str(only_bad), out_dir=str(out2)))
    line = error_line(run_module(["pipeline.ingest"], tmp_path), "ingest")
    assert "no usable train images after ingest (5 skipped); every image was skipped; see report.json" in line
    assert files_under(out2) == {"report.json"}


def _mixed_folder(root: Path) -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    files = {
        "gray28.png": _png(rng.integers(0, 256, (28, 28), dtype=np.uint8)),
        "rgb28.png": _png(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)),
        "rgba40x30.png": _png(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8)),
        "gray16bit28.png": _png((np.arange(784).reshape(28, 28) * 80).astype(np.uint16)),
        "palette28.png": None,
        "cmyk64.jpg": _jpeg(Image.new("CMYK", (64, 64), (0, 128, 0, 0))),
        "la100x20.png": None,
    }
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).convert("P").save(buf, "PNG")
    files["palette28.png"] = buf.getvalue()
    buf = io.BytesIO()
    Image.new("LA", (100, 20), (200, 255)).save(buf, "PNG")
    files["la100x20.png"] = buf.getvalue()
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


@pytest.mark.parametrize("channels", [1, 3])
def test_mixed_sizes_and_modes_are_converted(tmp_path, channels):
    files = _mixed_folder(tmp_path / "src")
    out = tmp_path / "out"
    s = run_ingest(IngestParams(source=str(tmp_path / "src"), out_dir=str(out), channels=channels, test_fraction=0.5))
    assert s["n_skipped"] == 0 and s["counts"]["train"] + s["counts"]["test"] == len(files)
    images, ids = [], []
    for split in ("train", "test"):
        split_images, _, split_ids = load_split(out, split)
        images.append(split_images)
        ids += list(split_ids)
    images = np.concatenate(images)
    assert images.shape == (len(files), 28, 28, channels) and images.dtype == np.uint8
    if channels == 1:  # 16-bit data is scaled to 8 bits, not clipped to white
        img = images[ids.index("gray16bit28.png")][..., 0]
        assert 100 < img.mean() < 140 and (img == 255).mean() < 0.05


def test_mixed_sizes_rejected_when_asked(tmp_path):
    _mixed_folder(tmp_path / "src")
    out = tmp_path / "out"
    s = run_ingest(IngestParams(source=str(tmp_path / "src"), out_dir=str(out), on_size_mismatch="reject",
                                test_fraction=0.5))
    import json

    report = {e["file"]: e["reason"] for e in json.loads((out / "report.json").read_text())["skipped"]}
    assert set(report) == {"rgba40x30.png", "cmyk64.jpg", "la100x20.png"}
    assert report["rgba40x30.png"] == "size 40x30 != 28x28 (on_size_mismatch=reject)"
    assert s["counts"]["train"] + s["counts"]["test"] == 4


# ---------------------------------------------------------------------------------------------- shards
def test_truncated_shard_is_a_clear_error_and_train_writes_nothing(tiny_shards, tmp_path):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    shard = shards / "train-000001.tar"
    data = shard.read_bytes()
    for cut in (len(data) // 2 + 100, len(data) // 2 + 700, 20):  # cut mid-member, mid-header, in the first header
        shard.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"train-000001.tar: .*(corrupt or truncated shard|truncated or foreign "
                                             r"shard).*rerun `dvc repro tokenize`"):
            read_shard(shard)
    # cut exactly at a sample boundary: tar cannot tell, meta.json's per-shard count does
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    cut = members[3 * 100].offset  # the 101st sample's first member (3 fields per sample)
    shard.write_bytes(data[:cut] + b"\0" * 1024)
    with pytest.raises(ValueError, match=r"has 100 samples, meta.json says 256 \(truncated\)"):
        load_tokens(shards, "train")

    write_params(tmp_path / "params.yaml", train_random=tiny_train_params("models/m"))
    line = error_line(run_module(["pipeline.train", "--stage", "train_random", "--shards", str(shards)], tmp_path),
                      "train_random")
    assert "train-000001.tar" in line and "rerun `dvc repro tokenize`" in line
    assert not (tmp_path / "models").exists() and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_from_another_config(any_order_model, tiny_shards, tmp_path):
    ckpt_path = any_order_model[0]
    other = tmp_path / "other_vocab.pt"
    save_gpt(other, GPT(GPTConfig(grid_h=7, grid_w=7, vocab_size=32, num_classes=10, n_layer=2, n_head=2, d_model=64)))
    # finetune initialised from a model of another vocab (as a stage: one line, nothing written)
    p = tiny_train_params("models/oar", init_from=str(other), steps=5)
    write_params(tmp_path / "params.yaml", finetune=p)
    line = error_line(run_module(["pipeline.train", "--stage", "finetune", "--shards", str(tiny_shards)], tmp_path),
                      "finetune")
    assert "other_vocab.pt: checkpoint grid 7x7/vocab 32 does not match the shards (7x7/64)" in line
    assert "retrain it on these shards" in line
    assert files_under(tmp_path) == {"params.yaml", "other_vocab.pt"}

    # extraction with a model of another vocab (crashed mid-run on an index error before the check was added)
    with pytest.raises(ValueError, match=r"model vocab 32 does not match the shards' codebook 64"):
        from pipeline.extract_orders import run_extract

        run_extract(ExtractParams(checkpoint=str(other), out_dir=str(tmp_path / "orders")), str(tiny_shards))
    assert not (tmp_path / "orders").exists()
    # ... and another grid
    grid5 = tmp_path / "grid5.pt"
    save_gpt(grid5, GPT(GPTConfig(grid_h=5, grid_w=5, vocab_size=64, num_classes=10, n_layer=1, n_head=2, d_model=16)))
    with pytest.raises(ValueError, match=r"model grid 5x5 does not match shards 7x7"):
        run_extract(ExtractParams(checkpoint=str(grid5), out_dir=str(tmp_path / "orders")), str(tiny_shards))

    # a state_dict tampered to another shape than its config says
    ckpt = load_checkpoint(ckpt_path)
    key = next(k for k in ckpt["state_dict"] if k.endswith("weight") and ckpt["state_dict"][k].dim() == 2)
    ckpt["state_dict"][key] = ckpt["state_dict"][key][:, :-1].clone()
    save_checkpoint(tmp_path / "tampered.pt", ckpt)
    with pytest.raises(ValueError, match=r"tampered.pt: checkpoint does not match its config \(.*size mismatch"):
        load_gpt(tmp_path / "tampered.pt")
    # a truncated file and something that is not a model checkpoint
    (tmp_path / "cut.pt").write_bytes(ckpt_path.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"cut.pt: unreadable model checkpoint .*delete it and rerun its stage"):
        load_gpt(tmp_path / "cut.pt")
    save_checkpoint(tmp_path / "foreign.pt", {"weights": 1})
    with pytest.raises(ValueError, match=r"foreign.pt: not an oar model checkpoint"):
        load_gpt(tmp_path / "foreign.pt")
    with pytest.raises(FileNotFoundError, match=r"missing.pt: model checkpoint not found; run the stage"):
        load_gpt(tmp_path / "missing.pt")


# ---------------------------------------------------------------------------------------------- orders table
def _orders_table(folder: Path, ids: list[str], perms: list[list[int]]) -> Path:
    folder.mkdir(exist_ok=True)
    pq.write_table(pa.table({"image_id": ids, "permutation": pa.array(perms, pa.list_(pa.uint16()))}),
                   folder / "train-000000.parquet")
    return folder


def test_orders_table_that_does_not_fit_the_grid(tiny_shards, tmp_path):
    ids = load_tokens(tiny_shards, "train")["ids"]
    ok = list(range(N))
    dup = [0] + list(range(N - 1))  # 0 twice, 48 missing
    out_of_range = list(range(1, N + 1))  # 49 is no grid position
    for name, bad in (("dup", dup), ("range", out_of_range)):
        perms = [ok] * len(ids)
        perms[7] = bad
        d = _orders_table(tmp_path / name, ids, perms)
        with pytest.raises(ValueError, match=rf"1 row\(s\) are not permutations of 0..48, e.g. image '{ids[7]}'"):
            orders_for_ids(d, ids, N)
    short = _orders_table(tmp_path / "short", ids, [list(range(36))] * len(ids))  # from a 6x6 grid
    # through finetune: one clear error, before any checkpoint or model is written
    p = tiny_train_params(tmp_path / "models/oar", order="given", steps=5)
    from pipeline.train import run_train

    with single_thread(), pytest.raises(ValueError, match=r"permutations have \[36\] entries but the grid has 49"):
        run_train(p, "finetune", str(tiny_shards), tmp_path / "runs", tmp_path / "dvclive", orders_dir=str(short))
    assert not any((tmp_path / d).exists() for d in ("models", "runs", "dvclive"))


# ---------------------------------------------------------------------------------------------- S3
def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return port


class _Deny(BaseHTTPRequestHandler):
    """An S3 endpoint that rejects every request the way AWS does for an unknown access key."""

    def _deny(self):
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidAccessKeyId</Code><Message>The AWS '
                b"Access Key Id you provided does not exist in our records.</Message></Error>")
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _deny

    def log_message(self, *a):
        pass


@pytest.fixture
def deny_endpoint():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Deny)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()


def _s3_env(endpoint: str) -> dict:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard"}


@pytest.mark.parametrize("kind", ["unreachable", "wrong-credentials"])
def test_s3_failures_are_bounded_and_clear(tmp_path, kind, request):
    endpoint = (f"http://127.0.0.1:{_closed_port()}" if kind == "unreachable"
                else request.getfixturevalue("deny_endpoint"))
    write_params(tmp_path / "params.yaml", ingest=IngestParams(source="s3://oar-data/images", out_dir="out"))
    env = {**os.environ, **_s3_env(endpoint)}
    env.pop("AWS_PROFILE", None)
    env.pop("AWS_SESSION_TOKEN", None)
    t0 = time.time()
    r = _run(["pipeline.ingest"], tmp_path, env)
    line = error_line(r, "ingest")
    assert line.startswith("error: [ingest] s3://oar-data/images: cannot list images: ")
    if kind == "unreachable":
        assert f"S3 endpoint {endpoint} unreachable after 2 attempts" in line and "check AWS_ENDPOINT_URL" in line
    else:
        assert "S3 refused the request" in line and "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in line
    assert not (tmp_path / "out").exists()
    # reading shards from S3 (train) fails the same way
    write_params(tmp_path / "params.yaml", train_random=tiny_train_params("models/m"))
    r = _run(["pipeline.train", "--stage", "train_random", "--shards", "s3://oar-data/shards"], tmp_path, env)
    line = error_line(r, "train_random")
    assert "s3://oar-data/shards/meta.json: cannot read: " in line
    assert not (tmp_path / "models").exists() and not (tmp_path / "runs").exists()
    assert time.time() - t0 < 90  # bounded retries, no hang


def _run(args, cwd, env):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def silent_endpoint():
    """Accepts connections and never answers (an overloaded or wedged S3 server)."""
    srv, held = socket.socket(), []
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)

    def accept():
        while True:
            try:
                held.append(srv.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    srv.close()
    for c in held:
        c.close()


def test_a_silent_s3_endpoint_times_out_with_progress_not_a_hang(tmp_path, silent_endpoint):
    write_params(tmp_path / "params.yaml", ingest=IngestParams(source="s3://oar-data/images", out_dir="out",
                                                                s3_timeout_s=1))
    env = {**os.environ, **_s3_env(silent_endpoint)}
    t0 = time.time()
    r = _run(["pipeline.ingest"], tmp_path, env)
    assert time.time() - t0 < 60  # botocore's defaults alone waited 423 s here
    assert f"S3 endpoint {silent_endpoint} did not answer within 1 s in 2 attempts" in error_line(r, "ingest")
    assert f"[storage] no answer from {silent_endpoint} within 1 s" in r.stderr  # progress while it retries


# ---------------------------------------------------------------------------------------------- issue 21
REPO = Path(__file__).parents[2]


def test_non_finite_and_absurd_values_name_their_key_before_any_work(tmp_path):
    # before: lr .inf trained to NaN weights and exit 0; batch_size 1e8 a 19.6 GB allocation and a traceback;
    # seed 2**70 torch's "Overflow when unpacking long long"; cfg_scale .inf a traceback from multinomial
    (tmp_path / "params.yaml").write_text(
        "train_random:\n  lr: .inf\n  batch_size: 100000000\n  seed: 1180591620717411303424\n"
        "sample:\n  cfg_scale: .inf\n  batch_size: " + "x" * 5000 + "\n")
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    r = run_module(["pipeline.train", "--stage", "train_random", "--shards", "nowhere"], tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    head, *problems = r.stderr.strip().splitlines()
    assert head == "error: [train_random] params.yaml: invalid parameters (5 problem(s)); fix these keys:"
    assert sorted(ln.strip() for ln in problems) == [
        "sample.batch_size: Input should be a valid integer, unable to parse string as an integer (got '"
        + "x" * 78 + "…)",  # a value quoted in a message is cut to 80 characters
        "sample.cfg_scale: Input should be a finite number (got inf)",
        "train_random.batch_size: Input should be less than or equal to 65536 (got 100000000)",
        "train_random.lr: Input should be a finite number (got inf)",
        "train_random.seed: Input should be less than or equal to 4294967295 (got 1180591620717411303424)"]
    assert files_under(tmp_path) == {"params.yaml", "dvc.yaml"}


def _bomb() -> str:
    """'billion laughs': ten lines that expand to 9**9 strings."""
    lines = ['l0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    return "\n".join(lines) + "\ningest:\n  source: *a9\n"


@pytest.mark.parametrize("text,says", [
    # before: the stages took the last value while `dvc repro` refused the file
    ("ingest:\n  out_dir: a\n  seed: 1\n  out_dir: b\n",
     "params.yaml: duplicate keys, which DVC refuses (PyYAML would silently take the last value): ingest.out_dir "
     "(lines 2, 4); keep one of each"),
    # before: nothing for 120 s, then a traceback
    (_bomb(), "params.yaml: line 1: YAML anchors and aliases (&a0) are not allowed here; write each value out"),
    # before: a traceback from oar_core.dag's own read of params.yaml (to sweep the stage's temp files)
    ("ingest: [unclosed\n", "params.yaml: not valid YAML at line 2, column 1: expected ',' or ']', but got "
                            "'<stream end>' (while parsing a flow sequence from line 1)"),
], ids=["duplicate-key", "yaml-bomb", "broken-yaml-beside-dvc.yaml"])
def test_params_yaml_that_dvc_and_the_stages_would_read_differently(tmp_path, text, says):
    (tmp_path / "params.yaml").write_text(text)
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")  # as in the repository: the stage reads it to sweep
    t0 = time.time()
    assert error_line(run_module(["pipeline.ingest"], tmp_path, timeout=120), "ingest") == f"error: [ingest] {says}"
    assert time.time() - t0 < 60
    assert files_under(tmp_path) == {"params.yaml", "dvc.yaml"}


def test_a_params_yaml_of_some_sections_beside_dvc_yaml(tmp_path):
    # the start-of-run sweep fills dvc.yaml's ${...} from the validated params (defaults included): it read the file
    # again and ended in a traceback (KeyError: 'ingest') when a section was left to its defaults (before dae1445)
    (tmp_path / "params.yaml").write_text("tokenizer:\n  steps: 5\n")
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    line = error_line(run_module(["pipeline.tokenizer"], tmp_path), "tokenizer")
    assert line == ("error: [tokenizer] data/ingest/manifest.json: ingest manifest not found; run `dvc repro ingest` "
                    "(or python -m pipeline.ingest)")


@pytest.mark.parametrize("stage,fault,says", [
    ("train_random", lambda: torch.empty(2**62, dtype=torch.uint8),  # torch's CPU allocator, a real failure
     "out of memory (tried to allocate 4.0 EiB); lower train_random.batch_size (now 64) and rerun"),
    ("evaluate", lambda: np.empty(2**40),  # numpy's MemoryError, a real failure
     "out of memory (tried to allocate 8.00 TiB); lower evaluate.nll_batch_size (now 250) and rerun"),
    ("sample", lambda: (_ for _ in ()).throw(torch.OutOfMemoryError(  # the CUDA allocator's text (not raised here)
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.81 GiB of which 1.2 GiB "
        "is free.\nIf reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF")),
     "out of memory (tried to allocate 2.00 GiB); lower sample.batch_size (now 250) or sample.candidate_chunk_mb "
     "(now 256.0) and rerun"),
], ids=["torch-cpu", "numpy", "cuda"])
def test_an_allocation_that_fails_names_the_key_to_lower(tmp_path, capsys, monkeypatch, stage, fault, says):
    from pipeline._stage import stage_main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("train_random:\n  batch_size: 64\n")
    with pytest.raises(SystemExit) as e:
        stage_main("doc", stage, lambda p, a: fault(), [])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and err.startswith(f"error: [{stage}] {says}"), err
    with pytest.raises(RuntimeError, match="not about memory"):  # any other RuntimeError is not dressed up as one
        stage_main("doc", stage, lambda p, a: (_ for _ in ()).throw(RuntimeError("not about memory")), [])


def test_a_diverging_loss_stops_training_naming_the_step(tiny_shards, tmp_path):
    # before: exit 0, with NaN weights in model.pt and in every run checkpoint after the divergence
    p = tiny_train_params("models/m", lr=1e6, warmup_steps=0, steps=40, ckpt_every=1, log_every=10, eval_every=40)
    write_params(tmp_path / "params.yaml", train_random=p)
    line = error_line(run_module(["pipeline.train", "--stage", "train_random", "--shards", str(tiny_shards)],
                                 tmp_path), "train_random")
    m = re.fullmatch(r"error: \[train_random\] loss is (nan|inf) at step (\d+): training diverged; lower "
                     r"train_random.lr \(now 1000000.0\), or raise train_random.warmup_steps \(now 0\) or lower "
                     r"train_random.grad_clip \(now 1.0\); no checkpoint of this run holds the diverged weights", line)
    assert m, line
    assert not (tmp_path / "models").exists() and not (tmp_path / "dvclive").exists()
    ckpt = tmp_path / "runs/train_random/last.pt"  # checkpointed every step: the last one is from before the NaN
    if ckpt.exists():
        state = load_checkpoint(ckpt)
        assert state["step"] < int(m.group(2))
        assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_weights_made_non_finite_by_a_finite_loss_step_stop_training_too():
    # an inf gradient under a finite loss: clipping scales it by 0, inf * 0 = NaN in the weights
    from pipeline.train import check_finite

    model = GPT(GPTConfig(grid_h=2, grid_w=2, vocab_size=4, num_classes=0, n_layer=1, n_head=1, d_model=8))
    p = tiny_train_params("m")
    check_finite(model, [(4, torch.tensor(1.5)), (5, torch.tensor(1.2))], p, "train_raster", 1)
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(ValueError, match=r"^weights are not finite after step 5 \(a gradient overflowed\): training "
                                         r"diverged; lower train_raster.lr \(now 0.003\)"):
        check_finite(model, [(4, torch.tensor(1.5)), (5, torch.tensor(1.2))], p, "train_raster", 1)
    with pytest.raises(ValueError, match=r"^loss is inf at step 4: training diverged"):
        check_finite(model, [(4, torch.tensor(float("inf"))), (5, torch.tensor(float("nan")))], p, "train_raster", 1)


def _made_by(folder: Path, ids: list[str], ckpt_hash: str | None) -> Path:
    """An orders table over `ids` (raster order each) as extract_orders writes it, recording `ckpt_hash`."""
    from oar_core.order_table import write_part

    folder.mkdir()
    table = pa.table({"image_id": ids, "permutation": pa.array([list(range(N))] * len(ids), pa.list_(pa.uint16()))})
    if ckpt_hash is None:  # by hand: no record of what made it
        pq.write_table(table, folder / "train-000000.parquet")
    else:
        write_part(folder / "train-000000.parquet", table, ckpt_hash, "p")
    return folder


def test_finetune_refuses_orders_extracted_by_another_checkpoint(any_order_model, tiny_shards, tmp_path):
    from oar_core.storage import file_hash

    ckpt = any_order_model[0]
    other = tmp_path / "other.pt"  # the same architecture, other weights
    save_gpt(other, GPT(load_gpt(ckpt)[0].cfg))
    ids = load_tokens(tiny_shards, "train")["ids"]
    made = _made_by(tmp_path / "orders", ids, file_hash(ckpt))
    by_hand = _made_by(tmp_path / "by_hand", ids, None)
    args = ["pipeline.train", "--stage", "finetune", "--shards", str(tiny_shards), "--orders-dir"]
    for init_from, orders, says in (
        (other, made, f"by checkpoint {file_hash(ckpt)} (train-000000.parquet), not by finetune.init_from {other} "
                      f"({file_hash(other)})"),
        (ckpt, by_hand, "by no recorded checkpoint (not written by extract_orders) (train-000000.parquet), not by "
                        f"finetune.init_from {ckpt} ({file_hash(ckpt)})")):
        p = tiny_train_params("models/oar", order="given", init_from=str(init_from), steps=2)
        write_params(tmp_path / "params.yaml", finetune=p)
        line = error_line(run_module([*args, str(orders)], tmp_path), "finetune")
        assert line == (f"error: [finetune] {orders}: orders extracted {says}; rerun `dvc repro extract_orders` with "
                        f"extract_orders.checkpoint: {init_from}, or point finetune.init_from at the checkpoint that "
                        f"made them"), line
        assert not any((tmp_path / d).exists() for d in ("models", "runs", "dvclive"))
    # the checkpoint that made them: it trains
    write_params(tmp_path / "params.yaml", finetune=tiny_train_params("models/oar", order="given", steps=2,
                                                                      init_from=str(ckpt)))
    r = run_module([*args, str(made)], tmp_path)
    assert r.returncode == 0 and (tmp_path / "models/oar/model.pt").exists(), r.stderr[-2000:]
