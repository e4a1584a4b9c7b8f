"""Edit images with a trained model: inpaint (regenerate a region), outpaint (keep a region, generate the rest) or
edit (regenerate a region under another class).

    python -m pipeline.edit photo.png --box 8,8,20,20 --n 8                   # or: oar-edit ...
    python -m pipeline.edit shirts/ --mask mask.png --mode edit --class Dress --order confidence

Images are converted as ingest converts them (any mode or size: grayscale or RGB, centre square, resized to the
tokenizer's size); the region, in the input image's pixels, is converted the same way. A token is known when its
patch lies wholly outside the region to generate. Per image, under <out>/<image name>/:
    variation_00.png ...   the completions (uint8, the tokenizer's size)
    sheet.png              original | masked input (gray: to generate) | the variations
    order_strip.png        variation 0 as it was generated: from the known tokens to the full grid
This is a tool, not a DVC stage: it reads no params.yaml; the sampler options are a `sample.models` entry's plus
`sample`'s temperature / top-k / guidance, validated by the same rules (oar_core.params)."""
from __future__ import annotations

import argparse
import io
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from oar_core.completion import (
    MODES,
    check_pair,
    complete,
    fixed_training_order,
    known_from_region,
    masked_picture,
)
from oar_core.figures import image_grid, partial_canvases, save_png, strip_steps, to_uint8_NHWC
from oar_core.image_shards import load_manifest, to_float_BCHW
from oar_core.image_sources import IMAGE_EXTS, ImageFormat, decode_image, normalize_image, sniff
from oar_core.model import load_gpt
from oar_core.names import LocationRule
from oar_core.params import DEFAULT_SAMPLE_MODELS, SampleModelParams, SampleParams, problems
from oar_core.runtime import autocast, pick_device
from oar_core.storage import write_json
from oar_core.tokenizer import load_tokenizer

DEFAULT_SAMPLER = next(m for m in DEFAULT_SAMPLE_MODELS if m.name == "oar")  # the pipeline's OAR sampler
SHEET_SCALE = 4  # 28-pixel images are too small to judge at 1:1
SAMPLE_KEYS = ("temperature", "top_k", "cfg_scale", "cfg_schedule")  # sample's own, shared by its models


class EditError(ValueError):
    """A bad input: one line naming it and the fix."""


def sampler(order: str | None, location: dict, sample_kw: dict, model: str, tokenizer: str, seed: int,
            parallel: dict | None = None) -> SampleParams:
    """The sampler as a one-model `sample` section, so the edit command obeys exactly sample's rules. `parallel`:
    the entry's `steps`/`schedule` (parallel decoding)."""
    entry = {"name": "edit", "checkpoint": model, "order": order or DEFAULT_SAMPLER.order,
             "location": {**(DEFAULT_SAMPLER.location.model_dump() if order is None else {}), **location},
             **(parallel or {})}
    try:
        return SampleParams(models=[entry], tokenizer=tokenizer, seed=seed, **sample_kw)
    except ValidationError as e:
        raise EditError("; ".join(map(_as_flag, problems(e)))) from None


def _as_flag(problem: str) -> str:
    """`models.0.location.top_k: ...` -> `--location-top-k: ...` (the whole-location rule is about its score)."""
    key, sep, rest = problem.partition(": ")
    key = key.removeprefix("models.0.").replace("location.", "location-").replace("_", "-")
    return f"--{'location-score' if key == 'location' else key}{sep}{rest}" if sep else problem


def parse_box(text: str) -> tuple[int, int, int, int]:
    try:
        x0, y0, x1, y1 = (int(v) for v in text.split(","))
    except ValueError:
        raise EditError(f"--box {text!r}: give four integers x0,y0,x1,y1 (pixels, x1/y1 exclusive), e.g. 8,8,20,20") \
            from None
    if x1 <= x0 or y1 <= y0:
        raise EditError(f"--box {text}: the region is empty (needs x1 > x0 and y1 > y0)")
    return x0, y0, x1, y1


