"""Checkpoint files: safetensors, so that reading one never runs code, written atomically and read back with one
clear line when missing, foreign, truncated or in the old pickle format.

Format: one safetensors file (under the artifact's usual name, e.g. model.pt) holding every tensor, and in its
header metadata one key, "oar", whose value is a JSON object {"format": FORMAT, "tree": ...}: the checkpoint's
nested data with each tensor replaced by a reference to it (oar_core.tensor_tree). One file, not weights plus a JSON
beside them: it is written by one atomic rename, it is one DVC output and one content hash (train's input_hashes
covers the config with the weights), and the two halves can never come from different runs. One metadata key, not
one per field: safetensors keeps metadata in an unordered map, and a single key keeps the bytes deterministic.

Old checkpoints (torch.save pickles) are never unpickled here: a pickle can run any code while it loads. They are
refused with the one-time conversion command, `python -m oar_core.checkpoint convert OLD.pt`, which loads them with
torch's weights-only unpickler (plain containers and tensors only) and rewrites them in place."""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import struct
import sys
from typing import Any

import safetensors.torch
import torch

from oar_core.storage import read_bytes, write_bytes_atomic
from oar_core.tensor_tree import flatten, unflatten

FORMAT = "oar-checkpoint/1"
META_KEY = "oar"
RERUN = "delete it and rerun its stage"


def save_checkpoint(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` (dicts, lists, tuples, tensors, str/int/float/bool/None) as a safetensors checkpoint."""
    tree, tensors = flatten(obj)
    meta = json.dumps({"format": FORMAT, "tree": tree}, allow_nan=False, separators=(",", ":"))
    write_bytes_atomic(path, safetensors.torch.save(own_storage(tensors), metadata={META_KEY: meta}))


def own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached tensors, none sharing memory with another (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    return out


def file_kind(data: bytes) -> str:
    """'safetensors', 'pickle' (torch.save's zip or legacy format: the old checkpoints) or 'unknown', from the
    first bytes only: nothing is parsed or unpickled to tell."""
    if len(data) >= 10 and data[8:10] == b'{"':  # an 8-byte header length, then the JSON header
        return "safetensors"
    if data[:4] == b"PK\x03\x04" or (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "pickle"
    return "unknown"


def convert_command(path: str | os.PathLike) -> str:
    return f"python -m oar_core.checkpoint convert {shlex.quote(str(path))}"


def load_checkpoint(path: str | os.PathLike, what: str = "checkpoint", fix: str = RERUN) -> Any:
    """The data save_checkpoint wrote, on CPU. Errors are one line naming the file and `fix` (what to do)."""
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found; run the stage that produces it "
                                f"(e.g. `dvc repro`)") from None
    kind = file_kind(data)
    if kind == "pickle":
        raise ValueError(f"{path}: {what} in the old pickle format, not loaded (a pickle can run code as it loads); "
                         f"if it comes from this project, convert it once with `{convert_command(path)}`, or {fix}")
    if kind != "safetensors":
        raise ValueError(f"{path}: unreadable {what} (neither a safetensors checkpoint nor an old torch one); {fix}")
    try:
        tensors = safetensors.torch.load(data)  # validates the header and that the data covers every tensor
        (size,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8:8 + size]).get("__metadata__", {}).get(META_KEY)
    except (ValueError, AttributeError, RecursionError, safetensors.SafetensorError) as e:  # truncated or corrupt
        raise ValueError(f"{path}: unreadable {what} (truncated or corrupt safetensors: {one_line(e)}); "
                         f"{fix}") from None
    if meta is None:
        raise ValueError(f"{path}: a safetensors file without oar's metadata, so not a {what} written by this "
                         f"project; point at one that is, or {fix}")
    try:
        meta = json.loads(meta)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                             f"expected {FORMAT!r}")
        return unflatten(meta["tree"], tensors)
    except (ValueError, KeyError, RecursionError) as e:
        raise ValueError(f"{path}: unreadable {what} (its metadata: {one_line(e)}); {fix}") from None


def one_line(e: BaseException, limit: int = 200) -> str:
    """The informative line of a multi-line exception message, shortened to `limit` characters."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
    lines = [ln for ln in lines if ln] or [type(e).__name__]
    # torch's weights-only refusal names the global mid-message; load_state_dict's first line only announces
    line = next((ln for ln in lines if "GLOBAL" in ln), next((ln for ln in lines if not ln.endswith(":")), lines[0]))
    return line if len(line) <= limit else line[:limit - 3] + "..."


PICKLE_FIX = "re-export the weights from the code that made it, or retrain"


def load_pickle_weights_only(path: str | os.PathLike, data: bytes, fix: str = PICKLE_FIX) -> Any:
    """The torch.save bytes `data` (read from `path`) through torch's weights-only unpickler: plain containers,
    numbers, strings and tensors are rebuilt, any other global (a function, a class with a __reduce__) is refused
    before it runs. Explicit weights_only=True also overrides TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # the refusal (UnpicklingError), or a truncated zip
        raise ValueError(f"{path}: refused by torch's weights-only loader ({one_line(e)}); it holds more than "
                         f"tensors and plain data, so it is not loaded: {fix}") from None


def convert(src: str | os.PathLike, dst: str | os.PathLike | None = None) -> str:
    """Rewrite an old pickle checkpoint as a safetensors one (in place unless `dst`), loading it weights-only."""
    dst = dst or src
    try:
        data = read_bytes(src)
    except FileNotFoundError:
        raise FileNotFoundError(f"{src}: no such file") from None
    kind = file_kind(data)
    if kind == "safetensors":
        load_checkpoint(src)  # already converted: say so only if it really reads
        if str(dst) != str(src):
            write_bytes_atomic(dst, data)
        return f"{src}: already a safetensors checkpoint" + (f", copied to {dst}" if str(dst) != str(src) else "")
    if kind != "pickle":
        raise ValueError(f"{src}: neither an old torch checkpoint nor a safetensors one; nothing to convert")
    obj = load_pickle_weights_only(src, data)
    try:
        save_checkpoint(dst, obj)
    except TypeError as e:
        raise ValueError(f"{src}: not converted: {e}") from None
    return f"{src}: converted to safetensors -> {dst}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m oar_core.checkpoint", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="rewrite an old pickle checkpoint as safetensors (loaded weights-only)")
    conv.add_argument("src")
    conv.add_argument("--out", help="write here instead of replacing SRC")
    args = ap.parse_args(argv)
    try:
        print(convert(args.src, args.out))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
