"""docs/bad_inputs.md lists the bad inputs tried, each with the test that tries it: the list cannot name a test that
does not exist (a renamed or deleted test would leave a claim nothing checks)."""
import re
from pathlib import Path

REPO = Path(__file__).parents[2]


def test_every_listed_bad_input_names_an_existing_test():
    rows = [ln for ln in (REPO / "docs/bad_inputs.md").read_text().splitlines() if re.match(r"\| \d+ \|", ln)]
    assert len(rows) >= 30
    for row in rows:
        refs = re.findall(r"`(tests/[\w/]+\.py)::(test_\w+)`", row)
        assert refs, f"no test named: {row[:80]}"
        for path, name in refs:
            assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), f"{path}::{name} does not exist"
