#!/usr/bin/env bash
# Runs on the GPU machine next to gpu-run.sh (same bundle, from the repository root):
#     bash gpu-bundle/gpu-profile.sh gpu-bundle OUT_DIR [precision ...]
# Where the time of the tensor-core losses goes, read with Nsight Compute (clocks left as found):
# each kernel's duration in one NT-Xent forward + backward at N = 65536, D = 256 per precision
# (default bf16 tf32), then the sections (throughput, occupancy, scheduler and warp stalls,
# memory, instruction mix) of the bf16 NT-Xent forward and backward kernels and of CLIP's bf16
# backward. Writes OUT_DIR/profile.md (the durations) and OUT_DIR/ncu-ntxent.txt,
# OUT_DIR/ncu-clip.txt (the sections).
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
sections="--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy --section SchedulerStats --section WarpStateStats --section InstructionStats --section SourceCounters"
# ncu's raw CSV on stdin: one table row per kernel launch.
summarize() {
  python3 -c '
import csv, sys
rows = [r for r in csv.reader(l for l in sys.stdin if l.startswith("\""))]
if len(rows) < 3:
    print("(no kernel rows)"); sys.exit()
head, rows = rows[0], rows[2:]
cols = [("Kernel Name", "kernel"), ("gpu__time_duration.sum", "time (ns)"), ("launch__grid_size", "blocks"),
        ("launch__registers_per_thread", "registers"), ("launch__occupancy_limit_registers", "blocks/SM (registers)"),
        ("launch__occupancy_limit_shared_mem", "blocks/SM (shared)"), ("sm__warps_active.avg.pct_of_peak_sustained_active", "warps active %")]
idx = [(head.index(c), name) for c, name in cols if c in head]
print("| " + " | ".join(n for _, n in idx) + " |")
print("|" + "---|" * len(idx))
for r in rows:
    print("| " + " | ".join(r[i] for i, _ in idx) + " |")
'
}
{
  echo "# contra profile (Nsight Compute, --clock-control none)"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
  echo "- commit: $(cat "$bundle/COMMIT" 2>/dev/null || echo unknown)"
  echo "- ncu: $("$ncu" --version | tail -n 1)"
} >"$report"
timing() { echo "$bundle/contra ntxent-timing --device cuda --n 65536 --dim 256 --repeats 1 --precision $1"; }
for p in $precisions; do
  printf '\n## Kernel durations: NT-Xent forward + backward, N = 65536, D = 256, %s (warm-up call, then the timed one)\n\n' "$p" >>"$report"
  # shellcheck disable=SC2046
  timeout 60 "$ncu" --clock-control none --csv --page raw \
    --metrics gpu__time_duration.sum,launch__grid_size,launch__registers_per_thread,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem,sm__warps_active.avg.pct_of_peak_sustained_active \
    $(timing "$p") 2>&1 | summarize >>"$report"
done
# shellcheck disable=SC2086,SC2046
timeout 75 "$ncu" --clock-control none $sections -k regex:infonce_ --launch-count 3 $(timing bf16) >"$out/ncu-ntxent.txt" 2>&1
# shellcheck disable=SC2086
timeout 75 "$ncu" --clock-control none $sections -k regex:infonce_bwd --launch-count 1 \
  "$bundle/contra" bench --device cuda --filter "clip fwd+bwd N=65536 D=256 bf16" --no-torch --no-naive --in-process --min-time 0 \
  >"$out/ncu-clip.txt" 2>&1
printf '\nSections: ncu-ntxent.txt (bf16 NT-Xent forward, finish, backward), ncu-clip.txt (bf16 CLIP backward).\n' >>"$report"
echo "profile written to $report"
