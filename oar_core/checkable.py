"""Data sets whose samples can be checked exactly (known-answer tests): a registry from the ingest source to its
checker. A checker has `generated(tokens_BN, train_BN) -> {metric: value}` (generated token grids) and
`completion(model, sample_meta, test_BN, seed, device) -> {metric: value}` (held-out grids completed from part of
their tokens); evaluate adds both to a model's metrics. Another checkable data set plugs in with one entry here."""
from __future__ import annotations

import torch

from oar_core import sudoku
from oar_core.decode import decode
from oar_core.names import LocationRule


def checker_for(source: str):
    """The checker of an ingest source, or None for ordinary images."""
    for config_of, make in CHECKERS:
        config = config_of(source)
        if config:
            return make(config)
    return None


COMPLETION_BOARDS = 200  # held-out boards completed per clue count (evaluate)


@torch.no_grad()
def complete(model, truth_BN: torch.Tensor, clues_BN: torch.Tensor, order: str, location=None,
             clue_forced: bool = False, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Fill the non-clue cells of each board, taking the most probable digit at each step (a solver's move; the
    location still follows `order` and `location`). Default: the clues are the known context first, the rest
    follows `order` (oar_core.decode's inpainting). `clue_forced`: every cell in `order` (raster), the clue's
    digit forced where there is one: how a model trained in raster order alone can use clues (the ones ahead
    of it stay unseen). Returns decode's dict (tokens, order, ...)."""
    truth_BN, clues_BN = truth_BN.long(), clues_BN.bool()

    def pick(t, pos_Bk, logits_BkV):
        best_Bk = logits_BkV.argmax(-1)
        if not clue_forced:
            return best_Bk
        return torch.where(torch.gather(clues_BN, 1, pos_Bk), torch.gather(truth_BN, 1, pos_Bk), best_Bk)

    labels_B = torch.zeros(len(truth_BN), dtype=torch.long, device=truth_BN.device)
    known = {} if clue_forced else {"known_tokens_BN": truth_BN, "known_mask_BN": clues_BN}
    return decode(model, labels_B, pick, order=order, location=location, generator=generator, **known)


class SudokuCheck:
    """The checkable-data-set hook for Sudoku sources (`oar_core.checkable`)."""

    def __init__(self, n: int):
        self.n = n

    def generated(self, tokens_BN, train_BN=None) -> dict:
        return sudoku.board_metrics(tokens_BN, self.n, train_BN)

    def completion(self, model, meta: dict, test_BN: torch.Tensor, seed: int, device) -> dict:
        """For each clue count k: the fraction of held-out boards completed validly and agreeing with the clues,
        by this sampler (its order and location rule; a raster-trained model in raster order: clues forced)."""
        test_BN = torch.as_tensor(test_BN[:COMPLETION_BOARDS]).long().to(device)
        forced = meta["order"] == "raster" and meta.get("trained_order") == "raster"
        out = {}
        for k in sudoku.clue_counts(self.n):
            clues_BN = sudoku.clue_masks(len(test_BN), self.n * self.n, k, seed).to(device)
            res = complete(model, test_BN, clues_BN, meta["order"], LocationRule(**meta.get("location") or {}),
                           clue_forced=forced, generator=torch.Generator().manual_seed(seed))
            m = sudoku.completion_metrics(res["tokens"].cpu(), test_BN.cpu(), clues_BN.cpu(), self.n)
            out[f"solved_{k}_clues"] = m["solved_fraction"]
            # of the steps that filled a non-clue cell, those where the rules left exactly one digit there
            order_BN = res["order"].cpu()
            f_BN = sudoku.forced_steps(res["tokens"].cpu(), order_BN, self.n)
            out[f"forced_cell_steps_{k}_clues"] = float(f_BN[~clues_BN.cpu().gather(1, order_BN)].float().mean())
        return out


CHECKERS = [(sudoku.board_size_of, SudokuCheck)]  # (source -> config or None, config -> checker)
