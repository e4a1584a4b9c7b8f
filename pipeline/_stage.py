"""The shared shell of every stage script: parse --params, validate, run, turn known errors into one line."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from oar_core.params import load_section


def stage_main(doc: str, section: str | None, run: Callable, argv=None, add_args: Callable | None = None,
               summary: Callable[[dict], str] | None = None):
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--params", default="params.yaml")
    if section is None:
        ap.add_argument("--stage", required=True, help="params.yaml section (and stage name) to run")
    if add_args:
        add_args(ap)
    args = ap.parse_args(argv)
    name = section or args.stage
    try:
        result = run(load_section(name, args.params), args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: [{name}] {e}", file=sys.stderr)
        sys.exit(1)
    print(f"{name}: {summary(result) if summary else json.dumps(result, default=str)}")
    return result
