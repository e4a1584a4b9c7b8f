"""Nested checkpoint data <-> named tensors + plain JSON, so that a checkpoint needs no pickle: the tensors go to
safetensors, everything else (configs, optimizer hyper-parameters, step, history) to JSON that decodes to the same
Python values. Exactness matters: the optimizer's state is keyed by int parameter index (a JSON object would turn
the keys into strings and load_state_dict would silently drop that state), its betas are a tuple, and a resumed
run must be bit-identical, so int keys, tuples and non-finite floats are tagged rather than approximated.

A tag is a one-key JSON object: {"__tensor__": name}, {"__dict__": [[key, value], ...]} (a dict whose keys are not
all strings, or that could be mistaken for a tag), {"__tuple__": [...]}, {"__float__": "nan" | "inf" | "-inf"}."""
from __future__ import annotations

import math
from typing import Any

import torch

TENSOR, DICT, TUPLE, FLOAT = "__tensor__", "__dict__", "__tuple__", "__float__"
TAGS = (TENSOR, DICT, TUPLE, FLOAT)
LEAVES = (str, int, float, bool, type(None))  # bool is an int; listed for the error message


def flatten(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-ready tree, {name: tensor}); each tensor is named by its path, e.g. `state_dict/head.weight`."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            name, n = path or "tensor", 1
            while name in tensors:  # {"a/b": t} and {"a": {"b": t}} share a path: keep both
                name, n = f"{path}#{n}", n + 1
            tensors[name] = x
            return {TENSOR: name}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and not (len(x) == 1 and next(iter(x)) in TAGS):
                return {k: enc(v, f"{path}/{k}" if path else k) for k, v in x.items()}
            return {DICT: [[enc_key(k, path), enc(v, f"{path}/{k}" if path else str(k))] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {TUPLE: [enc(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(x)]
        if isinstance(x, float) and not math.isfinite(x):
            return {FLOAT: repr(float(x))}  # 'nan', 'inf', '-inf': JSON itself has no such numbers
        if isinstance(x, LEAVES):
            return x
        raise TypeError(f"{path or 'the checkpoint'}: a {type(x).__name__} cannot be stored in a checkpoint "
                        f"(tensors, dicts, lists, tuples, str, int, float, bool and None can)")

    def enc_key(k: Any, path: str) -> Any:
        if isinstance(k, torch.Tensor):
            raise TypeError(f"{path or 'the checkpoint'}: a tensor cannot be a dict key in a checkpoint")
        return enc(k, path)

    return enc(obj, ""), tensors


def unflatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of flatten. Raises ValueError on a tree that flatten cannot have written."""
    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if len(x) != 1 or next(iter(x)) not in TAGS:
            return {k: dec(v) for k, v in x.items()}
        (tag, value), = x.items()
        if tag == TENSOR:
            if value not in tensors:
                raise ValueError(f"the metadata names a tensor {value!r} the file does not hold")
            return tensors[value]
        if tag == TUPLE and isinstance(value, list):
            return tuple(dec(v) for v in value)
        if tag == FLOAT and value in ("nan", "inf", "-inf"):
            return float(value)
        if tag == DICT and isinstance(value, list) and all(isinstance(kv, list) and len(kv) == 2 for kv in value):
            out = {}
            for k, v in value:
                key = dec(k)
                if isinstance(key, (torch.Tensor, list, dict)):  # flatten never writes one
                    raise ValueError(f"a {type(key).__name__} as a dict key in the metadata")
                try:
                    out[key] = dec(v)
                except TypeError:  # a tuple holding a list: unhashable
                    raise ValueError("an unhashable dict key in the metadata") from None
            return out
        raise ValueError(f"a malformed {tag} entry in the metadata")

    return dec(tree)
