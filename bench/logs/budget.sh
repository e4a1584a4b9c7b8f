#!/bin/bash
# Issue 22's budget sweep (README "The controlled study", bench/budget.md/.png): the controlled study's recipe at
# 1x, 2x and 4x the steps, raster / any-order / OAR only, all in one workdir (one tokenizer and feature space), so
# the multiples differ by steps alone. Resumable: bench.quality skips finished models and results.
# The run behind the README: commit 26bd3dd's bench.quality, one process per (multiple, seed) with
# OMP_NUM_THREADS=1, two or three at a time; seeds 0-2 at 1x and 2x, 0-1 at 4x. Log: bench/logs/budget.log.
# Usage: bash bench/logs/budget.sh   (W defaults to /tmp/oar-budget; per seed about 10 / 16 / 29 min of one core)
cd "$(dirname "$0")/../.." || exit 1
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
.venv/bin/python -m bench.budget --workdir "${W:-/tmp/oar-budget}" --seeds 0 1 2 2>&1 | tee -a bench/logs/budget.log
