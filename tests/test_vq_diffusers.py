"""DiffusersVQ on a tiny randomly initialised diffusers VQModel (nothing downloaded)."""
import json

import pytest
import torch

from oar_core import vq_diffusers as vqd
from oar_core.checkpoint import load_checkpoint, save_checkpoint

diffusers = pytest.importorskip("diffusers")

TINY = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=8)


def _save_vq(folder, **overrides):
    torch.manual_seed(0)
    vq = diffusers.VQModel(**{**TINY, "num_vq_embeddings": 64, "vq_embed_dim": 4, **overrides})
    # a random codebook is ~U(-1/64, 1/64) while encoder outputs are O(1): every latent would snap to the same
    # couple of codes; spread the codebook so the tokens (and the round-trip check) are non-trivial
    vq.quantize.embedding.weight.data.normal_()
    vq.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    return _save_vq(tmp_path_factory.mktemp("w") / "vq")


@pytest.fixture(scope="module")
def images_BCHW():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _reference_recon(vq, x_BCHW):
    """The VQModel's own forward (quantizer inside), mapped back to [0,1]."""
    with torch.no_grad():
        return ((vq(x_BCHW * 2 - 1).sample + 1) / 2).clamp(0, 1)


def test_load_and_roundtrip(vq_dir, images_BCHW):
    tok = vqd.from_pretrained_dir(vq_dir, image_size=32)
    assert (tok.image_size, tok.channels, tok.grid, tok.codebook_size) == (32, 3, 16, 64)
    assert tok.do_normalize and tok.config["grid"] == 16
    tokens_BHW = tok.encode(images_BCHW)
    assert tokens_BHW.dtype == torch.long and tokens_BHW.shape == (2, 16, 16)
    assert 0 <= tokens_BHW.min() and tokens_BHW.max() < 64 and tokens_BHW.unique().numel() > 4
    assert torch.equal(tok.encode(images_BCHW), tokens_BHW)
    out_BCHW = tok.decode(tokens_BHW)
    assert out_BCHW.shape == (2, 3, 32, 32) and 0 <= out_BCHW.min() and out_BCHW.max() <= 1
    torch.testing.assert_close(out_BCHW, _reference_recon(tok.vq, images_BCHW), atol=1e-5, rtol=1e-5)


def test_amused_layout_lookup_from_codebook(tmp_path, images_BCHW):
    # aMUSEd pipeline repos: VQModel in vqvae/, lookup_from_codebook=True, [0,1] pixels
    _save_vq(tmp_path / "vqvae", lookup_from_codebook=True, force_upcast=True)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "AmusedPipeline"}))
    tok = vqd.from_pretrained_dir(tmp_path, image_size=32)
    assert tok.grid == 16 and not tok.do_normalize and tok.vq.config.lookup_from_codebook
    out_BCHW = tok.decode(tok.encode(images_BCHW))
    with torch.no_grad():
        ref_BCHW = tok.vq(images_BCHW).sample.clamp(0, 1)
    torch.testing.assert_close(out_BCHW, ref_BCHW, atol=1e-5, rtol=1e-5)


def test_checkpoint_roundtrip(vq_dir, images_BCHW, tmp_path):
    tok = vqd.from_pretrained_dir(vq_dir, image_size=32)
    save_checkpoint(tmp_path / "tokenizer.pt", vqd.to_checkpoint(tok))  # safetensors + JSON config: no pickle
    back = vqd.from_checkpoint(load_checkpoint(tmp_path / "tokenizer.pt"))
    tokens_BHW = tok.encode(images_BCHW)
    assert torch.equal(back.encode(images_BCHW), tokens_BHW)
    assert torch.equal(back.decode(tokens_BHW), tok.decode(tokens_BHW))
    assert back.config == tok.config


def test_checkpoint_mismatch(vq_dir):
    ckpt = vqd.to_checkpoint(vqd.from_pretrained_dir(vq_dir, image_size=32))
    ckpt["state_dict"].pop("quantize.embedding.weight")
    with pytest.raises(ValueError, match="do not match"):
        vqd.from_checkpoint(ckpt)
    with pytest.raises(ValueError, match="not a diffusers-vq"):
        vqd.from_checkpoint({"kind": "vq", "state_dict": {}})


def test_errors(tmp_path, vq_dir):
    with pytest.raises(FileNotFoundError, match="nope: no such folder"):
        vqd.from_pretrained_dir(tmp_path / "nope", 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no config.json"):
        vqd.from_pretrained_dir(tmp_path / "empty", 32)
    diffusers.AutoencoderKL(**{**TINY, "down_block_types": ("DownEncoderBlock2D",) * 2}).save_pretrained(
        tmp_path / "kl")
    with pytest.raises(ValueError, match="kl/config.json: is a AutoencoderKL, not a VQModel"):
        vqd.from_pretrained_dir(tmp_path / "kl", 32)
    with pytest.raises(ValueError, match="image_size 27 .* downsamples by 2 .* multiple of 2 px"):
        vqd.from_pretrained_dir(vq_dir, 27)
    tok = vqd.from_pretrained_dir(vq_dir, 32)
    with pytest.raises(ValueError, match=r"expects images \(B,3,32,32\)"):
        tok.encode(torch.rand(1, 1, 32, 32))
