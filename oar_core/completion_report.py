"""How good the `complete` stage's completions are, per model and mask: FID / precision / recall against the test set
(in the in-domain feature space), the feature net's accuracy on the completions against each original's label (does
the completion keep what the visible part shows?), the missing tokens' bits/token the stage computed, and per mask a
picture of originals, masked inputs and every model's completions, for the report."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from oar_core.feature_net import INDOMAIN_NAME
from oar_core.fidelity import fidelity_metrics, image_folder, in_space, temp_cache_dir
from oar_core.figures import image_grid, save_png
from oar_core.image_shards import to_float_BCHW
from oar_core.storage import read_json

METRICS = ("fid_indomain", "precision_indomain", "recall_indomain", "accuracy", "missing_bits_per_token")


@torch.no_grad()
def completion_metrics(completions_dir, test_NHWC: np.ndarray, clf, clf_path: str, kid_subset_size: int, seed: int,
                       figures_dir, per_mask_shown: int = 8) -> tuple[dict, list[str]]:
    """({"complete_<model>": {"<mask>_<metric>": value}}, the report's markdown lines); pictures into figures_dir."""
    root = Path(completions_dir)
    if not root.is_dir():  # evaluate run by hand before the complete stage: the rest of the report stands alone
        return {}, ["## Completions", "", f"Skipped: no completions in `{root}`; run `dvc repro complete` (or "
                    "python -m pipeline.complete), then evaluate again."]
    meta = read_json(root / "meta.json", "no meta.json: the completions are incomplete; run `dvc repro complete`",
                     "rerun `dvc repro complete` (or python -m pipeline.complete)")
    labels_N = np.asarray(meta["labels"])
    size, channels = test_NHWC.shape[1], test_NHWC.shape[3]
    masks, models = [m["name"] for m in meta["masks"]], list(meta["models"])
    metrics: dict = {f"complete_{name}": {} for name in models}
    with temp_cache_dir() as cache:
        for name in models:
            for mask in masks:
                images = image_folder(root / "models" / name / mask, size, channels)
                m = in_space(fidelity_metrics(images, test_NHWC, INDOMAIN_NAME, clf_path, kid_subset_size, seed,
                                              cache_dir=cache, real_cache_name="real-test"), "indomain")
                completed = np.stack([images.image(i) for i in range(len(images))])
                pred = torch.cat([clf(to_float_BCHW(completed[i:i + 500])).argmax(1)
                                  for i in range(0, len(completed), 500)]).numpy()
                got = {**m, "accuracy": float((pred == labels_N[:len(pred)]).mean()),
                       "missing_bits_per_token": meta["models"][name]["masks"][mask]["missing_bits_per_token"]}
                metrics[f"complete_{name}"].update({f"{mask}_{k}": got[k] for k in METRICS
                                                    if got[k] is not None})
    return metrics, _section(root, meta, metrics, masks, models, figures_dir, per_mask_shown, test_NHWC)


def _pictures(root: Path, originals_NHWC: np.ndarray, mask: str, models: list[str], n: int) -> np.ndarray:
    size, channels = originals_NHWC.shape[1], originals_NHWC.shape[3]
    folders = [root / "masked" / mask, *(root / "models" / name / mask for name in models)]
    rows = [originals_NHWC[:n], *(np.stack([image_folder(f, size, channels).image(i) for i in range(n)])
                                  for f in folders)]
    return image_grid(np.concatenate(rows), ncol=n).repeat(2, 0).repeat(2, 1)


def _section(root, meta, metrics, masks, models, figures_dir, n_shown, test_NHWC) -> list[str]:
    fmt = lambda v, d=2: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = ["## Completions", "",
             f"Every model completes the same {meta['n_images']} held-out test images under each mask (the `complete` "
             "stage: no class given, so the known tokens are all it has). FID / precision / recall of the completed "
             "images against the test set in the in-domain feature space; accuracy: the feature net's class of each "
             "completion against the original's label; missing bits/token: held-out bits/token of the generated "
             "tokens given the known ones, as each model completes (an exact value or an upper bound; raster "
             "models trained in raster order only: computable only where every known token comes before every "
             "missing one in raster order, since no raster pass lets a token see the known ones after it).", ""]
    for mask in masks:
        spec = next(m for m in meta["masks"] if m["name"] == mask)
        where = (f"box {spec['box']} ({spec['mode']}: {'kept' if spec['mode'] == 'outpaint' else 'generated'})"
                 if spec.get("box") else f"{spec['random']:.0%} of the tokens generated, at random")
        first = meta["models"][models[0]]["masks"][mask]
        lines += [f"### {mask}: {where}, {first['generated_tokens_mean']:.1f} tokens generated", "",
                  "| model | FID | precision | recall | accuracy | missing bits/token | how |",
                  "|---|---|---|---|---|---|---|"]
        for name in models:
            d, how = metrics[f"complete_{name}"], meta["models"][name]["masks"][mask]["missing_bits_how"]
            lines.append(f"| {name} | {fmt(d.get(f'{mask}_fid_indomain'))} | "
                         f"{fmt(d.get(f'{mask}_precision_indomain'), 3)} | {fmt(d.get(f'{mask}_recall_indomain'), 3)} "
                         f"| {fmt(d.get(f'{mask}_accuracy'), 3)} | {fmt(d.get(f'{mask}_missing_bits_per_token'), 3)} "
                         f"| {how} |")
        n = min(n_shown, meta["n_images"])
        rel = f"figures/complete_{mask}.png"
        save_png(Path(figures_dir) / f"complete_{mask}.png", _pictures(root, test_NHWC, mask, models, n))
        lines += ["", f"Rows: the originals, the masked inputs (gray: generated), then {', '.join(models)}.", "",
                  f"![completions {mask}]({rel})", ""]
    return lines
