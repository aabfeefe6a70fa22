# shellcheck shell=bash
# Helpers for tests, CI and demos of bosh-container-cpi.
#
#   source scripts/lib.sh
#   ensure_packages; start_containerd; start_dockerd; start_registry
#
# Every function is idempotent: calling it again when its work is already done
# (packages installed, daemon answering) changes nothing. All diagnostics go to
# stderr. Nothing here needs loop devices or loads kernel modules.

# Daemons started from here log into this directory.
CPI_TEST_LOG_DIR=${CPI_TEST_LOG_DIR:-/var/log/cpi-test}
# State of the test helpers (registry config and data, pid files).
CPI_TEST_STATE_DIR=${CPI_TEST_STATE_DIR:-/var/lib/cpi-test}
# The local registry, reachable over plain http and only from this machine.
CPI_TEST_REGISTRY=${CPI_TEST_REGISTRY:-127.0.0.1:5000}
# An image the registry check pushes; tests may use it as a light-stemcell image.
CPI_TEST_REGISTRY_IMAGE=${CPI_TEST_REGISTRY_IMAGE:-$CPI_TEST_REGISTRY/cpi-test/busybox:1}

CONTAINERD_SOCK=/run/containerd/containerd.sock
DOCKER_SOCK=/var/run/docker.sock

# Debian packages the tests need. curl talks to the registry; the toolchain
# packages link the Rust binaries (cargo itself comes from rustup).
CPI_TEST_PACKAGES=(
    docker.io containerd runc protobuf-compiler containernetworking-plugins
    docker-registry busybox-static debootstrap iproute2 iptables ruby
    ca-certificates curl procps gcc libc6-dev pkg-config
)

# Root's usual PATH may be missing the sbin directories (dockerd, runc, iptables).
case ":$PATH:" in
*:/usr/sbin:*) ;;
*) PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" ;;
esac
if [ -d "${HOME:-/root}/.cargo/bin" ]; then
    case ":$PATH:" in
    *":${HOME:-/root}/.cargo/bin:"*) ;;
    *) PATH="${HOME:-/root}/.cargo/bin:$PATH" ;;
    esac
fi
export PATH

log() {
    printf '[cpi-test] %s\n' "$*" >&2
}

die() {
    printf '[cpi-test] ERROR: %s\n' "$*" >&2
    return 1
}

# Prints the packages of CPI_TEST_PACKAGES that are not installed.
missing_packages() {
    local p status
    for p in "${CPI_TEST_PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
        if [ "$status" != "install ok installed" ]; then
            printf '%s\n' "$p"
        fi
    done
}

# Installs the Debian packages the tests need; runs `apt-get update` (once) only
# when something is missing. With SKIP_INSTALL=1 it only checks and fails
# with the list of missing packages.
ensure_packages() {
    local missing
    missing=$(missing_packages | tr '\n' ' ')
    missing=${missing% }
    if [ -z "$missing" ]; then
        log "packages: all ${#CPI_TEST_PACKAGES[@]} required packages are installed"
        return 0
    fi
    if [ "${SKIP_INSTALL:-0}" = 1 ]; then
        die "SKIP_INSTALL=1 but these packages are missing: $missing (install them: apt-get install -y $missing, or run without SKIP_INSTALL)"
        return 1
    fi
    if [ "$(id -u)" != 0 ]; then
        die "packages missing ($missing) and not running as root to install them"
        return 1
    fi
    # Keep the packages' maintainer scripts from starting their services
    # (docker, containerd, the registry on :5000 with auth): the start_*
    # functions below start exactly what the tests need, the same way on every
    # machine, with or without systemd.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created_policy=1
    fi
    local rc=0
    log "packages: missing: $missing"
    log "packages: apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || rc=$?
    if [ "$rc" = 0 ]; then
        log "packages: apt-get install -y --no-install-recommends $missing"
        # shellcheck disable=SC2086 # word splitting intended
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            $missing >&2 || rc=$?
    fi
    if [ "$created_policy" = 1 ]; then
        rm -f "$policy"
    fi
    if [ "$rc" != 0 ]; then
        die "apt-get failed (exit $rc) installing: $missing"
        return 1
    fi
    missing=$(missing_packages | tr '\n' ' ')
    if [ -n "${missing// /}" ]; then
        die "still missing after apt-get install: $missing"
        return 1
    fi
    log "packages: installed"
}

containerd_answers() {
    timeout 10 ctr --address "$CONTAINERD_SOCK" version >/dev/null 2>&1
}

