"""KV-cached decoding: sampling in raster / random / fixed / confidence order, inpainting, outpainting.

`decode` is the one loop behind sampling and order extraction: at each step it scores the candidate next
positions (all unfilled ones for confidence order, the order's next position otherwise) in one batched forward,
lets a `choose` callback pick a position and its token, and commits that choice to the cache.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from oar_core.model import GPT
from oar_core.orders import sample_orders

# choose(step, cand_BC, logits_BCV) -> (choice_B index into C, token_B, score_B)
Choose = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def unfilled_positions(filled_BN: torch.Tensor) -> torch.Tensor:
    """(B, C) unfilled positions in raster order; every row has the same count C."""
    C = int((~filled_BN[0]).sum())
    return torch.sort(filled_BN.to(torch.int8), dim=1, stable=True).indices[:, :C]


def uncached_candidate_logits(model: GPT, labels_B, prefix_tok_BT, prefix_pos_BT, cand_BC) -> torch.Tensor:
    """Reference without a cache: a full causal forward over prefix + candidate for every candidate."""
    B, T = prefix_pos_BT.shape
    C = cand_BC.shape[1]
    rep = lambda t: t.repeat_interleave(C, dim=0)  # noqa: E731
    pos_RT, tok_RT, cand_R1 = rep(prefix_pos_BT), rep(prefix_tok_BT), cand_BC.reshape(-1, 1)
    order_R = torch.cat([pos_RT, cand_R1], dim=1)
    tokens_RN = torch.zeros(B * C, model.cfg.n_tokens, dtype=torch.long, device=cand_BC.device)
    tokens_RN.scatter_(1, pos_RT, tok_RT)
    logits_RTV = model.run(model.sequence_inputs(tokens_RN, order_R, rep(labels_B)))
    return logits_RTV[:, -1].view(B, C, -1)


@torch.no_grad()
def decode(model: GPT, labels_B: torch.Tensor, choose: Choose, order: str = "confidence",
           known_tokens_BN: torch.Tensor | None = None, known_mask_BN: torch.Tensor | None = None,
           cfg_scale: float = 0.0, generator: torch.Generator | None = None, use_cache: bool = True,
           progress: bool = False) -> dict[str, torch.Tensor]:
    """Fill every position of the grid. Known tokens (inpainting/outpainting, or teacher forcing's prefix) are
    placed in the context first, in raster order; the rest follow `order`. Returns tokens_BN (raster layout),
    order_BN (position generated at each step), scores_BN (the chooser's score per step; 0 for known)."""
    device = labels_B.device
    B, N, H, W = labels_B.shape[0], model.cfg.n_tokens, model.cfg.grid_h, model.cfg.grid_w
    guided = cfg_scale > 0 and model.cfg.num_classes > 0
    labels_R = torch.cat([labels_B, torch.full_like(labels_B, model.null_class)]) if guided else labels_B
    tokens_BN = torch.zeros(B, N, dtype=torch.long, device=device)
    filled_BN = torch.zeros(B, N, dtype=torch.bool, device=device)
    order_BN = torch.zeros(B, N, dtype=torch.long, device=device)
    scores_BN = torch.zeros(B, N, device=device)
    fixed_order_BN = None if order == "confidence" else sample_orders(order, B, H, W, generator).to(device)
    cache = model.new_cache(labels_R.shape[0]) if use_cache else None
    dup = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)  # noqa: E731

    K = 0
    if known_mask_BN is not None and known_mask_BN.any():
        counts = known_mask_BN.sum(1)
        if (counts != counts[0]).any():
            raise ValueError("every image in a batch needs the same number of known tokens; group masks by count")
        K = int(counts[0])
        if K >= N:
            raise ValueError("known_mask covers the whole grid; nothing to generate")
        known_pos_BK = torch.sort((~known_mask_BN).to(torch.int8), dim=1, stable=True).indices[:, :K]
        tokens_BN.scatter_(1, known_pos_BK, torch.gather(known_tokens_BN, 1, known_pos_BK))
        filled_BN.scatter_(1, known_pos_BK, True)
        order_BN[:, :K] = known_pos_BK
        if fixed_order_BN is not None:  # keep the order's relative sequence over the unknown positions
            keep = ~torch.gather(filled_BN, 1, fixed_order_BN)
            fixed_order_BN = torch.cat([known_pos_BK, fixed_order_BN[keep].view(B, N - K)], dim=1)
        if use_cache:  # start..known[K-2]; the last known token becomes the candidates' input
            model.run(dup(model.sequence_inputs(tokens_BN, known_pos_BK, labels_B)), cache, mode="prefill")

    steps = range(K, N)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="decode", unit="step", leave=False)
    for t in steps:
        cand_BC = unfilled_positions(filled_BN) if fixed_order_BN is None else fixed_order_BN[:, t : t + 1]
        if use_cache:
            last_pos_B = order_BN[:, t - 1]
            last = (None, None) if t == 0 else (dup(torch.gather(tokens_BN, 1, last_pos_B[:, None])[:, 0]), dup(last_pos_B))
            logits_RCV = model.candidate_logits(cache, labels_R, *last, dup(cand_BC))
        else:
            logits_RCV = uncached_candidate_logits(model, labels_R, dup(torch.gather(tokens_BN, 1, order_BN[:, :t])),
                                                   dup(order_BN[:, :t]), dup(cand_BC))
        logits_BCV = logits_RCV.float()
        if guided:
            cond, uncond = logits_BCV.chunk(2)
            logits_BCV = uncond + (1 + cfg_scale) * (cond - uncond)
        choice_B, token_B, score_B = choose(t, cand_BC, logits_BCV)
        if use_cache:
            cache.commit(dup(choice_B))
        pos_B = torch.gather(cand_BC, 1, choice_B[:, None])[:, 0]
        tokens_BN.scatter_(1, pos_B[:, None], token_B[:, None])
        filled_BN.scatter_(1, pos_B[:, None], True)
        order_BN[:, t] = pos_B
        scores_BN[:, t] = score_B
    return {"tokens": tokens_BN, "order": order_BN, "scores": scores_BN}


def sample_token(logits_BV: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    logits_BV = logits_BV / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    probs_BV = F.softmax(logits_BV, dim=-1)
    if generator is not None and generator.device != probs_BV.device:
        return torch.multinomial(probs_BV.cpu(), 1, generator=generator)[:, 0].to(probs_BV.device)
    return torch.multinomial(probs_BV, 1, generator=generator)[:, 0]


def generate(model: GPT, labels_B: torch.Tensor, order: str = "confidence", temperature: float = 1.0,
             top_k: int | None = None, cfg_scale: float = 0.0, known_tokens_BN=None, known_mask_BN=None,
             generator: torch.Generator | None = None, use_cache: bool = True, progress: bool = False):
    """Sample token grids. With order="confidence" the location of each next token is the unfilled position
    whose predicted distribution is most confident (max probability); its content is then sampled."""

    def choose(t, cand_BC, logits_BCV):
        probs_BCV = F.softmax(logits_BCV, dim=-1)
        conf_BC = probs_BCV.max(-1).values
        choice_B = conf_BC.argmax(1)
        rows = torch.arange(len(choice_B), device=choice_B.device)
        token_B = sample_token(logits_BCV[rows, choice_B], temperature, top_k, generator)
        return choice_B, token_B, conf_BC[rows, choice_B]

    return decode(model, labels_B, choose, order, known_tokens_BN, known_mask_BN, cfg_scale, generator,
                  use_cache, progress)
