"""A pretrained diffusers `VQModel` (e.g. aMUSEd's 8192-code VQGAN) used as the pipeline's image tokenizer.

Same interface as oar_core.tokenizer.VQTokenizer: encode images (B,C,H,W) in [0,1] -> tokens (B,grid,grid) long,
decode tokens -> images in [0,1]. The VQModel downsamples by f = 2**(len(block_out_channels)-1), so only image
sizes that are multiples of f work (aMUSEd-256: f = 16, 256 px -> 16x16 tokens).

diffusers 0.42.1 specifics:
- pixel range: most VQModels (LDM, VQ-Diffusion, Kandinsky MoVQ) take [-1,1], but aMUSEd's VQGAN takes [0,1]
  (its pipelines build VaeImageProcessor(do_normalize=False), its training script feeds ToTensor() output).
  `do_normalize` picks the [-1,1] mapping; from_pretrained_dir turns it off for aMUSEd pipeline folders.
- lookup_from_codebook: with decode(force_not_quantize=True) the model reads its input as token indices when it is
  True (aMUSEd) and as already-quantized latents when False; decode() below feeds whichever it expects.
- force_upcast: only the pipelines read it (fp16 VQGANs overflow); the weights are kept in float32 here.
- scaling_factor: scales continuous latents for diffusion models; VQModel.encode/decode never apply it and the
  codebook lives in unscaled space, so token extraction ignores it.
diffusers is imported lazily: every pipeline stage imports the tokenizer module, and diffusers takes seconds.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

KIND = "diffusers-vq"


class DiffusersVQ(nn.Module):
    def __init__(self, vq, image_size: int, do_normalize: bool = True):
        super().__init__()
        cfg = vq.config
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if image_size <= 0 or image_size % factor:
            lo, hi = factor * max(1, image_size // factor), factor * (image_size // factor + 1)
            raise ValueError(f"image_size {image_size} does not work with this VQModel: it downsamples by {factor} "
                             f"(2**(len(block_out_channels)-1)), so images must be a multiple of {factor} px "
                             f"(e.g. {lo} or {hi}); set ingest.image_size accordingly")
        # force_upcast models overflow in fp16; CPU runs want float32 anyway
        self.vq = vq.float().eval().requires_grad_(False)
        self.image_size, self.channels, self.grid = image_size, cfg.in_channels, image_size // factor
        self.codebook_size, self.do_normalize = cfg.num_vq_embeddings, do_normalize
        self.config = dict(kind=KIND, image_size=image_size, channels=self.channels, grid=self.grid,
                           codebook_size=self.codebook_size, do_normalize=do_normalize)

    @torch.no_grad()
    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """images (B,C,H,W) float in [0,1] -> tokens (B,grid,grid) long."""
        want = (self.channels, self.image_size, self.image_size)
        if images_BCHW.dim() != 4 or tuple(images_BCHW.shape[1:]) != want:
            raise ValueError(f"tokenizer expects images (B,{','.join(map(str, want))}), "
                             f"got {tuple(images_BCHW.shape)}")
        x_BCHW = images_BCHW.float() * 2 - 1 if self.do_normalize else images_BCHW.float()
        z_BDhw = self.vq.encode(x_BCHW).latents
        _, _, (_, _, codes_M) = self.vq.quantize(z_BDhw)
        B, _, h, w = z_BDhw.shape
        return codes_M.reshape(B, h, w).long()

    @torch.no_grad()
    def decode(self, tokens_BHW: torch.Tensor) -> torch.Tensor:
        """tokens (B,grid,grid) long -> images (B,C,H,W) float in [0,1]."""
        tokens_BHW = tokens_BHW.long()
        B, h, w = tokens_BHW.shape
        shape = (B, h, w, self.vq.quantize.vq_embed_dim)
        if self.vq.config.lookup_from_codebook:
            h_in = tokens_BHW  # decode() looks the codes up itself
        else:
            h_in = self.vq.quantize.get_codebook_entry(tokens_BHW.reshape(-1), shape)
        out_BCHW = self.vq.decode(h_in, force_not_quantize=True, shape=shape).sample
        if self.do_normalize:
            out_BCHW = (out_BCHW + 1) / 2
        return out_BCHW.clamp(0, 1)


def _amused_folder(cfg_dir: Path) -> bool:
    """True when cfg_dir is (the vqvae/ of) an aMUSEd pipeline folder, whose VQGAN takes [0,1] pixels."""
    for index in (cfg_dir / "model_index.json", cfg_dir.parent / "model_index.json"):
        if index.is_file():
            return str(json.loads(index.read_text()).get("_class_name", "")).startswith("Amused")
    return False


def from_pretrained_dir(path: str | Path, image_size: int, do_normalize: bool | None = None) -> DiffusersVQ:
    """Load a VQModel saved with save_pretrained (or a pipeline folder with it in vqvae/), offline.

    do_normalize=None: map pixels to [-1,1] unless the folder belongs to an aMUSEd pipeline.
    """
    path = Path(path)
    hint = ("a local diffusers VQModel folder (config.json + diffusion_pytorch_model.safetensors), or a pipeline "
            "folder with one in vqvae/, e.g. `hf download amused/amused-256 --include 'vqvae/*' --local-dir DIR`")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder; expected {hint}")
    subfolder = None
    if not (path / "config.json").is_file():
        if not (path / "vqvae" / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json (nor vqvae/config.json); expected {hint}")
        subfolder = "vqvae"
    cfg_dir = path / subfolder if subfolder else path
    try:
        cls_name = json.loads((cfg_dir / "config.json").read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError):
        cls_name = None
    if cls_name != "VQModel":
        raise ValueError(f"{cfg_dir / 'config.json'}: is a {cls_name or 'non-diffusers config'}, not a VQModel; "
                         f"only a VQ model has discrete tokens, expected {hint}")
    from diffusers import VQModel

    try:
        vq = VQModel.from_pretrained(path, subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{cfg_dir}: could not load the VQModel ({type(e).__name__}: {e}); expected {hint}") from None
    if do_normalize is None:
        do_normalize = not _amused_folder(cfg_dir)
    return DiffusersVQ(vq, image_size, do_normalize)


def to_checkpoint(model: DiffusersVQ) -> dict:
    """Self-contained dict for checkpoint.save_checkpoint: downstream stages rebuild the model without the user's
    folder."""
    # JSON round trip: tuples -> lists and no diffusers FrozenDict in the checkpoint; private keys (_name_or_path,
    # _use_default_values, ...) dropped so the artifact does not depend on where the folder was
    config = json.loads(json.dumps({k: v for k, v in model.vq.config.items() if not k.startswith("_")}))
    return {"kind": KIND, "config": config, "image_size": model.image_size, "do_normalize": model.do_normalize,
            "state_dict": {k: v.detach().cpu() for k, v in model.vq.state_dict().items()}}


def from_checkpoint(ckpt: dict) -> DiffusersVQ:
    if not isinstance(ckpt, dict) or ckpt.get("kind") != KIND:
        kind = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"not a {KIND} tokenizer checkpoint (kind={kind!r}); rerun the tokenizer stage")
    from diffusers import VQModel

    vq = VQModel.from_config(ckpt["config"])
    try:
        vq.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise ValueError(f"{KIND} checkpoint weights do not match its config ({e}); "
                         f"rerun the tokenizer stage") from None
    return DiffusersVQ(vq, ckpt["image_size"], ckpt.get("do_normalize", True))
