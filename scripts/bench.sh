#!/usr/bin/env bash
# The benchmark of bosh-container-cpi (not a test: it never judges timings).
#
#   bash scripts/bench.sh [--quick] [--backend docker|containerd|all|fake] [--reps N]
#                         [--json PATH] [--concurrency N] [--population N]
#                         [--profile release|dev]
#
# Starts the daemons it needs (scripts/lib.sh), builds the `cpi` binary and the
# `cpi-bench` command with the same cargo profile (release by default: the numbers of a
# debug build say little), and runs cpi-bench with the remaining arguments: one table
# on stdout, the JSON document in target/bench.json (or --json PATH). Every call is
# measured beside its raw floor in the same run; see docs/performance.md.
#
# The rows: info, has_vm, create_vm, delete_vm, attach_disk, detach_disk,
# create_stemcell of ~50 MB, ~500 MB and 1 GB images, 20 create_vm (and delete_vm) at
# once from one stemcell, and has_vm, attach/detach, create/delete with 100 more VMs
# and disks present.
#
# --reps N: repetitions per row (15; create_vm and delete_vm run 3 N times).
# --quick: 3 repetitions, only the ~50 MB stemcell, 4 at once, 10 present; CI runs
# `bash scripts/bench.sh --quick --profile dev` to prove the benchmark works, reusing
# the debug build. Needs root (mounts, daemons).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

profile=release
backend=all
args=()
while [ $# -gt 0 ]; do
    case "$1" in
    --profile)
        [ $# -ge 2 ] || die "--profile needs release or dev"
        profile=$2
        shift 2
        ;;
    --profile=*)
        profile=${1#--profile=}
        shift
        ;;
    --backend)
        [ $# -ge 2 ] || die "--backend needs docker, containerd, all or fake"
        backend=$2
        args+=("$1" "$2")
        shift 2
        ;;
    *)
        args+=("$1")
        shift
        ;;
    esac
done
case "$profile" in
release) profile_dir=release ;;
dev | debug)
    profile=dev
    profile_dir=debug
    ;;
*) die "unknown profile '$profile' (release or dev)" ;;
esac

if [ "$(id -u)" != 0 ]; then
    die "run as root: the benchmark creates containers and bind mounts"
fi

case "$backend" in
docker) start_dockerd ;;
containerd) start_containerd ;;
all)
    start_containerd
    start_dockerd
    ;;
fake) ;;
*) die "unknown backend '$backend' (docker, containerd, all or fake)" ;;
esac

target_dir=$(cargo metadata --format-version 1 --no-deps 2>/dev/null | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p' || true)
target_dir=${target_dir:-$ROOT/target}
if [ "$profile" = release ]; then
    # The `cpi` that ships (static, non-PIE; scripts/lib.sh), beside cpi-bench.
    CPI_BIN=$(build_release_cpi)
    log "bench: cargo build --release -p cpi-tests --bin cpi-bench --bin cpi-measure"
    cargo build --release -p cpi-tests --bin cpi-bench --bin cpi-measure >&2
else
    log "bench: cargo build --profile $profile (cpi, cpi-bench and cpi-measure)"
    cargo build --profile "$profile" -p cpi-bin --bin cpi -p cpi-tests --bin cpi-bench --bin cpi-measure >&2
    CPI_BIN="$target_dir/$profile_dir/cpi"
fi
export CPI_BIN
[ -x "$CPI_BIN" ] || die "the build did not produce $CPI_BIN"

exec "$target_dir/$profile_dir/cpi-bench" "${args[@]}"
