#!/usr/bin/env bash
# Runs the cuda-sim kernel tests under valgrind's memcheck, one worker thread
# (CUDA_SIM_THREADS=1), forward schedule: the executor's own tests (tests/cuda_sim*.rs) and the
# launcher tests of kernels/*.cu that run through the device-runtime layer (TESTS below). Not run
# by CI: slow, and it needs valgrind.
#
# What it adds to the tests: an out-of-bounds access that the guard pages cannot see (host memory
# that is not a SimAllocation, the up to 15 bytes of tail padding, which cuda-sim marks
# inaccessible for memcheck) or a read of uninitialised host memory is reported at the kernel's
# source line. cuda-sim registers its fiber stacks with valgrind when <valgrind/valgrind.h> was
# found at build time; without it memcheck sees the stack switches as wild stack-pointer jumps.
#
# Skipped: the tests that fault into guard pages on purpose (names containing `fault`; memcheck
# reports those accesses before the executor can), and the one that reads tail padding on purpose.
#
# Usage: scripts/valgrind-kernels.sh [extra valgrind options]; exits 1 when memcheck finds an error.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

missing=()
command -v valgrind >/dev/null 2>&1 || missing+=("valgrind (e.g. apt-get install valgrind)")
command -v cargo >/dev/null 2>&1 || missing+=("cargo")
if ((${#missing[@]})); then
    printf 'error: missing: %s\n' "${missing[@]}" >&2
    exit 2
fi
if ! echo '#include <valgrind/valgrind.h>' | "${CXX:-c++}" -x c++ -E - >/dev/null 2>&1; then
    echo "warning: <valgrind/valgrind.h> not found by ${CXX:-c++} (apt-get install valgrind): fiber stacks will not be registered and memcheck may misreport" >&2
fi

TESTS=(cuda_sim cuda_sim_memory cuda_sim_intrinsics layernorm gpu_runtime cuda_backend cuda_attention cuda_attention_backward cuda_adapter cuda_elementwise cuda_backward_ln cuda_loss cuda_dropout cuda_training cuda_graph cuda_adapter_dropout cuda_layernorm_bf16 cuda_bf16_attention cuda_bf16_adapter cuda_bf16_gemm cuda_bf16_elementwise cuda_bf16_model)
# Build first, then take the test executables from cargo's messages (the crate's binary, built
# for the integration tests, is not one).
mapfile -t bins < <(cargo test --locked --features cuda-sim "${TESTS[@]/#/--test=}" --no-run --message-format=json \
    | grep -F '"kind":["test"]' | grep -o '"executable":"[^"]*"' | sed 's/"executable":"\(.*\)"/\1/')
if ((${#bins[@]} != ${#TESTS[@]})); then
    echo "error: expected ${#TESTS[@]} test executables from cargo, got ${#bins[@]}" >&2
    exit 2
fi
export CUDA_SIM_SCHEDULE="${CUDA_SIM_SCHEDULE:-forward}"

status=0
for bin in "${bins[@]}"; do
    echo "== valgrind $(basename "$bin")" >&2
    CUDA_SIM_THREADS=1 valgrind --error-exitcode=1 --quiet "$@" "$bin" --test-threads=1 \
        --skip fault --skip fresh_allocations_are_poisoned || status=1
done
if ((status)); then
    echo "valgrind: memcheck reported errors (above)" >&2
else
    echo "valgrind: clean" >&2
fi
exit "$status"
