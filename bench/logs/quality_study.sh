#!/bin/bash
# Issue 22's controlled study (README "The controlled study"), resumable: every finished model and (seed, sampler)
# result is kept under $W and skipped on rerun. Run on commit b69aded with OMP_NUM_THREADS=1 in the background.
# Usage: bash bench/logs/quality_study.sh        (W defaults to /tmp/oar-study; about 1 h per seed on 2 cores)
cd "$(dirname "$0")/../.." || exit 1
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
W=${W:-/tmp/oar-study}
COMMON="--workdir $W --tokenizer-steps 1500"
SAMPLERS="raster rar any-order any-order-gumbel oar-gumbel oar-policy oar-policy-t0.5 oar-gt-gumbel oar-gt-policy"
for seed in 0 1 2; do
  .venv/bin/python -m bench.quality $COMMON --tag study --next-position both --seeds $seed --samplers $SAMPLERS
  .venv/bin/python -m bench.quality $COMMON --tag np-relative --next-position relative --seeds $seed --samplers any-order
done 2>&1 | tee -a bench/logs/quality_study.log
.venv/bin/python -m bench.quality $COMMON --tag study --next-position both --seeds 0 1 2 --table-only --samplers $SAMPLERS
.venv/bin/python -m bench.quality $COMMON --tag np-relative --next-position relative --seeds 0 1 2 --table-only \
  --samplers any-order
