"""The quality study end to end at smoke size (slow: `pytest -m slow`): every sampler gets a row with valid
numbers, and a rerun with the same arguments reuses every result instead of redoing it."""
import json

import pytest


@pytest.mark.slow
def test_quality_study_runs_and_resumes(tmp_path, monkeypatch):
    from bench import quality

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench").mkdir()
    args = ["--seeds", "0", "--steps", "40", "--finetune-steps", "20", "--n-samples", "60", "--size", "tiny",
            "--max-train", "300", "--max-test", "60", "--tokenizer-steps", "60", "--classifier-steps", "60",
            "--rounds", "2", "--workdir", str(tmp_path / "work"), "--tag", "smoke"]
    quality.main(args)
    table = (tmp_path / "bench/quality_smoke.md").read_text()
    for name, *_ in quality.SAMPLERS:
        assert f"| {name} |" in table
    results = tmp_path / "work/smoke/seed_0/results"
    before = {f.name: f.stat().st_mtime_ns for f in results.glob("*.json")}
    assert len(before) == len(quality.SAMPLERS)
    for f in results.glob("*.json"):
        r = json.loads(f.read_text())
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["nll_bits_per_token"] > 0
    quality.main(args)  # resumed: nothing recomputed
    assert {f.name: f.stat().st_mtime_ns for f in results.glob("*.json")} == before
