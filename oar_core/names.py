"""The names the project knows, defined once: generation orders, location scores, and the location rule's fields.

Params validate against these (`oar_core.params`); the code that acts on them lives in `orders`, `location` and
`decode`. Kept apart from that code so that editing how a rule picks reruns only the stages that decode.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

FIXED_ORDERS = ("raster", "spiral", "center_out", "halton")
ADAPTIVE_ORDERS = ("confidence", "policy")  # the location is chosen per image, step by step, while decoding
TRAIN_ORDERS = (*FIXED_ORDERS, "random", "given")  # given: each image's extracted order (finetune)
SAMPLE_ORDERS = (*FIXED_ORDERS, "random", *ADAPTIVE_ORDERS)

# how many tokens each step of a parallel decode places (oar_core.decode.step_sizes): the fraction of the grid filled
# after step s of S is r = s/S (constant: the same number per step), r^2 (linear: the number per step grows
# linearly), 1 - cos(pi/2 r) (MaskGIT's cosine) or 1 - arccos(r) / (pi/2) (arccos, ARPG's): few early, many late
STEP_SCHEDULES = ("constant", "linear", "cosine", "arccos")

# how an input tells the model where the next token goes (oar_core.model): the (dy, dx) offset from this token (the
# paper's), the next position itself, or both
NEXT_POSITIONS = ("relative", "absolute", "both")
POLICY_HEADS = ("shared", "own")  # see GPTConfig.policy_head

Score = Literal["max_prob", "margin", "neg_entropy", "gt_prob"]
SCORES = Score.__args__
ORACLE_SCORES = ("gt_prob",)  # read the ground truth: extraction only, never a sampler's rule


class LocationRule(BaseModel):
    """The one definition of a location rule: the `location:` block of a sampler (`sample.models[].location`,
    the edit command) and of extraction (`extract_orders.location`, the only place `gt_prob` is allowed)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    score: Score = Field("max_prob", description="confidence at each unfilled position: max_prob, margin (top-1 minus "
                         "top-2), neg_entropy; gt_prob (looks at the answer) for extraction only")
    temperature: float = Field(0.0, ge=0, allow_inf_nan=False, description="0 = greedy (ties broken at random); "
                               "tau > 0 samples softmax(score / tau), MaskGIT's Gumbel choice temperature")
    anneal: Literal["constant", "linear", "cosine"] = Field("constant", description="tau goes from `temperature` "
                                                            "to 0 over the steps")
    top_k: Optional[int] = Field(None, ge=1, description="sample among the k best-scored positions only")
    locality: float = Field(0.0, ge=0, allow_inf_nan=False, description="bonus per filled 4-neighbour fraction: "
                            "prefer growing from generated tokens")
    logits: Literal["cond", "guided"] = Field("cond", description="score locations on the conditional or the "
                                              "CFG-guided logits")
