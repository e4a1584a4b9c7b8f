"""Stage metrics and step-wise curves through DVCLive, in the layout `dvc metrics/plots/exp show` read:

    dvclive/<stage>/metrics.json                  the stage's summary (+ "step", the last step, where it has curves)
    dvclive/<stage>/plots/metrics/<name>.tsv      one curve: `step<TAB><name>` rows (train_loss, test_bits_per_token)
    dvclive/evaluate/<model>/metrics.json         evaluate: one summary per model (`dvc metrics show` prints a row
                                                  each)

dvc.yaml stays the one DAG of record: it declares these files, and DVCLive writes no dvc.yaml and saves no
experiment of its own (`dvc exp run` makes the experiments). A stage's folder is logged whole at the stage's end,
from history the stage keeps (train: in its run checkpoint), so a resumed run ends with the same bytes as an
uninterrupted one. DVCLive writes into a scratch folder outside the repository, which is copied beside the
stage's folder as the hidden `.<name>.partial/` and renamed into place: a killed run never leaves a half-written
file under a final name, and the next run removes what it left.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Callable, Iterable

from oar_core.io import remove_path, swap_in, temp_dir

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


def _files_only_live():
    from dvclive import Live

    class FilesOnlyLive(Live):
        """dvclive.Live that writes its files and nothing else: dvc.yaml declares them and `dvc exp run` records the
        experiment, so it needs no Git/DVC look-up of its own (which fails in a repository with no commit yet) and
        posts nothing to DVC Studio (this Live logs once, at the end, not live)."""

        def _init_dvc(self):
            self._dvc_file = self._init_dvc_file()

        def _init_studio(self):
            self._studio_events_to_skip = {"start", "data", "done"}

    return FilesOnlyLive


def _log(folder: Path, summary: dict, curves: dict) -> None:
    # no dvc.yaml of its own (dvc.yaml declares these files), no experiment of its own, no report
    live = _files_only_live()(str(folder), resume=False, report=None, save_dvc_exp=False, dvcyaml=False)
    last = None
    for name, rows in curves.items():
        for step, value in rows:
            live.step = int(step)
            live.log_metric(name, float(value))
            last = int(step) if last is None else max(last, int(step))
    live.summary = dict(summary)  # the stage's own summary, with the curves' last values already in it
    if last is not None:
        live.step = last  # make_summary adds it as "step"
    live.end()


def _publish(final, fill: Callable[[Path], object]) -> Path:
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = final.parent / f".{final.name}.partial"
    remove_path(staged)  # what a run killed here left
    # DVCLive logs outside the repository, then the result is copied in and renamed into place
    with temp_dir("oar-live") as scratch:  # a killed run's scratch folder is swept by the next
        fill(Path(scratch) / final.name)
        (Path(scratch) / final.name).mkdir(exist_ok=True)  # log_per_key of nothing: an empty folder
        shutil.copytree(Path(scratch) / final.name, staged)
    swap_in(staged, final)
    return final
