#!/bin/sh
# issue 23, the arms left: OAR finetuned on margin orders (3 seeds), then relative next position (raster, any-order,
# OAR on max_prob orders; 3 seeds). Resumable; one process at a time, one thread.
cd /work/bench-runs/sudoku-src
export OMP_NUM_THREADS=1 PYTHONPATH=/work/bench-runs/sudoku-src
ARGS="--board 6 --size small --steps 1500 --finetune-steps 500 --max-train 4000 --max-test 200 --n-boards 200 --workdir /work/bench-runs/sudoku"
quiet() { tr '\r' '\n' | grep --line-buffered -v "it/s\]\|batch/s\]\|img/s\]\|step\]\|s/it\]"; }
for s in 0 1 2; do
  .venv/bin/python -m bench.sudoku $ARGS --seeds $s --tag default --arms oar_margin 2>&1 | quiet | tee -a /work/bench-runs/sudoku_margin_seed$s.log
done
for s in 0 1 2; do
  .venv/bin/python -m bench.sudoku $ARGS --seeds $s --tag relative --next-position relative --arms raster any oar_max_prob 2>&1 | quiet | tee -a /work/bench-runs/sudoku_relative_seed$s.log
done
.venv/bin/python -m bench.sudoku $ARGS --seeds 0 1 2 --tag default --table-only
.venv/bin/python -m bench.sudoku $ARGS --seeds 0 1 2 --tag relative --next-position relative --table-only
