"""What a flow run shows on its Artifacts tab: each stage's results, read back from the files the stage wrote.

Published after `dvc repro <stage>`, also when DVC found the stage up to date (the results are the current ones).
The UI cannot open files on the machine, so pictures travel inside the markdown as small data: URIs.
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from oar_core.params import Params
from oar_core.report import REFERENCES

EVAL_METRICS = "dvclive/evaluate"  # dvc.yaml's evaluate metrics folder: <model>/metrics.json
KINDS = {"real_reference": "reference: real vs real", "reconstruction": "floor: tokenizer reconstructions"}
PREVIEW_BYTES = 200_000  # larger pictures are linked by path only: the markdown travels through the API
COLUMNS = {"fid_indomain": "FID", "precision_indomain": "precision", "recall_indomain": "recall",
           "nll_bits_per_token": "valid NLL (bits/token)", "fid_inception": "FID (Inception)"}


def _key(name: str) -> str:
    """Artifact keys are lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _image(path: Path, alt: str) -> str:
    if path.is_file() and path.stat().st_size <= PREVIEW_BYTES:
        return f"![{alt}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"
    return f"`{path}`" + (" (too large to preview here)" if path.is_file() else " (not written)")


def metrics_rows(repo: Path, params: Params) -> list[dict]:
    """One row per sampled model (in the report's order), then the reference rows: real images vs the test set, and
    the same images through the tokenizer (the floor no token model can beat)."""
    labels = _read_json(repo / params.evaluate.out_dir / "metrics_labels.json")
    root = repo / EVAL_METRICS
    found = sorted(d.name for d in root.iterdir() if (d / "metrics.json").is_file()) if root.is_dir() else []
    models = [n for n in labels if n in found and "sample_order" in labels[n]]
    floors = [n for n in REFERENCES if n in found]
    rows = []
    for name in models + floors:
        m = _read_json(root / name / "metrics.json")
        row = {"model": name, "kind": "model" if name in models else KINDS[name]}
        for k, col in COLUMNS.items():
            if k in m or k != "fid_inception":  # the Inception column only where there are local weights
                row[col] = round(m[k], 4) if isinstance(m.get(k), float) else ""
        row["NLL: how"] = labels.get(name, {}).get("nll_order", "")
        rows.append(row)
    return rows


def publish_evaluate(repo: Path, params: Params) -> None:
    rows = metrics_rows(repo, params)
    if not rows:
        return
    create_table_artifact(rows, key="evaluate-metrics", description=(
        "Metrics per sampled model (FID/precision/recall in the in-domain feature space; lower FID is better) and "
        "the reference rows: real images scored against the test set (what real data scores at this sample size) and "
        "the same images through the tokenizer (the floor no token model can beat)."))
    out = (repo / params.evaluate.out_dir).resolve()
    report = out / "report.md"
    models = [r for r in rows if r["kind"] == "model" and isinstance(r.get("FID"), float)]
    best = min(models, key=lambda r: r["FID"]) if models else None
    floor = next((r for r in rows if r["model"] == "reconstruction" and isinstance(r.get("FID"), float)), None)
    space = _read_json(out / "metrics_labels.json").get("feature_space", {})
    lines = ["# OAR evaluation report", ""]
    if best:
        lines.append(f"Lowest FID: **{best['model']}** ({best['FID']:.3f}"
                     + (f"; the tokenizer's floor is {floor['FID']:.3f}" if floor else "") + ").")
    lines += [f"Feature space: {space.get('indomain', '?')}. Inception metrics: {space.get('inception', '?')}.", "",
              "| file | where |", "|---|---|", f"| full report (tables, grids, strips, heat maps) | `{report}` |",
              f"| figures | `{out / 'figures'}` |",
              f"| metrics per model (JSON) | `{(repo / EVAL_METRICS).resolve()}` |",
              f"| labels of every number | `{out / 'metrics_labels.json'}` |", "",
              "`dvc metrics show` prints the same numbers in a shell.", "", "## Samples", ""]
    for r in rows:
        if r["kind"] == "model":
            lines += [f"**{r['model']}**", "", _image(out / "figures" / f"grid_{r['model']}.png", r["model"]), ""]
    create_markdown_artifact("\n".join(lines), key="evaluate-report",
                             description="The report's headline, sample grids and where its files are")


