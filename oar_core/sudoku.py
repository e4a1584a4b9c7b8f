"""Sudoku boards as a known-answer data set: a randomized generator, the boards drawn as images (one digit glyph per
cell, so a tokenizer at grid = board size maps each cell to one token), and the exact checks evaluate reports.

Boards are n x n with boxes of `BOXES[n]` (rows x cols): 9x9 (3x3 boxes) or 6x6 (2x3 boxes); 4x4 for tests.
Tokens are digits minus one (token k = digit k+1), as the glyph tokenizer (`GlyphTokenizer`) assigns them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

BOXES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}
SOURCES = {"builtin:sudoku": 9, "builtin:sudoku6": 6, "builtin:sudoku4": 4}  # ingest.source -> board size
CELL_PX = 8  # pixels per cell: a 5x7 glyph with a border; board*8 is grid * 2^3, as the learned VQ-VAE needs too

# 5x7 bitmap digits 1-9 (rows top to bottom, "#" = ink): readable when a sample grid is upscaled
_FONT = {
    1: ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."],
    2: [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"],
    3: ["####.", "....#", "....#", ".###.", "....#", "....#", "####."],
    4: ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."],
    5: ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."],
    6: [".###.", "#....", "#....", "####.", "#...#", "#...#", ".###."],
    7: ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."],
    8: [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."],
    9: [".###.", "#...#", "#...#", ".####", "....#", "....#", ".###."],
}


def check_size(n: int) -> tuple[int, int]:
    if n not in BOXES:
        raise ValueError(f"Sudoku board size {n} is not supported; use one of {sorted(BOXES)}")
    return BOXES[n]


def random_board(n: int, rng: np.random.Generator) -> np.ndarray:
    """One uniformly shuffled valid solution grid (n, n) of digits 1..n: randomized backtracking fill, always taking
    the cell with the fewest candidates next and trying its digits in random order."""
    br, bc = check_size(n)
    board = np.zeros((n, n), np.int64)
    rows, cols, boxes = (np.zeros((n, n + 1), bool) for _ in range(3))

    def box(r, c):
        return (r // br) * (n // bc) + c // bc

    def fill(left: int) -> bool:
        if left == 0:
            return True
        best, best_c = None, None
        for r in range(n):
            for c in range(n):
                if board[r, c] == 0:
                    cand = [d for d in range(1, n + 1) if not (rows[r, d] or cols[c, d] or boxes[box(r, c), d])]
                    if best is None or len(cand) < len(best_c):
                        best, best_c = (r, c), cand
                        if len(cand) <= 1:
                            break
            if best_c is not None and len(best_c) <= 1:
                break
        r, c = best
        for d in rng.permutation(best_c):
            board[r, c], rows[r, d], cols[c, d], boxes[box(r, c), d] = d, True, True, True
            if fill(left - 1):
                return True
            board[r, c], rows[r, d], cols[c, d], boxes[box(r, c), d] = 0, False, False, False
        return False

    fill(n * n)
    return board


def distinct_boards(n: int, count: int, seed: int) -> np.ndarray:
    """(count, n, n) distinct valid boards, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    seen, out = set(), []
    tries = 0
    while len(out) < count:
        b = random_board(n, rng)
        tries += 1
        if b.tobytes() not in seen:
            seen.add(b.tobytes())
            out.append(b)
        if tries > 20 * count + 1000:
            raise ValueError(f"only {len(out)} distinct {n}x{n} boards in {tries} tries; ask for fewer")
    return np.stack(out)


