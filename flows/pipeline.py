"""Prefect flows that drive the DVC pipeline: one per stage, one for the whole DAG, one extraction fan-out.

The DAG of record is `dvc.yaml`; these flows only orchestrate. A flow run
  1. writes its parameter section(s) into params.yaml (atomically, only the keys that differ; comments,
     key order and the other sections are kept),
  2. runs `dvc repro <stage>` in a subprocess whose output lines stream into the run's logs, so DVC decides
     what is stale (an up-to-date stage is skipped, a changed one reruns with what it feeds) and records every
     artifact in dvc.lock,
  3. pushes to the default DVC remote when one is configured and `push` is true.
A failing stage fails its task and the flow run with the stage's last error line. DVC leaves dvc.lock and the
cache of the last good run untouched, so `dvc checkout` restores those artifacts.

The repository is the current directory, or $OAR_REPO. A run's parameters set only the keys they name: every
key they leave out (a UI form field left empty, which the form does not send; a key missing from `--param`) keeps
the value params.yaml has when the run starts, never a class default, and the run log lists which keys came from
where. The forms (flows/forms.py) prefill nothing for that reason: a form prefilled when `flows.serve` started
would send those values back and undo the runs since. A value of the wrong type is refused by the Prefect API
before a run exists; what its schema cannot check (e.g. d_model divisible by n_head) fails the run with one line
naming the key.
"""
from __future__ import annotations

import graphlib
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import Field, ValidationError
from ruamel.yaml import YAML

from flows.artifacts import PUBLISHERS, announce_params
from flows.forms import KEEP, form_param, params_form, section_form, yaml_comments
from oar_core.dag import dag_stages, declared
from oar_core.params import (
    CompleteParams,
    EvaluateParams,
    ExtractParams,
    FeatureNetParams,
    IngestParams,
    Params,
    ParamsError,
    SampleParams,
    Section,
    TokenizeParams,
    TokenizerParams,
    TrainParams,
    load_params,
    problems,
)
from oar_core.storage import atomic_path

RAN = re.compile(r"^Running stage '([^']+)'")


class StageFailed(RuntimeError):
    pass


def repo_dir() -> Path:
    return Path(os.environ.get("OAR_REPO", ".")).resolve()


def _docs() -> dict[tuple, str]:
    """Help text of the form fields: the comments of this code's params.yaml, then of the repository's."""
    return {**yaml_comments(Path(__file__).resolve().parents[1] / "params.yaml"),
            **yaml_comments(repo_dir() / "params.yaml")}


DOCS = _docs()


# ---------------------------------------------------------------- params.yaml


def _diff(old: dict, new: dict, prefix: tuple = ()) -> dict[tuple, tuple]:
    """{key path: (old, new)} for every leaf that differs (dicts are recursed, lists compared whole)."""
    out = {}
    for k, v in new.items():
        o = old.get(k)
        if isinstance(v, dict) and isinstance(o, dict):
            out |= _diff(o, v, prefix + (k,))
        elif o != v:
            out[prefix + (k,)] = (o, v)
    return out


