#!/bin/bash
# One host, all its GPUs (or the CPU), one process: no jax.distributed needed.
#   launch/local.sh configs/stage2.py:dataset=brats2021 runs/s2 --config.init_from=runs/s1
set -euo pipefail
CONFIG=${1:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
WORKDIR=${2:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
shift 2
exec python -m bsf_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
