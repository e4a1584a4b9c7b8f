"""Stage `extract_orders`: per-image generation orders from the any-order model, as Parquet parts.

    python -m pipeline.extract_orders
    torchrun --nproc_per_node 4 -m pipeline.extract_orders       # one process per GPU, same table as one process

Fan out over machines with --num-workers N --worker-index i (each writes its own shards' parts).
"""
from oar_core.extract import run_extract
from pipeline._stage import stage_main


def _args(ap):
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--worker-index", type=int, default=0)


def main(argv=None):
    return stage_main(__doc__, "extract_orders",
                      lambda p, a: run_extract(p, a.shards, a.num_workers, a.worker_index), argv, _args)


if __name__ == "__main__":
    main()
