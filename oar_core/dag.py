"""dvc.yaml, read: its stages and the paths each one declares."""
from __future__ import annotations

from pathlib import Path

import yaml


def dag_stages(dvc_yaml: str | Path = "dvc.yaml") -> dict[str, dict]:
    """{stage: its spec}, in file order (which is topological in ours)."""
    return (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages") or {}


def declared(spec: dict, *keys: str) -> list[str]:
    """The paths under `keys` (deps, outs, metrics, plots) of one stage: an entry is a path or {path: options}."""
    return [next(iter(e)) if isinstance(e, dict) else e for key in keys for e in spec.get(key) or []]
