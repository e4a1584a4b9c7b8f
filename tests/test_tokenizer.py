import json

import numpy as np
import pytest
import torch

from oar_core.checkpoint import save_checkpoint
from oar_core.image_shards import endless_batches, image_batches, load_split, to_float_BCHW
from oar_core.params import TokenizerParams
from oar_core.tokenizer import VQTokenizer, load_tokenizer, save_tokenizer
from pipeline.tokenizer import evaluate_tokenizer, mean_image, run_tokenizer, train_tokenizer
from tests.helpers import encode_all

from .conftest import single_thread

FAST = dict(steps=200, batch_size=64, codebook_size=64, hidden=32, code_dim=16)


@pytest.fixture(scope="module")
def trained(fmnist_small):
    stream = endless_batches(fmnist_small, "train", FAST["batch_size"], seed=0, buffer=500)
    with single_thread():
        model, history = train_tokenizer(TokenizerParams(**FAST), stream, 28, 1, "cpu", progress=False)
    return model, history


def test_short_training_beats_mean_image(trained, fmnist_small):
    model, history = trained
    train, _, _ = load_split(fmnist_small, "train")
    test, _, _ = load_split(fmnist_small, "test")
    m = evaluate_tokenizer(model, np.array_split(test, 3), mean_image([train]), "cpu")
    assert m["recon_mse"] < 0.4 * m["baseline_mse"], m
    assert m["codebook_usage"] > 0.5 and 1 < m["perplexity"] <= 64 and m["grid"] == 7
    assert history[-1]["recon"] < history[0]["recon"]


def test_encode_decode_shapes(trained, fmnist_small):
    model, _ = trained
    test, _, _ = load_split(fmnist_small, "test")
    x_BCHW = to_float_BCHW(test[:5])
    tokens_BHW = model.encode(x_BCHW)
    assert tokens_BHW.shape == (5, 7, 7) and tokens_BHW.dtype == torch.long
    assert 0 <= int(tokens_BHW.min()) and int(tokens_BHW.max()) < 64
    recon_BCHW = model.decode(tokens_BHW)
    assert recon_BCHW.shape == (5, 1, 28, 28) and 0 <= float(recon_BCHW.min()) and float(recon_BCHW.max()) <= 1


@pytest.mark.parametrize("size,channels,grid,internal", [(32, 3, 7, 28), (32, 1, 4, 32), (16, 1, 16, 16)])
def test_any_size_maps_to_grid(size, channels, grid, internal):
    model = VQTokenizer(size, channels, grid, codebook_size=16, code_dim=8, hidden=16).eval()
    assert model.internal_size == internal
    x = torch.rand(2, channels, size, size)
    tokens = model.encode(x)
    assert tokens.shape == (2, grid, grid)
    assert model.decode(tokens).shape == (2, channels, size, size)


def test_grid_larger_than_image_errors():
    with pytest.raises(ValueError, match="tokenizer.grid"):
        VQTokenizer(8, 1, 16)


def test_training_is_deterministic(fmnist_small):
    """The shuffled stream (shard order and buffer) is seeded: two runs see the same batches."""
    train, _, _ = load_split(fmnist_small, "train")
    p = TokenizerParams(**{**FAST, "steps": 15})
    with single_thread():
        a, b = (train_tokenizer(p, endless_batches(fmnist_small, "train", 64, seed=0, buffer=300), 28, 1, "cpu",
                                progress=False)[0] for _ in range(2))
    np.testing.assert_array_equal(encode_all(a, train[:64], "cpu"), encode_all(b, train[:64], "cpu"))


def test_the_training_stream_is_shuffled_and_covers_every_image_each_epoch(fmnist_small):
    _, _, ids = load_split(fmnist_small, "train")
    stream = image_batches(fmnist_small, "train", 100, seed=3, buffer=400)
    seen = [i for _, _, batch_ids in stream for i in batch_ids]
    assert sorted(seen) == sorted(ids) and seen != list(ids)  # a permutation of the split, not its stored order
    again = [i for _, _, batch_ids in image_batches(fmnist_small, "train", 100, seed=3, buffer=400) for i in batch_ids]
    assert again == seen  # seeded
    assert next(endless_batches(fmnist_small, "train", 7, seed=0, buffer=50)).shape == (7, 28, 28, 1)


