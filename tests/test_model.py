"""The model and its decoding paths, on a small random-weight model (no data needed)."""
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from oar_core.checkpoint import save_checkpoint
from oar_core.decode import CachedForward, generate, teacher_forced
from oar_core.location import location_scores
from oar_core.model import GPT, GPTConfig, load_gpt
from oar_core.names import LocationRule
from oar_core.orders import is_permutation, sample_orders
from tests.reference_decode import UncachedForward, uncached_candidate_logits

N = 16


@pytest.fixture(scope="module", params=["relative", "both"])
def model(request):
    """Every cached/uncached and batched/full equality below holds for the paper's offset and with the absolute next
    position added (`both` runs every embedding `absolute` has)."""
    torch.manual_seed(0)
    return GPT(GPTConfig(grid_h=4, grid_w=4, vocab_size=32, num_classes=3, n_layer=2, n_head=2, d_model=32,
                         policy=True, next_position=request.param)).eval()


def test_prefix_is_causal_and_next_position_matters(model):
    tokens = torch.randint(0, 32, (1, N))
    a = torch.arange(N)[None]
    b = torch.cat([a[:, :5], a[:, 5:].flip(1)], dim=1)  # same first 5 steps, then another order
    la, _ = model(tokens, a, torch.tensor([1]))
    lb, _ = model(tokens, b, torch.tensor([1]))
    assert torch.allclose(la[:, :5], lb[:, :5], atol=1e-5)  # nothing leaks back from later steps
    assert not torch.allclose(la[:, 5], lb[:, 5], atol=1e-3)  # the offset to the next position changes the prediction


def test_every_candidate_scored_in_one_forward_equals_its_own_order(model):
    """Equivariance: the batch of candidate predictions is the same set a full forward gives for each order
    that continues the prefix with that candidate."""
    torch.manual_seed(1)
    tokens = torch.randint(0, 32, (2, N))
    labels = torch.tensor([0, 2])
    prefix = sample_orders("random", 2, 4, 4, torch.Generator().manual_seed(0))[:, :6]
    filled = torch.zeros(2, N, dtype=torch.bool).scatter(1, prefix, True)
    cand = torch.sort(filled.to(torch.int8), dim=1, stable=True).indices[:, : N - 6]

    cache = model.new_cache(2)
    model.prefill(cache, model.sequence_inputs(tokens, prefix, labels))
    last = prefix[:, -1]
    batched = model.candidate_logits(cache, labels, tokens.gather(1, last[:, None])[:, 0], last, cand)
    for c in range(cand.shape[1]):
        order = torch.cat([prefix, cand[:, c : c + 1]], dim=1)
        full, _ = model(tokens, order, labels)
        assert torch.allclose(batched[:, c], full[:, -1], atol=1e-5)
    reference = uncached_candidate_logits(model, labels, tokens.gather(1, prefix), prefix, cand)
    assert torch.allclose(batched, reference, atol=1e-5)


RULES = {"greedy": LocationRule(), "gumbel": LocationRule(temperature=1.0, anneal="linear"),
         "margin-topk-local": LocationRule(score="margin", temperature=0.5, top_k=3, locality=2.0),
         "guided-entropy": LocationRule(score="neg_entropy", logits="guided", temperature=2.0, anneal="cosine")}


@pytest.mark.parametrize("order,rule", [("confidence", r) for r in RULES] + [("policy", "greedy"), ("policy", "gumbel")]
                         + [(o, "greedy") for o in ("raster", "random", "spiral", "center_out", "halton")])
def test_kv_cached_sampling_equals_uncached(model, order, rule):
    labels = torch.tensor([0, 1, 2])
    run = lambda cache: generate(model, labels, order=order, cfg_scale=2.0, top_k=8, location=RULES[rule],  # noqa: E731
                                 cfg_schedule="linear", generator=torch.Generator().manual_seed(3),
                                 forward=CachedForward if cache else UncachedForward)
    a, b = run(True), run(False)
    assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["order"], b["order"])
    assert torch.allclose(a["scores"], b["scores"], atol=1e-5)
    assert is_permutation(a["order"], N).all()


