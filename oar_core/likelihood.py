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
A parallel sampler (`steps` < N: several tokens per forward) samples the tokens of a step independently given the
prefix before it, so its likelihood is not the sequential one: the same bounds hold with every token conditioned on
the prefix before its step, which is what the teacher-forced parallel decode computes (for fixed orders: exact).
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from oar_core.decode import teacher_forced
from oar_core.model import GPT
from oar_core.names import ADAPTIVE_ORDERS, LocationRule
from oar_core.nll import LN2, in_batches, order_bits
from oar_core.orders import sample_orders
from oar_core.runtime import autocast


def is_deterministic(order: str, location: LocationRule | None) -> bool:
    if order == "random":
        return False
    if order in ADAPTIVE_ORDERS:
        return order == "confidence" and (location or LocationRule()).temperature == 0
    return True


def sampler_bits(model: GPT, tokens_NN: torch.Tensor, labels_N: torch.Tensor, order: str,
                 location: LocationRule | None = None, n_orders: int = 2, batch_size: int = 250, seed: int = 0,
                 device="cpu", steps: int | None = None, schedule: str = "constant",
                 progress: str | None = None) -> float:
    """Mean held-out bits/token of the sampler (order + location rule, and its parallel `steps`/`schedule`): exact
    for deterministic rules, else the mean over `n_orders` orders drawn per image from the sampler's own rule.
    `progress`: a bar's label."""
    return sampler_bits_and_location(model, tokens_NN, labels_N, order, location, n_orders, batch_size, seed,
                                     device, steps, schedule, progress)[0]


@torch.no_grad()
def sampler_bits_and_location(model: GPT, tokens_NN: torch.Tensor, labels_N: torch.Tensor, order: str,
                              location: LocationRule | None = None, n_orders: int = 2, batch_size: int = 250,
                              seed: int = 0, device="cpu", steps: int | None = None, schedule: str = "constant",
                              progress: str | None = None) -> tuple[float, float | None]:
    """`sampler_bits`, and for a location rule or policy the mean bits per step of its location choices along the
    same drawn orders (-log2 q of each choice: an estimate of the rule's entropy per step on real prefixes; 0 for a
    greedy rule, log2 of the unfilled count for a uniform one). None for fixed and random orders."""
    if location is not None and location.score == "gt_prob":
        raise ValueError("the gt_prob score looks at the answer: a sampler cannot use it, and scoring under it is "
                         "not a likelihood (use bits_along_orders for that diagnostic)")
    model.eval()
    H, W = model.cfg.grid_h, model.cfg.grid_w
    draws = 1 if is_deterministic(order, location) else n_orders
    g = torch.Generator().manual_seed(seed)
    total, loc_total = 0.0, 0.0
    bar = tqdm(total=draws * -(-len(tokens_NN) // batch_size), desc=progress, unit="batch", disable=progress is None,
               mininterval=5)  # a line every few seconds in a log (flows stream it into the Prefect run)
    for _ in range(draws):
        for _, tok_BN, lab_B in in_batches(tokens_NN, labels_N, batch_size, device):
            bar.update()
            with autocast(device):
                if order in ADAPTIVE_ORDERS or steps is not None:
                    out = teacher_forced(model, tok_BN, lab_B, order=order, location=location, generator=g,
                                         steps=steps, schedule=schedule)
                    bits_B = -out["logp"].sum(1) / tok_BN.shape[1] / LN2
                    loc_total += float(-out["logq"].sum() / tok_BN.shape[1] / LN2)
                else:
                    bits_B = order_bits(model, tok_BN, lab_B, sample_orders(order, len(tok_BN), H, W, g).to(device))
            total += float(bits_B.sum())
    bar.close()
    n = draws * len(tokens_NN)
    return total / n, (loc_total / n if order in ADAPTIVE_ORDERS else None)


def sampler_nll(model, meta: dict, test_NN, test_labels, *, n_orders: int, batch_size: int, seed: int,
                device, progress: str | None = None) -> tuple[float, str, float | None]:
    """Held-out bits/token of the model as it samples (its order, location rule and parallel steps): a valid
    likelihood bound of that sampler (for a parallel one, not the model's sequential NLL); how it was obtained; and
    the location rule's bits per step (sampler_bits_and_location)."""
    order = meta["order"]
    rule = LocationRule(**meta["location"]) if meta.get("location") else None
    steps, schedule = meta.get("steps"), meta.get("schedule") or "constant"
    if steps is not None and steps >= model.cfg.n_tokens:
        steps = None  # one token per step: the sequential sampler
    bits, loc = sampler_bits_and_location(model, test_NN, test_labels, order, rule, n_orders, batch_size, seed,
                                          device, steps, schedule, progress)
    if order in ADAPTIVE_ORDERS:
        how = ("exact: its greedy location rule, teacher-forced" if is_deterministic(order, rule) else
               f"bound: mean over {n_orders} orders drawn from its own location rule, teacher-forced")
    else:
        how = "exact" if is_deterministic(order, rule) else f"bound: mean over {n_orders} random orders"
    if steps is not None:
        how += (f"; of the parallel sampler ({steps} steps, {schedule}; tokens of a step conditioned on the prefix "
                f"before it), not the model's sequential NLL")
    return bits, f"{order} order, {how}", loc
