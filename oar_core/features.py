"""The in-domain feature space and sample-quality metrics without internet: FID / KID / IS / precision-recall
through torch-fidelity.

- in-domain (always): a small CNN trained by the `feature_net` stage on the ingest train split's labels (on
  one-class data: on rotations, self-supervised). Its pooled features feed FID/KID/precision/recall and its
  logits IS. Registered with torch-fidelity as `oar-indomain-cnn`, its weights passed as
  `feature_extractor_weights_path`, so nothing is ever downloaded.
- Inception (optional): torch-fidelity's standard `inception-v3-compat`, only when a local weights file is
  given (torch-fidelity would otherwise download it at first use).
torch-fidelity 0.4 takes a torch Dataset whose items are uint8 tensors of shape (3, H, W); grayscale images
are repeated to 3 channels and the in-domain extractor converts them back.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from oar_core.io import load_torch, save_torch, temp_dir
from oar_core.live import log_stage
from oar_core.params import FeatureNetParams
from oar_core.tokenizer import to_float_BCHW

INDOMAIN_NAME = "oar-indomain-cnn"
INCEPTION_NAME = "inception-v3-compat"


# ---- the in-domain classifier -----------------------------------------------------------------------
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


def train_classifier(images_NHWC: np.ndarray, labels_N: np.ndarray, steps: int, batch_size: int = 128,
                     lr: float = 2e-3, seed: int = 0, progress: bool = True) -> SmallCNN:
    """Train on uint8 images with random horizontal flips (label-preserving for products/objects). Data with one
    class (an unlabelled folder) has nothing to classify, and features trained on a constant label are
    meaningless: the network then learns to tell which of 4 rotations an image was given (Gidaris et al.,
    2018), a self-supervised task whose features still separate shapes."""
    torch.manual_seed(seed)
    N, H, W, C = images_NHWC.shape
    num_classes = int(labels_N.max()) + 1
    task = "classes" if num_classes >= 2 else "rotation"
    model = SmallCNN(C, num_classes if task == "classes" else 4, image_size=H, task=task)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    x_all, y_all = to_float_BCHW(images_NHWC), torch.as_tensor(labels_N, dtype=torch.long)
    model.train()
    for _ in tqdm(range(steps), desc="in-domain classifier", unit="step", disable=not progress, mininterval=2):
        idx = torch.randint(N, (min(batch_size, N),), generator=g)
        x, y = x_all[idx], y_all[idx]
        flip = torch.rand(len(idx), generator=g) < 0.5
        x[flip] = x[flip].flip(-1)
        if task == "rotation":
            y = torch.randint(4, (len(idx),), generator=g)
            x = rotated(x, y)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


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
    save_torch(path, {"kind": "oar-indomain-cnn", "config": model.config, "state_dict": model.state_dict(), **extra})


def load_classifier(path) -> tuple[SmallCNN, dict]:
    ckpt = load_torch(path, "in-domain feature network")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "oar-indomain-cnn":
        raise ValueError(f"{path}: not an in-domain feature-network checkpoint (written by save_classifier); "
                         "run `dvc repro feature_net` (or unset feature_net.checkpoint)")
    model = SmallCNN(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


# ---- torch-fidelity plumbing ------------------------------------------------------------------------
def _import_fidelity():
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    return torch_fidelity, FeatureExtractorBase


def indomain_extractor_class():
    """The FeatureExtractorBase subclass, built lazily so importing this module does not import torch-fidelity."""
    _, FeatureExtractorBase = _import_fidelity()

    class InDomainExtractor(FeatureExtractorBase):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if not feature_extractor_weights_path:
                # never fall back to a download: this extractor only exists as a local file
                raise ValueError(f"{INDOMAIN_NAME} needs feature_extractor_weights_path (a save_classifier file)")
            self.net, _ = load_classifier(feature_extractor_weights_path)

        @staticmethod
        def get_provided_features_list():
            return ("pool", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "pool", "kid": "pool", "prc": "pool"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 28, 28, dtype=torch.uint8)

        def forward(self, x_B3HW: torch.Tensor):
            if x_B3HW.dtype != torch.uint8 or x_B3HW.dim() != 4 or x_B3HW.shape[1] != 3:
                raise ValueError(f"expected uint8 (B,3,H,W) images, got {x_B3HW.dtype} {tuple(x_B3HW.shape)}")
            x = x_B3HW.float() / 255
            cfg = self.net.config
            if cfg["channels"] == 1:  # torch-fidelity speaks RGB; our gray images were repeated to 3 channels
                x = x.mean(1, keepdim=True)
            if x.shape[-1] != cfg["image_size"] or x.shape[-2] != cfg["image_size"]:
                x = F.interpolate(x, size=(cfg["image_size"],) * 2, mode="bilinear", antialias=True)
            feat_BF, logits_BK = self.net.features(x)
            by_name = {"pool": feat_BF, "logits": logits_BK}
            return tuple(by_name[f] for f in self.features_list)

    return InDomainExtractor


def register_indomain() -> None:
    """Register once per process (torch-fidelity refuses a second registration under the same name)."""
    _import_fidelity()
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if INDOMAIN_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(INDOMAIN_NAME, indomain_extractor_class())


class UInt8Images(Dataset):
    """(N,H,W,C) uint8 array -> items of uint8 (3,H,W) tensors, the input torch-fidelity 0.4 expects."""

    def __init__(self, images_NHWC: np.ndarray):
        if images_NHWC.dtype != np.uint8 or images_NHWC.ndim != 4:
            raise ValueError(f"expected uint8 (N,H,W,C) images, got {images_NHWC.dtype} {images_NHWC.shape}")
        self.images_NHWC = images_NHWC

    def __len__(self):
        return len(self.images_NHWC)

    def __getitem__(self, i):
        x_CHW = torch.from_numpy(np.ascontiguousarray(self.images_NHWC[i])).permute(2, 0, 1)
        return x_CHW.expand(3, -1, -1).contiguous() if x_CHW.shape[0] == 1 else x_CHW


def fidelity_metrics(gen_NHWC: np.ndarray | Dataset, real_NHWC: np.ndarray, feature_extractor: str, weights_path: str,
                     kid_subset_size: int = 100, seed: int = 0, batch_size: int = 250, cache_dir: str | None = None,
                     real_cache_name: str | None = None) -> dict:
    """FID / KID / IS and k-NN precision / recall (diversity) of generated vs real images, in one feature
    space. IS is computed on the generated images only. The generated images may be an ImageFiles (read lazily).

    `real_cache_name` lets torch-fidelity reuse the real images' features across models (in `cache_dir`)."""
    torch_fidelity, _ = _import_fidelity()
    register_indomain()
    n = min(len(gen_NHWC), len(real_NHWC))
    subset = min(kid_subset_size, n)  # torch-fidelity rejects a KID subset larger than either set
    gen = gen_NHWC if isinstance(gen_NHWC, Dataset) else UInt8Images(gen_NHWC)
    kw = dict(input1=gen, input2=UInt8Images(real_NHWC), cuda=torch.cuda.is_available(),
              fid=True, kid=True, isc=True, prc=True, feature_extractor=feature_extractor,
              feature_extractor_weights_path=weights_path, kid_subset_size=subset,
              isc_splits=max(1, min(10, len(gen_NHWC) // 50)), batch_size=batch_size, rng_seed=seed,
              save_cpu_ram=True,  # no DataLoader worker processes: pointless for in-memory arrays on 2 cores
              datasets_download=False, verbose=False, cache=cache_dir is not None and real_cache_name is not None)
    if feature_extractor == INDOMAIN_NAME:
        kw.update(feature_layer_fid="pool", feature_layer_kid="pool", feature_layer_isc="logits",
                  feature_layer_prc="pool")
    if kw["cache"]:
        kw.update(cache_root=cache_dir, input2_cache_name=real_cache_name)
    m = torch_fidelity.calculate_metrics(**kw)
    return {"fid": m["frechet_inception_distance"], "kid": m["kernel_inception_distance_mean"],
            "kid_std": m["kernel_inception_distance_std"], "is": m["inception_score_mean"],
            "is_std": m["inception_score_std"], "precision": m["precision"], "recall": m["recall"]}


def check_inception_weights(path: str) -> str:
    if not Path(path).is_file():
        raise ValueError(f"evaluate.inception_weights={path!r}: file not found; point it at a local "
                         "pt_inception-2015-12-05 weights file (torch-fidelity's) or set it to null to skip "
                         "standard Inception metrics")
    return path


# ---- reading generated images -----------------------------------------------------------------------
class ImageFiles(Dataset):
    """PNG files read one at a time, as torch-fidelity's uint8 (3,H,W) items: scoring 50k samples holds none of them
    in memory."""

    def __init__(self, files: list[Path], image_size: int, channels: int):
        self.files, self.image_size, self.channels = files, image_size, channels

    def __len__(self):
        return len(self.files)

    def image(self, i: int) -> np.ndarray:
        with Image.open(self.files[i]) as im:
            im = im.convert("L" if self.channels == 1 else "RGB")
            return np.array(im, dtype=np.uint8).reshape(self.image_size, self.image_size, self.channels)

    def __getitem__(self, i):
        x_CHW = torch.from_numpy(self.image(i)).permute(2, 0, 1)
        return x_CHW.expand(3, -1, -1).contiguous() if x_CHW.shape[0] == 1 else x_CHW


def image_folder(folder, image_size: int, channels: int) -> ImageFiles:
    """The `*.png` of `folder` except grid.png, checked from their headers: clear errors for a missing folder and
    mis-sized images before any scoring starts."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: generated-images folder not found; run `dvc repro sample` "
                         "(or python -m pipeline.sample) first")
    files = sorted(f for f in folder.glob("*.png") if f.name != "grid.png")
    if not files:
        raise ValueError(f"{folder}: no generated images (*.png); rerun `dvc repro sample`")
    for f in files:
        with Image.open(f) as im:  # reads the header only
            if im.size != (image_size, image_size):
                raise ValueError(f"{folder}: {f.name} is {im.size[0]}x{im.size[1]} but the real test images are "
                                 f"{image_size}x{image_size}; regenerate the samples with the current tokenizer "
                                 "(`dvc repro sample`) so both sets have the ingest size")
    return ImageFiles(files, image_size, channels)


def load_image_folder(folder, image_size: int, channels: int) -> np.ndarray:
    """image_folder's images as one (N,H,W,C) uint8 array."""
    images = image_folder(folder, image_size, channels)
    return np.stack([images.image(i) for i in range(len(images))])


def in_space(m: dict, space: str) -> dict:
    """{"fid": .., "kid_std": ..} -> {"fid_<space>": .., "kid_<space>_std": ..}: keys say the feature space."""
    return {(f"{k[:-4]}_{space}_std" if k.endswith("_std") else f"{k}_{space}"): v for k, v in m.items()}


def temp_cache_dir() -> tempfile.TemporaryDirectory:
    """A per-run torch-fidelity cache (never $TORCH_HOME): real features computed once, reused per model; the caches
    killed runs leaked are removed."""
    return temp_dir("oar-fidelity")




# ---- the feature_net stage --------------------------------------------------------------------------
def run_feature_net(p: FeatureNetParams, ingest_dir="data/ingest", out="models/feature_net.pt",
                    live_dir="dvclive/feature_net", progress: bool = True) -> dict:
    """Train the in-domain feature network on the ingested train split (or adopt p.checkpoint), once per data:
    every evaluation of the same data then measures in the same feature space. Summary: `<live_dir>/metrics.json`."""
    from oar_core.data import load_split

    train_NHWC, train_labels, _ = load_split(ingest_dir, "train")
    test_NHWC, test_labels, _ = load_split(ingest_dir, "test")
    if p.checkpoint:
        net, ckpt = load_classifier(p.checkpoint)
        if (net.config["channels"], net.config["image_size"]) != train_NHWC.shape[3:0:-2]:
            raise ValueError(f"{p.checkpoint}: made for {net.config['image_size']}px x{net.config['channels']} "
                             f"images, the ingested ones are {train_NHWC.shape[1]}px x{train_NHWC.shape[3]}; unset "
                             f"feature_net.checkpoint to train one on this data")
        source = {"source": p.checkpoint, "steps": ckpt.get("steps")}
    else:
        net = train_classifier(train_NHWC, train_labels, p.steps, p.batch_size, p.lr, p.seed, progress)
        source = {"source": "trained", "steps": p.steps}
    acc = round(classifier_accuracy(net, test_NHWC, test_labels), 4)
    save_classifier(out, net, **source, test_accuracy=acc)
    summary = {**source, "task": net.config.get("task", "classes"), "test_accuracy": acc}
    log_stage(live_dir, summary)
    return summary
