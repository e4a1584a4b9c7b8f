"""Test-only helpers: in-memory shortcuts around what the stages stream."""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from oar_core.fidelity import image_folder
from oar_core.image_shards import to_float_BCHW
from oar_core.storage import join
from oar_core.token_shards import token_sample
from oar_core.tokenizer import VQTokenizer
from oar_core.webds import shard_writer


@torch.no_grad()
def encode_all(model: VQTokenizer, images_NHWC: np.ndarray, device, batch_size: int = 1000,
               desc: str | None = None) -> np.ndarray:
    """Tokens (N,grid,grid) as uint16 (codebook_size <= 65536)."""
    out = []
    for i in tqdm(range(0, len(images_NHWC), batch_size), desc=desc, unit="batch", disable=desc is None, leave=False):
        out.append(model.encode(to_float_BCHW(images_NHWC[i:i + batch_size], device)).cpu().numpy().astype(np.uint16))
    return np.concatenate(out) if out else np.zeros((0, model.grid, model.grid), np.uint16)


def load_image_folder(folder, image_size: int, channels: int) -> np.ndarray:
    """image_folder's images as one (N,H,W,C) uint8 array."""
    images = image_folder(folder, image_size, channels)
    return np.stack([images.image(i) for i in range(len(images))])


def write_shards(out_prefix, split: str, tokens_NHW: np.ndarray, labels, ids, shard_size: int) -> list[str]:
    """Write in-memory token grids as shards of `shard_size` samples (see webds.shard_writer); returns their paths."""
    if not (len(tokens_NHW) == len(labels) == len(ids)):
        raise ValueError(f"write_shards: tokens ({len(tokens_NHW)}), labels ({len(labels)}) and ids ({len(ids)}) "
                         f"differ in length")
    with shard_writer(out_prefix, split, shard_size) as (writer, published):
        for g, (tokens_HW, label, id_) in enumerate(zip(tokens_NHW, labels, ids)):
            writer.write(token_sample(split, g, tokens_HW, label, id_))
    return [join(out_prefix, n) for n in published]