def test_save_load_round_trip(trained, fmnist_small, tmp_path):
    model, _ = trained
    test, _, _ = load_split(fmnist_small, "test")
    save_tokenizer(tmp_path / "tok.pt", model)
    loaded = load_tokenizer(tmp_path / "tok.pt")
    np.testing.assert_array_equal(encode_all(model, test, "cpu"), encode_all(loaded, test, "cpu"))
    assert loaded.config == model.config and not list(tmp_path.glob(".*tmp"))


def test_run_tokenizer_trains_and_writes_metrics(fmnist_small, tmp_path):
    with single_thread():
        r = run_tokenizer(TokenizerParams(**{**FAST, "steps": 10}), fmnist_small, tmp_path / "tok.pt",
                          tmp_path / "live")
    metrics = json.loads((tmp_path / "live/metrics.json").read_text())  # DVCLive's summary file
    assert metrics == {k: v for k, v in r.items() if k not in ("source", "out", "metrics", "history", "threads")}
    for key in ("recon_mse", "baseline_mse", "psnr", "codebook_usage", "perplexity", "codebook_size", "grid"):
        assert key in metrics
    assert r["source"] == "trained" and load_tokenizer(tmp_path / "tok.pt").grid == 7


def test_user_checkpoint_is_adopted(trained, fmnist_small, tmp_path):
    model, _ = trained
    save_tokenizer(tmp_path / "mine.pt", model)
    p = TokenizerParams(checkpoint=str(tmp_path / "mine.pt"), steps=10**6)  # steps would take hours if it trained
    r = run_tokenizer(p, fmnist_small, tmp_path / "out" / "tok.pt", tmp_path / "live")
    assert r["source"] == str(tmp_path / "mine.pt") and r["steps"] == 0
    # re-saved from the weights it loaded (safely), not copied: the same weights and config, and, as the user's file
    # was itself a save_tokenizer file of this model, the same bytes (saving is deterministic)
    adopted = load_tokenizer(tmp_path / "out" / "tok.pt")
    assert adopted.config == model.config
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in adopted.state_dict().items())
    assert (tmp_path / "out" / "tok.pt").read_bytes() == (tmp_path / "mine.pt").read_bytes()
    assert r["recon_mse"] < r["baseline_mse"]


def test_mismatched_checkpoint_errors(fmnist_small, tmp_path):
    save_tokenizer(tmp_path / "g4.pt", VQTokenizer(28, 1, grid=4, codebook_size=16, code_dim=8, hidden=16))
    with pytest.raises(ValueError, match=r"g4.pt.*grid 4 != tokenizer.grid 7"):
        run_tokenizer(TokenizerParams(checkpoint=str(tmp_path / "g4.pt")), fmnist_small, tmp_path / "t.pt",
                      tmp_path / "m.json")
    save_tokenizer(tmp_path / "rgb.pt", VQTokenizer(28, 3, grid=7, codebook_size=16, code_dim=8, hidden=16))
    with pytest.raises(ValueError, match=r"channels 3 != data channels 1"):
        run_tokenizer(TokenizerParams(checkpoint=str(tmp_path / "rgb.pt")), fmnist_small, tmp_path / "t.pt",
                      tmp_path / "m.json")
    assert not (tmp_path / "t.pt").exists()


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt: tokenizer checkpoint not found"):
        load_tokenizer(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pt: unreadable tokenizer checkpoint"):
        load_tokenizer(tmp_path / "junk.pt")
    save_checkpoint(tmp_path / "other.pt", {"weights": 1})
    with pytest.raises(ValueError, match="other.pt: not a tokenizer checkpoint"):
        load_tokenizer(tmp_path / "other.pt")
    good = VQTokenizer(28, 1, 7, codebook_size=16, code_dim=8, hidden=16)
    config = {**good.config, "codebook_size": 32}  # config no longer matches the weights
    save_checkpoint(tmp_path / "shape.pt", {"config": config, "state_dict": good.state_dict()})
    with pytest.raises(ValueError, match="shape.pt: tokenizer checkpoint does not match its config"):
        load_tokenizer(tmp_path / "shape.pt")
