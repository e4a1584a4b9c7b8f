"""The known-answer benchmark: Sudoku boards as images, where the generation order is known to matter.

    python -m bench.sudoku                                   # 3 seeds, 6x6 boards, the full comparison
    python -m bench.sudoku --next-position relative --tag relative --arms raster any oar_max_prob
    python -m bench.sudoku --seeds 0 --steps 60 --finetune-steps 20 --n-boards 20 --max-train 300 --tag smoke

Data: `builtin:sudoku6` (or --board 9) through the pipeline's own stages: ingest draws the boards as images, the
glyph tokenizer maps every cell to its digit (exact), tokenize writes the shards. Every model gets
`steps + finetune_steps` gradient steps of batch 64 (the budget is printed with the table):
    raster         raster order throughout
    any            random order for `steps`, then `finetune_steps` more random-order steps
    rar            any-order for `steps`, then `finetune_steps` in raster order (RAR-style control: specialising
                   to one fixed order, not a learned one)
    oar_<score>    any-order for `steps`; orders extracted with `<score>` (gt_prob looks at the answer; max_prob and
                   margin are the sampler's own rule); `finetune_steps` on them with a location-policy head
Samplers reuse those models. Per (seed, sampler), exact checks (oar_core.sudoku): unconditional boards (sampled
digits, temperature 1) -> fraction valid, mean violated units, fraction copied from train; completion of held-out
boards from k clues (the most probable digit each step; the location by the sampler; a raster-trained model forces
the clues along raster, an any-order model takes them as known context first) -> fraction valid and agreeing with
every clue; the fraction of completion steps whose cell had exactly one digit left by the rules ("forced"); and
held-out bits/token of the sampler as it samples (valid: exact for deterministic rules, a bound otherwise).
Resumable: models, orders and each (seed, sampler) result are kept under --workdir/<tag>/; a rerun skips what is
done. Table: mean ± std over seeds, written to bench/sudoku_<tag>.md after every result.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from bench.quality import Timer, cell, cwd, prepare_data, trained

SIZES = {"tiny": (2, 2, 64), "small": (3, 4, 96), "default": (4, 4, 128)}
ARMS = ["raster", "any", "oar_gt_prob", "rar", "oar_max_prob", "oar_margin"]
DEFAULT_ARMS = ["raster", "any", "oar_gt_prob", "rar", "oar_max_prob"]


def samplers(arms: list[str]) -> list[tuple[str, str, str, dict, str]]:
    """(name, model arm, order, location rule, completion mode) of every sampler of the chosen arms."""
    out = []
    if "raster" in arms:
        out.append(("raster", "raster", "raster", {}, "forced"))
    if "any" in arms:
        out += [("any-order-random", "any", "random", {}, "known"),
                ("any-order-halton", "any", "halton", {}, "known"),
                ("any-order-raster", "any", "raster", {}, "known"),  # completion: the fair fixed-order baseline
                ("any-order-max_prob", "any", "confidence", {"score": "max_prob"}, "known"),
                ("any-order-margin", "any", "confidence", {"score": "margin"}, "known")]
    if "rar" in arms:
        out.append(("rar-raster", "rar", "raster", {}, "known"))
    for arm in arms:
        if arm.startswith("oar_"):
            score = "margin" if arm == "oar_margin" else "max_prob"  # its own rule; gt_prob is extraction only
            out += [(f"{arm}-greedy", arm, "confidence", {"score": score}, "known"),
                    (f"{arm}-gumbel", arm, "confidence", {"score": score, "temperature": 1.0, "anneal": "linear"},
                     "known"),
                    (f"{arm}-policy", arm, "policy", {}, "known")]
    return out


def train_section(a, order: str, out_dir: str, steps: int, seed: int, **extra) -> dict:
    n_layer, n_head, d_model = SIZES[a.size]
    every = max(1, steps // 4)
    return {"order": order, "out_dir": out_dir, "steps": steps, "seed": seed,
            "model": {"n_layer": n_layer, "n_head": n_head, "d_model": d_model, "class_cond": False,
                      "next_position": a.next_position},
            "warmup_steps": min(100, steps // 10), "eval_every": every, "ckpt_every": every, "log_every": every,
            "cfg_dropout": 0.0, **extra}


def params_for(a, seed: int, common: Path) -> dict:
    """One seed's params.yaml (the same file `params-sudoku.yaml` runs the DAG with, at the bench's sizes)."""
    S, F = a.steps, a.finetune_steps
    ft = dict(lr=3e-4, min_lr=3e-5, warmup_steps=min(50, F // 10))
    return {
        "ingest": {"source": f"builtin:sudoku{a.board if a.board != 9 else ''}", "image_size": 8 * a.board,
                   "max_train": a.max_train, "max_test": a.max_test, "out_dir": str(common / "data/ingest")},
        "tokenizer": {"kind": "glyph", "grid": a.board},
        "tokenize": {"out": str(common / "data/shards")},
        "train_raster": train_section(a, "raster", "models/raster", S + F, seed),
        "train_random": train_section(a, "random", "models/random", S, seed),
        "extract_orders": {"checkpoint": "models/random/model.pt", "out_dir": "data/orders", "seed": seed},
        "finetune": train_section(a, "given", "models/oar", F, seed, init_from="models/random/model.pt",
                                  random_mix=a.random_mix, policy_weight=1.0, **ft),
        "sample": {"tokenizer": str(common / "models/tokenizer.pt"), "seed": seed, "cfg_scale": 1.0},
        "evaluate": {"seed": seed},
    }


def run_common(a, common: Path, timer: Timer) -> None:
    prepare_data(params_for(a, 0, common), common, timer)  # the boards, the glyph tokenizer, the token shards


def train_jobs(a, p) -> list[tuple[str, object, str | None, str | None, str | None]]:
    """(what, params, stage or None for an extraction, orders dir, the arm it completes) in dependency order."""
    jobs = []
    if "raster" in a.arms:
        jobs.append(("train raster", p.train_raster, "train_raster", None, "raster"))
    if set(a.arms) - {"raster"}:
        jobs.append(("train any-order", p.train_random, "train_random", None, None))
    ft = p.finetune
    if "any" in a.arms:
        jobs.append(("continue any-order", ft.model_copy(update={
            "order": "random", "random_mix": 0.0, "policy_weight": 0.0, "out_dir": "models/any"}), "finetune_any",
            None, "any"))
    if "rar" in a.arms:
        jobs.append(("finetune any-order on raster (RAR control)", ft.model_copy(update={
            "order": "raster", "random_mix": 0.0, "policy_weight": 0.0, "out_dir": "models/rar"}), "finetune_rar",
            None, "rar"))
    for arm in a.arms:
        if arm.startswith("oar_"):
            score = arm[4:]
            ex = p.extract_orders.model_copy(update={"out_dir": f"data/orders_{score}",
                                                     "location": p.extract_orders.location.model_copy(
                                                         update={"score": score})})
            jobs += [(f"extract orders ({score})", ex, None, None, None),
                     (f"finetune OAR on {score} orders", ft.model_copy(update={"out_dir": f"models/{arm}"}),
                      f"finetune_{arm}", ex.out_dir, arm)]
    return jobs


def checkpoint_of(arm: str) -> str:
    return {"raster": "models/raster/model.pt", "any": "models/any/model.pt", "rar": "models/rar/model.pt"}.get(
        arm, f"models/{arm}/model.pt")


def evaluate_sampler(a, model, name: str, order: str, loc: dict, mode: str, seed: int, test_NN, train_NN,
                     device) -> dict:
    import torch

    from oar_core import sudoku
    from oar_core.checkable import complete
    from oar_core.decode import generate
    from oar_core.likelihood import sampler_nll
    from oar_core.names import LocationRule

    n, N = a.board, a.board * a.board
    rule = LocationRule(**loc)
    g = torch.Generator().manual_seed(seed)
    m: dict = {}
    t0 = time.time()
    with torch.no_grad():
        res = generate(model, torch.zeros(a.n_boards, dtype=torch.long), order=order, location=rule, generator=g)
    m["boards_per_s"] = round(a.n_boards / (time.time() - t0), 1)
    m.update(sudoku.board_metrics(res["tokens"], n, train_NN))
    m["forced_cell_steps_generated"] = float(sudoku.forced_steps(res["tokens"], res["order"], n).float().mean())
    truth_BN = torch.as_tensor(test_NN[:a.n_boards]).long()
    for k in sudoku.clue_counts(n):
        clues_BN = sudoku.clue_masks(len(truth_BN), N, k, seed)
        out = complete(model, truth_BN, clues_BN, order, rule, clue_forced=mode == "forced",
                       generator=torch.Generator().manual_seed(seed))
        c = sudoku.completion_metrics(out["tokens"], truth_BN, clues_BN, n)
        m[f"solved_{k}"], m[f"equal_{k}"] = c["solved_fraction"], c["equal_to_heldout"]
        f_BN = sudoku.forced_steps(out["tokens"], out["order"], n)
        m[f"forced_{k}"] = float(f_BN[~clues_BN.gather(1, out["order"])].float().mean())
    meta = {"order": order, "location": rule.model_dump()}
    with torch.no_grad():
        m["nll_bits_per_token"], m["nll_how"] = sampler_nll(
            model, meta, torch.as_tensor(test_NN[:a.n_boards]).long(), torch.zeros(a.n_boards, dtype=torch.long),
            n_orders=2, batch_size=250, seed=seed, device=device)
    return m


def order_diagnostics(a, seed_dir: Path, shards: str, test_NN) -> dict:
    """Do the extracted orders fill forced cells first? The fraction of steps whose cell had exactly one digit left
    by the rules, along each extracted (test-split) orders table, against raster and random orders of the same
    boards; and each order's Kendall tau to raster."""
    import numpy as np
    import torch

    from oar_core import sudoku
    from oar_core.order_table import orders_for_ids
    from oar_core.orders import kendall_tau_to_raster, sample_orders
    from oar_core.token_shards import load_token_split

    n = a.board
    _, _, ids = load_token_split(shards, "test")
    tok_BN = torch.as_tensor(test_NN).long()
    B = len(tok_BN)
    g = torch.Generator().manual_seed(0)
    ref = {"raster": sample_orders("raster", B, n, n), "random": sample_orders("random", B, n, n, g),
           "solver": sudoku.solver_orders(tok_BN, n, g)}
    out = {k: float(sudoku.forced_steps(tok_BN, o, n).float().mean()) for k, o in ref.items()}
    # the same with the completion's first clue count placed first: how high "forced" can go (solver) in completion
    k = sudoku.clue_counts(n)[0]
    clues_BN = sudoku.clue_masks(B, n * n, k, 0)
    ref = {"raster": sudoku.clues_first(ref["raster"], clues_BN), "random": sudoku.clues_first(ref["random"], clues_BN),
           "solver": sudoku.solver_orders(tok_BN, n, g, clues_BN)}
    out.update({f"{name}_{k}_clues": float(sudoku.forced_steps(tok_BN, o, n)[:, k:].float().mean())
                for name, o in ref.items()})
    for d in sorted(seed_dir.glob("data/orders_*")):
        order_BN = orders_for_ids(str(d), ids, n * n, missing_ok=True)
        if order_BN is None:
            continue
        out[d.name.removeprefix("orders_")] = float(sudoku.forced_steps(tok_BN, order_BN, n).float().mean())
        out[f"{d.name.removeprefix('orders_')}_tau"] = float(np.mean([kendall_tau_to_raster(o) for o in order_BN[:50]]))
    return out


