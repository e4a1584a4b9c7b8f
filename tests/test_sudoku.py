"""The Sudoku known-answer data set: generator, exact tokenizer round trip through the stages, checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from oar_core import sudoku
from oar_core.checkable import SudokuCheck, checker_for, complete
from oar_core.figures import GRAY, partial_canvases
from oar_core.image_shards import load_split, to_float_BCHW
from oar_core.model import GPT, GPTConfig
from oar_core.params import IngestParams, TokenizerParams
from oar_core.tokenizer import load_tokenizer
from pipeline.ingest import run_ingest
from pipeline.tokenizer import run_tokenizer


def tokens_of(boards_BNN):
    return torch.as_tensor(boards_BNN.reshape(len(boards_BNN), -1) - 1)


@pytest.mark.parametrize("n", [4, 6, 9])
def test_boards_are_valid_distinct_and_not_relabelings_of_one(n):
    count = 12 if n == 9 else 30
    boards = sudoku.distinct_boards(n, count, seed=1)
    assert (sudoku.violated_units(tokens_of(boards), n) == 0).all()
    assert len({b.tobytes() for b in boards}) == count
    # relabel each board so its first row reads 1..n: a generator that only relabels one grid gives one form
    canon = {np.argsort(np.argsort(b[0]))[b - 1].tobytes()
             for b in boards}
    assert len(canon) > (2 if n == 4 else 10)
    assert (sudoku.distinct_boards(n, count, seed=1) == boards).all()


def test_checks_count_broken_units_and_forced_cells():
    board = sudoku.distinct_boards(4, 1, seed=0)
    tok_1N = tokens_of(board)
    assert sudoku.violated_units(tok_1N, 4).item() == 0
    bad = tok_1N.clone()
    bad[0, [0, 1]] = bad[0, [1, 0]]  # swap two cells of row 0: both columns and (same box) nothing else break
    assert sudoku.violated_units(bad, 4).item() == 2
    # raster on a 4x4 board: the last cell of every row has one digit left, as does every cell of the last row
    f = sudoku.forced_steps(tok_1N, torch.arange(16)[None], 4)[0]
    assert f[[3, 7, 11, 12, 13, 14, 15]].all() and not f[0]
    clues = torch.zeros(1, 16, dtype=torch.bool)
    clues[0, 0] = True
    wrong = bad.clone()
    wrong[0, 0] = tok_1N[0, 0]
    assert sudoku.completion_metrics(tok_1N, tok_1N, clues, 4) == {"solved_fraction": 1.0, "equal_to_heldout": 1.0}
    other = sudoku.distinct_boards(4, 2, seed=5)[1:]  # a valid board that breaks the clue unless it agrees there
    agrees = other[0].flat[0] == board[0].flat[0]
    assert sudoku.completion_metrics(tokens_of(other), tok_1N, clues, 4)["solved_fraction"] == float(agrees)


def test_every_cell_round_trips_exactly_through_ingest_and_the_glyph_tokenizer(tmp_path):
    ingest = IngestParams(source="builtin:sudoku6", image_size=48, max_train=40, max_test=30,
                          out_dir=str(tmp_path / "ingest"))
    manifest = run_ingest(ingest)
    assert manifest["counts"] == {"train": 40, "test": 30} and manifest["class_names"] == ["sudoku"]
    run_tokenizer(TokenizerParams(kind="glyph", grid=6), ingest.out_dir, tmp_path / "tok.pt", tmp_path / "live")
    tok = load_tokenizer(tmp_path / "tok.pt")
    images_NHWC, _, _ = load_split(ingest.out_dir, "test")
    want = sudoku.split_boards(6, {"train": 40, "test": 30}, 0)["test"]
    tokens_BHW = tok.encode(to_float_BCHW(images_NHWC))
    assert torch.equal(tokens_BHW, torch.as_tensor(want - 1))  # every cell of every test board, exactly
    assert torch.equal(tok.decode(tokens_BHW), to_float_BCHW(images_NHWC))  # and back to the same pixels
    # the report's order strips draw partial boards with it: the first 6 cells of raster order, the rest gray
    canv = partial_canvases(tok, tokens_BHW[0].flatten().numpy(), np.arange(36), [6])[0, :, :, 0]
    assert (canv[:8] == images_NHWC[0, :8, :, 0]).all() and (canv[8:] == GRAY).all()


def test_bad_sudoku_settings_say_which_key(tmp_path):
    with pytest.raises(ValueError, match="ingest.image_size"):
        run_ingest(IngestParams(source="builtin:sudoku6", image_size=40, max_train=5, max_test=5,
                                out_dir=str(tmp_path / "a")))
    with pytest.raises(ValueError, match="unknown built-in source"):
        run_ingest(IngestParams(source="builtin:sudoku7", out_dir=str(tmp_path / "b")))
    run_ingest(IngestParams(source="builtin:sudoku4", image_size=32, max_train=5, max_test=5,
                            out_dir=str(tmp_path / "c")))
    with pytest.raises(ValueError, match="tokenizer.grid"):
        run_tokenizer(TokenizerParams(kind="glyph", grid=6), str(tmp_path / "c"), tmp_path / "t.pt", tmp_path / "l")


def test_the_checker_registry_and_completion_keep_every_clue(tmp_path):
    assert checker_for("/usr/share/datasets/fashion-mnist") is None
    (tmp_path / "sudoku.json").write_text('{"board": 4}')
    assert isinstance(checker_for(str(tmp_path)), SudokuCheck) and checker_for("builtin:sudoku").n == 9
    torch.manual_seed(0)
    model = GPT(GPTConfig(grid_h=4, grid_w=4, vocab_size=4, num_classes=0, n_layer=1, n_head=2, d_model=16,
                          next_position="both")).eval()
    truth_BN = tokens_of(sudoku.distinct_boards(4, 6, seed=2))
    clues_BN = sudoku.clue_masks(6, 16, 7, seed=0)
    assert (clues_BN.sum(1) == 7).all()
    for order, forced in [("confidence", False), ("raster", False), ("raster", True)]:
        out = complete(model, truth_BN, clues_BN, order, clue_forced=forced)
        assert torch.equal(out["tokens"][clues_BN], truth_BN[clues_BN])
    m = SudokuCheck(4).completion(model, {"order": "confidence", "location": {"score": "margin"}}, truth_BN, 0, "cpu")
    assert set(m) == {"solved_6_clues", "solved_9_clues", "forced_cell_steps_6_clues", "forced_cell_steps_9_clues"}
    assert all(0 <= v <= 1 for v in m.values())


def test_a_solver_order_fills_forced_cells_more_often_than_raster_or_random():
    g = torch.Generator().manual_seed(0)
    tok_BN = tokens_of(sudoku.distinct_boards(6, 40, seed=3))
    clues_BN = sudoku.clue_masks(40, 36, 13, seed=0)
    orders = {"raster": sudoku.clues_first(torch.arange(36).expand(40, -1), clues_BN),
              "random": sudoku.clues_first(torch.argsort(torch.rand(40, 36, generator=g), 1), clues_BN),
              "solver": sudoku.solver_orders(tok_BN, 6, g, clues_BN)}
    forced = {}
    for name, o in orders.items():
        assert torch.equal(o.sort(1).values, torch.arange(36).expand(40, -1))  # a permutation
        assert torch.equal(o[:, :13].sort(1).values, clues_BN.nonzero()[:, 1].view(40, 13))  # clues first
        forced[name] = sudoku.forced_steps(tok_BN, o, 6)[:, 13:].float().mean()
    assert forced["solver"] > forced["raster"] + 0.1 and forced["solver"] > forced["random"] + 0.1


def test_the_report_tables_the_exact_checks_and_leaves_out_the_image_metrics():
    from oar_core.report import checks_table

    md = checks_table({"raster": {"fid_indomain": 3.0, "nll_bits_per_token": 1.0, "valid_fraction": 0.25},
                       "oar": {"valid_fraction": 0.5, "solved_13_clues": 0.75}}, ["raster", "oar"])
    assert md.splitlines()[0] == "| model | solved_13_clues | valid_fraction |"
    assert "| raster | – | 0.250 |" in md and "| oar | 0.750 | 0.500 |" in md
