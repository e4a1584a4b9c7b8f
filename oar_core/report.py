"""report.md: the metrics table per feature space beside the figures, with the label of every number."""
from __future__ import annotations

import math

from oar_core.storage import write_bytes_atomic


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def metrics_table(metrics: dict, models: list[str], space: str) -> str:
    """Markdown rows: one per model, columns FID/KID/IS/precision/recall in `space` (indomain|inception), the
    valid NLL with how it was obtained, and the oracle-order diagnostic where there is one."""
    head = (f"| model | FID ({space}) | KID ({space}) | IS ({space}) | precision | recall | NLL bits/token (valid) "
            "| NLL: how | oracle order bits/token (diagnostic, not a likelihood) |\n"
            "|---|---|---|---|---|---|---|---|---|")
    rows = []
    for m in models + ["real_reference"]:
        d = metrics.get(m, {})
        if not d:
            continue
        kid = _fmt(d.get(f"kid_{space}"), 4) + (f" ± {d[f'kid_{space}_std']:.4f}" if f"kid_{space}_std" in d else "")
        is_ = _fmt(d.get(f"is_{space}"), 2) + (f" ± {d[f'is_{space}_std']:.2f}" if f"is_{space}_std" in d else "")
        rows.append(f"| {m} | {_fmt(d.get(f'fid_{space}'), 2)} | {kid} | {is_} | {_fmt(d.get(f'precision_{space}'))} "
                    f"| {_fmt(d.get(f'recall_{space}'))} | {_fmt(d.get('nll_bits_per_token'))} "
                    f"| {d.get('nll_order_label', '–')} | {_fmt(d.get('oracle_order_bits_per_token'))} |")
    return "\n".join([head] + rows)


def checks_table(metrics: dict, models: list[str]) -> str:
    """Markdown rows of the exact checks of a known-answer data set (oar_core.checkable), one column per check."""
    skip = ("fid_", "kid_", "is_", "precision_", "recall_", "nll_", "oracle_")
    keys = sorted({k for m in models for k in metrics.get(m, {}) if not k.startswith(skip)})
    rows = [f"| {m} | " + " | ".join(_fmt(metrics.get(m, {}).get(k)) for k in keys) + " |" for m in models]
    return "\n".join([f"| model | {' | '.join(keys)} |", "|---" * (len(keys) + 1) + "|", *rows])


def write_report(path, metrics: dict, labels: dict, models: list[str], figures: dict, checked: bool = False) -> None:
    """`checked`: the data set is checkable (Sudoku): a table of its exact checks follows the metrics.
    `figures`: {"grids": {model: rel}, "strips": {model: rel}, "heat_samples": {model: rel},
    "heat_extracted": rel|None, "curves": rel|None}; paths relative to the report's folder."""
    lines = ["# OAR evaluation report", ""]
    lines += ["## Metrics", "",
              f"Feature space: **{labels['feature_space']['indomain']}**. Not comparable with published "
              "(Inception) FID numbers; compare models with each other and with `real_reference` (real train "
              "images vs the same test images: the floor any model can reach at this sample size). Precision / recall: "
              "k-NN fidelity and diversity (torch-fidelity `prc`, same features). NLL: held-out bits/token of each "
              "model as it samples (its order and location rule, teacher-forced), an exact value or an upper bound "
              "on -log2 p(x); the oracle-order column scores along orders extracted by looking at the answer and is "
              "not a likelihood.", "",
              metrics_table({m: {**metrics.get(m, {}), "nll_order_label": labels.get(m, {}).get("nll_order", "–")}
                             for m in models + ["real_reference"]}, models, "indomain"), ""]
    if checked:
        lines += ["## Exact checks (known-answer data set)", "",
                  "Generated boards: `valid_fraction` (every row, column and box a permutation of the digits), "
                  "`violated_units` (mean, of 3n), `copied_from_train`. Completion of held-out boards from k clues "
                  "(the most probable digit at each step, the location by the model's sampler): `solved_k_clues` "
                  "(valid and agreeing with every clue), `forced_cell_steps_k_clues` (fraction of non-clue steps "
                  "whose cell had exactly one digit left by the rules).", "", checks_table(metrics, models), ""]
    lines += [f"Standard Inception metrics: **{labels['feature_space']['inception']}**", ""]
    if any("fid_inception" in metrics.get(m, {}) for m in models):
        lines += [metrics_table({m: metrics.get(m, {}) for m in models + ["real_reference"]}, models, "inception"), ""]
    lines += ["## Samples", "", "One column per class. Strips: one sample being generated in its order "
              "(gray = not generated yet).", "",
              "| model | samples | generation order (partial canvases) |", "|---|---|---|"]
    for m in models:
        g, s = figures["grids"].get(m), figures["strips"].get(m)
        lines.append(f"| {m} | {f'![{m}]({g})' if g else '–'} | {f'![{m} strip]({s})' if s else '–'} |")
    lines += ["", "## Where each model generates first", "",
              "Mean generation step per grid position and class (dark = early)."]
    if figures.get("heat_extracted"):
        lines += ["", "Extracted training orders (`data/orders`, teacher-forced, what OAR is finetuned on):", "",
                  f"![extracted orders]({figures['heat_extracted']})"]
    for m, rel in figures["heat_samples"].items():
        lines += ["", f"Sampling orders of `{m}`:", "", f"![{m} orders]({rel})"]
    if figures.get("curves"):
        lines += ["", "## Training curves", "", f"![training curves]({figures['curves']})"]
    lines.append("")
    write_bytes_atomic(path, "\n".join(lines).encode())
