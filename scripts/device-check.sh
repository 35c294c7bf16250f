#!/usr/bin/env bash
# The one prepared command for a GPU machine. Run from anywhere, after building the bundle on the
# dev box with scripts/build-gpu-bundle.sh (the GPU machine needs no Rust toolchain):
#     bash scripts/device-check.sh
# It prints the facts (GPU, driver, nvcc, where libcuda/libnvrtc/libcublas are), puts the CUDA
# library folders it finds on LD_LIBRARY_PATH, then runs every test executable in gpu-bundle/ with
# REQUIRE_GPU=1 REQUIRE_NVRTC=1 --test-threads=1 (a skip is a failure there), then the benchmarks:
# ours (bench-cuda, bench-kernels' CUDA groups) and PyTorch + adapters (tools/bench_torch.py) in
# the same call, so every ratio comes from one machine (see the benchmark section below for its
# variables). SKIP_BENCH=1 leaves the benchmarks out; SKIP_TESTS=1 runs only the machine facts and
# the benchmarks; SKIP_SANITIZER=1 leaves compute-sanitizer out. Seen on an H100 (2026-11-27): the
# 25 test executables 75 s, bench-cuda 113 s, bench-kernels 7 s, bench_torch.py 152 s, so
# `SKIP_SANITIZER=1` runs everything else in one 10-minute command (about 6 minutes); the
# sanitizer takes about 2 minutes more (racecheck of the attention backward is left out: it ran
# past 100 s). Seen on an H100 in a later session (2026-11-27, 37 test executables): the tests
# ~130 s (test-nvrtc_compile 72 s of it), bench-cuda 226 s, bench-kernels 7 s, bench_torch.py
# 84 s with TORCH_BENCH_ARGS="--precisions bf16 --compile-shapes bert_base:32x128 --profile
# bert_base:32x128" (its fp32 half left out), the step profile 5 s: 440 s with SKIP_SANITIZER=1,
# which leaves ~2 minutes of a 15-minute device budget for the accuracy call
# (scripts/device-accuracy.sh, ~50 s) and the starts. A third session's call took 569 s of a
# 570 s limit (tests 203 s, test-nvrtc_compile 99 s of it; bench-cuda 219 s with the bf16 steps
# failing early; bench_torch.py 119 s): since then the full kernel compile is left out here (CI
# runs it) and bench-cuda measures 1 s a function, about 450 s in all [est]; the step variants
# (share, cublaslt, mma) and adapter_location_bf16 added since are some 60-90 s more [est]. If one
# call does not fit, run SKIP_BENCH=1 first and SKIP_TESTS=1 second.
# Writes $OUT/device-check.txt (summary), $OUT/device-check.log (full output) and, with the
# benchmarks, $OUT/bench.jsonl (JSON lines: tools/bench_torch.py's records, our criterion results,
# the ratios) when $OUT is set.
# Exit status: 0 only if every test executable passed and the benchmarks ran.
# After the benchmarks, the step profile (GPU time per op of each training step shape; SKIP_PROFILE=1
# leaves it out) and, with NCU=1, Nsight Compute's time per kernel of one bf16 step: see below.
# DRY_RUN=1 (for the dev box): run the bundle without REQUIRE_GPU/REQUIRE_NVRTC, so GPU tests
# skip instead of failing, and the benchmarks only as a smoke test (each bench executable once
# with --test, which skips without a GPU; the torch script's --help).
# Before the tests it compiles every kernel family for the GPU at once into target/kernel-cache
# (`bert-adapters kernels`, one NVRTC compile a core; KERNELS_AHEAD=0 leaves it out, KERNELS_ARCH
# names the arch where there is no GPU to ask, as in a dry run here), so no test
# or bench executable compiles a kernel, and a second call on the still-warm machine finds them.
# Copy the summary into docs/gpu-log.md afterwards.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Compiled kernels are kept on disk (src/cuda/kernel_cache.rs): each test and bench executable
# would otherwise compile every family it launches again, and while the machine stays warm the
# next call reuses them too.
export BERT_ADAPTERS_KERNEL_CACHE="${BERT_ADAPTERS_KERNEL_CACHE:-$PWD/target/kernel-cache}"
BUNDLE=gpu-bundle
TEST_TIMEOUT="${TEST_TIMEOUT:-120}"   # per executable: a hung kernel must not eat the session
SANITIZE_TIMEOUT="${SANITIZE_TIMEOUT:-90}"
# The kernel test executables compute-sanitizer runs once each (memcheck, then racecheck).
SANITIZE_TESTS=(test-layernorm test-cuda_attention test-cuda_attention_backward test-cuda_adapter test-cuda_elementwise test-cuda_backward_ln test-gpu_runtime)
# racecheck is 10-30x slower than memcheck: these ran past 100 s under it on an H100.
RACECHECK_SKIP=" test-cuda_attention_backward " 
LOG=$(mktemp)
SUMMARY=$(mktemp)
trap 'rm -f "$LOG" "$SUMMARY"' EXIT