def test_confidence_order_picks_the_most_confident_position(model):
    out = generate(model, torch.tensor([0, 1]), order="confidence", generator=torch.Generator().manual_seed(0))
    # first step: the start token scores all N positions; the chosen one has the highest max-probability
    cache = model.new_cache(2)
    logits = model.candidate_logits(cache, torch.tensor([0, 1]), None, None, torch.arange(N).expand(2, -1))
    conf = torch.softmax(logits, -1).max(-1).values
    assert torch.equal(out["order"][:, 0], conf.argmax(1))


@pytest.mark.parametrize("region", ["inpaint", "outpaint"])
@pytest.mark.parametrize("order", ["confidence", "policy"])
def test_known_tokens_are_kept_and_go_first(model, region, order):
    known = torch.randint(0, 32, (2, N))
    mask = torch.zeros(4, 4, dtype=torch.bool)
    if region == "inpaint":  # known: everything but the centre
        mask[:] = True
        mask[1:3, 1:3] = False
    else:  # outpaint: only the centre is known
        mask[1:3, 1:3] = True
    mask = mask.flatten().expand(2, -1)
    run = lambda cache, s=3.0: generate(model, torch.tensor([0, 1]), order=order, known_tokens_BN=known,  # noqa: E731
                                        known_mask_BN=mask, cfg_scale=s, generator=torch.Generator().manual_seed(0),
                                        forward=CachedForward if cache else UncachedForward)
    out = run(True)
    assert torch.equal(out["tokens"][mask], known[mask])
    K = int(mask[0].sum())
    assert mask.gather(1, out["order"][:, :K]).all() and is_permutation(out["order"], N).all()
    ref = run(False)  # with guidance on, the unconditional half of the prefill must carry the null class
    assert torch.equal(out["tokens"], ref["tokens"]) and torch.allclose(out["logp"], ref["logp"], atol=1e-5)
    assert not torch.allclose(out["logp"], run(True, s=1.0)["logp"], atol=1e-3)  # guidance changes the logits


def test_unequal_known_counts_are_rejected(model):
    mask = torch.zeros(2, N, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, :5] = True
    with pytest.raises(ValueError, match="same number of known tokens"):
        generate(model, torch.tensor([0, 1]), known_tokens_BN=torch.zeros(2, N, dtype=torch.long), known_mask_BN=mask)


def test_cfg_scale_one_is_no_guidance(model):
    labels = torch.tensor([0, 1, 2])
    run = lambda **kw: generate(model, labels, order="raster", generator=torch.Generator().manual_seed(0), **kw)  # noqa: E731
    plain = run(cfg_scale=1.0)
    assert torch.equal(plain["tokens"], run(cfg_scale=1.0, cfg_schedule="linear")["tokens"])
    assert torch.allclose(plain["logp"], run(cfg_scale=1.0, cfg_schedule="linear")["logp"])
    guided = run(cfg_scale=4.0)
    assert not torch.allclose(plain["logp"], guided["logp"], atol=1e-3)
    ramped = run(cfg_scale=4.0, cfg_schedule="linear")  # the ramp starts at no guidance
    assert torch.allclose(ramped["logp"][:, 0], plain["logp"][:, 0], atol=1e-5)


def test_policy_order_needs_a_policy_head():
    plain = GPT(GPTConfig(grid_h=4, grid_w=4, vocab_size=32, num_classes=3, n_layer=1, n_head=2, d_model=32))
    with pytest.raises(ValueError, match="policy head"):
        generate(plain, torch.tensor([0]), order="policy")


def chunk_mb(chunk: int, rows: int, V: int = 32) -> float:
    """The candidate_chunk_mb budget that scores exactly `chunk` candidates per forward."""
    return chunk * rows * V * 4 / 2**20