def _round_trip_yaml() -> YAML:
    y = YAML()  # round-trip mode: comments, order and flow style survive
    y.width = 4096  # never re-wrap long flow-style lines
    y.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def write_params(repo: Path, sections: dict[str, Section]) -> dict[str, tuple]:
    """Write the given sections into repo/params.yaml, touching only keys whose value differs from the
    file's (validated) value. Returns {"section.key": (old, new)}; an empty dict means nothing was written."""
    path = repo / "params.yaml"
    current = load_params(path)
    changes = {(name, *key): ch for name, sec in sections.items()
               for key, ch in _diff(getattr(current, name).model_dump(mode="json"),
                                    sec.model_dump(mode="json")).items()}
    if not changes:
        return {}
    y = _round_trip_yaml()
    doc = y.load(path.read_text())
    for key, (_, new) in changes.items():
        node = doc
        for k in key[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[key[-1]] = new
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            y.dump(doc, f)
        load_params(tmp)  # never leave a params.yaml that the stages would reject
    return {".".join(map(str, k)): v for k, v in changes.items()}


def _set_keys(params: Any) -> Any:
    # a Section built in Python sets the keys it was built with (or read from a file), not its class defaults
    if isinstance(params, Section):
        return params.model_dump(mode="json", exclude_unset=True)
    # "" is what a text field typed in and cleared again may send: no key's value, so it is left out like an empty one
    return {k: _set_keys(v) for k, v in params.items() if v != ""} if isinstance(params, dict) else params


def _overlay(current: dict, given: dict, prefix: str = "") -> tuple[dict, list[str], list[str]]:
    """`given` laid over `current` key by key, nested sections included. Returns the result and the dotted keys
    taken from `given` and from `current` (a sub-section `given` does not touch is named whole)."""
    merged, ours, theirs = {**current, **given}, [], []
    for k, v in current.items():
        if k not in given:
            theirs.append(prefix + k)
        elif isinstance(v, dict) and isinstance(given[k], dict):
            merged[k], o, t = _overlay(v, given[k], f"{prefix}{k}.")
            ours += o
            theirs += t if o else [prefix + k]
        else:
            ours.append(prefix + k)
    return merged, ours, theirs


def resolve(sections: dict[str, Any], repo: Path) -> tuple[Params, list[str], list[str]]:
    """repo/params.yaml as it is now with each of `sections` ({name: a run's parameters for it, any subset of its
    keys}) laid over its section, validated whole. Returns it and the dotted keys of those sections that came
    from the run and from the file; invalid values raise ParamsError, one line naming each bad key."""
    current = load_params(repo / "params.yaml").model_dump(mode="json")
    given = _set_keys({n: {} if v is None else v for n, v in sections.items()})  # None: a form left empty
    merged, ours, theirs = _overlay({n: current.get(n, {}) for n in given}, given)
    try:
        return Params.model_validate({**current, **merged}), ours, theirs
    except ValidationError as e:
        raise ParamsError("invalid run parameters: " + "; ".join(problems(e))) from None


# ---------------------------------------------------------------- dvc.yaml


def stage_graph(repo: Path) -> dict[str, set[str]]:
    """{stage: the stages whose outputs it depends on}, from dvc.yaml (its ${...} from the validated params, so a
    section params.yaml leaves out has its defaults, as the stages see it)."""
    stages = dag_stages(repo / "dvc.yaml", load_params(repo / "params.yaml").model_dump(mode="json"))
    produced = {p.rstrip("/"): s for s, spec in stages.items() for p in declared(spec, "outs", "metrics", "plots")}

    def feeds(out: str, dep: str) -> bool:
        dep = dep.rstrip("/")
        return dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")

    return {s: {src for d in declared(spec, "deps") for out, src in produced.items() if feeds(out, d)} - {s}
            for s, spec in stages.items()}


def stage_order(repo: Path) -> list[str]:
    return list(graphlib.TopologicalSorter(stage_graph(repo)).static_order())


# ---------------------------------------------------------------- subprocesses


def _env() -> dict[str, str]:
    # stage commands say `python ...`: make that this interpreter even when the venv is not activated
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1"}


def last_error(lines: list[str]) -> str:
    """The stage's own last error line (`error: ...`, or a traceback's last line), then DVC's summary."""
    dvc_err = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith("ERROR:")), None)
    own = [ln for ln in lines if ln.startswith("error:")]
    if own:
        stage_err = own[-1]
    elif dvc_err:
        stage_err = lines[dvc_err - 1]
    else:
        stage_err = lines[-1] if lines else "(no output)"
    return stage_err if dvc_err is None or stage_err == lines[dvc_err] else f"{stage_err} [{lines[dvc_err]}]"


