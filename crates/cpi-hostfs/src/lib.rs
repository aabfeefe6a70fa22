//! Host filesystem helpers both backends use, on the host the VMs' state directories
//! live on:
//!
//! - whether a path is a mount point, told by its mount id against its parent's
//!   (`statx` with `STATX_MNT_ID`, Linux 5.8+): two system calls, the same cost with
//!   1 or 1,000 mounts on the host, where reading `/proc/self/mountinfo` grows with
//!   every mount (~5 ms a read with ~700 mounts on the project's machine), and a
//!   bind mount within one filesystem counts, which a device number comparison
//!   would miss;
//! - removing a directory tree without ever crossing into another mount (a disk still
//!   bound below a VM's directory keeps its data).
//!
//! Every function answers `Ok(None)` when the kernel reports no mount ids: the caller
//! then falls back to the mount table (`cpi_core::mountinfo`). Errors are plain
//! [`std::io::Error`]s (each backend names the path in its own error type), except
//! [`RemoveError::StillMounted`].

use std::io;
use std::path::{Path, PathBuf};

/// Why [`remove_tree_on_one_mount`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    /// A directory below the tree is on another mount: nothing is removed through it.
    #[error("not removing {dir}: {mounted} is still mounted")]
    StillMounted {
        /// The tree being removed.
        dir: PathBuf,
        /// The mount point found below it.
        mounted: PathBuf,
    },
    /// A filesystem operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done (`listing`, `removing`, ...).
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RemoveError + 'a {
    move |source| RemoveError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The mount id of `path` (not following a final symlink, never triggering an
/// automount); `None` when the kernel does not report mount ids or `path` is gone.
pub fn mount_id(path: &Path) -> io::Result<Option<u64>> {
    use rustix::fs::{AtFlags, StatxFlags, CWD};
    match rustix::fs::statx(
        CWD,
        path,
        AtFlags::SYMLINK_NOFOLLOW | AtFlags::NO_AUTOMOUNT,
        StatxFlags::MNT_ID,
    ) {
        Ok(st) if StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::MNT_ID) => {
            Ok(Some(st.stx_mnt_id))
        }
        Ok(_) => Ok(None),
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Whether `path` is a mount point (its mount id differs from its parent's).
/// `Some(false)` when `path` does not exist; `None` without mount ids.
pub fn is_mount_point(path: &Path) -> io::Result<Option<bool>> {
    if !path.exists() {
        return Ok(Some(false));
    }
    let Some(parent) = path.parent() else {
        return Ok(Some(true)); // "/"
    };
    Ok(match (mount_id(path)?, mount_id(parent)?) {
        (Some(a), Some(b)) => Some(a != b),
        _ => None,
    })
}

/// `dir`'s entries; `None` when `dir` does not exist.
fn read_dir_if_present(dir: &Path) -> io::Result<Option<std::fs::ReadDir>> {
    match std::fs::read_dir(dir) {
        Ok(e) => Ok(Some(e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The mount points the backends make below a VM's state directory, deepest first:
/// the entries of `dir/disks` that are mount points (attached disks), then those of
/// `dir` itself (its disks directory, a root filesystem mounted for a write). Both
/// backends keep this layout. `None` without mount ids.
pub fn mount_points_of_vm_dir(dir: &Path) -> io::Result<Option<Vec<PathBuf>>> {
    let mut out = Vec::new();
    for d in [dir.join("disks"), dir.to_path_buf()] {
        match mount_points_in(&d)? {
            Some(names) => out.extend(names.iter().map(|n| d.join(n))),
            None => return Ok(None),
        }
    }
    Ok(Some(out))
}

/// The names of the entries of `dir` that are mount points, sorted (none when `dir`
/// does not exist); `None` without mount ids.
pub fn mount_points_in(dir: &Path) -> io::Result<Option<Vec<String>>> {
    let Some(own) = mount_id(dir)? else {
        return Ok(if dir.exists() { None } else { Some(Vec::new()) });
    };
    let Some(entries) = read_dir_if_present(dir)? else {
        return Ok(Some(Vec::new()));
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        match mount_id(&path)? {
            Some(id) if id != own => out.push(entry.file_name().to_string_lossy().into_owned()),
            Some(_) => {}
            None if path.exists() => return Ok(None),
            None => {} // removed meanwhile
        }
    }
    out.sort();
    Ok(Some(out))
}

/// The names of the entries `e` of `dir` for which `dir/e/below` is a mount point,
/// sorted (none when `dir` does not exist); `None` without mount ids. Both backends
/// keep a VM's disk mount at `<state_dir>/vms/<vm>/disks/<disk>`, so this answers
/// "which VMs is this disk attached to" with a `statx` pair per VM, not the host's
/// mount table.
pub fn entries_with_mount_point_below(dir: &Path, below: &Path) -> io::Result<Option<Vec<String>>> {
    let Some(entries) = read_dir_if_present(dir)? else {
        return Ok(Some(Vec::new()));
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        match is_mount_point(&entry.path().join(below))? {
            Some(true) => out.push(entry.file_name().to_string_lossy().into_owned()),
            Some(false) => {}
            None => return Ok(None),
        }
    }
    out.sort();
    Ok(Some(out))
}

/// Removes `dir` and everything below it, never crossing into another mount: a
/// directory below it on a different mount stops the removal with
/// [`RemoveError::StillMounted`] (entries visited before it are gone by then; what
/// is on the other mount is never touched). A missing `dir` is success. `Ok(None)`
/// without mount ids: nothing was removed.
pub fn remove_tree_on_one_mount(dir: &Path) -> Result<Option<()>, RemoveError> {
    let Some(own) = mount_id(dir).map_err(io_err("inspecting", dir))? else {
        return Ok(if dir.exists() { None } else { Some(()) });
    };
    if walk(dir, dir, own)?.is_none() {
        return Ok(None);
    }
    gone_ok(std::fs::remove_dir(dir), dir)?;
    Ok(Some(()))
}

fn walk(top: &Path, dir: &Path, own: u64) -> Result<Option<()>, RemoveError> {
    let Some(entries) = read_dir_if_present(dir).map_err(io_err("listing", dir))? else {
        return Ok(Some(()));
    };
    for entry in entries {
        let entry = entry.map_err(io_err("listing", dir))?;
        let path = entry.path();
        let is_dir = entry
            .file_type()
            .map_err(io_err("inspecting", &path))?
            .is_dir();
        if !is_dir {
            gone_ok(std::fs::remove_file(&path), &path)?;
            continue;
        }
        match mount_id(&path).map_err(io_err("inspecting", &path))? {
            Some(id) if id != own => {
                return Err(RemoveError::StillMounted {
                    dir: top.to_path_buf(),
                    mounted: path,
                })
            }
            Some(_) => {}
            None if path.exists() => return Ok(None),
            None => continue,
        }
        if walk(top, &path, own)?.is_none() {
            return Ok(None);
        }
        gone_ok(std::fs::remove_dir(&path), &path)?;
    }
    Ok(Some(()))
}

fn gone_ok(r: io::Result<()>, path: &Path) -> Result<(), RemoveError> {
    match r {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing", path)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::mount::{mount_bind, unmount, UnmountFlags};

    /// Needs root (CAP_SYS_ADMIN), as the CPI does.
    #[test]
    fn mount_points_are_told_by_mount_id_also_for_binds_within_one_filesystem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = dir.path().join("plain");
        let bound = dir.path().join("bound");
        std::fs::create_dir(&plain).expect("mkdir");
        std::fs::create_dir(&bound).expect("mkdir");
        mount_bind(&bound, &bound)
            .expect("a bind mount needs root (CAP_SYS_ADMIN), as the CPI does");
        assert_eq!(is_mount_point(&bound).expect("statx"), Some(true));
        assert_eq!(is_mount_point(&plain).expect("statx"), Some(false));
        assert_eq!(
            is_mount_point(&dir.path().join("missing")).expect("statx"),
            Some(false)
        );
        assert_eq!(
            mount_points_in(dir.path()).expect("list"),
            Some(vec!["bound".to_owned()])
        );
        assert_eq!(
            mount_points_in(&dir.path().join("missing")).expect("list"),
            Some(vec![])
        );
        unmount(&bound, UnmountFlags::empty()).expect("unmount");
        assert_eq!(is_mount_point(&bound).expect("statx"), Some(false));
    }

    /// Needs root (CAP_SYS_ADMIN), as the CPI does.
    #[test]
    fn which_vms_have_a_disk_mounted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vms = dir.path().join("vms");
        for vm in ["vm-a", "vm-b", "vm-c"] {
            std::fs::create_dir_all(vms.join(vm).join("disks").join("disk-1")).expect("mkdir");
        }
        let below = Path::new("disks/disk-1");
        assert_eq!(
            entries_with_mount_point_below(&vms, below).expect("scan"),
            Some(vec![])
        );
        let target = vms.join("vm-b").join("disks").join("disk-1");
        mount_bind(dir.path(), &target).expect("bind");
        assert_eq!(
            entries_with_mount_point_below(&vms, below).expect("scan"),
            Some(vec!["vm-b".to_owned()])
        );
        assert_eq!(
            entries_with_mount_point_below(&dir.path().join("missing"), below).expect("scan"),
            Some(vec![])
        );
        unmount(&target, UnmountFlags::empty()).expect("unmount");
    }

    /// Needs root (CAP_SYS_ADMIN), as the CPI does.
    #[test]
    fn a_tree_is_removed_but_never_through_a_mount() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vm = dir.path().join("vm-1");
        let disk = dir.path().join("disk");
        std::fs::create_dir_all(vm.join("disks").join("disk-1")).expect("mkdir");
        std::fs::create_dir_all(vm.join("data").join("deep")).expect("mkdir");
        std::fs::write(vm.join("data").join("deep").join("f"), b"x").expect("write");
        std::fs::create_dir_all(&disk).expect("mkdir");
        std::fs::write(disk.join("marker"), b"keep").expect("write");
        mount_bind(&disk, vm.join("disks").join("disk-1")).expect("bind");
        assert_eq!(
            mount_points_of_vm_dir(&vm).expect("scan"),
            Some(vec![vm.join("disks").join("disk-1")])
        );

        let err = remove_tree_on_one_mount(&vm).expect_err("a disk is still mounted");
        assert!(
            matches!(&err, RemoveError::StillMounted { mounted, .. } if mounted.ends_with("disks/disk-1")),
            "{err}"
        );
        assert_eq!(std::fs::read(disk.join("marker")).expect("kept"), b"keep");

        unmount(vm.join("disks").join("disk-1"), UnmountFlags::empty()).expect("unmount");
        remove_tree_on_one_mount(&vm)
            .expect("remove")
            .expect("mount ids reported");
        assert!(!vm.exists());
        assert_eq!(std::fs::read(disk.join("marker")).expect("kept"), b"keep");
        // Gone already: success.
        assert!(remove_tree_on_one_mount(&vm).expect("again").is_some());
    }
}
