//! Facts about the host the CPI runs on (beside containerd): the capability bounding
//! set a VM may be granted, the cgroup version, where kernel modules live.
//!
//! Parsing is pure and unit-tested; the readers are thin.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Capability;

use crate::error::{ContainerdError, Result};

/// The capabilities by bit number, as the kernel numbers them (`linux/capability.h`).
const CAPABILITIES: [Capability; 41] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::DacReadSearch,
    Capability::Fowner,
    Capability::Fsetid,
    Capability::Kill,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setpcap,
    Capability::LinuxImmutable,
    Capability::NetBindService,
    Capability::NetBroadcast,
    Capability::NetAdmin,
    Capability::NetRaw,
    Capability::IpcLock,
    Capability::IpcOwner,
    Capability::SysModule,
    Capability::SysRawio,
    Capability::SysChroot,
    Capability::SysPtrace,
    Capability::SysPacct,
    Capability::SysAdmin,
    Capability::SysBoot,
    Capability::SysNice,
    Capability::SysResource,
    Capability::SysTime,
    Capability::SysTtyConfig,
    Capability::Mknod,
    Capability::Lease,
    Capability::AuditWrite,
    Capability::AuditControl,
    Capability::Setfcap,
    Capability::MacOverride,
    Capability::MacAdmin,
    Capability::Syslog,
    Capability::WakeAlarm,
    Capability::BlockSuspend,
    Capability::AuditRead,
    Capability::Perfmon,
    Capability::Bpf,
    Capability::CheckpointRestore,
];

/// The `CapBnd` mask of a `/proc/<pid>/status` text.
pub fn parse_cap_bnd(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// The capabilities in `mask`, in bit order, and the bit numbers we have no name for
/// (newer kernels): those are left out of the spec, since runc would refuse them.
pub fn capabilities_of(mask: u64) -> (Vec<Capability>, Vec<u32>) {
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for bit in 0..64u32 {
        if mask & (1u64 << bit) == 0 {
            continue;
        }
        match CAPABILITIES.get(bit as usize) {
            Some(cap) => known.push(*cap),
            None => unknown.push(bit),
        }
    }
    (known, unknown)
}

/// The capability bounding set of this process. The CPI runs beside containerd, so a
/// VM may be granted exactly these: asking runc for more makes it fail.
pub fn bounding_set() -> Result<u64> {
    let path = "/proc/self/status";
    let text = std::fs::read_to_string(path)
        .map_err(|e| ContainerdError::io("reading the capability bounding set from", path, e))?;
    parse_cap_bnd(&text)
        .ok_or_else(|| ContainerdError::Refused(format!("{path} has no readable CapBnd line")))
}

/// Which cgroup hierarchy the host mounts at `/sys/fs/cgroup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// cgroup v1 (legacy or hybrid): `/sys/fs/cgroup` is a tmpfs of controllers.
    V1,
    /// cgroup v2 (unified), as on Ubuntu Noble.
    V2,
}

impl CgroupMode {
    /// Detects the mode: v2 when `/sys/fs/cgroup/cgroup.controllers` exists (the root
    /// of a unified hierarchy), v1 otherwise (including hybrid, whose unified tree
    /// lives below `/sys/fs/cgroup/unified`).
    pub fn detect() -> CgroupMode {
        Self::detect_at(Path::new("/sys/fs/cgroup"))
    }

    /// [`CgroupMode::detect`] for another mount point (tests).
    pub fn detect_at(root: &Path) -> CgroupMode {
        if root.join("cgroup.controllers").exists() {
            CgroupMode::V2
        } else {
            CgroupMode::V1
        }
    }
}

/// The host's kernel modules directory, when there is one to show VMs.
pub fn host_modules_dir() -> Option<PathBuf> {
    ["/lib/modules", "/usr/lib/modules"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_dir())
}

/// Nameservers of the host's `/etc/resolv.conf` text, without loopback addresses
/// (a local stub resolver is unreachable from a VM's network namespace).
pub fn host_nameservers(resolv_conf: &str) -> Vec<std::net::IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<std::net::IpAddr>().ok())
        .filter(|ip| !ip.is_loopback())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machines_bounding_set_lacks_sys_resource() {
        let status = "Name:\tcat\nCapInh:\t0000000000000000\nCapBnd:\t000001fffeffffff\n";
        let mask = parse_cap_bnd(status).expect("mask");
        let (caps, unknown) = capabilities_of(mask);
        assert!(unknown.is_empty());
        assert_eq!(caps.len(), 40);
        assert!(!caps.contains(&Capability::SysResource));
        assert!(caps.contains(&Capability::SysAdmin));
        assert!(caps.contains(&Capability::CheckpointRestore));
    }

    #[test]
    fn names_match_the_kernel_numbering() {
        // Spot checks against linux/capability.h.
        let name = |bit: u64| {
            let (caps, _) = capabilities_of(1 << bit);
            serde_json::to_value(caps[0]).expect("json")
        };
        assert_eq!(name(0), "CAP_CHOWN");
        assert_eq!(name(12), "CAP_NET_ADMIN");
        assert_eq!(name(21), "CAP_SYS_ADMIN");
        assert_eq!(name(24), "CAP_SYS_RESOURCE");
        assert_eq!(name(27), "CAP_MKNOD");
        assert_eq!(name(37), "CAP_AUDIT_READ");
        assert_eq!(name(40), "CAP_CHECKPOINT_RESTORE");
    }

    #[test]
    fn unknown_bits_are_reported_not_granted() {
        let (caps, unknown) = capabilities_of((1 << 41) | 1);
        assert_eq!(caps, vec![Capability::Chown]);
        assert_eq!(unknown, vec![41]);
        assert_eq!(parse_cap_bnd("Name: x\n"), None);
    }

    #[test]
    fn cgroup_mode_by_marker_file() {
        let dir = std::env::temp_dir().join(format!("cgtest-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        assert_eq!(CgroupMode::detect_at(&dir), CgroupMode::V1);
        std::fs::write(dir.join("cgroup.controllers"), "cpu memory\n").expect("write");
        assert_eq!(CgroupMode::detect_at(&dir), CgroupMode::V2);
        std::fs::remove_dir_all(&dir).expect("rm");
    }

    #[test]
    fn host_nameservers_skip_loopback() {
        let text = "# c\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nsearch x\nnameserver ::1\nnameserver fd00::1\n";
        let got: Vec<String> = host_nameservers(text)
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(got, vec!["10.0.0.2", "fd00::1"]);
    }
}
