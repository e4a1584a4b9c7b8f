"""One pydantic tree that validates `params.yaml`.

Each pipeline stage reads only its own section (`load_section`), so DVC, which tracks params per section,
reruns only the stages a change touches. Unknown keys and bad values are rejected with the key's path.
"""
from __future__ import annotations

import hashlib
import json
import reprlib
from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from oar_core.dag import read_params_yaml
from oar_core.names import (
    NEXT_POSITIONS,
    ORACLE_SCORES,
    POLICY_HEADS,
    SAMPLE_ORDERS,
    STEP_SCHEDULES,
    TRAIN_ORDERS,
    LocationRule,
)

MAX_SEED = 2**32 - 1  # numpy's legacy RandomState (torch-fidelity) takes seeds in [0, 2**32); torch in 64 bits
MAX_BATCH = 65536  # images per batch or forward: a generous ceiling (the defaults use 64-500)

# seeds index generators; batch sizes bound what one step allocates (an allocation that still fails is one line
# naming the key to lower: pipeline/_stage.py)
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH)]


class Section(BaseModel):
    # allow_inf_nan=False: every float is finite (`.inf` / `.nan` are refused with the key's path, not trained on)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    def digest(self) -> str:
        """Stable short hash of this section, stored beside artifacts so stale resumes are detected."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


class IngestParams(Section):
    source: str = "/usr/share/datasets/fashion-mnist"  # a folder or s3:// prefix: Fashion-MNIST idx files or images
    out_dir: str = "data/ingest"
    image_size: int = Field(28, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    on_size_mismatch: Literal["resize", "reject"] = "resize"
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0)  # folders/S3 only; Fashion-MNIST keeps its official split
    max_train: Optional[int] = Field(None, ge=1)
    max_test: Optional[int] = Field(None, ge=1)
    s3_timeout_s: float = Field(10.0, gt=0, le=3600)  # connect/read timeout per attempt for an s3:// source
    shard_size: int = Field(5000, ge=1, le=1_000_000)  # images per WebDataset shard of the output
    seed: Seed = 0

    @field_validator("source")
    @classmethod
    def _a_place(cls, v: str) -> str:
        if v == "fashion-mnist":  # the old keyword: dvc.yaml now tracks the source itself, so it must be a path
            raise ValueError("'fashion-mnist' is no longer a keyword: set the folder holding the idx .gz files, "
                             "e.g. /usr/share/datasets/fashion-mnist")
        return v


class TokenizerParams(Section):
    kind: Literal["oar", "diffusers_vq", "glyph"] = Field(
        "oar", description="oar: our VQ-VAE, trained here; diffusers_vq: a pretrained diffusers VQModel (its folder in "
        "checkpoint); glyph: the fixed Sudoku digit glyphs (exact, for builtin:sudoku sources)")
    checkpoint: Optional[str] = None  # oar: your own tokenizer .pt (skips training); diffusers_vq: the model folder
    grid: int = Field(7, ge=2, le=64)
    codebook_size: int = Field(256, ge=2, le=65536)
    code_dim: int = Field(32, ge=2, le=4096)
    hidden: int = Field(64, ge=8, le=4096)
    steps: int = Field(1500, ge=0)
    batch_size: BatchSize = 128
    lr: float = Field(2e-3, gt=0)
    commitment: float = Field(0.25, ge=0)
    # training images shuffled in a stream buffer (held still encoded)
    shuffle_buffer: int = Field(5000, ge=1, le=1_000_000)
    seed: Seed = 0

    @model_validator(mode="after")
    def _pretrained_needs_folder(self):
        if self.kind == "diffusers_vq" and not self.checkpoint:
            raise ValueError("kind 'diffusers_vq' needs checkpoint: the local folder of a diffusers VQModel "
                             "(config.json + weights, or a pipeline folder with one in vqvae/)")
        return self


class TokenizeParams(Section):
    out: str = "data/shards"  # local folder or s3:// prefix
    shard_size: int = Field(5000, ge=1, le=1_000_000)
    batch_size: BatchSize = 500  # images per tokenizer forward while encoding the stream


class ModelParams(Section):
    n_layer: int = Field(4, ge=1, le=1024, description="transformer blocks")
    n_head: int = Field(4, ge=1, le=1024, description="attention heads (must divide d_model)")
    d_model: int = Field(128, ge=8, le=65536, description="width of the residual stream")
    mlp_ratio: float = Field(4.0, gt=0, le=64, description="MLP hidden width / d_model")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout rate")
    class_cond: bool = Field(True, description="condition on the class label (needed for guidance)")
    next_position: Literal[NEXT_POSITIONS] = Field("both", description="how an input says where the next token "
                                                   "goes: the offset (the paper's), the absolute position, or both")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        return self


class TrainParams(Section):
    order: Literal[TRAIN_ORDERS] = "random"
    model: ModelParams = ModelParams()
    init_from: Optional[str] = None  # checkpoint to continue from (finetune)
    random_mix: float = Field(0.0, ge=0, le=1)  # fraction of random orders mixed into "given" training
    random_mix_end: Optional[float] = Field(None, ge=0, le=1)  # anneal random_mix linearly to this (RAR-style)
    policy_weight: float = Field(0.0, ge=0)  # >0: train a location-policy head on the given orders, loss weight
    # shared: a linear head whose loss trains the trunk too; own: an MLP of its own behind a stop-gradient
    policy_head: Literal[POLICY_HEADS] = "shared"
    out_dir: str = "models/random"
    steps: int = Field(1200, ge=1)
    batch_size: BatchSize = 64
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    cfg_dropout: float = Field(0.1, ge=0, le=1)  # label dropout for classifier-free guidance
    ckpt_every: int = Field(250, ge=1)
    eval_every: int = Field(250, ge=1)
    log_every: int = Field(25, ge=1)
    eval_batches: int = Field(8, ge=1)
    seed: Seed = 0

    @model_validator(mode="after")
    def _given_needs_orders(self):
        if self.policy_weight > 0 and self.order != "given":
            raise ValueError("policy_weight > 0 needs order='given' (the policy learns the extracted orders)")
        return self


CANDIDATE_CHUNK_DOC = (
    "Memory budget (MiB) for scoring confidence-order candidates: each forward scores as many candidate positions "
    "as fit their (rows x candidates x vocab) float32 logits in it (rows: the batch, doubled under CFG), at least "
    "one; a decode step peaks at about twice it. Only memory and speed depend on it: results agree up to float "
    "rounding (on CPU in fp32, bit for bit but for a sampled location rule's log q).")


class ExtractParams(Section):
    checkpoint: str = "models/random/model.pt"
    out_dir: str = "data/orders"
    # the same rule as a sampler's: greedy max_prob by default, the rule the model can follow when it samples
    # (gt_prob, which looks at the answer, taught overconfidence and a worse likelihood: README, the study)
    location: LocationRule = LocationRule()
    batch_size: BatchSize = 256
    splits: list[Literal["train", "test"]] = Field(["train", "test"], min_length=1)
    candidate_chunk_mb: float = Field(256.0, gt=0, description=CANDIDATE_CHUNK_DOC)
    seed: Seed = 0

    @field_validator("splits")
    @classmethod
    def _train_needed(cls, v: list[str]) -> list[str]:
        if "train" not in v:  # finetune learns the train orders, and parts of unlisted splits are deleted
            raise ValueError("must include 'train' (finetune learns the train images' orders); add 'test' for the "
                             "held-out diagnostics")
        return v


class SampleModelParams(Section):
    name: str = Field(description="folder name under sample.out_dir and the model's name in the metrics")
    checkpoint: str = Field(description="the model checkpoint to sample from")
    order: Literal[SAMPLE_ORDERS] = Field(description="generation order: a fixed one, random, confidence (the "
                                          "location rule) or policy (the learned location head)")
    location: LocationRule = Field(LocationRule(), description="the location rule of confidence/policy orders")
    steps: Optional[int] = Field(None, ge=1, le=MAX_BATCH, description="parallel decoding: that many forwards for "
                                 "the whole grid (null: one token per step), tokens per step by the schedule")
    schedule: Literal[STEP_SCHEDULES] = Field("constant", description="tokens per parallel step: constant, linear, "
                                              "cosine or arccos (few early, many late)")

    @field_validator("location")
    @classmethod
    def _no_oracle(cls, v: LocationRule) -> LocationRule:
        if v.score in ORACLE_SCORES:
            raise ValueError(f"score {v.score!r} reads the ground truth: it is for extract_orders only; a sampler "
                             f"uses max_prob, margin or neg_entropy")
        return v


DEFAULT_SAMPLE_MODELS = [
    SampleModelParams(name="raster", checkpoint="models/raster/model.pt", order="raster"),
    SampleModelParams(name="any-order", checkpoint="models/random/model.pt", order="random"),
    SampleModelParams(name="oar", checkpoint="models/oar/model.pt", order="confidence",
                      location=LocationRule(temperature=1.0, anneal="linear")),
    SampleModelParams(name="oar-policy", checkpoint="models/oar/model.pt", order="policy",
                      location=LocationRule(temperature=1.0)),
]


class SampleParams(Section):
    out_dir: str = "samples"
    tokenizer: str = "models/tokenizer.pt"
    models: list[SampleModelParams] = Field(DEFAULT_SAMPLE_MODELS, min_length=1)
    # FID needs a feature covariance, KID its subsets and precision/recall k=3 neighbours: below 10 samples the
    # numbers are noise or fail
    n_per_model: int = Field(500, ge=10, le=1_000_000)
    batch_size: BatchSize = 250
    temperature: float = Field(1.0, ge=1e-4)  # logits / temperature overflows float32 near 0
    top_k: Optional[int] = Field(None, ge=1)
    cfg_scale: float = Field(2.5, ge=0, le=100)  # uncond + s * (cond - uncond); 1 = no guidance
    cfg_schedule: Literal["constant", "linear"] = "constant"  # linear: ramp from 1 to cfg_scale over the steps
    candidate_chunk_mb: float = Field(256.0, gt=0, description=CANDIDATE_CHUNK_DOC)
    seed: Seed = 0

    @model_validator(mode="after")
    def _unique_names(self):
        names = [m.name for m in self.models]
        # dvclive: where a trial run keeps its metrics inside sample.out_dir (pipeline/_stage.py own_roots)
        if len(set(names)) != len(names) or any(not n or "/" in n or n.startswith(".") or n == "dvclive"
                                                for n in names):
            raise ValueError(f"sample.models names must be unique plain folder names other than 'dvclive', got "
                             f"{quote(names)}")
        return self


class CompletionMask(Section):
    """One fixed mask of the `complete` stage: a box in fractions of the image (x0, y0, x1, y1), the region to
    generate (`outpaint`: the region kept), or `random`: that fraction of each image's tokens generated."""
    name: str = Field(description="the mask's name in the metrics and the report")
    box: Optional[tuple[float, float, float, float]] = Field(
        None, description="[x0, y0, x1, y1] in fractions of the image: the region to generate (outpaint: to keep)")
    mode: Literal["inpaint", "outpaint"] = Field("inpaint", description="inpaint: generate the box; outpaint: keep "
                                                 "the box and generate the rest")
    random: Optional[float] = Field(None, gt=0, lt=1, description="instead of a box: this fraction of each image's "
                                    "tokens generated, drawn at random")

    @model_validator(mode="after")
    def _one_region(self):
        if (self.box is None) == (self.random is None):
            raise ValueError(f"mask {self.name!r}: give box [x0, y0, x1, y1] (fractions of the image) or random "
                             f"(a fraction of the tokens), one of them")
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise ValueError(f"mask {self.name!r}: box {list(self.box)} needs 0 <= x0 < x1 <= 1 and "
                                 f"0 <= y0 < y1 <= 1")
        if self.random is not None and self.mode == "outpaint":
            raise ValueError(f"mask {self.name!r}: random masks are inpaint only")
        return self