def stream(cmd: list[str], cwd: Path) -> list[str]:
    """Run `cmd`, logging each output line (stdout and stderr) to the Prefect run; raise StageFailed with the
    last error line if it exits non-zero. Returns all output lines."""
    log = get_run_logger()
    log.info("$ %s  (in %s)", " ".join(cmd), cwd)
    lines: list[str] = []
    with subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1, errors="replace") as proc:
        for line in proc.stdout:  # text mode splits on \r too, so progress bars arrive as separate lines
            line = line.rstrip()
            if line:
                log.info(line)
                lines.append(line)
    if proc.returncode:
        raise StageFailed(f"`{' '.join(cmd[2:] if cmd[:2] == [sys.executable, '-m'] else cmd)}` failed "
                          f"(exit {proc.returncode}): {last_error(lines)}")
    return lines


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


# ---------------------------------------------------------------- tasks


@task(cache_policy=NO_CACHE, task_run_name="write params.yaml")
def apply_params(sections: dict[str, Any], repo: str) -> dict[str, tuple]:
    params, ours, theirs = resolve(sections, Path(repo))
    log = get_run_logger()
    log.info("from this run's parameters: %s", ", ".join(ours) or "nothing")
    log.info("from params.yaml as it is now: %s", ", ".join(theirs) or "nothing")
    changes = write_params(Path(repo), {n: getattr(params, n) for n in sections})
    for key, (old, new) in changes.items():
        log.info("params.yaml: %s: %r -> %r", key, old, new)
    if not changes:
        log.info("params.yaml already has these values for %s", ", ".join(sections))
    announce_params(ours, changes, sections)
    return changes


def _repro_name() -> str:
    from prefect.runtime import task_run

    return "dvc repro " + " ".join(task_run.parameters["targets"])


@task(cache_policy=NO_CACHE, task_run_name=_repro_name)
def repro(targets: list[str], repo: str) -> list[str]:
    """`dvc repro` the targets (and whatever upstream is stale); returns the stages that actually ran."""
    return [m.group(1) for ln in stream(dvc("repro", *targets), Path(repo)) if (m := RAN.match(ln))]


@task(cache_policy=NO_CACHE, task_run_name="results of {stage}")
def publish(stage: str, repo: str) -> None:
    """The stage's results as artifacts of this run (flows/artifacts.py); a failure here only warns."""
    if stage not in PUBLISHERS:
        return
    try:
        PUBLISHERS[stage](Path(repo), load_params(Path(repo) / "params.yaml"))
    except Exception as e:  # the stage's outputs are recorded already: results it cannot show fail nothing
        get_run_logger().warning("no artifact for %s: %s: %s", stage, type(e).__name__, e)


@task(cache_policy=NO_CACHE, task_run_name="dvc push")
def push_if_remote(repo: str) -> bool:
    remotes = subprocess.run(dvc("remote", "list"), cwd=repo, env=_env(), capture_output=True, text=True, check=True)
    if not remotes.stdout.strip():
        get_run_logger().info("no DVC remote configured; nothing to push")
        return False
    stream(dvc("push"), Path(repo))
    return True


def _dask_worker() -> str | None:
    """The address of the Dask worker running the caller, or None outside one."""
    distributed = sys.modules.get("distributed")  # imported already in any Dask worker; never imported here
    try:
        return distributed.get_worker().address if distributed else None
    except ValueError:  # not in a worker
        return None


@task(cache_policy=NO_CACHE, task_run_name="extract_orders worker {worker_index}/{num_workers}")
def extract_worker(worker_index: int, num_workers: int, repo: str) -> dict:
    """Worker `worker_index` of `num_workers`: writes the Parquet parts of its shards in `repo` (a path valid where
    the task runs: with a Dask cluster, every worker's machine). Module-level and given everything by argument, so
    a Dask worker process can run it. Returns where it ran."""
    stream([sys.executable, "-m", "pipeline.extract_orders", "--num-workers", str(num_workers),
            "--worker-index", str(worker_index)], Path(repo))
    return {"worker_index": worker_index, "host": socket.gethostname(), "pid": os.getpid(),
            "dask_worker": _dask_worker()}


def is_current(stage: str, repo: str) -> bool:
    out = subprocess.run(dvc("status", "--json", stage), cwd=repo, env=_env(), capture_output=True, text=True,
                         check=True)
    return out.stdout.strip() in ("", "{}")


# ---------------------------------------------------------------- flows


