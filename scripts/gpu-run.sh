#!/usr/bin/env bash
# Runs on the GPU machine (no cargo needed), from the repository root (for tests/fixtures):
#     bash gpu-bundle/gpu-run.sh gpu-bundle report.md [phase ...]
# Writes one markdown report: GPU, driver, date, pass/fail of every kernel test and fixture case
# on cuda:0, compute-sanitizer memcheck / racecheck results, and timings of the public calls
# next to the kernel-only sequences.
#
# Phases, in this order of priority (default: all): check (kernel tests, fixtures, trainer),
# tensor (the tensor-core figures, bf16 and tf32: TFLOP/s, ratio to PyTorch, largest N), sanitize
# (compute-sanitizer), bench (timings and the full benchmark table). Knobs: CONTRA_GPU_MIN_TIME
# (seconds of timed calls per tensor-core case, default 0.5), CONTRA_GPU_LARGEST_N (default
# 1048576), CONTRA_GPU_SANITIZE (the binaries compute-sanitizer runs, NAME or NAME:FILTER, default every
# kernel test),
# CONTRA_GPU_PRECISIONS (the tensor-core bench's precisions, default "bf16 tf32"). The whole run keeps to
# CONTRA_GPU_BUDGET_S seconds (default 540, under the device tool's 600 s per call): each step's
# limit is cut to what is left, and a step with no time left is reported as skipped. Split a run
# over several calls by naming phases.
set -uo pipefail
bundle=${1:-gpu-bundle}
report=${2:-gpu-report.md}
shift 2 2>/dev/null || shift $#
phases=${*:-check tensor sanitize bench}
deadline=$((SECONDS + ${CONTRA_GPU_BUDGET_S:-540}))
overall=0
wants() { [[ " $phases " == *" $1 "* ]]; }
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
# cuBLAS for the encoder's GEMMs: cudarc loads libcublas at run time; on a machine whose only
# CUDA libraries are PyTorch's pip wheels, put their folder on the library path.
for py in python3 python; do
  dir=$("$py" - 2>/dev/null <<'PY'
import glob, os, importlib.util
spec = importlib.util.find_spec("nvidia")
roots = list(spec.submodule_search_locations) if spec else []
hits = [p for r in roots for p in glob.glob(os.path.join(r, "**", "libcublas.so*"), recursive=True)]
print(os.path.dirname(hits[0]) if hits else "")
PY
)
  if [ -n "$dir" ]; then export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; break; fi
done

section() { printf '\n## %s\n\n' "$1" >>"$report"; }
# run NAME TIMEOUT CMD...: runs a step, appends its output in a code block and its verdict.
run() {
  local name=$1 limit=$2; shift 2
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 10 ]; then
    printf '\n**%s: SKIPPED** (the time budget is spent)\n' "$name" >>"$report"
    echo "$name: SKIPPED"; overall=1; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local log; log=$(mktemp)
  local start=$SECONDS
  timeout "$limit" "$@" >"$log" 2>&1
  local rc=$?
  { echo '```'; tail -n 120 "$log"; echo '```'; } >>"$report"
  if [ $rc -eq 0 ]; then verdict=PASS; else verdict="FAIL (exit $rc)"; overall=1; fi
  printf '\n**%s: %s** (%ss)\n' "$name" "$verdict" $((SECONDS - start)) >>"$report"
  echo "$name: $verdict"
}

{
  echo "# contra GPU check"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader 2>/dev/null)"
  echo "- driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null)"
  echo "- host: $(uname -r), $(nproc) cores"
  echo "- commit: $(cat "$bundle/COMMIT" 2>/dev/null || echo unknown)"
  first_lib_dir=${LD_LIBRARY_PATH:-}
  echo "- libcublas: $(ls "${first_lib_dir%%:*}"/libcublas.so* 2>/dev/null | head -n 1 || echo 'system default')"
  echo "- phases: $phases (time budget ${CONTRA_GPU_BUDGET_S:-540} s)"
} >"$report"

# Every kernel test binary: f32 softmax losses, elementwise ops, triplet mining, bf16/f16, tf32,
# and the encoder's layers (GEMM through cuBLAS, bias, ReLU, BatchNorm).
kernel_tests="kernels kernels_half kernels_tf32 kernels_elementwise kernels_triplet nn_device nn_resident transfers"
# The sanitizer's list, tensor-core binaries first (CONTRA_GPU_SANITIZE narrows it).
sanitize_tests=${CONTRA_GPU_SANITIZE:-$kernel_tests}
if wants check; then
  section "Kernel tests: every kernel on Interp and cuda:0 against the CPU reference"
  for t in $kernel_tests; do
    run "$t" 180 "$bundle/$t" --test-threads=2 --nocapture
  done
  section "Fixtures on cuda:0"
  run "fixtures on cuda:0" 60 env CONTRA_DEVICE=cuda "$bundle/fixtures" --nocapture
  section "Trainer: the first steps of SimCLR, MoCo v2 and SupCon (encoder passes and losses) on cuda:0 against the CPU, same seed"
  run "train-check on cuda:0" 120 "$bundle/contra" train-check --device cuda --steps 5