docker_answers() {
    timeout 15 docker -H "unix://$DOCKER_SOCK" version >/dev/null 2>&1
}

# Prints the last lines of a daemon log to stderr.
show_log_tail() {
    local file=$1
    if [ -f "$file" ]; then
        log "---- last 40 lines of $file ----"
        tail -n 40 "$file" >&2 || true
        log "---- end of $file ----"
    fi
}

# Starts a daemon in the background, detached from this shell's session so it
# outlives the script, appending its output to a log file and writing its pid.
start_background() {
    local name=$1 logfile=$2
    shift 2
    mkdir -p "$CPI_TEST_LOG_DIR" "$CPI_TEST_STATE_DIR"
    printf '\n==== %s: starting: %s ====\n' "$(date -Is)" "$*" >>"$logfile"
    setsid -w nohup "$@" </dev/null >>"$logfile" 2>&1 &
    echo $! >"$CPI_TEST_STATE_DIR/$name.pid"
    log "$name: started pid $! ($*), log $logfile"
}

# Is the process recorded in $CPI_TEST_STATE_DIR/<name>.pid still alive?
pid_alive() {
    local pidfile="$CPI_TEST_STATE_DIR/$1.pid" pid
    [ -f "$pidfile" ] || return 1
    pid=$(cat "$pidfile")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

# Starts containerd (Debian's default config: /etc/containerd/config.toml, root
# /var/lib/containerd) unless /run/containerd/containerd.sock already answers,
# and checks that the overlayfs snapshotter works.
start_containerd() {
    local logfile="$CPI_TEST_LOG_DIR/containerd.log"
    if containerd_answers; then
        log "containerd: already answering on $CONTAINERD_SOCK"
    else
        command -v containerd >/dev/null || { die "containerd is not installed (run ensure_packages)"; return 1; }
        start_background containerd "$logfile" containerd
        local i
        for i in $(seq 1 30); do
            if containerd_answers; then
                break
            fi
            if ! pid_alive containerd; then
                show_log_tail "$logfile"
                die "containerd exited while starting; see $logfile"
                return 1
            fi
            sleep 1
        done
        if ! containerd_answers; then
            show_log_tail "$logfile"
            die "containerd did not answer on $CONTAINERD_SOCK within 30 s; see $logfile"
            return 1
        fi
        log "containerd: answering on $CONTAINERD_SOCK after ${i}s"
    fi
    local overlay
    overlay=$(ctr --address "$CONTAINERD_SOCK" plugins ls 2>/dev/null |
        awk '$1 == "io.containerd.snapshotter.v1" && $2 == "overlayfs" {print $NF}')
    if [ "$overlay" != "ok" ]; then
        ctr --address "$CONTAINERD_SOCK" plugins ls 2>&1 | grep -i snapshotter >&2 || true
        die "containerd's overlayfs snapshotter is not ok (status '${overlay:-absent}'); its root (/var/lib/containerd) must be on a filesystem that supports overlayfs upper dirs (ext4, xfs), not on overlayfs or tmpfs"
        return 1
    fi
    log "containerd: overlayfs snapshotter ok"
}

# Starts dockerd on unix:///var/run/docker.sock, sharing the containerd from
# start_containerd, unless Docker already answers there. Checks the storage
# driver (overlay2 expected; never devicemapper/loop devices) and networking.
start_dockerd() {
    local logfile="$CPI_TEST_LOG_DIR/dockerd.log"
    if docker_answers; then
        log "dockerd: already answering on $DOCKER_SOCK"
        if [ -S /run/docker/containerd/containerd.sock ] && command -v pgrep >/dev/null &&
            ! pgrep -f -- "--containerd=$CONTAINERD_SOCK" >/dev/null; then
            log "dockerd: WARNING: this dockerd seems to run its own containerd (/run/docker/containerd), not $CONTAINERD_SOCK"
        fi
    else
        command -v dockerd >/dev/null || { die "dockerd is not installed (run ensure_packages)"; return 1; }
        if ! containerd_answers; then
            log "dockerd: containerd is not running; starting it first"
            start_containerd || return 1
        fi
        start_background dockerd "$logfile" \
            dockerd --host "unix://$DOCKER_SOCK" --containerd="$CONTAINERD_SOCK"
        local i
        for i in $(seq 1 60); do
            if docker_answers; then
                break
            fi
            if ! pid_alive dockerd; then
                show_log_tail "$logfile"
                die "dockerd exited while starting; see $logfile"
                return 1
            fi
            sleep 1
        done
        if ! docker_answers; then
            show_log_tail "$logfile"
            die "dockerd did not answer on $DOCKER_SOCK within 60 s; see $logfile"
            return 1
        fi
        log "dockerd: answering on $DOCKER_SOCK after ${i}s"
    fi
    local driver
    driver=$(docker info --format '{{.Driver}}' 2>/dev/null || true)
    case "$driver" in
    overlay2) log "dockerd: storage driver overlay2" ;;
    devicemapper)
        die "dockerd uses the devicemapper storage driver (loop devices); configure overlay2 (/var/lib/docker on ext4/xfs)"
        return 1
        ;;
    *) log "dockerd: WARNING: storage driver is '${driver:-unknown}', expected overlay2" ;;
    esac
    if ! docker network ls >/dev/null 2>&1; then
        docker network ls >&2 || true
        show_log_tail "$logfile"
        die "'docker network ls' fails: Docker's networking (iptables) is broken"
        return 1
    fi
    log "dockerd: networking ok ($(docker network ls -q | wc -l) networks)"
}

