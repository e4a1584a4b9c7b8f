"""bench/budget.py's table and figure from the results bench.quality leaves on disk (no training: fast)."""
import json

from bench import budget


def test_budget_table_and_figure_from_results_on_disk(tmp_path, monkeypatch):
    work = tmp_path / "w"
    for m, tag in ((1, "budget-1x"), (2, "budget-2x")):
        for seed in (0, 1):
            res = work / tag / f"seed_{seed}" / "results"
            res.mkdir(parents=True)
            for i, s in enumerate(budget.SAMPLERS):
                (res / f"{s}.json").write_text(json.dumps({"nll_bits_per_token": 5.0 + i / 10 - m / 100 + seed / 1000,
                                                           "fid": 2.0 + i - m / 10}))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench").mkdir()
    budget.main(["--workdir", str(work), "--seeds", "0", "1", "--table-only"])
    md = (tmp_path / "bench/budget.md").read_text()
    assert "| raster | 4.991 ± 0.001 | 1.90 ± 0.00 | 4.981 ± 0.001 | 1.80 ± 0.00 | – | – |" in md
    assert "| OAR, annealed-Gumbel confidence | 5.191 ± 0.001 | 3.90 ± 0.00 |" in md
    assert (tmp_path / "bench/budget.png").stat().st_size > 1000
