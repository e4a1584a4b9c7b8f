"""The whole DAG on the full 70k Fashion-MNIST (60k train + 10k test) through the stage command lines, steps kept
small: wall time and peak RSS of every stage, with its key outputs.

    OMP_NUM_THREADS=1 python -m bench.scale --json bench/logs/scale.json --md bench/logs/scale.md
    OMP_NUM_THREADS=1 python -m bench.scale --max-train 2000 --max-test 500 -S train_raster.steps=20   # smoke run

Each stage of dvc.yaml runs, in file order (topological), as `<its cmd>` in a fresh work dir holding a params.yaml
derived from the repo's (see SCALE below; any key can be overridden with repeated `-S section.key=value`, as in
`dvc exp run -S`), with PYTHONPATH = the repo and this environment's OMP_NUM_THREADS. Peak RSS of a stage: the
larger of the kernel's high-water RSS of its process (wait4's ru_maxrss: the largest single process of the tree)
and the RSS summed over the process and its descendants, sampled every 0.2 s.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
MB = 2**20
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # nested progress bars move the cursor

# Small steps everywhere. Order extraction over every image is the expensive stage, and evaluate repeats its
# teacher-forced candidate scoring over the 10k test images twice (nll_orders: 2) for the confidence sampler's
# likelihood. Measured on 2500 images, 1 thread: the pipeline's 4-layer d=128 model extracts ~38 img/s (30 min for
# 70k, ~50 min for the DAG), bench.quality's "small" 2-layer d=96 ~95 img/s (12 min; ~20-25 min for the DAG), 2-layer
# d=64 ~175 img/s (7 min; ~13 min for the DAG). So every model stage uses 2-layer d=96 (finetune inherits it from
# the any-order checkpoint).
SMALL_MODEL = {"n_layer": 2, "n_head": 4, "d_model": 96}
SCALE = {
    "ingest.max_train": None, "ingest.max_test": None,
    "tokenizer.steps": 300,
    **{f"{s}.{k}": v for s in ("train_raster", "train_random") for k, v in
       {"steps": 150, "model": SMALL_MODEL, "warmup_steps": 15, "eval_every": 75, "ckpt_every": 75}.items()},
    "finetune.steps": 60, "finetune.warmup_steps": 6, "finetune.eval_every": 30, "finetune.ckpt_every": 30,
    "feature_net.steps": 200,
    "sample.n_per_model": 200, "sample.batch_size": 200,
}
SHOWN = ("recon_mse", "psnr", "codebook_usage", "test_bits_per_token", "tokens_per_s", "policy_top1_agreement",
         "images_per_s", "test_accuracy")


# ----------------------------------------------------------------------------- params and the DAG

def set_key(params: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    if not path or path[0] not in params:
        raise SystemExit(f"-S {dotted}: no such params section (have: {', '.join(params)})")
    node = params
    for k in path:
        node = node.setdefault(k, {})
    node[last] = value


def parse_sets(sets: list[str]) -> dict:
    """`key=value` strings -> {key: YAML-parsed value}, as `dvc exp run -S` reads them."""
    out = {}
    for s in sets:
        key, eq, value = s.partition("=")
        if not eq:
            raise SystemExit(f"-S {s!r}: expected section.key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def write_params(workdir: Path, overrides: dict, base: Path = REPO / "params.yaml") -> dict:
    params = yaml.safe_load(base.read_text())
    for key, value in overrides.items():
        set_key(params, key, value)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def dag_stages(dvc_yaml: Path = REPO / "dvc.yaml") -> list[tuple[str, str, dict]]:
    """(name, cmd, spec) of every stage, in file order."""
    from oar_core.dag import dag_stages as stages

    return [(name, spec["cmd"], spec) for name, spec in stages(dvc_yaml).items()]


def stage_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


# ----------------------------------------------------------------------------- one stage as a subprocess

def _stream(fd: int, prefix: str, log, every: float) -> None:
    """Echo the child's output line by line with a prefix; progress bars redraw with '\\r', so show at most one
    redraw per `every` seconds (a finished bar ends with '\\n' and is always shown)."""
    buf, last = b"", 0.0
    while chunk := os.read(fd, 65536):
        log.write(chunk)
        buf += chunk
        *parts, buf = re.split(rb"(\r|\n)", buf)
        for text, end in zip(parts[::2], parts[1::2]):
            line = ANSI.sub("", text.decode(errors="replace")).rstrip()
            if line and (end == b"\n" or time.monotonic() - last >= every):
                print(f"[{prefix}] {line}", flush=True)
                last = time.monotonic() if end == b"\r" else last
    if buf.strip():
        print(f"[{prefix}] {ANSI.sub('', buf.decode(errors='replace')).rstrip()}", flush=True)


def _tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # exited between the listing and the read
            pass
    return total


def run_stage(name: str, cmd: str, cwd: Path, env: dict | None = None, log_dir: Path | None = None,
              poll: float = 0.2, progress_every: float = 10.0) -> dict:
    """Run `cmd` (a dvc.yaml command line; `python` is this interpreter) in `cwd`, streaming its output.
    Returns wall_s, peak_rss_mb (the larger of the two measures below), ru_maxrss_mb, tree_rss_mb, rc."""
    argv = shlex.split(cmd)
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    log_dir = log_dir or cwd / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env or stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            done.wait(poll)

    with open(log_dir / f"{name}.log", "wb") as log:
        threads = [threading.Thread(target=sample, daemon=True),
                   threading.Thread(target=_stream, args=(proc.stdout.fileno(), name, log, progress_every),
                                    daemon=True)]
        for t in threads:
            t.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # reaps the child, so Popen must not wait for it again
        except KeyboardInterrupt:
            proc.terminate()
            raise
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        for t in threads:
            t.join()
    proc.stdout.close()
    maxrss = usage.ru_maxrss * 1024  # KiB on Linux
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(max(maxrss, peak) / MB, 1),
            "ru_maxrss_mb": round(maxrss / MB, 1), "tree_rss_mb": round(peak / MB, 1), "rc": proc.returncode}


def check(name: str, r: dict, log_dir: Path) -> None:
    if r["rc"]:
        raise SystemExit(f"stage {name!r} failed (exit {r['rc']}) after {r['wall_s']:.0f}s; "
                         f"its output: {log_dir / (name + '.log')}")


# ----------------------------------------------------------------------------- key outputs

def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def key_outputs(workdir: Path, params: dict, name: str, spec: dict, wall_s: float) -> dict:
    """A few headline figures from the stage's declared metrics files (and the ingest manifest)."""
    out: dict = {}
    counts = (_read(workdir / params["ingest"]["out_dir"] / "manifest.json") or {}).get("counts") or {}
    if name == "ingest":
        out.update({f"{split}_images": n for split, n in counts.items()})
    # images through the stage per second of its wall time (start-up included)
    n = {"ingest": sum(counts.values()), "tokenize": sum(counts.values()),
         "extract_orders": sum(counts.get(s, 0) for s in params["extract_orders"].get("splits", []))}.get(name)
    if n:
        out["images_per_s"] = round(n / wall_s, 1)
    for entry in spec.get("metrics") or []:
        path = workdir / (next(iter(entry)) if isinstance(entry, dict) else entry)
        files = sorted(path.glob("*/metrics.json")) if path.is_dir() else [path]
        for f in files:
            m = _read(f) or {}
            if path.is_dir():  # evaluate: one folder per model
                out[f.parent.name] = {k: round(v, 3) for k, v in m.items()
                                      if re.match(r"(fid|precision|recall)_|nll_bits", k) and v is not None}
            elif all(isinstance(v, dict) for v in m.values()):  # sample: {model: {images_per_s, ...}}
                out.update({f"{k}_img_per_s": v.get("images_per_s") for k, v in m.items()})
            else:
                out.update({k: round(v, 4) if isinstance(v, float) else v for k, v in m.items() if k in SHOWN})
    return out


