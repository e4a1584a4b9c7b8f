"""Serve every pipeline flow as a deployment of a local Prefect server:

    python -m flows.serve            # from the repository root, with PREFECT_API_URL pointing at the server

It first waits for that server to answer (one line, "waiting for the Prefect server at ..."; `--wait-s`, default
120 s, then one error line and exit status 1), so it can be started right after `prefect server start ... &`.

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

import argparse
import sys
import time

import httpx
from prefect import serve
from prefect.deployments.runner import EntrypointType
from prefect.settings import PREFECT_API_URL

from flows.edit import edit_images
from flows.forms import plain_parameters
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
    out = [f.to_deployment(name=DEPLOYMENTS[f.name], tags=["oar"], description=f.description.split("\n\nArgs:")[0],
                           entrypoint_type=EntrypointType.MODULE_PATH) for f in SERVED]
    for d in out:  # no None defaults and toggles: the forms start empty (flows/forms.py)
        plain_parameters(d._parameter_openapi_schema.properties)
    return out


def wait_for_api(url: str | None, wait_s: float, poll_s: float = 1.0) -> None:
    """Return once the Prefect server at `url` answers its health check; SystemExit with one line after `wait_s`."""
    if not url:
        sys.exit("error: PREFECT_API_URL is not set: export PREFECT_API_URL=http://127.0.0.1:4200/api (the address "
                 "of the server `prefect server start` runs)")
    print(f"waiting for the Prefect server at {url} ...", flush=True)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            httpx.get(url.rstrip("/") + "/health", timeout=5).raise_for_status()
            return
        except httpx.HTTPError as e:
            if time.monotonic() > deadline:
                sys.exit(f"error: no Prefect server answered at {url} within {wait_s:g} s ({type(e).__name__}): start "
                         f"one with `prefect server start --host 127.0.0.1 --port 4200`, or set PREFECT_API_URL to "
                         f"yours (--wait-s waits longer)")
            time.sleep(poll_s)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--wait-s", type=float, default=120.0, help="how long to wait for the server (default 120)")
    args = ap.parse_args(argv)
    wait_for_api(PREFECT_API_URL.value(), args.wait_s)
    serve(*deployments(), limit=1)


if __name__ == "__main__":
    main()