def glyph_bank(n: int, cell: int = CELL_PX) -> np.ndarray:
    """(n, cell, cell) uint8 glyphs of digits 1..n, white on black, the 5x7 font scaled to the cell."""
    check_size(n)
    s = max(1, cell // 8)
    out = np.zeros((n, cell, cell), np.uint8)
    top, left = (cell - 7 * s) // 2, (cell - 5 * s + 1) // 2
    for d in range(1, n + 1):
        g = np.array([[ch == "#" for ch in row] for row in _FONT[d]], np.uint8) * 255
        out[d - 1, top:top + 7 * s, left:left + 5 * s] = np.kron(g, np.ones((s, s), np.uint8))
    return out


def render(boards_BNN: np.ndarray, cell: int = CELL_PX) -> np.ndarray:
    """(B, n, n) digits 1..n -> (B, n*cell, n*cell) uint8 images."""
    B, n, _ = boards_BNN.shape
    g = glyph_bank(n, cell)[boards_BNN - 1]  # (B, n, n, cell, cell)
    return g.transpose(0, 1, 3, 2, 4).reshape(B, n * cell, n * cell)


def unit_index(n: int) -> torch.Tensor:
    """(3n, n) raster positions of every unit: rows, then columns, then boxes."""
    br, bc = check_size(n)
    pos = torch.arange(n * n).view(n, n)
    boxes = [pos[r:r + br, c:c + bc].flatten() for r in range(0, n, br) for c in range(0, n, bc)]
    return torch.cat([pos, pos.t(), torch.stack(boxes)])


def violated_units(tokens_BN: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) how many of the 3n units (rows, columns, boxes) are not a permutation of the digits."""
    units_BUn = torch.as_tensor(tokens_BN).long()[:, unit_index(n)]
    return (torch.sort(units_BUn, -1).values != torch.arange(n)).any(-1).sum(-1)


def _peers(n: int) -> torch.Tensor:
    """(N, N) bool: cells sharing a row, column or box (a cell is not its own peer)."""
    units_Un = unit_index(n)
    member_UN = torch.zeros(len(units_Un), n * n, dtype=torch.bool)
    member_UN[torch.arange(len(units_Un))[:, None], units_Un] = True
    return (member_UN.t().float() @ member_UN.float() > 0) & ~torch.eye(n * n, dtype=torch.bool)


def digits_left(tokens_BN: torch.Tensor, filled_BN: torch.Tensor, peers_NN: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N) how many digits the rules still allow in each cell, given the filled cells' digits."""
    seen_BNV = torch.einsum("nm,bm,bmv->bnv", peers_NN.float(), filled_BN.float(), F.one_hot(tokens_BN, n).float())
    return (seen_BNV == 0).sum(-1)


def forced_steps(tokens_BN: torch.Tensor, order_BN: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N) bool: at step t, the chosen cell had exactly one digit left by the rules given the cells filled
    before it (with the board's own digits)."""
    tokens_BN, order_BN = torch.as_tensor(tokens_BN).long(), torch.as_tensor(order_BN).long()
    B, N = tokens_BN.shape
    peers_NN, rows = _peers(n), torch.arange(B)
    filled_BN = torch.zeros(B, N, dtype=torch.bool)
    out = torch.zeros(B, N, dtype=torch.bool)
    for t in range(N):
        pos_B = order_BN[:, t]
        out[:, t] = digits_left(tokens_BN, filled_BN, peers_NN, n)[rows, pos_B] == 1
        filled_BN[rows, pos_B] = True
    return out


def solver_orders(tokens_BN: torch.Tensor, n: int, generator: torch.Generator | None = None,
                  clues_BN: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N) a solver's order on each board: the clues first (raster), then always a cell with the fewest digits
    left (ties at random): the reference for "forced cells first"."""
    tokens_BN = torch.as_tensor(tokens_BN).long()
    B, N = tokens_BN.shape
    peers_NN, rows = _peers(n), torch.arange(B)
    filled_BN = torch.zeros(B, N, dtype=torch.bool) if clues_BN is None else clues_BN.clone()
    K = int(filled_BN[0].sum())
    order_BN = torch.zeros(B, N, dtype=torch.long)
    order_BN[:, :K] = torch.sort((~filled_BN).to(torch.int8), dim=1, stable=True).indices[:, :K]
    for t in range(K, N):
        left_BN = digits_left(tokens_BN, filled_BN, peers_NN, n).float() + torch.rand(B, N, generator=generator) / 2
        pos_B = left_BN.masked_fill(filled_BN, float("inf")).argmin(1)
        order_BN[:, t] = pos_B
        filled_BN[rows, pos_B] = True
    return order_BN


def clues_first(order_BN: torch.Tensor, clues_BN: torch.Tensor) -> torch.Tensor:
    """The clue cells first (raster), then the others in `order_BN`'s sequence (as decode places known tokens)."""
    B, N = order_BN.shape
    K = int(clues_BN[0].sum())
    known_BK = torch.sort((~clues_BN).to(torch.int8), dim=1, stable=True).indices[:, :K]
    rest = order_BN[~torch.gather(clues_BN, 1, order_BN)].view(B, N - K)
    return torch.cat([known_BK, rest], 1)


def clue_masks(B: int, N: int, k: int, seed: int) -> torch.Tensor:
    """(B, N) bool with exactly k clues per board, drawn at random (deterministic in seed)."""
    g = torch.Generator().manual_seed(seed)
    keep_BN = torch.argsort(torch.rand(B, N, generator=g), 1) < k
    return keep_BN


def clue_counts(n: int) -> list[int]:
    """The completion settings: 30 and 45 of 81 clues, scaled to the board (13 and 20 of 36 at 6x6)."""
    return [round(n * n * 30 / 81), round(n * n * 45 / 81)]


def board_metrics(tokens_BN, n: int, train_BN=None) -> dict:
    """Generated boards: fraction valid, mean violated units (of 3n); with the train boards, fraction copied."""
    bad_B = violated_units(tokens_BN, n)
    out = {"valid_fraction": float((bad_B == 0).float().mean()), "violated_units": float(bad_B.float().mean())}
    if train_BN is not None:
        train = {bytes(r) for r in np.asarray(train_BN, np.uint8)}
        out["copied_from_train"] = float(np.mean([bytes(r) in train for r in np.asarray(tokens_BN, np.uint8)]))
    return out


def completion_metrics(filled_BN, truth_BN, clues_BN, n: int) -> dict:
    """Completions: fraction valid AND agreeing with every clue (any valid completion counts, not only the
    held-out board itself), and the fraction equal to the held-out board."""
    filled_BN, truth_BN = torch.as_tensor(filled_BN).long(), torch.as_tensor(truth_BN).long()
    ok_B = (violated_units(filled_BN, n) == 0) & ((filled_BN == truth_BN) | ~clues_BN).all(1)
    return {"solved_fraction": float(ok_B.float().mean()),
            "equal_to_heldout": float((filled_BN == truth_BN).all(1).float().mean())}


class GlyphTokenizer(nn.Module):
    """A fixed tokenizer: each cell patch -> the nearest of the n digit glyphs (exact on rendered boards), a token
    -> its glyph. Same interface and checkpoint format family as the VQ-VAE (`oar_core.tokenizer`)."""

    KIND = "oar-glyph-tokenizer"

    def __init__(self, image_size: int, channels: int, grid: int):
        super().__init__()
        if image_size % grid:
            raise ValueError(f"the glyph tokenizer needs image_size ({image_size}) divisible by the grid ({grid}): "
                             f"set ingest.image_size to {grid * CELL_PX}")
        self.config = dict(image_size=image_size, channels=channels, grid=grid)
        self.image_size, self.channels, self.grid, self.codebook_size = image_size, channels, grid, grid
        self.cell = image_size // grid
        glyphs_KP = torch.from_numpy(glyph_bank(grid, self.cell)).float().div(255).flatten(1)
        # a frozen parameter, not a buffer: code that finds a tokenizer's device from its parameters works unchanged
        self.glyphs_KP = nn.Parameter(glyphs_KP, requires_grad=False)

    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        B, C = images_BCHW.shape[:2]
        if C != self.channels or images_BCHW.shape[-1] != self.image_size:
            raise ValueError(f"glyph tokenizer expects images (B,{self.channels},{self.image_size},"
                             f"{self.image_size}), got {tuple(images_BCHW.shape)}")
        x = images_BCHW.float().mean(1, keepdim=True)  # grey: the glyphs are grey
        patches_BLP = F.unfold(x, self.cell, stride=self.cell).transpose(1, 2)
        dist_BLK = torch.cdist(patches_BLP, self.glyphs_KP.to(patches_BLP.dtype).expand(B, -1, -1))
        return dist_BLK.argmin(-1).view(B, self.grid, self.grid)

    def decode(self, tokens_BHW: torch.Tensor) -> torch.Tensor:
        B = tokens_BHW.shape[0]
        patches_BPL = self.glyphs_KP[tokens_BHW.long().flatten(1)].transpose(1, 2)
        img = F.fold(patches_BPL, (self.image_size,) * 2, self.cell, stride=self.cell)
        return img.expand(B, self.channels, -1, -1).contiguous()


DEFAULT_COUNTS = {"train": 20000, "test": 1000}  # boards per split when ingest.max_train / max_test are unset


def board_size_of(source: str) -> int | None:
    """The board size an ingest source asks for, or None when it is not a Sudoku source: `builtin:sudoku` (9x9),
    `builtin:sudoku6`, `builtin:sudoku4`, or a local folder holding `sudoku.json` {"board": n} (a path DVC can track,
    so the DAG runs on it unchanged: datasets/sudoku6)."""
    if source in SOURCES:
        return SOURCES[source]
    if source.startswith("builtin:"):
        raise ValueError(f"ingest.source {source!r}: unknown built-in source; use one of {', '.join(SOURCES)}")
    spec = Path(source) / "sudoku.json"
    if "://" in source or not spec.is_file():
        return None
    try:
        n = json.loads(spec.read_text())["board"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{spec}: expected JSON {{\"board\": n}} with n in {sorted(BOXES)}; fix the file") from None
    check_size(n)
    return n


def split_boards(n: int, counts: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Disjoint train/test boards (test first, so a larger train set keeps the same test boards)."""
    boards = distinct_boards(n, counts["test"] + counts["train"], seed)
    return {"test": boards[:counts["test"]], "train": boards[counts["test"]:]}


def board_samples(boards_BNN: np.ndarray, split: str, image_size: int, channels: int):
    """(image HWC uint8, label 0, id) of each board, drawn with cells of image_size / n pixels."""
    n = boards_BNN.shape[1]
    if image_size % n or image_size // n < 8:
        raise ValueError(f"ingest.image_size ({image_size}) must be the board size ({n}) times a cell of at least 8 "
                         f"pixels for a Sudoku source: e.g. {8 * n}")
    for i, im_HW in enumerate(render(boards_BNN, image_size // n)):
        yield np.repeat(im_HW[..., None], channels, -1), 0, f"sudoku{n}-{split}-{i:05d}"
