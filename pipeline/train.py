"""Stage `train_*` / `finetune`: train an AR model on token shards in the order its params section names.

    python -m pipeline.train --stage train_random          # any-order model
    torchrun --nproc_per_node 2 -m pipeline.train --stage train_raster   # DDP (gloo on CPU)
"""
from oar_core.train import run_train
from pipeline._stage import stage_main


def main(argv=None):
    return stage_main(__doc__, None, lambda p, a: run_train(p, a.stage, shards=a.shards), argv,
                      lambda ap: ap.add_argument("--shards", default="data/shards"))


if __name__ == "__main__":
    main()
