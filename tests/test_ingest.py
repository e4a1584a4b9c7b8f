import gzip
import json
import zlib

import numpy as np
import pytest
from PIL import Image

from oar_core.image_shards import load_manifest, load_split
from oar_core.image_sources import FASHION_MNIST_CLASSES, split_of
from oar_core.params import IngestParams
from pipeline.ingest import run_ingest

from .conftest import FMNIST_DIR


def save_png(path, size=(28, 28), mode="L", value=None, ext_format=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path.name).encode()))
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    arr = rng.integers(0, 256, shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    Image.fromarray(arr, mode=mode).save(path, format=ext_format)
    return arr


@pytest.fixture
def image_folder(tmp_path):
    """Two classes of 28x28 images, plus one wrong-size JPEG, one corrupt PNG, one truncated PNG, a text file."""
    root = tmp_path / "imgs"
    for cls, n in (("cat", 12), ("dog", 10)):
        for i in range(n):
            save_png(root / cls / f"{i:02d}.png", mode="L" if i % 2 else "RGB")
    save_png(root / "dog" / "big.photo.jpg", size=(56, 40), mode="RGB", value=200, ext_format="JPEG")
    (root / "cat" / "broken.png").write_bytes(b"not a png at all")
    good = (root / "cat" / "00.png").read_bytes()
    (root / "dog" / "cut.png").write_bytes(good[: len(good) // 2])
    (root / "dog" / "notes.txt").write_text("hello")
    return root


def params(src, out, **kw):
    return IngestParams(source=str(src), out_dir=str(out), test_fraction=0.3, **kw)


def test_folder_with_classes_corrupt_and_resize(image_folder, tmp_path):
    out = tmp_path / "out"
    r = run_ingest(params(image_folder, out))
    m = load_manifest(out)
    assert m["class_names"] == ["cat", "dog"] and m["num_classes"] == 2 and m["channels"] == 1
    assert m["counts"]["train"] + m["counts"]["test"] == 23  # 22 good + the resized jpg
    assert r["n_skipped"] == 3
    report = json.loads((out / "report.json").read_text())
    reasons = {s["file"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"cat/broken.png", "dog/cut.png", "dog/notes.txt"}
    assert reasons["cat/broken.png"] == "not an image: the content is text; delete it or replace it"
    assert reasons["dog/cut.png"] == "truncated or corrupt PNG data: re-download or re-export it"
    assert "extension" in reasons["dog/notes.txt"]
    assert report["by_kind"] == {"extension": 1, "not_an_image": 1, "truncated": 1}
    ids, labels = [], []
    for split in ("train", "test"):
        images, lab, idx = load_split(out, split)
        assert images.dtype == np.uint8 and images.shape[1:] == (28, 28, 1) and lab.dtype == np.int64
        assert len(images) == len(lab) == len(idx) == m["counts"][split]
        for i in idx:  # the split is a pure function of the relative path
            assert split_of(i, 0.3, 0)[0] == split
        ids += list(idx)
        labels += list(lab)
    label_of = dict(zip(ids, labels))
    assert label_of["cat/01.png"] == 0 and label_of["dog/big.photo.jpg"] == 1
    # the resized uniform JPEG stays (almost) uniform
    for split in ("train", "test"):
        images, _, idx = load_split(out, split)
        if "dog/big.photo.jpg" in list(idx):
            img = images[list(idx).index("dog/big.photo.jpg")]
            assert abs(int(img.mean()) - 200) <= 3
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_pixels_preserved_when_size_matches(tmp_path):
    root = tmp_path / "flat"
    arr = save_png(root / "a.png")
    save_png(root / "b.png")
    save_png(root / "c.png")
    out = tmp_path / "out"
    run_ingest(IngestParams(source=str(root), out_dir=str(out), test_fraction=0.5))
    m = load_manifest(out)
    assert m["class_names"] == ["flat"] and m["num_classes"] == 1
    for split in ("train", "test"):
        images, labels, ids = load_split(out, split)
        assert (labels == 0).all()
        if "a.png" in list(ids):
            np.testing.assert_array_equal(images[list(ids).index("a.png"), :, :, 0], arr)


def test_reject_mode_skips_wrong_size(image_folder, tmp_path):
    out = tmp_path / "out"
    r = run_ingest(params(image_folder, out, on_size_mismatch="reject"))
    report = json.loads((out / "report.json").read_text())
    reasons = {s["file"]: s["reason"] for s in report["skipped"]}
    assert "56x40" in reasons["dog/big.photo.jpg"] and "reject" in reasons["dog/big.photo.jpg"]
    assert r["counts"]["train"] + r["counts"]["test"] == 22


def test_rgb_output_and_max_prefix(image_folder, tmp_path):
    out = tmp_path / "out"
    run_ingest(params(image_folder, out, channels=3, image_size=16, max_train=5, max_test=2))
    images, labels, ids = load_split(out, "train")
    assert images.shape == (5, 16, 16, 3)
    full = tmp_path / "full"
    run_ingest(params(image_folder, full, channels=3, image_size=16))
    _, _, all_ids = load_split(full, "train")
    assert list(ids) == list(all_ids[:5])  # max_train is a prefix of the full, hash-ordered split


def test_adding_images_does_not_reshuffle(image_folder, tmp_path):
    run_ingest(params(image_folder, tmp_path / "a"))
    for i in range(20):
        save_png(image_folder / "cat" / f"new{i}.png")
    run_ingest(params(image_folder, tmp_path / "b"))
    for split in ("train", "test"):
        before = set(load_split(tmp_path / "a", split)[2])
        after = set(load_split(tmp_path / "b", split)[2])
        assert before <= after


def test_missing_and_empty_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found.*ingest.source"):
        run_ingest(IngestParams(source=str(tmp_path / "nope"), out_dir=str(tmp_path / "o")))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"):
        run_ingest(IngestParams(source=str(tmp_path / "empty"), out_dir=str(tmp_path / "o")))


def test_all_corrupt_errors_and_reports(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.png").write_bytes(b"garbage")
    out = tmp_path / "o"
    with pytest.raises(ValueError, match="every image was skipped; see report.json"):
        run_ingest(IngestParams(source=str(root), out_dir=str(out)))
    assert json.loads((out / "report.json").read_text())["n_skipped"] == 4
    assert not (out / "manifest.json").exists()


def test_ingest_from_s3_matches_local(image_folder, tmp_path, s3_prefix):
    import s3fs

    s3fs.S3FileSystem().put(str(image_folder) + "/", s3_prefix.removeprefix("s3://") + "/", recursive=True)
    run_ingest(params(image_folder, tmp_path / "local"))
    r = run_ingest(params(s3_prefix, tmp_path / "remote"))
    assert r["n_skipped"] == 3 and load_manifest(tmp_path / "remote")["class_names"] == ["cat", "dog"]
    for split in ("train", "test"):
        a, b = load_split(tmp_path / "local", split), load_split(tmp_path / "remote", split)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_image_shards_written_to_and_streamed_from_s3(image_folder, tmp_path, s3_prefix):
    """ingest.out_dir on S3: the shards go up with one PUT each and stream back through webdataset's s3:// opener."""
    run_ingest(params(image_folder, tmp_path / "local"))
    run_ingest(params(image_folder, f"{s3_prefix}/ingest"))
    assert load_manifest(f"{s3_prefix}/ingest")["shards"] == load_manifest(tmp_path / "local")["shards"]
    for split in ("train", "test"):
        for x, y in zip(load_split(tmp_path / "local", split), load_split(f"{s3_prefix}/ingest", split)):
            np.testing.assert_array_equal(x, y)


def test_ingest_shards_are_byte_identical_across_runs_and_split_by_shard_size(image_folder, tmp_path):
    a = run_ingest(params(image_folder, tmp_path / "a", shard_size=5))
    run_ingest(params(image_folder, tmp_path / "b", shard_size=5))
    assert a["shard_counts"]["train"][:-1] == [5] * (len(a["shards"]["train"]) - 1) and len(a["shards"]["train"]) > 1
    for name in a["shards"]["train"] + a["shards"]["test"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_fashion_mnist_small(fmnist_small):
    m = load_manifest(fmnist_small)
    assert m["class_names"] == FASHION_MNIST_CLASSES and m["counts"] == {"train": 512, "test": 128}
    images, labels, ids = load_split(fmnist_small, "train")
    assert images.shape == (512, 28, 28, 1) and images.dtype == np.uint8
    assert ids[0] == "fmnist-train-00000" and ids[511] == "fmnist-train-00511"
    with gzip.open(FMNIST_DIR / "train-labels-idx1-ubyte.gz") as f:
        raw_labels = np.frombuffer(f.read(), np.uint8, offset=8)
    np.testing.assert_array_equal(labels, raw_labels[:512])
    _, _, test_ids = load_split(fmnist_small, "test")
    assert test_ids[0] == "fmnist-test-00000" and len(test_ids) == 128


def test_fashion_mnist_resize_rgb(tmp_path):
    if not FMNIST_DIR.exists():
        pytest.skip("no Fashion-MNIST")
    out = tmp_path / "o"
    run_ingest(IngestParams(out_dir=str(out), image_size=32, channels=3, max_train=8, max_test=4))
    images, _, _ = load_split(out, "train")
    assert images.shape == (8, 32, 32, 3)
    np.testing.assert_array_equal(images[..., 0], images[..., 2])  # grey replicated to RGB


def test_ingest_script_summary(image_folder, tmp_path, capsys):
    from pipeline.ingest import main

    path = tmp_path / "params.yaml"
    path.write_text(f"ingest:\n  source: {image_folder}\n  out_dir: {tmp_path / 'o'}\n  test_fraction: 0.3\n")
    main(["--params", str(path)])
    out = capsys.readouterr().out.strip()
    assert out.startswith("ingest:") and "skipped=3" in out and "\n" not in out


@pytest.mark.slow  # a whole dvc run or a kill-and-resume; the default run keeps the lighter tests of this
def test_the_image_source_is_a_dvc_dependency(image_folder, tmp_path):
    """dvc.yaml tracks `ingest.source` itself: adding an image makes ingest (and what it feeds) stale."""
    import shutil

    import yaml

    from tests.test_flows import ROOT, dvc, ran_stages, sh

    repo = tmp_path / "repo"
    for d in ("pipeline", "oar_core"):
        shutil.copytree(ROOT / d, repo / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(image_folder, repo / "images")
    dag = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    dag["stages"] = {s: dag["stages"][s] for s in ("ingest", "tokenizer")}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dag, sort_keys=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"].update(source="images", test_fraction=0.3, max_train=None, max_test=None, image_size=16)
    params["tokenizer"].update(steps=2, batch_size=8, hidden=8, code_dim=4, codebook_size=8, grid=4)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], repo)
    dvc(repo, "init", "-q")
    assert ran_stages(dvc(repo, "repro").stdout) == ["ingest", "tokenizer"]
    assert ran_stages(dvc(repo, "repro").stdout) == []
    before = load_manifest(repo / "data/ingest")["counts"]

    new = next((repo / "images").rglob("*.png"))
    Image.new("L", (16, 16), 200).save(new.with_name("added.png"))
    assert "images" in dvc(repo, "status").stdout
    assert ran_stages(dvc(repo, "repro").stdout) == ["ingest", "tokenizer"]
    assert sum(load_manifest(repo / "data/ingest")["counts"].values()) == sum(before.values()) + 1


def test_ignored_files_are_listed_and_the_report_is_the_same_bytes_every_run(image_folder, tmp_path):
    (image_folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (image_folder / "bird").mkdir()  # an empty class folder: no class is made for it
    (image_folder / "dog" / "empty.png").write_bytes(b"")
    (image_folder / "dog" / "page.jpg").write_bytes(b"<html><body>404</body></html>")
    runs = [run_ingest(params(image_folder, tmp_path / f"out{i}")) for i in range(2)]
    files = [{f.name: f.read_bytes() for f in (tmp_path / f"out{i}").iterdir()} for i in range(2)]
    assert files[0] == files[1]  # no memory addresses, times or other run-dependent bytes
    report = json.loads(files[0]["report.json"])
    assert {(e["file"], e["kind"]) for e in report["ignored"]} == {(".DS_Store", "hidden"), ("bird/", "empty_folder")}
    assert runs[0]["num_classes"] == 2 and runs[0]["n_skipped"] == 5
    assert report["by_kind"] == {"empty": 1, "empty_folder": 1, "extension": 1, "hidden": 1, "not_an_image": 2,
                                 "truncated": 1}
    why = {e["file"]: e["reason"] for e in report["skipped"]}
    assert why["dog/empty.png"].startswith("empty file") and "HTML" in why["dog/page.jpg"]


def test_a_stage_sweeps_the_temp_files_a_killed_run_left_in_its_outputs(image_folder, tmp_path, monkeypatch):
    import os

    from pipeline.ingest import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages:\n  ingest:\n    cmd: python -m pipeline.ingest\n    outs: [o]\n")
    (tmp_path / "params.yaml").write_text(f"ingest:\n  source: {image_folder}\n  out_dir: o\n  test_fraction: 0.3\n")
    (tmp_path / "o").mkdir()
    leftover = tmp_path / "o" / ".train-000000.tar.tmp"
    leftover.write_bytes(b"half an array")
    os.utime(leftover, (1, 1))  # from a run that is over
    main([])
    assert sorted(f.name for f in (tmp_path / "o").iterdir()) == ["manifest.json", "report.json", "test-000000.tar",
                                                                  "train-000000.tar"]


def test_a_failed_ingest_leaves_the_previous_output_readable(image_folder, tmp_path):
    """A typo'd source folder or a Fashion-MNIST folder missing a file fails before the old shards are touched:
    the previous manifest and shards still read (they used to be unreadable until `dvc checkout data/ingest`)."""
    out = tmp_path / "out"
    run_ingest(params(image_folder, out))
    before = load_split(out, "train")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        run_ingest(params(tmp_path / "imgs-typo", out))
    (tmp_path / "fm").mkdir()
    (tmp_path / "fm" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\0"))
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST file not found"):
        run_ingest(params(tmp_path / "fm", out))
    after = load_split(out, "train")
    assert load_manifest(out)["source"] == str(image_folder)
    np.testing.assert_array_equal(after[0], before[0])


def test_symlinks_are_followed_to_files_and_reported_otherwise(image_folder, tmp_path):
    """A link to an image is read like the image; a broken link, a loop and a link to a folder are each reported as
    such (they used to be skipped as 'unsupported extension' or 'cannot read the file')."""
    cat = image_folder / "cat"
    (cat / "alias.png").symlink_to(cat / "00.png")
    (cat / "gone.png").symlink_to(cat / "nowhere.png")
    (cat / "a.png").symlink_to(cat / "b.png")
    (cat / "b.png").symlink_to(cat / "a.png")
    (cat / "more").symlink_to(image_folder / "dog", target_is_directory=True)
    out = tmp_path / "out"
    run_ingest(params(image_folder, out))
    report = json.loads((out / "report.json").read_text())
    why = {e["file"]: (e["kind"], e["reason"]) for e in report["skipped"]}
    assert why["cat/gone.png"][0] == "symlink" and "broken symbolic link" in why["cat/gone.png"][1]
    assert why["cat/a.png"][0] == why["cat/b.png"][0] == "symlink" and "loop" in why["cat/a.png"][1]
    assert why["cat/more"][0] == "symlink" and "folder" in why["cat/more"][1]
    assert "cat/alias.png" not in why
    ids = [i for s in ("train", "test") for i in load_split(out, s)[2]]
    assert "cat/alias.png" in ids


def test_conversions_and_resizes_are_counted_in_the_report(tmp_path):
    """An RGBA 45x37 image among grey 28x28 ones was converted and resized with no mention anywhere."""
    root = tmp_path / "imgs"
    for i in range(6):
        save_png(root / "a" / f"{i}.png")
    rgba = np.random.default_rng(0).integers(0, 256, (37, 45, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(root / "a" / "rgba.png")
    r = run_ingest(params(root, tmp_path / "out"))
    expected = {"center-cropped to a square (not square)": 1, "converted RGBA to L (alpha dropped)": 1,
                "resized to 28x28": 1}
    assert json.loads((tmp_path / "out" / "report.json").read_text())["changed"] == expected == r["changed"]
