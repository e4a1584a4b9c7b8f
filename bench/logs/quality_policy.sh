#!/bin/bash
# issue 22 item 3: the policy head without interference, seed 0 of the study's setting, reusing the study's models
# and orders (--baselines-from study): a shared head at weight 0.3, an own head (MLP behind a stop-gradient), no
# head at all (content only). The study's `oar` is the shared head at weight 1.0.
cd "$(dirname "$0")/../.." || exit 1; export PYTHONPATH=$PWD OMP_NUM_THREADS=1
W=${W:-/work/bench-runs/tok_s1500_cb256}  # the study's workdir
COMMON="--workdir $W --tokenizer-steps 1500 --next-position both --seeds 0 --baselines-from study"
quiet() { tr '\r' '\n' | grep --line-buffered -av 'it/s\]\|s/it\]\|img/s\]\|batch/s\]\| 0%|'; }
{
.venv/bin/python -m bench.quality $COMMON --tag policy-own --policy-head own --samplers oar-gumbel oar-policy oar-policy-t0.5
.venv/bin/python -m bench.quality $COMMON --tag policy-w0.3 --policy-weight 0.3 --samplers oar-gumbel oar-policy oar-policy-t0.5
.venv/bin/python -m bench.quality $COMMON --tag policy-w0 --policy-weight 0 --samplers oar-gumbel
} 2>&1 | quiet
