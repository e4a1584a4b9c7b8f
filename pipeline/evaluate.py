"""Stage `evaluate`: FID/KID/IS/precision/recall (feature_net's space always; Inception with local weights) +
held-out NLL per model, beside two reference rows (real images; the same images through the tokenizer, the floor),
then pictures and reports/report.md. Metrics: dvclive/evaluate/<model>/metrics.json;
labels: reports/metrics_labels.json."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from oar_core import report, result_cache
from oar_core.calibration import greedy_calibration
from oar_core.checkable import checker_for
from oar_core.completion_report import completion_metrics
from oar_core.feature_net import INDOMAIN_NAME, load_classifier
from oar_core.fidelity import (
    INCEPTION_NAME,
    fidelity_metrics,
    image_folder,
    in_space,
    inception_weights_file,
    read_inception_weights,
    reconstruct,
    temp_cache_dir,
)
from oar_core.figures import (
    grid_from_folder,
    save_calibration,
    save_heatmaps,
    save_png,
    save_strips,
    save_training_curves,
    step_heatmaps_from_orders,
)
from oar_core.image_shards import load_manifest, load_split, take
from oar_core.likelihood import sampler_nll
from oar_core.live import log_per_key
from oar_core.model import load_gpt
from oar_core.names import ADAPTIVE_ORDERS
from oar_core.nll import bits_along_orders
from oar_core.order_queries import extracted_heatmaps
from oar_core.order_table import orders_for_ids
from oar_core.params import EvaluateParams
from oar_core.runtime import pick_device
from oar_core.storage import file_hash, read_json, write_json
from oar_core.token_shards import load_token_split
from oar_core.tokenizer import load_tokenizer
from pipeline._stage import stage_main


def load_sample_meta(folder) -> dict:
    fix = "rerun `dvc repro sample` (or python -m pipeline.sample)"
    try:
        return read_json(Path(folder) / "meta.json", f"no meta.json, so these samples are incomplete or not from the "
                                                     f"sample stage; {fix}", fix)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None


def model_folders(samples_dir) -> list[tuple[str, dict]]:
    """(name, meta) of every sampled model, in the order the sample stage listed them."""
    root = Path(samples_dir)
    if not root.is_dir():
        raise ValueError(f"{root}: samples folder not found; run `dvc repro sample` (or python -m pipeline.sample) "
                         "before evaluating")
    folders = sorted(d for d in root.iterdir()  # dvclive/: a trial's metrics (pipeline/_stage.py own_roots)
                     if d.is_dir() and not d.name.startswith(".") and d.name != "dvclive")
    if not folders:
        raise ValueError(f"{root}: no model sub-folders; run `dvc repro sample` (or python -m pipeline.sample)")
    found = [(d.name, load_sample_meta(d)) for d in folders]
    listed = [m["name"] for m in found[0][1].get("params", {}).get("models", [])]
    rank = {n: i for i, n in enumerate(listed)}
    return sorted(found, key=lambda x: (rank.get(x[0], len(rank)), x[0]))


def run_evaluate(p: EvaluateParams, samples_dir: str, ingest_dir: str, shards: str, orders_dir: str | None,
                 tokenizer_path="models/tokenizer.pt", plots_dir="dvclive", metrics_dir="dvclive/evaluate",
                 feature_net="models/feature_net.pt", progress: bool = True, completions: str | None = None) -> dict:
    out = Path(p.out_dir)
    # first, before anything slow: read once and safely (torch-fidelity itself would unpickle it with no limits)
    inception = read_inception_weights(p.inception_weights) if p.inception_weights else None
    manifest = load_manifest(ingest_dir)
    size, channels = manifest["image_size"], manifest["channels"]
    models = model_folders(samples_dir)
    gen = {name: image_folder(Path(samples_dir) / name, size, channels) for name, _ in models}
    test_NHWC, _, _ = load_split(ingest_dir, "test")
    metrics: dict = {}

    # the in-domain feature space, from the feature_net stage
    clf, ckpt = load_classifier(feature_net)
    clf_path, acc = str(feature_net), ckpt["test_accuracy"]
    metrics["feature_net"] = {"test_accuracy": acc}
    space = (f"in-domain classifier ({INDOMAIN_NAME}, test acc {acc:.3f})" if clf.config.get("task") != "rotation" else
             f"in-domain rotation predictor ({INDOMAIN_NAME}; one class, so self-supervised; test acc {acc:.3f})")
    labels = {"feature_space": {
        "indomain": space,
        "inception": f"Inception-v3 (torch-fidelity {INCEPTION_NAME}, weights {p.inception_weights})"
        if inception is not None else "skipped: no local Inception weights (set evaluate.inception_weights)"}}

    # references: real train images (as many as one model's samples) vs the same test set, and the same images
    # through the tokenizer: the floor no token model can beat (it models the tokens of exactly such images)
    n_ref = max(len(v) for v in gen.values())
    ref_idx = np.random.default_rng(p.seed).permutation(manifest["counts"]["train"])[:n_ref]
    tok = load_tokenizer(tokenizer_path)
    real = take(ingest_dir, "train", ref_idx)
    sets = {**{name: gen[name] for name, _ in models}, "real_reference": real, "reconstruction": reconstruct(tok, real)}
    # slow results are kept by a hash of what they read (oar_core/result_cache.py): a rerun for another reason
    # (evaluate.strip_steps: the strips) takes them back
    results, code = result_cache.default_dir("evaluate"), result_cache.code_digest("oar_core", "pipeline")
    real_key = {"test": result_cache.digest([test_NHWC.tobytes()]), "clf": file_hash(clf_path), "code": code,
                "inception": file_hash(p.inception_weights) if inception is not None else None,
                "kid_subset_size": p.kid_subset_size, "seed": p.seed}
    with temp_cache_dir() as cache:
        weights = inception_weights_file(inception, cache, p.inception_weights) if inception is not None else None

        def fidelity(images) -> dict:
            m = in_space(fidelity_metrics(images, test_NHWC, INDOMAIN_NAME, clf_path, p.kid_subset_size, p.seed,
                                          cache_dir=cache, real_cache_name="real-test"), "indomain")
            if weights:
                m.update(in_space(fidelity_metrics(images, test_NHWC, INCEPTION_NAME, weights, p.kid_subset_size,
                                                   p.seed, cache_dir=cache, real_cache_name="real-test"), "inception"))
            return m

        for name, images in tqdm(sets.items(), desc="fidelity", unit="model", disable=not progress):
            these = (result_cache.files_digest(images.files) if hasattr(images, "files") else
                     result_cache.digest([np.asarray(images).tobytes()]))
            metrics[name], hit = result_cache.cached(results, {**real_key, "images": these},
                                                     lambda images=images: fidelity(images))
            if hit:
                print(f"fidelity {name}: unchanged inputs, kept from an earlier run", file=sys.stderr, flush=True)
            labels[name] = {"feature_space": space}

    # held-out NLL, each model as it samples; the extracted ("oracle") orders only as a labelled diagnostic
    device = pick_device()
    test_NN, test_tok_labels, test_ids = load_token_split(shards, "test")
    oracle_NN = None
    has_orders = bool(orders_dir) and Path(orders_dir).is_dir() and any(Path(orders_dir).glob("*.parquet"))
    if has_orders:

        oracle_NN = orders_for_ids(orders_dir, test_ids, test_NN.shape[1], missing_ok=True)
    test_digest = result_cache.digest([test_NN.numpy().tobytes(), test_tok_labels.numpy().tobytes()])
    calibration = {}  # per checkpoint, (the first model name, its calibration): models sharing a checkpoint share it
    for name, meta in models:
        ckpt_hash = file_hash(meta["checkpoint"])
        nll_key = {"checkpoint": ckpt_hash, "order": meta["order"], "code": code,
                   "location": meta.get("location"), "steps": meta.get("steps"), "schedule": meta.get("schedule"),
                   "n_orders": p.nll_orders, "batch_size": p.nll_batch_size, "seed": p.seed, "test": test_digest}
        model, _ = load_gpt(meta["checkpoint"], device)
        (bits, label, loc), hit = result_cache.cached(results, nll_key, lambda: sampler_nll(
            model, meta, test_NN, test_tok_labels, n_orders=p.nll_orders, batch_size=p.nll_batch_size, seed=p.seed,
            device=device, progress=f"likelihood {name}" if progress else None))
        if hit:
            print(f"likelihood {name}: unchanged inputs, kept from an earlier run", file=sys.stderr, flush=True)
        metrics[name]["nll_bits_per_token"] = bits
        if loc is not None:  # how random the location choices are (near log2 of the unfilled count = random)
            metrics[name]["location_bits_per_step"] = loc
        if oracle_NN is not None and meta["order"] in ADAPTIVE_ORDERS:
            metrics[name]["oracle_order_bits_per_token"] = bits_along_orders(model, test_NN, test_tok_labels, oracle_NN,
                                                                       p.nll_batch_size, device)
        labels[name].update(nll_order=label, sample_order=meta["order"], location=meta.get("location"),
                            checkpoint=meta["checkpoint"])
        if meta["order"] != "raster":  # a model that chooses where to go: is its confidence along its orders true?
            if meta["checkpoint"] not in calibration:
                n = min(len(test_NN), p.calibration_images)
                cal_key = {"calibration": ckpt_hash, "n": n, "batch_size": p.nll_batch_size, "code": code,
                           "test": test_digest}
                cal = result_cache.cached(results, cal_key, lambda: greedy_calibration(
                    model, test_NN[:n], test_tok_labels[:n], p.nll_batch_size, device))[0]
                calibration[meta["checkpoint"]] = (name, cal)
            cal = calibration[meta["checkpoint"]][1]
            metrics[name].update(greedy_confidence=cal["confidence"], greedy_accuracy=cal["accuracy"])

    # a known-answer data set (Sudoku): exact checks of every model's samples and of its completions
    check = checker_for(manifest["source"])
    if check is not None:
        train_NN = load_token_split(shards, "train")[0]
        for name, meta in models:
            tokens_BN = np.stack(pl.read_parquet(Path(samples_dir) / name / "orders.parquet")["tokens"].to_numpy())
            model, _ = load_gpt(meta["checkpoint"], device)
            metrics[name].update(**check.generated(tokens_BN, train_NN),
                                 **check.completion(model, meta, test_NN, p.seed, device))

    # pictures + report
    class_names = manifest.get("class_names")
    fig = out / "figures"
    figures = {"grids": {}, "strips": {}, "heat_samples": {}, "heat_extracted": None, "curves": None}
    for name, meta in models:
        table = pl.read_parquet(Path(samples_dir) / name / "orders.parquet")
        save_png(fig / f"grid_{name}.png", grid_from_folder(Path(samples_dir) / name, table["label"].to_numpy()))
        figures["grids"][name] = f"figures/grid_{name}.png"
        save_strips(tok, Path(samples_dir) / name / "orders.parquet", fig / f"strip_{name}.png", p.strip_steps)
        figures["strips"][name] = f"figures/strip_{name}.png"
        if meta["order"] in ADAPTIVE_ORDERS:  # fixed orders give trivial maps
            heat = step_heatmaps_from_orders(np.stack(table["order"].to_numpy()).astype(np.int64),
                                                    table["label"].to_numpy())
            save_heatmaps(heat, fig / f"heat_{name}.png", f"{name}: mean sampling step", class_names)
            figures["heat_samples"][name] = f"figures/heat_{name}.png"
    if has_orders:
        save_heatmaps(extracted_heatmaps(orders_dir), fig / "heat_extracted.png",
                             "extracted training orders: mean step", class_names)
        figures["heat_extracted"] = "figures/heat_extracted.png"
    # the complete stage's completions: per model and mask, rows `complete_<model>` of their own
    comp_metrics, comp_lines = completion_metrics(completions, test_NHWC, clf, clf_path, p.kid_subset_size, p.seed,
                                                  fig) if completions else ({}, [])
    metrics.update(comp_metrics)
    curves = ["train_raster", "train_random", "finetune", "finetune_random"]  # the last one: bench.quality's
    if save_training_curves(plots_dir, curves, fig / "training_curves.png"):
        figures["curves"] = "figures/training_curves.png"
    if calibration:
        save_calibration(dict(calibration.values()), fig / "calibration.png")
        figures["calibration"] = "figures/calibration.png"
    names = [n for n, _ in models]
    report.write_report(out / "report.md", metrics, labels, names, figures, comp_lines, checked=check is not None)
    write_json(out / "metrics_labels.json", labels)
    # one DVCLive folder per model (<metrics_dir>/<model>/metrics.json): `dvc metrics show` prints a row each
    log_per_key(metrics_dir, metrics)
    return {"metrics": str(metrics_dir), "report": str(out / "report.md"),
            **{n: {k: round(v, 4) for k, v in metrics[n].items() if k in ("fid_indomain", "nll_bits_per_token")}
               for n in names}}


def _args(ap):
    ap.add_argument("--samples", help="default: from params.yaml")
    ap.add_argument("--ingest-dir", help="default: from params.yaml")
    ap.add_argument("--shards", help="default: from params.yaml")
    ap.add_argument("--orders-dir", help="default: from params.yaml")
    ap.add_argument("--tokenizer", default="models/tokenizer.pt")
    ap.add_argument("--plots-dir", default="dvclive", help="DVCLive folders of the training stages (their curves)")
    ap.add_argument("--metrics", help="DVCLive folder: <it>/<model>/metrics.json; default: dvclive/evaluate (a "
                                      "trial's: <evaluate.out_dir>/dvclive/evaluate)")
    ap.add_argument("--feature-net", default="models/feature_net.pt")
    ap.add_argument("--completions", help="the complete stage's folder (default: from params.yaml)")


def main(argv=None):
    return stage_main(__doc__, "evaluate", lambda p, a: run_evaluate(
        p, a.samples, a.ingest_dir, a.shards, a.orders_dir, a.tokenizer, a.plots_dir,
        a.metrics or a.live_root / "evaluate", a.feature_net, completions=a.completions),
        argv, _args)


if __name__ == "__main__":
    main()
