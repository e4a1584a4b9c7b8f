"""Parallel decoding (several tokens per step) on a small random-weight model: the step schedule, exactness at one
token per step against the loop as it was, the cached chain against the uncached reference, guidance, known tokens
and the parallel sampler's likelihood."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from oar_core.decode import _sampled, decode, generate, step_sizes, teacher_forced
from oar_core.likelihood import sampler_bits
from oar_core.model import GPT, GPTConfig
from oar_core.names import STEP_SCHEDULES, LocationRule
from oar_core.orders import is_permutation
from tests.reference_decode import UncachedForward, sequential_decode

N = 16
RULES = {"greedy": LocationRule(), "gumbel": LocationRule(temperature=1.0, anneal="linear"),
         "margin-topk-local": LocationRule(score="margin", temperature=0.5, top_k=3, locality=2.0)}


@pytest.fixture(scope="module", params=["relative", "both"])
def model(request):
    """`both` also gives every chain input its absolute next position: the chain must point each committed token at
    the next one's position in both encodings."""
    torch.manual_seed(0)
    return GPT(GPTConfig(grid_h=4, grid_w=4, vocab_size=32, num_classes=3, n_layer=2, n_head=2, d_model=32,
                         policy=True, next_position=request.param)).eval()


def _known(B=2):
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[:, 5:9] = True
    return dict(known_tokens_BN=torch.randint(0, 32, (B, N), generator=torch.Generator().manual_seed(1)),
                known_mask_BN=mask)


@pytest.mark.parametrize("schedule", STEP_SCHEDULES)
@pytest.mark.parametrize("n,steps", [(49, 49), (49, 25), (49, 7), (49, 1), (196, 24), (12, 5), (7, 30)])
def test_step_sizes_fill_the_grid_in_the_asked_steps(n, steps, schedule):
    sizes = step_sizes(n, steps, schedule)
    assert sum(sizes) == n and len(sizes) == min(steps, n) and min(sizes) >= 1
    if schedule != "constant" and 4 <= len(sizes) < n:  # few early, many late
        assert sizes[0] <= sizes[-1] and sizes[0] < max(sizes)
    if schedule == "constant":
        assert max(sizes) - min(sizes) <= 1
    assert step_sizes(n, None, schedule) == [1] * n


def test_step_sizes_reject_bad_values():
    with pytest.raises(ValueError, match="unknown step schedule 'square'"):
        step_sizes(10, 3, "square")
    with pytest.raises(ValueError, match="steps must be at least 1"):
        step_sizes(10, 0)


@pytest.mark.parametrize("order,rule,case", [("confidence", "greedy", c) for c in ("plain", "cfg", "known")]
                         + [("confidence", "gumbel", "cfg"), ("confidence", "margin-topk-local", "known"),
                            ("policy", "greedy", "plain"), ("policy", "gumbel", "cfg"), ("policy", "gumbel", "known"),
                            ("raster", "greedy", "cfg"), ("raster", "greedy", "known"), ("random", "greedy", "cfg"),
                            ("random", "greedy", "known"), ("spiral", "greedy", "plain"),
                            ("center_out", "greedy", "known"), ("halton", "greedy", "cfg")])
def test_one_token_per_step_is_bit_identical_to_the_sequential_loop(model, order, rule, case):
    """Every order, with guidance and with known tokens: `steps=None` and `steps=N` are today's decode, bit for bit."""
    kw = {"plain": {}, "cfg": dict(cfg_scale=2.0, cfg_schedule="linear"), "known": _known()}[case]
    labels = torch.tensor([0, 2])
    pick = lambda g: partial(_sampled, temperature=1.0, top_k=8, generator=g)  # noqa: E731
    ref = sequential_decode(model, labels, pick(g := torch.Generator().manual_seed(3)), order=order,
                            location=RULES[rule], generator=g, **kw)
    for steps in (None, N - int(case == "known") * 4):
        out = decode(model, labels, pick(g := torch.Generator().manual_seed(3)), order=order, location=RULES[rule],
                     generator=g, steps=steps, schedule="cosine", **kw)
        for k in ref:
            assert torch.equal(out[k], ref[k]), (steps, k)


@pytest.mark.parametrize("kw", [{}, dict(cfg_scale=2.0, cfg_schedule="linear"), _known()],
                         ids=["plain", "cfg", "known"])
@pytest.mark.parametrize("order,rule", [("confidence", "greedy"), ("confidence", "margin-topk-local"),
                                        ("policy", "gumbel"), ("raster", "greedy"), ("random", "greedy")])
