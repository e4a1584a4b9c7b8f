"""Stage `tokenize`: stream the ingest shards through the tokenizer into WebDataset token shards (+ meta.json)."""
from __future__ import annotations

import time

from tqdm import tqdm

from oar_core.image_shards import SPLITS, image_batches, load_manifest, to_float_BCHW
from oar_core.params import TokenizeParams
from oar_core.runtime import pick_device
from oar_core.storage import file_hash, join, remove_file, write_json
from oar_core.token_shards import token_sample
from oar_core.tokenizer import load_tokenizer
from oar_core.webds import shard_writer
from pipeline._stage import stage_main


def run_tokenize(p: TokenizeParams, ingest_dir: str, tokenizer="models/tokenizer.pt") -> dict:
    """Stream the ingest shards through the tokenizer into token shards, a batch at a time."""
    manifest = load_manifest(ingest_dir)
    device = pick_device()
    model = load_tokenizer(tokenizer, device)
    if model.channels != manifest["channels"] or model.image_size != manifest["image_size"]:
        raise ValueError(
            f"{tokenizer}: tokenizer is for {model.image_size}x{model.image_size}x{model.channels} images but "
            f"{ingest_dir} holds {manifest['image_size']}x{manifest['image_size']}x{manifest['channels']}; "
            f"rerun `dvc repro tokenizer` after changing ingest params"
        )
    t0 = time.time()
    meta_path = join(p.out, "meta.json")
    remove_file(meta_path)  # while shards are being replaced, no meta.json may vouch for them
    published = {}
    for split in SPLITS:
        g = 0
        bar = tqdm(total=manifest["counts"][split], desc=f"tokenize {split}", unit="img", leave=False, mininterval=1.0)
        with shard_writer(p.out, split, p.shard_size) as (writer, published[split]):
            for images_BHWC, labels_B, ids in image_batches(ingest_dir, split, p.batch_size):
                tokens_BHW = model.encode(to_float_BCHW(images_BHWC, device)).cpu().numpy()
                for tokens_HW, label, id_ in zip(tokens_BHW, labels_B, ids):
                    writer.write(token_sample(split, g, tokens_HW, label, id_))
                    g += 1
                bar.update(len(ids))
        bar.close()
    meta = {
        "grid_h": model.grid, "grid_w": model.grid, "codebook_size": model.codebook_size,
        "num_classes": manifest["num_classes"], "class_names": manifest["class_names"],
        "image_size": manifest["image_size"], "channels": manifest["channels"],
        "counts": {s: sum(published[s].values()) for s in SPLITS}, "shards": {s: list(published[s]) for s in SPLITS},
        "shard_counts": {s: list(published[s].values()) for s in SPLITS},
        "tokenizer_hash": file_hash(tokenizer),
    }
    write_json(meta_path, meta)  # last: readers treat meta.json as "the shard set is complete"
    return {**meta, "out": p.out, "seconds": round(time.time() - t0, 2)}


def _args(ap):
    ap.add_argument("--ingest-dir", help="default: from params.yaml")
    ap.add_argument("--tokenizer", default="models/tokenizer.pt")


def main(argv=None):
    return stage_main(__doc__, "tokenize", lambda p, a: run_tokenize(p, a.ingest_dir, a.tokenizer), argv, _args,
                      summary=lambda r: (
                          f"-> {r['out']}: train={r['counts']['train']} test={r['counts']['test']} "
                          f"grid={r['grid_h']}x{r['grid_w']} codebook={r['codebook_size']} "
                          f"shards={len(r['shards']['train'])}+{len(r['shards']['test'])} in {r['seconds']:.0f}s"))


if __name__ == "__main__":
    main()
