#!/usr/bin/env bash
# Flux.1-dev's 8 GiB / 16 GiB pick (disk offload) with the weights in RAM-backed storage,
# so that they and the 31 GiB of group files fit the machine's disk:
#   [CAPS="--vram-cap 8GiB --ram-cap 16GiB"] bash bench/flux_disk_offload.sh OUT_DIR
set -uo pipefail
out=$1
python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl
export PYTHONPATH=$PWD/.site:$PWD HF_HUB_OFFLINE=1 ALLOC=expandable
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
{ df -B1G / /tmp /dev/shm; id -u; free -g; } 2>&1 | tee "$out/disk.txt"
shm=$(df --output=avail -B1G /dev/shm | tail -1 | tr -d ' ')
mkdir -p /tmp/w
if [ "${shm:-0}" -ge 40 ]; then
  mkdir -p /dev/shm/flux && ln -sfn /dev/shm/flux /tmp/w/flux && where=/dev/shm
elif [ "$(id -u)" = 0 ] && mkdir -p /mnt/w && mount -t tmpfs -o size=40G tmpfs /mnt/w; then
  mkdir -p /mnt/w/flux && ln -sfn /mnt/w/flux /tmp/w/flux && where=tmpfs
else
  echo "no room for the weights beside the group files" | tee -a "$out/disk.txt"; exit 3
fi
echo "weights in $where" | tee -a "$out/disk.txt"
# every second: each python process's anonymous, file-backed and shared resident pages (kB)
( while sleep 1; do for f in /proc/[0-9]*/status; do
    awk -v t="$(date +%s)" '/^Name:/{n=$2} /^Pid:/{p=$2} /^RssAnon:/{a=$2} /^RssFile:/{f=$2} /^RssShmem:/{s=$2}
      END{if (n ~ /python/ && a+f+s > 1048576) print t, p, a, f, s}' "$f" 2>/dev/null
  done; done >> "$out/rss-split.txt" ) &
sampler=$!
TIMEOUT=480 ORDER='pick_disk_small' WORKLOADS=1024x1024 STEPS=4 CAPS=${CAPS:-'--vram-cap 8GiB'} \
  bench/calibrate_gpu.sh flux "$out" 520 2>&1 | grep -v -i "warn\|torchao\|kernels" | tail -25
kill $sampler
df -B1G /tmp | tee -a "$out/disk.txt"
echo "all done at $(( $(date +%s) - start )) s"
