#!/bin/bash
# Issue 22's tokenizer-floor probes: tokenizer settings for the controlled study's data (2000 train images, 7x7
# grid), each in its own workdir, scored as bench.quality's `reconstruction` row (1000 unseen train images through
# the tokenizer, FID/KID/precision/recall in the in-domain feature space against the 10k test images) with the
# tokenizer's own MSE/PSNR/codebook usage. Resumable (a finished workdir is only re-tabulated).
# Usage: bash bench/logs/tokenizer_floor.sh [NAME ...]   (default: all probes; logs to bench/logs/tokenizer_floor.log)
cd "$(dirname "$0")/../.." || exit 1
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
R=${R:-/work/bench-runs}
declare -A PROBES=(
  [cb1024_h128_s3000]="--tokenizer-steps 3000 -S tokenizer.codebook_size=1024 -S tokenizer.hidden=128"
  [cb1024_s3000]="--tokenizer-steps 3000 -S tokenizer.codebook_size=1024"
  [cb256_h128_s3000]="--tokenizer-steps 3000 -S tokenizer.hidden=128"
)
for name in "${@:-cb1024_h128_s3000 cb1024_s3000 cb256_h128_s3000}"; do
  for n in $name; do
    echo "=== probe $n: ${PROBES[$n]}"
    .venv/bin/python -m bench.quality --table-only --seeds 0 --tag "tok_$n" --workdir "$R/tok_$n" ${PROBES[$n]} \
      | grep -a "^| \(real\|reconstruction\) "
    cat "$R/tok_$n/common/dvclive/tokenizer/metrics.json"
  done
done 2>&1 | stdbuf -oL tr '\r' '\n' | grep --line-buffered -av 'step/s\]\|it/s\]\|img/s\]\| 0%|' | tee -a bench/logs/tokenizer_floor.log
