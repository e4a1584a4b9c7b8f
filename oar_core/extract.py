"""Order extraction, a batch at a time (the extract_orders stage runs it over every shard): for each image, the
order in which the any-order model is most confident.

Teacher-forced: at step t every unfilled position is scored in KV-cached forwards of as many candidates as
`candidate_chunk_mb` allows (see `decode.decode`), the best is appended and its ground-truth token fed;
exact ties for the best are broken at random and counted in the summary. Scores (`oar_core.location`):
`max_prob` (default), `margin`, `neg_entropy`, or the log-probability of the ground-truth token (`gt_prob`: an
oracle that looks at the answer); greedy or sampled, as the `LocationRule` says."""
from __future__ import annotations

import math

import torch

from oar_core.decode import teacher_forced
from oar_core.model import GPT
from oar_core.names import LocationRule
from oar_core.nll import order_bits


@torch.no_grad()
def extract_batch(model: GPT, tokens_BN: torch.Tensor, labels_B: torch.Tensor, rule: LocationRule,
                  generator: torch.Generator | None = None, **decode_kw) -> dict[str, torch.Tensor]:
    """Extracted order_BN, step scores_BN (log-domain) and the content NLL (bits/token) along that order. With
    the `gt_prob` score the order is chosen by looking at the answer, so that NLL is an "oracle order"
    diagnostic, not a likelihood (see oar_core.likelihood); with a rule that reads only the model's predictions
    (max_prob, margin, neg_entropy) the order is one the model itself could have chosen."""
    out = teacher_forced(model, tokens_BN, labels_B, order="confidence", location=rule, generator=generator,
                         **decode_kw)
    out["nll_bits"] = -out["logp"].sum(1) / tokens_BN.shape[1] / math.log(2)
    return out


@torch.no_grad()
def random_order_bits(model: GPT, tokens_BN, labels_B, generator: torch.Generator) -> torch.Tensor:
    """Per-image NLL (bits/token) under one random order: the any-order baseline each extracted order beats."""
    order_BN = torch.argsort(torch.rand(tokens_BN.shape, generator=generator), dim=1).to(tokens_BN.device)
    return order_bits(model, tokens_BN, labels_B, order_BN)