def brief(outputs: dict) -> str:
    models = [k for k, v in outputs.items() if v and isinstance(v, dict)]
    return ", ".join([f"{k} {v}" for k, v in outputs.items() if not isinstance(v, dict)]
                     + ([f"{len(models)} models (table below)"] if models else []))


def tables(fig: dict) -> str:
    """The stage table and, if evaluate ran, the per-model table, as Markdown."""
    m, counts = fig["model"], fig["stages"].get("ingest", {}).get("outputs", {})
    lines = [f"`{fig['command']}`: {counts.get('train_images', '?')} train + {counts.get('test_images', '?')} test "
             f"images, {m['n_layer']}-layer d={m['d_model']} models, OMP_NUM_THREADS={fig['omp_num_threads']}, "
             f"{fig['cpus']} CPUs, {fig['total_wall_s'] / 60:.1f} min in all", "",
             "| stage | wall s | peak RSS MB | key outputs |", "|---|---|---|---|"]
    for name, r in fig["stages"].items():
        lines.append(f"| {name} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} | {brief(r['outputs'])} |")
    lines.append(f"| **total** | **{fig['total_wall_s']:.0f}** | {fig['max_peak_rss_mb']:.0f} (max) | |")
    evaluated = fig["stages"].get("evaluate", {}).get("outputs", {})
    models = {k: v for k, v in evaluated.items() if v and isinstance(v, dict)}
    cols = sorted({k for v in models.values() for k in v})
    if models and cols:
        lines += ["", "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        lines += [f"| {m} | " + " | ".join(str(v.get(c, "–")) for c in cols) + " |" for m, v in models.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None,
                    help="run here, and keep it (default: a fresh temp dir, removed unless --keep or a stage fails)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--max-train", type=int, default=None, help="cap the train images (default: all 60k)")
    ap.add_argument("--max-test", type=int, default=None, help="cap the test images (default: all 10k)")
    ap.add_argument("-S", "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a params key, e.g. -S train_raster.steps=300 (repeatable)")
    ap.add_argument("--stages", nargs="+", default=None, help="run only these (their inputs must be in --workdir)")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--md", default=None, help="write the Markdown table here")
    a = ap.parse_args(argv)

    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="oar-bench-scale-")).resolve()
    if a.stages is None and workdir.is_dir() and any(workdir.iterdir()):
        raise SystemExit(f"{workdir} is not empty: stages would resume and skip finished work; give a new folder")
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = {**SCALE, "ingest.max_train": a.max_train, "ingest.max_test": a.max_test, **parse_sets(a.sets)}
    params = write_params(workdir, overrides)
    stages = [s for s in dag_stages() if a.stages is None or s[0] in a.stages]
    if a.stages and len(stages) != len(a.stages):
        raise SystemExit(f"--stages: unknown names in {a.stages} (dvc.yaml has {[n for n, _, _ in dag_stages()]})")
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    model, pipeline_model = params["train_random"]["model"], yaml.safe_load(
        (REPO / "params.yaml").read_text())["train_random"]["model"]
    print(f"work dir {workdir}; OMP_NUM_THREADS={threads}; {os.cpu_count()} CPUs\n"
          f"model: {model['n_layer']}-layer d={model['d_model']} for train_raster / train_random / finetune (the "
          f"pipeline's: {pipeline_model['n_layer']}-layer d={pipeline_model['d_model']}), so that order extraction "
          f"over every image stays in budget (see SCALE in bench/scale.py)\noverrides: "
          + ", ".join(f"{k}={v}" for k, v in overrides.items()), flush=True)

    fig = {"command": shlex.join(["python", "-m", "bench.scale", *(sys.argv[1:] if argv is None else argv)]),
           "workdir": str(workdir), "omp_num_threads": threads, "cpus": os.cpu_count(), "model": model,
           "overrides": overrides, "stages": {}}
    t0, ok = time.perf_counter(), False
    try:
        for i, (name, cmd, spec) in enumerate(stages, 1):
            print(f"==> [{i}/{len(stages)}] {name}: {cmd}  (elapsed {time.perf_counter() - t0:.0f}s)", flush=True)
            r = run_stage(name, cmd, workdir)
            check(name, r, workdir / "logs")
            r["outputs"] = key_outputs(workdir, params, name, spec, r["wall_s"])
            fig["stages"][name] = r
            print(f"==> {name}: {r['wall_s']:.1f}s, peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"(ru_maxrss {r['ru_maxrss_mb']:.0f}, tree {r['tree_rss_mb']:.0f}); {brief(r['outputs'])}",
                  flush=True)
        fig["total_wall_s"] = round(time.perf_counter() - t0, 1)
        fig["max_peak_rss_mb"] = max(r["peak_rss_mb"] for r in fig["stages"].values())
        md = tables(fig)
        print("\n" + md)
        print(f"\ntotal wall time {fig['total_wall_s'] / 60:.1f} min over {len(stages)} stages")
        if a.json:
            Path(a.json).write_text(json.dumps(fig, indent=2))
        if a.md:
            Path(a.md).write_text(md + "\n")
        ok = True
    finally:  # a failed run keeps its work dir: the stage logs are in it
        if a.keep or a.workdir or not ok:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return fig


if __name__ == "__main__":
    main()
