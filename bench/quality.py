"""Sample quality of raster vs any-order vs OAR at the same training budget, over seeds.

    python -m bench.quality                       # defaults: 2 seeds, 4-layer d=128 models, ~40 min on 2 CPU cores
    python -m bench.quality --seeds 0 --steps 60 --finetune-steps 20 --n-samples 100 --tiny   # smoke run

Runs the pipeline's own stage functions (not DVC) in a scratch workdir with a generated params.yaml per seed.
Shared by all seeds: ingest, tokenizer, tokenize, and the in-domain classifier (one feature space, so FIDs
are comparable across seeds). Per seed, every model gets `steps + finetune_steps` gradient steps:
    raster                 raster order, steps + finetune_steps
    any-order              random order, steps, then finetune_steps more random-order steps (same schedule as OAR)
    any-order-confidence   the any-order model, sampled in confidence order
    oar                    random order, steps; orders extracted; finetune_steps on the extracted orders
Prints mean ± std over seeds and writes the table as markdown (--out). Order extraction dominates the CPU cost
(~20 images/s for the default 4-layer d=128 model on one core), hence the 2000/500 image default.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import yaml

MODELS = ["raster", "any-order", "any-order-confidence", "oar"]
COLUMNS = [("fid_indomain", "FID (in-domain)", 2), ("kid_indomain", "KID (in-domain)", 4),
           ("is_indomain", "IS (in-domain)", 2), ("nll_bits_per_token", "NLL bits/token", 3)]


@contextlib.contextmanager
def cwd(path: Path):
    old = os.getcwd()
    path.mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def train_section(a, order: str, out_dir: str, steps: int, seed: int, **extra) -> dict:
    model = {"n_layer": 2, "n_head": 2, "d_model": 64} if a.tiny else {"n_layer": 4, "n_head": 4, "d_model": 128}
    every = max(1, steps // 4)
    return {"order": order, "out_dir": out_dir, "steps": steps, "seed": seed, "model": model,
            "warmup_steps": min(100, steps // 10), "eval_every": every, "ckpt_every": steps, "log_every": every,
            **extra}


def params_for(a, seed: int, common: Path) -> dict:
    """One seed's params.yaml: the pipeline defaults except sizes, seeds and paths."""
    S, F = a.steps, a.finetune_steps
    ft = dict(lr=3e-4, min_lr=3e-5, warmup_steps=min(50, F // 10))
    return {
        "ingest": {"max_train": a.max_train, "max_test": a.max_test, "out_dir": str(common / "data/ingest")},
        "tokenizer": {"steps": a.tokenizer_steps},
        "tokenize": {"out": str(common / "data/shards")},
        "train_raster": train_section(a, "raster", "models/raster", S + F, seed),
        "train_random": train_section(a, "random", "models/random", S, seed),
        "extract_orders": {"checkpoint": "models/random/model.pt", "out_dir": "data/orders", "seed": seed,
                           "score": a.score},
        "finetune": train_section(a, "given", "models/oar", F, seed, orders_dir="data/orders",
                                  init_from="models/random/model.pt", random_mix=a.random_mix, **ft),
        "sample": {"tokenizer": str(common / "models/tokenizer.pt"), "n_per_model": a.n_samples,
                   "batch_size": min(a.n_samples, 250), "seed": seed, "models": [
                       {"name": "raster", "checkpoint": "models/raster/model.pt", "order": "raster"},
                       {"name": "any-order", "checkpoint": "models/random_ft/model.pt", "order": "random"},
                       {"name": "any-order-confidence", "checkpoint": "models/random_ft/model.pt", "order": "confidence"},
                       {"name": "oar", "checkpoint": "models/oar/model.pt", "order": "confidence"}]},
        "evaluate": {"classifier": str(common / "classifier.pt"), "kid_subset_size": min(100, a.n_samples),
                     "inception_weights": a.inception_weights, "seed": seed},
    }


class Timer:
    def __init__(self):
        self.rows: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.time()
        yield
        self.rows.append((name, time.time() - t0))
        print(f"[bench] {name}: {self.rows[-1][1]:.0f}s", flush=True)


def run_common(a, common: Path, timer: Timer) -> None:
    """Data, tokenizer, shards and the in-domain classifier, once for all seeds (skipped when present)."""
    from oar_core.data import load_split, run_ingest
    from oar_core.metrics import classifier_accuracy, save_classifier, train_classifier
    from oar_core.params import load_params
    from oar_core.shards import run_tokenize
    from oar_core.tokenizer import run_tokenizer

    with cwd(common):
        Path("params.yaml").write_text(yaml.safe_dump(params_for(a, 0, common)))
        p = load_params("params.yaml")
        if not Path("data/ingest/manifest.json").exists():
            with timer("ingest"):
                run_ingest(p.ingest)
        if not Path("models/tokenizer.pt").exists():
            with timer("tokenizer"):
                run_tokenizer(p.tokenizer, "data/ingest", "models/tokenizer.pt", "metrics/tokenizer.json")
        if not Path("data/shards/meta.json").exists():
            with timer("tokenize"):
                run_tokenize(p.tokenize, "data/ingest", "models/tokenizer.pt")
        if not Path("classifier.pt").exists():
            with timer("in-domain classifier"):
                x, y, _ = load_split("data/ingest", "train")
                clf = train_classifier(x, y, a.classifier_steps, seed=0)
                xt, yt, _ = load_split("data/ingest", "test")
                save_classifier("classifier.pt", clf, steps=a.classifier_steps,
                                test_accuracy=classifier_accuracy(clf, xt, yt))


def run_seed(a, seed: int, common: Path, timer: Timer) -> dict:
    from oar_core.extract import run_extract
    from oar_core.metrics import run_evaluate
    from oar_core.params import load_params
    from oar_core.samples import run_sample
    from oar_core.train import run_train

    shards = str(common / "data/shards")
    with cwd(Path(a.workdir) / f"seed_{seed}"):
        Path("params.yaml").write_text(yaml.safe_dump(params_for(a, seed, common)))
        p = load_params("params.yaml")
        with timer(f"seed {seed}: train raster ({p.train_raster.steps} steps)"):
            run_train(p.train_raster, "train_raster", shards)
        with timer(f"seed {seed}: train any-order ({p.train_random.steps} steps)"):
            run_train(p.train_random, "train_random", shards)
        with timer(f"seed {seed}: extract orders"):
            run_extract(p.extract_orders, shards)
        with timer(f"seed {seed}: finetune OAR ({p.finetune.steps} steps)"):
            run_train(p.finetune, "finetune", shards)
        any_ft = p.finetune.model_copy(update={"order": "random", "orders_dir": None, "random_mix": 0.0,
                                               "out_dir": "models/random_ft"})
        with timer(f"seed {seed}: continue any-order ({any_ft.steps} steps)"):
            run_train(any_ft, "finetune_random", shards)
        with timer(f"seed {seed}: sample {len(MODELS)} x {p.sample.n_per_model}"):
            run_sample(p.sample)
        with timer(f"seed {seed}: evaluate"):
            run_evaluate(p.evaluate, "samples", str(common / "data/ingest"), shards, "data/orders",
                         str(common / "models/tokenizer.pt"))
        return json.loads(Path("metrics/evaluate.json").read_text())


def table(per_seed: dict[int, dict], a, clf_acc: float | None) -> str:
    """Markdown: one row per model, mean ± std over seeds per column."""
    def cell(vals, digits):
        if not vals:
            return "–"
        if len(vals) == 1:
            return f"{vals[0]:.{digits}f}"
        return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"

    seeds = sorted(per_seed)
    lines = [f"Fashion-MNIST, {a.max_train} train / {a.max_test} test images, seeds {seeds}, "
             f"{a.steps}+{a.finetune_steps} steps per model, orders by {a.score}, random_mix {a.random_mix}, {a.n_samples} samples per model; in-domain feature "
             f"space = small CNN classifier (test acc {clf_acc:.3f})." if clf_acc is not None else "", "",
             "| model | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for m in MODELS + ["real_reference"]:
        cells = [cell([per_seed[s][m][k] for s in seeds if k in per_seed[s].get(m, {})], d) for k, _, d in COLUMNS]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=600, help="any-order pretraining steps (raster gets steps+finetune)")
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--n-samples", type=int, default=300, help="generated images per model")
    ap.add_argument("--max-train", type=int, default=2000)
    ap.add_argument("--max-test", type=int, default=500)
    ap.add_argument("--tokenizer-steps", type=int, default=500)
    ap.add_argument("--classifier-steps", type=int, default=400)
    ap.add_argument("--score", default="gt_prob", choices=["gt_prob", "max_prob", "neg_entropy"],
                    help="extract_orders.score: how the any-order model ranks the next position")
    ap.add_argument("--random-mix", type=float, default=0.2, help="finetune.random_mix")
    ap.add_argument("--tiny", action="store_true", help="2-layer d=64 models (smoke runs)")
    ap.add_argument("--inception-weights", default=None, help="local Inception weights: adds standard FID/KID/IS")
    ap.add_argument("--workdir", default="/tmp/oar-bench-quality")
    ap.add_argument("--out", default="bench/quality.md")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    common, timer, t0 = Path(a.workdir).resolve() / "common", Timer(), time.time()
    a.workdir = str(Path(a.workdir).resolve())
    run_common(a, common, timer)
    per_seed = {s: run_seed(a, s, common, timer) for s in a.seeds}
    from oar_core.metrics import load_classifier

    md = table(per_seed, a, load_classifier(common / "classifier.pt")[1].get("test_accuracy"))
    md += f"\nWall time {time.time() - t0:.0f}s on {os.cpu_count()} CPU core(s); per stage:\n\n"
    md += "\n".join(f"- {name}: {sec:.0f}s" for name, sec in timer.rows) + "\n"
    print(md)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    print(f"[bench] table written to {out}")


if __name__ == "__main__":
    main()
