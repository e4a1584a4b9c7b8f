"""Reported NLLs are likelihoods: on i.i.d. uniform tokens none goes below the entropy; the oracle order can."""
import math

import pytest
import torch
import torch.nn.functional as F

from oar_core.extract import extract_batch
from oar_core.likelihood import sampler_bits
from oar_core.location import log_q, pick, tau
from oar_core.model import GPT, GPTConfig
from oar_core.names import LocationRule
from oar_core.nll import bits_along_orders, policy_bits

V, N = 32, 49
ENTROPY = math.log2(V)  # bits/token of i.i.d. uniform tokens: no likelihood of held-out data can beat it


@pytest.fixture(scope="module")
def noise_fit():
    """A model with a policy head fitted to 64 grids of pure noise: its predictions vary from position to
    position (it memorised noise), which is what lets a target-peeking order look better than the entropy."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    train, test = torch.randint(0, V, (64, N), generator=g), torch.randint(0, V, (128, N), generator=g)
    model = GPT(GPTConfig(vocab_size=V, num_classes=1, n_layer=2, n_head=2, d_model=64, policy=True))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    labels = torch.zeros(64, dtype=torch.long)
    for _ in range(150):
        order = torch.argsort(torch.rand(64, N, generator=g), 1)
        logits, targets, logpi = model(train, order, labels, with_policy=True)
        logpi_BN = torch.gather(logpi, 2, order[..., None])
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) - logpi_BN.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), test, torch.zeros(128, dtype=torch.long)


SAMPLERS = [("raster", None), ("random", None), ("halton", None), ("confidence", LocationRule()),
            ("confidence", LocationRule(temperature=1.0, anneal="linear")),
            ("confidence", LocationRule(score="margin", temperature=0.5, top_k=4, locality=1.0)),
            ("policy", LocationRule(temperature=1.0))]


@pytest.mark.parametrize("order,rule", SAMPLERS)
def test_no_reported_nll_beats_the_entropy_of_noise(noise_fit, order, rule):
    model, test, labels = noise_fit
    assert sampler_bits(model, test, labels, order, rule, n_orders=2) > ENTROPY


def test_the_oracle_order_can_and_paying_for_it_cannot(noise_fit):
    model, test, labels = noise_fit
    ex = extract_batch(model, test, labels, LocationRule(score="gt_prob"))
    oracle = bits_along_orders(model, test, labels, ex["order"])
    assert oracle < ENTROPY - 0.03  # looks at the answer: not a likelihood, and it shows
    assert abs(oracle - float(ex["nll_bits"].mean())) < 1e-4
    paid = policy_bits(model, test, labels, ex["order"])  # the same order, paid for with the policy's log-probs
    assert paid["content"] == pytest.approx(oracle, abs=1e-4) and paid["total"] > ENTROPY


def test_a_sampler_cannot_use_the_peeking_score(noise_fit):
    model, test, labels = noise_fit
    with pytest.raises(ValueError, match="looks at the answer"):
        sampler_bits(model, test, labels, "confidence", LocationRule(score="gt_prob"))


def test_greedy_rule_likelihood_is_exact_and_deterministic(noise_fit):
    model, test, labels = noise_fit
    a = sampler_bits(model, test[:16], labels[:16], "confidence", LocationRule(), n_orders=3, seed=0)
    b = sampler_bits(model, test[:16], labels[:16], "confidence", LocationRule(), n_orders=1, seed=5)
    assert a == pytest.approx(b, abs=1e-6)  # one order per image, whatever the draws


def test_location_rule_distribution():
    score = torch.tensor([[0.0, 1.0, 2.0, 2.0]])
    soft = LocationRule(temperature=1.0)
    assert log_q(soft, 0, 10, score).exp().sum().item() == pytest.approx(1.0)
    assert tau(LocationRule(temperature=1.0, anneal="linear"), 9, 10) == 0.0
    assert tau(LocationRule(temperature=2.0, anneal="cosine"), 0, 10) == 2.0
    topk = log_q(LocationRule(temperature=1.0, top_k=2), 0, 10, score)
    assert torch.isinf(topk[0, :2]).all() and topk[0, 2:].exp().sum().item() == pytest.approx(1.0)
    # greedy: exact ties are split at random, not given to the lowest raster index
    g = torch.Generator().manual_seed(0)
    picks = {int(pick(LocationRule(), 0, 10, score, generator=g)[0]) for _ in range(40)}
    assert picks == {2, 3}


def test_location_bits_per_step_are_zero_for_greedy_and_near_uniform_for_a_hot_rule(noise_fit):
    from oar_core.likelihood import sampler_bits_and_location

    model, test, labels = noise_fit
    uniform = sum(math.log2(N - t) for t in range(N)) / N  # a uniform choice among the unfilled positions
    _, greedy = sampler_bits_and_location(model, test[:16], labels[:16], "confidence", LocationRule())
    _, hot = sampler_bits_and_location(model, test[:16], labels[:16], "confidence", LocationRule(temperature=100.0))
    _, cool = sampler_bits_and_location(model, test[:16], labels[:16], "confidence", LocationRule(temperature=0.05))
    assert greedy == 0.0
    assert uniform - 0.1 < hot < uniform + 1e-3
    assert cool < hot - 0.5  # a lower temperature concentrates the choices
    assert sampler_bits_and_location(model, test[:4], labels[:4], "random")[1] is None
