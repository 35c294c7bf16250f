#!/usr/bin/env bash
# Build everything the GPU machine needs into gpu-bundle/ (git-ignored), here, on the GPU-less box:
#   - the test executables that exercise a GPU (GPU_TESTS below: the CUDA tests written once per
#     device with test_device!, the NVRTC compile test, and the PyTorch parity tests, which also
#     run the CUDA backend when a GPU is present), named test-<name>; the CPU-only tests stay
#     here (CI runs them), which keeps the bundle under the transfer limit;
#   - the criterion bench executable(s) from `cargo bench --no-run`, named bench-<name>;
#   - the release `bert-adapters` binary.
# All stripped, then packed into gpu-bundle/executables.tar.gz (device-check.sh unpacks it). Release, not debug: a debug test binary is ~55 MB, and what travels to the GPU
# machine must stay well under 64 MiB in total. The machine then only needs scripts/device-check.sh.
#
# It also records the crate root these binaries were compiled in (gpu-bundle/MANIFEST_DIR):
# tests that find fixtures through env!("CARGO_MANIFEST_DIR") look there, and device-check.sh
# links that path to the repository copy on the GPU machine when it differs.
#
# Usage: bash scripts/build-gpu-bundle.sh        (then: scripts/device-check.sh on the GPU machine)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BUNDLE=gpu-bundle
LIMIT_MIB=48   # fail early: the transfer limit is 64 MiB and the tree itself needs room too
GPU_TESTS=(layernorm gpu_runtime gemm cuda_backend cuda_attention cuda_attention_backward cuda_adapter cuda_elementwise cuda_backward_ln cuda_loss cuda_training cuda_dropout cuda_graph cuda_frozen_work cuda_adapter_dropout cuda_layernorm_bf16 cuda_bf16_attention cuda_bf16_adapter cuda_bf16_gemm cuda_bf16_elementwise cuda_bf16_model nvrtc_compile parity adapters grad_parity)

for tool in jq strip cargo; do
    command -v "$tool" >/dev/null || { echo "error: $tool is required" >&2; exit 1; }
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "building release test executables ..." >&2
cargo test --release --no-run --message-format=json "${GPU_TESTS[@]/#/--test=}" >"$tmp/test.json"
echo "building release bench executables ..." >&2
cargo bench --no-run --message-format=json --bench kernels >"$tmp/bench.json"
echo "building release binary ..." >&2
cargo build --release --bin bert-adapters --message-format=json >"$tmp/bin.json"

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE"

# One line per executable artifact: <bundle name> <path>.
jq -r '
  select(.reason == "compiler-artifact" and .executable != null)
  | (.target.kind[0]) as $kind
  | (if .profile.test then
       (if $kind == "test" then "test-" + .target.name
        elif $kind == "bench" then "bench-" + .target.name
        elif $kind == "lib" then "unit-lib-" + .target.name
        else "unit-" + $kind + "-" + .target.name end)
     elif $kind == "bench" then "bench-" + .target.name
     elif $kind == "bin" then .target.name
     else empty end) as $name
  | "\($name) \(.executable)"' "$tmp/test.json" "$tmp/bench.json" "$tmp/bin.json" | sort -u >"$tmp/list"

mkdir -p "$tmp/exe"
while read -r name path; do
    strip -o "$tmp/exe/$name" "$path"
    chmod +x "$tmp/exe/$name"
done <"$tmp/list"
# One gzip'd tarball (about 2.5x smaller than the executables, and gzip is on every machine):
# scripts/device-check.sh unpacks it into gpu-bundle/ before running anything.
tar -C "$tmp/exe" -czf "$BUNDLE/executables.tar.gz" .

pwd -P >"$BUNDLE/MANIFEST_DIR"
{
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git rev-parse --short HEAD 2>/dev/null || echo 'no commit')"
    echo "dirty files: $(git status --porcelain 2>/dev/null | wc -l)"
    rustc --version
} >"$BUNDLE/BUILD_INFO"

ls -l "$BUNDLE" >&2
bytes=$(du -cb "$BUNDLE"/* | tail -1 | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "gpu-bundle: $(wc -l <"$tmp/list") executables ($(du -cb "$tmp"/exe/* | tail -1 | cut -f1 | awk '{ printf "%.1f", $1 / 1048576 }') MiB unpacked), $mib MiB in total"
if [ "$bytes" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "error: gpu-bundle is over ${LIMIT_MIB} MiB; it must fit the 64 MiB transfer limit" >&2
    exit 1
fi
