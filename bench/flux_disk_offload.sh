#!/usr/bin/env bash
# Flux.1-dev's 8 GiB / 16 GiB pick (disk offload) under `--vram-cap 8GiB --ram-cap 16GiB`:
#   [CAPS="--vram-cap 8GiB"] bash bench/flux_disk_offload.sh OUT_DIR
# The machine's 64 GB disk holds the 34 GB of weights or the 31 GiB of group files, not both. The
# weights go on the disk, as on a user's machine (their mapped pages are file pages, which the cap
# leaves out), and the group files to /dev/shm (the trial's scratch folder, TMPDIR), whose pages the
# process only maps while it reads a group back. First, where pinned host memory is accounted.
set -uo pipefail
out=$1
python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl
export PYTHONPATH=$PWD/.site:$PWD HF_HUB_OFFLINE=1 ALLOC=expandable
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
{ df -B1G / /tmp /dev/shm; free -g; } 2>&1 | tee "$out/disk.txt"
python3 - <<'PY' 2>&1 | tee "$out/pinned-accounting.txt"
import torch
def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith(("VmRSS", "Rss")))
    return {k: int(v.split()[0]) // 1024 for k, v in fields.items()}  # MiB
torch.empty(1, pin_memory=True)  # CUDA and the host allocator up
before = status()
pinned = torch.ones(2 * 2**30, dtype=torch.uint8, pin_memory=True)
after = status()
plain = torch.ones(2 * 2**30, dtype=torch.uint8)
last = status()
print(torch.__version__, torch.version.cuda, "MiB of /proc/self/status")
print("2 GiB pinned:   ", {k: after[k] - before[k] for k in before})
print("2 GiB pageable: ", {k: last[k] - after[k] for k in after})
PY
disk=$(df --output=avail -B1G /tmp | tail -1 | tr -d ' ')
shm=$(df --output=avail -B1G /dev/shm | tail -1 | tr -d ' ')
if [ "${disk:-0}" -lt 38 ] || [ "${shm:-0}" -lt 36 ]; then
  echo "need 38 GB on /tmp and 36 GB in /dev/shm: $disk and $shm" | tee -a "$out/disk.txt"; exit 3
fi
mkdir -p /dev/shm/scratch
# every second: each python process's anonymous, file-backed and shared resident pages (kB)
( while sleep 1; do for f in /proc/[0-9]*/status; do
    awk -v t="$(date +%s)" '/^Name:/{n=$2} /^Pid:/{p=$2} /^RssAnon:/{a=$2} /^RssFile:/{f=$2} /^RssShmem:/{s=$2}
      END{if (n ~ /python/ && a+f+s > 1048576) print t, p, a, f, s}' "$f" 2>/dev/null
  done; done >> "$out/rss-split.txt" ) &
sampler=$!
TMPDIR=/dev/shm/scratch TIMEOUT=440 ORDER='pick_disk_small' WORKLOADS=1024x1024 STEPS=4 \
  CAPS=${CAPS:-'--vram-cap 8GiB --ram-cap 16GiB'} \
  bench/calibrate_gpu.sh flux "$out" 480 2>&1 | grep -v -i "warn\|torchao\|kernels" | tail -25
kill $sampler
df -B1G /tmp /dev/shm | tee -a "$out/disk.txt"
echo "all done at $(( $(date +%s) - start )) s"
