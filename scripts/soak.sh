#!/usr/bin/env bash
# The long crash-safety soak: kill -9 of the `cpi` process at random points inside
# create_vm, attach_disk, detach_disk, delete_vm and create_stemcell, 50 trials per
# method and backend (override: TRIALS=N, BACKEND=docker|containerd|all,
# METHODS=create_vm,..., SEED=S). Prints the table of docs/reliability.md
# ("Crash safety") and exits non-zero when anything was left behind.
#
#   bash scripts/soak.sh                  # needs root, dockerd and containerd
#   TRIALS=5 BACKEND=docker bash scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
start_containerd
start_dockerd
cargo build -p cpi-bin -p cpi-tests --bin cpi --bin cpi-crash
# Private copies: other builds may replace target/debug/* while the soak runs.
bin_dir="$(mktemp -d /tmp/cpi-soak.XXXXXX)"
trap 'rm -rf "$bin_dir"' EXIT
cp target/debug/cpi target/debug/cpi-crash "$bin_dir/"
export CPI_BIN="$bin_dir/cpi"
args=(--backend "${BACKEND:-all}" --trials "${TRIALS:-50}")
if [ -n "${METHODS:-}" ]; then args+=(--methods "$METHODS"); fi
if [ -n "${SEED:-}" ]; then args+=(--seed "$SEED"); fi
"$bin_dir/cpi-crash" "${args[@]}"