say() { echo "$*" | tee -a "$SUMMARY"; }
# Copy what is known so far to $OUT, so an outer timeout still brings back every finished part.
flush() { [ -n "${OUT:-}" ] || return 0; mkdir -p "$OUT"; cp "$SUMMARY" "$OUT/device-check.txt"; cp "$LOG" "$OUT/device-check.log"; }
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

# The bundle travels as one tarball (scripts/build-gpu-bundle.sh); unpack it next to itself:
# xz (tar -J), or Python's lzma module where the machine has no xz; .tar.gz from older bundles.
if [ -f "$BUNDLE/executables.tar.xz" ]; then
    if command -v xz >/dev/null 2>&1; then
        tar -C "$BUNDLE" -xJf "$BUNDLE/executables.tar.xz"
    else
        python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' "$BUNDLE/executables.tar.xz" "$BUNDLE"
    fi && echo "unpacked $BUNDLE/executables.tar.xz" | tee -a "$LOG"
elif [ -f "$BUNDLE/executables.tar.gz" ]; then
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
    say "DRY_RUN=1: GPU tests may skip; benchmarks only as a smoke test"
fi

# Every kernel family compiled for this GPU at once, one NVRTC compile a core, into the kernel
# cache above: the test and bench executables then compile nothing (each would otherwise compile,
# one family at a time, what it launches). KERNELS_AHEAD=0 leaves this out.
if [ "${KERNELS_AHEAD:-1}" = 1 ] && [ "${DRY_RUN:-0}" != 1 ] && [ -x "$BUNDLE/bert-adapters" ]; then
    echo | tee -a "$LOG"
    echo "== bert-adapters kernels (into $BERT_ADAPTERS_KERNEL_CACHE) ==" | tee -a "$LOG"
    start=$(date +%s.%N)
    "$BUNDLE/bert-adapters" kernels ${KERNELS_ARCH:+--arch "$KERNELS_ARCH"} 2>&1 | tee -a "$LOG" >"$LOG.one"
    rc=${PIPESTATUS[0]}
    secs=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
    say "$(printf '%-28s %-22s %6ss  %s' "kernels ahead" "$([ "$rc" -eq 0 ] && echo done || echo "FAILED (rc $rc)")" "$secs" "$(tail -2 "$LOG.one" | tr '\n' ' ')")"
    flush
fi

failed=0
[ "${SKIP_TESTS:-0}" = 1 ] && say "SKIP_TESTS=1: test executables and sanitizer left out"
for t in "$BUNDLE"/test-* "$BUNDLE"/unit-*; do
    [ -x "$t" ] || continue
    [ "${SKIP_TESTS:-0}" = 1 ] && break
    name=$(basename "$t")
    echo | tee -a "$LOG"
    echo "== $name ==" | tee -a "$LOG"
    start=$(date +%s.%N)
    : >"$LOG.skips"
    extra=()
    # The compile of every kernel for sm_80 and sm_90 (99 s on an H100) is what CI runs with the
    # same NVRTC 13.0; on the device the GPU tests compile what they launch. NVRTC_FULL=1 runs it.
    if [ "$name" = test-nvrtc_compile ] && [ "${NVRTC_FULL:-0}" != 1 ]; then
        extra=(--skip every_kernel_compiles_without_spills)
        say "test-nvrtc_compile: every_kernel_compiles_without_spills left out (CI runs it; NVRTC_FULL=1 includes it)"
    fi
    env "${REQUIRE[@]}" BERT_ADAPTERS_SKIP_LOG="$LOG.skips" timeout "$TEST_TIMEOUT" "$t" --test-threads=1 "${extra[@]}" 2>&1 | tee "$LOG.one" | tee -a "$LOG"
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
    flush
