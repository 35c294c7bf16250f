#!/usr/bin/env bash
# The one prepared command for a GPU machine. Run from anywhere, after building the bundle on the
# dev box with scripts/build-gpu-bundle.sh (the GPU machine needs no Rust toolchain):
#     bash scripts/device-check.sh
# It prints the facts (GPU, driver, nvcc, where libcuda/libnvrtc/libcublas are), puts the CUDA
# library folders it finds on LD_LIBRARY_PATH, then runs every test executable in gpu-bundle/ with
# REQUIRE_GPU=1 REQUIRE_NVRTC=1 --test-threads=1 (a skip is a failure there), then the kernel
# benchmarks (SKIP_BENCH=1 to leave them out).
# Writes $OUT/device-check.txt (summary) and $OUT/device-check.log (full output) when $OUT is set.
# Exit status: 0 only if every test executable passed.
# DRY_RUN=1 (for the dev box): run the bundle without REQUIRE_GPU/REQUIRE_NVRTC, so GPU tests
# skip instead of failing, and leave the benchmarks out.
# Copy the summary into docs/gpu-log.md afterwards.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BUNDLE=gpu-bundle
TEST_TIMEOUT="${TEST_TIMEOUT:-120}"   # per executable: a hung kernel must not eat the session
SANITIZE_TIMEOUT="${SANITIZE_TIMEOUT:-90}"
# The kernel test executables compute-sanitizer runs once each (memcheck, then racecheck).
SANITIZE_TESTS=(test-layernorm test-cuda_attention test-cuda_adapter test-cuda_elementwise test-gpu_runtime)
LOG=$(mktemp)
SUMMARY=$(mktemp)
trap 'rm -f "$LOG" "$SUMMARY"' EXIT

say() { echo "$*" | tee -a "$SUMMARY"; }
section() { echo; echo "== $* =="; }

{
section "machine"
date -u +%Y-%m-%dT%H:%M:%SZ
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'none') ($(git status --porcelain 2>/dev/null | wc -l) changed files)"
[ -f "$BUNDLE/BUILD_INFO" ] && sed 's/^/bundle: /' "$BUNDLE/BUILD_INFO"

section "GPU and driver"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
else
    echo "nvidia-smi not found"
fi

section "nvcc"
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
if [ -x "$NVCC" ]; then "$NVCC" --version | grep -E 'release' ; else echo "nvcc not found"; fi

section "CUDA libraries known to the loader (ldconfig)"
ldconfig -p 2>/dev/null | grep -E 'libcuda\.so|libnvrtc|libcublas' || echo "(none)"

# Candidate folders, most specific first: the toolkit, then the torch venv's PyPI wheels
# (CUDA 13 wheels use nvidia/cu13/lib; older ones nvidia/<component>/lib), then the driver.
CANDIDATES=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib)
for d in /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib \
         /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib \
         /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
    [ -d "$d" ] && CANDIDATES+=("$d")
done
section "CUDA libraries in candidate folders"
ADD=()
for d in "${CANDIDATES[@]}"; do
    [ -d "$d" ] || continue
    found=$(ls "$d" 2>/dev/null | grep -E '^lib(cuda|nvrtc|nvrtc-builtins|cublas|cublasLt)\.so' | tr '\n' ' ')
    if [ -n "$found" ]; then
        echo "$d: $found"
        ADD+=("$d")
    fi
done
[ ${#ADD[@]} -eq 0 ] && echo "(none found)"
for d in "${ADD[@]}"; do
    case ":${LD_LIBRARY_PATH:-}:" in *":$d:"*) ;; *) LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d" ;; esac
done
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
for lib in libcuda.so.1 libnvrtc.so.13 libnvrtc-builtins.so.13.0 libcublas.so.13 libcublasLt.so.13; do
    where=""
    IFS=: read -ra dirs <<<"$LD_LIBRARY_PATH"
    for d in "${dirs[@]}"; do [ -n "$d" ] && [ -e "$d/$lib" ] && { where="$d/$lib"; break; }; done
    [ -z "$where" ] && where=$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1 == l { print $NF; exit }')
    echo "$lib -> ${where:-NOT FOUND}"
done
} 2>&1 | tee -a "$LOG"

# Tests that locate fixtures through env!("CARGO_MANIFEST_DIR") look in the build machine's crate
# root; point that path at this checkout if it does not exist here.
if [ -f "$BUNDLE/MANIFEST_DIR" ]; then
    built_in=$(cat "$BUNDLE/MANIFEST_DIR")
    here=$(pwd -P)
    if [ "$built_in" != "$here" ] && [ ! -e "$built_in" ]; then
        if mkdir -p "$(dirname "$built_in")" 2>/dev/null && ln -s "$here" "$built_in" 2>/dev/null; then
            echo "linked $built_in -> $here (compile-time crate root)" | tee -a "$LOG"
        else
            echo "warning: cannot link $built_in -> $here; fixture-based tests may fail" | tee -a "$LOG"
        fi
    fi
fi

{
echo
echo "== device check: $(date -u +%Y-%m-%dT%H:%M:%SZ) =="
grep -E '^(commit|bundle):' "$LOG"
sed -n '/== GPU and driver ==/{n;p}' "$LOG" | sed 's/^/gpu: /'
sed -n '/== nvcc ==/{n;p}' "$LOG" | sed 's/^/nvcc: /'
grep -E ' -> ' "$LOG" | grep -v '^linked' | sed 's/^/lib: /'
} >>"$SUMMARY"

