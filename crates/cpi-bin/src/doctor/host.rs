//! Pure readings of the host: capability names from a `CapBnd` mask, the cgroup
//! version from the mount table, the mount that holds a path. No IO here: the
//! callers pass the text of `/proc/self/status` and `/proc/self/mountinfo`, so every
//! function is unit-tested on captured text.

use std::path::Path;

use backend_docker::capabilities::CAP_NAMES;

/// The capability live disk attach and the agent need.
pub const REQUIRED_CAP: &str = "CAP_SYS_ADMIN";

/// The `CapBnd` mask of a `/proc/<pid>/status` text.
pub fn cap_bnd(status: &str) -> Option<u64> {
    backend_docker::capabilities::parse_cap_bnd(status)
}

/// The name of capability number `bit` (`CAP_38` past the table's end).
pub fn cap_name(bit: u32) -> String {
    CAP_NAMES
        .get(bit as usize)
        .map(|n| (*n).to_owned())
        .unwrap_or_else(|| format!("CAP_{bit}"))
}

/// The capabilities `0..=last_cap` (the kernel's, `/proc/sys/kernel/cap_last_cap`)
/// that `mask` lacks, by name.
pub fn missing_caps(mask: u64, last_cap: u32) -> Vec<String> {
    (0..=last_cap.min(63))
        .filter(|bit| mask & (1u64 << bit) == 0)
        .map(cap_name)
        .collect()
}

/// How the host's cgroups are mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cgroup {
    /// Only v1 hierarchies under `/sys/fs/cgroup`.
    V1,
    /// v1 controllers plus a cgroup2 hierarchy (systemd's `unified`).
    Hybrid,
    /// `/sys/fs/cgroup` is cgroup2 (unified).
    V2,
    /// Nothing cgroup-like at `/sys/fs/cgroup`.
    None,
}

impl Cgroup {
    /// A short name: `v1`, `hybrid`, `v2`, `none`.
    pub fn name(self) -> &'static str {
        match self {
            Cgroup::V1 => "v1",
            Cgroup::Hybrid => "hybrid",
            Cgroup::V2 => "v2",
            Cgroup::None => "none",
        }
    }
}

/// One line of `/proc/self/mountinfo` (the shared parser of cpi-core).
pub use cpi_core::mountinfo::{parse_mountinfo, MountInfo as Mount};

/// The mount that holds `path` (the last-mounted one with the longest mount point
/// that is a prefix of `path`, as the kernel resolves it). `path` should be absolute
/// and free of symlinks.
pub fn mount_of<'a>(table: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    table
        .iter()
        .enumerate()
        .filter(|(_, m)| path.starts_with(&m.mount_point))
        .max_by_key(|(i, m)| (m.mount_point.components().count(), *i))
        .map(|(_, m)| m)
}

/// The cgroup layout from the mount table.
pub fn cgroup_layout(table: &[Mount]) -> Cgroup {
    let root = Path::new("/sys/fs/cgroup");
    let at_root = mount_of(table, root).filter(|m| m.mount_point == root);
    if at_root.is_some_and(|m| m.fs_type == "cgroup2") {
        return Cgroup::V2;
    }
    let below = |fs: &str| {
        table
            .iter()
            .any(|m| m.fs_type == fs && m.mount_point.starts_with(root))
    };
    match (below("cgroup"), below("cgroup2")) {
        (true, true) => Cgroup::Hybrid,
        (true, false) => Cgroup::V1,
        (false, true) => Cgroup::V2,
        (false, false) => Cgroup::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_names_from_a_mask() {
        // This project's CI machine: everything up to CAP_CHECKPOINT_RESTORE (40)
        // except CAP_SYS_RESOURCE (24).
        let status = "Name:\tcat\nCapBnd:\t000001fffeffffff\nCapAmb:\t0000000000000000\n";
        let mask = cap_bnd(status).expect("CapBnd");
        assert_eq!(mask, 0x1fffeffffff);
        assert_eq!(missing_caps(mask, 40), vec!["CAP_SYS_RESOURCE"]);
        // A kernel that knows fewer capabilities is not asked about the others.
        assert_eq!(missing_caps(0x3fffffffff, 37), Vec::<String>::new());
        // Docker's default set lacks CAP_SYS_ADMIN (21) among others.
        let docker_default = 0xa80425fb_u64;
        let missing = missing_caps(docker_default, 40);
        assert!(missing.contains(&REQUIRED_CAP.to_owned()), "{missing:?}");
        assert!(missing.contains(&"CAP_NET_ADMIN".to_owned()));
        assert!(!missing.contains(&"CAP_CHOWN".to_owned()));
        assert_eq!(cap_name(0), "CAP_CHOWN");
        assert_eq!(cap_name(21), "CAP_SYS_ADMIN");
        assert_eq!(cap_name(40), "CAP_CHECKPOINT_RESTORE");
        assert_eq!(cap_name(41), "CAP_41");
        assert_eq!(cap_bnd("Name:\tx\n"), None);
    }

    const HYBRID: &str = "\
23 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn cgroup_layouts() {
        assert_eq!(cgroup_layout(&parse_mountinfo(HYBRID)), Cgroup::Hybrid);
        let v1: String = HYBRID.lines().take(4).map(|l| format!("{l}\n")).collect();
        assert_eq!(cgroup_layout(&parse_mountinfo(&v1)), Cgroup::V1);
        let v2 = "\
23 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate
";
        assert_eq!(cgroup_layout(&parse_mountinfo(v2)), Cgroup::V2);
        assert_eq!(
            cgroup_layout(&parse_mountinfo("23 1 8:1 / / rw - ext4 /dev/sda1 rw\n")),
            Cgroup::None
        );
        assert_eq!(Cgroup::Hybrid.name(), "hybrid");
    }

    #[test]
    fn the_mount_holding_a_path() {
        let text = "\
1 0 0:1 / / rw shared:1 - overlay overlay rw,lowerdir=/a
2 1 8:1 / /var/lib/containerd rw master:3 - ext4 /dev/sdb rw
3 1 8:1 /x /var/lib/my\\040dir rw - ext4 /dev/sdb rw
4 1 0:9 / /var/lib/containerd rw shared:7 - xfs /dev/sdc rw
";
        let table = parse_mountinfo(text);
        assert_eq!(table.len(), 4);
        let root = mount_of(&table, Path::new("/srv/state")).expect("root");
        assert_eq!(
            (root.fs_type.as_str(), root.propagation()),
            ("overlay", "shared")
        );
        // The later of two mounts on the same point wins.
        let ctrd = mount_of(&table, Path::new("/var/lib/containerd/x")).expect("ctrd");
        assert_eq!(
            (ctrd.fs_type.as_str(), ctrd.propagation()),
            ("xfs", "shared")
        );
        assert_eq!(table[1].propagation(), "slave");
        let spaced = mount_of(&table, Path::new("/var/lib/my dir/s")).expect("spaced");
        assert_eq!(spaced.mount_point, Path::new("/var/lib/my dir"));
        assert_eq!(spaced.propagation(), "private");
        // `/var/lib/containerd2` is not below `/var/lib/containerd`.
        let other = mount_of(&table, Path::new("/var/lib/containerd2")).expect("other");
        assert_eq!(other.mount_point, Path::new("/"));
    }
}
