#!/bin/bash
# The parallel-decoding curve at a reduced size (bench/parallel.py), both grids at once (the 2 cores were shared
# with other jobs all along): smaller training (tokenizer 200, classifier 500, 300 + 100 model steps, bench.quality's
# "tiny" models), 500 samples per 7x7 row and 300 per 14x14 row; at 14x14 the confidence sampler (N(N+1)/2
# candidate rows per image at one token per step) runs last, fewest steps first. Progress bars are dropped.
cd "$(dirname "$0")/../.." || exit 1
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
quiet() { tr '\r' '\n' | grep --line-buffered -av 'it/s\]\|step/s\]\|img/s\]\|batch/s\]\|s/it\]\|s/step\]\| 0%|'; }
COMMON="--tokenizer-steps 200 --classifier-steps 500 --steps 300 --finetune-steps 100"
G7="--grids 7 --max-train 1000 --max-test 200 --n-samples 500 --nll-images 100 --tag g7 $COMMON"
G14="--grids 14 --max-train 200 --max-test 60 --n-samples 300 --nll-images 30 --repeats 3 --tag g14 $COMMON"
.venv/bin/python -m bench.parallel $G7 2>&1 | quiet | tee -a bench/logs/parallel_g7.log &
( .venv/bin/python -m bench.parallel $G14 --samplers raster any-order oar-policy
  .venv/bin/python -m bench.parallel $G14 --samplers oar-confidence --divisors 8 4 2 1
  .venv/bin/python -m bench.parallel $G14 --table-only ) 2>&1 | quiet | tee -a bench/logs/parallel_g14.log
wait
