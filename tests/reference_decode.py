"""The uncached reference for `oar_core.decode`: every step recomputes the whole prefix (a full causal forward
per candidate), so the KV-cached path can be checked against it (tests) and timed beside it (bench/decode.py).

    decode(..., forward=UncachedForward)      # instead of the default CachedForward
"""
from __future__ import annotations

import torch

from oar_core.model import GPT


class UncachedForward:
    def __init__(self, model: GPT, rows: int):
        self.model = model

    def prefill(self, tokens_RN, known_pos_RK, labels_R) -> None:
        pass  # the known tokens are part of every step's prefix

    def candidates(self, labels_R, prefix_tok_RT, prefix_pos_RT, cand_RC) -> torch.Tensor:
        return uncached_candidate_logits(self.model, labels_R, prefix_tok_RT, prefix_pos_RT, cand_RC)

    def policy(self, labels_R, prefix_tok_RT, prefix_pos_RT) -> torch.Tensor:
        return uncached_policy_logits(self.model, labels_R, prefix_tok_RT, prefix_pos_RT)

    def commit(self) -> None:
        pass


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


