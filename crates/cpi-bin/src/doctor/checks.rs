//! The host checks that only read: cgroups, capabilities, CNI plugins, loop devices,
//! `/lib/modules`. Each returns one [`Finding`]; the readings themselves are pure
//! functions in [`super::host`]. The checks that mount are in [`super::mounts`].

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::host::{self, Cgroup, Mount};
use super::report::{Finding, Status};

/// The CNI plugins the containerd backend runs, and what needs each. A manual IPv4
/// network's interface is made by the CPI itself over netlink: a host without
/// plugins runs such VMs, so a missing plugin is a warning that names what fails.
pub const CNI_PLUGINS: [(&str, &str); 5] = [
    ("bridge", "dynamic and IPv6 networks"),
    ("host-local", "dynamic networks"),
    ("static", "IPv6 manual networks"),
    ("portmap", "VMs with `ports`"),
    (
        "loopback",
        "deleting VMs made by versions before `lo` came up over netlink",
    ),
];

/// This process's mount table (empty when unreadable).
pub fn mount_table() -> Vec<Mount> {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|t| host::parse_mountinfo(&t))
        .unwrap_or_default()
}

/// The cgroup hierarchies under `/sys/fs/cgroup` that are mounted read-only here
/// (`statvfs` reports `ST_RDONLY`), as a container that is not privileged sees them
/// on cgroup v1.
pub fn read_only_cgroups(table: &[Mount]) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    table
        .iter()
        .filter(|m| {
            (m.fs_type == "cgroup" || m.fs_type == "cgroup2") && m.mount_point.starts_with(root)
        })
        .filter(|m| {
            rustix::fs::statvfs(&m.mount_point)
                .is_ok_and(|s| s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
        })
        .map(|m| m.mount_point.clone())
        .collect()
}

/// cgroup v1, hybrid or v2, from the mount table, and whether runc can create the
/// VMs' cgroups: `read_only` lists the hierarchies mounted read-only here
/// ([`read_only_cgroups`]); `daemon_here` says whether the daemon shares this mount
/// namespace (`None`: not visible from here). Read-only hierarchies block only when
/// the daemon's runc sees them too.
pub fn cgroup(table: &[Mount], read_only: &[PathBuf], daemon_here: Option<bool>) -> Finding {
    let layout = host::cgroup_layout(table);
    let f = match layout {
        Cgroup::V1 => Finding::new("cgroup", Status::Ok, "cgroup v1 (every controller a v1 hierarchy under /sys/fs/cgroup); runit and systemd VMs both supported, /sys/fs/cgroup is never bound into VMs"),
        Cgroup::Hybrid => Finding::new("cgroup", Status::Ok, "cgroup v1 (hybrid: v1 controllers under /sys/fs/cgroup, cgroup2 only at /sys/fs/cgroup/unified); handled as v1, /sys/fs/cgroup is never bound into VMs"),
        Cgroup::V2 => Finding::new("cgroup", Status::Ok, "cgroup v2 (unified at /sys/fs/cgroup); systemd VMs get the host cgroup namespace and a writable /sys/fs/cgroup"),
        Cgroup::None => Finding::new("cgroup", Status::Blocker, "no cgroup filesystem at /sys/fs/cgroup")
            .fix("mount the cgroup hierarchy (in a container: run it privileged, or with --cgroupns=host on a cgroup v2 host)"),
    };
    let f = f.detail("layout", layout.name());
    if read_only.is_empty() || layout == Cgroup::None {
        return f;
    }
    let list = read_only
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let (status, consequence) = if daemon_here == Some(true) {
        (
            Status::Blocker,
            "runc, started by the daemon in this mount namespace, cannot create the VMs' cgroups (`mkdir /sys/fs/cgroup/...: read-only file system`) and every create_vm fails",
        )
    } else {
        (
            Status::Warn,
            "harmless only if the daemon runs elsewhere (its runc must see writable cgroups)",
        )
    };
    let fix = if layout == Cgroup::V2 {
        "run the CI container privileged, or remount the hierarchy read-write inside it before starting the daemon: mount -o remount,rw /sys/fs/cgroup"
    } else {
        "run the CI container privileged, or remount each hierarchy read-write inside it before starting the daemon: for d in /sys/fs/cgroup/*; do mountpoint -q $d && mount -o remount,bind,rw $d; done"
    };
    Finding {
        status,
        summary: format!(
            "{}; but mounted read-only here: {list}: {consequence}",
            f.summary
        ),
        fix: fix.to_owned(),
        ..f
    }
    .detail("read_only", list)
}

/// The capability bounding set of this process (a local daemon's runtime shares it).
pub fn capabilities() -> Finding {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let Some(mask) = host::cap_bnd(&status) else {
        return Finding::new(
            "capabilities",
            Status::Warn,
            "cannot read CapBnd from /proc/self/status",
        )
        .fix("run on Linux with /proc mounted");
    };
    let last_cap = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    let missing = host::missing_caps(mask, last_cap);
    let f = if missing.is_empty() {
        Finding::new(
            "capabilities",
            Status::Ok,
            format!("the bounding set holds all {} capabilities of the kernel; VMs run fully privileged", last_cap + 1),
        )
    } else if missing.iter().any(|c| c == host::REQUIRED_CAP) {
        Finding::new(
            "capabilities",
            Status::Blocker,
            format!("CAP_SYS_ADMIN is not in the bounding set: live disk attach, the CPI's mounts and the agent need it; missing: {}", missing.join(", ")),
        )
        .fix("run the CPI and the runtime with CAP_SYS_ADMIN (in a container: --privileged, or --cap-add SYS_ADMIN)")
    } else {
        Finding::new(
            "capabilities",
            Status::Warn,
            format!("VMs get every capability the host has; these are missing: {}", missing.join(", ")),
        )
        .fix("nothing to do unless a job needs them; to grant them, run the CPI and its daemon where the bounding set has them (in a CI container: --privileged or --cap-add, on a host that has them)")
    };
    f.detail("cap_bnd", format!("{mask:016x}"))
        .detail("cap_last_cap", last_cap)
        .detail("missing", missing)
}

