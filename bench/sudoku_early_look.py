"""Early look at bench.sudoku's mid-training run checkpoints (runs/<stage>/last.pt): generation and completion on 100
held-out boards.  python bench/sudoku_early_look.py <run last.pt>=raster|any ...  (3-layer d=96, next_position both)"""
import sys

import torch

from oar_core import sudoku
from oar_core.checkable import complete
from oar_core.checkpoint import load_checkpoint
from oar_core.decode import generate
from oar_core.model import GPT, GPTConfig
from oar_core.names import LocationRule
from oar_core.token_shards import load_token_split

torch.manual_seed(0)
shards = "/tmp/oar-bench-sudoku/common6_4000_200/data/shards"
test = load_token_split(shards, "test")[0][:100].long()
B = len(test)
for path, kind in [(a.split("=")[0], a.split("=")[1]) for a in sys.argv[1:]]:
    c = load_checkpoint(path)
    m = GPT(GPTConfig(grid_h=6, grid_w=6, vocab_size=6, num_classes=0, n_layer=3, n_head=4, d_model=96,
                      next_position="both"))
    m.load_state_dict(c["model"])
    m.eval()
    print(path, "step", c["step"], flush=True)
    runs = [("raster", "raster", {}, True)] if kind == "raster" else [
        ("raster(clues first)", "raster", {}, False), ("random", "random", {}, False),
        ("max_prob", "confidence", {"score": "max_prob"}, False), ("margin", "confidence", {"score": "margin"}, False)]
    for name, order, loc, forced in runs:
        g = torch.Generator().manual_seed(0)
        r = generate(m, torch.zeros(B, dtype=torch.long), order=order, location=LocationRule(**loc), generator=g)
        gen = sudoku.board_metrics(r["tokens"], 6)
        out = []
        for k in (13, 20):
            clues = sudoku.clue_masks(B, 36, k, 0)
            res = complete(m, test, clues, order, LocationRule(**loc), clue_forced=forced, generator=g)
            cm = sudoku.completion_metrics(res["tokens"], test, clues, 6)
            f = sudoku.forced_steps(res["tokens"], res["order"], 6)[~clues.gather(1, res["order"])].float().mean()
            out.append(f"{k} clues: solved {cm['solved_fraction']:.2f} forced {f:.2f}")
        print(f"  {name:20s} gen valid {gen['valid_fraction']:.2f} broken {gen['violated_units']:.1f} | "
              + " | ".join(out), flush=True)
