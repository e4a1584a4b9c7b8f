"""Where to generate next: a score for every candidate position, and the rule that picks one.

One code path for sampling, order extraction and likelihoods. `location_scores` turns the model's logits at
each candidate position into a log-domain confidence; `log_q` / `pick` turn scores into a rule's distribution q
over the candidates and draw from it (the rule itself, `LocationRule`, is data: `oar_core.names`). Temperature 0
is greedy ("most confident first", ties broken at random). Temperature tau > 0 samples from softmax(score / tau),
which is exactly MaskGIT's argmax(score + tau * Gumbel) "choice temperature", optionally annealed to 0 over the
steps, restricted to the top-k, or pushed towards positions next to filled ones. Because q is explicit, a
likelihood can pay for a stochastic choice (log q).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from oar_core.names import SCORES, LocationRule


def location_scores(logits_BCV: torch.Tensor, kind: str, gt_BC: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C) float32 log-domain confidence per candidate. `gt_prob` reads the ground truth: it is an oracle
    for order extraction, never a sampler's rule (a likelihood under it would not be one)."""
    # the (B, C, V) input is the largest tensor of a decode step: at most one full-size temporary here
    # (logsumexp's or softmax's), the scores themselves read from the logits and a (B, C) normaliser
    logits_BCV = logits_BCV.float()
    if kind == "neg_entropy":  # sum p log p, the product written into p's own buffer
        p_BCV = torch.softmax(logits_BCV, dim=-1)
        return p_BCV.xlogy_(p_BCV).sum(-1)
    if kind not in SCORES:
        raise ValueError(f"unknown location score {kind!r}; use one of {', '.join(SCORES)}")
    if kind == "gt_prob" and gt_BC is None:
        raise ValueError("score 'gt_prob' needs the ground-truth tokens (it is for order extraction only)")
    lse_BC = torch.logsumexp(logits_BCV, dim=-1)
    if kind == "max_prob":
        return logits_BCV.amax(-1) - lse_BC
    if kind == "margin":  # top-1 minus top-2 probability, in log space so temperatures mean the same as above
        top2 = (logits_BCV.topk(2, dim=-1).values - lse_BC[..., None]).exp()
        return torch.log((top2[..., 0] - top2[..., 1]).clamp_min(1e-12))
    return torch.gather(logits_BCV, 2, gt_BC[..., None])[..., 0] - lse_BC


def filled_neighbours(filled_BN: torch.Tensor, cand_BC: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(B, C) fraction of each candidate's 4-neighbours that are already filled."""
    f = F.pad(filled_BN.view(-1, 1, H, W).float(), (1, 1, 1, 1))
    kernel = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=f.dtype, device=f.device).view(1, 1, 3, 3)
    return torch.gather(F.conv2d(f, kernel).flatten(1), 1, cand_BC) / 4


def tau(rule: LocationRule, t: int, N: int) -> float:
    """The rule's temperature at step t of N."""
    frac = t / max(1, N - 1)
    f = {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[rule.anneal]
    return rule.temperature * f


def log_q(rule: LocationRule, t: int, N: int, score_BC: torch.Tensor,
          bonus_BC: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C) log-probability of choosing each candidate (-inf where impossible)."""
    s = score_BC.float() if bonus_BC is None else score_BC.float() + rule.locality * bonus_BC
    if rule.top_k is not None and rule.top_k < s.shape[1]:
        kth = s.topk(rule.top_k, dim=1).values[:, -1:]
        s = s.masked_fill(s < kth, float("-inf"))
    tau_t = tau(rule, t, N)
    if tau_t <= 0:
        best = s == s.max(1, keepdim=True).values
        return torch.where(best, -torch.log(best.sum(1, keepdim=True).float()), float("-inf"))
    return F.log_softmax(s / tau_t, dim=1)


def pick(rule: LocationRule, t: int, N: int, score_BC: torch.Tensor, bonus_BC: torch.Tensor | None = None,
         generator: torch.Generator | None = None, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(choice_B, log q(choice)_B). Greedy ties are broken uniformly at random, not by raster index.
    With k: (choice_Bk, log q_Bk), k candidates drawn one after another without replacement, each log q given the
    earlier ones (a parallel step's positions; greedy: the k best)."""
    if k is not None:
        return _pick_k(rule, t, N, score_BC, bonus_BC, generator, k)
    logq_BC = log_q(rule, t, N, score_BC, bonus_BC)
    probs = logq_BC.exp()
    choice_B = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(score_BC.device)
    return choice_B, torch.gather(logq_BC, 1, choice_B[:, None])[:, 0]


def _pick_k(rule, t, N, score_BC, bonus_BC, generator, k):
    if k == 1:  # exactly the one-token draw
        choice_B, logq_B = pick(rule, t, N, score_BC, bonus_BC, generator)
        return choice_B[:, None], logq_B[:, None]
    if rule.top_k is None and tau(rule, t, N) > 0:
        # one multinomial draw without replacement is the sequential one (Plackett-Luce): log q of the i-th choice is
        # its probability renormalised over the candidates not chosen before it
        logq_BC = log_q(rule, t, N, score_BC, bonus_BC)
        choice_Bk = torch.multinomial(logq_BC.exp().cpu(), k, generator=generator).to(score_BC.device)
        lq_Bk = torch.gather(logq_BC, 1, choice_Bk).double()
        taken_Bk = torch.cumsum(lq_Bk.exp(), 1) - lq_Bk.exp()
        return choice_Bk, (lq_Bk - torch.log1p(-taken_Bk.clamp(max=1 - 1e-12))).clamp(max=0).float()
    # greedy or top-k: the rule applied k times, each chosen candidate out of the running
    rows, score_BC, chosen, logq = torch.arange(score_BC.shape[0], device=score_BC.device), score_BC.clone(), [], []
    for _ in range(k):
        choice_B, logq_B = pick(rule, t, N, score_BC, bonus_BC, generator)
        score_BC[rows, choice_B] = float("-inf")
        chosen.append(choice_B)
        logq.append(logq_B)
    return torch.stack(chosen, 1), torch.stack(logq, 1)
