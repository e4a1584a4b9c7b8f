"""Stage `evaluate`: FID/KID/IS/precision/recall (feature_net's space always; Inception with local weights) +
held-out NLL per model, then pictures and reports/report.md. Metrics: dvclive/evaluate/<model>/metrics.json;
labels: reports/metrics_labels.json."""
from oar_core.evaluate import run_evaluate
from pipeline._stage import stage_main


def _args(ap):
    ap.add_argument("--samples", default="samples")
    ap.add_argument("--ingest-dir", default="data/ingest")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--orders-dir", default="data/orders")
    ap.add_argument("--tokenizer", default="models/tokenizer.pt")
    ap.add_argument("--plots-dir", default="dvclive", help="DVCLive folders of the training stages (their curves)")
    ap.add_argument("--metrics", default="dvclive/evaluate", help="DVCLive folder: <it>/<model>/metrics.json")
    ap.add_argument("--feature-net", default="models/feature_net.pt")


def main(argv=None):
    return stage_main(__doc__, "evaluate", lambda p, a: run_evaluate(
        p, a.samples, a.ingest_dir, a.shards, a.orders_dir, a.tokenizer, a.plots_dir, a.metrics, a.feature_net),
        argv, _args)


if __name__ == "__main__":
    main()
