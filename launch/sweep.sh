#!/bin/bash
# Runs one of the paper's protocols as a series of ordinary runs, then tables
# them. Each run is `python -m bsf_jax.main` (resumable) followed by
# `python -m bsf_jax.evaluate`; on a cluster, replace RUN with an sbatch of
# launch/local.sh. Usage:
#   launch/sweep.sh folds   OUT INIT   # BraTS 5-fold CV (paper Table 4)
#   launch/sweep.sh fewshot OUT INIT   # 5/10/20/40% x 5 repeats (Table 9)
#   launch/sweep.sh depth   OUT        # tiny/small/big from scratch (Table 8)
#   launch/sweep.sh t1only  OUT INIT   # T1 through all stages (Table 5; INIT = a T1-only stage 2)
# Extra config overrides go in $OVERRIDES (e.g. --config.data.datalist=...);
# $DATASET picks the stage-3 dataset (brats2021, default, or brats2023).
set -euo pipefail
PROTOCOL=${1:?protocol}; OUT=${2:?output folder}; INIT=${3:-}
INIT_FLAG=${INIT:+--config.init_from=$INIT}
runs=()
run() {  # run NAME CONFIG_ARG
  local dir="$OUT/$1"
  python -m bsf_jax.main --config="configs/stage3.py:dataset=${DATASET:-brats2021},$2" --workdir="$dir" \
    $INIT_FLAG ${OVERRIDES:-}
  python -m bsf_jax.evaluate --workdir="$dir"
  runs+=("$dir")
}
case "$PROTOCOL" in
  folds)   for k in 0 1 2 3 4; do run "fold$k" "fold=$k"; done ;;
  fewshot) for f in 0.05 0.1 0.2 0.4; do for r in 0 1 2 3 4; do
             run "frac${f}_rep$r" "fraction=$f,repeat=$r"; done; done ;;
  depth)   INIT_FLAG=""; for s in tiny small big; do run "$s" "size=$s"; done ;;
  t1only)  for k in 0 1 2 3 4; do run "t1_fold$k" "modality=t1,fold=$k"; done ;;
  *) echo "unknown protocol $PROTOCOL (folds|fewshot|depth|t1only)" >&2; exit 2 ;;
esac
python -m bsf_jax.report "${runs[@]}" --csv "$OUT/$PROTOCOL.csv" | tee "$OUT/$PROTOCOL.md"
