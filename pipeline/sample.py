"""Stage `sample`: class-balanced images from every model in `sample.models`, in its order, plus the orders
(samples/<model>/*.png, orders.parquet, grid.png, meta.json)."""
from oar_core.samples import run_sample
from pipeline._stage import stage_main


def main(argv=None):
    return stage_main(__doc__, "sample", lambda p, a: run_sample(p, a.metrics_dir), argv,
                      lambda ap: ap.add_argument("--metrics-dir", default="metrics"))


if __name__ == "__main__":
    main()