/// The CNI plugins in `cni_bin_dir` (containerd backend).
pub fn cni(dir: &Path) -> Finding {
    let executable = |name: &str| {
        fs::metadata(dir.join(name))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let missing: Vec<(&str, &str)> = CNI_PLUGINS
        .iter()
        .copied()
        .filter(|(n, _)| !executable(n))
        .collect();
    let all: Vec<&str> = CNI_PLUGINS.iter().map(|(n, _)| *n).collect();
    let f = Finding::new(
        "cni",
        Status::Ok,
        format!(
            "CNI plugins present in {}: {}",
            dir.display(),
            all.join(", ")
        ),
    )
    .detail("cni_bin_dir", dir.display().to_string())
    .detail(
        "missing",
        missing.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
    );
    if missing.is_empty() {
        return f;
    }
    let needs: Vec<String> = missing
        .iter()
        .map(|(n, what)| format!("{n} ({what})"))
        .collect();
    Finding {
        status: Status::Warn,
        summary: format!(
            "CNI plugins missing from {}: {}; manual IPv4 networks need none",
            dir.display(),
            needs.join(", ")
        ),
        ..f
    }
    .fix("install containernetworking-plugins (Debian/Ubuntu: apt-get install containernetworking-plugins) or set containerd.cni_bin_dir to where they are")
}

/// Loop devices: reported, never needed.
pub fn loop_devices() -> Finding {
    let control = Path::new("/dev/loop-control").exists();
    let count = fs::read_dir("/dev")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.strip_prefix("loop")
                        .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
                })
                .count()
        })
        .unwrap_or(0);
    Finding::new(
        "loop",
        Status::Ok,
        format!(
            "not needed (this CPI uses no loop devices or filesystem images); found {count} /dev/loopN, /dev/loop-control {}",
            if control { "present" } else { "absent" }
        ),
    )
    .detail("loop_devices", count)
    .detail("loop_control", control)
}

/// `/lib/modules` for the running kernel (bound read-only into VMs).
pub fn modules() -> Finding {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let dir = Path::new("/lib/modules");
    let f = Finding::new("modules", Status::Ok, "").detail("kernel", release.clone());
    let fix = "install the running kernel's modules at /lib/modules (in a CI container: bind the host's, -v /lib/modules:/lib/modules:ro); VMs see them at /usr/lib/modules";
    if !dir.is_dir() {
        return Finding {
            status: Status::Warn,
            summary:
                "/lib/modules is absent: VMs will not see kernel modules (jobs that modprobe fail)"
                    .into(),
            ..f
        }
        .fix(fix);
    }
    if !release.is_empty() && !dir.join(&release).is_dir() {
        return Finding { status: Status::Warn, summary: format!("/lib/modules has no directory for the running kernel {release}: modprobe in VMs will fail"), ..f }.fix(fix);
    }
    Finding {
        summary: format!(
            "/lib/modules/{release} present; bound read-only at /usr/lib/modules in VMs"
        ),
        ..f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_cni_plugins_warn_and_name_what_needs_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = cni(dir.path());
        // Manual IPv4 networks need no plugin: a warning, not a blocker.
        assert_eq!(f.status, Status::Warn);
        assert!(
            f.summary.contains("bridge (dynamic and IPv6 networks)")
                && f.summary.contains("host-local (dynamic networks)")
                && f.summary.contains("manual IPv4 networks need none"),
            "{}",
            f.summary
        );
        for (name, _) in CNI_PLUGINS.iter().filter(|(n, _)| *n != "portmap") {
            let path = dir.path().join(name);
            fs::write(&path, b"#!/bin/sh\n").expect("write");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let f = cni(dir.path());
        assert_eq!(f.status, Status::Warn, "{f:?}");
        assert!(
            f.summary.contains("portmap (VMs with `ports`)"),
            "{}",
            f.summary
        );
        assert!(!f.summary.contains("bridge"), "{}", f.summary);
        let path = dir.path().join("portmap");
        fs::write(&path, b"").expect("write");
        // Not executable: still missing.
        assert_eq!(cni(dir.path()).status, Status::Warn);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(cni(dir.path()).status, Status::Ok);
    }

    #[test]
    fn read_only_cgroups_block_only_when_the_daemon_is_here() {
        let table = host::parse_mountinfo(
            "95 94 0:29 /docker/x /sys/fs/cgroup/cpu ro,nosuid - cgroup cgroup rw,cpu\n\
             98 94 0:32 /docker/x /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory\n",
        );
        let ro = [PathBuf::from("/sys/fs/cgroup/cpu")];
        assert_eq!(cgroup(&table, &[], Some(true)).status, Status::Ok);
        let f = cgroup(&table, &ro, Some(true));
        assert_eq!(f.status, Status::Blocker, "{f:?}");
        assert!(f.summary.contains("/sys/fs/cgroup/cpu"), "{}", f.summary);
        assert!(f.fix.contains("remount,bind,rw"), "{}", f.fix);
        assert_eq!(cgroup(&table, &ro, Some(false)).status, Status::Warn);
        assert_eq!(cgroup(&table, &ro, None).status, Status::Warn);
    }

    #[test]
    fn loop_devices_are_never_required() {
        let f = loop_devices();
        assert_eq!(f.status, Status::Ok);
        assert!(f.summary.starts_with("not needed"));
    }
}
