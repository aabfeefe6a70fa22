#!/usr/bin/env bash
# Writes crates/cpi-bin/link-order.txt: the functions the release `cpi` runs, in the
# order the linker should place them (docs/performance.md, "Link order").
#
#   bash scripts/link-order.sh          # needs root, starts dockerd and containerd
#
# Builds the release binary, makes a stemcell, a VM and a disk on each backend through
# it, and runs every call of a VM's life under valgrind's callgrind, which records each
# function a call executed (exactly, not sampled). The list puts first the functions
# that most of the trivial calls (info, has_vm, has_disk, get_disks, hit and miss) ran,
# then the rest of the trivial calls', then what only the other calls ran. Only names
# the binary defines are kept. Run it again after a toolchain or dependency update:
# `build_release_cpi` reports how many listed names the binary still has.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

[ "$(id -u)" = 0 ] || die "run it as root (the daemons, mounts and network namespaces)"
ensure_packages
if ! command -v valgrind >/dev/null; then
    log "installing valgrind (callgrind records which functions a call runs)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q valgrind >&2 ||
        die "cannot install valgrind"
fi
start_containerd
start_dockerd

bin=$(build_release_cpi) || die "the release build failed"
work=$(mktemp -d /tmp/cpi-link-order.XXXXXX)
docker_net=bcpi-link-order
cleanup() {
    local rc=$?
    set +e
    for b in docker containerd; do
        [ -f "$work/$b.cfg" ] || continue
        for what in disk vm stemcell; do
            [ -s "$work/$b.$what" ] || continue
            request "delete_$what" "[\"$(cat "$work/$b.$what")\"]" |
                "$bin" -configPath "$work/$b.cfg" >/dev/null 2>&1
        done
    done
    docker network rm "$docker_net" >/dev/null 2>&1
    ctr namespaces rm bcpi-link-order >/dev/null 2>&1
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT

# request METHOD ARGS_JSON: a CPI request as the director sends it.
request() {
    printf '{"method":"%s","arguments":%s,"context":{"director_uuid":"link-order"},"api_version":2}' "$1" "$2"
}

# profile NAME BACKEND METHOD ARGS_JSON: runs the call under callgrind; its answer
# is in $work/NAME.out.
profile() {
    request "$3" "$4" >"$work/req.json"
    valgrind --tool=callgrind --demangle=no --callgrind-out-file="$work/$1.cg" \
        "$bin" -configPath "$work/$2.cfg" <"$work/req.json" >"$work/$1.out" 2>"$work/$1.vg" ||
        die "$1: valgrind failed: $(tail -3 "$work/$1.vg")"
    python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
if r.get("error"):
    sys.exit("%s: %s" % (sys.argv[2], r["error"]["message"]))' "$work/$1.out" "$1"
}

# cid NAME: the cid a profiled create answered (create_vm: the list's first item).
cid() {
    python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))["result"]
print(r[0] if isinstance(r, list) else r)' "$work/$1.out"
}

# A stemcell of busybox whose init sleeps: the VM must only stay up.
rootfs=$work/rootfs
mkdir -p "$rootfs/bin" "$rootfs/sbin" "$rootfs/usr/sbin" "$rootfs/etc" "$rootfs/var/vcap/bosh"
cp /bin/busybox "$rootfs/bin/busybox"
ln -s busybox "$rootfs/bin/sh"
ln -s busybox "$rootfs/bin/sleep"
printf '#!/bin/sh\nexec sleep 1000000\n' >"$rootfs/sbin/init"
chmod 0755 "$rootfs/sbin/init"
cp "$rootfs/sbin/init" "$rootfs/usr/sbin/runsvdir-start"
tar -C "$rootfs" -czf "$work/image" .
cat >"$work/stemcell.MF" <<EOF
name: bosh-warden-boshlite-ubuntu-jammy-go_agent
version: "0.0.1"
operating_system: ubuntu-jammy
sha1: $(sha1sum "$work/image" | cut -d' ' -f1)
cloud_properties: {}
EOF

docker network rm "$docker_net" >/dev/null 2>&1 || true
docker network create --subnet 10.197.0.0/24 "$docker_net" >/dev/null
cat >"$work/docker.cfg" <<EOF
{"backend":"docker","agent":{"mbus":"https://mbus:mbus-password@0.0.0.0:6868","ntp":[]},
 "docker":{"host":"unix:///var/run/docker.sock"}}
EOF
cat >"$work/containerd.cfg" <<EOF
{"backend":"containerd","agent":{"mbus":"https://mbus:mbus-password@0.0.0.0:6868","ntp":[]},
 "containerd":{"socket":"/run/containerd/containerd.sock","namespace":"bcpi-link-order",
   "snapshotter":"overlayfs","state_dir":"$work/containerd-state","cni_bin_dir":"/usr/lib/cni"}}
