#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, formatting, lints, dependency gate, every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
scripts/audit.sh
# Build every artifact first: the end-to-end tests run the binaries and load the PAM module.
cargo build --workspace --locked
cargo test --workspace --locked
