"""Negative log-likelihoods along given orders: the cross-entropy of each token (and the policy's cost of each
position) when the order is known. Training minimises them; `oar_core.likelihood` turns them into likelihoods of a
sampler, which must also account for how the order is chosen.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from oar_core.model import GPT
from oar_core.runtime import autocast

LN2 = math.log(2)


def content_nll(logits_BNV: torch.Tensor, targets_BN: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """Cross-entropy (nats) of each target token along an order, (B, N); `mean`: over every token (the training
    loss). The one definition behind training, extraction and every likelihood."""
    if reduction == "mean":
        return F.cross_entropy(logits_BNV.float().flatten(0, 1), targets_BN.flatten())
    return F.cross_entropy(logits_BNV.float().transpose(1, 2), targets_BN, reduction="none")


def policy_nll(logpi_BNN: torch.Tensor, order_BN: torch.Tensor) -> torch.Tensor:
    """(B, N) nats the location policy pays for each step of `order_BN`: the one policy NLL, for its training loss
    and for the location part of a paid likelihood."""
    return -torch.gather(logpi_BNN, 2, order_BN[..., None])[..., 0]


def in_batches(tokens_NN, labels_N, batch_size: int, device):
    for i in range(0, len(tokens_NN), batch_size):
        yield i, tokens_NN[i: i + batch_size].to(device), labels_N[i: i + batch_size].to(device)


@torch.no_grad()
def order_bits(model: GPT, tokens_BN, labels_B, order_BN) -> torch.Tensor:
    """(B,) content bits/token along the given orders (one forward). Unpaid: valid only for orders that do not
    depend on the image (fixed, uniform random) or that the sampler itself draws from the prefix."""
    logits_BNV, targets_BN = model(tokens_BN, order_BN, labels_B)
    return content_nll(logits_BNV, targets_BN).mean(1) / LN2


@torch.no_grad()
def policy_bits_along(model: GPT, tokens_BN, labels_B, order_BN) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(content, location) bits/token along any given order for a policy model (their sum is a valid bound),
    and per image the number of steps whose most likely policy position is the order's (the last step, with
    one choice left, is not counted)."""
    logits_BNV, targets_BN, logpi_BNN = model.forward_with_policy(tokens_BN, order_BN, labels_B)
    content = content_nll(logits_BNV, targets_BN).mean(1)
    location = policy_nll(logpi_BNN, order_BN).mean(1)
    hits = (logpi_BNN.argmax(-1)[:, :-1] == order_BN[:, :-1]).sum(1)
    return content / LN2, location / LN2, hits


@torch.no_grad()
def bits_along_orders(model: GPT, tokens_NN, labels_N, order_NN, batch_size: int = 250, device="cpu") -> float:
    """Mean content bits/token along given orders, unpaid: a likelihood only for orders that do not depend on
    the image (fixed, uniform random); along extracted (target-peeking) orders it is the oracle diagnostic."""
    model.eval()
    total = 0.0
    for i, tok_BN, lab_B in in_batches(tokens_NN, labels_N, batch_size, device):
        with autocast(device):
            total += float(order_bits(model, tok_BN, lab_B, order_NN[i: i + batch_size].to(device)).sum())
    return total / len(tokens_NN)


@torch.no_grad()
def policy_bits(model: GPT, tokens_NN, labels_N, order_NN, batch_size: int = 250, device="cpu") -> dict:
    """Mean content + location bits/token of a policy model along given orders (valid: the order is paid), and
    the policy's top-1 agreement with those orders."""
    model.eval()
    content = location = hits = 0.0
    for i, tok_BN, lab_B in in_batches(tokens_NN, labels_N, batch_size, device):
        with autocast(device):
            c, loc, h = policy_bits_along(model, tok_BN, lab_B, order_NN[i: i + batch_size].to(device))
        content, location, hits = content + float(c.sum()), location + float(loc.sum()), hits + float(h.sum())
    n = len(tokens_NN)
    return {"content": content / n, "location": location / n, "total": (content + location) / n,
            "top1": hits / (n * (order_NN.shape[1] - 1))}
