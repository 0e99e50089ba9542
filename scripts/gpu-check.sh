#!/usr/bin/env bash
# Builds everything the GPU check needs on a machine with nvcc and no GPU, into gpu-bundle/:
# the release test binaries (kernels, kernels_elementwise, kernels_triplet, kernels_half,
# kernels_tf32, nn_device, nn_resident, transfers, fixtures) and the contra binary, all with --features cuda,
# plus scripts/gpu-run.sh and scripts/gpu-profile.sh. Then, on the GPU machine, from the repository root:
#     bash gpu-bundle/gpu-run.sh gpu-bundle report.md
# runs every kernel test and the fixtures on cuda:0, compute-sanitizer memcheck and racecheck
# over the kernel tests, the public calls timed next to the kernel-only sequences, and writes
# one markdown report.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
bundle=gpu-bundle
rm -rf "$bundle" && mkdir -p "$bundle"

cargo build --release --features cuda --bin contra
cp "$target/release/contra" "$bundle/contra"
# The test binaries: cargo prints their paths as JSON.
cargo test --release --features cuda --no-run --test kernels --test kernels_elementwise --test kernels_triplet --test kernels_half --test kernels_tf32 --test nn_device --test nn_resident --test transfers --test fixtures --message-format=json \
  | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | while read -r exe; do
    name=$(basename "$exe" | sed 's/-[0-9a-f]*$//')
    cp "$exe" "$bundle/$name"
  done
strip --strip-debug "$bundle"/* 2>/dev/null || true
cp scripts/gpu-run.sh scripts/gpu-profile.sh "$bundle/"
# The GPU machine gets a copy of the tree without .git: record what was built.
git describe --always --dirty >"$bundle/COMMIT" 2>/dev/null || echo unknown >"$bundle/COMMIT"
ls -la "$bundle"
echo "bundle ready: on the GPU machine run  bash $bundle/gpu-run.sh $bundle report.md"