# A flow's `params` is shown as its section's form (flows/forms.py: no defaults) and handed through as given, never
# filled with class defaults; apply_params lays it over params.yaml when the run starts and validates the result.


PUSH_DOC = "dvc push afterwards when a DVC remote is configured"


def run_stage(stage: str, params: Any, push: bool) -> dict:
    repo = str(repo_dir())
    changed = apply_params({stage: params}, repo)
    ran = repro([stage], repo)
    publish(stage, repo)
    pushed = push_if_remote(repo) if push else False
    return {"stage": stage, "params_changed": sorted(changed), "ran": ran, "pushed": pushed}


# The one table of stage flows: (stage, its params section's type, what it does). Each becomes a module-level flow
# of that name (a deployment's entrypoint is `flows/pipeline.py:<stage>`), whose form is the section's schema.
STAGES = [
    ("ingest", IngestParams, "Images -> WebDataset image shards + split manifest (ingest.out_dir)."),
    ("tokenizer", TokenizerParams, "Train (or adopt) the VQ tokenizer (models/tokenizer.pt)."),
    ("tokenize", TokenizeParams, "Images -> WebDataset token shards (tokenize.out)."),
    ("train_raster", TrainParams, "Raster-order baseline (train_raster.out_dir)."),
    ("train_random", TrainParams, "Any-order (random permutation) model (train_random.out_dir)."),
    ("extract_orders", ExtractParams, "Per-image generation orders from the any-order model (extract_orders.out_dir), "
                                      "in one process."),
    ("finetune", TrainParams, "Finetune the any-order model on the extracted orders (finetune.out_dir)."),
    ("sample", SampleParams, "Generate images from each checkpoint."),
    ("complete", CompleteParams, "Every sampled model completes the same test images under fixed masks."),
    ("feature_net", FeatureNetParams, "Train evaluate's in-domain feature network on the ingested data."),
    ("evaluate", EvaluateParams, "Metrics, plots and grids for the samples."),
]


def _stage_flow(stage: str, section: type[Section], doc: str):
    def run(params=None, push: bool = True) -> dict:
        return run_stage(stage, params, push)

    run.__name__ = run.__qualname__ = stage
    run.__doc__ = f"{doc}\n\nArgs:\n    params: {KEEP}\n    push: {PUSH_DOC}\n"  # the form's help for each parameter
    run.__annotations__ = {"params": form_param(section_form(stage, section, DOCS, doc)), "push": bool,
                           "return": dict}
    return flow(name=stage, description=doc)(run)


WHAT = {stage: doc for stage, _, doc in STAGES}
STAGE_FLOWS = {stage: _stage_flow(stage, section, doc) for stage, section, doc in STAGES}
globals().update(STAGE_FLOWS)


FanoutRunner = Literal["threads", "dask"]


def fanout_task_runner(runner: FanoutRunner, num_workers: int, dask_address: str | None = None,
                       dask_workers: int | None = None) -> TaskRunner:
    """The task runner of the extraction workers: `threads` (this process, one thread per worker, each running a
    subprocess), or `dask`: the Dask scheduler at `dask_address` (an existing cluster), or without one a temporary
    `distributed.LocalCluster` of `dask_workers` single-threaded worker processes (default: `num_workers`), closed
    when the workers are done. Raises ValueError, one line, for a choice that does not add up."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1 (got {num_workers})")
    if dask_workers is not None and dask_workers < 1:
        raise ValueError(f"dask_workers must be at least 1 (got {dask_workers})")
    if runner == "threads":
        if dask_address or dask_workers is not None:
            raise ValueError("dask_address and dask_workers need runner='dask' (runner is 'threads')")
        return ThreadPoolTaskRunner(max_workers=num_workers)
    if runner != "dask":
        raise ValueError(f"runner must be 'threads' or 'dask' (got {runner!r})")
    from prefect_dask import DaskTaskRunner

    if dask_address:
        if dask_workers is not None:
            raise ValueError("give dask_address (an existing cluster) or dask_workers (a temporary LocalCluster), "
                             "not both")
        return DaskTaskRunner(address=dask_address)
    # worker processes of one thread each (the extraction subprocess is the CPU work); no dashboard, no fixed port
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": dask_workers or num_workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


@flow(name="extract_orders_workers", flow_run_name="{num_workers} extract_orders workers")
def extract_orders_workers(num_workers: int, repo: str) -> list[dict]:
    """One extract_worker task per worker index on this flow's task runner (set by extract_orders_fanout)."""
    return extract_worker.map(range(num_workers), num_workers=unmapped(num_workers), repo=unmapped(repo)).result()


