"""bench.scale's stage runner and params handling, and bench.memory's generated images: fast, no pipeline stage."""
import sys

import pytest
import yaml

from bench.memory import generated_folder
from bench.scale import REPO, check, dag_stages, key_outputs, parse_sets, run_stage, write_params


def test_stages_in_dvc_yaml_order():
    stages = dag_stages()
    assert [n for n, _, _ in stages] == list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert all(cmd.startswith("python -m pipeline.") for _, cmd, _ in stages)


def test_overrides_parse_like_dvc_exp_run(tmp_path):
    sets = parse_sets(["ingest.max_train=null", "train_raster.model.n_layer=2", "sample.cfg_scale=1.5"])
    assert sets == {"ingest.max_train": None, "train_raster.model.n_layer": 2, "sample.cfg_scale": 1.5}
    params = write_params(tmp_path, sets)
    assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == params
    assert params["ingest"]["max_train"] is None and params["train_raster"]["model"]["n_layer"] == 2
    assert params["train_raster"]["model"]["d_model"] == 128  # the rest of the section is kept
    with pytest.raises(SystemExit, match="no such params section"):
        write_params(tmp_path, {"nope.steps": 1})
    with pytest.raises(SystemExit, match="section.key=value"):
        parse_sets(["train_raster.steps"])


def test_run_stage_measures_the_process_tree_and_streams_output(tmp_path, capsys):
    # the memory is held by a grandchild: only a tree-wide measure sees it
    child = "b = bytearray(200 * 2**20); import time; time.sleep(0.6)"
    cmd = (f"python -c \"import subprocess, sys; print('bar 1', end='\\r'); print('done');"
           f" subprocess.run([sys.executable, '-c', '{child}'])\"")
    r = run_stage("toy", cmd, tmp_path)
    assert r["rc"] == 0 and r["peak_rss_mb"] >= 200 and r["wall_s"] > 0.5
    assert "[toy] done" in capsys.readouterr().out
    assert (tmp_path / "logs" / "toy.log").read_bytes().startswith(b"bar 1\rdone")


def test_a_failing_stage_is_named(tmp_path):
    r = run_stage("train_raster", f"{sys.executable} -c \"import sys; sys.exit(3)\"", tmp_path)
    assert r["rc"] == 3
    with pytest.raises(SystemExit, match="stage 'train_raster' failed \\(exit 3\\)"):
        check("train_raster", r, tmp_path / "logs")


def test_key_outputs(tmp_path):
    params = {"ingest": {"out_dir": "data/ingest"}, "extract_orders": {"splits": ["train", "test"]}}
    (tmp_path / "data/ingest").mkdir(parents=True)
    (tmp_path / "data/ingest/manifest.json").write_text('{"counts": {"train": 60000, "test": 10000}}')
    (tmp_path / "dvclive/evaluate/raster").mkdir(parents=True)
    (tmp_path / "dvclive/evaluate/raster/metrics.json").write_text(
        '{"fid_indomain": 2.01, "precision_indomain": 0.77, "recall_indomain": 0.5, "is_indomain": 6.0}')
    assert key_outputs(tmp_path, params, "ingest", {}, 10.0) == {
        "train_images": 60000, "test_images": 10000, "images_per_s": 7000.0}
    assert key_outputs(tmp_path, params, "extract_orders", {}, 700.0) == {"images_per_s": 100.0}
    spec = {"metrics": [{"dvclive/evaluate": {"cache": False}}]}
    assert key_outputs(tmp_path, params, "evaluate", spec, 1.0) == {
        "raster": {"fid_indomain": 2.01, "precision_indomain": 0.77, "recall_indomain": 0.5}}


def test_generated_images_are_made_once(tmp_path):
    from PIL import Image

    folder = generated_folder(tmp_path / "gen-30", 30)
    files = sorted(folder.rglob("*.png"))
    assert len(files) == 30 and len({f.parent.name for f in files}) == 10
    with Image.open(files[0]) as im:
        assert im.size == (28, 28) and im.mode == "L"
    mtime = files[0].stat().st_mtime_ns
    generated_folder(tmp_path / "gen-30", 30)  # complete: reused as it is
    assert files[0].stat().st_mtime_ns == mtime
