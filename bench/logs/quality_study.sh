#!/bin/bash
# issue 22's controlled study, resumable: every finished model and (seed, sampler) result is kept and skipped on rerun.
# Waits for the tokenizer probe's first setting (1500 tokenizer steps) and uses its data, tokenizer and feature space.
cd /work/wt-study; export PYTHONPATH=/work/wt-study
export OMP_NUM_THREADS=1
W=/work/bench-runs/tok_s1500_cb256
while [ ! -f $W/common/reference.npz ]; do sleep 30; done
pkill -f tok_probe.sh; sleep 1; pkill -f "tag tok_s1500_cb1024"
COMMON="--workdir $W --tokenizer-steps 1500"
for seed in 0 1 2; do
  .venv/bin/python -m bench.quality $COMMON --tag study --next-position both --seeds $seed \
     --samplers raster rar any-order any-order-gumbel oar-gumbel oar-policy oar-policy-t0.5 oar-gt-gumbel oar-gt-policy
  .venv/bin/python -m bench.quality $COMMON --tag np-relative --next-position relative --seeds $seed --samplers any-order
done
.venv/bin/python -m bench.quality $COMMON --tag study --next-position both --seeds 0 1 2 --table-only \
     --samplers raster rar any-order any-order-gumbel oar-gumbel oar-policy oar-policy-t0.5 oar-gt-gumbel oar-gt-policy
.venv/bin/python -m bench.quality $COMMON --tag np-relative --next-position relative --seeds 0 1 2 --table-only --samplers any-order
