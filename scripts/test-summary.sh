#!/usr/bin/env bash
# The closing line of scripts/test.sh, e.g. `155 passed, 0 failed, 9 skipped (no GPU)`, from
#   LOG:   cargo test's output (libtest's `test result: ok. N passed; M failed; K ignored; ...`
#          line of each test binary), and
#   SKIPS: the skip log the tests appended to (BERT_ADAPTERS_SKIP_LOG: one line per skip,
#          `binary<TAB>test<TAB>kind<TAB>label: reason`; see bert_adapters::cuda::probe::report_skip).
# libtest counts a test that skipped as passed: here it is counted once, as skipped, not passed.
# Usage: bash scripts/test-summary.sh LOG SKIPS
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 LOG SKIPS" >&2; exit 2; }
awk -F '\t' -v skips="$2" '
    FILENAME == skips {
        if (NF >= 3 && !(($1 FS $2) in seen)) { seen[$1 FS $2] = 1; skipped++; if (!($3 in by_kind)) kinds[++n_kinds] = $3; by_kind[$3]++ }
        next
    }
    /^test result: / {
        results++
        line = $0
        sub(/^test result: [A-Za-z]+\. /, "", line)
        n = split(line, parts, "; ")
        for (i = 1; i <= n; i++) {
            split(parts[i], kv, " ")
            if (kv[2] == "passed") passed += kv[1]; else if (kv[2] == "failed") failed += kv[1]; else if (kv[2] == "ignored") ignored += kv[1]
        }
    }
    END {
        if (!results) { print "no test results (a build or a test binary failed before reporting; see above)"; exit }
        why = ""
        for (i = 1; i <= n_kinds; i++) why = why (i > 1 ? ", " : "") (n_kinds > 1 ? by_kind[kinds[i]] " " : "") kinds[i]
        printf "%d passed, %d failed, %d skipped%s%s\n", passed - skipped, failed + 0, skipped + 0, (skipped ? " (" why ")" : ""), (ignored ? ", " ignored " ignored" : "")
    }
' "$2" "$1"
