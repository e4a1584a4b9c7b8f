"""Serve every pipeline flow as a deployment of a local Prefect server:

    python -m flows.serve            # from the repository root, with PREFECT_API_URL pointing at the server

Deployments: `oar-pipeline/local`, `extract_orders_fanout/local` and `<stage>/local` for each stage. Runs start
from the UI ("Run" -> custom run shows the typed parameter form) or `prefect deployment run 'train_random/local'`.
At most one run executes at a time: every run drives `dvc repro` in the same checkout, which DVC locks.
"""
from __future__ import annotations

from prefect import serve
from prefect.deployments.runner import EntrypointType

from flows.pipeline import ALL_FLOWS

DEPLOYMENT = "local"


def deployments():
    # module entrypoints: the served runs import `flows.pipeline` from the installed package, whatever the cwd
    return [f.to_deployment(name=DEPLOYMENT, tags=["oar"], description=f.description,
                            entrypoint_type=EntrypointType.MODULE_PATH) for f in ALL_FLOWS]


def main() -> None:
    serve(*deployments(), limit=1)


if __name__ == "__main__":
    main()