DEFAULT_MASKS = [
    CompletionMask(name="centre", box=(0.25, 0.25, 0.75, 0.75)),
    CompletionMask(name="bottom_half", box=(0, 0.5, 1, 1)),  # raster sees all it needs: the known half comes first
    CompletionMask(name="top_half", box=(0, 0, 1, 0.5)),  # the known half comes after: raster cannot see it
    CompletionMask(name="left_half", box=(0, 0, 0.5, 1)),
    CompletionMask(name="outpaint_top_left", box=(0, 0, 0.5, 0.5), mode="outpaint"),
    CompletionMask(name="random_half", random=0.5),
]


class CompleteParams(Section):
    """Completions measured: every `sample.models` entry completes the same held-out test images under each mask
    (with sample's temperature / top-k, no class given; evaluate scores them)."""
    out_dir: str = "completions"
    n_images: int = Field(100, ge=10, le=10000)  # the first test images (class-mixed)
    batch_size: BatchSize = 100
    masks: list[CompletionMask] = Field(DEFAULT_MASKS, min_length=1)
    seed: Seed = 0

    @model_validator(mode="after")
    def _unique_names(self):
        names = [m.name for m in self.masks]
        if len(set(names)) != len(names) or any(not n or "/" in n or n.startswith(".") for n in names):
            raise ValueError(f"complete.masks names must be unique plain folder names, got {quote(names)}")
        return self