done
rm -f "$LOG.one" "$LOG.skips"

# compute-sanitizer, where the machine has it: every kernel test once under memcheck and racecheck.
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ -n "$SANITIZER" ] && [ "${DRY_RUN:-0}" != 1 ] && [ "${SKIP_SANITIZER:-0}" != 1 ] && [ "${SKIP_TESTS:-0}" != 1 ]; then
    for tool in memcheck racecheck; do
        for name in "${SANITIZE_TESTS[@]}"; do
            [ -x "$BUNDLE/$name" ] || continue
            if [ "$tool" = racecheck ] && [[ "$RACECHECK_SKIP" == *" $name "* ]]; then say "$(printf 'sanitizer %-10s %-24s %s' "$tool" "$name" "skipped (too slow under racecheck)")"; continue; fi
            echo | tee -a "$LOG"
            echo "== compute-sanitizer --tool $tool $name ==" | tee -a "$LOG"
            env "${REQUIRE[@]}" timeout "$SANITIZE_TIMEOUT" "$SANITIZER" --tool "$tool" --error-exitcode 9 "$BUNDLE/$name" --test-threads=1 ::cuda 2>&1 | tail -40 | tee -a "$LOG" >"$LOG.one"
            rc=${PIPESTATUS[0]}
            case "$rc" in 0) status=clean ;; 9) status="ERRORS"; failed=$((failed + 1)) ;; 124) status="timed out after ${SANITIZE_TIMEOUT}s" ;; *) status="FAIL (rc $rc)"; failed=$((failed + 1)) ;; esac
            say "$(printf 'sanitizer %-10s %-24s %s' "$tool" "$name" "$status")"
            flush
        done
    done
    rm -f "$LOG.one"
else
    say "compute-sanitizer: ${SANITIZER:-not found} (skipped)"
fi

