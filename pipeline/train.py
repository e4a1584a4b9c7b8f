"""Stage `train_*` / `finetune`: one training loop for every model: raster / random (any-order) / fixed-order
baselines and OAR finetuning.

Deterministic and exactly resumable: the batch, the orders and the dropout noise of step k depend only on
(seed, k), and the run checkpoint holds model + optimizer + step, so a killed run resumed from its last
checkpoint ends bit-identical to an uninterrupted one (on CPU). DDP-ready: under `torchrun` each rank takes
its slice of the same global batch (gloo on CPU, NCCL on CUDA).

    python -m pipeline.train --stage train_random          # any-order model
    torchrun --nproc_per_node 2 -m pipeline.train --stage train_raster   # DDP (gloo on CPU)"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from oar_core.checkpoint import load_checkpoint, save_checkpoint
from oar_core.live import log_stage
from oar_core.model import GPT, GPTConfig, load_gpt, save_gpt
from oar_core.nll import bits_along_orders, content_nll, policy_bits, policy_nll
from oar_core.order_table import extracted_by, orders_for_ids
from oar_core.orders import sample_orders
from oar_core.params import TrainParams
from oar_core.runtime import autocast, pick_device
from oar_core.storage import file_hash, join, list_files, remove_stale_temps
from oar_core.token_shards import load_meta, load_token_split
from oar_core.webds import list_shards
from pipeline._stage import stage_main

RESULT_NEUTRAL = {"log_every", "eval_every", "ckpt_every"}  # fields that do not change the trained weights


def input_hashes(p: TrainParams, shards: str, orders_dir: str | None) -> dict[str, str]:
    """Content hashes of everything a run reads besides its params: the token shards, the checkpoint it starts
    from and the orders table, so a killed run never resumes weights made from inputs that have since changed."""
    files = [join(shards, "meta.json"), *list_shards(shards, "train"), *list_shards(shards, "test")]
    if p.init_from:
        files.append(p.init_from)
    if p.order == "given":
        files += list_files(orders_dir, "*.parquet")
    return {f"{Path(f).parent.name}/{Path(f).name}": file_hash(f) for f in files}


def run_digest(p: TrainParams, inputs: dict[str, str]) -> str:
    """What a run's weights are a function of: its result-relevant params and the content of its inputs."""
    d = {k: v for k, v in p.model_dump(mode="json").items() if k not in RESULT_NEUTRAL}
    if d["policy_head"] == "shared":  # the head every run had before the key existed: their digests stay valid
        del d["policy_head"]
    return hashlib.sha256(json.dumps([d, inputs], sort_keys=True).encode()).hexdigest()[:16]


def lr_at(p: TrainParams, step: int) -> float:
    if step < p.warmup_steps:
        return p.lr * (step + 1) / p.warmup_steps
    frac = (step - p.warmup_steps) / max(1, p.steps - p.warmup_steps)
    return p.min_lr + 0.5 * (p.lr - p.min_lr) * (1 + math.cos(math.pi * min(1.0, frac)))


def make_optimizer(model: GPT, p: TrainParams) -> torch.optim.Optimizer:
    decay = [q for q in model.parameters() if q.dim() >= 2]
    no_decay = [q for q in model.parameters() if q.dim() < 2]
    groups = [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=p.lr, betas=(0.9, 0.95))


