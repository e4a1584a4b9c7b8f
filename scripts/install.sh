#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian machine: the Fashion-MNIST package, a venv, the project and its tests' deps.
# The venv gets exactly the versions pinned in requirements.lock (installed with --no-deps: pip resolves nothing);
# re-running is quick, and brings an existing .venv up to date when requirements.lock or pyproject.toml changed.
# `bash scripts/install.sh --refresh-lock` remakes requirements.lock from a clean install of pyproject.toml's ranges.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements.lock

pip_install() {  # quiet, without the "Location ... is ignored" lines that the machine's local file indexes print
  "$1" -m pip install -q --disable-pip-version-check "${@:2}" 2>&1 | { grep -v '^WARNING: Location' || true; }
}

if [ "${1:-}" = --refresh-lock ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "resolving pyproject.toml's ranges in a clean venv under $tmp (10 to 15 minutes on 2 cores)..."
  python3 -m venv "$tmp/venv"
  pip_install "$tmp/venv/bin/python" -e '.[test]'
  "$tmp/venv/bin/python" -m pip check
  {
    echo "# Every package of the project's environment (pyproject.toml with its [test] extra), pinned: a freeze of a"
    echo "# clean \`pip install -e '.[test]'\` that passed \`pip check\`, on $(uname -s) $(uname -m), Python $("$tmp/venv/bin/python" -c 'import platform; print(platform.python_version())')."
    echo "# scripts/install.sh installs exactly these with --no-deps (nothing is resolved), then the project itself."
    echo "# Refresh (after changing pyproject.toml's dependencies, or to take newer releases):"
    echo "#   bash scripts/install.sh --refresh-lock"
    "$tmp/venv/bin/python" -m pip freeze --all --exclude-editable | grep -v '^pip=='
  } > "$LOCK.tmp"
  mv "$LOCK.tmp" "$LOCK"
  echo "wrote $LOCK ($(grep -c '==' "$LOCK") pins); run bash scripts/install.sh to bring .venv to it"
  exit 0
fi

SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
# .venv/.lock-sha256: the hash of the lock and pyproject.toml that .venv was last installed from.
want=$(cat "$LOCK" pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.lock-sha256 2>/dev/null)" != "$want" ]; then
  rm -f .venv/.lock-sha256
  # --no-build-isolation: builds (the lock's one sdist, the project) use the lock's setuptools, nothing fetched for them;
  # --no-compile: no .pyc for all ~6 GB up front (a third of the install's time): Python writes them on first import.
  nodeps=(--no-deps --no-build-isolation --no-compile)
  pip_install .venv/bin/python "${nodeps[@]}" "$(grep -m1 '^setuptools==' "$LOCK")"
  pip_install .venv/bin/python "${nodeps[@]}" -r "$LOCK"
  pip_install .venv/bin/python "${nodeps[@]}" -e .
  broken=$(.venv/bin/python -m pip check 2>&1) \
    || { echo "install failed: pip check: $(echo "$broken" | head -1) ($LOCK disagrees with pyproject.toml or itself; refresh it: bash scripts/install.sh --refresh-lock)" >&2; exit 1; }
  echo "$want" > .venv/.lock-sha256
fi
.venv/bin/python -c "import torch, torchvision, torch_fidelity, prefect, dvc, webdataset, polars, prefect_dask, distributed, diffusers, safetensors" \
  || { echo "install failed: see the pip output above" >&2; exit 1; }
