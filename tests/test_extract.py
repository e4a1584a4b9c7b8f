"""Order extraction on a trained any-order model, the orders table, and OAR finetuning."""
import json
import shutil

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from oar_core.extract import extract_batch
from oar_core.figures import save_heatmaps
from oar_core.model import load_gpt, save_gpt
from oar_core.names import LocationRule
from oar_core.order_queries import closest_to_raster, first_positions, mean_step_heatmap, per_class
from oar_core.order_table import orders_for_ids
from oar_core.orders import is_permutation
from oar_core.params import ExtractParams
from oar_core.token_shards import load_tokens
from pipeline.extract_orders import run_extract
from tests.conftest import single_thread
from tests.fixtures_pipeline import tiny_train_params
from tests.reference_decode import UncachedForward
from tests.test_order_table import flip_data_pages

N = 49


@pytest.fixture(scope="module")
def orders_dir(any_order_model, tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("orders")
    with single_thread():
        summary = run_extract(ExtractParams(checkpoint=str(any_order_model[0]), out_dir=str(out), batch_size=128,
                                            location=LocationRule(score="gt_prob")), str(tiny_shards))
    assert summary["images"] == 512 + 128 and summary["parts_written"] == 3
    assert summary["tied_steps"] == 0 == summary["tied_step_fraction"]  # a trained model: no exact ties
    return out


def test_every_row_is_a_permutation_with_its_columns(orders_dir):
    df = pl.read_parquet(orders_dir / "*.parquet")
    assert len(df) == 640 and df["image_id"].n_unique() == 640
    order = torch.from_numpy(np.stack(df["permutation"].to_numpy()).astype(np.int64))
    assert is_permutation(order, N).all()
    schema = pq.read_schema(next(orders_dir.glob("*.parquet")))
    assert str(schema.field("permutation").type) == "list<element: uint16>"
    assert str(schema.field("step_scores").type) == "list<element: float>"
    for col in ("split", "shard", "label", "nll_extracted", "nll_random", "checkpoint_hash", "params_hash"):
        assert col in df.columns
    # greedy by ground-truth probability: the model's own order is easier than a random one
    assert df["nll_extracted"].mean() < df["nll_random"].mean()
    # step scores are log-probabilities of the chosen position's ground-truth token (gt_prob)
    scores = np.stack(df["step_scores"].to_numpy())
    assert (np.isfinite(scores) & (scores <= 0)).all() and (scores < 0).any()


def test_greedy_extraction_is_deterministic_and_equals_naive_reference(any_order_model, tiny_shards):
    model, _ = load_gpt(any_order_model[0])
    d = load_tokens(tiny_shards, "test")
    tokens = torch.from_numpy(d["tokens"][:6].astype(np.int64)).flatten(1)
    labels = torch.from_numpy(d["labels"][:6])
    for p in (ExtractParams().location, LocationRule(score="gt_prob")):  # the default (max_prob) and the oracle
        a, b = extract_batch(model, tokens, labels, p), extract_batch(model, tokens, labels, p)
        assert torch.equal(a["order"], b["order"]) and torch.equal(a["scores"], b["scores"])
        naive = extract_batch(model, tokens[:3], labels[:3], p, forward=UncachedForward)  # full forward per candidate
        assert torch.equal(naive["order"], a["order"][:3])
        assert torch.allclose(naive["scores"], a["scores"][:3], atol=1e-5)
        assert torch.allclose(naive["nll_bits"], a["nll_bits"][:3], atol=1e-5)


@pytest.mark.parametrize("rule", [LocationRule(score="max_prob"), LocationRule(score="neg_entropy", temperature=1.0,
                                                                                 top_k=3)])
def test_other_scores_and_topk_give_permutations(any_order_model, tiny_shards, rule):
    model, _ = load_gpt(any_order_model[0])
    d = load_tokens(tiny_shards, "test")
    tokens = torch.from_numpy(d["tokens"][:4].astype(np.int64)).flatten(1)
    out = extract_batch(model, tokens, torch.from_numpy(d["labels"][:4]),
                        rule, torch.Generator().manual_seed(0))
    assert is_permutation(out["order"], N).all()


def test_resume_skips_finished_parts_and_redoes_missing_ones(orders_dir, any_order_model, tiny_shards):
    p = ExtractParams(checkpoint=str(any_order_model[0]), out_dir=str(orders_dir), batch_size=128,
                      location=LocationRule(score="gt_prob"))  # the fixture's
    parts = sorted(orders_dir.glob("*.parquet"))
    before = {f.name: f.read_bytes() for f in parts}
    parts[0].unlink()
    with single_thread():
        s = run_extract(p, str(tiny_shards))
    assert s["parts_written"] == 1 and s["parts_skipped"] == 2
    assert {f.name: f.read_bytes() for f in sorted(orders_dir.glob("*.parquet"))} == before  # same rows, same bytes


def test_a_part_corrupt_under_an_intact_footer_is_named_by_finetune_and_redone(orders_dir, any_order_model,
                                                                               tiny_shards):
    p = ExtractParams(checkpoint=str(any_order_model[0]), out_dir=str(orders_dir), batch_size=128,
                      location=LocationRule(score="gt_prob"))  # the fixture's
    parts = sorted(orders_dir.glob("*.parquet"))
    before = {f.name: f.read_bytes() for f in parts}
    flip_data_pages(parts[1])
    with pytest.raises(ValueError, match=rf"{parts[1].name}: corrupt orders part"):
        orders_for_ids(orders_dir, load_tokens(tiny_shards, "train")["ids"], N)
    with single_thread():
        s = run_extract(p, str(tiny_shards))
    assert s["parts_written"] == 1 and s["parts_skipped"] == 2
    assert {f.name: f.read_bytes() for f in sorted(orders_dir.glob("*.parquet"))} == before


def test_workers_split_the_shards(any_order_model, tiny_shards, tmp_path):
    p = ExtractParams(checkpoint=str(any_order_model[0]), out_dir=str(tmp_path), batch_size=128)
    with single_thread():
        s = run_extract(p, str(tiny_shards), num_workers=4, worker_index=3)
    assert s["parts_written"] == 0  # three shards (2 train, 1 test): none is the fourth worker's
    with pytest.raises(ValueError, match="worker_index"):
        run_extract(p, str(tiny_shards), num_workers=2, worker_index=2)


def test_polars_queries_have_the_right_shapes(orders_dir, tmp_path):
    heat = mean_step_heatmap(orders_dir)
    assert heat.shape == (7, 7) and abs(heat.mean() - (N - 1) / 2) < 1e-9
    assert mean_step_heatmap(orders_dir, label=3).shape == (7, 7)
    pc = per_class(orders_dir)
    assert pc["label"].to_list() == list(range(10)) and pc["images"].sum() == 640
    close = closest_to_raster(orders_dir, n=5)
    assert len(close) == 5 and close["tau_to_raster"].is_sorted(descending=True)
    fp = first_positions(orders_dir)
    assert fp["count"].sum() == 640 and fp["position"].max() < N
    save_heatmaps({"all": heat}, tmp_path / "heat.png")
    assert (tmp_path / "heat.png").read_bytes()[:4] == b"\x89PNG"


def test_orders_table_checks_grid_and_coverage(orders_dir, tiny_shards):
    ids = load_tokens(tiny_shards, "train")["ids"]
    assert orders_for_ids(orders_dir, ids, N).shape == (512, N)
    with pytest.raises(ValueError, match="another grid"):
        orders_for_ids(orders_dir, ids, 64)
    with pytest.raises(ValueError, match="no extracted order"):
        orders_for_ids(orders_dir, ids + ["not-an-image"], N)


# the own head's stop-gradient has a fast unit test in test_model; that it learns from the orders is the slow part
@pytest.mark.parametrize("head", ["shared", pytest.param("own", marks=pytest.mark.slow)])
def test_finetune_lowers_nll_under_extracted_orders_and_learns_a_policy(any_order_model, orders_dir, tiny_shards,
                                                                         tmp_path, head):
    from pipeline.train import run_train

    p = tiny_train_params(tmp_path / "oar", order="given", init_from=str(any_order_model[0]), steps=60, lr=3e-3,
                          warmup_steps=5, random_mix=0.0, eval_every=60, policy_weight=1.0, policy_head=head)
    with single_thread():
        before = run_train(p.model_copy(update={"steps": 1, "lr": 1e-12, "min_lr": 0.0, "warmup_steps": 0}),
                           "before", str(tiny_shards), tmp_path / "runs", tmp_path / "dvclive",
                           orders_dir=str(orders_dir))
        after = run_train(p, "finetune", str(tiny_shards), tmp_path / "runs", tmp_path / "dvclive",
                          orders_dir=str(orders_dir))
    # the unpaid diagnostic along each test image's extracted order falls ...
    assert after["oracle_order_bits_per_token"] < before["oracle_order_bits_per_token"] - 0.02
    # ... and the new policy head learns where those orders go: its paid (valid) bound falls, and it names the
    # next position at least twice as often as a uniform guess over the unfilled positions would
    chance = sum(1 / (N - t) for t in range(N - 1)) / (N - 1)
    # (an own head reads the trunk through a stop-gradient and learns more slowly: about 1.9x chance in 60 steps)
    assert before["policy_top1_agreement"] < 1.5 * chance < {"shared": 2, "own": 1.75}[head] * chance \
        < after["policy_top1_agreement"]
    assert after["policy_location_bits_per_token"] < before["policy_location_bits_per_token"] - 0.2
    assert after["policy_bits_per_token"] < before["policy_bits_per_token"] - 0.5


def test_train_loss_is_the_content_loss_and_the_policy_loss_is_logged_apart(any_order_model, orders_dir,
                                                                              tiny_shards, tmp_path):
    """The training curve is the content loss (nats/token) in every stage: with a location policy it used to add
    policy_weight x the policy's loss (about 6 at weight 1), so finetuning looked worse than the model it started
    from."""
    import math

    from pipeline.train import run_train

    p = tiny_train_params(tmp_path / "oar", order="given", init_from=str(any_order_model[0]), steps=1, lr=1e-12,
                          min_lr=0.0, warmup_steps=0, random_mix=0.0, eval_every=1, log_every=1, policy_weight=50.0)
    with single_thread():
        s = run_train(p, "finetune", str(tiny_shards), tmp_path / "runs", tmp_path / "dvclive",
                      orders_dir=str(orders_dir))
    vocab = load_gpt(any_order_model[0])[0].cfg.vocab_size
    assert 0 < s["train_loss"] < math.log(vocab) + 1  # content only: at most about a uniform guess
    assert 1 < s["train_policy_loss"] < math.log(N)  # its own number: nats per location choice


def test_exact_ties_for_the_best_position_are_counted(any_order_model, tiny_shards, tmp_path):
    """With a zero output layer every candidate ties at every step that has a choice (the orders_dir fixture
    checks that a trained model has none); a sampled rule has no greedy steps to count."""
    model, _ = load_gpt(any_order_model[0])
    torch.nn.init.zeros_(model.head.weight)
    save_gpt(tmp_path / "flat.pt", model)
    p = ExtractParams(checkpoint=str(tmp_path / "flat.pt"), out_dir=str(tmp_path / "orders"), batch_size=128)
    with single_thread():
        s = run_extract(p, str(tiny_shards), only_parts=["test-000000"])
        topk = run_extract(p.model_copy(update={"location": LocationRule(score="gt_prob", temperature=1.0, top_k=3),
                                                 "out_dir": str(tmp_path / "topk")}),
                           str(tiny_shards), only_parts=["test-000000"])
    assert s["tied_steps"] == 128 * (N - 1) and s["tied_step_fraction"] == 1.0
    assert topk["tied_steps"] is None and topk["tied_step_fraction"] is None
    order = pl.read_parquet(tmp_path / "orders/*.parquet")["permutation"].to_list()
    assert len({tuple(o) for o in order}) == len(order)  # ties broken at random, not by raster index


def test_each_shard_draws_its_own_random_orders(any_order_model, tiny_shards, tmp_path):
    """Two shards holding the same images: the same greedy orders, but their random-order baselines differ
    (one generator reseeded alike for every shard gave every shard the same random orders)."""
    shutil.copytree(tiny_shards, tmp_path / "shards")
    shutil.copy(tmp_path / "shards/test-000000.tar", tmp_path / "shards/test-000001.tar")
    p = ExtractParams(checkpoint=str(any_order_model[0]), out_dir=str(tmp_path / "orders"), batch_size=128)
    with single_thread():
        run_extract(p, str(tmp_path / "shards"), only_parts=["test-000000", "test-000001"])
    a, b = (pl.read_parquet(tmp_path / f"orders/test-00000{i}.parquet") for i in (0, 1))
    assert a["permutation"].to_list() == b["permutation"].to_list()
    assert (a["nll_random"] != b["nll_random"]).all()


@pytest.mark.slow  # two torchrun processes: `pytest -m slow`
def test_torchrun_ranks_write_the_same_table_as_one_process(any_order_model, tiny_shards, tmp_path):
    """Two CPU ranks split the shards and write byte-identical parts to one process's; a stale part of a shard
    that no longer exists is removed once."""
    from tests.fixtures_pipeline import run_module, write_params

    p = ExtractParams(checkpoint=str(any_order_model[0]), out_dir="orders", batch_size=128)
    args = ["-m", "pipeline.extract_orders", "--shards", str(tiny_shards)]
    for name, launch in (("one", []), ("two", ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"])):
        (tmp_path / name / "orders").mkdir(parents=True)
        write_params(tmp_path / name / "params.yaml", extract_orders=p)
        (tmp_path / name / "orders" / "train-000099.parquet").write_bytes(b"from a shard that is gone")
        r = run_module(launch + args if launch else args[1:], tmp_path / name)
        assert r.returncode == 0, r.stderr[-2000:]
        written = [json.loads(ln.split(": ", 1)[1])["parts_written"] for ln in r.stdout.splitlines()
                   if ln.startswith("extract_orders: ")]
        assert sorted(written) == ([3] if name == "one" else [1, 2])  # the ranks split the work, not repeat it
    one, two = ({f.name: f.read_bytes() for f in sorted((tmp_path / d / "orders").iterdir())} for d in ("one", "two"))
    assert len(one) == 3 and one == two


def test_greedy_calibration_equals_the_teacher_forced_forward_along_the_orders_it_found(any_order_model, tiny_shards):
    """Confidence and accuracy from the decode loop vs one plain forward along the same (max_prob) orders."""
    from oar_core.calibration import greedy_calibration

    model, _ = load_gpt(any_order_model[0])
    d = load_tokens(tiny_shards, "test")
    tokens = torch.from_numpy(d["tokens"][:16].astype(np.int64)).flatten(1)
    labels = torch.from_numpy(d["labels"][:16])
    cal = greedy_calibration(model, tokens, labels, batch_size=8)
    order = extract_batch(model, tokens, labels, LocationRule(score="max_prob"))["order"]
    with torch.no_grad():
        logits_BNV, targets_BN = model(tokens, order, labels)
    prob_BNV = logits_BNV.float().softmax(-1)
    conf_BN, correct_BN = prob_BNV.amax(-1), (prob_BNV.argmax(-1) == targets_BN).float()
    assert cal["confidence"] == pytest.approx(conf_BN.mean().item(), abs=1e-5)
    assert cal["accuracy"] == pytest.approx(correct_BN.mean().item(), abs=1e-6)
    assert cal["accuracy_per_step"] == pytest.approx(correct_BN.mean(0).tolist(), abs=1e-6)
    assert 0.05 < cal["accuracy"] < 1.0  # a trained model: neither chance (1/64) nor perfect


def test_continuing_a_policy_checkpoint_with_another_head_kind_says_which(any_order_model, orders_dir, tiny_shards,
                                                                          tmp_path):
    import json

    from pipeline.train import build_model, run_train

    p = tiny_train_params(tmp_path / "oar", order="given", init_from=str(any_order_model[0]), steps=1,
                          warmup_steps=0, random_mix=0.0, eval_every=1, policy_weight=1.0)
    with single_thread():
        run_train(p, "finetune", str(tiny_shards), tmp_path / "runs", tmp_path / "dvclive", orders_dir=str(orders_dir))
    meta = json.loads((tiny_shards / "meta.json").read_text())
    again = p.model_copy(update={"init_from": str(tmp_path / "oar/model.pt")})
    assert build_model(again, meta).cfg.policy_head == "shared"
    with pytest.raises(ValueError, match=r"oar/model.pt has a 'shared' policy head.*policy_head: own"):
        build_model(again.model_copy(update={"policy_head": "own"}), meta)
