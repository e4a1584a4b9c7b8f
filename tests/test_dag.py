"""dvc.yaml is the DAG of record: every project module a stage's script imports (directly, transitively, or
inside a function) must be one of that stage's deps, or an edit to it leaves the stage's outputs stale."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("oar_core", "pipeline")


def project_imports(module: str) -> set[str]:
    """Dotted names of the project modules `module` imports, anywhere in its source."""
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from oar_core import x` may name a submodule
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES and (ROOT / (n.replace(".", "/") + ".py")).exists()}
    return found


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += project_imports(m)
    return seen


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_module_a_stage_runs_is_one_of_its_deps(stage):
    spec = STAGES[stage]
    script = spec["cmd"].split("-m ", 1)[1].split()[0]
    needed = {m.replace(".", "/") + ".py" for m in closure(script)}
    missing = sorted(needed - set(spec["deps"]))
    assert not missing, f"dvc.yaml stage {stage!r} runs code it does not depend on: add {missing} to its deps"
    unused = sorted({d for d in spec["deps"] if d.endswith(".py")} - needed)
    assert not unused, f"dvc.yaml stage {stage!r} reruns when {unused} change but never runs them: remove them"


def test_the_walk_follows_function_level_imports():
    # pipeline.train imports order_table inside run_train; a walk of top-level imports alone would miss it
    assert "oar_core.order_table" in closure("pipeline.train")


def test_the_library_holds_no_stage_logic_and_no_params_sections():
    """The stage script is the stage: oar_core has no run_* and takes no params section objects, so a stage's
    code deps are exactly what it runs (params.py's own imports are the registry of names it validates)."""
    for path in sorted((ROOT / "oar_core").glob("*.py")):
        tree = ast.parse(path.read_text())
        stages = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("run_")]
        assert not stages, f"{path.name} holds stage logic {stages}: move it to pipeline/"
        if path.name != "params.py":
            sections = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                        and n.module == "oar_core.params" for a in n.names if a.name.endswith("Params")]
            assert not sections, f"{path.name} imports params sections {sections}: pass plain values"
