"""Parallel decoding's quality-speed curve: the any-order model and OAR's policy and confidence samplers at N, N/2,
N/4 and N/8 steps (several tokens per forward), raster beside, on a 7x7 and a 14x14 token grid, in one run.

    python -m bench.parallel                                   # 7x7 and 14x14, 1000 samples per row
    python -m bench.parallel --grids 7 --n-samples 500 --tag g7-500
    python -m bench.parallel --quick --workdir /tmp/p --tag quick   # a smoke run of every part (minutes)

Models are bench.quality's (same recipe, its --size tiny by default): raster, any-order (random order, continued)
and OAR (any-order finetuned on its extracted orders with a location-policy head), trained once per grid under
--workdir and reused. Rows: raster (the raster model; at fewer steps "raster's next k", a control a raster model is
not trained for), any-order (random order), oar-policy (policy head, tau = 1), oar-confidence (max-prob with
Gumbel noise tau = 1 annealed to 0: the pipeline's `oar` sampler). Per row: FID / KID / precision / recall in the
in-domain feature space (bench.quality's independent classifier; reference: the 10k test images), the valid NLL of
that parallel sampler on --nll-images test images (each token conditioned on the prefix before its step:
oar_core.likelihood), images/s while drawing the samples at the sampling batch size, and the latency of one image
at batch 1 (the fastest of --repeats draws after a warm-up: the least disturbed on a shared machine).
Classifier-free guidance 2.5 throughout (two rows per image).
Step sizes follow --schedule. Resumable: each row is kept under <workdir>/<tag>/g<grid>/results/ and reused when
made from the same checkpoint and settings. Timings on a shared machine are only as clean as the machine was.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

SAMPLERS = [  # name, model, order, location rule
    ("raster", "raster", "raster", {}),
    ("any-order", "any", "random", {}),
    ("oar-policy", "oar", "policy", {"temperature": 1.0}),
    ("oar-confidence", "oar", "confidence", {"temperature": 1.0, "anneal": "linear"}),
]
DIVISORS = (1, 2, 4, 8)  # N / d steps
QUICK = dict(max_train=300, max_test=60, tokenizer_steps=60, classifier_steps=60, steps=40, finetune_steps=20,
             n_samples=40, nll_images=20, repeats=1)


def quality_args(a, grid: int, workdir: Path) -> argparse.Namespace:
    """bench.quality's settings for one grid's models (its defaults but what this bench sets)."""
    from bench import quality

    qa = quality.parser().parse_args([])
    vars(qa).update(seeds=[a.seed], steps=a.steps, finetune_steps=a.finetune_steps, n_samples=a.n_samples,
                    max_train=a.max_train, max_test=a.max_test, tokenizer_steps=a.tokenizer_steps,
                    classifier_steps=a.classifier_steps, size=a.size, cfg_scale=a.cfg_scale, workdir=str(workdir),
                    tag=f"g{grid}", samplers=[], grid=grid)
    return qa


def train_models(a, grid: int, root: Path) -> tuple[Path, dict[str, str]]:
    """Data, tokenizer, feature space and the three models of one grid (bench.quality's recipe); what exists is
    reused. Returns the common folder and the checkpoints."""
    from bench import quality

    qa = quality_args(a, grid, root)
    common, timer = root / "common", quality.Timer()
    quality.run_common(qa, common, timer)
    quality.run_seed(qa, a.seed, common, timer, {}, "", train=("raster", "any", "oar"))
    seed_dir = root / f"seed_{a.seed}"
    return common, {"raster": str(seed_dir / "models/raster/model.pt"),
                    "any": str(seed_dir / "models/random_ft/model.pt"), "oar": str(seed_dir / "models/oar/model.pt")}


def latency_s(model, spec, p, device, repeats: int) -> list[float]:
    """Seconds for one image at batch 1, each of `repeats` draws after a warm-up."""
    import torch

    from oar_core.decode import generate
    from oar_core.names import LocationRule
    from oar_core.runtime import autocast

    def once(i):
        with autocast(device):
            generate(model, torch.tensor([i % max(1, model.cfg.num_classes)], device=device), order=spec.order,
                     temperature=p.temperature, cfg_scale=p.cfg_scale,
                     location=LocationRule(**spec.location.model_dump()), generator=torch.Generator().manual_seed(i),
                     steps=spec.steps, schedule=spec.schedule)
        if device.type == "cuda":
            torch.cuda.synchronize()
    once(0)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        once(i + 1)
        times.append(time.perf_counter() - t0)
    return times


def measure(model, tokenizer, spec, p, device, evaluate, nll_data, repeats: int) -> dict:
    """One row: quality of p.n_per_model samples, the sampler's NLL bound, img/s at p.batch_size, batch-1 latency."""
    import torch

    from bench.helpers import sample_model
    from oar_core.likelihood import sampler_nll

    t0 = time.perf_counter()
    res = sample_model(model, tokenizer, spec, p, device, progress=False)
    sec = time.perf_counter() - t0
    row = evaluate(res["images"])
    if nll_data is not None:
        meta = {"order": spec.order, "location": spec.location.model_dump(), "steps": spec.steps,
                "schedule": spec.schedule}
        with torch.no_grad():
            row["nll_bits_per_token"], row["nll_how"], _ = sampler_nll(model, meta, *nll_data, n_orders=1,
                                                                    batch_size=250, seed=0, device=device)
    row["images_per_s"] = len(res["images"]) / sec
    # the fastest draw: on a machine other jobs share, the least disturbed one (the median is kept beside it)
    times = latency_s(model, spec, p, device, repeats)
    row["latency_ms"], row["latency_median_ms"] = 1000 * min(times), 1000 * float(np.median(times))
    return row


def run_grid(a, grid: int, common: Path, ckpts: dict[str, str], out: Path) -> list[dict]:
    """Every sampler at every step count on one grid; rows already on disk with the same inputs are reused."""
    from bench.quality import evaluate_images
    from oar_core.fidelity import temp_cache_dir
    from oar_core.model import load_gpt
    from oar_core.names import LocationRule
    from oar_core.params import SampleModelParams, SampleParams
    from oar_core.runtime import pick_device
    from oar_core.storage import file_hash, write_json
    from oar_core.token_shards import load_token_split
    from oar_core.tokenizer import load_tokenizer

    device = pick_device()
    tok = load_tokenizer(str(common / "models/tokenizer.pt"), device)
    ref = np.load(common / "reference.npz")["test"]
    test_NN, test_labels, _ = load_token_split(str(common / "data/shards"), "test")
    nll_data = (test_NN[:a.nll_images], test_labels[:a.nll_images]) if a.nll_images else None
    N = grid * grid
    rows = []
    with temp_cache_dir() as cache:  # one per grid: each grid's common folder has its own classifier
        for name, key, order, loc in SAMPLERS:
            if a.samplers and name not in a.samplers:
                continue
            model = None
            for d in a.divisors:
                steps = N // d
                spec = SampleModelParams(name=name, checkpoint=ckpts[key], order=order, location=LocationRule(**loc),
                                         steps=None if steps == N else steps, schedule=a.schedule)
                p = SampleParams(tokenizer=str(common / "models/tokenizer.pt"), models=[spec],
                                 n_per_model=a.n_samples, batch_size=min(a.n_samples, a.batch_size), seed=a.seed,
                                 cfg_scale=a.cfg_scale)
                made_from = {"checkpoint": file_hash(ckpts[key]), "spec": spec.model_dump(mode="json"),
                             "sample": p.model_dump(mode="json"), "nll_images": a.nll_images, "repeats": a.repeats,
                             "classifier": file_hash(common / "classifier.pt")}
                f = out / f"{name}-{steps}.json"
                if f.exists() and json.loads(f.read_text()).get("made_from") == made_from:
                    rows.append(json.loads(f.read_text()))
                    continue
                model = model or load_gpt(ckpts[key], device)[0]
                t0 = time.time()
                row = measure(model, tok, spec, p, device,
                              lambda ims: evaluate_images(ims, ref, common, a.seed, cache), nll_data, a.repeats)
                row.update(sampler=name, grid=grid, steps=steps, N=N, made_from=made_from)
                write_json(f, row)
                print(f"[parallel] {grid}x{grid} {name} {steps} steps: FID {row['fid']:.2f}, "
                      f"{row['images_per_s']:.1f} img/s, {row['latency_ms']:.0f} ms at batch 1 "
                      f"({time.time() - t0:.0f}s)", flush=True)
                rows.append(row)
    return rows


def table(rows: list[dict], a) -> str:
    """Per grid: one line per (sampler, steps); speed-ups against raster at one token per step."""
    lines = []
    for grid in sorted({r["grid"] for r in rows}):
        g = [r for r in rows if r["grid"] == grid]
        base = next((r for r in g if r["sampler"] == "raster" and r["steps"] == r["N"]), None)
        lines += [f"### {grid}x{grid} grid (N = {grid * grid})", "",
                  "| sampler | steps | FID | KID | precision | recall | NLL bits/token (this sampler) | img/s | "
                  "x raster img/s | batch-1 ms | x raster batch-1 | FID / own N-step FID |",
                  "|---" * 12 + "|"]
        for r in g:
            own = next((o for o in g if o["sampler"] == r["sampler"] and o["steps"] == o["N"]), None)
            nll = f"{r['nll_bits_per_token']:.3f}" if "nll_bits_per_token" in r else "–"
            own_fid = "–" if own is None else f"{r['fid'] / own['fid']:.2f}"
            rel = lambda k, inv=False: "–" if base is None else (  # noqa: E731
                f"{(base[k] / r[k] if inv else r[k] / base[k]):.2f}x")
            lines.append(f"| {r['sampler']} | {r['steps']} | {r['fid']:.2f} | {r['kid']:.4f} | {r['precision']:.3f} | "
                         f"{r['recall']:.3f} | {nll} | {r['images_per_s']:.1f} | {rel('images_per_s')} | "
                         f"{r['latency_ms']:.0f} | {rel('latency_ms', inv=True)} | "
                         f"{own_fid} |")
        lines.append("")
        lines += targets(g, base)
    how = sorted({r["nll_how"].split("; of the parallel sampler")[0] for r in rows if r.get("nll_how")})
    if how:
        lines += [f"NLL: valid bounds of each sampler as it samples, on the first {a.nll_images} test images, one "
                  "order draw (" + "; ".join(how) + "); below N steps, the parallel sampler's own (each token "
                  "conditioned on the prefix before its step), not the model's sequential NLL.", ""]
    return "\n".join(lines)


def targets(g: list[dict], base: dict | None) -> list[str]:
    """The issue's targets for the OAR policy sampler: batch-1 >= 4x raster, img/s >= 1x raster, FID within 10% of
    its own one-per-step value; the step count where each is met."""
    pol = {r["steps"]: r for r in g if r["sampler"] == "oar-policy"}
    N = g[0]["N"]
    if base is None or N not in pol:
        return []
    out = []
    for steps, r in sorted(pol.items(), reverse=True):
        checks = [("batch-1 >= 4x raster", base["latency_ms"] / r["latency_ms"] >= 4),
                  ("img/s >= raster", r["images_per_s"] >= base["images_per_s"]),
                  ("FID within 10% of its N-step", r["fid"] <= 1.1 * pol[N]["fid"])]
        out.append(f"- oar-policy at {steps} steps: " + ", ".join(f"{c}: {'yes' if ok else 'no'}" for c, ok in checks))
    return out + [""]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.parallel", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grids", type=int, nargs="+", default=[7, 14])
    ap.add_argument("--divisors", type=int, nargs="+", default=list(DIVISORS), help="rows at N / d steps")
    ap.add_argument("--schedule", default="constant", help="tokens per step: constant, linear, cosine, arccos")
    ap.add_argument("--samplers", nargs="*", default=None, help="only these rows (default: all)")
    ap.add_argument("--n-samples", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=250, help="the sampling batch size (img/s is measured at it)")
    ap.add_argument("--cfg-scale", type=float, default=2.5)
    ap.add_argument("--nll-images", type=int, default=200, help="test images for each sampler's NLL bound; 0: none")
    ap.add_argument("--repeats", type=int, default=5, help="batch-1 draws averaged for the latency")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", default="tiny", help="bench.quality's model size (tiny, small, default)")
    ap.add_argument("--steps", type=int, default=600, help="any-order pretraining steps (bench.quality's)")
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--max-train", type=int, default=2000)
    ap.add_argument("--max-test", type=int, default=500)
    ap.add_argument("--tokenizer-steps", type=int, default=500)
    ap.add_argument("--classifier-steps", type=int, default=1500)
    ap.add_argument("--quick", action="store_true",
                    help="smoke sizes: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    ap.add_argument("--workdir", default="/tmp/oar-bench-parallel")
    ap.add_argument("--tag", default="default", help="results under <workdir>/<tag>, table in bench/parallel_<tag>.md")
    ap.add_argument("--table-only", action="store_true", help="only tabulate the rows already on disk")
    a = ap.parse_args(argv)
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k, v)
    t0, rows = time.time(), []
    for grid in a.grids:
        root = Path(a.workdir).resolve() / a.tag / f"g{grid}"
        if a.table_only:
            order = {(s[0], d): i for i, (s, d) in enumerate((s, d) for s in SAMPLERS for d in sorted(DIVISORS))}
            found = [json.loads(f.read_text()) for f in (root / "results").glob("*.json")]
            rows += sorted(found, key=lambda r: order.get((r["sampler"], r["N"] // r["steps"]), len(order)))
            continue
        common, ckpts = train_models(a, grid, root)
        out = root / "results"
        out.mkdir(parents=True, exist_ok=True)
        rows += run_grid(a, grid, common, ckpts, out)
    md = (f"Parallel decoding, Fashion-MNIST ({a.max_train} train / {a.max_test} test images), bench.quality's "
          f"{a.size} models ({a.steps}+{a.finetune_steps} steps, seed {a.seed}), {a.n_samples} samples per row at "
          f"batch {min(a.n_samples, a.batch_size)}, cfg {a.cfg_scale}, schedule {a.schedule}; FID etc. in the "
          f"in-domain feature space against the 10k test images. One seed: no spread measured.\n\n" + table(rows, a))
    md += ("\nTabulated from the rows on disk (`--table-only`); run times are in the run's log.\n" if a.table_only else
           f"\nWall time {time.time() - t0:.0f}s on {os.cpu_count()} CPU core(s) (torch threads: "
           f"{os.environ.get('OMP_NUM_THREADS', 'default')}).\n")
    print(md)
    path = Path(f"bench/parallel_{a.tag}.md")
    path.parent.mkdir(exist_ok=True)
    path.write_text(md)
    print(f"[parallel] table written to {path.resolve()}")
    return rows


if __name__ == "__main__":
    main()
