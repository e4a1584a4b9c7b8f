"""Stage `tokenizer`: train a VQ tokenizer on the ingested images (or adopt tokenizer.checkpoint) + metrics."""
from oar_core.tokenizer import run_tokenizer
from pipeline._stage import stage_main


def _args(ap):
    ap.add_argument("--ingest-dir", default="data/ingest")
    ap.add_argument("--out", default="models/tokenizer.pt")
    ap.add_argument("--metrics", default="dvclive/tokenizer", help="DVCLive folder for its metrics.json")


def main(argv=None):
    return stage_main(__doc__, "tokenizer", lambda p, a: run_tokenizer(p, a.ingest_dir, a.out, a.metrics), argv, _args,
                      summary=lambda r: (
                          f"({r['source']}) -> {r['out']}: recon_mse={r['recon_mse']:.4f} (mean-image baseline "
                          f"{r['baseline_mse']:.4f}) psnr={r['psnr']:.1f}dB usage={r['codebook_usage']:.2f} "
                          f"perplexity={r['perplexity']:.0f}/{r['codebook_size']} grid={r['grid']} "
                          f"in {r['train_seconds']:.0f}s"))


if __name__ == "__main__":
    main()