# ---- benchmarks ------------------------------------------------------------------------------------
# Ours and PyTorch + adapters in one call, on one machine, so every ratio compares like with like.
#   bench-cuda (benches/cuda.rs) on device 0 (CUDA_BENCH_DEVICE=cuda: no GPU is a failure), every
#     group at the real shapes; CUDA_BENCH_ARGS replaces its criterion arguments (default
#     `--warm-up-time 0.5 --measurement-time 1`, 10 samples: GPU times vary little; a filter such
#     as `train_step` runs a part).
#     About 30 functions of ~3 s each plus setup: 2-3 minutes on an H100 [est].
#   bench-kernels: only its CUDA group (residual + LayerNorm forward), as before.
#   tools/bench_torch.py with $PYTHON (default python3, the image's torch venv): the wheels in
#     gpu-bundle/wheels (adapters 1.3.0, transformers 4.57.6, ...) installed into a temporary
#     --target first and put ahead on PYTHONPATH; TORCH_BENCH_ARGS replaces its arguments (default:
#     every shape eager in bf16 and fp32, torch.compile at bert_base:32x128 only, and
#     torch.profiler over 3 eager steps of bert_base:32x128: PyTorch's side of the step profile). It also reads our
#     criterion results (CRITERION_HOME, a temporary folder) and prints the ratios.
#   BENCH_TIMEOUT, TORCH_TIMEOUT: seconds for each (default 420 each).
if [ "${SKIP_BENCH:-0}" != 1 ]; then
    BENCH_TMP=$(mktemp -d)
    export CRITERION_HOME="$BENCH_TMP/criterion"
    JSONL="$BENCH_TMP/bench.jsonl"
    : >"$JSONL"
    BENCH_TIMEOUT="${BENCH_TIMEOUT:-420}"
    TORCH_TIMEOUT="${TORCH_TIMEOUT:-420}"
    bench_failed=0
    for b in "$BUNDLE"/bench-*; do
        [ -x "$b" ] || continue
        name=$(basename "$b")
        echo | tee -a "$LOG"
        echo "== $name ==" | tee -a "$LOG"
        benv=()
        if [ "$name" = bench-cuda ]; then
            read -ra args <<<"${CUDA_BENCH_ARGS:---warm-up-time 0.5 --measurement-time 1}"
            [ "${DRY_RUN:-0}" = 1 ] || benv=(CUDA_BENCH_DEVICE=cuda)
        else
            # Only the CUDA groups (the CPU ones are measured on the dev box).
            args=(--warm-up-time 1 --measurement-time 2 cuda)
        fi
        if [ "${DRY_RUN:-0}" = 1 ]; then
            args=(--test "${args[@]: -1}")
            [ "$name" = bench-cuda ] && args=(--test)
        else
            args=(--bench --noplot "${args[@]}")
        fi
        start=$(date +%s)
        env "${benv[@]}" timeout "$BENCH_TIMEOUT" "$b" "${args[@]}" 2>&1 | tee "$LOG.one" | tee -a "$LOG"
        rc=${PIPESTATUS[0]}
        [ "$rc" -ne 0 ] && bench_failed=$((bench_failed + 1))
        say "$name: rc $rc ($(( $(date +%s) - start ))s)$([ "$rc" -eq 124 ] && echo ", timed out after ${BENCH_TIMEOUT}s")"
        # criterion prints the id on one line and "time: [lo mid hi]" / "thrpt:" on the next ones.
        grep -E '^([a-z_]+/)|time:|thrpt:|SKIPPED:|^(Testing|Success|launches:|WARNING|FAILED|error|cuda benchmarks on)' "$LOG.one" | grep -v '^Benchmarking' | sed 's/^/    /' >>"$SUMMARY"
        flush
    done
    rm -f "$LOG.one"

    PY="${PYTHON:-python3}"
    echo | tee -a "$LOG"
    echo "== tools/bench_torch.py ($PY) ==" | tee -a "$LOG"
    if [ "${DRY_RUN:-0}" = 1 ]; then
        if "$PY" tools/bench_torch.py --help >/dev/null 2>>"$LOG"; then say "bench_torch.py --help: ok"; else say "bench_torch.py --help: FAILED"; bench_failed=$((bench_failed + 1)); fi
    else
        pypath="${PYTHONPATH:-}"
        if ls "$BUNDLE"/wheels/*.whl >/dev/null 2>&1; then
            site="$BENCH_TMP/site"
            if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$BUNDLE"/wheels/*.whl 2>&1 | tee -a "$LOG"; then
                pypath="$site${pypath:+:$pypath}"
                say "bench wheels: $(cd "$BUNDLE/wheels" && ls *.whl | tr '\n' ' ')installed into $site"
            else
                say "bench wheels: pip install FAILED (see the log)"
            fi
        else
            say "bench wheels: none in $BUNDLE/wheels (using $PY's own packages)"
        fi
        read -ra targs <<<"${TORCH_BENCH_ARGS:---compile-shapes bert_base:32x128 --profile bert_base:32x128}"
        start=$(date +%s)
        env PYTHONPATH="$pypath" PYTHONUNBUFFERED=1 timeout "$TORCH_TIMEOUT" "$PY" tools/bench_torch.py --json "$JSONL" --ours "$CRITERION_HOME" "${targs[@]}" 2>&1 | tee "$LOG.one" | tee -a "$LOG"
        rc=${PIPESTATUS[0]}
        [ "$rc" -ne 0 ] && bench_failed=$((bench_failed + 1))
        say "bench_torch.py: rc $rc ($(( $(date +%s) - start ))s)$([ "$rc" -eq 124 ] && echo ", timed out after ${TORCH_TIMEOUT}s")"
        # Its readable tables (setup, timings, ratios) and any error line.
        grep -E '^\||^error' "$LOG.one" | sed 's/^/    /' >>"$SUMMARY"
        rm -f "$LOG.one"
    fi
    say "benchmark runs that failed: $bench_failed"
    failed=$((failed + bench_failed))
    if [ -n "${OUT:-}" ] && [ -s "$JSONL" ]; then
        mkdir -p "$OUT"
        cp "$JSONL" "$OUT/bench.jsonl"
    fi
    rm -rf "$BENCH_TMP"
fi

# ---- where the step's time goes ---------------------------------------------------------------------
# bench-cuda with CUDA_BENCH_PROFILE=1: each step shape in bf16 and f32 on a ProfiledBackend, GPU
# time per op from two events around each op, the kernels each op launched ($OUT/step-profile.md;
# about 30 s on an H100 [est]). SKIP_PROFILE=1 leaves it out; PROFILE_TIMEOUT (default 240).
# NCU=1 also runs Nsight Compute over one launched BERT-base 32x128 bf16 step (CUDA_BENCH_PROFILE=
# ncu: cuProfilerStart/Stop around it), each kernel timed alone with warm caches and the clocks
# left alone, summed per kernel name by tools/ncu_summary.py ($OUT/ncu-step.md, the raw CSV in
# $OUT/ncu-step.csv; NCU_TIMEOUT, default 300), then ncu's sections for the first launches of our
# largest kernels ($OUT/ncu-detail.txt; NCU_DETAIL=0 leaves them out). None of it counts as a
# failure of the check. CUDA_BENCH_STEP_VARIANT (default, share, cublaslt, share+cublaslt or mma: the
# tape's FrozenRows, the Linears' epilogues, the split down projection; benches/cuda.rs) picks the step both profile.
if [ "${SKIP_PROFILE:-0}" != 1 ] && [ "${DRY_RUN:-0}" != 1 ] && [ -x "$BUNDLE/bench-cuda" ]; then
    echo | tee -a "$LOG"
    echo "== step profile ==" | tee -a "$LOG"
    PROFILE_MD=$(mktemp)
    start=$(date +%s)
    env CUDA_BENCH_DEVICE=cuda CUDA_BENCH_PROFILE=1 timeout "${PROFILE_TIMEOUT:-240}" "$BUNDLE/bench-cuda" 2>&1 | tee "$PROFILE_MD" | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    say "step profile: rc $rc ($(( $(date +%s) - start ))s)"
    # Each shape's headline and its ten most expensive ops.
    awk '/^## /{print; n=0; next} /^\| [a-z]/{ if (n < 13) print; n++ } /^GPU span/{print}' "$PROFILE_MD" | sed 's/^/    /' >>"$SUMMARY"
    [ -n "${OUT:-}" ] && { mkdir -p "$OUT"; cp "$PROFILE_MD" "$OUT/step-profile.md"; }
    rm -f "$PROFILE_MD"
    flush
    # The products' algorithms (CUDA_BENCH_PROFILE=gemm: every candidate of cuBLASLt's heuristic for
    # the step's 16-bit Linear shapes, with our numerical mask and with none, described and timed;
    # a few seconds) and the step spans with BERT_ADAPTERS_GEMM_ALGO=timed (the fastest of the
    # heuristic's first 8), beside the heuristic's above: $OUT/gemm.md. The summary keeps each
    # shape's first masked row (what a product gets) and the timed step spans. Seen on an H100
    # (2026-11-27): the survey found bf16 products shut out of the nvjet kernels (ac85648).
    GEMM_MD=$(mktemp)
    start=$(date +%s)
    env CUDA_BENCH_DEVICE=cuda CUDA_BENCH_PROFILE=gemm timeout "${PROFILE_TIMEOUT:-240}" "$BUNDLE/bench-cuda" >"$GEMM_MD" 2>&1
    rc=$?
    env CUDA_BENCH_DEVICE=cuda CUDA_BENCH_PROFILE=1 CUDA_BENCH_PROFILE_PRECISIONS="bf16 f16" BERT_ADAPTERS_GEMM_ALGO=timed \
        timeout "${PROFILE_TIMEOUT:-240}" "$BUNDLE/bench-cuda" 2>&1 | sed 's/^## /## (BERT_ADAPTERS_GEMM_ALGO=timed) /' >>"$GEMM_MD"
    say "cuBLASLt survey and timed step profile: rc $rc, ${PIPESTATUS[0]} ($(( $(date +%s) - start ))s)"
    awk '/^## [A-Z]/{h=$0} /^\| ours \| 0 /{print h; print} /^## \(BERT_ADAPTERS_GEMM_ALGO=timed\)/{print}' "$GEMM_MD" | sed 's/^/    /' >>"$SUMMARY"
    cat "$GEMM_MD" >>"$LOG"
    [ -n "${OUT:-}" ] && cp "$GEMM_MD" "$OUT/gemm.md"
    rm -f "$GEMM_MD"
    flush
    NCU_BIN=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1 || true)
    if [ "${NCU:-0}" = 1 ] && [ -n "$NCU_BIN" ]; then
        NCU_CSV=$(mktemp)
        start=$(date +%s)
        env CUDA_BENCH_DEVICE=cuda CUDA_BENCH_PROFILE=ncu CUDA_BENCH_PROFILE_PRECISIONS=bf16 timeout "${NCU_TIMEOUT:-300}" \
            "$NCU_BIN" --profile-from-start off --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
            "$BUNDLE/bench-cuda" >"$NCU_CSV" 2>>"$LOG"
        rc=$?
        say "ncu over one step: rc $rc ($(( $(date +%s) - start ))s), $NCU_BIN"
        "${PYTHON:-python3}" tools/ncu_summary.py "$NCU_CSV" >"$NCU_CSV.md" 2>>"$LOG" && head -25 "$NCU_CSV.md" | sed 's/^/    /' >>"$SUMMARY"
        [ -n "${OUT:-}" ] && { cp "$NCU_CSV" "$OUT/ncu-step.csv"; cp "$NCU_CSV.md" "$OUT/ncu-step.md" 2>/dev/null; }
        rm -f "$NCU_CSV" "$NCU_CSV.md"
        flush
        # Why our largest kernels take what they take (NCU_DETAIL=0 leaves it out): ncu's speed of
        # light, memory, occupancy, warp-state and launch sections for the first launches of the
        # forward ones and of the backward ones in the same step (the first linear_epilogue is the
        # QKV product's, the second the FFN up's with GELU). $OUT/ncu-detail.txt; ~30 s [est].
        if [ "${NCU_DETAIL:-1}" = 1 ]; then
            NCU_TXT=$(mktemp)
            start=$(date +%s)
            # (The GEMM attention's rows are the _t128 kernels at T <= 128; with
            # CUDA_BENCH_STEP_VARIANT=mma the tensor-core kernels run in place of some of these.)
            for spec in "5:linear_epilogue_bf16io|attention_gemm_softmax_dropout_bf16io(_t128)?|adapter_split_pre_bf16io|adapter_split_post_bf16io|attention_mma_forward_dropout_bf16io_d64|adapter_split_pre_down_bf16io|adapter_split_up_post_bf16io" \
                "4:attention_gemm_softmax_backward_dropout_bf16io(_t128)?|adapter_split_bwd_input_bf16io|adapter_split_bwd_post_bf16io|activation_backward_bf16io|attention_mma_backward_scores_dropout_bf16io_d64|adapter_split_bwd_pre_down_bf16io|adapter_split_bwd_up_bf16io"; do
                env CUDA_BENCH_DEVICE=cuda CUDA_BENCH_PROFILE=ncu CUDA_BENCH_PROFILE_PRECISIONS=bf16 timeout "${NCU_TIMEOUT:-300}" \
                    "$NCU_BIN" --profile-from-start off --clock-control none --kernel-name "regex:^(${spec#*:})$" --launch-count "${spec%%:*}" \
                    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats --section LaunchStats \
                    "$BUNDLE/bench-cuda" >>"$NCU_TXT" 2>>"$LOG"
                rc=$?
            done
            say "ncu sections of the largest kernels: rc $rc ($(( $(date +%s) - start ))s), $(grep -c '^  [a-z_0-9]*_bf16io' "$NCU_TXT" || true) launches"
            grep -E '^  [a-z_0-9]+_bf16io|Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per Thread|Compute \(SM\) Throughput' "$NCU_TXT" | sed 's/^/    /' >>"$SUMMARY"
            [ -n "${OUT:-}" ] && cp "$NCU_TXT" "$OUT/ncu-detail.txt"
            rm -f "$NCU_TXT"
            flush
        fi
    elif [ "${NCU:-0}" = 1 ]; then
        say "NCU=1 but no ncu found"
    fi
fi

[ -x "$BUNDLE/bert-adapters" ] && { "$BUNDLE/bert-adapters" --version >/dev/null 2>&1 && say "bert-adapters binary starts: yes" || say "bert-adapters binary starts: NO"; }

say "failed test executables and benchmark runs: $failed"
echo
echo "---- summary ----"
cat "$SUMMARY"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$SUMMARY" "$OUT/device-check.txt"
    cp "$LOG" "$OUT/device-check.log"
fi
[ "$failed" -eq 0 ]