@pytest.mark.parametrize("rule,cfg_scale", [(r, s) for r in RULES for s in (1.0, 2.0)] + [("gt_prob", 1.0)])
def test_chunked_candidate_scoring_equals_unchunked(model, monkeypatch, rule, cfg_scale):
    """Scoring the candidates a chunk at a time changes nothing but memory: tokens, orders, step scores and
    content log-probs are bit-identical (the chosen position is forwarded alone whatever the chunking); a
    stochastic rule's log q reads every candidate's score, which the chunk's shape perturbs by float rounding."""
    labels, tokens = torch.tensor([0, 1, 2]), torch.randint(0, 32, (3, N), generator=torch.Generator().manual_seed(1))
    widths = []
    candidate_logits = model.candidate_logits
    monkeypatch.setattr(model, "candidate_logits", lambda *a: widths.append(a[4].shape[1]) or candidate_logits(*a))
    rows = 3 * (1 + (cfg_scale != 1.0))

    def run(chunk, forward=CachedForward):
        widths.clear()
        kw = dict(generator=torch.Generator().manual_seed(3), forward=forward,
                  candidate_chunk_mb=chunk_mb(chunk, rows))
        if rule == "gt_prob":  # extraction: teacher forcing, the score peeks at the answer
            return teacher_forced(model, tokens, labels, order="confidence", location=LocationRule(score="gt_prob"),
                                  **kw)
        return generate(model, labels, cfg_scale=cfg_scale, cfg_schedule="linear", top_k=8, location=RULES[rule], **kw)

    ref = run(N)
    assert max(widths) == N
    for chunk in (1, 3, N + 5):
        out = run(chunk)
        assert max(widths) == min(chunk, N)
        for k in ("tokens", "order", "scores", "logp"):
            assert torch.equal(out[k], ref[k]), k
        assert torch.equal(out["logq"], ref["logq"]) if rule in ("greedy", "gt_prob") else \
            torch.allclose(out["logq"], ref["logq"], rtol=0, atol=1e-4)
    uncached = run(3, UncachedForward)
    assert torch.equal(uncached["tokens"], ref["tokens"]) and torch.equal(uncached["order"], ref["order"])
    for k in ("scores", "logq", "logp"):
        assert torch.allclose(uncached[k], ref[k], rtol=0, atol=1e-4), k


