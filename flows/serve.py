"""Serve every pipeline flow as a deployment of a local Prefect server:

    python -m flows.serve            # from the repository root, with PREFECT_API_URL pointing at the server

Deployments (`<flow>/<deployment>`, as the UI lists them and `prefect deployment run` takes them):

    oar-pipeline/all-stages                      extract_orders_fanout/parallel-extraction
    ingest/load-images                           tokenizer/train-vq-tokenizer
    tokenize/images-to-token-shards              train_raster/train-raster-baseline
    train_random/train-any-order-model           extract_orders/extract-generation-orders
    finetune/finetune-on-orders                  sample/generate-samples
    complete/complete-test-images                feature_net/train-feature-network
    evaluate/compute-metrics                     edit-images/edit-folder (pipeline.edit on a folder)

Runs start from the UI ("Run" -> custom run shows the typed parameter form) or
`prefect deployment run 'train_random/train-any-order-model'`. A run's parameters need only the keys to change:
the others keep params.yaml's values when the run starts. At most one run executes at a time: every run drives
`dvc repro` in the same checkout, which DVC locks.
"""
from __future__ import annotations

from prefect import serve
from prefect.deployments.runner import EntrypointType

from flows.edit import edit_images
from flows.pipeline import ALL_FLOWS

# the UI lists deployments by these names: they say what a run does, and scripts address them, so keep them stable
DEPLOYMENTS = {
    "oar-pipeline": "all-stages",
    "extract_orders_fanout": "parallel-extraction",
    "ingest": "load-images",
    "tokenizer": "train-vq-tokenizer",
    "tokenize": "images-to-token-shards",
    "train_raster": "train-raster-baseline",
    "train_random": "train-any-order-model",
    "extract_orders": "extract-generation-orders",
    "finetune": "finetune-on-orders",
    "sample": "generate-samples",
    "complete": "complete-test-images",
    "feature_net": "train-feature-network",
    "evaluate": "compute-metrics",
    "edit-images": "edit-folder",  # not a stage: the edit command on a folder (flows/edit.py)
}
SERVED = [*ALL_FLOWS, edit_images]


def deployments():
    # module entrypoints: the served runs import `flows.pipeline` from the installed package, whatever the cwd
    return [f.to_deployment(name=DEPLOYMENTS[f.name], tags=["oar"], description=f.description,
                            entrypoint_type=EntrypointType.MODULE_PATH) for f in SERVED]


def main() -> None:
    serve(*deployments(), limit=1)


if __name__ == "__main__":
    main()
