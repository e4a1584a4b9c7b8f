"""Results of a stage's slow steps kept by a hash of everything they read, so a rerun that changed something else
(evaluate.strip_steps: only the strips) takes them back instead of recomputing them.

DVC reruns a stage whole and empties its outputs first, so the cache lives beside them, in the repository's
`.dvc/tmp/` (DVC's own scratch folder: not versioned, never pushed). A key names the inputs' content (file
hashes, array bytes), the params that matter, and the source of the code that computes the result: an edit to
any of it is a miss. Only a stage run by DVC (which sets $DVC_ROOT) caches; run by hand, it computes everything.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from oar_core.storage import write_json

CODE_ROOT = Path(__file__).resolve().parents[1]


def default_dir(stage: str) -> Path | None:
    """`.dvc/tmp/results/<stage>` of the repository DVC runs the stage in, or None when DVC does not run it."""
    root = os.environ.get("DVC_ROOT")
    return Path(root) / ".dvc" / "tmp" / "results" / stage if root and (Path(root) / ".dvc").is_dir() else None


def digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:32]


def files_digest(paths: Iterable[Path]) -> str:
    """The content (and names) of these files."""
    paths = sorted(Path(p) for p in paths)
    return digest([p.name.encode() for p in paths] + [p.read_bytes() for p in paths])


def code_digest(*packages: str) -> str:
    """The source of these packages of this project (e.g. "oar_core"): what computes a cached result."""
    return files_digest(f for pkg in packages for f in (CODE_ROOT / pkg).glob("*.py"))


def cached(folder: Path | None, key: dict, compute: Callable[[], Any]) -> tuple[Any, bool]:
    """(compute()'s JSON value, False), kept under `folder` by `key`; (the kept value, True) when `key` was seen."""
    if folder is None:
        return compute(), False
    path = folder / f"{digest([json.dumps(key, sort_keys=True, default=str).encode()])}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())["value"], True
        except (ValueError, KeyError):  # cut short: recompute
            pass
    value = compute()
    write_json(path, {"key": key, "value": value})
    return value, False