def run_seed(a, seed: int, common: Path, timer: Timer, report) -> dict:
    import torch

    from oar_core.model import load_gpt
    from oar_core.params import load_params
    from oar_core.storage import file_hash, write_json
    from oar_core.token_shards import load_token_split
    from pipeline.extract_orders import run_extract
    from pipeline.train import run_train

    shards = str(common / "data/shards")
    root = Path(a.workdir) / f"seed_{seed}"
    with cwd(root):
        Path("params.yaml").write_text(yaml.safe_dump(params_for(a, seed, common)))
        p = load_params("params.yaml")
        test_NN = load_token_split(shards, "test")[0]
        train_NN = load_token_split(shards, "train")[0]
        results = {}
        device = torch.device("cpu")
        for what, tp, stage, orders_dir, arm in train_jobs(a, p):
            if stage is None:
                with timer(f"seed {seed}: {what}"):
                    ex = run_extract(tp, shards)
                if ex["images"]:
                    write_json(f"{tp.out_dir}/extract.json", ex)
                write_json("results/orders.json", order_diagnostics(a, root, shards, test_NN))
                continue
            if not trained(f"{tp.out_dir}/model.pt", tp, shards, orders_dir):
                with timer(f"seed {seed}: {what} ({tp.steps} steps)"):
                    run_train(tp, stage, shards, orders_dir=orders_dir)
            # this model's samplers now, so a partial run's table already compares what is trained
            for name, s_arm, order, loc, mode in samplers(a.arms):
                if s_arm != arm:
                    continue
                out = Path("results") / f"{name}.json"
                made_from = {"checkpoint": file_hash(checkpoint_of(arm)), "order": order, "location": loc,
                             "mode": mode, "n_boards": a.n_boards}
                if out.exists() and json.loads(out.read_text()).get("made_from") == made_from:
                    results[name] = json.loads(out.read_text())
                    continue
                with timer(f"seed {seed}: {name}"):
                    model, _ = load_gpt(checkpoint_of(arm), device)
                    m = evaluate_sampler(a, model, name, order, loc, mode, seed, test_NN, train_NN, device)
                m["made_from"] = made_from
                write_json(out, m)
                results[name] = m
                report()
        return results