class OrderSource:
    """Orders for a batch of image indices: sampled per step, or each image's own extracted order with a
    fraction of random orders mixed in (constant, or annealed linearly from random_mix to random_mix_end)."""
    def __init__(self, p: TrainParams, H: int, W: int, given_NN: torch.Tensor | None):
        self.p, self.H, self.W, self.given_NN = p, H, W, given_NN

    def mix_at(self, step: int) -> float:
        p = self.p
        if p.random_mix_end is None:
            return p.random_mix
        return p.random_mix + (p.random_mix_end - p.random_mix) * step / max(1, p.steps - 1)

    def __call__(self, idx_B: torch.Tensor, g: torch.Generator, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(order_BN, given_B): given_B marks rows that follow their image's extracted order."""
        B = len(idx_B)
        if self.given_NN is None:
            return sample_orders(self.p.order, B, self.H, self.W, g), torch.zeros(B, dtype=torch.bool)
        order_BN = self.given_NN[idx_B].clone()
        mix_B = torch.rand(B, generator=g) < self.mix_at(step)
        order_BN[mix_B] = sample_orders("random", int(mix_B.sum()), self.H, self.W, g)
        return order_BN, ~mix_B


def build_model(p: TrainParams, meta: dict) -> GPT:
    if p.init_from:
        model, _ = load_gpt(p.init_from)
        c = model.cfg
        if (c.grid_h, c.grid_w, c.vocab_size) != (meta["grid_h"], meta["grid_w"], meta["codebook_size"]):
            raise ValueError(f"{p.init_from}: checkpoint grid {c.grid_h}x{c.grid_w}/vocab {c.vocab_size} does not "
                             f"match the shards ({meta['grid_h']}x{meta['grid_w']}/{meta['codebook_size']}); retrain "
                             f"it on these shards")
        if c.num_classes and c.num_classes != meta["num_classes"]:
            raise ValueError(f"{p.init_from}: checkpoint has {c.num_classes} classes, the shards "
                             f"{meta['num_classes']}; "
                             f"retrain it on these shards")
        if "model" in p.model_fields_set:  # the architecture comes from the checkpoint; a different one asked for
            have = {"n_layer": c.n_layer, "n_head": c.n_head, "d_model": c.d_model, "mlp_ratio": c.mlp_ratio,
                    "dropout": c.dropout, "class_cond": c.num_classes > 0, "next_position": c.next_position}
            diff = [f"{k}: {getattr(p.model, k)} vs {v}" for k, v in have.items() if getattr(p.model, k) != v]
            if diff:
                raise ValueError(f"model ({', '.join(diff)} in {p.init_from}) differs from the init_from checkpoint, "
                                 f"whose architecture is what trains; remove `model` from this section or make it "
                                 f"match")
        if p.policy_weight > 0 and c.policy and c.policy_head != p.policy_head:
            raise ValueError(f"{p.init_from} has a {c.policy_head!r} policy head, this section asks for "
                             f"policy_head: {p.policy_head}; set it to {c.policy_head!r} or start from a checkpoint "
                             f"without a policy head")
        if p.policy_weight > 0 and not c.policy:  # add a fresh policy head to the pretrained trunk
            with_head = GPT(GPTConfig(**{**asdict(c), "policy": True, "policy_head": p.policy_head}))
            missing, _ = with_head.load_state_dict(model.state_dict(), strict=False)
            assert all(k.startswith(("query_emb", "policy_head")) for k in missing), missing
            model = with_head
        return model.train()
    m = p.model
    return GPT(GPTConfig(grid_h=meta["grid_h"], grid_w=meta["grid_w"], vocab_size=meta["codebook_size"],
                         num_classes=meta["num_classes"] if m.class_cond else 0, n_layer=m.n_layer, n_head=m.n_head,
                         d_model=m.d_model, mlp_ratio=m.mlp_ratio, dropout=m.dropout, policy=p.policy_weight > 0,
                         policy_head=p.policy_head, next_position=m.next_position))


def heldout_bits(model: GPT, tokens_NN, labels_N, p: TrainParams, device) -> float:
    """Bits per token on a fixed held-out subset under fixed orders, so values are comparable across steps: the
    model's own order for fixed-order models, uniform random orders otherwise (a valid any-order likelihood;
    an extracted order looks at the answer, so scoring under it unpaid would not be a likelihood)."""
    n = min(len(tokens_NN), p.eval_batches * p.batch_size)
    kind = "random" if p.order == "given" else p.order
    order_NN = sample_orders(kind, n, model.cfg.grid_h, model.cfg.grid_w, torch.Generator().manual_seed(p.seed + 1))
    bits = bits_along_orders(model, tokens_NN[:n], labels_N[:n], order_NN, p.batch_size, device)
    model.train()
    return bits


def given_order_metrics(model: GPT, tokens_NN, labels_N, order_NN, p: TrainParams, device) -> dict:
    """Held-out figures along the test images' extracted orders: the unpaid "oracle order" diagnostic and, with
    a policy head, the paid (valid) content + location bits and the policy's top-1 agreement."""
    n = min(len(tokens_NN), p.eval_batches * p.batch_size)
    args = (tokens_NN[:n], labels_N[:n], order_NN[:n])
    out = {"oracle_order_bits_per_token": bits_along_orders(model, *args, p.batch_size, device)}
    if model.cfg.policy:
        pb = policy_bits(model, *args, p.batch_size, device)
        out.update(policy_content_bits_per_token=pb["content"], policy_location_bits_per_token=pb["location"],
                   policy_bits_per_token=pb["total"], policy_top1_agreement=pb["top1"])
    model.train()
    return out


def check_orders_made_by(orders_dir: str, init_from: str, stage: str) -> None:
    """The orders table must be extracted by the checkpoint this run starts from: the orders are where that model
    is most sure, and another model's orders (an older any-order run, another init_from) would teach it those."""
    want = file_hash(init_from)
    for part, got in extracted_by(orders_dir).items():
        if got != want:
            made = f"by checkpoint {got}" if got else "by no recorded checkpoint (not written by extract_orders)"
            raise ValueError(f"{orders_dir}: orders extracted {made} ({part}), not by {stage}.init_from {init_from} "
                             f"({want}); rerun `dvc repro extract_orders` with extract_orders.checkpoint: "
                             f"{init_from}, or point {stage}.init_from at the checkpoint that made them")


def check_finite(model: GPT, losses: list[tuple[int, torch.Tensor]], p: TrainParams, stage: str, world: int):
    """Stop at the first step whose loss (on any process) is not finite, or when the weights are: the update has
    made them NaN/inf, and every later step and checkpoint would carry them. One sync per log / eval / checkpoint
    step rather than one per step, and before any of them, so no checkpoint or model file holds such weights."""
    loss_S = torch.stack([loss.float() for _, loss in losses])
    if world > 1:  # every process stops at the same step (a NaN on one rank reaches all through the gradients)
        dist.all_reduce(loss_S)
    bad = (~torch.isfinite(loss_S)).nonzero()
    fix = (f"lower {stage}.lr (now {p.lr}), or raise {stage}.warmup_steps (now {p.warmup_steps}) or lower "
           f"{stage}.grad_clip (now {p.grad_clip}); no checkpoint of this run holds the diverged weights")
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"loss is {float(loss_S[i])} at step {losses[i][0]}: training diverged; {fix}")
    if not torch.stack([q.isfinite().all() for q in model.parameters()]).all():  # an inf gradient, a finite loss
        raise ValueError(f"weights are not finite after step {losses[-1][0]} (a gradient overflowed): training "
                         f"diverged; {fix}")


