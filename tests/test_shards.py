
import numpy as np
import pytest

from oar_core.image_shards import endless_batches, load_split
from oar_core.params import TokenizeParams, TokenizerParams
from oar_core.token_shards import load_meta, load_tokens, read_shard
from oar_core.tokenizer import load_tokenizer, save_tokenizer
from oar_core.webds import list_shards
from pipeline.tokenize import run_tokenize
from pipeline.tokenizer import train_tokenizer
from tests.helpers import encode_all, write_shards

from .conftest import single_thread


def synthetic(n=23, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 65536, (n, 7, 7), dtype=np.uint16)
    labels = rng.integers(0, 10, n).astype(np.int64)
    ids = [f"class {i % 3}/img.{i:03d}.png" for i in range(n)]  # slashes, dots, spaces: not key-safe
    return tokens, labels, ids


def check_round_trip(prefix):
    tokens, labels, ids = synthetic()
    paths = write_shards(prefix, "train", tokens, labels, ids, shard_size=10)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert list_shards(prefix, "train") == paths and list_shards(prefix, "test") == []
    got = load_tokens(prefix, "train")
    np.testing.assert_array_equal(got["tokens"], tokens)
    np.testing.assert_array_equal(got["labels"], labels)
    assert got["ids"] == ids and got["tokens"].dtype == np.uint16
    assert len(read_shard(paths[-1])["ids"]) == 3
    # a smaller rewrite must not leave the old third shard behind to be read as data
    write_shards(prefix, "train", tokens[:5], labels[:5], ids[:5], shard_size=10)
    assert len(list_shards(prefix, "train")) == 1 and load_tokens(prefix, "train")["ids"] == ids[:5]


def test_local_round_trip_and_no_temp_files(tmp_path):
    check_round_trip(str(tmp_path / "shards"))
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["train-000000.tar"]


def test_s3_round_trip(s3_prefix):
    check_round_trip(s3_prefix)


def test_webdataset_reads_shards(tmp_path):
    import webdataset as wds

    tokens, labels, ids = synthetic(5)
    (path,) = write_shards(str(tmp_path), "test", tokens, labels, ids, shard_size=10)
    samples = list(wds.WebDataset(path, shardshuffle=False).decode())
    assert [s["id.txt"] for s in samples] == ids
    np.testing.assert_array_equal(np.stack([s["tokens.npy"] for s in samples]), tokens)
    assert [int(s["cls"]) for s in samples] == list(labels)


def test_truncated_shard_raises_clear_error(tmp_path):
    tokens, labels, ids = synthetic(10)
    (path,) = write_shards(str(tmp_path), "train", tokens, labels, ids, shard_size=10)
    data = open(path, "rb").read()
    for cut in (700, len(data) // 2):
        open(path, "wb").write(data[:cut])
        with pytest.raises(ValueError, match=r"train-000000.tar: .*truncated.*dvc repro tokenize"):
            read_shard(path)


def test_mismatched_lengths_rejected(tmp_path):
    tokens, labels, ids = synthetic(4)
    with pytest.raises(ValueError, match="differ in length"):
        write_shards(str(tmp_path), "train", tokens, labels[:3], ids, 10)


@pytest.fixture(scope="module")
def tiny_tokenizer(fmnist_small, tmp_path_factory):
    with single_thread():
        model, _ = train_tokenizer(TokenizerParams(steps=5, batch_size=32, codebook_size=32, hidden=16, code_dim=8),
                                   endless_batches(fmnist_small, "train", 32, seed=0, buffer=500), 28, 1, "cpu",
                                   progress=False)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.pt"
    save_tokenizer(path, model)
    return path


def test_run_tokenize_end_to_end(fmnist_small, tiny_tokenizer, tmp_path):
    out = tmp_path / "shards"
    r = run_tokenize(TokenizeParams(out=str(out), shard_size=200), fmnist_small, tiny_tokenizer)
    meta = load_meta(str(out))
    assert meta["counts"] == {"train": 512, "test": 128} and meta["shards"]["train"] == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert (meta["grid_h"], meta["grid_w"], meta["codebook_size"], meta["num_classes"]) == (7, 7, 32, 10)
    assert meta["class_names"][0] == "T-shirt/top" and r["out"] == str(out)
    model = load_tokenizer(tiny_tokenizer)
    for split in ("train", "test"):
        images, labels, ids = load_split(fmnist_small, split)
        got = load_tokens(str(out), split)
        # the same tokens, in the same order, but for a rare near-tie between two codes that float rounding (which
        # depends on the batch's size and memory layout) can flip
        want = encode_all(model, images, "cpu")
        assert got["tokens"].shape == want.shape and (got["tokens"] == want).mean() > 0.999
        np.testing.assert_array_equal(got["labels"], labels)
        assert got["ids"] == list(ids)
    # a shard cut exactly at a sample boundary is a valid tar; meta.json's counts still catch it
    last = out / "train-000002.tar"
    shard = read_shard(str(last))
    write_shards(str(tmp_path / "short"), "train", shard["tokens"][:50], shard["labels"][:50], shard["ids"][:50], 200)
    last.write_bytes((tmp_path / "short" / "train-000000.tar").read_bytes())
    with pytest.raises(ValueError, match=r"train-000002.tar: has 50 samples, meta.json says 112"):
        load_tokens(str(out), "train")


def test_run_tokenize_to_s3(fmnist_small, tiny_tokenizer, s3_prefix):
    run_tokenize(TokenizeParams(out=s3_prefix, shard_size=1000), fmnist_small, tiny_tokenizer)
    assert load_meta(s3_prefix)["shards"] == {"train": ["train-000000.tar"], "test": ["test-000000.tar"]}
    assert load_tokens(s3_prefix, "test")["tokens"].shape == (128, 7, 7)


def test_tokenizer_data_mismatch(fmnist_small, tmp_path):
    from oar_core.tokenizer import VQTokenizer

    save_tokenizer(tmp_path / "rgb.pt", VQTokenizer(32, 3, 8, codebook_size=8, code_dim=4, hidden=16))
    with pytest.raises(ValueError, match="32x32x3 images but .* holds 28x28x1"):
        run_tokenize(TokenizeParams(out=str(tmp_path / "s")), fmnist_small, tmp_path / "rgb.pt")


def test_missing_shards_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no train shards found.*dvc repro tokenize"):
        load_tokens(str(tmp_path), "train")
