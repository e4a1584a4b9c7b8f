"""Does the gap close with budget? Raster, the continued any-order model and OAR at 1x, 2x and 4x the controlled
study's training budget (bench.quality's recipe: any-order pretraining `steps`, then `finetune_steps` of continuing,
of raster (RAR) or of OAR; raster from scratch gets their sum), valid held-out NLL and FID against total steps.

    python -m bench.budget --workdir /tmp/oar-budget --seeds 0       # train what is missing, then table + figure
    python -m bench.budget --workdir W --seeds 0 --table-only        # table + figure from the results on disk

Every multiple is one bench.quality run (tag `budget-<m>x`) in the same workdir, so the data, tokenizer and feature
space are shared and the multiples differ by their steps alone; every finished model or sampler is reused:
resumable. Writes bench/budget.md and bench/budget.png."""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

SAMPLERS = {"raster": "raster", "any-order": "any-order, random order",
            "oar-gumbel": "OAR, annealed-Gumbel confidence"}


def tag_for(m: int) -> str:
    return f"budget-{m}x"


def collect(workdir: Path, mults, seeds) -> dict:
    """{sampler: {m: [(nll, fid) per seed]}} from the results bench.quality left on disk."""
    out: dict = {s: {} for s in SAMPLERS}
    for m in mults:
        for seed in seeds:
            for s in SAMPLERS:
                f = workdir / tag_for(m) / f"seed_{seed}" / "results" / f"{s}.json"
                if f.exists():
                    r = json.loads(f.read_text())
                    out[s].setdefault(m, []).append((r["nll_bits_per_token"], r["fid"]))
    return out


def report(res: dict, a) -> str:
    from bench.quality import cell

    steps = {m: (a.steps + a.finetune_steps) * m for m in a.mults}
    lines = [f"Budget sweep: {a.steps}+{a.finetune_steps} steps per model at 1x (batch 64; OAR also pays its order "
             f"extraction), seeds {a.seeds}; mean ± std over the seeds done. NLL: valid held-out bits/token; FID in "
             f"bench.quality's in-domain feature space (1000 samples).", "",
             "| sampler | " + " | ".join(f"{m}x ({steps[m]} steps) NLL | {m}x FID" for m in a.mults) + " |",
             "|---" * (1 + 2 * len(a.mults)) + "|"]
    for s, label in SAMPLERS.items():
        cells = []
        for m in a.mults:
            rows = res[s].get(m, [])
            cells += [cell([r[0] for r in rows], 3), cell([r[1] for r in rows], 2)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(res: dict, a, path: Path) -> None:
    from oar_core.figures import _plt, _save_fig

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for s, label in SAMPLERS.items():
        ms = [m for m in a.mults if res[s].get(m)]
        x = [(a.steps + a.finetune_steps) * m for m in ms]
        for ax, k in zip(axes, (0, 1)):
            mean = [statistics.mean(r[k] for r in res[s][m]) for m in ms]
            err = [statistics.stdev(r[k] for r in res[s][m]) if len(res[s][m]) > 1 else 0 for m in ms]
            ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, label=label)
    for ax, name in zip(axes, ("valid NLL (bits/token)", "FID (in-domain)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("gradient steps per model")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.budget", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="bench.quality's workdir, one for all multiples")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--mults", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=600, help="any-order pretraining steps at 1x")
    ap.add_argument("--finetune-steps", type=int, default=200, help="finetune steps at 1x")
    ap.add_argument("--tokenizer-steps", type=int, default=1500, help="as the workdir's tokenizer was trained")
    ap.add_argument("--table-only", action="store_true")
    a = ap.parse_args(argv)
    workdir = Path(a.workdir).resolve()
    if not a.table_only:
        from bench import quality

        for m in a.mults:
            for seed in a.seeds:
                quality.main(["--workdir", str(workdir), "--tokenizer-steps", str(a.tokenizer_steps),
                              "--tag", tag_for(m), "--next-position", "both", "--seeds", str(seed),
                              "--steps", str(a.steps * m), "--finetune-steps", str(a.finetune_steps * m),
                              "--samplers", *SAMPLERS])
    res = collect(workdir, a.mults, a.seeds)
    Path("bench/budget.md").write_text(report(res, a))
    figure(res, a, Path("bench/budget.png"))
    print(report(res, a))


if __name__ == "__main__":
    main()
