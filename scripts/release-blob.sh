#!/usr/bin/env bash
# Builds the `cpi` executable that the BOSH release ships as a blob, and adds it to
# release/ the way `bosh add-blob` does (blobs/<path> plus an entry in
# config/blobs.yml).
#
#   bash scripts/release-blob.sh            # then: cd release && bosh create-release --force --tarball ...
#
# The release contains no compiler: BOSH compilation VMs (and the host running
# `bosh create-env`) have no network and no Rust toolchain, so the package installs
# this prebuilt binary (docs/bosh-release.md explains the choice).
#
# With the bosh CLI on PATH it runs `bosh add-blob`; without it, it writes the same
# two things itself (the binary under release/blobs/ and its size and SHA-1 in
# release/config/blobs.yml), so `bosh create-release` later finds the blob.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
# RELEASE_DIR: another release directory (a copy, for trying this out).
RELEASE="${RELEASE_DIR:-$ROOT/release}"

die() { echo "release-blob.sh: $*" >&2; exit 1; }

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64) arch=amd64 ;;
  Linux/aarch64) arch=arm64 ;;
  *) die "build on Linux (x86_64 or aarch64); this is $(uname -s)/$(uname -m)" ;;
esac
blob_path="container-cpi/cpi-linux-${arch}"

command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain with rustup"
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"
# Static and non-PIE (see build_release_cpi): it needs no glibc of the stemcell's,
# so it runs on every stemcell, and a call starts faster. libc6-dev provides libc.a.
bin=$(build_release_cpi --locked) || die "the build failed"
[ -x "$bin" ] || die "$bin was not built"
if command -v file >/dev/null && ! file "$bin" | grep -q 'statically linked'; then
  die "$bin is not statically linked: $(file -b "$bin")"
fi

staged=$(mktemp)
trap 'rm -f "$staged"' EXIT
cp "$bin" "$staged"
if command -v strip >/dev/null; then strip "$staged"; fi
chmod 0755 "$staged"
"$staged" --version >/dev/null || die "the built binary does not run"

cd "$RELEASE"
if command -v bosh >/dev/null; then
  bosh add-blob "$staged" "$blob_path"
else
  mkdir -p "blobs/$(dirname "$blob_path")"
  cp "$staged" "blobs/$blob_path"
  size=$(stat -c %s "blobs/$blob_path")
  sha=$(sha1sum "blobs/$blob_path" | cut -d' ' -f1)
  # Keep other blobs' entries; replace this path's entry. An entry without
  # object_id is a blob not yet uploaded, exactly what `bosh add-blob` writes.
  ruby -ryaml -e '
    path, size, sha = ARGV
    index = YAML.safe_load(File.read("config/blobs.yml")) || {}
    index[path] = { "size" => Integer(size), "sha" => sha }
    File.write("config/blobs.yml", YAML.dump(index.sort.to_h))
  ' "$blob_path" "$size" "$sha"
  echo "release-blob.sh: bosh CLI not found; wrote $RELEASE/blobs/$blob_path and its entry in $RELEASE/config/blobs.yml" >&2
fi
echo "release-blob.sh: added $blob_path ($(stat -c %s "$staged") bytes)" >&2
echo "release-blob.sh: next: cd release && bosh create-release --force --tarball /tmp/bosh-container-cpi.tgz" >&2