class FeatureNetParams(Section):
    """The in-domain feature network evaluate measures in: a small CNN trained on the ingest train labels."""
    checkpoint: Optional[str] = None  # adopt this feature-network checkpoint instead of training one
    steps: int = Field(800, ge=1)
    batch_size: BatchSize = 128
    lr: float = Field(2e-3, gt=0)
    seed: Seed = 0


class EvaluateParams(Section):
    out_dir: str = "reports"
    inception_weights: Optional[str] = None  # local torch-fidelity Inception weights; standard FID/IS only if set
    kid_subset_size: int = Field(100, ge=2)
    nll_batch_size: BatchSize = 250
    nll_orders: int = Field(2, ge=1, le=1000)  # orders drawn per test image for stochastic samplers' likelihood bounds
    calibration_images: int = Field(500, ge=1, le=1_000_000)  # held-out images for the greedy-order calibration
    strip_steps: int = Field(8, ge=2, le=256)  # partial canvases in the generation-order strip
    seed: Seed = 0


class Params(Section):
    ingest: IngestParams = IngestParams()
    tokenizer: TokenizerParams = TokenizerParams()
    tokenize: TokenizeParams = TokenizeParams()
    train_raster: TrainParams = TrainParams(order="raster", out_dir="models/raster")
    train_random: TrainParams = TrainParams(order="random", out_dir="models/random")
    extract_orders: ExtractParams = ExtractParams()
    finetune: TrainParams = TrainParams(
        order="given", init_from="models/random/model.pt", out_dir="models/oar",
        random_mix=0.2, policy_weight=0.3, steps=400, lr=3e-4, min_lr=3e-5, warmup_steps=50,
    )
    sample: SampleParams = SampleParams()
    complete: CompleteParams = CompleteParams()
    feature_net: FeatureNetParams = FeatureNetParams()
    evaluate: EvaluateParams = EvaluateParams()

    @model_validator(mode="after")
    def _grid_divides_image(self):
        """The tokenizer halves the image k times down to the grid: image_size must be grid * 2^k, else every
        image would be resampled to the nearest such size and back."""
        size, grid = self.ingest.image_size, self.tokenizer.grid
        ratio = size / grid
        if self.tokenizer.checkpoint is None and (ratio != int(ratio) or int(ratio) & (int(ratio) - 1)):
            grids = [size >> k for k in range(size.bit_length()) if (size >> k) << k == size and size >> k >= 2]
            sizes = sorted({grid << k for k in range(8)}, key=lambda s: abs(s - size))[:2]
            raise ValueError(f"ingest.image_size ({size}) must be tokenizer.grid ({grid}) times a power of 2: use "
                             f"tokenizer.grid in {grids} or ingest.image_size in {sorted(sizes)}")
        return self


