"""WebDataset shards (`{split}-NNNNNN.tar` in a local folder or under an s3:// prefix), through the `webdataset`
library both ways.

Writing: `wds.ShardWriter` fills a hidden local temp file; each finished shard is published whole under its final
name (a rename beside it, or one PUT to S3), so no reader ever sees half a shard. Tar headers are fixed (mtime 0,
owner oar, mode 0644): the same samples always give the same bytes, so DVC hashes stay put.
Reading: `wds.WebDataset` pipelines; s3:// URLs open through fsspec (s3fs, with oar's timeouts and retry lines),
which webdataset's own URL table lacks.
"""
from __future__ import annotations

import contextlib
import os
import tarfile
from pathlib import Path
from typing import Iterator

import webdataset as wds
from webdataset.gopen import gopen_schemes

from oar_core.storage import fs_for, is_remote, join, list_files, publish_file, remove_file, temp_dir


def _open_fsspec(url, mode="rb", bufsize=8192, **kw):
    fs, path = fs_for(url)
    return fs.open(path, mode)


def register_s3() -> None:
    """Let webdataset open s3:// URLs through fsspec (it has no opener of its own for S3); for your own loaders too."""
    gopen_schemes.setdefault("s3", _open_fsspec)


def list_shards(prefix, split: str) -> list[str]:
    if is_remote(prefix):
        fs_for(prefix)[0].invalidate_cache()  # another process (or machine) may have written shards since
    try:
        return list_files(prefix, f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar")
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def shard_writer(prefix, split: str, maxcount: int) -> Iterator[tuple[wds.ShardWriter, dict[str, int]]]:
    """Yields (writer, published). `writer.write({"__key__": ..., "png": uint8 array, "cls": int, "id.txt": str})`
    encodes each field by its extension. Each shard is published as soon as it is full; `published` maps the
    published ones' names to their sample counts, in order. On a clean exit, shards of this split left from an
    earlier, larger run are removed."""
    published: dict[str, int] = {}

    def publish(tmp: str) -> None:
        if writer.count == 0:  # no samples at all: no empty shard either
            os.remove(tmp)
            return
        name = Path(tmp).name.removeprefix(".").removesuffix(".tmp")
        publish_file(tmp, join(prefix, name))
        published[name] = writer.count

    with contextlib.ExitStack() as stack:
        if is_remote(prefix):
            staging = Path(stack.enter_context(temp_dir("oar-shards")))
        else:
            staging = Path(prefix)
            staging.mkdir(parents=True, exist_ok=True)
        pattern = str(staging).replace("%", "%%") + f"/.{split}-%06d.tar.tmp"
        writer = wds.ShardWriter(pattern, maxcount=maxcount, post=publish, verbose=0, mtime=0, mode=0o644,
                                 user="oar", group="oar", format=tarfile.USTAR_FORMAT)
        try:
            yield writer, published
            writer.close()
        finally:
            stream = getattr(writer, "tarstream", None)
            if stream is not None:  # failed mid-shard: drop the partial temp file
                stream.close()
                with contextlib.suppress(FileNotFoundError):
                    os.remove(writer.fname)
    keep = {join(prefix, n) for n in published}
    for path in list_shards(prefix, split):
        if path not in keep and join(prefix, path.rsplit("/", 1)[-1]) not in keep:
            remove_file(path)


def dataset(urls: list[str], hint: str, seed: int | None = None) -> wds.WebDataset:
    """The samples of `urls` in order (or with the shard order shuffled by `seed`), raw bytes per field. Every process
    reads all of them: callers that split work do it by shard. A corrupt or truncated shard fails naming it."""

    def name_the_shard(exn: Exception) -> bool:
        url = next((a for a in reversed(exn.args) if isinstance(a, str) and a in urls), None)
        if url is None:
            raise exn
        raise ValueError(f"{url}: corrupt or truncated shard ({type(exn).__name__}: {exn.args[0]}); {hint}") from None

    register_s3()
    return wds.WebDataset(list(urls), shardshuffle=len(urls) if seed is not None else False, seed=seed,
                          nodesplitter=None, workersplitter=None, empty_check=False, handler=name_the_shard)