# Makes sure an image exists locally that can be tagged and pushed: a busybox
# root filesystem imported with `docker import` (no registry needed).
ensure_busybox_image() {
    local name=$1
    if docker image inspect "$name" >/dev/null 2>&1; then
        return 0
    fi
    local dir
    dir=$(mktemp -d)
    mkdir -p "$dir/bin"
    cp /bin/busybox "$dir/bin/busybox"
    ln -s busybox "$dir/bin/sh"
    tar -C "$dir" -c . | docker import \
        --change 'CMD ["/bin/sh"]' - "$name" >/dev/null
    local rc=$?
    rm -rf "$dir"
    return $rc
}

registry_answers() {
    curl -fsS --max-time 5 "http://$CPI_TEST_REGISTRY/v2/" >/dev/null 2>&1
}

# Serves Debian's docker-registry on 127.0.0.1:5000 (plain http, no auth, data
# in /var/lib/cpi-test/registry/data) unless it already answers, then checks
# that `docker push` to it works.
start_registry() {
    local dir="$CPI_TEST_STATE_DIR/registry" logfile="$CPI_TEST_LOG_DIR/registry.log"
    if registry_answers; then
        log "registry: already answering on http://$CPI_TEST_REGISTRY/v2/"
    else
        command -v docker-registry >/dev/null || { die "docker-registry is not installed (run ensure_packages)"; return 1; }
        mkdir -p "$dir/data"
        cat >"$dir/config.yml" <<EOF
# Written by scripts/lib.sh (start_registry): a local, unauthenticated registry for tests.
version: 0.1
log:
  level: info
  fields:
    service: cpi-test-registry
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: $CPI_TEST_REGISTRY
  headers:
    X-Content-Type-Options: [nosniff]
EOF
        start_background registry "$logfile" docker-registry serve "$dir/config.yml"
        local i
        for i in $(seq 1 30); do
            if registry_answers; then
                break
            fi
            if ! pid_alive registry; then
                show_log_tail "$logfile"
                die "docker-registry exited while starting (is something else on $CPI_TEST_REGISTRY? Debian's docker-registry service: systemctl disable --now docker-registry); see $logfile"
                return 1
            fi
            sleep 1
        done
        if ! registry_answers; then
            show_log_tail "$logfile"
            die "registry did not answer on http://$CPI_TEST_REGISTRY/v2/ within 30 s; see $logfile"
            return 1
        fi
        log "registry: answering on http://$CPI_TEST_REGISTRY/v2/ after ${i}s"
    fi
    if ! docker_answers; then
        log "registry: WARNING: Docker is not running, push check skipped (call start_dockerd first)"
        return 0
    fi
    local local_name=cpi-test/busybox:1
    if ! ensure_busybox_image "$local_name"; then
        die "could not docker import a busybox image to push to the registry"
        return 1
    fi
    docker tag "$local_name" "$CPI_TEST_REGISTRY_IMAGE" || { die "docker tag failed"; return 1; }
    local out
    if ! out=$(docker push "$CPI_TEST_REGISTRY_IMAGE" 2>&1); then
        printf '%s\n' "$out" >&2
        show_log_tail "$logfile"
        die "docker push $CPI_TEST_REGISTRY_IMAGE failed"
        return 1
    fi
    log "registry: docker push $CPI_TEST_REGISTRY_IMAGE ok ($(printf '%s\n' "$out" | grep -o 'digest: sha256:[0-9a-f]*' | head -n1))"
}