def list_images(inputs: list[str]) -> tuple[list[Path], list[str], set[Path]]:
    """The files to edit: those named, and a folder's images (top level); one line per folder entry skipped; and
    which files came from a folder (an unusable one is then skipped with its reason, as ingest skips it)."""
    files, skipped, listed = [], [], set()
    for item in map(Path, inputs):
        if item.is_dir():
            for f in sorted(item.iterdir()):
                if f.name.startswith(".") or f.is_dir():
                    continue
                if f.suffix.lower() in IMAGE_EXTS:
                    files.append(f)
                    listed.add(f)
                else:
                    skipped.append(f"{f}: unsupported extension (expected one of {sorted(IMAGE_EXTS)}); skipped")
            if not any(f.parent == item for f in files):
                raise EditError(f"{item}: no images found (looked for {sorted(IMAGE_EXTS)}); put images there")
        elif item.is_file():
            files.append(item)
        else:
            raise EditError(f"{item}: no such file or folder; give image files or a folder of images")
    return files, skipped, listed


def read_image(path: Path, fmt: ImageFormat) -> tuple[np.ndarray, tuple[int, int]]:
    """(H,W,C) uint8 converted as ingest converts, and the file's own (width, height)."""
    data = path.read_bytes()
    arr_HWC, why = decode_image(data, fmt)
    if arr_HWC is None:
        raise EditError(f"{path}: {why[1]}")
    with Image.open(io.BytesIO(data)) as img:
        return arr_HWC, img.size


