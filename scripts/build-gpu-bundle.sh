#!/usr/bin/env bash
# Build everything the GPU machine needs into gpu-bundle/ (git-ignored), here, on the GPU-less box:
#   - the test executables that exercise a GPU (GPU_TESTS below: the CUDA tests written once per
#     device with test_device!, the NVRTC compile test, and the PyTorch parity tests, which also
#     run the CUDA backend when a GPU is present), named test-<name>; the CPU-only tests stay
#     here (CI runs them), which keeps the bundle under the transfer limit;
#   - the criterion bench executables from `cargo bench --no-run` (benches/kernels.rs and
#     benches/cuda.rs), named bench-<name>;
#   - the release `bert-adapters` binary;
#   - gpu-bundle/wheels/: the Python wheels tools/bench_torch.py needs that the GPU machine's image
#     lacks or has in a version adapters 1.3.0 cannot use (BENCH_WHEELS below: adapters 1.3.0,
#     transformers 4.57.6, and the huggingface_hub and tokenizers versions transformers 4.57.6
#     accepts; the image has transformers 5.x, huggingface_hub 1.x, tokenizers 0.23.2 and no
#     adapters, per the device library's KINDS.md), downloaded with `pip download --no-deps` for
#     CPython 3.12 on x86-64 Linux. device-check.sh installs them into a temporary --target.
#     WHEELS=0 leaves them out (the torch comparison then fails, naming what is missing).
#     tools/bench_torch.py itself is tracked, so it travels with the working tree.
# Executables stripped, then packed into gpu-bundle/executables.tar.xz (device-check.sh unpacks it). Release, not debug: a debug test binary is ~55 MB, and what travels to the GPU
# machine must stay under 64 MiB in total: the bundle is checked against 64 MiB less the rest of
# the working tree (tracked and untracked-not-ignored files) less a 2 MiB margin.
# GPU_TESTS="a b" builds only those test executables (e.g. a small bundle for a DRY_RUN here);
# without it the bundle also holds test-nccl (see NCCL below).
# The machine then only needs scripts/device-check.sh.
#
# It also records the crate root these binaries were compiled in (gpu-bundle/MANIFEST_DIR):
# tests that find fixtures through env!("CARGO_MANIFEST_DIR") look there, and device-check.sh
# links that path to the repository copy on the GPU machine when it differs.
#
# Usage: bash scripts/build-gpu-bundle.sh        (then: scripts/device-check.sh on the GPU machine)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BUNDLE=gpu-bundle
TRANSFER_LIMIT_MIB=64   # what may travel to the GPU machine in one call, the tree included
MARGIN_MIB=2
BENCH_WHEELS=(adapters==1.3.0 transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2)
GPU_TESTS_DEFAULT=(layernorm gpu_runtime gemm cuda_mma cuda_tf32_gemm cuda_backend cuda_attention cuda_attention_backward cuda_adapter cuda_elementwise cuda_backward_ln cuda_loss cuda_training cuda_dropout cuda_graph cuda_frozen_work cuda_adapter_dropout cuda_layernorm_bf16 cuda_bf16_attention cuda_bf16_adapter cuda_bf16_gemm cuda_bf16_elementwise cuda_bf16_model cuda_bf16_training cuda_bf16_adapter_backward cuda_dropout_shard cuda_attention_gemm loss_scaling nvrtc_compile parity adapters grad_parity roberta profile grad_accumulation)
if [ -n "${GPU_TESTS:-}" ]; then GPU_TESTS_SET=1; read -ra GPU_TESTS <<<"$GPU_TESTS"; else GPU_TESTS=("${GPU_TESTS_DEFAULT[@]}"); fi

for tool in jq strip cargo xz; do
    command -v "$tool" >/dev/null || { echo "error: $tool is required" >&2; exit 1; }
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "building release test executables ..." >&2
cargo test --release --no-run --message-format=json "${GPU_TESTS[@]/#/--test=}" >"$tmp/test.json"
# The NCCL communicator's one-GPU test needs the `nccl` feature (a second release build of the
# library); NCCL=0 leaves it out.
if [ "${NCCL:-1}" != 0 ] && [ -z "${GPU_TESTS_SET:-}" ]; then
    echo "building the release NCCL test (feature nccl) ..." >&2
    cargo test --release --no-run --message-format=json --features nccl --test nccl >>"$tmp/test.json"
fi
echo "building release bench executables ..." >&2
cargo bench --no-run --message-format=json --bench kernels --bench cuda >"$tmp/bench.json"
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
# One xz tarball: the executables link the same crate, and xz's 64 MiB dictionary (-9) stores
# what they share once: 8.7 MiB for what gzip's 32 KiB window packed into 42 MiB (33 executables,
# 99 MiB, 2026-11-27). scripts/device-check.sh unpacks it into gpu-bundle/ before running
# anything, with tar -J, or Python's lzma where the machine has no xz.
rm -f "$BUNDLE/executables.tar.gz"
tar -C "$tmp/exe" -cf - . | xz -9 -T2 >"$BUNDLE/executables.tar.xz"

if [ "${WHEELS:-1}" != 0 ]; then
    echo "downloading the wheels tools/bench_torch.py needs on the GPU machine ..." >&2
    mkdir -p "$BUNDLE/wheels"
    if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$BUNDLE/wheels" "${BENCH_WHEELS[@]}" >&2; then
        echo "error: pip download of ${BENCH_WHEELS[*]} failed (WHEELS=0 builds the bundle without them)" >&2
        exit 1
    fi
fi

pwd -P >"$BUNDLE/MANIFEST_DIR"
{
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git rev-parse --short HEAD 2>/dev/null || echo 'no commit')"
    echo "dirty files: $(git status --porcelain 2>/dev/null | wc -l)"
    rustc --version
} >"$BUNDLE/BUILD_INFO"

ls -lR "$BUNDLE" >&2
bytes=$(du -cb "$BUNDLE" | tail -1 | cut -f1)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
wheels=0
[ -d "$BUNDLE/wheels" ] && wheels=$(du -cb "$BUNDLE/wheels" | tail -1 | cut -f1)
# The rest of what travels: tracked files and untracked ones git does not ignore.
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } 2>/dev/null | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
limit=$(( (TRANSFER_LIMIT_MIB - MARGIN_MIB) * 1048576 - tree ))
echo "gpu-bundle: $(wc -l <"$tmp/list") executables ($(du -cb "$tmp"/exe/* | tail -1 | cut -f1 | awk '{ printf "%.1f", $1 / 1048576 }') MiB unpacked), wheels $(mib "$wheels") MiB, $(mib "$bytes") MiB in total; the rest of the tree is $(mib "$tree") MiB, so the bundle may take $(mib "$limit") MiB"
if [ "$bytes" -gt "$limit" ]; then
    echo "error: gpu-bundle ($(mib "$bytes") MiB) and the tree ($(mib "$tree") MiB) would pass the ${TRANSFER_LIMIT_MIB} MiB transfer limit less ${MARGIN_MIB} MiB (WHEELS=0 leaves the $(mib "$wheels") MiB of wheels out)" >&2
    exit 1
fi
