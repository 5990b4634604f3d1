#!/usr/bin/env bash
# The README's first command: installs what building needs (Debian packages, when missing), builds
# the binaries, and runs `pwsync-relay quickstart` with this script's arguments (a relay, an agent
# and a consumer writing to a local htpasswd file, on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh build
cargo build --release --bins
exec target/release/pwsync-relay quickstart "$@"
