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
Parallel decoding (`steps` < the tokens to generate, sized per step by `schedule`): a step places k tokens. Their
positions are the order's next k, or k drawn one after another without replacement by the location rule (policy or
confidence: the k best when greedy); their contents are sampled from ONE forward over the cached prefix (the last
token repeated once per chosen position, each seeing the prefix and itself), so they are independent given the
prefix. The first of those rows is the next input of the chain and is kept in the cache; the inputs of the other
k - 1 tokens (each pointing at the next one's position) are forwarded causally in front of the next step's forward
(`CachedForward` adds what the cache lacks of the prefix), so the prefix is never re-encoded. At one token per step
this is today's decode, bit for bit.
`pick_token(t, pos_Bk, logits_BkV)` chooses the contents: sampled for generation, the ground truth for
teacher forcing. Classifier-free guidance follows LlamaGen / RandAR / MAR: uncond + s * (cond - uncond),
s = 1 is no guidance, optionally ramped linearly from 1 to s over the steps.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from oar_core.location import filled_neighbours, location_scores, pick
from oar_core.model import GPT
from oar_core.names import ADAPTIVE_ORDERS, ORACLE_SCORES, SAMPLE_ORDERS, STEP_SCHEDULES, LocationRule
from oar_core.orders import sample_orders

CANDIDATE_CHUNK_MB = 256.0  # the params' default (ExtractParams, SampleParams)
# (first token's step, pos_Bk, logits_BkV) -> token_Bk: the contents of a step's k positions
PickToken = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def unfilled_positions(filled_BN: torch.Tensor) -> torch.Tensor:
    """(B, C) unfilled positions in raster order; every row has the same count C."""
    C = int((~filled_BN[0]).sum())
    return torch.sort(filled_BN.to(torch.int8), dim=1, stable=True).indices[:, :C]


def candidate_chunk(budget_mb: float, rows: int, vocab: int) -> int:
    """Candidates per scoring forward: their (rows x chunk x vocab) float32 logits within the budget, at least 1."""
    return max(1, int(budget_mb * 2**20) // (rows * vocab * 4))


def step_sizes(n: int, steps: int | None, schedule: str = "constant") -> list[int]:
    """Tokens placed at each of `steps` steps (None: one per step) to fill n positions: at least one per step, the
    cumulative count following the schedule's filled fraction (oar_core.names.STEP_SCHEDULES), rounded."""
    if schedule not in STEP_SCHEDULES:
        raise ValueError(f"unknown step schedule {schedule!r}; use one of {', '.join(STEP_SCHEDULES)}")
    S = n if steps is None else min(steps, n)
    if S < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    filled = {"constant": lambda r: r, "linear": lambda r: r * r, "cosine": lambda r: 1 - math.cos(math.pi / 2 * r),
              "arccos": lambda r: 1 - math.acos(r) / (math.pi / 2)}[schedule]
    cum = [0] + [round(n * filled(s / S)) for s in range(1, S)] + [n]
    for s in range(1, S + 1):  # at least one token per step, and room for one per step left
        cum[s] = max(cum[s], cum[s - 1] + 1)
    for s in range(S, 0, -1):
        cum[s] = min(cum[s], n - (S - s))
    return [cum[s + 1] - cum[s] for s in range(S)]


def cfg_at(cfg_scale: float, schedule: str, t: int, N: int) -> float:
    """Guidance scale at step t: constant, or a linear ramp from 1 (no guidance) to cfg_scale."""
    if schedule == "linear":
        return 1.0 + (cfg_scale - 1.0) * t / max(1, N - 1)
    if schedule != "constant":
        raise ValueError(f"unknown cfg_schedule {schedule!r}; use constant or linear")
    return cfg_scale


class CachedForward:
    """The logits decode asks for, from a KV cache of the committed prefix: only its last token is forwarded, after
    the inputs of the prefix the cache does not hold yet (a parallel step's tokens but its first). (The uncached
    reference that recomputes the whole prefix, for tests and benchmarks: `tests/reference_decode.py`.)"""

    def __init__(self, model: GPT, rows: int):
        self.model, self.cache = model, model.new_cache(rows)

    def prefill(self, tokens_RN, known_pos_RK, labels_R) -> None:
        # start..known[K-2]; the last known token becomes the next input
        self.model.prefill(self.cache, self.model.sequence_inputs(tokens_RN, known_pos_RK, labels_R))

    def candidates(self, labels_R, prefix_tok_RT, prefix_pos_RT, cand_RC) -> torch.Tensor:
        return self.model.candidate_logits(self.cache, labels_R, *_last(prefix_tok_RT, prefix_pos_RT), cand_RC,
                                           self._chain(prefix_tok_RT, prefix_pos_RT))

    def policy(self, labels_R, prefix_tok_RT, prefix_pos_RT) -> torch.Tensor:
        return self.model.policy_logits(self.cache, labels_R, *_last(prefix_tok_RT, prefix_pos_RT),
                                        self._chain(prefix_tok_RT, prefix_pos_RT))

    def commit(self) -> None:
        """The first candidate of the last forward joins the prefix (the only one, at one token per step)."""
        self.cache.commit(first=True)

    def _chain(self, prefix_tok_RT, prefix_pos_RT) -> torch.Tensor | None:
        """Inputs L..T-1 of the T-token prefix that the cache (L inputs) lacks: token j-1 pointing at position j.
        L >= 1 whenever T > L: the first step commits the start input."""
        L, T = self.cache.length, prefix_pos_RT.shape[1]
        if T <= L:
            return None
        return self.model.embed_tokens(prefix_tok_RT[:, L - 1:T - 1], prefix_pos_RT[:, L - 1:T - 1],
                                       prefix_pos_RT[:, L:T])


def _last(prefix_tok_RT, prefix_pos_RT):
    if prefix_pos_RT.shape[1] == 0:
        return None, None
    return prefix_tok_RT[:, -1], prefix_pos_RT[:, -1]


class _Steps:
    """What every step of one decode shares: guidance, the location rule and its record of choices."""

    def __init__(self, B: int, N: int, H: int, W: int, guided: bool, cfg_scale: float, cfg_schedule: str,
                 location: LocationRule, gt_tokens_BN, out: dict, filled_BN, generator):
        self.B, self.N, self.H, self.W, self.guided = B, N, H, W, guided
        self.cfg_scale, self.cfg_schedule, self.location, self.gt_tokens_BN = cfg_scale, cfg_schedule, location, \
            gt_tokens_BN
        self.out, self.filled_BN, self.generator = out, filled_BN, generator
        self.rows = torch.arange(B, device=filled_BN.device)

    def dup(self, t: torch.Tensor) -> torch.Tensor:
        """A batch's rows twice under guidance (the second copy runs with the null class)."""
        return torch.cat([t, t]) if self.guided else t

    def guide(self, logits_R: torch.Tensor, t: int, cond_only: bool = False) -> torch.Tensor:
        """float32 logits: guided, or the conditional half alone (what locations are scored on by default)."""
        if not self.guided or cond_only:
            return logits_R[:self.B].float()
        cond, uncond = logits_R.float().chunk(2)  # one (B, ...) buffer for uncond + s * (cond - uncond), same bits
        return (cond - uncond).mul_(cfg_at(self.cfg_scale, self.cfg_schedule, t, self.N)).add_(uncond)

    def score(self, t: int, logits_RCV: torch.Tensor, cand_BC: torch.Tensor) -> torch.Tensor:
        gt_BC = None if self.gt_tokens_BN is None else torch.gather(self.gt_tokens_BN, 1, cand_BC)
        rule = self.location
        return location_scores(self.guide(logits_RCV, t, rule.logits == "cond"), rule.score, gt_BC)

    def locate(self, t: int, score_BC: torch.Tensor, cand_BC: torch.Tensor, k: int = 1) -> torch.Tensor:
        """The k candidates the location rule chooses (B, k), drawn one after another without replacement (the
        chosen ones out of the running; greedy: the k best); records each one's score (confidence re-records them
        from the chosen positions' own forward) and log q given the earlier ones."""
        rule = self.location
        bonus = filled_neighbours(self.filled_BN, cand_BC, self.H, self.W) if rule.locality else None
        choice_Bk, self.out["logq"][:, t: t + k] = pick(rule, t, self.N, score_BC, bonus, self.generator, k)
        self.out["scores"][:, t: t + k] = torch.gather(score_BC, 1, choice_Bk)
        return torch.gather(cand_BC, 1, choice_Bk)


@torch.no_grad()
def decode(model: GPT, labels_B: torch.Tensor, pick_token: PickToken, *, order: str = "confidence",
           location: LocationRule | None = None, gt_tokens_BN: torch.Tensor | None = None,
           known_tokens_BN: torch.Tensor | None = None, known_mask_BN: torch.Tensor | None = None,
           cfg_scale: float = 1.0, cfg_schedule: str = "constant", generator: torch.Generator | None = None,
           progress: bool = False, candidate_chunk_mb: float = CANDIDATE_CHUNK_MB, steps: int | None = None,
           schedule: str = "constant",
           forward: Callable[[GPT, int], object] = CachedForward) -> dict[str, torch.Tensor]:
    """Fill every position of the grid. Known tokens (inpainting/outpainting) are placed in the context first,
    in raster order; the rest follow `order`. `gt_tokens_BN` is only for the `gt_prob` location score (order
    extraction). `steps` (None: one token per step) and `schedule` make it a parallel decode of that many steps
    over the tokens to generate (`step_sizes`; at most N, fewer when known tokens leave fewer to generate).
    `forward(model, rows)` makes what computes the logits (a KV cache by default). Returns, per token:
    tokens (raster layout), order (position generated at each step), scores (location score of the chosen position;
    0 for fixed orders and known tokens), logq (log-probability the location rule gave that choice), logp
    (log-probability of the committed token under the logits used)."""
    if order not in SAMPLE_ORDERS:
        raise ValueError(f"unknown order {order!r}; use one of {', '.join(SAMPLE_ORDERS)}")
    if order == "policy" and not model.cfg.policy:
        raise ValueError("order='policy' needs a model with a location-policy head (finetune.policy_weight > 0)")
    location = location or LocationRule()
    device = labels_B.device
    B, N, H, W = labels_B.shape[0], model.cfg.n_tokens, model.cfg.grid_h, model.cfg.grid_w
    if steps is not None and not 1 <= steps <= N:
        raise ValueError(f"steps must be between 1 and the grid's {N} tokens (or None: one per step), got {steps}")
    guided = cfg_scale != 1.0 and model.cfg.num_classes > 0
    labels_R = torch.cat([labels_B, torch.full_like(labels_B, model.null_class)]) if guided else labels_B
    out = {k: torch.zeros(B, N, dtype=torch.long if k in ("tokens", "order") else torch.float32, device=device)
           for k in ("tokens", "order", "scores", "logq", "logp")}
    tokens_BN, order_BN = out["tokens"], out["order"]
    filled_BN = torch.zeros(B, N, dtype=torch.bool, device=device)
    fixed = order not in ADAPTIVE_ORDERS
    fixed_order_BN = sample_orders(order, B, H, W, generator).to(device) if fixed else None
    ctx = _Steps(B, N, H, W, guided, cfg_scale, cfg_schedule, location, gt_tokens_BN, out, filled_BN, generator)
    logits = forward(model, labels_R.shape[0])

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
        # the unconditional half of a guided batch gets the null class here too
        logits.prefill(ctx.dup(tokens_BN), ctx.dup(known_pos_BK), labels_R)

    sizes = step_sizes(N - K, steps, schedule)
    if progress:
        sizes = tqdm(sizes, desc="decode", unit="step", leave=False)
    chunk = candidate_chunk(candidate_chunk_mb, labels_R.shape[0], model.cfg.vocab_size)
    t = K  # tokens placed so far
    for k in sizes:
        prefix = (ctx.dup(torch.gather(tokens_BN, 1, order_BN[:, :t])), ctx.dup(order_BN[:, :t]))
        cand_BC = fixed_order_BN[:, t: t + k] if fixed else unfilled_positions(filled_BN)
        if order == "policy":  # where: the policy's distribution over the unfilled positions
            pol_R = logits.policy(labels_R, *prefix)
            score_BC = torch.gather(F.log_softmax(ctx.guide(pol_R, t, location.logits == "cond"), 1), 1, cand_BC)
            cand_BC = ctx.locate(t, score_BC, cand_BC, k)
        if order == "confidence":  # only (B, C) scores outlive a chunk; the chosen positions are forwarded again
            score_BC = torch.cat([ctx.score(t, logits.candidates(labels_R, *prefix, ctx.dup(c_Bc)), c_Bc)
                                  for c_Bc in cand_BC.split(chunk, 1)], 1)
            cand_BC = ctx.locate(t, score_BC, cand_BC, k)
        logits_RkV = logits.candidates(labels_R, *prefix, ctx.dup(cand_BC))  # the step's k contents, one forward
        logits.commit()  # its first row is the chain's next input; the other k - 1 go in front of the next forward
        if order == "confidence":  # the step scores from this same-shaped forward: none depends on the chunk size
            out["scores"][:, t: t + k] = ctx.score(t, logits_RkV, cand_BC)
        guided_BkV = ctx.guide(logits_RkV, t)
        token_Bk = pick_token(t, cand_BC, guided_BkV)  # sampled independently given the prefix
        out["logp"][:, t: t + k] = torch.gather(F.log_softmax(guided_BkV, -1), 2, token_Bk[..., None])[..., 0]
        tokens_BN.scatter_(1, cand_BC, token_Bk)
        filled_BN.scatter_(1, cand_BC, True)
        order_BN[:, t: t + k] = cand_BC
        t += k
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


def generate(model: GPT, labels_B: torch.Tensor, *, order: str = "confidence", temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None, **decode_kw):
    """Sample token grids: the location by `order` (and `location`'s rule for confidence/policy orders), then
    the content there (temperature, top-k, classifier-free guidance: `decode`'s keywords)."""
    return decode(model, labels_B, partial(_sampled, temperature=temperature, top_k=top_k, generator=generator),
                  order=order, generator=generator, **decode_kw)


def _sampled(t: int, pos_Bk, logits_BkV, *, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    return sample_token(logits_BkV.flatten(0, 1), temperature, top_k, generator).view(pos_Bk.shape)


def teacher_forced(model: GPT, tokens_BN: torch.Tensor, labels_B: torch.Tensor, *, order: str,
                   location: LocationRule | None = None, **decode_kw) -> dict[str, torch.Tensor]:
    """Run a sampler's own location rule on real images, feeding the true token at each chosen position."""
    oracle = location is not None and location.score in ORACLE_SCORES
    return decode(model, labels_B, partial(_true_token, tokens_BN=tokens_BN), order=order, location=location,
                  gt_tokens_BN=tokens_BN if oracle else None, **decode_kw)


def _true_token(t: int, pos_Bk, logits_BkV, *, tokens_BN) -> torch.Tensor:
    return torch.gather(tokens_BN, 1, pos_Bk)
