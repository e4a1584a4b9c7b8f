"""Held-out likelihoods that are likelihoods: upper bounds on -log2 p(x) per token for a model *as it samples*.

A sampler that picks the location sigma_t from a rule q(sigma_t | prefix) and then the content defines
p(x) = sum_sigma prod_t q(sigma_t | prefix) p(x_sigma_t | prefix, sigma_t). For any distribution r over orders,
-log p(x) <= E_r[-log p(x, sigma) + log r(sigma | x)]. Hence:
- a fixed order (raster, spiral, halton): exact, one teacher-forced forward;
- random order (the any-order model): r = q = uniform, so the bound is the content NLL averaged over orders;
- a location rule (confidence) or a learned policy, run teacher-forced on the image with sigma drawn from q
  itself: the q terms cancel, leaving E_{sigma~q}[-sum_t log p(x_sigma_t | ...)]; a greedy rule is
  deterministic and gives the exact likelihood;
- along any other order (e.g. the extracted one), the order must be paid for: -sum log q(sigma_t | prefix) -
  sum log p(...). `policy_bits_along` does this for the policy head.
An order picked by looking at the target (extraction's `gt_prob`) and not paid for is only the "oracle order"
diagnostic (`bits_along_orders` along extracted orders): on i.i.d. uniform tokens it goes below the entropy,
which no likelihood can.
Content log-probs are the model's conditional ones at temperature 1, without guidance or top-k.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from oar_core.io import autocast
from oar_core.location import LocationRule
from oar_core.model import GPT
from oar_core.orders import sample_orders
from oar_core.sampling import ADAPTIVE_ORDERS, teacher_forced

LN2 = math.log(2)


def _batches(tokens_NN, labels_N, batch_size: int, device):
    for i in range(0, len(tokens_NN), batch_size):
        yield i, tokens_NN[i: i + batch_size].to(device), labels_N[i: i + batch_size].to(device)


@torch.no_grad()
def order_bits(model: GPT, tokens_BN, labels_B, order_BN) -> torch.Tensor:
    """(B,) content bits/token along the given orders (one forward). Unpaid: valid only for orders that do not
    depend on the image (fixed, uniform random) or that the sampler itself draws from the prefix."""
    logits_BNV, targets_BN = model(tokens_BN, order_BN, labels_B)
    return F.cross_entropy(logits_BNV.float().transpose(1, 2), targets_BN, reduction="none").mean(1) / LN2


@torch.no_grad()
def policy_bits_along(model: GPT, tokens_BN, labels_B, order_BN) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(content, location) bits/token along any given order for a policy model (their sum is a valid bound),
    and per image the number of steps whose most likely policy position is the order's (the last step, with
    one choice left, is not counted)."""
    logits_BNV, targets_BN, logpi_BNN = model.forward_with_policy(tokens_BN, order_BN, labels_B)
    content = F.cross_entropy(logits_BNV.float().transpose(1, 2), targets_BN, reduction="none").mean(1)
    location = -torch.gather(logpi_BNN, 2, order_BN[..., None])[..., 0].mean(1)
    hits = (logpi_BNN.argmax(-1)[:, :-1] == order_BN[:, :-1]).sum(1)
    return content / LN2, location / LN2, hits


def is_deterministic(order: str, location: LocationRule | None) -> bool:
    if order == "random":
        return False
    if order in ADAPTIVE_ORDERS:
        return order == "confidence" and (location or LocationRule()).temperature == 0
    return True


@torch.no_grad()
def sampler_bits(model: GPT, tokens_NN: torch.Tensor, labels_N: torch.Tensor, order: str,
                 location: LocationRule | None = None, n_orders: int = 2, batch_size: int = 250, seed: int = 0,
                 device="cpu") -> float:
    """Mean held-out bits/token of the sampler (order + location rule): exact for deterministic rules, else the
    mean over `n_orders` orders drawn per image from the sampler's own rule."""
    if location is not None and location.score == "gt_prob":
        raise ValueError("the gt_prob score looks at the answer: a sampler cannot use it, and scoring under it is "
                         "not a likelihood (use bits_along_orders for that diagnostic)")
    model.eval()
    H, W = model.cfg.grid_h, model.cfg.grid_w
    draws = 1 if is_deterministic(order, location) else n_orders
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(draws):
        for _, tok_BN, lab_B in _batches(tokens_NN, labels_N, batch_size, device):
            with autocast(device):
                if order in ADAPTIVE_ORDERS:
                    out = teacher_forced(model, tok_BN, lab_B, order, location, g)
                    bits_B = -out["logp"].sum(1) / tok_BN.shape[1] / LN2
                else:
                    bits_B = order_bits(model, tok_BN, lab_B, sample_orders(order, len(tok_BN), H, W, g).to(device))
            total += float(bits_B.sum())
    return total / (draws * len(tokens_NN))


@torch.no_grad()
def bits_along_orders(model: GPT, tokens_NN, labels_N, order_NN, batch_size: int = 250, device="cpu") -> float:
    """Mean content bits/token along given orders, unpaid: a likelihood only for orders that do not depend on
    the image (fixed, uniform random); along extracted (target-peeking) orders it is the oracle diagnostic."""
    model.eval()
    total = 0.0
    for i, tok_BN, lab_B in _batches(tokens_NN, labels_N, batch_size, device):
        with autocast(device):
            total += float(order_bits(model, tok_BN, lab_B, order_NN[i: i + batch_size].to(device)).sum())
    return total / len(tokens_NN)


@torch.no_grad()
def policy_bits(model: GPT, tokens_NN, labels_N, order_NN, batch_size: int = 250, device="cpu") -> dict:
    """Mean content + location bits/token of a policy model along given orders (valid: the order is paid), and
    the policy's top-1 agreement with those orders."""
    model.eval()
    content = location = hits = 0.0
    for i, tok_BN, lab_B in _batches(tokens_NN, labels_N, batch_size, device):
        with autocast(device):
            c, loc, h = policy_bits_along(model, tok_BN, lab_B, order_NN[i: i + batch_size].to(device))
        content, location, hits = content + float(c.sum()), location + float(loc.sum()), hits + float(h.sum())
    n = len(tokens_NN)
    return {"content": content / n, "location": location / n, "total": (content + location) / n,
            "top1": hits / (n * (order_NN.shape[1] - 1))}


def sampler_nll(model, meta: dict, test_NN, test_labels, p, device) -> tuple[float, str]:
    """Held-out bits/token of the model as it samples (its order and location rule): a valid likelihood bound."""
    order = meta["order"]
    rule = LocationRule(**meta["location"]) if meta.get("location") else None
    bits = sampler_bits(model, test_NN, test_labels, order, rule, p.nll_orders, p.nll_batch_size, p.seed, device)
    if order in ADAPTIVE_ORDERS:
        how = ("exact: its greedy location rule, teacher-forced" if is_deterministic(order, rule) else
               f"bound: mean over {p.nll_orders} orders drawn from its own location rule, teacher-forced")
    else:
        how = "exact" if is_deterministic(order, rule) else f"bound: mean over {p.nll_orders} random orders"
    return bits, f"{order} order, {how}"
