"""The custom-run forms of the flows: a params section's JSON schema made for "change only what you type".

- No field has a default, so the UI prefills nothing and submits only the fields the user filled: every other key
  keeps the value params.yaml has when the run starts (a form prefilled at serve time would write those stale
  values back and undo the previous run's changes).
- An optional value (`str | None`: a path that may be unset) is a plain field, not a choice between a type and
  "None"; leaving it empty keeps params.yaml's value (a null is set in params.yaml itself).
- Each field's help text is the comment beside its key in params.yaml (the file's own documentation, so the text is
  written once; a key that a section of the same type comments, e.g. train_random.lr from train_raster's), or, for
  a key params.yaml does not list or writes in flow style (`model: {...}`, `location:`), its pydantic
  `Field(description=...)`.
The types and bounds stay, so the API still refuses a wrong type or an out-of-range value before a run exists.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import SkipValidation, WithJsonSchema
from ruamel.yaml import YAML

from oar_core.params import Params, Section

KEEP = "Empty: keep params.yaml's value when the run starts."


def yaml_comments(path: Path) -> dict[tuple, str]:
    """{key path: the end-of-line comment beside it (and the comment lines aligned under it)} of a YAML file."""
    if not path.exists():
        return {}
    out: dict[tuple, str] = {}

    def walk(node, prefix: tuple) -> None:
        for key, value in node.items():
            token = (node.ca.items.get(key) or [None] * 3)[2]
            if token is None and hasattr(value, "ca") and value.ca.comment:  # `key:  # ...` over a nested block
                token = value.ca.comment[0]
            if token is not None:
                lines = [token.value.splitlines()[0]] + [
                    ln for ln in token.value.splitlines()[1:] if ln.find("#") == token.start_mark.column]
                text = " ".join(ln.strip().lstrip("#").strip() for ln in lines if ln.strip().startswith("#"))
                if text:
                    out[(*prefix, key)] = text
            if hasattr(value, "items"):
                walk(value, (*prefix, key))

    walk(YAML().load(path.read_text()), ())
    return out


def _inline(node: Any, defs: dict) -> Any:
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return _inline({**defs[node["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in node.items() if k != "$ref"}},
                       defs)
    return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}


def _field(node: dict) -> dict:
    """One property without its default, with `X | None` as X."""
    node = {k: v for k, v in node.items() if k not in ("default", "required")}
    alts = node.pop("anyOf", None)
    if alts and {"type": "null"} in alts:
        rest = [a for a in alts if a != {"type": "null"}]
        node = {**(rest[0] if len(rest) == 1 else {"anyOf": rest}), **node}
    elif alts:
        node["anyOf"] = alts
    return node


def _describe(node: dict, model: type | None, path: tuple, docs: dict[tuple, str], same_type: list[tuple]) -> dict:
    """Defaults and nulls out, the params.yaml key as each field's title, help text in."""
    node = _field(node)
    if node.get("type") == "array" and isinstance(node.get("items"), dict):
        item = _sub_model(model)
        required = node["items"].get("required")  # a list is given whole: each of its items complete
        node["items"] = _describe(node["items"], item, (), {}, []) if item else _field(node["items"])
        if required:
            node["items"]["required"] = required
    if "properties" not in node:
        return node
    fields = getattr(model, "model_fields", {})
    props = {}
    for key, prop in node["properties"].items():
        sub = _sub_model(fields[key].annotation) if key in fields else None
        prop = _describe(prop, sub, (*path, key), docs, same_type)
        text = next((docs[(*p, key)] for p in [path, *same_type] if (*p, key) in docs), None)
        text = text or (fields[key].description if key in fields else None)
        props[key] = {**prop, "title": key, **({"description": text} if text else {})}
        props[key].pop("required", None)
    node["properties"] = props
    return node


def _sub_model(annotation) -> type | None:
    """The pydantic model inside a field's annotation (X, X | None, list[X]), if any."""
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if (found := _sub_model(arg)) is not None:
            return found
    return None


def section_form(name: str, section: type[Section], docs: dict[tuple, str], what: str) -> dict:
    """The form of params.yaml's section `name`."""
    same_type = [(other,) for other, f in Params.model_fields.items() if f.annotation is section and other != name]
    schema = _inline(section.model_json_schema(), section.model_json_schema().get("$defs", {}))
    form = _describe(schema, section, (name,), docs, same_type)
    return {**form, "title": name, "description": f"{what} Section `{name}` of params.yaml. {KEEP}"}


def params_form(docs: dict[tuple, str], whats: dict[str, str]) -> dict:
    """The whole of params.yaml, one group per stage's section, in the order the pipeline runs them."""
    props = {n: section_form(n, f.annotation, docs, whats.get(n, "")) for n, f in Params.model_fields.items()}
    return {"type": "object", "title": "params", "additionalProperties": False, "properties": props,
            "description": f"params.yaml, one group per stage. {KEEP}"}


def plain_parameters(properties: dict) -> None:
    """In place, on a flow's parameter schema: a parameter defaulting to None has no default and is a plain field
    (the UI shows a null default as a None toggle); an empty field is not sent, so the flow's None applies."""
    for name, prop in properties.items():
        if "default" in prop and prop["default"] is None:
            properties[name] = {**_field(prop), "position": prop.get("position")}


def form_param(schema: dict):
    """A flow parameter's annotation: the run's mapping as given (no class defaults filled in), shown as `schema`."""
    return Annotated[Optional[Any], SkipValidation, WithJsonSchema(schema)]
