#!/bin/bash
# Issue 22's budget sweep (README "The controlled study", bench/budget.md/.png): seed 0 of the controlled study's
# recipe at 1x, 2x and 4x the steps, raster / any-order / OAR only, all in one workdir (one tokenizer and feature
# space), so the multiples differ by steps alone. Resumable: bench.quality skips finished models and results.
# The run behind the README: commit 26bd3dd's bench.quality, one process per multiple with OMP_NUM_THREADS=1
# (2x then 1x on one core, 4x on the other), then the table and figure. Log: bench/logs/budget.log.
# Usage: bash bench/logs/budget.sh      (W defaults to /tmp/oar-budget; about 25 / 45 / 80 min of one core)
cd "$(dirname "$0")/../.." || exit 1
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
.venv/bin/python -m bench.budget --workdir "${W:-/tmp/oar-budget}" --seeds 0 2>&1 | tee -a bench/logs/budget.log
