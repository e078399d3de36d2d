#!/usr/bin/env bash
# One family's strategy calibration on the GPU machine, inside one device call:
#   [ORDER='none model ...'] [WORKLOADS='768x768 ...'] [STEPS=4] [TIMEOUT=S] [CAPS='--vram-cap 16GiB --ram-cap 64GiB']
#   [KEEP_WEIGHTS=1] bench/calibrate_gpu.sh FAMILY OUT_DIR DEADLINE_SECONDS
# Builds random full-size weights (bench/random_pipeline.py --save), then runs every plan of the
# family (bench/calibration_plans.json), most informative first, at three workloads per process
# until the deadline. The rows go to OUT_DIR/strategies-FAMILY.jsonl. KEEP_WEIGHTS=1 leaves the
# weights in /tmp/w for the next call on a machine that stays warm.
set -euo pipefail
family=$1 out=$2 deadline=$3
case $family in
  sdxl) build=sdxl-base dtype=float16 timeout=150
        workloads=(768x768 1024x1024 1536x1536) ;;
  flux) build=flux1-dev dtype=bfloat16 timeout=240
        workloads=(768x768 1024x1024 1280x1280) ;;
  wan)  build=wan2.1-t2v-1.3b dtype=bfloat16 timeout=180
        workloads=(480x832x17 480x832x33 480x832x49) ;;
  chroma) build=chroma dtype=bfloat16 timeout=240 workloads=(1024x1024) ;;
  ltx)  build=ltx-video dtype=bfloat16 timeout=180 workloads=(512x768x49) ;;
  cogvideox) build=cogvideox-5b dtype=bfloat16 timeout=240 workloads=(480x720x49) ;;
  wan22-5b) build=wan2.2-ti2v-5b dtype=bfloat16 timeout=240 workloads=(480x832x33) ;;
  *) echo "family: sdxl, flux, wan, chroma, ltx, cogvideox or wan22-5b" >&2; exit 2 ;;
esac
# ALLOC=expandable runs every plan with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, ALLOC=default with
# expandable_segments:False (the patched scripts' setdefault keeps either); unset, the plans' own setting runs
# (rows say which in allocator_ran)
[[ ${ALLOC:-} == expandable ]] && export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
[[ ${ALLOC:-} == default ]] && export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False
# ORDER / WORKLOADS in the environment override the plan order and the workloads
timeout=${TIMEOUT:-$timeout}
[[ -n ${WORKLOADS:-} ]] && read -ra workloads <<<"$WORKLOADS"
read -ra caps <<<"${CAPS:-}"
default_order=(none model fp8 nf4 ao_int8 int8 sequential group_block_stream_low_ram fp8_model nf4_model ao_fp8
       group_leaf_stream vae_tiling model_vae_tiling group_block_1 ao_int8_model group_block_4 group_leaf
       group_block_vae_resident fp8_group compile)
read -ra order <<<"${ORDER:-${default_order[*]}}"
args=()
for w in "${workloads[@]}"; do args+=(--workload "$w"); done
python3 "$(dirname "$0")/calibrate_strategies.py" --build "$build" --weights "/tmp/w/$family" --dtype "$dtype" \
  "${args[@]}" --steps "${STEPS:-4}" --timeout "$timeout" --deadline "$deadline" --only "${order[@]}" \
  "${caps[@]}" --out "$out/strategies-$family.jsonl"
[[ -n ${KEEP_WEIGHTS:-} ]] || rm -rf "/tmp/w/$family"
