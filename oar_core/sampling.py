"""KV-cached decoding: sampling in a fixed, random, confidence or learned-policy order; inpainting, outpainting.

`decode` is the one loop behind sampling, order extraction and likelihoods. At each step it picks where the
next token goes and then what it is:
- fixed orders (raster, spiral, center_out, halton, random): the order's next position;
- `confidence`: every unfilled position is scored in batched forwards (the last token repeated once per
  candidate), a chunk of candidates at a time so that only (B, C) scores, never (B, C, V) logits, outlive a
  chunk (`candidate_chunk_mb`); a `LocationRule` picks among the scores (greedy, annealed Gumbel, top-k,
  locality), and the chosen position is forwarded once more on its own for its content logits and cache entry;
- `policy`: the model's location-policy head gives a distribution over the unfilled positions from the prefix
  (one query row), the rule draws from it, then one more row gives the content there: a few rows per step,
  like raster.
`pick_token(t, pos_B, logits_BV)` chooses the content: sampled for generation, the ground truth for
teacher forcing. Classifier-free guidance follows LlamaGen / RandAR / MAR: uncond + s * (cond - uncond),
s = 1 is no guidance, optionally ramped linearly from 1 to s over the steps.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from oar_core.location import LocationRule, filled_neighbours, location_scores
from oar_core.model import GPT
from oar_core.orders import sample_orders

CANDIDATE_CHUNK_MB = 256.0  # the params' default (ExtractParams, SampleParams)
PickToken = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (step, pos_B, logits_BV) -> token_B
ADAPTIVE_ORDERS = ("confidence", "policy")  # the location is chosen per image, step by step
ORDERS = ("raster", "random", "spiral", "center_out", "halton", *ADAPTIVE_ORDERS)


def unfilled_positions(filled_BN: torch.Tensor) -> torch.Tensor:
    """(B, C) unfilled positions in raster order; every row has the same count C."""
    C = int((~filled_BN[0]).sum())
    return torch.sort(filled_BN.to(torch.int8), dim=1, stable=True).indices[:, :C]


def candidate_chunk(budget_mb: float, rows: int, vocab: int) -> int:
    """Candidates per scoring forward: their (rows x chunk x vocab) float32 logits within the budget, at least 1."""
    return max(1, int(budget_mb * 2**20) // (rows * vocab * 4))


def cfg_at(cfg_scale: float, schedule: str, t: int, N: int) -> float:
    """Guidance scale at step t: constant, or a linear ramp from 1 (no guidance) to cfg_scale."""
    if schedule == "linear":
        return 1.0 + (cfg_scale - 1.0) * t / max(1, N - 1)
    if schedule != "constant":
        raise ValueError(f"unknown cfg_schedule {schedule!r}; use constant or linear")
    return cfg_scale


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


def uncached_policy_logits(model: GPT, labels_B, prefix_tok_BT, prefix_pos_BT) -> torch.Tensor:
    """Reference without a cache: the prefix's inputs then one query row, all causal (the query is last)."""
    B, T = prefix_pos_BT.shape
    if T == 0:
        x_BTD = model.embed_query(labels_B, None, None)
    else:
        tokens_BN = torch.zeros(B, model.cfg.n_tokens, dtype=torch.long, device=labels_B.device)
        tokens_BN.scatter_(1, prefix_pos_BT, prefix_tok_BT)
        x_BTD = torch.cat([model.sequence_inputs(tokens_BN, prefix_pos_BT, labels_B),
                           model.embed_query(labels_B, prefix_tok_BT[:, -1:], prefix_pos_BT[:, -1:])], dim=1)
    return model.policy_head(model.trunk(x_BTD))[:, -1]


