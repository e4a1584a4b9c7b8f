"""The in-domain feature network evaluate measures in: a small CNN trained by the feature_net stage on the ingest
train labels (on one-class data, on rotations), and its checkpoint."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from oar_core.checkpoint import load_checkpoint, save_checkpoint
from oar_core.image_shards import to_float_BCHW

INDOMAIN_NAME = "oar-indomain-cnn"


class SmallCNN(nn.Module):
    """Three conv stages (full, 1/2, 1/4 resolution) + global average pool: size-agnostic, ~25k params,
    ~2M multiply-adds per 28x28 image so it trains in about a minute on 2 CPU cores (~90% on Fashion-MNIST)."""

    def __init__(self, channels: int = 1, num_classes: int = 10, width: int = 16, feat_dim: int = 64,
                 image_size: int = 28, task: str = "classes"):
        super().__init__()
        self.config = dict(channels=channels, num_classes=num_classes, width=width, feat_dim=feat_dim,
                           image_size=image_size, task=task)
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, feat_dim, 3, padding=1), nn.BatchNorm2d(feat_dim), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(feat_dim, num_classes)

    def features(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat_BF = self.body(x_BCHW * 2 - 1)
        return feat_BF, self.head(feat_BF)

    def forward(self, x_BCHW):
        return self.features(x_BCHW)[1]


def rotated(x_BCHW: torch.Tensor, k_B: torch.Tensor) -> torch.Tensor:
    """Each image turned by k_B[b] quarter turns."""
    x_BCHW = x_BCHW.clone()
    for k in range(1, 4):
        x_BCHW[k_B == k] = torch.rot90(x_BCHW[k_B == k], k, (2, 3))
    return x_BCHW


@torch.no_grad()
def classifier_accuracy(model: SmallCNN, images_NHWC: np.ndarray, labels_N: np.ndarray, batch: int = 500) -> float:
    """Test accuracy on its task: the class, or (one-class data) the rotation, image i turned i % 4 times."""
    model.eval()
    correct = 0
    for i in range(0, len(images_NHWC), batch):
        x, y = to_float_BCHW(images_NHWC[i: i + batch]), torch.as_tensor(labels_N[i: i + batch])
        if model.config.get("task") == "rotation":
            y = torch.arange(i, i + len(x)) % 4
            x = rotated(x, y)
        correct += int((model(x).argmax(1) == y).sum())
    return correct / len(images_NHWC)


def save_classifier(path, model: SmallCNN, **extra) -> None:
    save_checkpoint(path, {"kind": INDOMAIN_NAME, "config": model.config, "state_dict": model.state_dict(), **extra})


def load_classifier(path) -> tuple[SmallCNN, dict]:
    ckpt = load_checkpoint(path, "in-domain feature network")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != INDOMAIN_NAME:
        raise ValueError(f"{path}: not an in-domain feature-network checkpoint (written by save_classifier); "
                         "run `dvc repro feature_net` (or unset feature_net.checkpoint)")
    try:
        model = SmallCNN(**ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, RuntimeError) as e:  # altered, or written by other code
        detail = " ".join(line.strip() for line in str(e).strip().splitlines()[:2])[:300]
        raise ValueError(f"{path}: feature-network checkpoint does not match its config ({detail}); "
                         "run `dvc repro feature_net` (or unset feature_net.checkpoint)") from None
    return model.eval(), ckpt
