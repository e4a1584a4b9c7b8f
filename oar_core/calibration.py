"""Is a model's confidence along its own greedy orders its accuracy? The check behind the choice of extraction score:
orders extracted with `gt_prob` (which looks at the answer) taught the finetuned model to be sure where it is not.

Teacher-forced on real images with the greedy `max_prob` location rule (the sampler's own): at each step the model
picks its most confident unfilled position; confidence is its top probability there, and the step is correct when
that top token is the true one. A calibrated model has mean confidence = accuracy, step by step."""
from __future__ import annotations

import torch

from oar_core.decode import teacher_forced
from oar_core.model import GPT
from oar_core.names import LocationRule


@torch.no_grad()
def greedy_calibration(model: GPT, tokens_NN: torch.Tensor, labels_N: torch.Tensor, batch_size: int = 250,
                       device="cpu") -> dict:
    """Mean confidence and accuracy overall and per generation step (lists of N), over the given images."""
    was_training = model.training
    model.eval()
    conf, correct = [], []
    rule = LocationRule(score="max_prob")
    for i in range(0, len(tokens_NN), batch_size):
        out = teacher_forced(model, tokens_NN[i:i + batch_size].to(device), labels_N[i:i + batch_size].to(device),
                             order="confidence", location=rule)
        # the chosen position's score is its top log-probability; the true token is that top one when its own
        # log-probability reaches it (1e-4: the commit's forward may differ from the scoring one in the last bits)
        conf.append(out["scores"].exp().cpu())
        correct.append((out["logp"] >= out["scores"] - 1e-4).float().cpu())
    model.train(was_training)
    conf_BN, correct_BN = torch.cat(conf), torch.cat(correct)
    return {"confidence": conf_BN.mean().item(), "accuracy": correct_BN.mean().item(),
            "confidence_per_step": conf_BN.mean(0).tolist(), "accuracy_per_step": correct_BN.mean(0).tolist()}
