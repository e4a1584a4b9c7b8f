"""The uncached reference for `oar_core.decode`: every step recomputes the whole prefix (a full causal forward
per candidate), so the KV-cached path can be checked against it (tests) and timed beside it (bench/decode.py).

    decode(..., forward=UncachedForward)      # instead of the default CachedForward

It is also the reference for parallel decoding (`steps` < N): a step's k candidates each get a full forward over
the prefix before the step, which is what the cached chain (first candidate committed, the rest forwarded in front
of the next step) must equal. `sequential_decode` is the one-token-per-step loop as it was before parallel decoding,
kept verbatim so that `decode` at one token per step can be checked bit for bit against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from oar_core.decode import CANDIDATE_CHUNK_MB, CachedForward, _Steps, candidate_chunk, unfilled_positions
from oar_core.model import GPT
from oar_core.names import ADAPTIVE_ORDERS, SAMPLE_ORDERS, LocationRule
from oar_core.orders import sample_orders


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


@torch.no_grad()
def sequential_decode(model: GPT, labels_B: torch.Tensor, pick_token, *, order: str = "confidence",
                      location: LocationRule | None = None, gt_tokens_BN: torch.Tensor | None = None,
                      known_tokens_BN: torch.Tensor | None = None, known_mask_BN: torch.Tensor | None = None,
                      cfg_scale: float = 1.0, cfg_schedule: str = "constant",
                      generator: torch.Generator | None = None, candidate_chunk_mb: float = CANDIDATE_CHUNK_MB,
                      forward=CachedForward) -> dict[str, torch.Tensor]:
    """`oar_core.decode.decode` as it was before parallel decoding (one token per step), kept verbatim but for
    pick_token's (B, k) shapes."""
    if order not in SAMPLE_ORDERS:
        raise ValueError(f"unknown order {order!r}; use one of {', '.join(SAMPLE_ORDERS)}")
    if order == "policy" and not model.cfg.policy:
        raise ValueError("order='policy' needs a model with a location-policy head (finetune.policy_weight > 0)")
    location = location or LocationRule()
    device = labels_B.device
    B, N, H, W = labels_B.shape[0], model.cfg.n_tokens, model.cfg.grid_h, model.cfg.grid_w
    guided = cfg_scale != 1.0 and model.cfg.num_classes > 0
    labels_R = torch.cat([labels_B, torch.full_like(labels_B, model.null_class)]) if guided else labels_B
    out = {k: torch.zeros(B, N, dtype=torch.long if k in ("tokens", "order") else torch.float32, device=device)
           for k in ("tokens", "order", "scores", "logq", "logp")}
    tokens_BN, order_BN = out["tokens"], out["order"]
    filled_BN = torch.zeros(B, N, dtype=torch.bool, device=device)
    fixed = order not in ADAPTIVE_ORDERS
    fixed_order_BN = sample_orders(order, B, H, W, generator).to(device) if fixed else None
    steps = _Steps(B, N, H, W, guided, cfg_scale, cfg_schedule, location, gt_tokens_BN, out, filled_BN, generator)
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
        logits.prefill(steps.dup(tokens_BN), steps.dup(known_pos_BK), labels_R)

    todo = range(K, N)
    rows = steps.rows
    chunk = candidate_chunk(candidate_chunk_mb, labels_R.shape[0], model.cfg.vocab_size)
    for t in todo:
        prefix = (steps.dup(torch.gather(tokens_BN, 1, order_BN[:, :t])), steps.dup(order_BN[:, :t]))
        cand_BC = fixed_order_BN[:, t: t + 1] if fixed else unfilled_positions(filled_BN)
        if order == "policy":  # where: the policy's distribution over the unfilled positions
            pol_R = logits.policy(labels_R, *prefix)
            score_BC = torch.gather(F.log_softmax(steps.guide(pol_R, t, location.logits == "cond"), 1), 1, cand_BC)
            cand_BC = steps.locate(t, score_BC, cand_BC)
        if order == "confidence":  # only (B, C) scores outlive a chunk; the chosen position is forwarded again alone
            score_BC = torch.cat([steps.score(t, logits.candidates(labels_R, *prefix, steps.dup(c_Bc)), c_Bc)
                                  for c_Bc in cand_BC.split(chunk, 1)], 1)
            cand_BC = steps.locate(t, score_BC, cand_BC)
        logits_R1V = logits.candidates(labels_R, *prefix, steps.dup(cand_BC))  # one candidate: what the cache keeps
        logits.commit()
        if order == "confidence":  # the step score from this same-shaped forward: no score depends on the chunk size
            out["scores"][:, t] = steps.score(t, logits_R1V, cand_BC)[:, 0]
        pos_B, logits_BV = cand_BC[:, 0], steps.guide(logits_R1V, t)[:, 0]
        token_B = pick_token(t, pos_B[:, None], logits_BV[:, None])[:, 0]  # pick_token takes (B, k) since
        out["logp"][:, t] = torch.gather(F.log_softmax(logits_BV, -1), 1, token_B[:, None])[:, 0]
        tokens_BN[rows, pos_B] = token_B
        filled_BN[rows, pos_B] = True
        order_BN[:, t] = pos_B
    return out

