"""Generation orders over an H x W token grid.

An order is a permutation `order_BN` of the N = H*W raster positions: `order_BN[b, t]` is the grid position
generated at step t. Fixed orders (raster, spiral, center_out) are baselines; `random` is any-order
training; `given` orders come from the extracted orders table (`oar_core.order_table`).
"""
from __future__ import annotations

import torch

from oar_core.names import FIXED_ORDERS


def raster(H: int, W: int) -> torch.Tensor:
    return torch.arange(H * W)


def spiral(H: int, W: int) -> torch.Tensor:
    """Clockwise from the top-left corner inwards."""
    top, bottom, left, right, out = 0, H - 1, 0, W - 1, []
    while top <= bottom and left <= right:
        out += [top * W + x for x in range(left, right + 1)]
        out += [y * W + right for y in range(top + 1, bottom + 1)]
        if top < bottom:
            out += [bottom * W + x for x in range(right - 1, left - 1, -1)]
        if left < right:
            out += [y * W + left for y in range(bottom - 1, top, -1)]
        top, bottom, left, right = top + 1, bottom - 1, left + 1, right - 1
    return torch.tensor(out)


def center_out(H: int, W: int) -> torch.Tensor:
    """By distance from the grid centre, ties broken by raster index (stable sort)."""
    y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    dist = ((y - (H - 1) / 2) ** 2 + (x - (W - 1) / 2) ** 2).flatten()
    return torch.sort(dist, stable=True).indices


def _radical_inverse(i: int, base: int) -> float:
    f, r = 1.0, 0.0
    while i:
        f /= base
        r += f * (i % base)
        i //= base
    return r


def halton(H: int, W: int) -> torch.Tensor:
    """Low-discrepancy order (Halton bases 2 and 3, as in Halton-MaskGIT): every prefix is spread evenly over
    the grid, so no region is filled long before another; cells already visited are skipped."""
    seen, out, i = set(), [], 1
    while len(out) < H * W:
        p = int(_radical_inverse(i, 2) * H) * W + int(_radical_inverse(i, 3) * W)
        if p not in seen:
            seen.add(p)
            out.append(p)
        i += 1
    return torch.tensor(out)


def sample_orders(kind: str, B: int, H: int, W: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, N) long tensor of orders of the given kind."""
    if kind == "random":
        return torch.argsort(torch.rand(B, H * W, generator=generator), dim=1)
    if kind in FIXED_ORDERS:
        return globals()[kind](H, W).unsqueeze(0).expand(B, -1).clone()
    raise ValueError(f"unknown order kind {kind!r}; use one of random, {', '.join(FIXED_ORDERS)}")


def is_permutation(order_BN: torch.Tensor, N: int) -> torch.Tensor:
    """(B,) bool: each row holds every position 0..N-1 exactly once."""
    return (order_BN.shape[-1] == N) & (torch.sort(order_BN, dim=-1).values == torch.arange(N)).all(-1)


def step_of_position(order_BN: torch.Tensor) -> torch.Tensor:
    """Inverse permutation: `step_BN[b, p]` is the step at which position p is generated."""
    step_BN = torch.empty_like(order_BN)
    steps_BN = torch.arange(order_BN.shape[1], device=order_BN.device).expand_as(order_BN).contiguous()
    step_BN.scatter_(1, order_BN, steps_BN)
    return step_BN


def kendall_tau_to_raster(order_N) -> float:
    """Rank correlation (-1..1) between an order and raster order; 1 means raster."""
    step = step_of_position(torch.as_tensor(order_N).long().unsqueeze(0))[0].double()
    n = step.numel()
    diff = torch.sign(step.unsqueeze(0) - step.unsqueeze(1))
    pos_diff = torch.sign(torch.arange(n).unsqueeze(0) - torch.arange(n).unsqueeze(1)).double()
    return float((diff * pos_diff).sum() / (n * (n - 1))) if n > 1 else 1.0