@pytest.mark.parametrize("kind", ["max_prob", "margin", "neg_entropy", "gt_prob"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_location_scores_are_the_log_softmax_definitions(kind, dtype):
    """From one logsumexp (or one softmax) instead of a full log-softmax copy; the same float32 log-domain values."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 7, 300, generator=g) * 4).to(dtype)
    logits[0, 0] = 0.0  # flat: every score at its extreme
    gt = torch.randint(0, 300, (4, 7), generator=g)
    logp = F.log_softmax(logits.double(), -1)
    top2 = logp.topk(2, -1).values.exp()
    want = {"max_prob": logp.max(-1).values, "margin": torch.log((top2[..., 0] - top2[..., 1]).clamp_min(1e-12)),
            "neg_entropy": (logp.exp() * logp).sum(-1), "gt_prob": logp.gather(2, gt[..., None])[..., 0]}[kind]
    got = location_scores(logits, kind, gt)
    assert got.dtype == torch.float32
    # margin is log(p1 - p2): its rounding error is relative to the gap, which can be tiny
    assert torch.allclose(got.double(), want, rtol=1e-3 if kind == "margin" else 0, atol=1e-5)


def test_kv_cache_has_exactly_n_slots_and_a_decode_fills_them(model, monkeypatch):
    """N - 1 committed inputs and one candidate fill the N slots: no room is left over (it used to be 2N)."""
    caches = []
    new_cache = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda b: caches.append(new_cache(b)) or caches[-1])
    known = torch.zeros(2, N, dtype=torch.bool)
    known[:, :5] = True
    for kw in (dict(order="confidence", cfg_scale=2.0), dict(order="confidence", candidate_chunk_mb=chunk_mb(3, 2)),
               dict(order="policy", cfg_scale=2.0), dict(order="raster"),
               dict(order="confidence", known_tokens_BN=torch.zeros(2, N, dtype=torch.long), known_mask_BN=known)):
        generate(model, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0), **kw)
        assert caches[-1].length == N and all(k.shape[2] == N for k in caches[-1].k)

    tokens, order, labels = torch.randint(0, 32, (2, N)), torch.arange(N).expand(2, -1), torch.tensor([0, 1])
    cache = model.new_cache(2)
    model.prefill(cache, model.sequence_inputs(tokens, order[:, : N - 1], labels))
    last_tok, last_pos = tokens[:, N - 2], order[:, N - 2]
    with pytest.raises(ValueError, match="KV cache overflow: 17 > 16"):
        model.candidate_logits(cache, labels, last_tok, last_pos, order[:, N - 2:])


def test_next_position_is_a_model_option_and_old_checkpoints_keep_the_offset(tmp_path):
    """`relative` is the paper's encoding and the default, so a checkpoint written before the option loads as it was
    trained; `absolute` has no offset tables; an unknown name is one clear error."""
    torch.manual_seed(0)
    old = GPT(GPTConfig(grid_h=4, grid_w=4, vocab_size=32, num_classes=3, n_layer=1, n_head=2, d_model=32))
    cfg = {k: v for k, v in asdict(old.cfg).items() if k != "next_position"}  # as an older checkpoint has it
    save_checkpoint(tmp_path / "old.pt", {"config": cfg, "state_dict": old.state_dict()})
    loaded, _ = load_gpt(tmp_path / "old.pt")
    assert loaded.cfg.next_position == "relative"
    absolute = GPT(GPTConfig(grid_h=4, grid_w=4, vocab_size=32, num_classes=3, n_layer=1, n_head=2, d_model=32,
                             next_position="absolute"))
    assert not hasattr(absolute, "off_row") and absolute.num_params() < old.num_params()
    with pytest.raises(ValueError, match="next_position must be one of relative, absolute, both"):
        GPT(GPTConfig(next_position="offset"))


@pytest.mark.parametrize("head", ["shared", "own"])
def test_an_own_policy_head_leaves_the_trunk_to_the_content(head):
    """The policy loss reaches the trunk only through a shared head: with its own head it trains the head alone, so
    learning where to go costs the content nothing; the content loss still trains everything it did."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(grid_h=4, grid_w=4, vocab_size=32, num_classes=3, n_layer=2, n_head=2, d_model=32,
                      policy=True, next_position="both", policy_head=head))
    tokens, order = torch.randint(0, 32, (2, N)), sample_orders("random", 2, 4, 4, torch.Generator().manual_seed(0))
    _, _, logpi_BNN = m(tokens, order, torch.tensor([0, 1]), with_policy=True)
    torch.gather(logpi_BNN[:, :-1], 2, order[:, 1:, None]).sum().neg().backward()
    trunk = [p.grad for n, p in m.named_parameters() if n.startswith("blocks.")]
    policy = [p.grad for n, p in m.named_parameters() if n.startswith("policy_head")]
    assert all(g is not None and g.abs().sum() > 0 for g in policy)
    if head == "own":
        assert all(g is None for g in trunk)
    else:
        assert all(g is not None for g in trunk) and sum(g.abs().sum() for g in trunk) > 0


def test_a_checkpoint_without_policy_head_kind_loads_as_shared(tmp_path):
    """Checkpoints written before `policy_head` existed had a linear, shared head: they load as exactly that."""
    m = GPT(GPTConfig(grid_h=4, grid_w=4, vocab_size=32, num_classes=3, n_layer=1, n_head=2, d_model=32,
                      policy=True))
    cfg = asdict(m.cfg)
    del cfg["policy_head"]
    save_checkpoint(tmp_path / "old.pt", {"config": cfg, "state_dict": m.state_dict()})
    loaded, _ = load_gpt(tmp_path / "old.pt")
    assert loaded.cfg.policy_head == "shared" and isinstance(loaded.policy_head, torch.nn.Linear)
