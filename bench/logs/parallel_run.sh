#!/bin/bash
# The parallel-decoding curve at a reduced size (bench/parallel.py): 7x7 at 1000 samples, then 14x14 on fewer
# training images and 500 samples. Progress bars are dropped from the teed logs.
cd "$(dirname "$0")/../.." || exit 1
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
quiet() { tr '\r' '\n' | grep --line-buffered -av 'it/s\]\|step/s\]\|img/s\]\|batch/s\]\|s/it\]\|s/step\]\| 0%|'; }
.venv/bin/python -m bench.parallel --grids 7 --n-samples 1000 --nll-images 200 --tag g7 2>&1 | quiet \
  | tee -a bench/logs/parallel_g7.log
.venv/bin/python -m bench.parallel --grids 14 --n-samples 500 --nll-images 100 --max-train 400 --max-test 100 \
  --tag g14 2>&1 | quiet | tee -a bench/logs/parallel_g14.log
