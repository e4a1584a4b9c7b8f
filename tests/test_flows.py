"""Prefect flows over the DVC pipeline, on a tiny real copy of the pipeline (256 train / 64 test images).

One `prefect_test_harness` (a temporary Prefect server) serves the whole session; the tiny repository is built
once with the CLI (`dvc repro`), and every test leaves it reproduced (`dvc status` clean) for the next one.
"""
from __future__ import annotations

import os
import tempfile

# before prefect is imported anywhere: keep its home, database and logs out of ~/.prefect, send no analytics
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="oar-prefect-home-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CORE_STAGES = ["ingest", "tokenizer", "tokenize", "train_raster", "train_random", "extract_orders", "finetune"]
TINY = {
    "ingest": {"max_train": 256, "max_test": 64},
    "tokenizer": {"steps": 30, "batch_size": 64, "hidden": 16, "code_dim": 8, "codebook_size": 32},
    "tokenize": {"shard_size": 128},  # 2 train shards + 1 test shard: something to fan out
    "extract_orders": {"batch_size": 64},
}
TINY_TRAIN = {"steps": 10, "batch_size": 16, "warmup_steps": 2, "eval_every": 10, "ckpt_every": 10, "log_every": 5,
              "eval_batches": 1, "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "mlp_ratio": 2.0}}


def sh(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and r.returncode:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "dvc", *args], repo, check)


def ran_stages(output: str) -> list[str]:
    return [ln.split("'")[1] for ln in output.splitlines() if ln.startswith("Running stage '")]


def assert_clean(repo: Path) -> None:
    status = json.loads(dvc(repo, "status", "--json").stdout or "{}")
    assert status == {}, status


def lock_md5(repo: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)


def set_params(repo: Path, section: str, **values) -> None:
    """A hand edit of params.yaml, as a user at the CLI would make it."""
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    """A git + DVC repo holding this checkout's pipeline with tiny sizes, fully reproduced by `dvc repro`."""
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST missing (install the Debian package dataset-fashion-mnist)")
    repo = tmp_path_factory.mktemp("tiny_repo")
    for d in ("pipeline", "oar_core"):
        shutil.copytree(ROOT / d, repo / d, ignore=shutil.ignore_patterns("__pycache__"))
    dag = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    dag["stages"] = {s: dag["stages"][s] for s in CORE_STAGES}  # sample/evaluate are tested by their owners
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dag, sort_keys=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    for section in ("train_raster", "train_random", "finetune"):
        model = {**params[section]["model"], **TINY_TRAIN["model"]} if "model" in params[section] else None
        params[section].update({**TINY_TRAIN, "model": model} if model
                               else {k: v for k, v in TINY_TRAIN.items() if k != "model"})
    params["finetune"]["steps"] = 5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], repo)
    dvc(repo, "init", "-q")
    # two cores shared by everything: one thread per stage process avoids oversubscription (10x faster here)
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.time()
    out = dvc(repo, "repro").stdout
    assert ran_stages(out) == CORE_STAGES, out
    print(f"tiny pipeline: full `dvc repro` in {time.time() - t0:.0f}s")
    commit(repo)
    assert_clean(repo)
    return repo


@pytest.fixture(scope="session")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def in_repo(tiny_repo, monkeypatch):
    """Flows act on $OAR_REPO."""
    monkeypatch.setenv("OAR_REPO", str(tiny_repo))
    assert_clean(tiny_repo)
    yield tiny_repo
    assert_clean(tiny_repo)
    commit(tiny_repo)


def commit(repo: Path) -> None:
    sh(["git", "add", "-A"], repo)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "test", "--allow-empty"], repo)