@flow(name="extract_orders_fanout")
def extract_orders_fanout(params: form_param(section_form("extract_orders", ExtractParams, DOCS,
                                                          WHAT["extract_orders"])) = None,
                          num_workers: Annotated[int, Field(ge=1)] = 2, runner: FanoutRunner = "threads",
                          dask_address: str | None = None, dask_workers: Annotated[int, Field(ge=1)] | None = None,
                          push: bool = True) -> dict:
    """extract_orders split over `num_workers` parallel workers (one task each, every one writing the Parquet
    parts of its share of the shards), then `dvc repro extract_orders`, which finds every part current and
    only records the result in dvc.lock. See docs/prefect.md.

    Args:
        params: the extract_orders section; keys left out keep params.yaml's values
        num_workers: how many workers share the shards (one task each)
        runner: where the workers run: threads (here, each a subprocess) or dask
        dask_address: with runner dask, the scheduler of an existing Dask cluster, e.g. tcp://scheduler:8786;
            empty: a temporary LocalCluster on this machine
        dask_workers: with runner dask and no address, the LocalCluster's worker processes (default num_workers)
        push: dvc push afterwards when a DVC remote is configured
    """
    task_runner = fanout_task_runner(runner, num_workers, dask_address, dask_workers)  # a bad choice fails first
    repo = str(repo_dir())
    changed = apply_params({"extract_orders": params}, repo)
    upstream = sorted(stage_graph(Path(repo))["extract_orders"])
    ran = repro(upstream, repo) if upstream else []  # shards and the any-order checkpoint must be current
    workers: list[dict] = []
    if is_current("extract_orders", repo):
        get_run_logger().info("extract_orders is up to date; no workers started")
    else:
        workers = extract_orders_workers.with_options(task_runner=task_runner)(num_workers, repo)
        ran += repro(["extract_orders"], repo)
    publish("extract_orders", repo)
    pushed = push_if_remote(repo) if push else False
    return {"stage": "extract_orders", "params_changed": sorted(changed), "ran": ran, "pushed": pushed,
            "num_workers": num_workers, "runner": runner, "workers": workers}


@flow(name="oar-pipeline")
def oar_pipeline(params: form_param(params_form(DOCS, WHAT)) = None, extract_workers: int = 1,
                 push: bool = True) -> dict:
    """The whole DAG: each stage of dvc.yaml in dependency order (`dvc repro <stage>`, so up-to-date stages
    are skipped); extract_orders fans out over `extract_workers` when that is more than 1.

    Args:
        params: params.yaml, one group per stage; empty fields keep params.yaml's values when the run starts
        extract_workers: parallel extract_orders workers (threads); 1 = the plain stage
        push: dvc push afterwards when a DVC remote is configured
    """
    repo = str(repo_dir())
    stages = stage_order(Path(repo))
    changed = apply_params({**dict.fromkeys(Params.model_fields, {}), **_set_keys(params or {})}, repo)
    ran: list[str] = []
    for stage in stages:
        if stage == "extract_orders" and extract_workers > 1:
            # no keys of its own: its section is params.yaml's, as apply_params just wrote it
            ran += extract_orders_fanout({}, num_workers=extract_workers, push=False)["ran"]
        else:
            ran += repro([stage], repo)
            publish(stage, repo)
    pushed = push_if_remote(repo) if push else False
    return {"stages": stages, "params_changed": sorted(changed), "ran": ran, "pushed": pushed}


ALL_FLOWS = [oar_pipeline, extract_orders_fanout, *STAGE_FLOWS.values()]
