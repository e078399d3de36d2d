#!/usr/bin/env bash
# One device call: install the carried wheels, then run bench/calibrate_gpu.sh for each "FAMILY:DEADLINE" given,
# with the settings in the environment (ALLOC, ORDER, WORKLOADS, STEPS, KEEP_WEIGHTS):
#   bench/gpu_call.sh OUT_DIR flux:300 wan:120
set -uo pipefail
out=$1; shift
[[ -d .site ]] || python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl
export PYTHONPATH=$PWD/.site:$PWD HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
for spec in "$@"; do
  family=${spec%%:*} deadline=${spec##*:}
  echo "== $family (deadline $deadline s, ALLOC=${ALLOC:-default})"
  bench/calibrate_gpu.sh "$family" "$out" "$deadline" 2>&1 | grep -v -i "warn\|torchao\|kernels" | tail -40
done