def table(a) -> str:
    from oar_core import sudoku

    n_layer, _, d_model = SIZES[a.size]
    k1, k2 = sudoku.clue_counts(a.board)
    per_seed = {}
    seeds = sorted(set(a.seeds) | {int(d.name[5:]) for d in Path(a.workdir).glob("seed_*")})
    for s in seeds:
        res_dir = Path(a.workdir) / f"seed_{s}" / "results"
        per_seed[s] = {f.stem: json.loads(f.read_text()) for f in res_dir.glob("*.json")} if res_dir.is_dir() else {}
    done = {s: sum(1 for k in per_seed[s] if k != "orders") for s in seeds}
    cols = [("valid_fraction", "valid boards"), ("violated_units", f"violated units (of {3 * a.board})"),
            ("copied_from_train", "copied"), (f"solved_{k1}", f"solved, {k1} clues"),
            (f"solved_{k2}", f"solved, {k2} clues"), (f"forced_{k1}", f"forced steps, {k1} clues"),
            ("nll_bits_per_token", "NLL bits/token (valid)")]
    lines = [f"Sudoku {a.board}x{a.board} ({a.max_train} train / {a.max_test} test boards, glyph tokenizer: one token "
             f"per cell), {n_layer}-layer d={d_model} models, next_position {a.next_position}, seeds {seeds}. "
             f"Budget: every model {a.steps}+{a.finetune_steps} = {a.steps + a.finetune_steps} gradient steps of "
             f"batch 64 (OAR also pays an order extraction over the train boards, not counted in steps). "
             f"{a.n_boards} generated boards (temperature 1) and {a.n_boards} held-out boards completed per "
             f"sampler and clue count (the most probable digit per step). Mean ± std over the seeds done: "
             + ", ".join(f"seed {s}: {done[s]} samplers" for s in seeds) + ".", "",
             "| sampler | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, *_ in samplers(ARMS):  # every arm with results: one process per arm group may share a tag
        rows = [per_seed[s][name] for s in seeds if name in per_seed[s]]
        if rows:
            label = name if len(rows) == len(seeds) else f"{name} ({len(rows)} of {len(seeds)} seeds)"
            lines.append(f"| {label} | " + " | ".join(cell([r[k] for r in rows if k in r]) for k, _ in cols) + " |")
    diag = [per_seed[s]["orders"] for s in seeds if "orders" in per_seed[s]]
    if diag:
        keys = [k for k in diag[0] if not k.endswith("_tau")]
        lines += ["", "Forced cells first? Fraction of steps whose cell had exactly one digit left by the rules, along "
                      "the orders on the held-out boards themselves (teacher-forced): "
                  + ", ".join(f"{k} {cell([d[k] for d in diag if k in d])}" for k in keys)
                  + ". Kendall tau to raster: " + ", ".join(
                      f"{k[:-4]} {cell([d[k] for d in diag if k in d])}" for k in diag[0] if k.endswith("_tau"))
                  + "."]
    for arm in [x for x in ARMS if x.startswith("oar_")]:
        pol = [json.loads(f.read_text()) for s in seeds
               for f in [Path(a.workdir) / f"seed_{s}/dvclive/finetune_{arm}/metrics.json"] if f.exists()]
        pol = [m for m in pol if "policy_top1_agreement" in m]
        if pol:
            N = a.board * a.board
            chance = sum(1 / (N - t) for t in range(N - 1)) / (N - 1)
            lines += ["", f"{arm}: the location policy picks the extracted order's next cell (held-out boards, top-1) "
                          f"{cell([m['policy_top1_agreement'] for m in pol])} of the time (uniform {chance:.3f}); "
                          f"content along those orders {cell([m['policy_content_bits_per_token'] for m in pol])} "
                          f"bits/token, location {cell([m['policy_location_bits_per_token'] for m in pol])}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.sudoku", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--board", type=int, default=6, choices=[4, 6, 9])
    ap.add_argument("--steps", type=int, default=1500, help="any-order pretraining steps (raster gets steps+finetune)")
    ap.add_argument("--finetune-steps", type=int, default=500)
    ap.add_argument("--n-boards", type=int, default=200, help="generated and completed boards per sampler")
    ap.add_argument("--max-train", type=int, default=5000)
    ap.add_argument("--max-test", type=int, default=200)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--next-position", default="both", choices=["relative", "absolute", "both"])
    ap.add_argument("--random-mix", type=float, default=0.2, help="finetune.random_mix of the OAR arms")
    ap.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=ARMS)
    ap.add_argument("--workdir", default="/tmp/oar-bench-sudoku")
    ap.add_argument("--tag", default="default", help="results go to <workdir>/<tag> and bench/sudoku_<tag>.md")
    ap.add_argument("--table-only", action="store_true", help="only aggregate the results already on disk")
    ap.add_argument("--common-only", action="store_true", help="only make the boards and shards (then start one "
                    "process per seed: they share them)")
    a = ap.parse_args(argv)
    common, timer = Path(a.workdir).resolve() / f"common{a.board}_{a.max_train}_{a.max_test}", Timer()
    a.workdir = str(Path(a.workdir).resolve() / a.tag)
    out = Path(f"bench/sudoku_{a.tag}.md").resolve()

    def report():
        out.write_text(table(a))

    if not a.table_only:
        run_common(a, common, timer)
        for s in [] if a.common_only else a.seeds:
            run_seed(a, s, common, timer, report)
    md = table(a)
    out.write_text(md)
    print(md)
    print(f"[bench] table written to {out}")


if __name__ == "__main__":
    main()
