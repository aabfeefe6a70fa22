//! The state directory's layout and the mount table: which disk is attached to which
//! VM is whatever is mounted at `<state_dir>/vms/<vm>/disks/<disk>` on the daemon's
//! host. Pure: parsing `/proc/<pid>/mountinfo` text and building paths.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Paths under the state directory (on the daemon's host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateLayout {
    root: PathBuf,
}

impl StateLayout {
    /// The layout under `root`.
    pub fn new(root: impl Into<PathBuf>) -> StateLayout {
        StateLayout { root: root.into() }
    }

    /// The state directory itself: a shared mount.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/vms`.
    pub fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }

    /// `<root>/vms/<vm>`: everything of one VM.
    pub fn vm_dir(&self, vm: &str) -> PathBuf {
        self.vms_dir().join(vm)
    }

    /// `<root>/vms/<vm>/disks`: bound (rslave) at `/warden-cpi-dev` in the VM.
    pub fn disks_dir(&self, vm: &str) -> PathBuf {
        self.vm_dir(vm).join("disks")
    }

    /// `<root>/vms/<vm>/disks/<disk>`: where disk `<disk>` is mounted while attached.
    pub fn disk_mount(&self, vm: &str, disk: &str) -> PathBuf {
        self.disks_dir(vm).join(disk)
    }
}

/// One line of `/proc/<pid>/mountinfo` (the shared parser of cpi-core).
pub use cpi_core::mountinfo::{parse_mountinfo, MountInfo as MountEntry};

/// The topmost mount whose mount point is exactly `path`, if any.
pub fn mount_at<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts.iter().rev().find(|m| m.mount_point == path)
}

/// Every mount at or below `dir`, deepest first (the order to unmount them in).
pub fn mounts_below<'a>(mounts: &'a [MountEntry], dir: &Path) -> Vec<&'a MountEntry> {
    let mut out: Vec<&MountEntry> = mounts
        .iter()
        .filter(|m| m.mount_point.starts_with(dir))
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse((m.mount_point.components().count(), m.id)));
    out
}

/// The attached disks by VM: every mount at `<root>/vms/<vm>/disks/<disk>`.
pub fn attached_disks(
    mounts: &[MountEntry],
    layout: &StateLayout,
) -> BTreeMap<String, BTreeSet<String>> {
    let vms = layout.vms_dir();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for m in mounts {
        let Ok(rel) = m.mount_point.strip_prefix(&vms) else {
            continue;
        };
        let parts: Vec<_> = rel
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        if let [vm, disks, disk] = parts.as_slice() {
            if disks == "disks" {
                out.entry(vm.clone()).or_default().insert(disk.clone());
            }
        }
    }
    out
}

/// The VMs disk `disk` is attached to.
pub fn vms_with_disk(mounts: &[MountEntry], layout: &StateLayout, disk: &str) -> Vec<String> {
    attached_disks(mounts, layout)
        .into_iter()
        .filter(|(_, disks)| disks.contains(disk))
        .map(|(vm, _)| vm)
        .collect()
}

/// Rewrites the mount points of a helper container's mountinfo (where the state
/// directory is bound at `inner`) as host paths under `layout`'s root.
pub fn rebase(mounts: Vec<MountEntry>, inner: &Path, layout: &StateLayout) -> Vec<MountEntry> {
    mounts
        .into_iter()
        .filter_map(|mut m| {
            let rel = m.mount_point.strip_prefix(inner).ok()?.to_path_buf();
            m.mount_point = layout.root().join(rel);
            Some(m)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
42 27 254:0 /var/lib/docker /var/lib/docker rw,relatime shared:1 - ext4 /dev/vda rw
43 27 254:0 /srv/state /srv/state rw,relatime shared:2 - ext4 /dev/vda rw
71 43 254:0 /var/lib/docker/volumes/vol-1/_data /srv/state/vms/c-1/disks/vol-1 rw,relatime shared:1 - ext4 /dev/vda rw
72 43 254:0 /var/lib/docker/volumes/vol-2/_data /srv/state/vms/c-2/disks/vol-2 rw,relatime shared:1 - ext4 /dev/vda rw
73 43 254:0 /x /srv/state/vms/c-2/other rw - ext4 /dev/vda rw
74 27 0:50 / /mnt/with\\040space rw master:3 - tmpfs tmpfs rw
";

    #[test]
    fn layout_paths() {
        let l = StateLayout::new("/srv/state");
        assert_eq!(
            l.disks_dir("c-1"),
            PathBuf::from("/srv/state/vms/c-1/disks")
        );
        assert_eq!(
            l.disk_mount("c-1", "vol-1"),
            PathBuf::from("/srv/state/vms/c-1/disks/vol-1")
        );
    }

    #[test]
    fn parses_lines_and_propagation() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(m.len(), 7);
        let state = mount_at(&m, Path::new("/srv/state")).expect("state");
        assert!(state.is_shared());
        assert!(!mount_at(&m, Path::new("/")).expect("root").is_shared());
        let spaced = mount_at(&m, Path::new("/mnt/with space")).expect("unescaped");
        assert!(spaced.is_slave());
        assert_eq!(spaced.fs_type, "tmpfs");
        assert!(mount_at(&m, Path::new("/srv")).is_none());
    }

    #[test]
    fn finds_attached_disks() {
        let m = parse_mountinfo(SAMPLE);
        let l = StateLayout::new("/srv/state");
        let a = attached_disks(&m, &l);
        assert_eq!(a.len(), 2);
        assert!(a["c-1"].contains("vol-1"));
        assert_eq!(a["c-2"].len(), 1);
        assert_eq!(vms_with_disk(&m, &l, "vol-2"), vec!["c-2".to_owned()]);
        assert!(vms_with_disk(&m, &l, "vol-3").is_empty());
    }

    #[test]
    fn lists_mounts_below_deepest_first() {
        let m = parse_mountinfo(SAMPLE);
        let below = mounts_below(&m, Path::new("/srv/state/vms/c-2"));
        let points: Vec<_> = below.iter().map(|e| e.mount_point.clone()).collect();
        assert_eq!(
            points,
            vec![
                PathBuf::from("/srv/state/vms/c-2/disks/vol-2"),
                PathBuf::from("/srv/state/vms/c-2/other")
            ]
        );
    }

    #[test]
    fn rebases_helper_views() {
        let text = "90 80 254:0 /srv/state /cpi-state rw shared:2 - ext4 /dev/vda rw\n\
91 90 254:0 /var/lib/docker/volumes/vol-1/_data /cpi-state/vms/c-1/disks/vol-1 rw shared:1 - ext4 /dev/vda rw\n\
92 80 0:5 / /proc rw - proc proc rw\n";
        let l = StateLayout::new("/srv/state");
        let m = rebase(parse_mountinfo(text), Path::new("/cpi-state"), &l);
        assert_eq!(m.len(), 2);
        assert_eq!(vms_with_disk(&m, &l, "vol-1"), vec!["c-1".to_owned()]);
    }
}