class ParamsError(ValueError):
    pass


QUOTE_CHARS = 80


class _Prefix(reprlib.Repr):
    def repr_str(self, x, level):  # a prefix (quote() then adds the ellipsis), not reprlib's 'ab...yz'
        return repr(x[: self.maxstring])


_REPR = _Prefix()  # bounded work and length however large the value (a 10 MB string, a deep list)
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 3, 6, 6, 4
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 2 * QUOTE_CHARS


def quote(value) -> str:
    """repr(value) for an error message, cut to QUOTE_CHARS characters with an ellipsis."""
    r = _REPR.repr(value)
    return r if len(r) <= QUOTE_CHARS else r[: QUOTE_CHARS - 1] + "…"


def problems(err: ValidationError) -> list[str]:
    """One `key: what is wrong (got value)` per problem; a rule across keys names them in its own message."""
    out = []
    for e in err.errors():
        msg, key = e["msg"].removeprefix("Value error, "), ".".join(map(str, e["loc"]))
        if not key:
            out.append(msg)
        elif e["type"] == "extra_forbidden":
            out.append(f"{key}: unknown key (check spelling; see params.yaml for valid keys)")
        else:
            got = "" if isinstance(e.get("input"), dict) else f" (got {quote(e.get('input'))})"
            out.append(f"{key}: {msg}{got}")
    return out


def _format(err: ValidationError, path: Path) -> str:
    return "\n  ".join([f"{path}: invalid parameters ({err.error_count()} problem(s)); fix these keys:",
                        *problems(err)])


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = read_params_yaml(path)
    except ValueError as e:  # not found, not YAML, a duplicated key, an alias
        raise ParamsError(str(e)) from None
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_format(e, path)) from None


def upstream_paths(params: Params) -> dict[str, str]:
    """Where each stage finds what an earlier stage wrote: read from that stage's own output key, so a user who
    moves an output changes it once (dvc.yaml interpolates the same keys)."""
    return {"ingest_dir": params.ingest.out_dir, "shards": params.tokenize.out,
            "orders_dir": params.extract_orders.out_dir, "samples": params.sample.out_dir,
            "completions": params.complete.out_dir}


def load_section(name: str, path: str | Path = "params.yaml") -> Section:
    """Validate the whole file (so typos anywhere are caught) and return one stage's section."""
    return getattr(load_params(path), name)
