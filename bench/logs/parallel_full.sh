#!/bin/bash
# issue 26: the quality-speed curve, 1000 samples per row, both grids (README "Parallel decoding"): bench.quality's
# tiny models with short training (tokenizer 200, classifier 500, 300 + 100 model steps; next_position both, max_prob
# orders), one process with one thread. Run at commit b1f4b02 (a frozen worktree) beside two other one-thread jobs.
# Usage: bash bench/logs/parallel_full.sh  (from anywhere; WORKDIR defaults to /tmp/oar-bench-parallel-full)
#        bash bench/logs/parallel_full.sh fewer   the OAR policy sampler below N/8 (N/16, N/32) beside raster and its
#        own N-step row, tags g{7,14}-fewer (log parallel_fewer.log): run at commit 26bd3dd on an otherwise idle
#        machine (one process, one thread), models retrained in their own WORKDIR (default /tmp/oar-bench-parallel-fewer)
cd "$(dirname "$0")/../.." || exit 1
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
quiet() { tr '\r' '\n' | grep --line-buffered -av 'it/s\]\|step/s\]\|img/s\]\|batch/s\]\|s/it\]\|s/step\]\| 0%|'; }
COMMON="--tokenizer-steps 200 --classifier-steps 500 --steps 300 --finetune-steps 100 --workdir ${WORKDIR:-/tmp/oar-bench-parallel-full} --n-samples 1000"
G7="--grids 7 --max-train 1000 --max-test 200 --nll-images 100 --tag g7 $COMMON"
G14="--grids 14 --max-train 200 --max-test 60 --nll-images 30 --repeats 3 --tag g14 $COMMON"
if [ "${1:-}" = fewer ]; then
  W="--workdir ${WORKDIR:-/tmp/oar-bench-parallel-fewer}"
  {
  .venv/bin/python -m bench.parallel $G7 $W --tag g7-fewer --samplers raster oar-policy --divisors 1 8 16
  .venv/bin/python -m bench.parallel $G14 $W --tag g14-fewer --samplers raster oar-policy --divisors 1 8 16 32
  } 2>&1 | quiet | tee bench/logs/parallel_fewer.log
  exit
fi
{
.venv/bin/python -m bench.parallel $G7
.venv/bin/python -m bench.parallel $G14 --samplers raster any-order oar-policy
.venv/bin/python -m bench.parallel $G14 --samplers oar-confidence --divisors 8 4 2 1
.venv/bin/python -m bench.parallel $G14 --table-only
} 2>&1 | quiet | tee bench/logs/parallel_full.log
