"""Stage `ingest`: image source -> normalized arrays + split manifest (see oar_core.data)."""
from oar_core.data import run_ingest
from pipeline._stage import stage_main


def main(argv=None):
    return stage_main(__doc__, "ingest", lambda p, a: run_ingest(p), argv, summary=lambda r: (
        f"{r['source']} -> {r['out_dir']}: train={r['counts']['train']} test={r['counts']['test']} "
        f"{r['image_size']}x{r['image_size']}x{r['channels']} classes={r['num_classes']} skipped={r['n_skipped']}"
        + (f" (by kind: {', '.join(f'{k} {n}' for k, n in r['by_kind'].items())}; see report.json)"
           if r["by_kind"] else "")))


if __name__ == "__main__":
    main()
