#!/usr/bin/env bash
# The test command of bosh-container-cpi: `bash scripts/test.sh`.
#
# Installs what the tests need (Debian packages; SKIP_INSTALL=1 only checks),
# starts containerd, dockerd and a local registry (left running, reused by the
# next run), then runs formatting, lints, build, tests and docs. Needs root and
# a Rust toolchain (rustup, with rustfmt and clippy). Extra arguments are passed
# to `cargo test` (e.g. `bash scripts/test.sh -- --nocapture`).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

banner() {
    printf '\n==================== %s ====================\n' "$*" >&2
}

if [ "$(id -u)" != 0 ]; then
    die "run as root: the tests install packages, start daemons and create containers"
fi

banner "packages"
ensure_packages

if ! command -v cargo >/dev/null; then
    die "cargo not found: install a Rust toolchain (>= the workspace rust-version) with rustup, with the rustfmt and clippy components"
fi

banner "containerd"
start_containerd
banner "dockerd"
start_dockerd
banner "registry"
start_registry

export CPI_TEST_REGISTRY CPI_TEST_REGISTRY_IMAGE
# One full build, not an edit-compile loop: incremental caches would only take disk
# (3.4 GB of a fresh run's 9.5 GB when they were on).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

banner "cargo fmt --all -- --check"
cargo fmt --all -- --check

banner "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

banner "cargo build --workspace --bins"
cargo build --workspace --bins

target_dir=$(cargo metadata --format-version 1 --no-deps 2>/dev/null | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p' || true)
CPI_BIN="${target_dir:-$ROOT/target}/debug/cpi"
export CPI_BIN
if [ ! -x "$CPI_BIN" ]; then
    die "the build did not produce $CPI_BIN"
fi

banner "cargo test --workspace (CPI_BIN=$CPI_BIN)"
cargo test --workspace "$@"

banner "cargo doc --workspace --no-deps"
RUSTDOCFLAGS='-D warnings' cargo doc --workspace --no-deps

banner "library example: a VM lifecycle through the Cpi trait, on each daemon"
# Built with the workspace's features, as `cargo test --workspace` built the rest:
# `cargo run -p cpi-tests` would resolve features for that package alone and build
# the backends and their dependencies a second time (1.2 GB more disk).
cargo build -q --workspace --examples
"${target_dir:-$ROOT/target}/debug/examples/library_lifecycle" docker
"${target_dir:-$ROOT/target}/debug/examples/library_lifecycle" containerd

banner "benchmark, quick mode (proves it runs; timings are never asserted)"
bash scripts/bench.sh --quick --profile dev --json "${target_dir:-$ROOT/target}/bench-quick.json"

banner "removing the suites' idle subnet bridges"
# The containerd backend keeps one bridge per subnet (bcpi + a hash of the subnet) for
# the next VM on it, as Docker keeps a network; every suite uses subnets of its own, so
# once nothing runs, the bridges nothing is plugged into are removed here.
remove_idle_cpi_bridges

banner "all checks passed"