fi
if wants tensor; then
  section "Tensor cores: NT-Xent forward + backward through the public API (on the device, loss read), N = 65536, D = 256 (TFLOP/s over 8 N^2 D): bf16, tf32 (f32 inputs), and the exact f32 kernels"
  for precision in bf16 tf32 f32; do
    run "NT-Xent N=65536 D=256 $precision" 120 "$bundle/contra" ntxent-timing --device cuda --n 65536 --dim 256 --repeats 5 --precision "$precision"
  done
  section "Key ranges (docs/kernels.md, session 15): NT-Xent bf16 forward + backward, D = 256, with the sweeps cut by the wave model and whole (CONTRA_KEY_RANGES=off)"
  for n in 4096 16384 65536; do
    run "NT-Xent N=$n bf16, key ranges" 60 "$bundle/contra" ntxent-timing --device cuda --n "$n" --dim 256 --repeats 5 --precision bf16
    run "NT-Xent N=$n bf16, whole sweeps" 60 env CONTRA_KEY_RANGES=off "$bundle/contra" ntxent-timing --device cuda --n "$n" --dim 256 --repeats 5 --precision bf16
  done
  section "Hopper's wgmma kernels (docs/kernels.md, sessions 16 and 17): NT-Xent forward + backward, D = 256, bf16 (wgmma forward and backward) and tf32 (wgmma forward), with the sm_90a kernels and without them (CONTRA_WGMMA=off; only a compute capability 9.0 GPU runs them)"
  for precision in bf16 tf32; do
    for n in 16384 65536; do
      run "NT-Xent N=$n $precision, wgmma" 60 "$bundle/contra" ntxent-timing --device cuda --n "$n" --dim 256 --repeats 5 --precision "$precision"
      run "NT-Xent N=$n $precision, mma.sync" 60 env CONTRA_WGMMA=off "$bundle/contra" ntxent-timing --device cuda --n "$n" --dim 256 --repeats 5 --precision "$precision"
    done
  done
  section "At the tensor-core shapes (same card): NT-Xent, CLIP, SupCon and MoCo forward + backward, contra (public API) vs kernels (kernel-only) vs PyTorch eager (tf32: allow_tf32)"
  for precision in ${CONTRA_GPU_PRECISIONS:-bf16 tf32}; do
    run "bench tensor cores $precision" 240 "$bundle/contra" bench --device cuda --filter "$precision" --min-time "${CONTRA_GPU_MIN_TIME:-0.5}" --json "${report%.md}-bench-$precision.json"
  done
  section "Tensor cores: the largest N that runs (D = 256, doubling from 65536 up to ${CONTRA_GPU_LARGEST_N:-1048576})"
  run "largest N" 240 "$bundle/contra" ntxent-timing --device cuda --n 65536 --dim 256 --repeats 1 --largest "${CONTRA_GPU_LARGEST_N:-1048576}"
fi
if wants sanitize; then
  if [ -n "$sanitizer" ]; then
    for tool in memcheck racecheck; do
      section "compute-sanitizer $tool over the kernel tests"
      for entry in $sanitize_tests; do
        # NAME or NAME:FILTER (only the tests whose name contains FILTER).
        t=${entry%%:*} filter=
        [ "$entry" != "$t" ] && filter=${entry#*:}
        run "$tool $entry" 180 "$sanitizer" --tool "$tool" --error-exitcode 1 "$bundle/$t" --test-threads=1 $filter
      done
    done
  else
    echo "compute-sanitizer not found: skipped" >>"$report"; overall=1
  fi
fi
if wants bench; then
  section "Benchmark table on the GPU: contra (public API on device-resident inputs) vs kernels (kernel-only) vs the unfused baseline vs PyTorch eager"
  run "contra bench --device cuda --quick" 420 "$bundle/contra" bench --device cuda --quick --json "${report%.md}-bench.json"
fi
section "Verdict"
if [ $overall -eq 0 ]; then echo "ALL PASS" >>"$report"; else echo "SOME STEPS FAILED" >>"$report"; fi
echo "report written to $report"
exit $overall
