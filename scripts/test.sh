#!/usr/bin/env bash
# The whole test suite: set-up, formatting, lints, every test. Needs nothing beside this checkout
# (the offline advisory gate, which needs an advisory snapshot beside the checkout, runs from
# .ci/run beside it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Build every artifact first: the end-to-end tests run the binaries and load the PAM module.
cargo build --workspace --locked
cargo test --workspace --locked
