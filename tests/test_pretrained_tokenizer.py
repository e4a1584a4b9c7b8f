"""`tokenizer.kind: diffusers_vq` through the stages: a pretrained diffusers VQModel (a tiny random one saved with
save_pretrained here; nothing downloaded) adopted by `tokenizer`, encoding in `tokenize`, decoding in `sample`."""
import numpy as np
import polars as pl
import pytest
import torch
import yaml
from PIL import Image

from oar_core import vq_diffusers
from oar_core.image_shards import to_float_BCHW
from oar_core.token_shards import load_meta, load_tokens
from oar_core.tokenizer import load_tokenizer
from tests.test_vq_diffusers import _save_vq

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    """32x32 RGB images in two class folders: colored blobs of two kinds."""
    root = tmp_path_factory.mktemp("rgb") / "images"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    for i in range(96):
        c = "disc" if i % 2 else "bar"
        (root / c).mkdir(parents=True, exist_ok=True)
        cy, cx = rng.integers(8, 24, 2)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < 40) if c == "disc" else (abs(xx - cx) < 3)
        img = np.zeros((32, 32, 3), np.uint8)
        img[mask] = rng.integers(60, 255, 3)
        Image.fromarray(img).save(root / c / f"{i:03d}.png")
    return root


def test_a_pretrained_vqmodel_tokenizes_and_decodes_through_the_stages(rgb_folder, tmp_path, monkeypatch):
    from pipeline import ingest, sample, tokenize, tokenizer, train

    vq_dir = _save_vq(tmp_path / "my-vqgan")
    monkeypatch.chdir(tmp_path)
    tiny = {"steps": 4, "batch_size": 8, "warmup_steps": 1, "eval_every": 4, "ckpt_every": 4, "log_every": 2,
            "eval_batches": 1, "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "mlp_ratio": 2.0}}
    params = {
        "ingest": {"source": str(rgb_folder), "image_size": 32, "channels": 3, "test_fraction": 0.25},
        "tokenizer": {"kind": "diffusers_vq", "checkpoint": str(vq_dir)},
        "train_raster": {"order": "raster", "out_dir": "models/raster", **tiny},
        "sample": {"models": [{"name": "raster", "checkpoint": "models/raster/model.pt", "order": "raster"}],
                   "n_per_model": 10, "batch_size": 10},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    ingest.main([])
    r = tokenizer.main([])
    assert r["kind"] == "diffusers_vq" and r["source"] == str(vq_dir) and r["codebook_size"] == 64
    tok = load_tokenizer("models/tokenizer.pt")  # self-contained: the user's folder is no longer needed
    assert isinstance(tok, vq_diffusers.DiffusersVQ) and (tok.grid, tok.codebook_size, tok.channels) == (16, 64, 3)
    (vq_dir / "config.json").unlink()

    tokenize.main([])
    meta = load_meta("data/shards")
    assert (meta["grid_h"], meta["grid_w"], meta["codebook_size"]) == (16, 16, 64)
    from oar_core.image_shards import load_split

    images_NHWC, _, ids = load_split("data/ingest", "test")
    got = load_tokens("data/shards", "test")
    assert got["ids"] == list(ids)
    want = tok.encode(to_float_BCHW(images_NHWC)).numpy()  # the VQModel's own codes for the ingested images
    assert (got["tokens"] == want).mean() > 0.999

    train.main(["--stage", "train_raster"])
    sample.main([])
    table = pl.read_parquet("samples/raster/orders.parquet")
    tokens_BHW = torch.as_tensor(np.stack(table["tokens"].to_numpy()).astype(np.int64)).view(-1, 16, 16)
    decoded = (tok.decode(tokens_BHW[:1]) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    png = np.asarray(Image.open(f"samples/raster/{table['file'][0]}"))
    assert png.shape == (32, 32, 3) and np.abs(png.astype(int) - decoded[0].astype(int)).max() <= 1


def test_diffusers_vq_needs_its_folder_and_matching_channels(rgb_folder, tmp_path):
    from oar_core.params import ParamsError, TokenizerParams, load_params

    with pytest.raises(ValueError, match="needs checkpoint: the local folder"):
        TokenizerParams(kind="diffusers_vq")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"tokenizer": {"kind": "diffusers_vq"}}))
    with pytest.raises(ParamsError, match="tokenizer"):
        load_params(tmp_path / "p.yaml")

    from oar_core.params import IngestParams
    from pipeline.ingest import run_ingest
    from pipeline.tokenizer import run_tokenizer

    run_ingest(IngestParams(source=str(rgb_folder), out_dir=str(tmp_path / "gray"), image_size=32, channels=1))
    vq_dir = _save_vq(tmp_path / "vq")
    with pytest.raises(ValueError, match="3-channel images, the ingested ones have 1; set ingest.channels: 3"):
        run_tokenizer(TokenizerParams(kind="diffusers_vq", checkpoint=str(vq_dir)), tmp_path / "gray",
                      tmp_path / "tok.pt", tmp_path / "live")
