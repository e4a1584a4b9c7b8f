"""Stage `tokenize`: encode every ingested image into a token grid and write WebDataset shards."""
from oar_core.shards import run_tokenize
from pipeline._stage import stage_main


def _args(ap):
    ap.add_argument("--ingest-dir", default="data/ingest")
    ap.add_argument("--tokenizer", default="models/tokenizer.pt")


def main(argv=None):
    return stage_main(__doc__, "tokenize", lambda p, a: run_tokenize(p, a.ingest_dir, a.tokenizer), argv, _args,
                      summary=lambda r: (
                          f"-> {r['out']}: train={r['counts']['train']} test={r['counts']['test']} "
                          f"grid={r['grid_h']}x{r['grid_w']} codebook={r['codebook_size']} "
                          f"shards={len(r['shards']['train'])}+{len(r['shards']['test'])} in {r['seconds']:.0f}s"))


if __name__ == "__main__":
    main()
