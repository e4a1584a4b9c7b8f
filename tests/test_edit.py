"""The edit command (pipeline/edit.py) and the completion library under it (oar_core/completion.py), on the tiny
trained any-order model of the session fixtures and random-weight raster / unconditional models."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oar_core.completion import complete, known_first, known_from_region, missing_bits
from oar_core.decode import CachedForward
from oar_core.image_shards import load_split
from oar_core.model import GPT, GPTConfig, load_gpt, save_gpt
from oar_core.names import LocationRule
from pipeline.edit import main
from tests.conftest import single_thread
from tests.reference_decode import UncachedForward


@pytest.fixture(scope="module")
def setup(fmnist_small, tiny_shards, any_order_model, tmp_path_factory) -> dict:
    """Two test images in a folder, the tokenizer and the any-order model; a raster-trained and an unconditional
    model (random weights: their behaviour, not their quality, is what is tested)."""
    root = tmp_path_factory.mktemp("edit")
    images, _, _ = load_split(fmnist_small, "test")
    folder = root / "in"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(images[i, ..., 0]).save(folder / f"img{i}.png")
    tok = tiny_shards.parent / "tokenizer.pt"
    model, _ = load_gpt(any_order_model[0])
    torch.manual_seed(0)
    save_gpt(root / "raster.pt", GPT(model.cfg), order="raster")
    save_gpt(root / "uncond.pt", GPT(GPTConfig(**{**model.cfg.__dict__, "num_classes": 0})), order="random")
    save_gpt(root / "grid4.pt", GPT(GPTConfig(**{**model.cfg.__dict__, "grid_h": 4, "grid_w": 4})), order="random")
    save_gpt(root / "vocab32.pt", GPT(GPTConfig(**{**model.cfg.__dict__, "vocab_size": 32})), order="random")
    return {"root": root, "folder": folder, "tok": str(tok), "model": str(any_order_model[0]),
            "ingest": str(fmnist_small), "image": folder / "img0.png"}


def edit(s, *args, model=None, out="out", n="3"):
    with single_thread():
        return main([*map(str, args), "--model", model or s["model"], "--tokenizer", s["tok"], "--ingest-dir",
                     s["ingest"], "--n", n, "--out", str(s["root"] / out)])


def tokens_of(folder: Path) -> tuple[np.ndarray, dict]:
    meta = json.loads((folder / "edit.json").read_text())
    return np.asarray(meta["tokens"]), meta


def original_tokens(s, name="img0"):
    from oar_core.image_shards import to_float_BCHW
    from oar_core.tokenizer import load_tokenizer

    image = np.array(Image.open(s["folder"] / f"{name}.png"))[..., None]
    return load_tokenizer(s["tok"]).encode(to_float_BCHW(image[None])).flatten().numpy()


def test_edit_a_folder_end_to_end(setup, capsys):
    s = setup
    result = edit(s, s["folder"], "--box", "8,8,20,20", "--seed", "0", out="e2e")
    assert sorted(result["images"]) == ["img0", "img1"]
    region = np.zeros((28, 28), bool)
    region[8:20, 8:20] = True
    known = known_from_region(region, 7)
    assert known.sum() == 49 - 9  # the 3x3 tokens of pixels 8..19 (4-pixel patches, 2..4)
    for name in ("img0", "img1"):
        folder = s["root"] / "e2e" / name
        for f in ["sheet.png", "order_strip.png", *(f"variation_{i:02d}.png" for i in range(3))]:
            assert (folder / f).stat().st_size > 0, f
        assert Image.open(folder / "sheet.png").size == (4 * (5 * 30 + 2), 4 * 32)  # original | masked | 3
        tokens, meta = tokens_of(folder)
        assert meta["cfg_scale"] == 1.0  # no class given: nothing to guide towards
        assert (tokens[:, known] == original_tokens(s, name)[known]).all()  # every variation keeps the known tokens
        assert np.isin(np.asarray(meta["order_per_step"])[:, :40], np.flatnonzero(known)).all()  # known go first
        assert not (tokens[:, ~known] == tokens[0, ~known]).all()  # the variations differ in the region
    assert "e2e" in capsys.readouterr().out


def test_an_unusable_file_in_a_folder_is_skipped_with_its_reason(setup, tmp_path, capsys):
    s = setup
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.png").write_bytes((s["folder"] / "img0.png").read_bytes())
    (folder / "broken.png").write_bytes(b"%PDF-1.4")
    (folder / "notes.txt").write_text("x")
    result = edit(s, folder, "--box", "8,8,20,20", n="1", out="mixed")
    assert sorted(result["images"]) == ["a"]
    out = capsys.readouterr().out
    assert "broken.png: not an image: the content is a PDF" in out and "notes.txt: unsupported extension" in out


def test_region_differs_between_seeds_and_repeats_with_one(setup):
    s = setup
    for out, seed in (("s0", 0), ("s1", 1), ("s0b", 0)):
        edit(s, s["image"], "--box", "0,14,28,28", "--seed", seed, out=out)
    a, b, a2 = (tokens_of(s["root"] / out / "img0")[0] for out in ("s0", "s1", "s0b"))
    assert (a == a2).all()
    assert (a[:, :21] == b[:, :21]).all() and not (a[:, 21:] == b[:, 21:]).all()  # the bottom half is regenerated


def test_outpaint_and_class_edit(setup):
    s = setup
    edit(s, s["image"], "--box", "8,8,20,20", "--mode", "outpaint", "--class", "Trouser", out="outp")
    tokens, meta = tokens_of(s["root"] / "outp" / "img0")
    assert meta["known_tokens"] == 9 and meta["class"] == 1  # the centre is kept, its name resolved to its id
    assert meta["cfg_scale"] == 2.5  # sample's default guidance, towards the class
    known = known_from_region(~np.pad(np.ones((12, 12), bool), 8), 7)
    assert known.sum() == 9
    assert (tokens[:, known] == original_tokens(s)[known]).all()
    edit(s, s["image"], "--box", "8,8,20,20", "--mode", "edit", "--class", "3", "--order", "random",
         "--location-temperature", "0.5", out="cls")
    assert tokens_of(s["root"] / "cls" / "img0")[1]["class"] == 3


def test_raster_model_is_teacher_forced_and_says_so(setup, capsys):
    s = setup
    edit(s, s["image"], "--box", "8,8,20,20", model=str(s["root"] / "raster.pt"), out="raster")
    assert "trained in raster order only" in capsys.readouterr().out
    tokens, meta = tokens_of(s["root"] / "raster" / "img0")
    known = np.ones(49, bool)
    known[[16, 17, 18, 23, 24, 25, 30, 31, 32]] = False
    assert meta["teacher_forced"] and (np.asarray(meta["order_per_step"]) == np.arange(49)).all()
    assert (tokens[:, known] == original_tokens(s)[known]).all()


def _bad(tmp: Path) -> dict:
    (tmp / "notes.png").write_text("hello")
    Image.new("L", (20, 20), 255).save(tmp / "mask20.png")
    Image.new("L", (28, 28), 0).save(tmp / "empty.png")
    return {
        "unreadable image": (["{dir}/notes.png", "--box", "1,1,5,5"], "notes.png: not an image: the content is text"),
        "empty box": (["{img}", "--box", "5,5,5,9"], "the region is empty"),
        "box outside": (["{img}", "--box", "30,30,40,40"], "outside the image"),
        "box covers all": (["{img}", "--box", "0,0,28,28"], "covers all of"),
        "outpaint keeps nothing": (["{img}", "--box", "1,1,4,4", "--mode", "outpaint"], "holds no whole token"),
        "mask of another size": (["{img}", "--mask", "{dir}/mask20.png"], "20x20 pixels but"),
        "empty mask": (["{img}", "--mask", "{dir}/empty.png"], "the region is empty"),
        "unknown class": (["{img}", "--box", "8,8,20,20", "--mode", "edit", "--class", "Hat"], "unknown class"),
        "edit without class": (["{img}", "--box", "8,8,20,20", "--mode", "edit"], "needs --class"),
        "unconditional edit": (["{img}", "--box", "8,8,20,20", "--mode", "edit", "--class", "1", "--model",
                                "{dir}/uncond.pt"], "unconditional model"),
        "model/tokenizer grids": (["{img}", "--box", "8,8,20,20", "--model", "{dir}/grid4.pt"], "does not match"),
        "model/tokenizer vocabularies": (["{img}", "--box", "8,8,20,20", "--model", "{dir}/vocab32.pt"],
                                         "vocab 32 does not match"),
        "bad sampler option": (["{img}", "--box", "8,8,20,20", "--location-score", "gt_prob"],
                               "--location-score: "),
        "bad temperature": (["{img}", "--box", "8,8,20,20", "--temperature", "0"], "--temperature: "),
        "bad order": (["{img}", "--box", "8,8,20,20", "--order", "diagonal"], "--order: "),
    }


CASES = ["unreadable image", "empty box", "box outside", "box covers all", "outpaint keeps nothing",
         "mask of another size", "empty mask", "unknown class", "edit without class", "unconditional edit",
         "model/tokenizer grids", "model/tokenizer vocabularies", "bad sampler option", "bad temperature", "bad order"]


@pytest.mark.parametrize("case", CASES)
def test_each_bad_input_is_one_line_naming_it(setup, case, capsys):
    s = setup
    args, expect = _bad(s["root"])[case]
    args = [a.format(dir=s["root"], img=s["image"]) for a in args]
    model = next((args[i + 1] for i, a in enumerate(args) if a == "--model"), None)
    if model:
        i = args.index("--model")
        args = args[:i] + args[i + 2:]
    with pytest.raises(SystemExit) as e:
        edit(s, *args, model=model, out=f"bad-{case.replace(' ', '-').replace('/', '-')}")
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: [edit] ") and expect in err, err
    assert not (s["root"] / f"bad-{case.replace(' ', '-').replace('/', '-')}").exists()  # nothing written


@pytest.mark.parametrize("cfg", [1.0, 2.5])
@pytest.mark.parametrize("order,teacher", [("confidence", None), ("policy", None), ("random", None),
                                           (None, "raster")])
def test_cached_and_uncached_completions_agree(setup, order, teacher, cfg):
    """The same completion with and without the KV cache, with and without guidance, for every path."""
    torch.manual_seed(0)
    cfg_ = GPTConfig(grid_h=4, grid_w=4, vocab_size=16, num_classes=3, n_layer=2, n_head=2, d_model=32, policy=True)
    model = GPT(cfg_).eval()
    known = torch.ones(2, 16, dtype=torch.bool)
    known[:, [5, 6, 9, 10, 15]] = False
    tokens = torch.randint(0, 16, (2, 16))
    run = lambda fwd: complete(model, torch.tensor([0, 2]), tokens, known, order=order or "raster",  # noqa: E731
                               location=LocationRule(temperature=1.0), cfg_scale=cfg, top_k=8,
                               generator=torch.Generator().manual_seed(1), teacher_force_in=teacher, forward=fwd)
    a, b = run(CachedForward), run(UncachedForward)
    assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["order"], b["order"])
    assert torch.allclose(a["logp"], b["logp"], atol=1e-5)
    assert torch.equal(a["tokens"][known], tokens[known])


def test_missing_bits():
    torch.manual_seed(0)
    model = GPT(GPTConfig(grid_h=4, grid_w=4, vocab_size=16, num_classes=3, n_layer=2, n_head=2, d_model=32)).eval()
    tokens, labels = torch.randint(0, 16, (2, 16)), torch.tensor([0, 1])
    top = torch.zeros(2, 16, dtype=torch.bool)
    top[:, :8] = True  # top half known: every known token precedes every missing one in raster order
    assert known_first("raster", top[0].numpy(), 4, 4) and not known_first("raster", top[0].flip(0).numpy(), 4, 4)
    # raster: the teacher-forced raster pass's own log-probs of the bottom half
    logits, _ = model(tokens, torch.arange(16).expand(2, -1), labels)
    ref = -torch.log_softmax(logits, -1).gather(2, tokens[..., None])[:, 8:, 0].mean(1) / np.log(2)
    got = missing_bits(model, tokens, labels, top, order="raster", teacher_force_in="raster")
    assert torch.allclose(got, ref, atol=1e-5)
    # any order with the top half first then raster: the same numbers
    assert torch.allclose(missing_bits(model, tokens, labels, top, order="raster"), ref, atol=1e-5)


def test_console_script_is_declared():
    scripts = tomllib.loads(Path("pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["oar-edit"] == "pipeline.edit:main"


def test_the_edit_command_decodes_in_parallel_steps_and_keeps_the_known_tokens(any_order_model, tiny_shards,
                                                                                 fmnist_small, tmp_path):
    """--steps/--schedule as in a sample.models entry: 4 forwards for the 28 unknown tokens, known ones unchanged."""
    from oar_core.image_shards import load_split
    from pipeline.edit import main

    images, _, _ = load_split(fmnist_small, "test")
    Image.fromarray(images[0, ..., 0]).save(tmp_path / "shoe.png")
    out = main([str(tmp_path / "shoe.png"), "--box", "0,12,28,28", "--n", "2", "--order", "random", "--steps", "4",
                "--schedule", "cosine", "--model", str(any_order_model[0]),
                "--tokenizer", str(tiny_shards.parent / "tokenizer.pt"), "--out", str(tmp_path / "e")])
    edit = json.loads((Path(out["out"]) / "shoe" / "edit.json").read_text())
    assert (edit["steps"], edit["schedule"], edit["known_tokens"]) == (4, "cosine", 21)  # rows 0-2 of 7 known
    tokens = np.array(edit["tokens"])
    assert (tokens[0, :21] == tokens[1, :21]).all() and (tokens[0, 21:] != tokens[1, 21:]).any()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "shoe.png"), "--box", "0,12,28,28", "--steps", "0", "--model", str(any_order_model[0]),
              "--tokenizer", str(tiny_shards.parent / "tokenizer.pt"), "--out", str(tmp_path / "f")])
