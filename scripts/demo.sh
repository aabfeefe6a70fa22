#!/usr/bin/env bash
# The README's main command: a BOSH VM lifecycle through the real `cpi` binary
# against a local daemon, narrated step by step with timings.
#
#   bash scripts/demo.sh               # Docker backend
#   bash scripts/demo.sh containerd    # containerd backend
#
# On a bare Debian 12 machine (as root) it installs what it needs and starts the
# daemons first, like scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

BACKEND=${1:-docker}
case "$BACKEND" in docker|containerd|fake) ;; *) die "usage: $0 [docker|containerd|fake]";; esac

[ "$(id -u)" = 0 ] || die "run as root: the demo installs packages, starts daemons and creates containers"
command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain with rustup"
ensure_packages
start_containerd
if [ "$BACKEND" = docker ]; then start_dockerd; fi

log "building cpi and cpi-demo"
cargo build -p cpi-bin -p cpi-tests --bins >&2
target_dir=$(cargo metadata --format-version 1 --no-deps 2>/dev/null | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p' || true)
export CPI_BIN="${target_dir:-$ROOT/target}/debug/cpi"
exec "${target_dir:-$ROOT/target}/debug/cpi-demo" "$BACKEND"
