#!/bin/sh
# The Sudoku comparison in the background (README "Known-answer benchmark: Sudoku"): the boards once, then one
# process per seed for the raster arm and one for the arms that start from the any-order model (they share the seed's
# folder and table), and the relative-offset variant at low priority. Resumable: rerun it after an interruption.
# Usage: nohup bench/sudoku_launch.sh > /dev/null 2>&1 &      (from the repo root; logs in bench/logs/sudoku_*.log)
cd "$(dirname "$0")/.." || exit 1
export OMP_NUM_THREADS=1 PYTHONPATH="$PWD"
LOGS=bench/logs
ARGS="--board 6 --size small --steps 1500 --finetune-steps 500 --max-train 4000 --max-test 200 --n-boards 200"
quiet() { tr '\r' '\n' | grep --line-buffered -v "it/s[],]\|s/it[],]\|batch/s\|s/batch\|img/s\|s/step\|step/s"; }  # no progress bars
.venv/bin/python -m bench.sudoku $ARGS --common-only 2>&1 | quiet | tee $LOGS/sudoku_common.log
for s in 0 1 2; do
  (.venv/bin/python -m bench.sudoku $ARGS --seeds $s --tag default --arms raster 2>&1 | quiet \
    | tee $LOGS/sudoku_default_seed${s}_raster.log) &
  (.venv/bin/python -m bench.sudoku $ARGS --seeds $s --tag default --arms any oar_gt_prob rar oar_max_prob oar_margin 2>&1 | quiet \
    | tee $LOGS/sudoku_default_seed${s}.log) &
done
(nice -n 10 .venv/bin/python -m bench.sudoku $ARGS --seeds 0 1 2 --tag relative --next-position relative \
  --arms raster any oar_max_prob 2>&1 | quiet | tee $LOGS/sudoku_relative.log) &
wait
