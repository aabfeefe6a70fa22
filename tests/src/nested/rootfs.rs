//! The outer container's root filesystem, built as a tar (no registry, nothing
//! downloaded), and the script that sets the container up.

use std::path::PathBuf;

/// Makes the outer container as privileged as `--privileged` would (where the host
/// allows), then starts containerd and, with argument `docker`, dockerd. Run as
/// `sh /nested/setup.sh BACKEND` inside the outer container.
pub const SETUP_SCRIPT: &str = r#"#!/bin/sh
# Written by cpi-tests (tests/src/nested/rootfs.rs). Runs inside the outer container.
set -eu
backend=$1
# A container that is not --privileged gets /sys and (cgroup v1) every cgroup
# hierarchy read-only; runc must create the VMs' cgroups, so remount them
# read-write (CAP_SYS_ADMIN suffices). The hierarchies stay rooted at the outer
# container's own cgroup: the VMs' cgroups nest below it.
mount -o remount,rw /sys
for d in /sys/fs/cgroup/*; do
    if mountpoint -q "$d"; then
        mount -o remount,bind,rw "$d"
    fi
done
if [ "$(stat -f -c %T /sys/fs/cgroup)" = cgroup2fs ]; then
    mount -o remount,rw /sys/fs/cgroup
fi
wait_for() {
    what=$1 log=$2
    shift 2
    i=0
    until "$@" >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -gt 120 ]; then
            echo "$what did not answer within 60 s; last lines of $log:" >&2
            tail -n 40 "$log" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "$what answers after $i tries"
}
setsid containerd --config /etc/containerd/config.toml </dev/null >/var/log/containerd.log 2>&1 &
wait_for containerd /var/log/containerd.log ctr version
status=$(ctr plugins ls | awk '$1 == "io.containerd.snapshotter.v1" && $2 == "overlayfs" {print $NF}')
if [ "$status" != ok ]; then
    echo "containerd's overlayfs snapshotter is '$status', not ok:" >&2
    ctr plugins ls >&2
    exit 1
fi
echo "containerd: overlayfs snapshotter ok on $(stat -f -c %T /var/lib/containerd)"
if [ "$backend" = docker ]; then
    setsid dockerd --host unix:///var/run/docker.sock \
        --containerd=/run/containerd/containerd.sock \
        --data-root /var/lib/docker --pidfile /var/run/docker.pid \
        </dev/null >/var/log/dockerd.log 2>&1 &
    wait_for dockerd /var/log/dockerd.log docker version
    driver=$(docker info --format '{{.Driver}}')
    if [ "$driver" != overlay2 ]; then
        echo "dockerd storage driver is '$driver', not overlay2" >&2
        exit 1
    fi
    echo "dockerd: storage driver overlay2 on $(stat -f -c %T /var/lib/docker)"
fi
"#;

/// The inner containerd's config: default paths, overlayfs, no CRI.
pub const CONTAINERD_CONFIG: &str = r#"# Written by cpi-tests (tests/src/nested/rootfs.rs).
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "/run/containerd/containerd.sock"
"#;

/// The outer container's root filesystem as a tar: the merged-`/usr` symlinks of
/// Debian 12 (so the host's `/usr`, bound in, provides every program and library),
/// the dynamic loader's cache and `/etc/alternatives` copied from this machine (the
/// binaries in `/usr` need them), a minimal `/etc`, the inner containerd's config
/// and [`SETUP_SCRIPT`].
pub fn rootfs_tar() -> std::io::Result<Vec<u8>> {
    use tar::{EntryType, Header};
    let mut tar = tar::Builder::new(Vec::new());
    let header = |kind: EntryType, mode: u32, size: u64| {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    };
    for (dir, mode) in [
        ("usr", 0o755),
        ("etc", 0o755),
        ("etc/containerd", 0o755),
        ("etc/alternatives", 0o755),
        ("etc/ld.so.conf.d", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("run", 0o755),
        ("tmp", 0o1777),
        ("var", 0o755),
        ("var/lib", 0o755),
        ("var/log", 0o755),
        ("var/tmp", 0o1777),
        ("root", 0o700),
        ("mnt", 0o755),
        ("nested", 0o755),
        ("nested/bin", 0o755),
    ] {
        let mut h = header(EntryType::Directory, mode, 0);
        tar.append_data(&mut h, format!("{dir}/"), std::io::empty())?;
    }
    let mut links: Vec<(String, PathBuf)> = [
        ("bin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
        ("sbin", "usr/sbin"),
        ("var/run", "/run"),
    ]
    .iter()
    .map(|(l, t)| ((*l).to_owned(), PathBuf::from(t)))
    .collect();
    for entry in std::fs::read_dir("/etc/alternatives")?.flatten() {
        if let Ok(target) = std::fs::read_link(entry.path()) {
            links.push((
                format!("etc/alternatives/{}", entry.file_name().to_string_lossy()),
                target,
            ));
        }
    }
    for (link, target) in links {
        let mut h = header(EntryType::Symlink, 0o777, 0);
        tar.append_link(&mut h, link, target)?;
    }
    let mut files: Vec<(String, Vec<u8>, u32)> = vec![
        (
            "etc/passwd".into(),
            b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
            0o644,
        ),
        ("etc/group".into(), b"root:x:0:\n".to_vec(), 0o644),
        (
            "etc/nsswitch.conf".into(),
            b"passwd: files\ngroup: files\nhosts: files dns\n".to_vec(),
            0o644,
        ),
        ("etc/hosts".into(), b"127.0.0.1 localhost\n".to_vec(), 0o644),
        ("etc/resolv.conf".into(), Vec::new(), 0o644),
        ("etc/hostname".into(), b"nested\n".to_vec(), 0o644),
        (
            "etc/containerd/config.toml".into(),
            CONTAINERD_CONFIG.as_bytes().to_vec(),
            0o644,
        ),
        (
            "nested/setup.sh".into(),
            SETUP_SCRIPT.as_bytes().to_vec(),
            0o755,
        ),
    ];
    for copied in [
        "/etc/ld.so.cache",
        "/etc/ld.so.conf",
        "/etc/protocols",
        "/etc/services",
    ] {
        if let Ok(bytes) = std::fs::read(copied) {
            files.push((copied.trim_start_matches('/').to_owned(), bytes, 0o644));
        }
    }
    for entry in std::fs::read_dir("/etc/ld.so.conf.d")?.flatten() {
        if let Ok(bytes) = std::fs::read(entry.path()) {
            files.push((
                format!("etc/ld.so.conf.d/{}", entry.file_name().to_string_lossy()),
                bytes,
                0o644,
            ));
        }
    }
    for (path, bytes, mode) in files {
        let mut h = header(EntryType::Regular, mode, bytes.len() as u64);
        tar.append_data(&mut h, path, bytes.as_slice())?;
    }
    tar.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_filesystem_has_merged_usr_links_and_the_setup() {
        let tar = rootfs_tar().expect("tar");
        let mut archive = tar::Archive::new(tar.as_slice());
        let mut links = Vec::new();
        let mut files = Vec::new();
        for entry in archive.entries().expect("entries") {
            let entry = entry.expect("entry");
            let path = entry.path().expect("path").to_string_lossy().into_owned();
            if let Ok(Some(target)) = entry.link_name() {
                links.push((path, target.to_string_lossy().into_owned()));
            } else {
                files.push(path);
            }
        }
        for (link, target) in [
            ("bin", "usr/bin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
            ("sbin", "usr/sbin"),
            ("var/run", "/run"),
        ] {
            assert!(
                links.iter().any(|(l, t)| l == link && t == target),
                "{link} -> {target} missing: {links:?}"
            );
        }
        for file in [
            "nested/setup.sh",
            "etc/containerd/config.toml",
            "etc/passwd",
            "etc/ld.so.cache",
        ] {
            assert!(files.iter().any(|f| f == file), "{file} missing: {files:?}");
        }
        assert!(SETUP_SCRIPT.contains("mount -o remount,bind,rw"));
    }
}
