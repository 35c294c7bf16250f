#!/usr/bin/env bash
# The cuda-sim line of scripts/test.sh, e.g. `cuda-sim: 260 kernel tests passed on the CPU executor
# (216 device tests run from the same body as on a GPU, 44 executor tests in tests/cuda_sim*.rs)`,
# from cargo test's output: the passed `*::cuda_sim` halves of the device tests (test_device!) and
# every passed test of tests/cuda_sim*.rs. "Running tests/x.rs (...)" starts each test binary's
# section. Tested by tests/cli.rs (the_cuda_sim_count_survives_interleaved_reports).
# Usage: bash scripts/count-sim-tests.sh LOG
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 LOG" >&2; exit 2; }
log=$1
awk '
    /^ *Running / { executor = ($2 ~ /^tests\/cuda_sim/) }
    # Every "test NAME ... ok" on a line, not only at its start, and a "test NAME ... " whose "ok"
    # comes alone on a later line: a test that prints while others finish can split or interleave
    # the reports.
    function credit(name) { if (name ~ /::cuda_sim$/) device++; else if (executor) own++ }
    pending != "" && /^ok *$/ { credit(pending); pending = ""; next }
    /^(FAILED|ignored)/ { pending = "" }
    {
        if ($0 ~ /^test /) pending = ""
        line = $0
        while (match(line, /test [^ ]+ \.\.\. ok/)) {
            credit(substr(line, RSTART + 5, RLENGTH - 12))
            line = substr(line, RSTART + RLENGTH)
        }
        if ($0 ~ /^test [^ ]+ \.\.\. / && $0 !~ /^test [^ ]+ \.\.\. (ok|FAILED|ignored)/) pending = $2
    }
    END { printf "cuda-sim: %d kernel tests passed on the CPU executor (%d device tests run from the same body as on a GPU, %d executor tests in tests/cuda_sim*.rs)\n", device + own, device, own }
' "$log"
