#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian machine: the Fashion-MNIST package, a venv, the project and its tests' deps.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import torch, torchvision, torch_fidelity, prefect, dvc, webdataset, polars, prefect_dask, distributed, diffusers" \
  || { echo "install failed: see the pip output above" >&2; exit 1; }
