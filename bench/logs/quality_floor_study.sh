#!/bin/bash
# Issue 22's controlled study in the setting whose tokenizer floor no longer binds (README "The controlled study"):
# the codebook-1024 / hidden-128 tokenizer (3000 steps; reconstruction FID 0.56, 0.40 of raster's 1.41 in
# bench/logs/tokenizer_floor.md), the pipeline's default OAR recipe (max_prob orders, policy_weight 0.3, shared head,
# next_position both), 3 seeds at the 1x budget. The shared tokenizer / feature space is made first, then the three
# seeds run side by side, one thread each, on the 2 cores. Resumable: every finished model and (seed, sampler)
# result under $W is reused. Usage: bash bench/logs/quality_floor_study.sh    (W defaults to /tmp/oar-floor-study)
cd "$(dirname "$0")/../.." || exit 1
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
W=${W:-/tmp/oar-floor-study}
COMMON=(--workdir "$W" --tokenizer-steps 3000 -S tokenizer.codebook_size=1024 -S tokenizer.hidden=128
        --tag floor-study --next-position both --policy-weight 0.3)
SAMPLERS=(raster rar any-order any-order-gumbel oar-gumbel oar-policy oar-policy-t0.5 oar-gt-gumbel oar-gt-policy)
filter() { stdbuf -oL tr '\r' '\n' | grep --line-buffered -avE '(it|step|img|batch)/s[],]|s/(it|step)[],]|^ *$'; }
{
  echo "=== $(date -u +%FT%TZ) common: tokenizer, feature space, reference rows"
  OMP_NUM_THREADS=2 .venv/bin/python -m bench.quality "${COMMON[@]}" --seeds 0 --samplers
  for seed in 0 1 2; do
    .venv/bin/python -m bench.quality "${COMMON[@]}" --seeds $seed --samplers "${SAMPLERS[@]}" \
      2>&1 | sed -u "s/^/[seed $seed] /" &
  done
  wait
  echo "=== $(date -u +%FT%TZ) table"
  .venv/bin/python -m bench.quality "${COMMON[@]}" --seeds 0 1 2 --table-only --samplers "${SAMPLERS[@]}"
} 2>&1 | filter | tee -a bench/logs/quality_floor_study.log