def test_parallel_cached_chain_equals_the_uncached_reference(model, order, rule, kw):
    labels = torch.tensor([0, 1])
    run = lambda fwd, steps=5: generate(model, labels, order=order, location=RULES[rule], top_k=8,  # noqa: E731
                                        generator=torch.Generator().manual_seed(3), steps=steps, schedule="arccos",
                                        forward=fwd, **kw)
    from oar_core.decode import CachedForward
    a, b = run(CachedForward), run(UncachedForward)
    assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["order"], b["order"])
    for k in ("scores", "logq", "logp"):
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-4), k
    assert is_permutation(a["order"], N).all()
    if "known_mask_BN" in kw:
        mask = kw["known_mask_BN"]
        assert torch.equal(a["tokens"][mask], kw["known_tokens_BN"][mask])
        assert mask.gather(1, a["order"][:, :4]).all()
    sequential = run(CachedForward, None)
    assert not torch.allclose(a["logp"], sequential["logp"], atol=1e-3)  # k > 1 did change what the tokens saw


def test_tokens_of_a_step_see_the_prefix_before_it_only(model):
    """Raster in 4 steps of 4: every token's logits are those of a full forward over the rows before its step."""
    tokens, labels = torch.randint(0, 32, (2, N)), torch.tensor([0, 1])
    out = teacher_forced(model, tokens, labels, order="raster", steps=4)
    assert torch.equal(out["order"], torch.arange(N).expand(2, -1))  # raster's next k, in raster order
    full, _ = model(tokens, torch.arange(N).expand(2, -1), labels)
    want = F.log_softmax(full.float(), -1).gather(2, tokens[..., None])[..., 0]
    # the first token of each step is the next input of the chain: exactly the sequential prediction
    assert torch.allclose(out["logp"][:, ::4], want[:, ::4], atol=1e-5)
    assert not torch.allclose(out["logp"][:, 1::4], want[:, 1::4], atol=1e-3)  # the others did not see it


def test_greedy_confidence_takes_the_k_most_confident_positions(model):
    labels = torch.tensor([0, 1])
    out = generate(model, labels, order="confidence", steps=4, generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(2)
    logits = model.candidate_logits(cache, labels, None, None, torch.arange(N).expand(2, -1))
    conf = torch.softmax(logits, -1).max(-1).values
    assert torch.equal(out["order"][:, :4], conf.topk(4, dim=1).indices)  # the first step: 4 best, best first


def test_policy_draws_k_distinct_positions_and_pays_each(model):
    out = generate(model, torch.tensor([0, 1, 2]), order="policy", location=LocationRule(temperature=1.0), steps=3,
                   generator=torch.Generator().manual_seed(0))
    assert is_permutation(out["order"], N).all()
    assert (out["logq"] <= 0).all() and (out["logq"][:, :-1] < 0).all()  # only the last position is certain


def test_parallel_likelihood_is_the_parallel_samplers(model):
    """At one token per step the bound is the sequential one; with steps < N it is the parallel sampler's own
    (each token conditioned on the prefix before its step): for raster, the exact -log p of the 4-step sampler."""
    tokens, labels = torch.randint(0, 32, (6, N)), torch.arange(6) % 3
    seq = sampler_bits(model, tokens, labels, "raster")
    assert sampler_bits(model, tokens, labels, "raster", steps=N) == pytest.approx(seq, abs=1e-6)
    par = sampler_bits(model, tokens, labels, "raster", steps=4)
    ref = teacher_forced(model, tokens, labels, order="raster", steps=4, forward=UncachedForward)
    assert par == pytest.approx(float(-ref["logp"].sum(1).mean() / N / torch.log(torch.tensor(2.0))), abs=1e-5)
    assert par != pytest.approx(seq, abs=1e-3)


def test_steps_beyond_the_grid_are_refused(model):
    with pytest.raises(ValueError, match="steps must be between 1 and the grid's 16 tokens"):
        generate(model, torch.tensor([0]), order="raster", steps=17)


@pytest.mark.parametrize("rule", [LocationRule(temperature=0.7), LocationRule(temperature=1.0, top_k=4),
                                  LocationRule()], ids=["tempered", "top-k", "greedy"])
def test_k_positions_are_drawn_without_replacement_with_their_sequential_log_q(rule):
    """Each chosen position's log q is the rule's log-probability of it among the candidates left after the earlier
    ones: what drawing them one at a time would give."""
    from oar_core.location import log_q, pick

    score_BC = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    choice_Bk, logq_Bk = pick(rule, 2, 16, score_BC, None, torch.Generator().manual_seed(1), k=5)
    assert all(len(set(row.tolist())) == 5 for row in choice_Bk)
    left = score_BC.clone()
    for i in range(5):
        want = log_q(rule, 2, 16, left).gather(1, choice_Bk[:, i:i + 1])[:, 0]
        assert torch.allclose(logq_Bk[:, i], want, atol=1e-5), i
        left = left.scatter(1, choice_Bk[:, i:i + 1], float("-inf"))
    if rule.temperature == 0:
        assert torch.equal(choice_Bk, score_BC.topk(5, 1).indices)
