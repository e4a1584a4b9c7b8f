"""dvc.yaml, read: its stages and the paths each one declares, with `${section.key}` filled in from params.yaml
as DVC fills them (the output folders live once, in params.yaml)."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

_VAR = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


def dag_stages(dvc_yaml: str | Path = "dvc.yaml", params: str | Path | None = None) -> dict[str, dict]:
    """{stage: its spec}, in file order (which is topological in ours); `params` defaults to the params.yaml beside
    dvc.yaml."""
    dvc_yaml = Path(dvc_yaml)
    text = dvc_yaml.read_text()
    if _VAR.search(text):
        values = yaml.safe_load(Path(params or dvc_yaml.parent / "params.yaml").read_text()) or {}
        text = _VAR.sub(lambda m: str(_lookup(values, m.group(1))), text)
    return (yaml.safe_load(text) or {}).get("stages") or {}


def _lookup(values: dict, key: str):
    for part in key.split("."):
        values = values[part]
    return values


def declared(spec: dict, *keys: str) -> list[str]:
    """The paths under `keys` (deps, outs, metrics, plots) of one stage: an entry is a path or {path: options}."""
    return [next(iter(e)) if isinstance(e, dict) else e for key in keys for e in spec.get(key) or []]