def run_train(p: TrainParams, stage: str, shards: str, runs_dir: str = "runs", live_dir: str = "dvclive", *,
              orders_dir: str | None = None) -> dict:
    """Train, then log the summary and the step-wise train loss / held-out bits per token to DVCLive's
    `<live_dir>/<stage>/` (metrics.json, plots/metrics/*.tsv; oar_core.live), from rank 0 only."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = pick_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if p.batch_size % world:
            raise ValueError(f"{stage}.batch_size ({p.batch_size}) must be divisible by the number of processes "
                             f"({world})")
    is_main = rank == 0

    meta = load_meta(shards)
    H, W = meta["grid_h"], meta["grid_w"]
    train_NN, train_labels, train_ids = load_token_split(shards, "train")
    test_NN, test_labels, test_ids = load_token_split(shards, "test")
    given_train = given_test = None
    if p.order == "given":

        if not orders_dir:
            raise ValueError("order 'given' needs the orders table: pass --orders-dir or set extract_orders.out_dir")

        given_train = orders_for_ids(orders_dir, train_ids, H * W)
        given_test = orders_for_ids(orders_dir, test_ids, H * W, missing_ok=True)
        if p.init_from:
            check_orders_made_by(orders_dir, p.init_from, stage)
    train_orders = OrderSource(p, H, W, given_train)

    torch.manual_seed(p.seed)
    model = build_model(p, meta).to(device)
    opt = make_optimizer(model, p)
    run_ckpt = Path(runs_dir) / stage / "last.pt"
    digest, start, history = run_digest(p, input_hashes(p, shards, orders_dir)), 0, {"loss": [], "test_bits": []}
    if is_main:
        remove_stale_temps(run_ckpt.parent)  # a kill during a checkpoint write leaves its temp file behind
    if run_ckpt.exists():
        # safetensors, read before its digest is compared: a file planted here is refused, never executed
        state = load_checkpoint(run_ckpt, "run checkpoint", fix="delete it (the run then starts over)")
        if not isinstance(state, dict) or not {"digest", "model", "opt", "step", "history"} <= state.keys():
            raise ValueError(f"{run_ckpt}: not a run checkpoint of this stage (no digest/model/opt/step/history); "
                             f"delete it (the run then starts over)")
        if state["digest"] == digest and state["step"] < p.steps:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            start, history = state["step"], state["history"]
            if is_main:
                print(f"[{stage}] resuming from {run_ckpt} at step {start}/{p.steps}", flush=True)
        elif is_main:
            print(f"[{stage}] ignoring {run_ckpt}: from a finished run, other params or other inputs (shards, "
                  f"init_from, orders); starting fresh", flush=True)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    def checkpoint(step: int):
        if is_main:
            # the optimizer state's int keys and tuples survive exactly (tensor_tree): the resume is bit-identical
            save_checkpoint(run_ckpt, {"digest": digest, "model": model.state_dict(), "opt": opt.state_dict(),
                                       "step": step, "history": history})

    local_B = p.batch_size // world
    bar = tqdm(range(start, p.steps), initial=start, total=p.steps, desc=stage, disable=not is_main, mininterval=2)
    t0, tokens_seen, unchecked = time.time(), 0, []  # unchecked: (step, loss) not yet checked finite
    policy_value = None  # the location policy's last logged loss (nats/step), when it trains one
    for step in bar:
        g = torch.Generator().manual_seed(p.seed * 1_000_003 + step)
        torch.manual_seed(p.seed * 1_000_003 + step)  # dropout noise, per step
        idx_B = torch.randint(len(train_NN), (p.batch_size,), generator=g)
        order_BN, given_B = train_orders(idx_B, g, step)
        labels_B = train_labels[idx_B].clone()
        labels_B[torch.rand(p.batch_size, generator=g) < p.cfg_dropout] = model.null_class
        mine = slice(rank * local_B, (rank + 1) * local_B)
        for group in opt.param_groups:
            group["lr"] = lr_at(p, step)
        with autocast(device):  # through forward(), which is where DDP hooks its gradient sync
            out = ddp_model(train_NN[idx_B][mine].to(device), order_BN[mine].to(device), labels_B[mine].to(device),
                            with_policy=p.policy_weight > 0)
            content = loss = content_nll(out[0], out[1], reduction="mean")
            if p.policy_weight > 0:  # learn where the extracted orders go next (random-order rows carry no signal)
                logpi_BNN, mask_B = out[2], given_B[mine].to(device)
                nll_BN = policy_nll(logpi_BNN, order_BN[mine].to(device))
                rows = (mask_B.sum() * nll_BN.shape[1]).clamp_min(1)
                policy = (nll_BN * mask_B[:, None]).sum() / rows
                loss = content + p.policy_weight * policy
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        opt.step()
        tokens_seen += p.batch_size * H * W
        unchecked.append((step + 1, loss.detach()))
        if step + 1 == p.steps or any((step + 1) % k == 0 for k in (p.log_every, p.eval_every, p.ckpt_every)):
            check_finite(model, unchecked, p, stage, world)  # before anything is logged or saved
            unchecked.clear()
        if (step + 1) % p.log_every == 0 or step + 1 == p.steps:
            # the curve is the content loss, comparable across stages; the policy's loss is on another scale
            loss_value, rate = content.item(), tokens_seen / (time.time() - t0)
            history["loss"].append((step + 1, loss_value))
            policy_value = policy.item() if p.policy_weight > 0 else None
            bar.set_postfix(loss=f"{loss_value:.3f}", **({"policy_loss": f"{policy_value:.3f}"} if policy_value
                                                         is not None else {}), tok_s=f"{rate:,.0f}")
        if (step + 1) % p.eval_every == 0 or step + 1 == p.steps:
            history["test_bits"].append((step + 1, heldout_bits(model, test_NN, test_labels, p, device)))
        if (step + 1) % p.ckpt_every == 0 or step + 1 == p.steps:
            checkpoint(step + 1)
    bar.close()

    summary = {}
    if is_main:
        elapsed = time.time() - t0
        out = Path(p.out_dir) / "model.pt"
        save_gpt(out, model, stage=stage, order=p.order, digest=digest, steps=p.steps)
        summary = {"steps": p.steps, "order": p.order, "params": model.num_params(),
                   "train_loss": history["loss"][-1][1] if history["loss"] else None,
                   **({"train_policy_loss": policy_value} if p.policy_weight > 0 and policy_value is not None else {}),
                   "test_bits_per_token": history["test_bits"][-1][1] if history["test_bits"] else None,
                   "tokens_per_s": round(tokens_seen / elapsed) if tokens_seen else None}
        if given_test is not None:
            summary.update(given_order_metrics(model, test_NN, test_labels, given_test, p, device))
        # the whole history (kept in the run checkpoint) at once: a resumed run logs the same bytes
        log_stage(Path(live_dir) / stage, summary,
                  {"train_loss": history["loss"], "test_bits_per_token": history["test_bits"]})
        run_ckpt.unlink(missing_ok=True)  # finished: a later run with new code must not "resume" it
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def main(argv=None):
    return stage_main(__doc__, None, lambda p, a: run_train(p, a.stage, a.shards, a.runs_root, a.live_root,
                                                             orders_dir=a.orders_dir), argv, _args)


def _args(ap):
    ap.add_argument("--shards", help="default: tokenize.out of params.yaml")
    ap.add_argument("--orders-dir", help="default: extract_orders.out_dir of params.yaml (order: given)")


if __name__ == "__main__":
    main()
