"""Bench-only helpers."""
from __future__ import annotations

import numpy as np

from oar_core.model import GPT
from oar_core.params import SampleModelParams, SampleParams
from pipeline.sample import draw_batches, n_batches


def sample_model(model: GPT, tokenizer, spec: SampleModelParams, p: SampleParams, device,
                 progress: bool = True) -> dict:
    """All p.n_per_model images of one model in memory (benchmarks); the stage streams them to disk instead."""
    out = {"labels": [], "tokens": [], "order": [], "scores": [], "images": []}
    for _, labels_B, rows, images_BHWC in draw_batches(model, tokenizer, spec, p, device, list(range(n_batches(p))),
                                                       progress):
        for k, v in [("labels", labels_B), ("images", images_BHWC), *rows.items()]:
            out[k].append(v)
    return {k: np.concatenate(v) for k, v in out.items()}
