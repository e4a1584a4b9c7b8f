"""Completing partly known token grids: which tokens a pixel region leaves known, the completion itself (inpainting,
outpainting, class edits) and the held-out bits/token of the missing tokens given the known ones.

A token is known when its patch lies wholly outside the region to generate. An any-order model puts the known
tokens in its context first and generates the rest in the sampler's order (`decode`'s known_tokens). A model
trained in one fixed order (raster) has only ever seen that order: it decodes in it, and the known tokens are
teacher-forced where the order reaches them; what it generates before a known token cannot see that token.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import torch

from oar_core.decode import decode, generate, sample_token, teacher_forced
from oar_core.model import GPT
from oar_core.names import FIXED_ORDERS, LocationRule
from oar_core.nll import LN2
from oar_core.orders import sample_orders, step_of_position

MODES = ("inpaint", "outpaint", "edit")  # edit: inpaint under another class


def token_of_pixel(size: int, grid: int) -> np.ndarray:
    """(size, size) raster index of the token whose patch holds each pixel (the same index arithmetic as the
    figures' partial canvases, so grids that do not divide the image size work too)."""
    rows = np.minimum(np.arange(size) * grid // size, grid - 1)
    return rows[:, None] * grid + rows[None, :]


def known_from_region(region_HW: np.ndarray, grid: int) -> np.ndarray:
    """(grid*grid,) bool: the tokens whose patch has no pixel in the region to generate."""
    tok_HW = token_of_pixel(region_HW.shape[0], grid)
    return np.bincount(tok_HW[region_HW], minlength=grid * grid) == 0


def masked_picture(image_HWC: np.ndarray, known_N: np.ndarray, grid: int, gray: int = 128) -> np.ndarray:
    """The image as the model gets it: the patches of the tokens to generate painted gray."""
    out = image_HWC.copy()
    out[~known_N[token_of_pixel(image_HWC.shape[0], grid)]] = gray
    return out


def fixed_training_order(ckpt: dict) -> str | None:
    """The fixed order a checkpoint was trained in (raster, ...), or None for a model that saw many orders."""
    order = ckpt.get("order")
    return order if order in FIXED_ORDERS else None


def check_pair(model: GPT, tokenizer, model_path, tokenizer_path) -> None:
    """A model reads the tokens of the tokenizer its shards were made with: same grid, same vocabulary."""
    if (model.cfg.grid_h, model.cfg.grid_w, model.cfg.vocab_size) != (tokenizer.grid, tokenizer.grid,
                                                                       tokenizer.codebook_size):
        raise ValueError(f"{model_path}: model grid {model.cfg.grid_h}x{model.cfg.grid_w}/vocab {model.cfg.vocab_size} "
                         f"does not match the tokenizer {tokenizer_path} (grid {tokenizer.grid}x{tokenizer.grid}/"
                         f"codebook {tokenizer.codebook_size}); pass the tokenizer the model was trained with")


def _known_or_sampled(t: int, pos_Bk, logits_BkV, *, known_tokens_BN, known_mask_BN, temperature, top_k, generator):
    sampled_Bk = sample_token(logits_BkV.flatten(0, 1), temperature, top_k, generator).view(pos_Bk.shape)
    return torch.where(torch.gather(known_mask_BN, 1, pos_Bk), torch.gather(known_tokens_BN, 1, pos_Bk), sampled_Bk)


@torch.no_grad()
def complete(model: GPT, labels_B: torch.Tensor, known_tokens_BN: torch.Tensor, known_mask_BN: torch.Tensor, *,
             order: str, location: LocationRule | None = None, temperature: float = 1.0, top_k: int | None = None,
             cfg_scale: float = 1.0, cfg_schedule: str = "constant", generator: torch.Generator | None = None,
             teacher_force_in: str | None = None, **decode_kw) -> dict[str, torch.Tensor]:
    """Fill the unknown tokens. `teacher_force_in` (a model's fixed training order): decode in that order, feeding
    the known token wherever the order reaches one; else the known tokens go first and `order` does the rest."""
    kw = dict(location=location, cfg_scale=cfg_scale, cfg_schedule=cfg_schedule, generator=generator, **decode_kw)
    if teacher_force_in is None:
        return generate(model, labels_B, order=order, temperature=temperature, top_k=top_k,
                        known_tokens_BN=known_tokens_BN, known_mask_BN=known_mask_BN, **kw)
    pick = partial(_known_or_sampled, known_tokens_BN=known_tokens_BN, known_mask_BN=known_mask_BN,
                   temperature=temperature, top_k=top_k, generator=generator)
    return decode(model, labels_B, pick, order=teacher_force_in, **kw)


def known_first(order: str, known_N: np.ndarray, H: int, W: int) -> bool:
    """Whether every known position comes before every missing one in a fixed order."""
    step_N = step_of_position(sample_orders(order, 1, H, W))[0].numpy()
    return not known_N.all() and (not known_N.any() or step_N[known_N].max() < step_N[~known_N].min())


@torch.no_grad()
def missing_bits(model: GPT, tokens_BN: torch.Tensor, labels_B: torch.Tensor, known_mask_BN: torch.Tensor, *,
                 order: str, location: LocationRule | None = None, teacher_force_in: str | None = None,
                 generator: torch.Generator | None = None, steps: int | None = None,
                 schedule: str = "constant") -> torch.Tensor:
    """(B,) bits/token of the missing tokens given the known ones, under the sampler as it completes (content
    log-probs at temperature 1, no guidance): the known tokens first, then the missing ones along the sampler's own
    order or rule, teacher-forced. Exact for a deterministic order or greedy rule, else one draw of the bound
    E_q[-log p] (`oar_core.likelihood`). A fixed-order model (`teacher_force_in`) gives it only when every known
    token precedes every missing one in its order (else its missing tokens cannot see the known ones after
    them): the caller checks `known_first`. With parallel `steps`, the bound of that parallel sampler."""
    if teacher_force_in is not None:
        out = teacher_forced(model, tokens_BN, labels_B, order=teacher_force_in, steps=steps, schedule=schedule)
        logp_BN = torch.zeros_like(out["logp"]).scatter_(1, out["order"], out["logp"])  # per position
        missing_BN = ~known_mask_BN
        return -(logp_BN * missing_BN).sum(1) / missing_BN.sum(1) / LN2
    out = teacher_forced(model, tokens_BN, labels_B, order=order, location=location, known_tokens_BN=tokens_BN,
                         known_mask_BN=known_mask_BN, generator=generator, steps=steps, schedule=schedule)
    # the known steps come first and are not predicted: their logp stays 0
    return -out["logp"].sum(1) / (~known_mask_BN).sum(1) / LN2
