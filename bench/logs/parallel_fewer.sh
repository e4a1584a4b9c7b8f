#!/bin/bash
# issue 26: the OAR policy sampler below N/8 steps (N/16, N/32), beside raster and its own N-step row, in one run on
# an otherwise idle machine (one process, one thread; the budget sweep paused). Same recipe as parallel_full.sh.
# Usage: bash bench/logs/parallel_fewer.sh  (WORKDIR defaults to /tmp/oar-bench-parallel-fewer)
cd "$(dirname "$0")/../.." || exit 1
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
quiet() { tr '\r' '\n' | grep --line-buffered -av 'it/s\]\|step/s\]\|img/s\]\|batch/s\]\|s/it\]\|s/step\]\| 0%|'; }
COMMON="--tokenizer-steps 200 --classifier-steps 500 --steps 300 --finetune-steps 100 --workdir ${WORKDIR:-/tmp/oar-bench-parallel-fewer} --n-samples 1000"
G7="--grids 7 --max-train 1000 --max-test 200 --nll-images 100 --tag g7-fewer $COMMON"
G14="--grids 14 --max-train 200 --max-test 60 --nll-images 30 --repeats 3 --tag g14-fewer $COMMON"
{
.venv/bin/python -m bench.parallel $G7 --samplers raster oar-policy --divisors 1 8 16
.venv/bin/python -m bench.parallel $G14 --samplers raster oar-policy --divisors 1 8 16 32
} 2>&1 | quiet | tee bench/logs/parallel_fewer.log
