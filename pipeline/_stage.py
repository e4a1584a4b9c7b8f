"""The shared shell of every stage script: parse --params, validate, run, turn known errors into one line."""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Callable

from oar_core.dag import dag_stages, declared, output_values
from oar_core.params import Params, load_params, upstream_paths
from oar_core.storage import is_remote, remove_stale_temps


def sweep_temps(stage: str, params: dict, dag: str = "dvc.yaml") -> None:
    """Remove the `.*.tmp` files a killed run of this stage left inside its declared outputs, before DVC can
    record them (remove_stale_temps spares files another live process is still writing)."""
    if not Path(dag).exists():
        return
    for out in map(Path, declared(dag_stages(dag, params).get(stage) or {}, "outs", "metrics", "plots")):
        folders = {f.parent for f in out.rglob(".*.tmp")} if out.is_dir() else {out.parent}
        for folder in folders:
            remove_stale_temps(folder)


def own_roots(stage: str, params: Params, params_file: str = "params.yaml", dag: str = "dvc.yaml") -> tuple[Path, Path]:
    """(DVCLive root, run-state root) of a run of `stage` with `params`: the repository's `dvclive/` and `runs/` for
    the pipeline's run (the params.yaml beside dvc.yaml, or params whose outputs for this stage are the ones that
    file makes dvc.yaml declare); a trial naming other outputs (`--params probe.yaml` with out_dir: models/probe)
    keeps both inside its own output, `<out>/dvclive/` and `<out>/runs/`, and so never touches the pipeline's tracked
    metrics or its resume state."""
    pipeline, repo_params = (Path("dvclive"), Path("runs")), Path(dag).parent / "params.yaml"
    if not Path(dag).exists() or not repo_params.exists() or Path(params_file).resolve() == repo_params.resolve():
        return pipeline
    mine = declared(dag_stages(dag, params.model_dump(mode="json")).get(stage) or {}, "outs")
    try:
        theirs = declared(dag_stages(dag, load_params(repo_params).model_dump(mode="json")).get(stage) or {}, "outs")
    except ValueError:  # the repository's params.yaml does not validate: this run is not the pipeline's
        theirs = None
    if not mine or mine == theirs:
        return pipeline
    return Path(mine[0]) / "dvclive", Path(mine[0]) / "runs"


def refuse_remote_outputs_under_dvc(stage: str, params: dict, dag: str = "dvc.yaml") -> None:
    """Under `dvc repro` / `dvc exp run`, an output params put in S3 is refused before any work: DVC 3 would let the
    stage write it and then fail without recording it ("Saving cached external output ... is not supported")."""
    if "DVC_STAGE" not in os.environ or not Path(dag).exists():
        return
    for key, url in output_values(stage, params, dag):
        if not is_remote(url):
            continue
        cmd = dag_stages(dag, params)[stage].get("cmd", "")
        raise ValueError(f"{key}: {url[:80]} is an output of this stage, and DVC 3 cannot record an output outside "
                         f"the repository; under dvc keep {key} a local path and keep it in S3 with a DVC remote "
                         f"(dvc remote add -d store s3://bucket/dvc && dvc push), or run `{cmd}` without dvc to "
                         f"write there")


def die_with_dvc() -> None:
    """Under `dvc repro` (which sets DVC_STAGE), ask the kernel to end this stage (SIGTERM) when the dvc process dies:
    a dvc killed alone must not leave its stage running as an orphan that goes on writing outputs nobody records."""
    if "DVC_STAGE" not in os.environ or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() == 1:  # dvc was already gone before the request: nobody waits for this run
        sys.exit("error: the dvc process that started this stage has exited; not running")


MEMORY_KEYS = ("batch_size", "nll_batch_size", "candidate_chunk_mb", "shuffle_buffer")  # what one step holds


def out_of_memory(e: BaseException) -> bool:
    """An allocation that failed: numpy's MemoryError, torch's CPU allocator or the CUDA caching allocator
    (torch.OutOfMemoryError, a RuntimeError; matched by name, so this module needs no torch)."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    msg = str(e)
    return "can't allocate memory" in msg or "out of memory" in msg.lower()


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"


def memory_advice(e: BaseException, stage: str, params: Params | None) -> str:
    """One line for a failed allocation: how much was asked for, and this stage's keys that size it, with values."""
    msg = " ".join(str(e).split())
    size = re.search(r"allocate (\d+) bytes", msg)  # torch's CPU allocator
    size_unit = re.search(r"(?:[Tt]ried to|[Uu]nable to) allocate ([\d.]+ [KMGTP]?i?B)", msg)  # CUDA, numpy
    asked = _bytes(int(size.group(1))) if size else size_unit.group(1) if size_unit else None
    section = getattr(params, stage, None)
    keys = [f"{stage}.{k} (now {getattr(section, k)})" for k in MEMORY_KEYS if hasattr(section, k)]
    return (f"out of memory{f' (tried to allocate {asked})' if asked else ''}; lower "
            f"{' or '.join(keys) if keys else f'the sizes in {stage}'} and rerun (finished work is kept)")


def stage_main(doc: str, section: str | None, run: Callable, argv=None, add_args: Callable | None = None,
               summary: Callable[[dict], str] | None = None):
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--params", default="params.yaml")
    if section is None:
        ap.add_argument("--stage", required=True, help="params.yaml section (and stage name) to run")
    if add_args:
        add_args(ap)
    args = ap.parse_args(argv)
    die_with_dvc()
    name = section or args.stage
    params = None
    try:
        params = load_params(args.params)
        plain = params.model_dump(mode="json")
        refuse_remote_outputs_under_dvc(name, plain)
        sweep_temps(name, plain)
        args.live_root, args.runs_root = own_roots(name, params, args.params)
        for key, path in upstream_paths(params).items():  # an --option given on the command line wins
            if getattr(args, key, False) is None:
                setattr(args, key, path)
        result = run(getattr(params, name), args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: [{name}] {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # disk full, permissions, quota: name the file and what to check
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: [{name}] {where}{e.strerror or e} (errno {e.errno}); check free space, quota and permissions "
              f"there, then rerun (finished work is kept)", file=sys.stderr)
        sys.exit(1)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError; numpy raises MemoryError
        if not isinstance(e, MemoryError) and not out_of_memory(e):
            raise
        print(f"error: [{name}] {memory_advice(e, name, params)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"error: [{name}] interrupted; nothing partial is visible, rerun to continue", file=sys.stderr)
        sys.exit(130)
    print(f"{name}: {summary(result) if summary else json.dumps(result, default=str)}")
    return result