EOF

network() { # NETWORK_NAME SUBNET_PREFIX
    printf '{"default":{"type":"manual","ip":"%s.10","netmask":"255.255.255.0","gateway":"%s.1","dns":["%s.2"],"default":["dns","gateway"],"cloud_properties":{"name":"%s"}}}' \
        "$2" "$2" "$2" "$1"
}

trivial=()
other=()
for b in docker containerd; do
    case $b in
    docker) net=$(network "$docker_net" 10.197.0) ;;
    containerd) net=$(network bcpi-lo 10.197.1) ;;
    esac
    log "$b: profiling a VM's life"
    # The files name what the clean-up must delete should a later step fail.
    profile "$b-create_stemcell" "$b" create_stemcell "[\"$work/image\",{}]"
    cid "$b-create_stemcell" >"$work/$b.stemcell"
    stemcell=$(cat "$work/$b.stemcell")
    profile "$b-create_vm" "$b" create_vm "[\"agent-link-order\",\"$stemcell\",{},$net,[],{}]"
    cid "$b-create_vm" >"$work/$b.vm"
    vm=$(cat "$work/$b.vm")
    profile "$b-create_disk" "$b" create_disk "[1024,{},\"$vm\"]"
    cid "$b-create_disk" >"$work/$b.disk"
    disk=$(cat "$work/$b.disk")
    profile "$b-info" "$b" info "[]"
    profile "$b-has_vm" "$b" has_vm "[\"$vm\"]"
    profile "$b-has_vm_miss" "$b" has_vm "[\"vm-00000000-0000-4000-8000-000000000000\"]"
    profile "$b-has_disk" "$b" has_disk "[\"$disk\"]"
    profile "$b-get_disks" "$b" get_disks "[\"$vm\"]"
    profile "$b-attach_disk" "$b" attach_disk "[\"$vm\",\"$disk\"]"
    profile "$b-get_disks_attached" "$b" get_disks "[\"$vm\"]"
    profile "$b-set_vm_metadata" "$b" set_vm_metadata "[\"$vm\",{\"director\":\"link-order\",\"name\":\"z/0\"}]"
    profile "$b-detach_disk" "$b" detach_disk "[\"$vm\",\"$disk\"]"
    profile "$b-delete_disk" "$b" delete_disk "[\"$disk\"]"
    rm -f "$work/$b.disk"
    profile "$b-delete_vm" "$b" delete_vm "[\"$vm\"]"
    rm -f "$work/$b.vm"
    profile "$b-delete_stemcell" "$b" delete_stemcell "[\"$stemcell\"]"
    rm -f "$work/$b.stemcell"
    trivial+=("$work/$b-info.cg" "$work/$b-has_vm.cg" "$work/$b-has_vm_miss.cg"
        "$work/$b-has_disk.cg" "$work/$b-get_disks.cg" "$work/$b-get_disks_attached.cg")
    for m in create_stemcell create_vm create_disk attach_disk set_vm_metadata detach_disk \
        delete_disk delete_vm delete_stemcell; do
        other+=("$work/$b-$m.cg")
    done
done

nm --defined-only "$bin" | awk '{print $NF}' | sort -u >"$work/defined"
out=crates/cpi-bin/link-order.txt
python3 - "$work/defined" "$out" "${#trivial[@]}" "${trivial[@]}" "${other[@]}" <<'EOF'
import re, sys
defined = set(open(sys.argv[1]).read().split())
out, n_trivial, files = sys.argv[2], int(sys.argv[3]), sys.argv[4:]

def functions(path):
    """The functions a callgrind profile ran ("fn=(id) name", later "fn=(id")."""
    names, found = {}, set()
    for line in open(path, errors="replace"):
        m = re.match(r"^c?fn=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
        if not m:
            continue
        if m.group(2):
            names[m.group(1)] = m.group(2).split("'")[0]
        name = names.get(m.group(1))
        if name in defined:
            found.add(name)
    return found

count, ran = {}, set()
for i, path in enumerate(files):
    for name in functions(path):
        if i < n_trivial:
            count[name] = count.get(name, 0) + 1
        ran.add(name)
# Within a tier, by name: the order callgrind lists functions in varies from run to
# run, and a sorted list only changes where the code did.
trivial = sorted(count, key=lambda n: (-count[n], n))
rest = sorted(ran - count.keys())
with open(out, "w") as f:
    for name in trivial + rest:
        f.write(name + "\n")
print(f"{out}: {len(trivial)} functions of the trivial calls, then {len(rest)} more", file=sys.stderr)
EOF
log "done; rebuild with build_release_cpi to link in this order"
