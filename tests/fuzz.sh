#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets: every decoder of outside input) for SECONDS each
# (default 60) with cargo-fuzz on the nightly toolchain. Not part of the normal suite: it takes
# minutes and needs nightly.
#
#   rustup toolchain install nightly   # once
#   cargo install cargo-fuzz           # once
#   tests/fuzz.sh [SECONDS]
#
# A crash stops the script with libFuzzer's report; the input is kept in
# fuzz/artifacts/TARGET/ (rerun: cargo +nightly fuzz run --fuzz-dir fuzz TARGET FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is not installed: cargo install cargo-fuzz" >&2; exit 2; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for t in $(cargo +nightly fuzz list --fuzz-dir fuzz); do
    echo "== $t: ${seconds}s"
    if ! cargo +nightly fuzz run --fuzz-dir fuzz "$t" -- -max_total_time="$seconds" -rss_limit_mb=2048 >"$log" 2>&1; then
        tail -40 "$log"
        echo "fuzz target $t FAILED" >&2
        exit 1
    fi
    grep -E "^#[0-9]+ +DONE|^Done " "$log" | tail -1
done
echo "every fuzz target ran ${seconds}s without a crash"