@torch.no_grad()
def decode(model: GPT, labels_B: torch.Tensor, pick_token: PickToken, order: str = "confidence",
           location: LocationRule | None = None, gt_tokens_BN: torch.Tensor | None = None,
           known_tokens_BN: torch.Tensor | None = None, known_mask_BN: torch.Tensor | None = None,
           cfg_scale: float = 1.0, cfg_schedule: str = "constant", generator: torch.Generator | None = None,
           use_cache: bool = True, progress: bool = False,
           candidate_chunk_mb: float = CANDIDATE_CHUNK_MB) -> dict[str, torch.Tensor]:
    """Fill every position of the grid. Known tokens (inpainting/outpainting) are placed in the context first,
    in raster order; the rest follow `order`. `gt_tokens_BN` is only for the `gt_prob` location score (order
    extraction). Returns, per step: tokens (raster layout), order (position generated at each step), scores
    (location score of the chosen position; 0 for fixed orders and known tokens), logq (log-probability the
    location rule gave that choice), logp (log-probability of the committed token under the logits used)."""
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; use one of {', '.join(ORDERS)}")
    if order == "policy" and not model.cfg.policy:
        raise ValueError("order='policy' needs a model with a location-policy head (finetune.policy_weight > 0)")
    location = location or LocationRule()
    device = labels_B.device
    B, N, H, W = labels_B.shape[0], model.cfg.n_tokens, model.cfg.grid_h, model.cfg.grid_w
    guided = cfg_scale != 1.0 and model.cfg.num_classes > 0
    labels_R = torch.cat([labels_B, torch.full_like(labels_B, model.null_class)]) if guided else labels_B
    dup = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)  # noqa: E731
    out = {k: torch.zeros(B, N, dtype=torch.long if k in ("tokens", "order") else torch.float32, device=device)
           for k in ("tokens", "order", "scores", "logq", "logp")}
    tokens_BN, order_BN = out["tokens"], out["order"]
    filled_BN = torch.zeros(B, N, dtype=torch.bool, device=device)
    fixed = order not in ADAPTIVE_ORDERS
    fixed_order_BN = sample_orders(order, B, H, W, generator).to(device) if fixed else None
    cache = model.new_cache(labels_R.shape[0]) if use_cache else None

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
        if fixed:  # keep the order's relative sequence over the unknown positions
            keep = ~torch.gather(filled_BN, 1, fixed_order_BN)
            fixed_order_BN = torch.cat([known_pos_BK, fixed_order_BN[keep].view(B, N - K)], dim=1)
        if use_cache:  # start..known[K-2]; the last known token becomes the next input (the unconditional half
            # of a guided batch gets the null class here too)
            model.prefill(cache, model.sequence_inputs(dup(tokens_BN), dup(known_pos_BK), labels_R))

    def guide(logits_R, t, cond_only=False):
        """float32 logits: guided, or the conditional half alone (what locations are scored on by default)."""
        if not guided or cond_only:
            return logits_R[:B].float()
        cond, uncond = logits_R.float().chunk(2)  # one (B, ...) buffer for uncond + s * (cond - uncond), same bits
        return (cond - uncond).mul_(cfg_at(cfg_scale, cfg_schedule, t, N)).add_(uncond)

    steps = range(K, N)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="decode", unit="step", leave=False)
    rows = torch.arange(B, device=device)
    chunk = candidate_chunk(candidate_chunk_mb, labels_R.shape[0], model.cfg.vocab_size)

    def score(t, logits_RCV, cand_BC):
        gt_BC = None if gt_tokens_BN is None else torch.gather(gt_tokens_BN, 1, cand_BC)
        return location_scores(guide(logits_RCV, t, location.logits == "cond"), location.score, gt_BC)

    def locate(t, score_BC, cand_BC):
        """Pick a candidate by the location rule; record its score (confidence re-records it from the chosen
        position's own forward) and log q."""
        bonus = filled_neighbours(filled_BN, cand_BC, H, W) if location.locality else None
        choice_B, out["logq"][:, t] = location.pick(t, N, score_BC, bonus, generator)
        out["scores"][:, t] = score_BC[rows, choice_B]
        return choice_B

    for t in steps:
        last_pos_B = order_BN[:, t - 1]
        last = (None, None) if t == 0 else (dup(tokens_BN[rows, last_pos_B]), dup(last_pos_B))
        prefix = None if use_cache else (dup(torch.gather(tokens_BN, 1, order_BN[:, :t])), dup(order_BN[:, :t]))
        cand_BC = fixed_order_BN[:, t: t + 1] if fixed else unfilled_positions(filled_BN)

        def forward(c_BC):  # raw (R, C, V) logits at the candidates c_BC
            if use_cache:
                return model.candidate_logits(cache, labels_R, *last, dup(c_BC))
            return uncached_candidate_logits(model, labels_R, *prefix, dup(c_BC))

        if order == "policy":  # where: the policy's distribution over the unfilled positions
            pol_R = model.policy_logits(cache, labels_R, *last) if use_cache else \
                uncached_policy_logits(model, labels_R, *prefix)
            score_BC = torch.gather(F.log_softmax(guide(pol_R, t, location.logits == "cond"), 1), 1, cand_BC)
            cand_BC = cand_BC[rows, locate(t, score_BC, cand_BC)][:, None]
        if order == "confidence":  # only (B, C) scores outlive a chunk; the chosen position is forwarded again alone
            score_BC = torch.cat([score(t, forward(c_Bc), c_Bc) for c_Bc in cand_BC.split(chunk, 1)], 1)
            cand_BC = cand_BC[rows, locate(t, score_BC, cand_BC)][:, None]
        logits_R1V = forward(cand_BC)  # one candidate, so it is what the cache keeps
        if use_cache:
            cache.commit()
        if order == "confidence":  # the step score from this same-shaped forward: no score depends on the chunk size
            out["scores"][:, t] = score(t, logits_R1V, cand_BC)[:, 0]
        pos_B, logits_BV = cand_BC[:, 0], guide(logits_R1V, t)[:, 0]
        token_B = pick_token(t, pos_B, logits_BV)
        out["logp"][:, t] = torch.gather(F.log_softmax(logits_BV, -1), 1, token_B[:, None])[:, 0]
        tokens_BN[rows, pos_B] = token_B
        filled_BN[rows, pos_B] = True
        order_BN[:, t] = pos_B
    return out


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
             top_k: int | None = None, cfg_scale: float = 1.0, cfg_schedule: str = "constant",
             location: LocationRule | None = None, known_tokens_BN=None, known_mask_BN=None,
             generator: torch.Generator | None = None, use_cache: bool = True, progress: bool = False,
             candidate_chunk_mb: float = CANDIDATE_CHUNK_MB):
    """Sample token grids: the location by `order` (and `location`'s rule for confidence/policy orders), then
    the content there (temperature, top-k, classifier-free guidance)."""
    return decode(model, labels_B, lambda t, pos_B, logits_BV: sample_token(logits_BV, temperature, top_k, generator),
                  order, location, None, known_tokens_BN, known_mask_BN, cfg_scale, cfg_schedule, generator,
                  use_cache, progress, candidate_chunk_mb)


def teacher_forced(model: GPT, tokens_BN: torch.Tensor, labels_B: torch.Tensor, order: str,
                   location: LocationRule | None = None, generator: torch.Generator | None = None,
                   use_cache: bool = True, candidate_chunk_mb: float = CANDIDATE_CHUNK_MB) -> dict[str, torch.Tensor]:
    """Run a sampler's own location rule on real images, feeding the true token at each chosen position."""
    gt = location is not None and location.score == "gt_prob"
    return decode(model, labels_B, lambda t, pos_B, logits_BV: tokens_BN[torch.arange(len(pos_B)), pos_B], order,
                  location, tokens_BN if gt else None, generator=generator, use_cache=use_cache,
                  candidate_chunk_mb=candidate_chunk_mb)