def publish_sample(repo: Path, params: Params) -> None:
    root = (repo / params.sample.out_dir).resolve()
    lines = ["# Samples", "", f"Folder: `{root}` (one sub-folder per model: PNGs, `orders.parquet`, `grid.png`).", ""]
    for spec in params.sample.models:
        meta = _read_json(root / spec.name / "meta.json")
        lines += [f"## {spec.name}", "", f"{meta.get('n', '?')} images, order `{spec.order}`, from "
                  f"`{spec.checkpoint}`; one column per class.", "",
                  _image(root / spec.name / "grid.png", f"{spec.name} samples"), ""]
    create_markdown_artifact("\n".join(lines), key="samples", description="A sample grid per model")


def publish_extract(repo: Path, params: Params) -> None:
    from oar_core.order_table import parts, scan

    out = (repo / params.extract_orders.out_dir).resolve()
    if not parts(out):
        return
    import polars as pl

    summary = (scan(out, ["split", "nll_extracted", "nll_random", "checkpoint_hash"]).group_by("split")
               .agg(pl.len().alias("images"), pl.col("nll_extracted").mean().round(4),
                    pl.col("nll_random").mean().round(4), pl.col("checkpoint_hash").first())
               .sort("split").collect())
    rows = [{"split": r["split"], "images": r["images"],
             "bits/token along extracted orders (oracle diagnostic)": r["nll_extracted"],
             "bits/token along random orders": r["nll_random"], "checkpoint": r["checkpoint_hash"]}
            for r in summary.iter_rows(named=True)]
    create_table_artifact(rows, key="extracted-orders", description=(
        f"The orders table `{out}`, per split. The extracted orders look at the answer "
        f"(score {params.extract_orders.location.score}), so their bits/token are a diagnostic, not a likelihood."))


def publish_ingest(repo: Path, params: Params) -> None:
    out = (repo / params.ingest.out_dir).resolve()
    manifest, report = _read_json(out / "manifest.json"), _read_json(out / "report.json")
    if not manifest:
        return
    counts = manifest.get("counts", {})
    lines = ["# Ingested images", "", f"`{manifest.get('source')}` -> `{out}`", "",
             f"train {counts.get('train')}, test {counts.get('test')} images of {manifest.get('image_size')}px, "
             f"{manifest.get('channels')} channel(s), {manifest.get('num_classes')} classes.", "",
             f"Skipped: {report.get('n_skipped', 0)} file(s)"
             + (f" ({', '.join(f'{k}: {n}' for k, n in report['by_kind'].items())})" if report.get("by_kind") else "")
             + f"; details in `{out / 'report.json'}`."]
    changed = report.get("changed", {})
    if changed:
        lines += ["", "Changed on the way in: " + ", ".join(f"{k}: {n}" for k, n in changed.items()) + "."]
    create_markdown_artifact("\n".join(lines), key="ingest", description="What ingest kept, skipped and changed")


def announce_params(ours: list[str], changes: dict[str, tuple], sections) -> None:
    """On the run's page: which keys the run gave and what it changed in params.yaml. The form sends nothing for a
    field left empty, or for a number field holding text (the browser empties it): such a key is not among those
    the run gave, which this makes visible instead of silent."""
    lines = ["# Parameters of this run", ""]
    if ours:
        lines += ["| key given by this run | params.yaml before | now |", "|---|---|---|"]
        lines += [f"| `{k}` | {changes[k][0]!r} | {changes[k][1]!r} |" if k in changes else
                  f"| `{k}` | (the same) | (unchanged) |" for k in ours]
    else:
        lines.append("**This run gave no key**: it ran on params.yaml as it is.")
    lines += ["", f"Every other key of {', '.join(f'`{s}`' for s in sections)} kept params.yaml's value. A form field "
              "left empty is not sent, and neither is a number field holding something that is not a number (the "
              "browser empties it): if a value you typed is missing above, it was not sent."]
    create_markdown_artifact("\n".join(lines), key="run-parameters", description="What this run changed")


PUBLISHERS = {"evaluate": publish_evaluate, "sample": publish_sample, "extract_orders": publish_extract,
              "ingest": publish_ingest}
