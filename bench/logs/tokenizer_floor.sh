#!/bin/bash
# Issue 22's tokenizer-floor probes: tokenizer settings for the controlled study's data (2000 train images, 7x7
# grid), each in its own workdir, scored as bench.quality's `reconstruction` row (1000 unseen train images through
# the tokenizer, FID/KID/precision/recall in the in-domain feature space against the 10k test images) with the
# tokenizer's own MSE/PSNR/codebook usage; then raster (and the any-order model) trained on the tokens of the two
# hidden-128 probes with the study's 1x recipe, seed 0 (tag floor-1x), for the floor-to-raster ratio.
# Resumable: a finished tokenizer, model or result is reused. Run at commit 26bd3dd, one process with
# OMP_NUM_THREADS=1 beside one or two other one-thread jobs.
# Usage: bash bench/logs/tokenizer_floor.sh      (R defaults to /tmp/oar-tokenizer-floor; about 20 min per probe)
cd "$(dirname "$0")/../.." || exit 1
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
R=${R:-/tmp/oar-tokenizer-floor}
declare -A PROBES=(
  [cb1024_h128_s3000]="--tokenizer-steps 3000 -S tokenizer.codebook_size=1024 -S tokenizer.hidden=128"
  [cb1024_s3000]="--tokenizer-steps 3000 -S tokenizer.codebook_size=1024"
  [cb256_h128_s3000]="--tokenizer-steps 3000 -S tokenizer.hidden=128"
)
declare -A MODELS=([cb1024_h128_s3000]="raster any-order" [cb256_h128_s3000]="raster")
{
for n in cb1024_h128_s3000 cb1024_s3000 cb256_h128_s3000; do
  echo "=== probe $n: ${PROBES[$n]}"
  .venv/bin/python -m bench.quality --table-only --seeds 0 --tag "tok_$n" --workdir "$R/tok_$n" ${PROBES[$n]} \
    | grep -a "^| \(real\|reconstruction\) "
  cat "$R/tok_$n/common/dvclive/tokenizer/metrics.json"
done
for n in cb1024_h128_s3000 cb256_h128_s3000; do
  echo "=== models on probe $n's tokens: ${MODELS[$n]}"
  .venv/bin/python -m bench.quality --workdir "$R/tok_$n" ${PROBES[$n]} --tag floor-1x --next-position both --seeds 0 \
    --samplers ${MODELS[$n]} | grep -a "^| "
done
} 2>&1 | stdbuf -oL tr '\r' '\n' | grep --line-buffered -avE '(it|step|img|batch)/s[],]|s/(it|step)[],]|^ *$' \
  | tee -a bench/logs/tokenizer_floor.log
