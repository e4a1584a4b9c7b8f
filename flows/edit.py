"""A Prefect flow that runs the edit command (`python -m pipeline.edit`) on a folder of images, with typed
parameters, so a person can inpaint, outpaint or class-edit from the UI (served by `python -m flows.serve` as
`edit-images/edit-folder`). The run log streams the command's lines and names the folder the outputs land in:
`out_dir`, or by default `edits/<flow run name>` in the repository ($OAR_REPO or the current directory)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

from prefect import flow, get_run_logger
from pydantic import Field

from flows.pipeline import repo_dir, stream
from oar_core.names import SAMPLE_ORDERS, STEP_SCHEDULES, LocationRule

MODES = ("inpaint", "outpaint", "edit")  # oar_core.completion.MODES (not imported: it would load torch here)


def edit_command(folder: str, out: str, mode: str, box: str | None, mask: str | None, class_name: str | None,
                 n: int, order: str, location: LocationRule, temperature: float, top_k: int | None, cfg_scale: float,
                 cfg_schedule: str, seed: int, model: str, tokenizer: str, steps: int | None = None,
                 schedule: str = "constant") -> list[str]:
    """The command line a run executes: every option the form sets, none it leaves empty."""
    cmd = [sys.executable, "-m", "pipeline.edit", folder, "--out", out, "--mode", mode, "--n", str(n), "--order",
           order, "--temperature", str(temperature), "--cfg-scale", str(cfg_scale), "--cfg-schedule", cfg_schedule,
           "--seed", str(seed), "--model", model, "--tokenizer", tokenizer]
    for flag, value in (("--box", box), ("--mask", mask), ("--class", class_name), ("--top-k", top_k),
                        ("--steps", steps), ("--schedule", schedule if steps else None)):
        if value not in (None, ""):
            cmd += [flag, str(value)]
    for k, v in location.model_dump().items():
        if v is not None:
            cmd += [f"--location-{k.replace('_', '-')}", str(v)]
    return cmd


@flow(name="edit-images")
def edit_images(folder: str, box: Optional[str] = None, mask: Optional[str] = None,
                mode: Literal[MODES] = "inpaint", class_name: Optional[str] = None,
                n: Annotated[int, Field(ge=1, le=256)] = 8, order: Literal[SAMPLE_ORDERS] = "confidence",
                location: LocationRule = LocationRule(temperature=1.0, anneal="linear"),
                temperature: Annotated[float, Field(ge=1e-4)] = 1.0,
                top_k: Optional[Annotated[int, Field(ge=1)]] = None,
                cfg_scale: Annotated[float, Field(ge=0, le=100)] = 2.5,
                cfg_schedule: Literal["constant", "linear"] = "constant", seed: Annotated[int, Field(ge=0)] = 0,
                model: str = "models/oar/model.pt", tokenizer: str = "models/tokenizer.pt",
                steps: Optional[Annotated[int, Field(ge=1)]] = None, schedule: Literal[STEP_SCHEDULES] = "constant",
                out_dir: Optional[str] = None) -> dict:
    """Inpaint / outpaint / class-edit every image of a folder with a trained model (`python -m pipeline.edit`).

    Args:
        folder: the folder of images (or one image file), relative to the repository or absolute
        box: the region as x0,y0,x1,y1 in the images' pixels (give box or mask)
        mask: a PNG of the images' size, white inside the region
        mode: inpaint (regenerate the region), outpaint (keep it, generate the rest), edit (regenerate it as class_name)
        class_name: the class name or id (edit needs one)
        n: variations per image
        order: the generation order, as in a sample.models entry
        location: the location rule (confidence / policy orders), as in a sample.models entry
        temperature: content temperature, as sample.temperature
        top_k: sample among the k likeliest tokens, as sample.top_k
        cfg_scale: classifier-free guidance, as sample.cfg_scale
        cfg_schedule: constant, or linear from 1
        seed: the same seed gives the same variations
        model: the model checkpoint
        tokenizer: the tokenizer checkpoint the model was trained with
        steps: parallel decoding, as in a sample.models entry (empty: one token per step)
        schedule: tokens per parallel step: constant, linear, cosine or arccos (few early, many late)
        out_dir: where the outputs go (default edits/<this flow run's name>)
    """
    from prefect.runtime import flow_run

    repo = repo_dir()
    out = Path(out_dir) if out_dir else Path("edits") / (flow_run.name or "run")
    out = out if out.is_absolute() else repo / out
    get_run_logger().info("outputs: %s", out)
    stream(edit_command(folder, str(out), mode, box, mask, class_name, n, order, location, temperature, top_k,
                        cfg_scale, cfg_schedule, seed, model, tokenizer, steps, schedule), repo)
    get_run_logger().info("outputs written to %s (per image: variation_NN.png, sheet.png, order_strip.png)", out)
    return {"out": str(out), "images": sorted(p.name for p in out.iterdir() if p.is_dir()) if out.is_dir() else []}
