"""Stage `feature_net`: train evaluate's in-domain feature network on the ingested train split (or adopt
feature_net.checkpoint): cached by DVC, so every evaluation of the same data uses the same feature space."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from oar_core.feature_net import SmallCNN, classifier_accuracy, load_classifier, rotated, save_classifier
from oar_core.image_shards import load_split, to_float_BCHW
from oar_core.live import log_stage
from oar_core.params import FeatureNetParams
from pipeline._stage import stage_main


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


def run_feature_net(p: FeatureNetParams, ingest_dir: str, out="models/feature_net.pt",
                    live_dir="dvclive/feature_net", progress: bool = True) -> dict:
    """Train the in-domain feature network on the ingested train split (or adopt p.checkpoint), once per data:
    every evaluation of the same data then measures in the same feature space. Summary: `<live_dir>/metrics.json`."""
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


def main(argv=None):
    return stage_main(__doc__, "feature_net", lambda p, a: run_feature_net(p, a.ingest_dir), argv,
                      lambda ap: ap.add_argument("--ingest-dir", help="default: from params.yaml"), summary=lambda r: (
        f"{r['task']} network ({r['source']}), test accuracy {r['test_accuracy']:.3f}"))


if __name__ == "__main__":
    main()
