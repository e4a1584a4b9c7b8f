"""report.md: the metrics table per feature space beside the figures, with the label of every number."""
from __future__ import annotations

import math

from oar_core.storage import write_bytes_atomic

REFERENCES = ["real_reference", "reconstruction"]  # evaluate's rows that are not models


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
    for m in models + REFERENCES:
        d = metrics.get(m, {})
        if not d:
            continue
        kid = _fmt(d.get(f"kid_{space}"), 4) + (f" ± {d[f'kid_{space}_std']:.4f}" if f"kid_{space}_std" in d else "")
        is_ = _fmt(d.get(f"is_{space}"), 2) + (f" ± {d[f'is_{space}_std']:.2f}" if f"is_{space}_std" in d else "")
        rows.append(f"| {m} | {_fmt(d.get(f'fid_{space}'), 2)} | {kid} | {is_} | {_fmt(d.get(f'precision_{space}'))} "
                    f"| {_fmt(d.get(f'recall_{space}'))} | {_fmt(d.get('nll_bits_per_token'))} "
                    f"| {d.get('nll_order_label', '–')} | {_fmt(d.get('oracle_order_bits_per_token'))} |")
    return "\n".join([head] + rows)


def at_the_floor(metrics: dict, models: list[str], space: str = "indomain") -> list[str]:
    """Models whose KID is within two standard deviations (of the difference) of the tokenizer's reconstructions:
    there the metric cannot tell them from the floor, so it cannot rank them either."""
    floor = metrics.get("reconstruction", {})
    if f"kid_{space}" not in floor:
        return []
    out = []
    for m in models:
        d = metrics.get(m, {})
        if f"kid_{space}" in d:
            spread = math.hypot(d.get(f"kid_{space}_std", 0.0), floor.get(f"kid_{space}_std", 0.0))
            if abs(d[f"kid_{space}"] - floor[f"kid_{space}"]) <= 2 * spread:
                out.append(m)
    return out


def checks_table(metrics: dict, models: list[str]) -> str:
    """Markdown rows of the exact checks of a known-answer data set (oar_core.checkable), one column per check."""
    skip = ("fid_", "kid_", "is_", "precision_", "recall_", "nll_", "oracle_", "location_", "greedy_")
    keys = sorted({k for m in models for k in metrics.get(m, {}) if not k.startswith(skip)})
    rows = [f"| {m} | " + " | ".join(_fmt(metrics.get(m, {}).get(k)) for k in keys) + " |" for m in models]
    return "\n".join([f"| model | {' | '.join(keys)} |", "|---" * (len(keys) + 1) + "|", *rows])


def write_report(path, metrics: dict, labels: dict, models: list[str], figures: dict,
                 sections: list[str] = (), checked: bool = False) -> None:
    """`figures`: {"grids": {model: rel}, "strips": {model: rel}, "heat_samples": {model: rel}, "calibration": rel|None,
    "heat_extracted": rel|None, "curves": rel|None}; paths relative to the report's folder. `sections`: more
    markdown lines, appended (the completions'). `checked`: the data set is checkable (Sudoku): a table of its exact
    checks follows the metrics."""
    lines = ["# OAR evaluation report", ""]
    lines += ["## Metrics", "",
              f"Feature space: **{labels['feature_space']['indomain']}**. Not comparable with published "
              "(Inception) FID numbers; compare models with each other and with the two reference rows: "
              "`real_reference` (real train images vs the same test images: what real data scores "
              "at this sample size) and `reconstruction` (the same images through the tokenizer: the floor no token "
              "model can beat). Precision / recall: "
              "k-NN fidelity and diversity (torch-fidelity `prc`, same features). NLL: held-out bits/token of each "
              "model as it samples (its order and location rule, teacher-forced), an exact value or an upper bound "
              "on -log2 p(x); the oracle-order column scores along orders extracted by looking at the answer and is "
              "not a likelihood.", "",
              metrics_table({m: {**metrics.get(m, {}), "nll_order_label": labels.get(m, {}).get("nll_order", "–")}
                             for m in models + REFERENCES}, models, "indomain"), ""]
    floor = metrics.get("reconstruction", {})
    if "fid_indomain" in floor:
        level = at_the_floor(metrics, models)
        lines += [f"Tokenizer floor: reconstructions score FID {floor['fid_indomain']:.2f}. " + (
            f"Within the floor's spread (KID within 2 std): {', '.join(level)}; the metric cannot rank these models "
            "against each other: compare their NLL instead." if level else
            "No model is within the floor's spread (KID within 2 std)."), ""]
    if checked:
        lines += ["## Exact checks (known-answer data set)", "",
                  "Generated boards: `valid_fraction` (every row, column and box a permutation of the digits), "
                  "`violated_units` (mean, of 3n), `copied_from_train`. Completion of held-out boards from k clues "
                  "(the most probable digit at each step, the location by the model's sampler): `solved_k_clues` "
                  "(valid and agreeing with every clue), `forced_cell_steps_k_clues` (fraction of non-clue steps "
                  "whose cell had exactly one digit left by the rules).", "", checks_table(metrics, models), ""]
    lines += [f"Standard Inception metrics: **{labels['feature_space']['inception']}**", ""]
    if any("fid_inception" in metrics.get(m, {}) for m in models):
        lines += [metrics_table({m: metrics.get(m, {}) for m in models + REFERENCES}, models, "inception"), ""]
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
    if figures.get("calibration"):
        lines += ["", "## Confidence along the model's own greedy orders", "",
                  "Teacher-forced on held-out images, always at the most confident unfilled position: mean top "
                  "probability (dashed) vs how often that top token is the true one (solid). Orders extracted with "
                  "`gt_prob` look at the answer and teach a model to be sure where it is not; this is where it shows.",
                  "", f"![calibration]({figures['calibration']})"]
    if figures.get("curves"):
        lines += ["", "## Training curves", "", f"![training curves]({figures['curves']})"]
    lines += ["", *sections] if sections else []
    lines.append("")
    write_bytes_atomic(path, "\n".join(lines).encode())
