#!/usr/bin/env bash
# Dependency gate: every crate in Cargo.lock against the RustSec advisory snapshot, offline.
# Accepted advisories, each with its reason, are in .cargo/audit.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
DB="${PWSYNC_ADVISORY_DB:-../shared/advisory-db}"
if [ ! -d "$DB" ]; then
  echo "advisory database not found at $DB (set PWSYNC_ADVISORY_DB to a copy of rustsec/advisory-db)" >&2
  exit 1
fi
cargo audit --db "$DB" --no-fetch -D warnings
