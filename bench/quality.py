"""Raster vs any-order vs OAR at an equal training budget, over seeds, with diversity and valid likelihoods.

    python -m bench.quality                                    # 3 seeds, 4-layer d=128 models
    python -m bench.quality --size small --tag small           # the same at a second model size
    python -m bench.quality --seeds 0 --steps 60 --finetune-steps 20 --n-samples 100 --size tiny --tag smoke

Every model gets `steps + finetune_steps` gradient steps of the same batch size:
    raster      raster order throughout
    any         random order for `steps`, then `finetune_steps` more random-order steps (any-order continued)
    rar         random order for `steps`, then `finetune_steps` on raster order: RAR's recipe, the control that
                separates "a learned order" from "specialising an any-order model to any one order"
    oar         random order for `steps`; orders extracted by `--score` (cost reported); `finetune_steps` on
                them, with a location-policy head learning them (policy_weight) and random_mix
    oar-gt      the same on orders extracted with `gt_prob` (the paper's; it looks at the answer)
Samplers reuse those models (sampling is cheap): each OAR model under its confidence rule (greedy, annealed
Gumbel), its learned policy, and random order; the any-order model in random, Halton and confidence order.
`--samplers` picks rows; only the models they need are trained.
Two reference rows bound the table: real images, and the same images through the tokenizer
(reconstructions: the floor no token model can beat).

Metrics live in an *independent* feature space: a CNN trained on all 60k Fashion-MNIST train images (not the
models' subset), FID/KID/precision/recall against the full 10k test set; real/reconstruction rows use 1000+
train images outside the models' subset. NLL is held-out bits/token of each sampler as it samples
(oar_core.likelihood: exact for deterministic rules, an upper bound over 2 drawn orders otherwise).
Resumable: trained models, the orders table and each (seed, sampler) result are kept under
--workdir/<tag>/; a rerun with the same arguments skips what is done. Table: mean ± std over seeds.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import yaml

SAMPLERS = [  # name, model, order, location rule
    ("raster", "raster", "raster", {}),
    ("rar", "rar", "raster", {}),
    ("any-order", "any", "random", {}),
    ("any-order-halton", "any", "halton", {}),
    ("any-order-gumbel", "any", "confidence", {"temperature": 1.0, "anneal": "linear"}),
    ("oar-greedy", "oar", "confidence", {}),
    ("oar-gumbel", "oar", "confidence", {"temperature": 1.0, "anneal": "linear"}),
    ("oar-policy", "oar", "policy", {"temperature": 1.0}),
    ("oar-policy-t0.5", "oar", "policy", {"temperature": 0.5}),
    ("oar-random", "oar", "random", {}),
    ("oar-gt-gumbel", "oar-gt", "confidence", {"temperature": 1.0, "anneal": "linear"}),
    ("oar-gt-policy", "oar-gt", "policy", {"temperature": 1.0}),
]
REFERENCE = ["real", "reconstruction"]
COLUMNS = [("fid", "FID", 2), ("kid", "KID", 4), ("precision", "precision", 3), ("recall", "recall", 3),
           ("nll_bits_per_token", "NLL bits/token (valid)", 3), ("location_bits_per_step", "location bits/step", 2)]
SIZES = {"tiny": (2, 2, 64), "small": (2, 4, 96), "default": (4, 4, 128)}


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
    n_layer, n_head, d_model = SIZES[a.size]
    every = max(1, steps // 4)
    return {"order": order, "out_dir": out_dir, "steps": steps, "seed": seed,
            "model": {"n_layer": n_layer, "n_head": n_head, "d_model": d_model, "next_position": a.next_position},
            "warmup_steps": min(100, steps // 10), "eval_every": every, "ckpt_every": every, "log_every": every,
            **extra}


def params_for(a, seed: int, common: Path) -> dict:
    """One seed's params.yaml: the pipeline defaults except sizes, seeds, paths and the `-S` overrides."""
    from bench.scale import parse_sets, set_key

    S, F = a.steps, a.finetune_steps
    ft = dict(lr=3e-4, min_lr=3e-5, warmup_steps=min(50, F // 10))
    params = {
        "ingest": {"max_train": a.max_train, "max_test": a.max_test, "out_dir": str(common / "data/ingest")},
        "tokenizer": {"steps": a.tokenizer_steps, "grid": getattr(a, "grid", 7)},  # bench.parallel sets the grid
        "tokenize": {"out": str(common / "data/shards")},
        "train_raster": train_section(a, "raster", "models/raster", S + F, seed),
        "train_random": train_section(a, "random", "models/random", S, seed),
        "extract_orders": {"checkpoint": "models/random/model.pt", "out_dir": "data/orders", "seed": seed,
                           "location": {"score": a.score}},
        "finetune": train_section(a, "given", "models/oar", F, seed,
                                  init_from="models/random/model.pt", random_mix=a.random_mix,
                                  random_mix_end=a.random_mix_end, policy_weight=a.policy_weight,
                                  policy_head=a.policy_head, **ft),
        "sample": {"tokenizer": str(common / "models/tokenizer.pt"), "n_per_model": a.n_samples,
                   "batch_size": min(a.n_samples, 250), "seed": seed, "cfg_scale": a.cfg_scale},
        "evaluate": {"nll_orders": 2, "seed": seed},
    }
    for key, value in parse_sets(a.sets).items():
        set_key(params, key, value)
    return params


class Timer:
    def __init__(self):
        self.rows: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.time()
        yield
        self.rows.append((name, time.time() - t0))
        print(f"[bench] {name}: {self.rows[-1][1]:.0f}s", flush=True)


def prepare_data(params: dict, common: Path, timer: Timer):
    """Ingest, tokenizer and token shards under `common` from a seed's params dict, each once (kept across runs);
    returns the validated params."""
    from oar_core.params import load_params
    from pipeline.ingest import run_ingest
    from pipeline.tokenize import run_tokenize
    from pipeline.tokenizer import run_tokenizer

    with cwd(common):
        Path("params.yaml").write_text(yaml.safe_dump(params))
        p = load_params("params.yaml")
        if not Path("data/ingest/manifest.json").exists():
            with timer("ingest"):
                run_ingest(p.ingest)
        if not Path("models/tokenizer.pt").exists():
            with timer("tokenizer"):
                run_tokenizer(p.tokenizer, "data/ingest", "models/tokenizer.pt", "dvclive/tokenizer")
        if not Path("data/shards/meta.json").exists():
            with timer("tokenize"):
                run_tokenize(p.tokenize, "data/ingest", "models/tokenizer.pt")
    return p


def run_common(a, common: Path, timer: Timer) -> None:
    """Data, tokenizer, shards, the independent feature space and the reference rows, once for all seeds."""
    from oar_core.feature_net import classifier_accuracy, save_classifier
    from oar_core.fidelity import reconstruct
    from oar_core.image_shards import SPLITS
    from oar_core.image_sources import ImageFormat, fashion_mnist_split
    from oar_core.tokenizer import load_tokenizer
    from pipeline.feature_net import train_classifier

    p = prepare_data(params_for(a, 0, common), common, timer)
    with cwd(common):
        if Path("reference.npz").exists():
            return
        with timer("independent feature space + reference rows"):
            (x_tr, y_tr), (x_te, y_te) = (
                (np.stack([im for im, _, _ in rows]), np.array([y for _, y, _ in rows]))
                for rows in (list(fashion_mnist_split(p.ingest.source, s, None, ImageFormat(28, 1))[1])
                             for s in SPLITS))
            clf = train_classifier(x_tr, y_tr, a.classifier_steps, seed=0)
            save_classifier("classifier.pt", clf, steps=a.classifier_steps,
                            test_accuracy=classifier_accuracy(clf, x_te, y_te))
            # images no model trained on, and the same images through the tokenizer
            unseen = np.random.default_rng(0).permutation(np.arange(a.max_train, len(x_tr)))[:a.n_samples]
            recon = reconstruct(load_tokenizer("models/tokenizer.pt"), x_tr[unseen])
            np.savez("reference.npz", test=x_te, real=x_tr[unseen], reconstruction=recon)


def evaluate_images(images, ref, common: Path, seed: int, cache: str) -> dict:
    from oar_core.feature_net import INDOMAIN_NAME
    from oar_core.fidelity import fidelity_metrics

    m = fidelity_metrics(images, ref, INDOMAIN_NAME, str(common / "classifier.pt"), 100, seed,
                         cache_dir=cache, real_cache_name="fmnist-test-10k")
    return {k: m[k] for k in ("fid", "kid", "kid_std", "precision", "recall", "is")}


def trained(path: str, p, shards: str, orders_dir: str | None = None) -> bool:
    from oar_core.checkpoint import load_checkpoint
    from pipeline.train import input_hashes, run_digest

    if not Path(path).exists():
        return False
    return load_checkpoint(path).get("digest") == run_digest(p, input_hashes(p, shards, orders_dir))


def run_seed(a, seed: int, common: Path, timer: Timer, ref: dict, cache: str, train: tuple[str, ...] = ()) -> dict:
    """One seed: trains the models its samplers need (and those named in `train`: raster, any, rar, oar, oar-gt),
    then samples and scores each sampler."""
    import torch

    from bench.helpers import sample_model
    from oar_core.figures import class_grid, save_png
    from oar_core.likelihood import sampler_nll
    from oar_core.model import load_gpt
    from oar_core.names import LocationRule
    from oar_core.params import SampleModelParams, load_params
    from oar_core.runtime import pick_device
    from oar_core.storage import file_hash, write_json
    from oar_core.token_shards import load_token_split
    from oar_core.tokenizer import load_tokenizer
    from pipeline.extract_orders import run_extract
    from pipeline.train import run_train

    shards = str(common / "data/shards")
    root = Path(a.workdir) / f"seed_{seed}"
    with cwd(root):
        Path("params.yaml").write_text(yaml.safe_dump(params_for(a, seed, common)))
        p = load_params("params.yaml")
        cont = {"random_mix": 0.0, "random_mix_end": None, "policy_weight": 0.0}
        any_ft = p.finetune.model_copy(update={"order": "random", "out_dir": "models/random_ft", **cont})
        rar_ft = p.finetune.model_copy(update={"order": "raster", "out_dir": "models/rar", **cont})
        gt_ex = p.extract_orders.model_copy(update={"out_dir": "data/orders_gt",
                                                    "location": LocationRule(score="gt_prob")})
        gt_ft = p.finetune.model_copy(update={"out_dir": "models/oar_gt"})
        jobs = {"raster": [("train raster", p.train_raster, "train_raster", None)],
                "any": [("continue any-order", any_ft, "finetune_random", None)],
                "rar": [("finetune any-order on raster (RAR)", rar_ft, "finetune_rar", None)],
                "oar-gt": [("extract gt_prob orders", gt_ex, None, None),
                           ("finetune OAR on gt_prob orders", gt_ft, "finetune_gt", gt_ex.out_dir)],
                "oar": []}
        # OAR: `rounds` x (extract orders with the current model, finetune on them), finetune_steps split evenly
        ex_p, ft_p = p.extract_orders, p.finetune.model_copy(update={"steps": p.finetune.steps // a.rounds})
        for r in range(1, a.rounds + 1):
            jobs["oar"] += [(f"extract orders (round {r})", ex_p, None, None),
                            (f"finetune OAR (round {r})", ft_p, f"finetune_r{r}", ex_p.out_dir)]
            ex_p = ex_p.model_copy(update={"checkpoint": f"{ft_p.out_dir}/model.pt",
                                           "out_dir": f"data/orders_r{r + 1}"})
            ft_p = ft_p.model_copy(update={"init_from": f"{ft_p.out_dir}/model.pt",
                                           "out_dir": f"models/oar_r{r + 1}"})
        samplers = [s for s in SAMPLERS if a.samplers is None or s[0] in a.samplers]  # []: none (train only)
        needed = {key for _, key, _, _ in samplers} | set(train)
        todo = [("train any-order", p.train_random, "train_random", None)] if needed - {"raster"} else []
        for key, steps in jobs.items():
            todo += steps if key in needed else []
        if a.baselines_from:  # identical baselines of another tag: reuse them (same digest = same params and seed)
            other = Path(a.workdir).parent / a.baselines_from / f"seed_{seed}"
            for _, tp, stage, _ in todo:
                src = other / tp.out_dir / "model.pt"
                if stage in ("train_raster", "train_random", "finetune_random", "finetune_rar") and \
                        not trained(f"{tp.out_dir}/model.pt", tp, shards) and trained(str(src), tp, shards):
                    Path(tp.out_dir).mkdir(parents=True, exist_ok=True)
                    shutil.copy(src, f"{tp.out_dir}/model.pt")
            for d in ("data/orders", "data/orders_gt"):  # parts are re-checked by hash
                if not Path(d).exists() and (other / d).exists():
                    shutil.copytree(other / d, d)
        for what, tp, stage, orders_dir in todo:
            if stage is None:
                with timer(f"seed {seed}: {what}"):
                    ex = run_extract(tp, shards)
                if ex["images"]:  # a resumed run skips finished parts: keep the figures of the run that did them
                    write_json(f"{tp.out_dir}/extract.json", ex)
            elif not trained(f"{tp.out_dir}/model.pt", tp, shards, orders_dir):
                with timer(f"seed {seed}: {what} ({tp.steps} steps)"):
                    run_train(tp, stage, shards, orders_dir=orders_dir)
        oar = "models/oar/model.pt" if a.rounds == 1 else f"models/oar_r{a.rounds}/model.pt"
        ckpt = {"raster": "models/raster/model.pt", "any": "models/random_ft/model.pt", "rar": "models/rar/model.pt",
                "oar": oar, "oar-gt": "models/oar_gt/model.pt"}
        device = pick_device()
        tok = load_tokenizer(p.sample.tokenizer, device)
        test_NN, test_labels, _ = load_token_split(shards, "test")
        results = {}
        for name, key, order, loc in samplers:
            out = Path("results") / f"{name}.json"
            # a result is reused only if made from this very checkpoint, sampler and sampling/eval params
            made_from = {"checkpoint": file_hash(ckpt[key]), "order": order, "location": loc,
                         "sample": p.sample.model_dump(mode="json"), "evaluate": p.evaluate.model_dump(mode="json"),
                         "classifier": file_hash(common / "classifier.pt")}
            if out.exists() and json.loads(out.read_text()).get("made_from") == made_from:
                results[name] = json.loads(out.read_text())
                continue
            with timer(f"seed {seed}: {name}"):
                model, _ = load_gpt(ckpt[key], device)
                spec = SampleModelParams(name=name, checkpoint=ckpt[key], order=order, location=LocationRule(**loc))
                t0 = time.time()
                res = sample_model(model, tok, spec, p.sample, device, progress=False)
                sec = time.time() - t0
                m = evaluate_images(res["images"], ref["test"], common, seed, cache)
                meta = {"order": order, "location": spec.location.model_dump()}
                with torch.no_grad():
                    m["nll_bits_per_token"], m["nll_how"], m["location_bits_per_step"] = sampler_nll(
                        model, meta, test_NN, test_labels, n_orders=p.evaluate.nll_orders,
                        batch_size=p.evaluate.nll_batch_size, seed=p.evaluate.seed, device=device)
                m["images_per_s"], m["made_from"] = round(len(res["images"]) / sec, 1), made_from
                save_png(Path("grids") / f"{name}.png", class_grid(res["images"], res["labels"]))
                write_json(out, m)
                results[name] = m
        return results


def cell(vals, digits: int = 3) -> str:
    """A table cell: the value of one seed, mean ± std of several, – of none."""
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def table(per_seed: dict[int, dict], a, clf_acc, extract: dict) -> str:
    seeds = sorted(per_seed)
    n_layer, _, d_model = SIZES[a.size]
    lines = [f"Fashion-MNIST, {a.max_train} train / {a.max_test} test images, {n_layer}-layer d={d_model} models, "
             f"next_position {a.next_position}, seeds {seeds}, {a.steps}+{a.finetune_steps} steps per model "
             f"(batch 64), "
             f"oar orders by {a.score} (oar-gt: gt_prob), "
             f"finetune random_mix {a.random_mix}->{a.random_mix_end}, "
             f"policy_weight {a.policy_weight} ({a.policy_head} head), "
             f"{a.rounds} extract+finetune round(s), "
             f"cfg_scale {a.cfg_scale}, {a.n_samples} samples per model. Feature space: CNN trained on all 60k "
             f"train images (test acc {clf_acc:.3f}); reference: the 10k test images. Mean ± std over seeds.", "",
             "| sampler | " + " | ".join(c[1] for c in COLUMNS) + " | img/s |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name in [s[0] for s in SAMPLERS] + REFERENCE:
        rows = [per_seed[s][name] for s in seeds if name in per_seed[s]]
        if not rows:
            continue
        cells = [cell([r[k] for r in rows if r.get(k) is not None], d) for k, _, d in COLUMNS]
        ips = cell([r["images_per_s"] for r in rows if "images_per_s" in r], 0)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ips} |")
    if any(extract.values()):
        lines += ["", "Order extraction (OAR's extra compute, on top of the equal gradient steps): " + ", ".join(
            f"seed {s}: " + " + ".join(f"{e['images']} images at {e['images_per_s']} img/s" for e in ex)
            for s, ex in sorted(extract.items()))]
    N = 49  # the 7x7 grid of the default tokenizer
    chance = sum(1 / (N - t) for t in range(N - 1)) / (N - 1)
    for model, stage in [("oar", f"finetune_r{a.rounds}"), ("oar-gt", "finetune_gt")]:
        files = [Path(a.workdir) / f"seed_{s}/dvclive/{stage}/metrics.json" for s in seeds]
        policy = [m for m in (json.loads(f.read_text()) for f in files if f.exists()) if "policy_top1_agreement" in m]
        if policy:
            lines += ["", f"{model}'s location policy on its held-out extracted orders: top-1 agreement "
                          f"{cell([m['policy_top1_agreement'] for m in policy], 3)} (uniform guess {chance:.3f}); "
                          f"location {cell([m['policy_location_bits_per_token'] for m in policy], 3)} bits/token, "
                          f"content {cell([m['policy_content_bits_per_token'] for m in policy], 3)} bits/token along "
                          "those orders (their sum is a valid bound; the content part alone is the oracle diagnostic)."]
    how = {r.get("nll_how") for s in seeds for r in per_seed[s].values() if r.get("nll_how")}
    lines += ["", "NLL: " + "; ".join(sorted(how))]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=600, help="any-order pretraining steps (raster gets steps+finetune)")
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--n-samples", type=int, default=1000, help="generated images per sampler")
    ap.add_argument("--max-train", type=int, default=2000)
    ap.add_argument("--max-test", type=int, default=500)
    ap.add_argument("--tokenizer-steps", type=int, default=500)
    ap.add_argument("--classifier-steps", type=int, default=1500)
    ap.add_argument("--size", choices=sorted(SIZES), default="default", help="model size (layers, heads, width)")
    ap.add_argument("--score", default="max_prob", choices=["gt_prob", "max_prob", "margin", "neg_entropy"],
                    help="the oar model's extraction score (the oar-gt model always uses gt_prob)")
    ap.add_argument("--next-position", default="both", choices=["relative", "absolute", "both"],
                    help="model.next_position of every model")
    ap.add_argument("--random-mix", type=float, default=0.2, help="finetune.random_mix")
    ap.add_argument("--random-mix-end", type=float, default=None, help="finetune.random_mix_end (annealing)")
    ap.add_argument("--policy-weight", type=float, default=1.0, help="finetune.policy_weight")
    ap.add_argument("--policy-head", default="shared", choices=["shared", "own"], help="finetune.policy_head")
    ap.add_argument("--cfg-scale", type=float, default=2.5)
    ap.add_argument("--rounds", type=int, default=1, help="extract+finetune rounds (finetune steps split evenly)")
    ap.add_argument("-S", "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a params key, e.g. -S tokenizer.codebook_size=1024 (repeatable; a tokenizer "
                         "change needs its own --workdir, which holds the shared data and tokenizer)")
    ap.add_argument("--workdir", default="/tmp/oar-bench-quality")
    ap.add_argument("--tag", default="default", help="results go to <workdir>/<tag> and bench/quality_<tag>.md")
    ap.add_argument("--table-only", action="store_true", help="only aggregate the results already on disk")
    ap.add_argument("--samplers", nargs="*", default=None, help="only these samplers (default: all)")
    ap.add_argument("--baselines-from", default=None,
                    help="tag whose raster/any-order models and first orders table to reuse when their params match")
    return ap


def main(argv=None):
    a = parser().parse_args(argv)
    common, timer, t0 = Path(a.workdir).resolve() / "common", Timer(), time.time()
    a.workdir = str(Path(a.workdir).resolve() / a.tag)
    out = Path(f"bench/quality_{a.tag}.md").resolve()
    run_common(a, common, timer)
    ref = dict(np.load(common / "reference.npz"))
    from oar_core.feature_net import load_classifier
    from oar_core.fidelity import temp_cache_dir

    with temp_cache_dir() as cache:
        refrows = {k: evaluate_images(ref[k], ref["test"], common, 0, cache) for k in REFERENCE}
        per_seed = {}
        for s in a.seeds:
            if a.table_only:
                res_dir = Path(a.workdir) / f"seed_{s}" / "results"
                per_seed[s] = {f.stem: json.loads(f.read_text()) for f in res_dir.glob("*.json")}
            else:
                per_seed[s] = run_seed(a, s, common, timer, ref, cache)
            per_seed[s].update(refrows)
    extract = {s: [json.loads(f.read_text())
                   for f in sorted((Path(a.workdir) / f"seed_{s}/data").glob("*/extract.json"))]
               for s in a.seeds}
    md = table(per_seed, a, load_classifier(common / "classifier.pt")[1].get("test_accuracy"), extract)
    if a.table_only:
        md += "\nAggregated from the results on disk (`--table-only`); run times are in each run's log.\n"
    else:
        md += f"\nWall time {time.time() - t0:.0f}s on {os.cpu_count()} CPU core(s); per stage:\n\n"
        md += "\n".join(f"- {name}: {sec:.0f}s" for name, sec in timer.rows) + "\n"
    print(md)
    out.write_text(md)
    print(f"[bench] table written to {out}")


if __name__ == "__main__":
    main()
