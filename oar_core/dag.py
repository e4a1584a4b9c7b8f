"""dvc.yaml, read: its stages and the paths each one declares, with `${section.key}` filled in from params.yaml
as DVC fills them (the output folders live once, in params.yaml); and params.yaml itself, read as strictly as DVC
reads it (`read_params_yaml`, which oar_core.params validates)."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

_VAR = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


class _Refused(yaml.YAMLError):
    pass


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, minus anchors and aliases: DVC and the stages must read the same plain values, and an
    alias nested in aliases ("billion laughs") would expand a few lines into billions of elements."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if event.anchor is not None:
            mark = "*" if isinstance(event, yaml.AliasEvent) else "&"
            raise _Refused(f"line {event.start_mark.line + 1}: YAML anchors and aliases ({mark}{event.anchor[:40]}) "
                           f"are not allowed here; write each value out")
        return super().compose_node(parent, index)

    def construct_yaml_int(self, node):  # past Python's 4300-digit limit int() fails without saying where
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            raise _Refused(f"line {node.start_mark.line + 1}: an integer of {len(node.value)} digits is no usable "
                           f"value") from None


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _duplicate_keys(node, path: tuple = ()):
    """(dotted key, the lines it is on) for every key a mapping holds more than once, at any depth."""
    if isinstance(node, yaml.MappingNode):
        lines: dict[tuple, list[int]] = {}
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                lines.setdefault((k.tag, k.value), []).append(k.start_mark.line + 1)
                yield from _duplicate_keys(v, (*path, k.value))
        yield from ((".".join((*path, value)), at) for (_, value), at in lines.items() if len(at) > 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            yield from _duplicate_keys(v, (*path, str(i)))


def _where(e: yaml.YAMLError) -> str:
    """A YAML error on one line: where, what, and what it was inside (PyYAML's own text spans several lines)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or problem is None:
        return f": {' '.join(str(e).split())}"
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    inside = f" ({context} from line {cmark.line + 1})" if context and cmark else f" ({context})" if context else ""
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}{inside}"


def read_params_yaml(path: str | Path) -> dict:
    """params.yaml as plain data, read the one strict way its readers share (`oar_core.params.load_params`, and
    dag_stages here): a duplicated key, which PyYAML would silently resolve to its last value while DVC refuses the
    file, and anchors or aliases are refused with their line numbers (ValueError, one line)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: not found; run from the repository root or pass --params PATH")
    loader = None
    try:
        loader = _Loader(path.read_bytes())  # bytes: PyYAML names a bad encoding or character with its position
        node = loader.get_single_node()
        dups = list(_duplicate_keys(node)) if node is not None else []
        if dups:
            where = "; ".join(f"{k} (lines {', '.join(map(str, at))})" for k, at in dups)
            raise ValueError(f"{path}: duplicate keys, which DVC refuses (PyYAML would silently take the last "
                              f"value): {where}; keep one of each")
        raw = loader.construct_document(node) if node is not None else None
    except _Refused as e:
        raise ValueError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML{_where(e)}") from None
    finally:
        if loader is not None:
            loader.dispose()
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: top level must be a mapping of stage sections")
    return raw


def dag_stages(dvc_yaml: str | Path = "dvc.yaml", params: dict | None = None) -> dict[str, dict]:
    """{stage: its spec}, in file order (which is topological in ours); `${...}` filled from `params` (a dict of
    sections: a stage passes its validated params, so a key its params.yaml leaves out has its default), by default
    the params.yaml beside dvc.yaml as written (read_params_yaml; a key it leaves out is named)."""
    dvc_yaml = Path(dvc_yaml)
    text = dvc_yaml.read_text()
    if _VAR.search(text):
        if params is None:
            params = read_params_yaml(dvc_yaml.parent / "params.yaml")
        text = _VAR.sub(lambda m: str(_lookup(params, m.group(1), dvc_yaml)), text)
    return (yaml.safe_load(text) or {}).get("stages") or {}


def _lookup(values: dict, key: str, dvc_yaml: Path):
    for part in key.split("."):
        if not isinstance(values, dict) or part not in values:
            raise ValueError(f"{dvc_yaml}: ${{{key}}} is not set in params.yaml; add it (see the repository's "
                             f"params.yaml)")
        values = values[part]
    return values


def declared(spec: dict, *keys: str) -> list[str]:
    """The paths under `keys` (deps, outs, metrics, plots) of one stage: an entry is a path or {path: options}."""
    return [next(iter(e)) if isinstance(e, dict) else e for key in keys for e in spec.get(key) or []]



def output_values(stage: str, params: dict, dvc_yaml: str | Path = "dvc.yaml") -> list[tuple[str, str]]:
    """(what dvc.yaml writes: the params key of a `${section.key}` entry or the path itself, the path it names) for
    each output of `stage`: for messages that must name the key a user sets."""
    stages = (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages") or {}
    found = []
    for entry in declared(stages.get(stage) or {}, "outs", "metrics", "plots"):
        m = _VAR.fullmatch(entry)
        found.append((m.group(1), str(_lookup(params, m.group(1), Path(dvc_yaml)))) if m else (entry, entry))
    return found
