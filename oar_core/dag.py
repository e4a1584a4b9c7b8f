"""dvc.yaml, read: its stages and the paths each one declares, with `${section.key}` filled in from params.yaml
as DVC fills them (the output folders live once, in params.yaml)."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

_VAR = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


def dag_stages(dvc_yaml: str | Path = "dvc.yaml", params: dict | None = None) -> dict[str, dict]:
    """{stage: its spec}, in file order (which is topological in ours); `${...}` filled from `params` (a dict of
    sections; default: the params.yaml beside dvc.yaml, validated, so a key it leaves out has its default)."""
    dvc_yaml = Path(dvc_yaml)
    text = dvc_yaml.read_text()
    if _VAR.search(text):
        if params is None:
            from oar_core.params import load_params  # here, not at the top: params imports nothing of the DAG

            params = load_params(dvc_yaml.parent / "params.yaml").model_dump(mode="json")
        text = _VAR.sub(lambda m: str(_lookup(params, m.group(1))), text)
    return (yaml.safe_load(text) or {}).get("stages") or {}


def _lookup(values: dict, key: str):
    for part in key.split("."):
        values = values[part]
    return values


def declared(spec: dict, *keys: str) -> list[str]:
    """The paths under `keys` (deps, outs, metrics, plots) of one stage: an entry is a path or {path: options}."""
    return [next(iter(e)) if isinstance(e, dict) else e for key in keys for e in spec.get(key) or []]