@pytest.fixture
def stub_repo(tmp_path, monkeypatch) -> Path:
    """This checkout's params.yaml under a DVC repo whose only stage, `finetune`, just echoes: a flow run that
    takes seconds. Flows act on it ($OAR_REPO)."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"finetune": {"cmd": "echo finetuned",
                                                                               "params": ["finetune"]}}}))
    dvc(tmp_path, "init", "-q", "--no-scm")
    monkeypatch.setenv("OAR_REPO", str(tmp_path))
    return tmp_path


# ---------------------------------------------------------------- no server needed


def test_write_params_touches_only_changed_keys(tmp_path):
    from flows.pipeline import write_params
    from oar_core.params import load_params

    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    before = path.read_text()
    p = load_params(path)
    model = p.train_random.model.model_copy(update={"d_model": 64})
    new = p.train_random.model_copy(update={"steps": 7, "model": model})
    changes = write_params(tmp_path, {"train_random": new, "ingest": p.ingest})
    assert changes == {"train_random.steps": (p.train_random.steps, 7),
                       "train_random.model.d_model": (p.train_random.model.d_model, 64)}
    after = load_params(path)
    assert after.train_random == new and after.train_raster == p.train_raster and after.ingest == p.ingest
    changed_lines = [(a, b) for a, b in zip(before.splitlines(), path.read_text().splitlines()) if a != b]
    assert len(before.splitlines()) == len(path.read_text().splitlines())  # comments and layout kept
    assert len(changed_lines) == 2 and "d_model: 64" in changed_lines[0][1] and "steps: 7" in changed_lines[1][1]
    mtime = path.stat().st_mtime_ns
    assert write_params(tmp_path, {"train_random": new}) == {}  # same values: the file is not rewritten
    assert path.stat().st_mtime_ns == mtime


def test_stage_graph_follows_dvc_yaml():
    from flows.pipeline import stage_graph, stage_order

    graph = stage_graph(ROOT)
    assert graph["ingest"] == set() and graph["tokenizer"] == {"ingest"}
    assert graph["extract_orders"] == {"tokenize", "train_random"}
    assert graph["finetune"] == {"tokenize", "extract_orders", "train_random"}
    order = stage_order(ROOT)
    assert all(order.index(up) < order.index(s) for s, ups in graph.items() for up in ups)


def test_last_error_prefers_the_stage_message():
    from flows.pipeline import last_error

    lines = ["Running stage 'tokenizer':", "> python -m pipeline.tokenizer",
             "error: /x.pt: tokenizer checkpoint not found",
             "ERROR: failed to reproduce 'tokenizer': failed to run: python -m pipeline.tokenizer, exited with 1"]
    assert last_error(lines).startswith("error: /x.pt: tokenizer checkpoint not found [ERROR: failed to reproduce")
    tb = ["Traceback (most recent call last):", '  File "x.py", line 1', "ZeroDivisionError: division by zero",
          "ERROR: failed to reproduce 'x': failed to run: python x.py, exited with 1"]
    assert last_error(tb).startswith("ZeroDivisionError: division by zero [ERROR:")


def schema_defaults(node):
    """What the UI's form prefills (and so submits untouched): every `default` in a parameter schema."""
    if isinstance(node, dict):
        return {k: v for k, v in node.items() if k == "default"} | {
            k: d for k, v in node.get("properties", {}).items() if (d := schema_defaults(v))} | (
            {"items": schema_defaults(node["items"])} if isinstance(node.get("items"), dict)
            and schema_defaults(node["items"]) else {})
    return {}


def form_leaves(node: dict, path=()):
    """(dotted key, schema) of every field a form shows."""
    if "properties" in node:
        for k, v in node["properties"].items():
            yield from form_leaves(v, (*path, k))
    else:
        yield ".".join(path), node
        if isinstance(node.get("items"), dict) and "properties" in node["items"]:
            yield from form_leaves(node["items"], (*path, "[]"))


def test_deployments_are_named_for_what_they_run_and_have_typed_documented_empty_forms():
    from flows.pipeline import ALL_FLOWS
    from flows.serve import deployments

    deps = deployments()
    names = {d.flow_name: d.name for d in deps}
    assert set(names) == {f.name for f in ALL_FLOWS} | {"edit-images"}
    assert len(set(names.values())) == len(names) and "local" not in names.values()
    assert names["train_random"] == "train-any-order-model" and names["oar-pipeline"] == "all-stages"
    for d in (d for d in deps if d.flow_name != "edit-images"):  # the stages' forms (the edit form: test_edit_flow_*)
        schema = d._parameter_openapi_schema.model_dump()
        params = schema["properties"]["params"]
        assert schema_defaults(params) == {}, d.flow_name  # nothing prefilled: untouched fields are not sent
        for key, field in form_leaves(schema):
            assert field.get("description"), f"{d.flow_name}: {key} has no help text"
            assert "null" not in json.dumps(field.get("anyOf", "")), f"{d.flow_name}: {key} offers a None toggle"
        assert "Args:" not in d.description, d.description  # the parameters are documented on the form
    form = next(d for d in deps if d.flow_name == "finetune")._parameter_openapi_schema.properties["params"]
    assert form["properties"]["steps"] == {"type": "integer", "minimum": 1, "title": "steps",
                                           "description": "optimizer steps"}  # typed, bounded, from params.yaml
    evaluate = next(d for d in deps if d.flow_name == "evaluate")._parameter_openapi_schema.properties["params"]
    assert evaluate["properties"]["inception_weights"]["type"] == "string"  # an optional path: a text field
    whole = next(d for d in deps if d.flow_name == "oar-pipeline")._parameter_openapi_schema.properties["params"]
    groups = whole["properties"]  # one group per stage section, described
    assert list(groups)[:3] == ["ingest", "tokenizer", "tokenize"] and "Train (or adopt) the VQ tokenizer" in groups[
        "tokenizer"]["description"]


