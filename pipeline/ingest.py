"""Stage `ingest`: an image source (Fashion-MNIST idx files, a folder or an s3:// prefix of images) -> WebDataset
image shards + manifest.json + report.json (skipped and ignored files, why, what to do).

Output (in ingest.out_dir): shards {split}-NNNNNN.tar of `shard_size` samples {png, cls, id.txt}, written as the
images stream in (memory stays flat however many there are); report.json; manifest.json (sizes, classes, counts,
the shard list), written last."""
from __future__ import annotations

import collections

from tqdm import tqdm

from oar_core import storage
from oar_core.image_shards import SPLITS
from oar_core.image_sources import (
    FASHION_MNIST_CLASSES,
    IGNORED_KINDS,
    ImageFormat,
    fashion_mnist_split,
    folder_samples,
    is_fashion_mnist,
    scan_folder,
    split_of,
)
from oar_core.params import IngestParams
from oar_core.storage import join, remove_file, write_json
from oar_core.sudoku import DEFAULT_COUNTS, board_samples, board_size_of, split_boards
from oar_core.webds import shard_writer
from pipeline._stage import stage_main


def run_ingest(p: IngestParams) -> dict:
    storage.S3_TIMEOUT_S = p.s3_timeout_s
    fmt = ImageFormat(p.image_size, p.channels, p.on_size_mismatch)
    limits = {"train": p.max_train, "test": p.max_test}
    changed: collections.Counter = collections.Counter()  # what was done to the images kept (folders/S3)
    board = board_size_of(p.source)
    if board:  # generated Sudoku solution grids, one class
        skipped, class_names = [], ["sudoku"]
        boards = split_boards(board, {s: limits[s] or DEFAULT_COUNTS[s] for s in SPLITS}, p.seed)
        samples = {s: (len(boards[s]), board_samples(boards[s], s, p.image_size, p.channels)) for s in SPLITS}
    elif is_fashion_mnist(p.source):
        skipped, class_names = [], list(FASHION_MNIST_CLASSES)
        samples = {s: fashion_mnist_split(p.source, s, limits[s], fmt) for s in SPLITS}  # (image count, the images)
    else:
        entries, skipped, class_names = scan_folder(p.source)
        label_of = {c: i for i, c in enumerate(class_names)}
        by_split: dict[str, list] = {s: [] for s in SPLITS}
        for full, rel, c in entries:
            split, h = split_of(rel, p.test_fraction, p.seed)
            by_split[split].append((h, rel, full, label_of.get(c, 0)))
        samples = {s: (min(len(by_split[s]), limits[s] or len(by_split[s])),  # at most: some may be skipped
                       folder_samples(sorted(by_split[s]), limits[s], skipped, fmt, changed=changed))
                   for s in SPLITS}
    # the source is open and listed: only now do the old shards start to be replaced, and while they are, no
    # manifest may vouch for them (a typo'd folder or an unreachable bucket leaves the previous output readable)
    manifest_path = join(p.out_dir, "manifest.json")
    remove_file(manifest_path)
    published = {}
    for split in SPLITS:
        with shard_writer(p.out_dir, split, p.shard_size) as (writer, published[split]):
            total, images = samples[split]
            for g, (arr_HWC, label, id_) in enumerate(tqdm(images, total=total, desc=f"ingest {split}", unit="img",
                                                           leave=False, mininterval=1.0)):
                writer.write({"__key__": f"{split}-{g:08d}", "png": arr_HWC[..., 0] if p.channels == 1 else arr_HWC,
                              "cls": label, "id.txt": id_})
    counts = {s: sum(published[s].values()) for s in SPLITS}
    ignored = [e for e in skipped if e["kind"] in IGNORED_KINDS]
    skipped = [e for e in skipped if e["kind"] not in IGNORED_KINDS]
    by_kind = dict(sorted(collections.Counter(e["kind"] for e in skipped + ignored).items()))
    report = {"skipped": skipped, "n_skipped": len(skipped), "ignored": ignored, "by_kind": by_kind,
              "changed": dict(sorted(changed.items()))}  # images kept, but converted or resized: how many of each
    write_json(join(p.out_dir, "report.json"), report)  # also when failing below: it says why files were rejected
    for s in SPLITS:
        if counts[s] == 0:
            if not any(counts.values()):
                hint = "every image was skipped; see report.json in ingest.out_dir for the reasons"
            elif s == "test":
                hint = (f"the hash split put no image in test; raise ingest.test_fraction (now {p.test_fraction}) "
                        f"or add images")
            else:
                hint = f"lower ingest.test_fraction (now {p.test_fraction}) or add images"
            raise ValueError(f"{p.source}: no usable {s} images after ingest ({len(skipped)} skipped); {hint}")
    manifest = {
        "source": p.source, "image_size": p.image_size, "channels": p.channels,
        "class_names": class_names, "num_classes": len(class_names), "counts": counts,
        "shards": {s: list(published[s]) for s in SPLITS},
        "shard_counts": {s: list(published[s].values()) for s in SPLITS},
    }
    write_json(manifest_path, manifest)  # written last: its presence means the shards are complete
    return {**manifest, "n_skipped": len(skipped), "by_kind": by_kind, "changed": report["changed"],
            "out_dir": p.out_dir}


def main(argv=None):
    return stage_main(__doc__, "ingest", lambda p, a: run_ingest(p), argv, summary=lambda r: (
        f"{r['source']} -> {r['out_dir']}: train={r['counts']['train']} test={r['counts']['test']} "
        f"{r['image_size']}x{r['image_size']}x{r['channels']} classes={r['num_classes']} skipped={r['n_skipped']}"
        + (f" (by kind: {', '.join(f'{k} {n}' for k, n in r['by_kind'].items())}; see report.json)"
           if r["by_kind"] else "")
        + (f"; changed: {', '.join(f'{k} {n}' for k, n in r['changed'].items())}" if r["changed"] else "")))


if __name__ == "__main__":
    main()