def region_pixels(box, mask: Path | None, image: Path, size_wh: tuple[int, int]) -> np.ndarray:
    """(height, width) bool in the input image's pixels: the --box, or the mask's nonzero pixels."""
    w, h = size_wh
    if mask is None:
        x0, y0, x1, y1 = box
        region = np.zeros((h, w), bool)
        region[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
        if not region.any():
            raise EditError(f"--box {','.join(map(str, box))}: outside the image {image} ({w}x{h} pixels); give a box "
                            f"inside 0,0,{w},{h}")
        return region
    try:
        data = mask.read_bytes()
        with Image.open(io.BytesIO(data)) as m:
            m.load()
            mask_HW = np.asarray(m.convert("L")) > 0
    except FileNotFoundError:
        raise EditError(f"--mask {mask}: no such file; give a PNG, white where the region is") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise EditError(f"--mask {mask}: not a readable image (the content is {sniff(data)}); give a PNG, white where "
                        f"the region is") from None
    if mask_HW.shape != (h, w):
        raise EditError(f"--mask {mask}: {mask_HW.shape[1]}x{mask_HW.shape[0]} pixels but {image} is {w}x{h}; draw "
                        f"the mask at the image's size")
    if not mask_HW.any():
        raise EditError(f"--mask {mask}: the region is empty (no nonzero pixel); paint the region white")
    return mask_HW


def known_tokens(region_hw: np.ndarray, mode: str, fmt: ImageFormat, grid: int, image: Path, where: str) -> np.ndarray:
    """(grid*grid,) bool: the tokens kept. The region is converted as the image was (centre square, resize); any
    trace of it in a patch makes that token one to generate (outpaint: the region is what is kept)."""
    converted, _ = normalize_image(Image.fromarray(region_hw.astype(np.uint8) * 255, "L"),
                                   ImageFormat(fmt.size, 1))
    region_HW = converted[..., 0] > 0
    if not region_HW.any():
        raise EditError(f"{where}: outside the centre square of {image} that the model sees (non-square images are "
                        f"centre-cropped); move the region inside it")
    generate_HW = ~region_HW if mode == "outpaint" else region_HW
    known_N = known_from_region(generate_HW, grid)
    patch = f"{fmt.size // grid}x{fmt.size // grid}"
    if mode == "outpaint" and not known_N.any():
        raise EditError(f"{where}: holds no whole token patch ({patch} pixels at {fmt.size}x{fmt.size}) of {image}, so "
                        f"nothing would be kept; enlarge the region")
    if not known_N.any():
        raise EditError(f"{where}: covers all of {image} (no {patch}-pixel token patch lies wholly outside it), so "
                        f"nothing would be kept; shrink the region")
    if known_N.all():
        raise EditError(f"{where}: covers all of {image}, so nothing is left to generate; shrink the region")
    return known_N


def resolve_class(text: str | None, mode: str, num_classes: int, class_names: list[str] | None, model: str,
                  names_from: str) -> int | None:
    if text is None:
        if mode == "edit":
            raise EditError("--mode edit needs --class NAME-or-id (the class to regenerate the region as)")
        return None
    if num_classes == 0:
        raise EditError(f"{model}: an unconditional model (trained with model.class_cond: false) cannot "
                        f"{'edit' if mode == 'edit' else 'take --class'}; use --mode inpaint without --class, or a "
                        f"class-conditional model")
    names = class_names or []
    if text in names:
        return names.index(text)
    if text.lstrip("-").isdigit() and 0 <= int(text) < num_classes:
        return int(text)
    known = f"names: {', '.join(names)}; " if names else f"no class names ({names_from} not found); "
    raise EditError(f"--class {text!r}: unknown class ({known}ids 0..{num_classes - 1})")


def class_names_of(ingest_dir: str) -> list[str] | None:
    try:
        return load_manifest(ingest_dir).get("class_names")
    except (FileNotFoundError, ValueError):
        return None


def out_names(files: list[Path]) -> list[str]:
    """A folder name per input: its stem, made unique by the input's index where two stems clash."""
    stems = [f.stem for f in files]
    return [s if stems.count(s) == 1 else f"{s}-{i}" for i, s in enumerate(stems)]


@torch.no_grad()
def run_edit(inputs: list[str], out_dir: str, mode: str, sp: SampleParams, box=None, mask: str | None = None,
             class_: str | None = None, n: int = 8, ingest_dir: str = "data/ingest", strip_k: int = 8,
             log=print) -> dict:
    if (box is None) == (mask is None):
        raise EditError("give the region as --box x0,y0,x1,y1 or --mask mask.png (one of them)")
    if mode not in MODES:
        raise EditError(f"--mode {mode!r}: use one of {', '.join(MODES)}")
    if n < 1:
        raise EditError(f"--n {n}: give at least 1 variation")
    spec = sp.models[0]
    files, skipped, listed = list_images(inputs)
    for line in skipped:
        log(line)
    mask_path = None if mask is None else Path(mask)
    device = pick_device()
    tokenizer = load_tokenizer(sp.tokenizer, device)
    model, ckpt = load_gpt(spec.checkpoint, device)
    check_pair(model, tokenizer, spec.checkpoint, sp.tokenizer)
    label = resolve_class(class_, mode, model.cfg.num_classes, class_names_of(ingest_dir), spec.checkpoint,
                          f"{ingest_dir}/manifest.json")
    fixed = fixed_training_order(ckpt)
    if fixed:
        other = f" (not --order {spec.order})" if spec.order != fixed else ""
        log(f"note: {spec.checkpoint} was trained in {fixed} order only, so it completes in {fixed} order{other}: the "
            f"known tokens are teacher-forced where that order reaches them, and what it generates before a known "
            f"token cannot see it; an any-order model conditions on all of them")
    fmt = ImageFormat(tokenizer.image_size, tokenizer.channels)
    grid, N = tokenizer.grid, tokenizer.grid ** 2
    where = f"--mask {mask}" if mask is not None else f"--box {','.join(map(str, box or ()))}"
    # everything is checked before anything is generated or written
    todo = []
    for f in files:
        try:
            image_HWC, size_wh = read_image(f, fmt)
        except EditError as e:
            if f not in listed:
                raise
            log(f"skipped {e}")
            continue
        todo.append((f, image_HWC, known_tokens(region_pixels(box, mask_path, f, size_wh), mode, fmt, grid, f, where)))
    if not todo:
        raise EditError(f"{', '.join(inputs)}: no usable image (see the skipped lines above)")
    cfg_scale = sp.cfg_scale if label is not None else 1.0  # no class: guidance would compare null with null
    labels_B = torch.full((n,), model.null_class if label is None else label, dtype=torch.long, device=device)
    out, result = Path(out_dir), {"out": str(out_dir), "images": {}}
    t0, completing = time.time(), 0.0
    for (f, image_HWC, known_N), name in zip(todo, out_names([t[0] for t in todo])):
        tokens_BN = tokenizer.encode(to_float_BCHW(image_HWC[None].copy(), device)).flatten(1).expand(n, -1)
        known_BN = torch.as_tensor(known_N, device=device).expand(n, -1)
        g = torch.Generator().manual_seed(zlib.crc32(f"{sp.seed}/{f.name}".encode()))
        t1 = time.time()
        with autocast(device):
            res = complete(model, labels_B, tokens_BN, known_BN, order=spec.order, location=spec.location,
                           temperature=sp.temperature, top_k=sp.top_k, cfg_scale=cfg_scale,
                           cfg_schedule=sp.cfg_schedule, generator=g, teacher_force_in=fixed,
                           candidate_chunk_mb=sp.candidate_chunk_mb, steps=spec.steps, schedule=spec.schedule)
        completing += time.time() - t1
        variations = to_uint8_NHWC(tokenizer.decode(res["tokens"].view(n, grid, grid)).float())
        folder = out / name
        for i, v in enumerate(variations):
            save_png(folder / f"variation_{i:02d}.png", v)
        masked = masked_picture(image_HWC, known_N, grid)
        sheet = image_grid(np.stack([image_HWC, masked, *variations]), ncol=n + 2)
        save_png(folder / "sheet.png", sheet.repeat(SHEET_SCALE, 0).repeat(SHEET_SCALE, 1))
        K = int(known_N.sum())
        steps = [K, *(K + s for s in strip_steps(N - K, strip_k - 1))]
        canvases = partial_canvases(tokenizer, res["tokens"][0].cpu().numpy(), res["order"][0].cpu().numpy(), steps)
        save_png(folder / "order_strip.png", image_grid(canvases, ncol=len(canvases)).repeat(3, 0).repeat(3, 1))
        write_json(folder / "edit.json", {
            "input": str(f), "mode": mode, "class": label, "region": where, "known_tokens": K,
            "generated_tokens": N - K,
            "checkpoint": spec.checkpoint, "tokenizer": sp.tokenizer, "order": fixed or spec.order,
            "teacher_forced": bool(fixed), "location": spec.location.model_dump(mode="json"),
            "steps": spec.steps, "schedule": spec.schedule,
            **{k: getattr(sp, k) for k in SAMPLE_KEYS}, "cfg_scale": cfg_scale, "seed": sp.seed, "n": n,
            "tokens": res["tokens"].cpu().tolist(), "order_per_step": res["order"].cpu().tolist()})
        result["images"][name] = {"input": str(f), "folder": str(folder), "known_tokens": K, "generated_tokens": N - K}
        log(f"{f}: {n} variations ({N - K} of {N} tokens generated) -> {folder}")
    result.update(seconds=round(time.time() - t0, 2), completion_seconds=round(completing, 2))
    return result


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="image files or folders of images")
    ap.add_argument("--box", help="the region as x0,y0,x1,y1 in the input image's pixels (x1, y1 exclusive)")
    ap.add_argument("--mask", help="the region as a PNG of the image's size, nonzero (white) inside the region")
    ap.add_argument("--mode", default="inpaint", help=f"{' | '.join(MODES)} (default inpaint)")
    ap.add_argument("--class", dest="class_", metavar="NAME-or-id", help="the class to generate (edit needs one; "
                    "inpaint/outpaint default to none, i.e. unconditional)")
    ap.add_argument("--n", type=int, default=8, help="variations per image (default 8)")
    ap.add_argument("--out", default="edits", help="output folder (default edits/)")
    ap.add_argument("--model", default="models/oar/model.pt")
    ap.add_argument("--tokenizer", default="models/tokenizer.pt")
    ap.add_argument("--ingest-dir", default="data/ingest", help="its manifest.json names the classes")
    ap.add_argument("--seed", default="0")
    ap.add_argument("--order", help=f"as in sample.models (default {DEFAULT_SAMPLER.order}, with the pipeline's oar "
                    f"sampler's location rule)")
    for k, field in LocationRule.model_fields.items():
        ap.add_argument(f"--location-{k.replace('_', '-')}", dest=f"location_{k}", help=field.description)
    for k in SAMPLE_KEYS:
        default = SampleParams.model_fields[k].default
        ap.add_argument(f"--{k.replace('_', '-')}", help=f"as sample.{k} (default {default})")
    for k in ("steps", "schedule"):  # parallel decoding, as in a sample.models entry
        ap.add_argument(f"--{k}", help=SampleModelParams.model_fields[k].description)
    return ap


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    try:
        location = {k: v for k in LocationRule.model_fields if (v := getattr(a, f"location_{k}")) is not None}
        sample_kw = {k: v for k in SAMPLE_KEYS if (v := getattr(a, k)) is not None}
        parallel = {k: v for k in ("steps", "schedule") if (v := getattr(a, k)) is not None}
        sp = sampler(a.order, location, sample_kw, a.model, a.tokenizer, a.seed, parallel)
        result = run_edit(a.inputs, a.out, a.mode, sp, parse_box(a.box) if a.box else None, a.mask, a.class_, a.n,
                          a.ingest_dir)
    except (ValueError, FileNotFoundError) as e:  # EditError, and the checkpoints' own one-line errors
        print(f"error: [edit] {e}", file=sys.stderr)
        sys.exit(1)
    print(f"edit: {len(result['images'])} image(s) in {result['seconds']} s ({result['completion_seconds']} s "
          f"completing, the rest encoding, decoding and drawing) -> {result['out']}")
    return result


if __name__ == "__main__":
    main()