# Removes the containerd backend's subnet bridges (bcpi*) that no interface is plugged
# into. Only for test machines, when no test runs: the backend keeps them on purpose.
remove_idle_cpi_bridges() {
    local dev name removed=0
    for dev in /sys/class/net/bcpi*; do
        [ -d "$dev/brif" ] || continue
        if [ -z "$(ls -A "$dev/brif")" ]; then
            name=$(basename "$dev")
            remove_cpi_bridge_rules "$name"
            ip link delete "$name" && removed=$((removed + 1))
        fi
    done
    log "bridges: removed $removed idle bcpi* bridge(s)"
}

# The host rules the containerd backend keeps for a bridge (FORWARD accept, outbound
# NAT), found by their comment `bcpi:<bridge>:<role>`; removed with the bridge.
remove_cpi_bridge_rules() {
    local bridge=$1 tool table chain rule rules
    for tool in iptables ip6tables; do
        command -v "$tool" >/dev/null || continue
        for table in filter:FORWARD nat:POSTROUTING; do
            chain=${table#*:}
            table=${table%%:*}
            # Printed as `-A FORWARD ... --comment "bcpi:<bridge>:in" -j ACCEPT`; the
            # words, quotes dropped, are the arguments of -D. No match is the usual
            # case (grep exits 1), not a failure.
            rules=$("$tool" -w -t "$table" -S "$chain" 2>/dev/null |
                grep -F -- "--comment \"bcpi:$bridge:" || true)
            while read -r rule; do
                [ -n "$rule" ] || continue
                rule=${rule//\"/}
                # shellcheck disable=SC2086 # the rule's words are iptables arguments
                "$tool" -w -t "$table" -D ${rule#-A } || true
            done <<<"$rules"
        done
    done
}

# Builds the `cpi` that the BOSH release ships and the benchmark measures, and prints
# its path: the release profile, glibc linked statically and not position-independent
# (`-C target-feature=+crt-static -C relocation-model=static`). Every CPI call is a
# fresh process, and such a binary skips the dynamic loader and the start-up
# relocations: `info` takes about half the time and ~1.5 MiB less peak RSS
# (docs/performance.md), and the binary runs on any glibc. `--target` keeps the flags
# off build scripts and proc macros (which must stay dynamic) and puts the binary in
# target/<host triple>/release/. On x86_64 the code the profiled calls run is placed
# first and side by side (CPI_LINK_ORDER=1, crates/cpi-bin/build.rs): a trivial call
# then maps ~2.5 instead of ~6.5 MiB of the binary. It reports how many names of
# crates/cpi-bin/link-order.txt the binary still has (scripts/link-order.sh rewrites
# the list). Extra arguments go to cargo (e.g. --locked).
build_release_cpi() {
    local triple target_dir bin order=0 listed placed list
    list="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/crates/cpi-bin/link-order.txt"
    triple=$(rustc -vV | sed -n 's/^host: //p')
    [ -n "$triple" ] || die "cannot tell the host's target triple from 'rustc -vV'"
    # The list is profiled on x86_64, and --symbol-ordering-file needs LLD, the
    # toolchain's default linker there (GNU ld elsewhere).
    if [ "$triple" = x86_64-unknown-linux-gnu ]; then order=1; fi
    log "cargo build --release --target $triple -p cpi-bin --bin cpi (static, non-PIE, link order: $([ $order = 1 ] && echo yes || echo "no, not x86_64"))"
    CPI_LINK_ORDER=$order RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
        cargo build --release --target "$triple" -p cpi-bin --bin cpi "$@" >&2 || return 1
    target_dir=$(cargo metadata --format-version 1 --no-deps 2>/dev/null | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p' || true)
    bin="${target_dir:-$(pwd)/target}/$triple/release/cpi"
    if [ $order = 1 ] && command -v nm >/dev/null; then
        listed=$(grep -c . "$list" || true)
        placed=$(nm --defined-only "$bin" | awk '{print $NF}' | sort -u |
            comm -12 - <(sort -u "$list") | grep -c . || true)
        log "link order: $placed of $listed listed functions are in the binary"
        if [ $((placed * 10)) -lt $((listed * 9)) ]; then
            log "WARNING: the link order is stale (a toolchain or dependency update renamed its functions): run scripts/link-order.sh"
        fi
    fi
    echo "$bin"
}
