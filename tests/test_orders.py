import torch

from oar_core.orders import (
    center_out,
    is_permutation,
    kendall_tau_to_raster,
    raster,
    sample_orders,
    spiral,
    step_of_position,
)


def test_fixed_orders_are_permutations():
    for H, W in [(1, 1), (4, 4), (7, 7), (3, 5)]:
        for order in (spiral(H, W), center_out(H, W)):
            assert is_permutation(order[None], H * W).all()
    assert spiral(3, 3).tolist() == [0, 1, 2, 5, 8, 7, 6, 3, 4]
    assert center_out(3, 3)[0] == 4


def test_random_orders_are_seeded_permutations():
    a = sample_orders("random", 8, 7, 7, torch.Generator().manual_seed(0))
    b = sample_orders("random", 8, 7, 7, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and is_permutation(a, 49).all()
    assert not is_permutation(torch.tensor([[0, 0, 1]]), 3).any()


def test_step_of_position_inverts_and_tau():
    o = sample_orders("random", 3, 4, 4, torch.Generator().manual_seed(1))
    s = step_of_position(o)
    assert torch.equal(s.gather(1, o), torch.arange(16).expand(3, -1))
    assert kendall_tau_to_raster(torch.arange(16)) == 1.0
    assert kendall_tau_to_raster(torch.arange(16).flip(0)) == -1.0


def test_halton_order_is_a_permutation_spread_over_the_grid():
    from oar_core.orders import halton

    for H, W in ((7, 7), (14, 14), (4, 6)):
        order = halton(H, W)
        assert is_permutation(order[None], H * W).all()
    from collections import Counter

    quadrants = Counter((int(p) // 8 // 4, int(p) % 8 // 4) for p in halton(8, 8)[:8])
    assert sorted(quadrants.values()) == [2, 2, 2, 2]  # low discrepancy: the first 8 split evenly over quadrants
    assert sorted(Counter(int(p) // 8 // 4 for p in raster(8, 8)[:8]).values()) == [8]  # raster: one half only
