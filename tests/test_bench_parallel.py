"""bench/parallel.py: a row's measurement and the table on tiny random-weight models (fast), and the whole bench at its
--quick size with resume (slow)."""
import json

import pytest
import torch


def test_a_row_measures_quality_speed_and_its_own_likelihood():
    from bench.parallel import measure, table
    from oar_core.model import GPT, GPTConfig
    from oar_core.names import LocationRule
    from oar_core.params import SampleModelParams, SampleParams
    from oar_core.tokenizer import VQTokenizer

    torch.manual_seed(0)
    tok = VQTokenizer(28, 1, 7, codebook_size=16, code_dim=8, hidden=16).eval()
    model = GPT(GPTConfig(grid_h=7, grid_w=7, vocab_size=16, num_classes=10, n_layer=1, n_head=2, d_model=32,
                          policy=True)).eval()
    nll_data = (torch.randint(0, 16, (8, 49)), torch.arange(8) % 10)
    seen, rows = [], []
    for sampler, order, steps in [("raster", "raster", 49), ("oar-policy", "policy", 12)]:
        spec = SampleModelParams(name=sampler, checkpoint="-", order=order, location=LocationRule(temperature=1.0),
                                 steps=None if steps == 49 else steps)
        p = SampleParams(models=[spec], n_per_model=10, batch_size=5, cfg_scale=1.0)
        row = measure(model, tok, spec, p, torch.device("cpu"),
                      lambda ims: seen.append(ims.shape) or {"fid": 1.0 + steps / 49, "kid": 0.1, "precision": 0.5,
                                                             "recall": 0.5}, nll_data, repeats=1)
        rows.append({**row, "sampler": sampler, "grid": 7, "steps": steps, "N": 49})
    assert seen == [(10, 28, 28, 1)] * 2  # every sample, decoded to images, reaches the feature space
    assert all(r["images_per_s"] > 0 and r["latency_ms"] > 0 and r["nll_bits_per_token"] > 0 for r in rows)
    assert "parallel sampler (12 steps" in rows[1]["nll_how"] and "parallel" not in rows[0]["nll_how"]
    rows.append({**rows[0], "sampler": "oar-policy", "fid": 2.0})  # its one-token-per-step row, for the ratios
    md = table(rows, type("A", (), {"nll_images": 8})())
    assert "| oar-policy | 12 | 1.24 |" in md and "- oar-policy at 12 steps: batch-1 >= 4x raster:" in md
    assert "FID within 10% of its N-step: yes" in md  # 1.24 / 2.0


@pytest.mark.slow
def test_parallel_bench_runs_at_quick_size_and_resumes(tmp_path, monkeypatch):
    from bench import parallel

    monkeypatch.chdir(tmp_path)
    args = ["--quick", "--grids", "7", "--divisors", "1", "4", "--workdir", str(tmp_path / "w"), "--tag", "q"]
    rows = parallel.main(args)
    assert len(rows) == len(parallel.SAMPLERS) * 2
    md = (tmp_path / "bench/parallel_q.md").read_text()
    for name, *_ in parallel.SAMPLERS:
        assert f"| {name} | 49 |" in md and f"| {name} | 12 |" in md
    results = tmp_path / "w/q/g7/results"
    before = {f.name: f.stat().st_mtime_ns for f in results.glob("*.json")}
    assert all(0 <= json.loads(f.read_text())["recall"] <= 1 for f in results.glob("*.json"))
    parallel.main(args)  # resumed: nothing recomputed
    assert {f.name: f.stat().st_mtime_ns for f in results.glob("*.json")} == before
