#!/usr/bin/env bash
# Runs on the GPU machine next to gpu-run.sh (same bundle, from the repository root):
#     bash gpu-bundle/gpu-profile.sh gpu-bundle OUT_DIR [precision ...]
# Where the time of the tensor-core losses goes, read with Nsight Compute (clocks left as found):
# each kernel's duration in one NT-Xent forward + backward at N = 65536, D = 256 per precision
# (default bf16 tf32), then the detailed sections (throughput, occupancy, warp stalls, memory) of
# the bf16 forward and backward kernels. Writes OUT_DIR/profile.md (the summary) and
# OUT_DIR/ncu-details.txt (the full sections).
set -uo pipefail
bundle=${1:-gpu-bundle}
out=${2:-.}
shift 2 2>/dev/null || shift $#
precisions=${*:-bf16 tf32}
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1)
report="$out/profile.md"
if [ -z "$ncu" ]; then
  echo "ncu not found: no profile" | tee "$report"
  exit 1
fi
{
  echo "# contra profile (Nsight Compute, --clock-control none)"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
  echo "- commit: $(cat "$bundle/COMMIT" 2>/dev/null || echo unknown)"
  echo "- ncu: $("$ncu" --version | tail -n 1)"
} >"$report"
for p in $precisions; do
  printf '\n## Kernel durations: NT-Xent forward + backward, N = 65536, D = 256, %s (warm-up call, then the timed one)\n\n```\n' "$p" >>"$report"
  timeout 120 "$ncu" --clock-control none --metrics gpu__time_duration.sum,launch__grid_size,launch__block_size,launch__registers_per_thread,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem,sm__warps_active.avg.pct_of_peak_sustained_active \
    --csv --page raw "$bundle/contra" ntxent-timing --device cuda --n 65536 --dim 256 --repeats 1 --precision "$p" 2>&1 | tail -n 40 >>"$report"
  printf '```\n' >>"$report"
done
printf '\n## Detailed sections of the bf16 kernels (first forward and backward launches)\n\nIn ncu-details.txt.\n' >>"$report"
timeout 240 "$ncu" --clock-control none --set detailed -k regex:infonce --launch-count 3 \
  "$bundle/contra" ntxent-timing --device cuda --n 65536 --dim 256 --repeats 1 --precision bf16 >"$out/ncu-details.txt" 2>&1
echo "profile written to $report"
