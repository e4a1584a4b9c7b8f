"""The in-domain feature space and sample-quality metrics without internet: FID / KID / IS / precision-recall
through torch-fidelity.

- in-domain (always): a small CNN trained by the `feature_net` stage on the ingest train split's labels (on
  one-class data: on rotations, self-supervised). Its pooled features feed FID/KID/precision/recall and its
  logits IS. Registered with torch-fidelity as `oar-indomain-cnn`, its weights passed as
  `feature_extractor_weights_path`, so nothing is ever downloaded.
- Inception (optional): torch-fidelity's standard `inception-v3-compat`, only when a local weights file is
  given (torch-fidelity would otherwise download it at first use). torch-fidelity unpickles that file with
  weights_only=False, so it never sees the user's file: read_inception_weights loads it safely, and
  inception_weights_file hands torch-fidelity a private copy holding only those tensors.
torch-fidelity 0.4 takes a torch Dataset whose items are uint8 tensors of shape (3, H, W); grayscale images
are repeated to 3 channels and the in-domain extractor converts them back."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from oar_core.checkpoint import file_kind, load_pickle_weights_only, one_line
from oar_core.feature_net import INDOMAIN_NAME, load_classifier
from oar_core.figures import to_uint8_NHWC
from oar_core.image_shards import to_float_BCHW
from oar_core.storage import read_bytes, temp_dir

INCEPTION_NAME = "inception-v3-compat"


# torch-fidelity (and the torchvision it pulls in) takes seconds to import: imported where a metric is computed
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
    splits = max(1, min(10, len(gen_NHWC) // 50))  # IS over splits of at least 50 images
    kw = dict(input1=gen, input2=UInt8Images(real_NHWC), cuda=torch.cuda.is_available(),
              fid=True, kid=True, isc=True, prc=True, feature_extractor=feature_extractor,
              feature_extractor_weights_path=weights_path, kid_subset_size=subset,
              isc_splits=splits, batch_size=batch_size, rng_seed=seed,
              save_cpu_ram=True,  # no DataLoader worker processes: pointless for in-memory arrays on 2 cores
              datasets_download=False, verbose=False, cache=cache_dir is not None and real_cache_name is not None)
    if feature_extractor == INDOMAIN_NAME:
        kw.update(feature_layer_fid="pool", feature_layer_kid="pool", feature_layer_isc="logits",
                  feature_layer_prc="pool")
    if kw["cache"]:
        kw.update(cache_root=cache_dir, input2_cache_name=real_cache_name)
    m = torch_fidelity.calculate_metrics(**kw)
    # one split (under 100 images) has no spread: torch-fidelity's std is then 0 by construction, so none is reported
    return {"fid": m["frechet_inception_distance"], "kid": m["kernel_inception_distance_mean"],
            "kid_std": m["kernel_inception_distance_std"], "is": m["inception_score_mean"],
            **({"is_std": m["inception_score_std"]} if splits > 1 else {}), "precision": m["precision"],
            "recall": m["recall"]}


INCEPTION_FIX = ("point it at torch-fidelity's pt_inception-2015-12-05 weights (a .pth or .safetensors file), or set "
                 "evaluate.inception_weights: null to skip standard Inception metrics")


def read_inception_weights(path: str) -> dict[str, torch.Tensor]:
    """The Inception state dict in `path`, read once and without running code: a safetensors file, or a torch.save
    pickle through torch's weights-only unpickler (torch-fidelity's own release is one). What torch-fidelity later
    loads is rebuilt from these tensors (inception_weights_file), never the user's file, so swapping the file after
    this check changes nothing."""
    where = f"evaluate.inception_weights={path!r}"
    if not Path(path).is_file():
        raise ValueError(f"{where}: file not found; {INCEPTION_FIX}")
    data = read_bytes(path)
    kind = file_kind(data)
    if kind == "safetensors":
        try:
            state = safetensors.torch.load(data)
        except Exception as e:  # SafetensorError: truncated or corrupt
            raise ValueError(f"{where}: unreadable safetensors ({one_line(e)}); {INCEPTION_FIX}") from None
    elif kind == "pickle":
        state = load_pickle_weights_only(where, data, fix=INCEPTION_FIX)
    else:
        raise ValueError(f"{where}: neither a safetensors file nor a torch weights file; {INCEPTION_FIX}")
    # plain tensors only (a Parameter detaches to one), so the copy torch-fidelity unpickles holds nothing else
    plain = isinstance(state, dict) and state and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) and type(v.detach()) is torch.Tensor
        for k, v in state.items())
    if not plain:
        raise ValueError(f"{where}: not a state dict (names -> tensors); {INCEPTION_FIX}")
    return {k: v.detach() for k, v in state.items()}


def inception_weights_file(state: dict[str, torch.Tensor], folder: str, path: str) -> str:
    """Write `state` (from read_inception_weights) into `folder`, a private scratch folder (temp_cache_dir: mode
    0700), for torch-fidelity's `feature_extractor_weights_path`, and check that its Inception-v3 takes it. The
    pickle torch-fidelity unpickles is one we wrote from plain tensors; `path` (the user's file) names errors only."""
    copy = Path(folder) / "inception-weights.pth"
    torch.save(state, copy)
    _import_fidelity()
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    try:  # the full key and shape check, by torch-fidelity's own module, before any image is scored
        FEATURE_EXTRACTORS_REGISTRY[INCEPTION_NAME](INCEPTION_NAME, ["2048"], feature_extractor_weights_path=str(copy))
    except RuntimeError as e:
        raise ValueError(f"evaluate.inception_weights={path!r}: not torch-fidelity's Inception-v3 weights "
                         f"({one_line(e)}); {INCEPTION_FIX}") from None
    return str(copy)


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


def in_space(m: dict, space: str) -> dict:
    """{"fid": .., "kid_std": ..} -> {"fid_<space>": .., "kid_<space>_std": ..}: keys say the feature space."""
    return {(f"{k[:-4]}_{space}_std" if k.endswith("_std") else f"{k}_{space}"): v for k, v in m.items()}


def temp_cache_dir() -> tempfile.TemporaryDirectory:
    """A per-run torch-fidelity cache (never $TORCH_HOME): real features computed once, reused per model; the caches
    killed runs leaked are removed."""
    return temp_dir("oar-fidelity")


@torch.no_grad()
def reconstruct(tokenizer, images_NHWC, batch_size: int = 500):
    """uint8 images through the tokenizer and back: the floor no token model can beat (same format out)."""
    device = next(tokenizer.parameters()).device
    return np.concatenate([to_uint8_NHWC(tokenizer.decode(tokenizer.encode(to_float_BCHW(images_NHWC[i:i + batch_size],
                                                                                         device))).float())
                           for i in range(0, len(images_NHWC), batch_size)])
