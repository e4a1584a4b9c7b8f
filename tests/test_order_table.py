"""The orders table's integrity: rows matched to images one to one, corrupt parts caught, and a run's start-up
cleanup that leaves another run's temp files alone (issue 12, items 1, 2, 9)."""
import fcntl
import os
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from oar_core.order_table import META_CKPT, META_PARAMS, orders_for_ids, part_is_current, write_part
from oar_core.storage import remove_stale_temps

N = 49


def perm(image_id: str) -> list[int]:
    """An order that tells its image apart from every other."""
    return np.random.default_rng(int(image_id.split("-")[1])).permutation(N).tolist()


def write(folder, stem, ids) -> str:
    part = folder / f"{stem}.parquet"
    permutations = pa.array([perm(i) for i in ids], pa.list_(pa.uint16()))
    write_part(part, pa.table({"image_id": ids, "permutation": permutations}),
               "ckpt", "params")
    return part


def flip_data_pages(part, column="permutation", n=8) -> None:
    """Invert n bytes in the middle of a column's pages; the footer stays intact and still reads."""
    md = pq.ParquetFile(part).metadata
    chunk = next(c for c in (md.row_group(0).column(i) for i in range(md.num_columns))
                 if c.path_in_schema.split(".")[0] == column)
    at = (chunk.dictionary_page_offset or chunk.data_page_offset) + chunk.total_compressed_size // 2
    data = bytearray(part.read_bytes())
    data[at:at + n] = bytes(b ^ 0xFF for b in data[at:at + n])
    part.write_bytes(bytes(data))
    assert pq.ParquetFile(part).metadata.num_rows == md.num_rows


IDS = [f"img-{i}" for i in range(300)]


def test_orders_are_matched_by_id_and_a_duplicated_image_is_rejected_naming_its_parts(tmp_path):
    write(tmp_path / "ok", "train-000001", IDS[150:])
    write(tmp_path / "ok", "train-000000", IDS[:150])
    shuffled = list(np.random.default_rng(0).permutation(IDS))
    assert orders_for_ids(tmp_path / "ok", shuffled, N).tolist() == [perm(i) for i in shuffled]

    write(tmp_path / "one", "train-000000", IDS[:151] + IDS[150:])  # img-150 twice in one part
    with pytest.raises(ValueError, match=r"1 image\(s\) have more than one row, e.g. 'img-150': 2 rows in "
                                         r"train-000000.parquet; rerun `dvc repro extract_orders`$"):
        orders_for_ids(tmp_path / "one", IDS, N)
    write(tmp_path / "two", "train-000000", IDS[:152])  # img-150, img-151 in both parts
    write(tmp_path / "two", "train-000001", IDS[150:])
    with pytest.raises(ValueError, match=r"2 image\(s\) have more than one row, e.g. 'img-150': 2 rows in "
                                         r"train-000000.parquet, train-000001.parquet; rerun"):
        orders_for_ids(tmp_path / "two", IDS, N)


def test_a_part_is_current_only_if_it_reads_back_whole_with_its_shards_ids(tmp_path):
    part = write(tmp_path, "train-000000", IDS)
    assert part_is_current(part, "ckpt", "params", IDS)
    assert not part_is_current(part, "ckpt", "params", IDS[:-1])  # the shard was rewritten with other images
    assert not part_is_current(part, "other", "params", IDS)
    assert not part_is_current(tmp_path / "missing.parquet", "ckpt", "params", IDS)
    # written without page checksums (an older writer): its data cannot be verified, so it is redone
    legacy = tmp_path / "legacy.parquet"
    pq.write_table(pq.read_table(part).replace_schema_metadata({META_CKPT: b"ckpt", META_PARAMS: b"params"}), legacy)
    assert not part_is_current(legacy, "ckpt", "params", IDS)

    flip_data_pages(part)
    assert not part_is_current(part, "ckpt", "params", IDS)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(part))}: corrupt orders part \(.+\); rerun "
                                         r"`dvc repro extract_orders`, which redoes it$") as e:
        orders_for_ids(tmp_path, IDS, N)
    assert "\n" not in str(e.value)


def stale_temp(folder, stem, age_s=0.0):
    f = folder / f".{stem}.parquet.abc123.tmp"
    f.write_bytes(b"PAR1")
    os.utime(f, (time.time() - age_s,) * 2)
    return f


def test_cleanup_removes_a_killed_runs_temp_files_but_not_a_live_writers(tmp_path):
    killed = stale_temp(tmp_path, "train-000000", age_s=3600)  # left by a run killed before this process began
    fresh = stale_temp(tmp_path, "train-000001")  # another run's, begun after this process
    held = stale_temp(tmp_path, "test-000000", age_s=3600)  # another run's, begun earlier, still being written
    with held.open("rb") as writer:  # flock treats a second open file like another process's
        fcntl.flock(writer, fcntl.LOCK_EX)
        assert remove_stale_temps(tmp_path) == [killed]
    assert fresh.exists() and held.exists() and not killed.exists()
    assert remove_stale_temps(tmp_path) == [held]  # its writer is gone now
    assert fresh.exists()


def test_a_part_being_written_survives_another_runs_cleanup(tmp_path, monkeypatch):
    write_table = pq.write_table

    def write_while_another_run_starts(table, where, **kw):
        write_table(table, where, **kw)
        os.utime(where, (0, 0))  # however old the temp file looks, its writer's lock keeps it
        assert remove_stale_temps(tmp_path) == []

    monkeypatch.setattr(pq, "write_table", write_while_another_run_starts)
    part = write(tmp_path, "train-000000", IDS)
    monkeypatch.undo()
    assert part_is_current(part, "ckpt", "params", IDS)


def test_the_query_cli_checks_checksums_and_duplicates(tmp_path, capsys):
    """`python -m oar_core.order_queries DIR summary` reads the parts it summarises under their checksums: a flipped
    byte used to be reported as a plausible mean, a duplicated part as extra images."""
    from oar_core.order_queries import main

    ids = [f"img-{i}" for i in range(40)]
    table = pa.table({"image_id": ids, "split": ["train"] * 40, "label": [i % 4 for i in range(40)],
                      "permutation": pa.array([perm(i) for i in ids], pa.list_(pa.uint16())),
                      "nll_extracted": pa.array(np.full(40, 5.0), pa.float32()),
                      "nll_random": pa.array(np.full(40, 6.0), pa.float32())})
    part = tmp_path / "train-000000.parquet"
    write_part(part, table, "ckpt", "params")
    main([str(tmp_path), "summary"])
    assert "40" in capsys.readouterr().out
    (tmp_path / "train-000001.parquet").write_bytes(part.read_bytes())  # the same part twice
    with pytest.raises(SystemExit):
        main([str(tmp_path), "summary"])
    assert "40 image(s) have more than one row" in capsys.readouterr().err
    (tmp_path / "train-000001.parquet").unlink()
    flip_data_pages(part, "nll_extracted", n=4)
    with pytest.raises(SystemExit):
        main([str(tmp_path), "per-class"])
    assert "corrupt orders part" in capsys.readouterr().err