# The bundle travels as one tarball (scripts/build-gpu-bundle.sh); unpack it next to itself.
if [ -f "$BUNDLE/executables.tar.gz" ]; then
    tar -C "$BUNDLE" -xzf "$BUNDLE/executables.tar.gz" && echo "unpacked $BUNDLE/executables.tar.gz" | tee -a "$LOG"
fi
if [ ! -d "$BUNDLE" ] || [ -z "$(ls "$BUNDLE" 2>/dev/null | grep -E '^(test|unit)-')" ]; then
    say "error: no test executables in $BUNDLE/ (run scripts/build-gpu-bundle.sh on the dev box)"
    [ -n "${OUT:-}" ] && cp "$SUMMARY" "$OUT/device-check.txt" && cp "$LOG" "$OUT/device-check.log"
    exit 1
fi

REQUIRE=(REQUIRE_GPU=1 REQUIRE_NVRTC=1)
if [ "${DRY_RUN:-0}" = 1 ]; then
    REQUIRE=()
    SKIP_BENCH=1
    say "DRY_RUN=1: GPU tests may skip; benchmarks left out"
fi

failed=0
for t in "$BUNDLE"/test-* "$BUNDLE"/unit-*; do
    [ -x "$t" ] || continue
    name=$(basename "$t")
    echo | tee -a "$LOG"
    echo "== $name ==" | tee -a "$LOG"
    start=$(date +%s.%N)
    : >"$LOG.skips"
    env "${REQUIRE[@]}" BERT_ADAPTERS_SKIP_LOG="$LOG.skips" timeout "$TEST_TIMEOUT" "$t" --test-threads=1 2>&1 | tee "$LOG.one" | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    secs=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
    result=$(grep -E '^test result:' "$LOG.one" | tail -1)
    # Tests record their skips in the skip log (bert_adapters::cuda::probe::report_skip), one line each.
    skipped=$(cut -f1,2 "$LOG.skips" | sort -u | grep -c . || true)
    sed 's/^[^\t]*\t[^\t]*\t[^\t]*\t/SKIPPED: /' "$LOG.skips" >>"$LOG"
    if [ "$rc" -eq 0 ]; then status=PASS; else status="FAIL (rc $rc)"; failed=$((failed + 1)); fi
    [ "$rc" -eq 124 ] && status="FAIL (timed out after ${TEST_TIMEOUT}s)"
    say "$(printf '%-28s %-22s %6ss  skipped=%s  %s' "$name" "$status" "$secs" "$skipped" "$result")"
    # Lines tests print for the record (register counts, worst error vs tolerance).
    grep -E '^(NVRTC|CUDA headers|sm_[0-9]+ |layernorm|attention|adapter|embedding|nice)' "$LOG.one" | sed 's/^/    /' >>"$SUMMARY"
done
rm -f "$LOG.one" "$LOG.skips"

# compute-sanitizer, where the machine has it: every kernel test once under memcheck and racecheck.
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ -n "$SANITIZER" ] && [ "${DRY_RUN:-0}" != 1 ] && [ "${SKIP_SANITIZER:-0}" != 1 ]; then
    for tool in memcheck racecheck; do
        for name in "${SANITIZE_TESTS[@]}"; do
            [ -x "$BUNDLE/$name" ] || continue
            echo | tee -a "$LOG"
            echo "== compute-sanitizer --tool $tool $name ==" | tee -a "$LOG"
            env "${REQUIRE[@]}" timeout "$SANITIZE_TIMEOUT" "$SANITIZER" --tool "$tool" --error-exitcode 9 "$BUNDLE/$name" --test-threads=1 ::cuda 2>&1 | tail -40 | tee -a "$LOG" >"$LOG.one"
            rc=${PIPESTATUS[0]}
            case "$rc" in 0) status=clean ;; 9) status="ERRORS"; failed=$((failed + 1)) ;; 124) status="timed out after ${SANITIZE_TIMEOUT}s" ;; *) status="FAIL (rc $rc)"; failed=$((failed + 1)) ;; esac
            say "$(printf 'sanitizer %-10s %-24s %s' "$tool" "$name" "$status")"
        done
    done
    rm -f "$LOG.one"
else
    say "compute-sanitizer: ${SANITIZER:-not found} (skipped)"
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
    for b in "$BUNDLE"/bench-*; do
        [ -x "$b" ] || continue
        echo | tee -a "$LOG"
        echo "== $(basename "$b") ==" | tee -a "$LOG"
        # Only the CUDA groups (the CPU ones are measured on the dev box), briefly: the whole
        # check must stay within a few minutes of device time.
        timeout "$TEST_TIMEOUT" "$b" --bench --noplot --warm-up-time 1 --measurement-time 2 cuda 2>&1 | tee "$LOG.one" | tee -a "$LOG"
        echo "$(basename "$b"): rc ${PIPESTATUS[0]}" >>"$SUMMARY"
        # criterion prints the id on one line and "time: [lo mid hi]" / "thrpt:" on the next ones.
        grep -E '^(residual_|[a-z_]+/)|time:|thrpt:|SKIPPED:' "$LOG.one" | grep -v '^Benchmarking' | sed 's/^/    /' >>"$SUMMARY"
    done
    rm -f "$LOG.one"
fi

[ -x "$BUNDLE/bert-adapters" ] && { "$BUNDLE/bert-adapters" --version >/dev/null 2>&1 && say "bert-adapters binary starts: yes" || say "bert-adapters binary starts: NO"; }

say "failed test executables: $failed"
echo
echo "---- summary ----"
cat "$SUMMARY"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$SUMMARY" "$OUT/device-check.txt"
    cp "$LOG" "$OUT/device-check.log"
fi
[ "$failed" -eq 0 ]