def test_help_text_is_params_yaml_comment_beside_the_key(tmp_path):
    from flows.forms import section_form, yaml_comments
    from oar_core.params import EvaluateParams

    (tmp_path / "params.yaml").write_text("evaluate:\n  strip_steps: 8   # canvases per strip\n"
                                          "                   # drawn left to right\n  # about seed\n  seed: 0\n")
    docs = yaml_comments(tmp_path / "params.yaml")
    assert docs == {("evaluate", "strip_steps"): "canvases per strip drawn left to right"}
    form = section_form("evaluate", EvaluateParams, docs, "What it does.")
    assert form["properties"]["strip_steps"]["description"] == "canvases per strip drawn left to right"
    assert "description" not in form["properties"]["seed"]  # a comment above a key is not read as its help


def test_fanout_task_runner_choice():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.pipeline import fanout_task_runner

    threads = fanout_task_runner("threads", 3)
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 3
    existing = fanout_task_runner("dask", 8, dask_address="tcp://scheduler:8786")
    assert isinstance(existing, DaskTaskRunner) and existing.address == "tcp://scheduler:8786"
    assert existing.cluster_class is None and existing.cluster_kwargs == {}
    local = fanout_task_runner("dask", 4, dask_workers=2)  # a LocalCluster of 2 single-threaded worker processes
    assert local.address is None and local.cluster_class == "distributed.LocalCluster"
    assert local.cluster_kwargs == {"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                    "dashboard_address": None}
    assert fanout_task_runner("dask", 4).cluster_kwargs["n_workers"] == 4  # default: one process per worker
    for args, kwargs, msg in [(("threads", 2), {"dask_address": "tcp://x:8786"}, "need runner='dask'"),
                              (("dask", 2), {"dask_address": "tcp://x:8786", "dask_workers": 2}, "not both"),
                              (("dask", 0), {}, "num_workers must be at least 1"),
                              (("ray", 2), {}, "runner must be 'threads' or 'dask'")]:
        with pytest.raises(ValueError, match=msg):
            fanout_task_runner(*args, **kwargs)


@pytest.mark.slow  # a whole dvc run or a kill-and-resume; the default run keeps the lighter tests of this
def test_cli_param_change_reruns_the_stage_and_only_its_downstream(tiny_repo):
    assert_clean(tiny_repo)
    set_params(tiny_repo, "train_random", seed=101)
    out = dvc(tiny_repo, "repro").stdout
    assert ran_stages(out) == ["train_random", "extract_orders", "finetune"], out
    for s in ("ingest", "tokenizer", "tokenize", "train_raster"):
        assert f"Stage '{s}' didn't change, skipping" in out
    assert ran_stages(dvc(tiny_repo, "repro").stdout) == []  # and nothing is redone a second time
    assert_clean(tiny_repo)


@pytest.mark.slow  # a whole dvc run or a kill-and-resume; the default run keeps the lighter tests of this
def test_a_moved_output_folder_takes_effect_downstream(tiny_repo, tmp_path):
    """Output folders are set once, in params.yaml: moving the orders or the shards reruns what reads them and they
    read the new place (extract_orders.out_dir used to be written while dvc.lock kept the old folder and finetune
    never reran; tokenize.out: data/shards2 failed with "output 'data/shards' does not exist")."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    set_params(repo, "extract_orders", out_dir="data/orders2")
    assert ran_stages(dvc(repo, "repro").stdout) == ["extract_orders", "finetune"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert [d["path"] for d in lock["finetune"]["deps"] if d["path"].startswith("data/orders")] == ["data/orders2"]
    assert sorted(p.name for p in (repo / "data/orders2").glob("*.parquet")) == [
        "test-000000.parquet", "train-000000.parquet", "train-000001.parquet"]
    set_params(repo, "tokenize", out="data/shards2")
    ran = ran_stages(dvc(repo, "repro").stdout)
    assert ran[0] == "tokenize" and {"train_raster", "train_random"} <= set(ran), ran
    assert json.loads((repo / "data/shards2/meta.json").read_text())["counts"] == {"train": 256, "test": 64}
    assert_clean(repo)


# ---------------------------------------------------------------- flows against the test server


def artifacts(key: str) -> list:
    """The artifacts stored under `key`, newest first."""
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                               sort=ArtifactSort.CREATED_DESC)

    return asyncio.run(read())


def test_evaluate_results_are_published_as_artifacts(tmp_path, prefect_api):
    """A run of evaluate shows its metrics table (a row per model, then the reference rows; not the completions') and
    the report's headline with its sample grids inline and where the files are."""
    from PIL import Image
    from prefect import flow

    from flows.artifacts import publish_evaluate
    from oar_core.params import Params

    labels = {"feature_space": {"indomain": "in-domain classifier", "inception": "skipped: no local weights"},
              "raster": {"sample_order": "raster", "nll_order": "raster order, exact"},
              "oar": {"sample_order": "confidence", "nll_order": "confidence order, bound"},
              "real_reference": {"feature_space": "in-domain classifier"}}
    (tmp_path / "reports/figures").mkdir(parents=True)
    (tmp_path / "reports/metrics_labels.json").write_text(json.dumps(labels))
    Image.new("L", (8, 8)).save(tmp_path / "reports/figures/grid_oar.png")
    for name, m in {"raster": {"fid_indomain": 1.5, "precision_indomain": 0.8, "recall_indomain": 0.5,
                               "nll_bits_per_token": 4.2},
                    "oar": {"fid_indomain": 1.25, "precision_indomain": 0.9, "recall_indomain": 0.4,
                            "nll_bits_per_token": 4.3},
                    "real_reference": {"fid_indomain": 0.25, "precision_indomain": 0.9, "recall_indomain": 0.9},
                    "reconstruction": {"fid_indomain": 0.75, "precision_indomain": 0.85, "recall_indomain": 0.6},
                    "complete_oar": {"fid_indomain_centre": 2.0}, "feature_net": {"test_accuracy": 0.9}}.items():
        (tmp_path / "dvclive/evaluate" / name).mkdir(parents=True)
        (tmp_path / "dvclive/evaluate" / name / "metrics.json").write_text(json.dumps(m))

    @flow
    def evaluate_run():
        publish_evaluate(tmp_path, Params())

    evaluate_run()
    table = json.loads(artifacts("evaluate-metrics")[0].data)
    assert [(r["model"], r["kind"], r["FID"]) for r in table] == [
        ("raster", "model", 1.5), ("oar", "model", 1.25), ("real_reference", "reference: real vs real", 0.25),
        ("reconstruction", "floor: tokenizer reconstructions", 0.75)]
    assert table[0]["valid NLL (bits/token)"] == 4.2 and table[0]["NLL: how"] == "raster order, exact"
    report = artifacts("evaluate-report")[0].data
    assert "Lowest FID: **oar** (1.250; the tokenizer's floor is 0.750)" in report
    assert f"`{(tmp_path / 'reports/report.md').resolve()}`" in report
    assert "![oar](data:image/png;base64," in report and "grid_raster.png` (not written)" in report


@pytest.mark.slow  # a whole dvc run or a kill-and-resume; the default run keeps the lighter tests of this
def test_stage_flow_reruns_only_that_stage_and_pushes(in_repo, prefect_api, s3):
    from flows.pipeline import train_raster
    from oar_core.params import load_params

    dvc(in_repo, "remote", "add", "-d", "s3remote", "s3://oar-test/flows-dvcstore")
    dvc(in_repo, "remote", "modify", "s3remote", "endpointurl", s3)
    try:
        params = load_params(in_repo / "params.yaml").train_raster.model_copy(update={"steps": 12})
        result = train_raster(params=params, push=True)
        assert result == {"stage": "train_raster", "params_changed": ["train_raster.steps"], "ran": ["train_raster"],
                          "pushed": True}
        assert load_params(in_repo / "params.yaml").train_raster.steps == 12
        assert json.loads((in_repo / "dvclive/train_raster/metrics.json").read_text())["steps"] == 12
        cloud = dvc(in_repo, "status", "--cloud", "--json", "train_raster").stdout
        assert json.loads(cloud or "{}") == {}, cloud  # the new model is on the remote
        again = train_raster(params=params, push=False)  # up to date: nothing is redone
        assert again["ran"] == [] and again["params_changed"] == []
    finally:
        dvc(in_repo, "remote", "remove", "s3remote")


def test_keys_a_run_leaves_out_keep_params_yaml_values_as_the_run_starts(stub_repo, prefect_api, caplog):
    """The UI form drops a cleared or non-numeric field, as `--param params=...` may leave keys out: such a key keeps
    the value params.yaml has when the run starts (finetune.steps: the file's, never TrainParams' default 1200),
    and the run log says which keys came from where."""
    from flows.pipeline import finetune
    from oar_core.params import TrainParams, load_params

    caplog.set_level(logging.INFO)
    set_params(stub_repo, "finetune", steps=7)  # after flows.pipeline was imported: a run must read the file anew
    assert finetune(push=False)["params_changed"] == []  # no parameters: all of params.yaml as it is now
    assert "from params.yaml as it is now: finetune" in [r.getMessage() for r in caplog.records]

    before = load_params(stub_repo / "params.yaml").finetune
    assert before.steps == 7 != TrainParams.model_fields["steps"].default
    form = {k: v for k, v in before.model_dump(mode="json").items() if k != "steps"} | {"lr": before.lr * 2}
    caplog.clear()
    assert finetune(params=form, push=False)["params_changed"] == ["finetune.lr"]
    assert load_params(stub_repo / "params.yaml").finetune == before.model_copy(update={"lr": before.lr * 2})
    logs = [r.getMessage() for r in caplog.records]
    assert "from params.yaml as it is now: finetune.steps" in logs
    ours = next(m for m in logs if m.startswith("from this run's parameters: "))
    assert "finetune.lr" in ours and "finetune.order" in ours and "finetune.steps" not in ours


def test_a_run_param_of_the_wrong_type_fails_the_run_naming_the_key(stub_repo, prefect_api):
    from flows.pipeline import finetune

    before = (stub_repo / "params.yaml").read_text()
    state = finetune(params={"steps": "abc"}, push=False, return_state=True)
    assert state.is_failed() and "finetune.steps" in state.message
    with pytest.raises(ValueError, match=r"^invalid run parameters: finetune\.steps: Input should be a valid integer"
                                         r"[^\n]* \(got 'abc'\)$"):  # one line
        state.result()
    assert (stub_repo / "params.yaml").read_text() == before


@pytest.mark.slow  # a whole dvc run or a kill-and-resume; the default run keeps the lighter tests of this
def test_pipeline_flow_fans_out_extraction_and_reruns_downstream_only(in_repo, prefect_api):
    from flows.pipeline import oar_pipeline
    from oar_core.names import LocationRule
    from oar_core.order_table import scan
    from oar_core.params import load_params

    params = load_params(in_repo / "params.yaml")
    extract = params.extract_orders.model_copy(update={"seed": 7, "location": LocationRule(score="max_prob")})
    params = params.model_copy(update={"extract_orders": extract})
    result = oar_pipeline(params=params, extract_workers=2, push=False)
    assert result["params_changed"] == ["extract_orders.location.score", "extract_orders.seed"]
    assert result["ran"] == ["extract_orders", "finetune"], result
    parts = sorted(p.name for p in (in_repo / "data/orders").glob("*.parquet"))
    assert parts == ["test-000000.parquet", "train-000000.parquet", "train-000001.parquet"]
    hashes = scan(in_repo / "data/orders").select("params_hash").unique().collect()["params_hash"].to_list()
    assert hashes == [params.extract_orders.digest()]  # every part written by the workers, under the new params
    summary = json.loads(artifacts("extracted-orders")[0].data)  # the extraction's summary, on the run's page
    assert [(r["split"], r["images"]) for r in summary] == [("test", 64), ("train", 256)]


@pytest.mark.slow  # two Dask clusters: `pytest -m slow`
def test_fanout_on_dask_clusters_matches_the_dvc_stage(in_repo, prefect_api):
    """The fan-out on a 2-worker `distributed.LocalCluster` given by scheduler address (as an existing cluster is),
    then on a temporary one the task runner starts itself (dask_workers=2): each leaves the same Parquet parts and
    dvc.lock entry as a plain `dvc repro extract_orders` with the same params, and the workers ran in the clusters'
    worker processes."""
    from distributed import LocalCluster

    from flows.pipeline import extract_orders_fanout
    from oar_core.params import load_params

    orders = in_repo / "data/orders"

    def parts() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(orders.glob("*.parquet"))}

    def lock_entry() -> dict:
        return yaml.safe_load((in_repo / "dvc.lock").read_text())["stages"]["extract_orders"]

    lock_before, parts_before = (in_repo / "dvc.lock").read_bytes(), parts()
    assert len(parts_before) == 3  # 2 train shards + 1 test shard
    seed = load_params(in_repo / "params.yaml").extract_orders.seed
    t0 = time.time()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        cluster_workers = set(cluster.scheduler_info["workers"])
        result = extract_orders_fanout(params={"seed": seed + 1}, num_workers=2, runner="dask",
                                       dask_address=cluster.scheduler_address, push=False)
    assert result["ran"] == ["extract_orders"] and result["params_changed"] == ["extract_orders.seed"], result
    ran_on = result["workers"]
    assert sorted(w["worker_index"] for w in ran_on) == [0, 1]
    assert {w["dask_worker"] for w in ran_on} <= cluster_workers and os.getpid() not in {w["pid"] for w in ran_on}
    on_dask, on_dask_lock = parts(), lock_entry()
    assert set(on_dask) == set(parts_before) and all(on_dask[n] != parts_before[n] for n in on_dask)  # all redone
    t_dask = time.time() - t0

    shutil.rmtree(orders)  # the plain DVC stage from nothing, same params.yaml
    assert ran_stages(dvc(in_repo, "repro", "extract_orders").stdout) == ["extract_orders"]
    assert parts() == on_dask and lock_entry() == on_dask_lock

    t0 = time.time()  # back to the previous seed on a LocalCluster the runner starts and closes itself
    result = extract_orders_fanout(params={"seed": seed}, num_workers=2, runner="dask", dask_workers=2, push=False)
    assert result["ran"] == ["extract_orders"], result
    assert all(w["dask_worker"] for w in result["workers"]) and os.getpid() not in {w["pid"] for w in result["workers"]}
    assert parts() == parts_before and (in_repo / "dvc.lock").read_bytes() == lock_before  # = the earlier dvc repro
    print(f"fan-out on Dask: {t_dask:.0f}s with an existing LocalCluster, {time.time() - t0:.0f}s with its own")


def test_failed_stage_fails_the_run_and_keeps_versioned_artifacts(in_repo, prefect_api):
    from flows.pipeline import tokenizer
    from oar_core.params import load_params

    lock_before = (in_repo / "dvc.lock").read_bytes()
    md5 = lock_md5(in_repo, "tokenizer", "models/tokenizer.pt")
    params = load_params(in_repo / "params.yaml").tokenizer.model_copy(update={"checkpoint": "/nonexistent/tok.pt"})
    state = tokenizer(params=params, push=False, return_state=True)
    assert state.is_failed()
    with pytest.raises(RuntimeError, match=r"error: .*/nonexistent/tok.pt: tokenizer checkpoint not found"):
        state.result()
    assert (in_repo / "dvc.lock").read_bytes() == lock_before  # nothing recorded for the failed run
    assert (in_repo / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).exists()  # last good tokenizer still cached
    # restore the last good state: params and git-tracked metrics back (git), outputs back from the DVC cache
    sh(["git", "checkout", "--", "params.yaml", "dvclive/tokenizer/metrics.json"], in_repo)
    dvc(in_repo, "checkout")
    assert (in_repo / "dvc.lock").read_bytes() == lock_before
    assert lock_md5(in_repo, "tokenizer", "models/tokenizer.pt") == md5
    import hashlib

    assert hashlib.md5((in_repo / "models/tokenizer.pt").read_bytes()).hexdigest() == md5


def test_served_deployment_runs_when_triggered_through_the_api(in_repo, prefect_api):
    """What the UI's Run button does: create a flow run from a deployment; a runner (as started by
    `python -m flows.serve`) picks it up and executes it in a subprocess. The custom run's form lost max_train and
    max_test (cleared fields are dropped): the run keeps params.yaml's, not the class default (None: all images)."""
    import asyncio

    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.runner import Runner

    from flows.serve import deployments
    from oar_core.params import load_params

    deployment = next(d for d in deployments() if d.flow_name == "ingest")
    ingest = load_params(in_repo / "params.yaml").ingest
    form = {k: v for k, v in ingest.model_dump(mode="json").items() if k not in ("max_train", "max_test")}

    async def trigger_and_serve():
        runner = Runner(limit=1, query_seconds=1)
        await runner.add_deployment(deployment)
        name = f"ingest/{deployment.name}"
        # the API checks each value's type: no run
        with pytest.raises(PrefectHTTPStatusError, match=r"params\.max_train"):
            await run_deployment(name, parameters={"params": {"max_train": "many"}}, timeout=0)
        flow_run = await run_deployment(name, parameters={"params": form}, timeout=0)  # returns once scheduled
        await runner.start(run_once=True)  # one poll: picks up the scheduled run and waits for it
        async with get_client() as client:
            flow_run = await client.read_flow_run(flow_run.id)
            from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
        return flow_run, [log.message for log in logs]

    t0 = time.time()
    flow_run, messages = asyncio.run(trigger_and_serve())
    assert flow_run.state.is_completed(), flow_run.state
    assert any("Stage 'ingest' didn't change, skipping" in m for m in messages), messages  # DVC output streamed
    assert "from params.yaml as it is now: ingest.max_train, ingest.max_test" in messages
    assert load_params(in_repo / "params.yaml").ingest == ingest
    assert time.time() - t0 < 60


def test_edit_flow_command_line_carries_every_set_option():
    from flows.edit import edit_command
    from oar_core.names import LocationRule

    cmd = edit_command("in", "/o", "edit", "1,2,3,4", None, "Dress", 4, "policy", LocationRule(temperature=0.5), 0.9,
                       None, 2.0, "linear", 3, "m.pt", "t.pt")
    assert cmd[1:4] == ["-m", "pipeline.edit", "in"]
    pairs = dict(zip(cmd[4::2], cmd[5::2]))
    assert pairs["--box"] == "1,2,3,4" and pairs["--class"] == "Dress" and pairs["--order"] == "policy"
    assert pairs["--location-temperature"] == "0.5" and "--mask" not in pairs and "--top-k" not in pairs
    assert pairs["--cfg-schedule"] == "linear" and pairs["--seed"] == "3" and pairs["--n"] == "4"
    assert "--steps" not in pairs and "--schedule" not in pairs  # one token per step unless the form asks
    parallel = edit_command("in", "/o", "inpaint", "1,2,3,4", None, None, 4, "policy", LocationRule(), 1.0, None, 2.0,
                            "constant", 0, "m.pt", "t.pt", 6, "arccos")
    pairs = dict(zip(parallel[4::2], parallel[5::2]))
    assert pairs["--steps"] == "6" and pairs["--schedule"] == "arccos"


@pytest.mark.slow  # two edit subprocesses: ~100 s measured while other jobs shared the 2 cores
def test_edit_flow_runs_the_edit_command_on_a_folder_with_typed_parameters(any_order_model, tiny_shards, fmnist_small,
                                                                          prefect_api, tmp_path, monkeypatch, caplog):
    """The edit-images deployment's flow: typed parameters (a bad one refused with its name), the command's lines in
    the run log, and the outputs in the folder the log names."""
    import logging

    from PIL import Image
    from prefect.utilities.callables import parameter_schema

    from flows.edit import edit_images
    from oar_core.image_shards import load_split

    form = parameter_schema(edit_images).model_dump()["properties"]
    assert form["mode"]["enum"] == ["inpaint", "outpaint", "edit"] and form["n"]["type"] == "integer"
    assert form["location"]["default"] == {"score": "max_prob", "temperature": 1.0, "anneal": "linear", "top_k": None,
                                           "locality": 0.0, "logits": "cond"}
    images, _, _ = load_split(fmnist_small, "test")
    (tmp_path / "in").mkdir()
    for i in range(2):
        Image.fromarray(images[i, ..., 0]).save(tmp_path / "in" / f"shoe{i}.png")
    monkeypatch.setenv("OAR_REPO", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    kw = dict(folder="in", box="0,14,28,28", n=2, model=str(any_order_model[0]),
              tokenizer=str(tiny_shards.parent / "tokenizer.pt"))
    with caplog.at_level(logging.INFO):
        result = edit_images(**kw)
    out = Path(result["out"])
    assert out.parent == tmp_path / "edits" and result["images"] == ["shoe0", "shoe1"]
    assert (out / "shoe1" / "sheet.png").exists() and (out / "shoe0" / "variation_01.png").exists()
    assert f"outputs: {out}" in caplog.text and "2 variations (28 of 49 tokens generated)" in caplog.text
    with pytest.raises(Exception, match="unknown class"):  # the command's own line fails the run
        edit_images(**kw, mode="edit", class_name="Hat")


def test_sample_and_ingest_results_are_published_as_artifacts(tmp_path, prefect_api):
    from PIL import Image
    from prefect import flow

    from flows.artifacts import publish_ingest, publish_sample
    from oar_core.params import Params

    params = Params()
    first = params.sample.models[0].name
    (tmp_path / "samples" / first).mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "samples" / first / "grid.png")
    (tmp_path / "samples" / first / "meta.json").write_text(json.dumps({"n": 50}))
    (tmp_path / "data/ingest").mkdir(parents=True)
    (tmp_path / "data/ingest/manifest.json").write_text(json.dumps(
        {"source": "/imgs", "counts": {"train": 5, "test": 2}, "image_size": 28, "channels": 1, "num_classes": 1}))
    (tmp_path / "data/ingest/report.json").write_text(json.dumps(
        {"n_skipped": 1, "by_kind": {"truncated": 1}, "changed": {"converted RGBA to L (alpha dropped)": 1}}))

    @flow
    def results():
        publish_sample(tmp_path, params)
        publish_ingest(tmp_path, params)

    results()
    samples = artifacts("samples")[0].data
    assert f"## {first}" in samples and "50 images" in samples
    assert f"![{first} samples](data:image/png;base64," in samples
    assert f"`{(tmp_path / 'samples' / params.sample.models[1].name).resolve()}/grid.png` (not written)" in samples
    ingest = artifacts("ingest")[0].data
    assert "train 5, test 2 images" in ingest and "Skipped: 1 file(s) (truncated: 1)" in ingest
    assert "Changed on the way in: converted RGBA to L (alpha dropped): 1." in ingest


def test_consecutive_form_runs_compose_in_process(stub_repo, prefect_api):
    """The fast form of the test below: two flow runs with what the form submits (its prefill + one change)."""
    from flows.pipeline import finetune
    from flows.serve import deployments
    from oar_core.params import load_params

    deployment = next(d for d in deployments() if d.flow_name == "finetune")
    assert deployment.parameters == {}  # the server adds nothing to what the form sends
    prefilled = deployment._parameter_openapi_schema.properties["params"].get("default") or {}
    before = load_params(stub_repo / "params.yaml").finetune
    assert finetune(params={**prefilled, "lr": before.lr * 2}, push=False)["params_changed"] == ["finetune.lr"]
    # a text field typed in and cleared again sends "": left out like an empty field
    assert finetune(params={**prefilled, "steps": before.steps + 1, "out_dir": ""}, push=False)["params_changed"] == [
        "finetune.steps"]
    assert load_params(stub_repo / "params.yaml").finetune == before.model_copy(
        update={"lr": before.lr * 2, "steps": before.steps + 1})
    shown = artifacts("run-parameters")[0].data  # the run's page says which keys it gave
    assert f"| `finetune.steps` | {before.steps} | {before.steps + 1} |" in shown and "finetune.lr" not in shown
    finetune(params={**prefilled}, push=False)  # `abc` in the only field changed: the form sent nothing
    assert "**This run gave no key**" in artifacts("run-parameters")[0].data


@pytest.mark.slow  # two served runs, each a subprocess: about a minute
def test_consecutive_custom_runs_from_the_ui_compose(stub_repo, prefect_api):
    """Two custom runs of a served deployment, one after the other, each submitting what its form holds: what the form
    prefills plus the one field the user changed. The second run keeps the first's change (a form prefilled when
    `flows.serve` started sent the old lr back: `finetune.lr: 0.0006 -> 0.0003`), and a hand edit made between the
    runs survives too."""
    import asyncio

    from prefect.deployments import run_deployment
    from prefect.runner import Runner

    from flows.serve import deployments
    from oar_core.params import load_params

    deployment = next(d for d in deployments() if d.flow_name == "finetune")
    prefilled = deployment._parameter_openapi_schema.properties["params"].get("default") or {}
    before = load_params(stub_repo / "params.yaml").finetune

    async def custom_run(runner, change: dict):
        flow_run = await run_deployment(f"finetune/{deployment.name}", parameters={"params": {**prefilled, **change}},
                                        timeout=0)
        await runner.start(run_once=True)
        from prefect import get_client

        async with get_client() as client:
            return (await client.read_flow_run(flow_run.id)).state

    async def two_runs():
        runner = Runner(limit=1, query_seconds=1)
        await runner.add_deployment(deployment)
        first = await custom_run(runner, {"lr": before.lr * 2})
        set_params(stub_repo, "finetune", eval_batches=before.eval_batches + 1)  # a hand edit in between
        second = await custom_run(runner, {"steps": before.steps + 1})
        return first, second

    first, second = asyncio.run(two_runs())
    assert first.is_completed() and second.is_completed(), (first, second)
    assert load_params(stub_repo / "params.yaml").finetune == before.model_copy(
        update={"lr": before.lr * 2, "steps": before.steps + 1, "eval_batches": before.eval_batches + 1})


@pytest.mark.slow  # a real `prefect server start`: 20-60 s
def test_readme_prefect_commands_work_pasted_as_written(tmp_path):
    """The README's first Prefect block, run as written (on a free port): `flows.serve` started right after the
    server waits for it with one line instead of failing with a connection traceback, then serves."""
    import re
    import signal
    import socket

    section = (ROOT / "README.md").read_text().split("## Prefect", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    assert "prefect server start" in block and "python -m flows.serve" in block
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(["bash", "-c", block.replace("4200", str(port))], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.time() + 240
        for line in proc.stdout:
            lines.append(line.rstrip())
            if "Your deployments are being served" in line or time.time() > deadline:
                break
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the block's own processes: the server and flows.serve
        proc.wait(30)
    out = "\n".join(lines)
    assert f"waiting for the Prefect server at http://127.0.0.1:{port}/api ..." in out, out
    assert "Your deployments are being served" in out and "Traceback" not in out, out


def test_serve_gives_up_with_one_line_when_no_server_answers(capsys):
    from flows.serve import wait_for_api

    with pytest.raises(SystemExit) as e:
        wait_for_api("http://127.0.0.1:9/api", 1, 0.2)
    assert capsys.readouterr().out == "waiting for the Prefect server at http://127.0.0.1:9/api ...\n"
    assert str(e.value).startswith("error: no Prefect server answered at http://127.0.0.1:9/api within 1 s")
    assert "\n" not in str(e.value)
