"""Stage metrics and step-wise curves in DVCLive's file layout, the one `dvc metrics/plots/exp show` read:

    dvclive/<stage>/metrics.json                  the stage's summary (+ "step", the last step, where it has curves)
    dvclive/<stage>/plots/metrics/<name>.tsv      one curve: `step<TAB><name>` rows (train_loss, test_bits_per_token)
    dvclive/evaluate/<model>/metrics.json         evaluate: one summary per model (`dvc metrics show` prints a row
                                                  each)

dvc.yaml stays the one DAG of record: it declares these files, and `dvc exp run` makes the experiments. A
stage's folder is written whole at the stage's end, from history the stage keeps (train: in its run checkpoint), so
a resumed run ends with the same bytes as an uninterrupted one; it is written beside the final folder as the hidden
`.<name>.partial/` and renamed into place: a killed run never leaves a half-written file under a final name, and
the next run removes what it left.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable, Iterable

from oar_core.storage import remove_path, swap_in

METRICS_FILE = "metrics.json"
CURVES_DIR = Path("plots") / "metrics"


def curve_path(live_dir, name: str) -> Path:
    """Where DVCLive keeps curve `name` of the stage folder `live_dir`."""
    return Path(live_dir) / CURVES_DIR / f"{name}.tsv"


def log_stage(live_dir, summary: dict, curves: dict[str, Iterable[tuple[int, float]]] | None = None) -> Path:
    """Write `live_dir` whole: metrics.json holds `summary`, and each curve its (step, value) rows."""
    return _publish(live_dir, lambda d: _log(d, summary, curves or {}))


def log_per_key(live_dir, summaries: dict[str, dict]) -> Path:
    """Write `live_dir` whole with one DVCLive folder per key, `<live_dir>/<key>/metrics.json`: `dvc metrics show`
    prints one row per key (e.g. per model) instead of one row as wide as all of them."""
    return _publish(live_dir, lambda d: [_log(d / key, summary, {}) for key, summary in summaries.items()])


def read_summary(live_dir) -> dict:
    """A stage's metrics.json (its summary)."""
    return json.loads((Path(live_dir) / METRICS_FILE).read_text())


def read_per_key(live_dir) -> dict[str, dict]:
    """What log_per_key wrote: {key: summary}."""
    return {d.name: read_summary(d) for d in sorted(Path(live_dir).iterdir())
            if d.is_dir() and (d / METRICS_FILE).exists()}


def read_curve(live_dir, name: str) -> tuple[list[float], list[float]]:
    """Curve `name` of a stage folder as (steps, values); empty lists where the stage has not logged it."""
    path, xs, ys = curve_path(live_dir, name), [], []
    if path.exists():
        with open(path, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                xs.append(float(row["step"]))
                ys.append(float(row[name]))
    return xs, ys


def _log(folder: Path, summary: dict, curves: dict) -> None:
    """The files DVCLive's Live.log_metric / Live.end write, byte for byte (metrics.json at indent 4 with the last
    step added, one `step<TAB>name` TSV per curve). Plain files are all a stage that logs once, at its end, needs:
    no Git or DVC look-up (which fails in a repository with no commit yet), no DVC Studio, no private hooks."""
    folder.mkdir(parents=True, exist_ok=True)
    last = None
    for name, rows in curves.items():
        rows = [(int(step), float(value)) for step, value in rows]
        if not rows:
            continue
        path = curve_path(folder, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"step\t{name}\n" + "".join(f"{step}\t{value!r}\n" for step, value in rows))
        last = max([r[0] for r in rows] + ([] if last is None else [last]))
    summary = dict(summary)  # the stage's own summary, with the curves' last values already in it
    if last is not None:
        summary["step"] = last
    (folder / METRICS_FILE).write_text(json.dumps(summary, indent=4, default=_plain) + "\n")


def _plain(v):
    """numpy scalars (e.g. a metric computed in float32) as the Python numbers JSON takes."""
    return v.item()


def _publish(final, fill: Callable[[Path], object]) -> Path:
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = final.parent / f".{final.name}.partial"
    remove_path(staged)  # what a run killed here left
    fill(staged)
    staged.mkdir(exist_ok=True)  # log_per_key of nothing: an empty folder
    swap_in(staged, final)
    return final
