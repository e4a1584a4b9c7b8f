"""Stage `feature_net`: train evaluate's in-domain feature network on the ingested train split (or adopt
feature_net.checkpoint): cached by DVC, so every evaluation of the same data uses the same feature space."""
from oar_core.features import run_feature_net
from pipeline._stage import stage_main


def main(argv=None):
    return stage_main(__doc__, "feature_net", lambda p, a: run_feature_net(p), argv, summary=lambda r: (
        f"{r['task']} network ({r['source']}), test accuracy {r['test_accuracy']:.3f}"))


if __name__ == "__main__":
    main()
