//! Attach mode `local`: this process runs as root in the daemon's mount namespace and
//! mounts directly (bind mounts with rustix; no external commands).
//!
//! A bind mount of the disk volume's directory onto
//! `<state_dir>/vms/<vm>/disks/<disk>` propagates into the running VM, whose
//! `/warden-cpi-dev` is an `rslave` bind of `<state_dir>/vms/<vm>/disks`: the state
//! directory must therefore be a shared mount, which [`ensure_shared`] makes it.

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};
use rustix::mount::{mount_bind, mount_change, unmount, MountPropagationFlags, UnmountFlags};

use crate::disk::mounts::{self, MountEntry, StateLayout};
use crate::error::{DockerError, Result};

fn os_err(e: rustix::io::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.raw_os_error())
}

fn hint(e: &std::io::Error) -> &'static str {
    if e.kind() == ErrorKind::PermissionDenied {
        " (mounting needs root with CAP_SYS_ADMIN in the daemon's mount namespace; run the CPI as root beside dockerd, or set attach_mode: helper)"
    } else {
        ""
    }
}

/// Reads this process's mount table.
pub fn read_mounts() -> Result<Vec<MountEntry>> {
    let path = "/proc/self/mountinfo";
    let text = std::fs::read_to_string(path)
        .map_err(|e| DockerError::io("reading the mount table", path, e))?;
    Ok(mounts::parse_mountinfo(&text))
}

/// The mount that contains `path` (the longest mount point that is a prefix of it).
fn containing_mount<'a>(table: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    table
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| (m.mount_point.components().count(), m.id))
}

/// Whether `path` is a mount point, by mount ids (see [`cpi_hostfs`]); `None` when
/// the kernel reports no mount ids: then the caller reads the mount table.
fn is_mount_point(path: &Path) -> Result<Option<bool>> {
    cpi_hostfs::is_mount_point(path).map_err(|e| DockerError::io("statx", path, e))
}

/// The VMs disk `disk` is mounted for: the VMs with a mount point at
/// `<root>/vms/<vm>/disks/<disk>`, by mount ids (a `statx` pair per VM), else from
/// the mount table.
pub fn vms_with_disk(layout: &StateLayout, disk: &str) -> Result<Vec<String>> {
    let vms = layout.vms_dir();
    let below = Path::new("disks").join(disk);
    match cpi_hostfs::entries_with_mount_point_below(&vms, &below)
        .map_err(|e| DockerError::io("listing", &vms, e))?
    {
        Some(found) => Ok(found),
        None => Ok(mounts::vms_with_disk(&read_mounts()?, layout, disk)),
    }
}

/// The disks mounted for VM `vm`: the entries of its disks directory that are mount
/// points, by mount ids (a `statx` per entry), else from the mount table.
pub fn disks_of_vm(layout: &StateLayout, vm: &str) -> Result<Vec<String>> {
    let dir = layout.disks_dir(vm);
    match cpi_hostfs::mount_points_in(&dir).map_err(|e| DockerError::io("listing", &dir, e))? {
        Some(found) => Ok(found),
        None => Ok(mounts::attached_disks(&read_mounts()?, layout)
            .remove(vm)
            .unwrap_or_default()
            .into_iter()
            .collect()),
    }
}

/// Whether disk `disk` is mounted for VM `vm`.
pub fn is_attached(layout: &StateLayout, vm: &str, disk: &str) -> Result<bool> {
    match is_mount_point(&layout.disk_mount(vm, disk))? {
        Some(m) => Ok(m),
        None => Ok(mounts::attached_disks(&read_mounts()?, layout)
            .get(vm)
            .is_some_and(|d| d.contains(disk))),
    }
}

/// The mount points below the VM's directory, deepest first (see
/// [`cpi_hostfs::mount_points_of_vm_dir`]); `None` without mount ids.
fn vm_mount_points(dir: &Path) -> Result<Option<Vec<PathBuf>>> {
    cpi_hostfs::mount_points_of_vm_dir(dir).map_err(|e| DockerError::io("listing", dir, e))
}

/// Removes `dir` and everything below it without crossing into another mount (a
/// disk still bound keeps its data); `None` without mount ids.
fn remove_tree_on_one_mount(dir: &Path) -> Result<Option<()>> {
    cpi_hostfs::remove_tree_on_one_mount(dir).map_err(|e| match e {
        cpi_hostfs::RemoveError::StillMounted { .. } => DockerError::Conflict(e.to_string()),
        cpi_hostfs::RemoveError::Io { what, path, source } => DockerError::io(what, &path, source),
    })
}

/// Makes the state directory exist and sit on a shared mount (binding it onto itself
/// and marking it `rshared` when it does not), under an exclusive lock so concurrent
/// CPI processes do it once. Returns the canonical path.
pub fn ensure_shared(root: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(root)
        .map_err(|e| DockerError::io("creating the state directory", root, e))?;
    let root = root
        .canonicalize()
        .map_err(|e| DockerError::io("resolving the state directory", root, e))?;
    // Once the directory is a mount point of its own, which this function makes it,
    // making it shared again is a no-op that needs no look at the mount table (which
    // grows with every container on the host).
    let shared = MountPropagationFlags::SHARED | MountPropagationFlags::REC;
    if is_mount_point(&root)? == Some(true) && mount_change(&root, shared).is_ok() {
        return Ok(root);
    }
    let lock = File::open(&root).map_err(|e| DockerError::io("opening", &root, e))?;
    flock(&lock, FlockOperation::LockExclusive)
        .map_err(|e| DockerError::io("locking", &root, os_err(e)))?;
    let table = read_mounts()?;
    let result = match mounts::mount_at(&table, &root) {
        Some(m) if m.is_shared() => Ok(()),
        Some(_) => mount_change(&root, shared),
        // On a shared mount already (systemd hosts): a mount point of its own only
        // spares later calls the table; without one it works the same.
        None if containing_mount(&table, &root).is_some_and(|m| m.is_shared()) => {
            if let Err(e) = mount_bind(&root, &root).and_then(|()| mount_change(&root, shared)) {
                tracing::debug!(state_dir = %root.display(), error = %e, "could not bind the state directory onto itself; its shared parent mount serves");
            }
            Ok(())
        }
        None => mount_bind(&root, &root).and_then(|()| mount_change(&root, shared)),
    };
    let _ = flock(&lock, FlockOperation::Unlock);
    result.map_err(|e| {
        let e = os_err(e);
        let h = hint(&e);
        DockerError::io(
            format!("making the state directory a shared mount{h}:"),
            &root,
            e,
        )
    })?;
    tracing::info!(state_dir = %root.display(), "made the state directory a shared mount");
    Ok(root)
}

/// Creates `<root>/vms/<vm>/disks`.
pub fn prepare_vm(layout: &StateLayout, vm: &str) -> Result<()> {
    let dir = layout.disks_dir(vm);
    std::fs::create_dir_all(&dir)
        .map_err(|e| DockerError::io("creating the VM's disks directory", &dir, e))
}

/// Bind-mounts `source` (the disk volume's directory) at the disk's mount point.
pub fn attach(layout: &StateLayout, vm: &str, disk: &str, source: &Path) -> Result<()> {
    let target = layout.disk_mount(vm, disk);
    std::fs::create_dir_all(&target)
        .map_err(|e| DockerError::io("creating the disk mount point", &target, e))?;
    mount_bind(source, &target).map_err(|e| {
        let e = os_err(e);
        let _ = std::fs::remove_dir(&target);
        let h = hint(&e);
        DockerError::io(
            format!(
                "bind-mounting disk {disk} ({}) for VM {vm}{h} at",
                source.display()
            ),
            &target,
            e,
        )
    })
}

/// Unmounts `target` (lazily when it is busy on the host) and removes the mount point.
/// A mount point can be stacked (the same disk bound twice): it is unmounted until
/// the kernel says it is not a mount point any more (`EINVAL`), at most 8 times.
fn unmount_and_remove(target: &Path) -> Result<()> {
    for _ in 0..8 {
        match unmount(target, UnmountFlags::NOFOLLOW) {
            Ok(()) => continue,
            Err(rustix::io::Errno::BUSY) => {
                tracing::warn!(path = %target.display(), "mount busy on the host; detaching it lazily");
                unmount(target, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW)
                    .map_err(|e| DockerError::io("unmounting (lazily)", target, os_err(e)))?;
            }
            // Not mounted (any more), or gone.
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => break,
            Err(e) => return Err(DockerError::io("unmounting", target, os_err(e))),
        }
    }
    match std::fs::remove_dir(target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DockerError::io("removing the mount point", target, e)),
    }
}

/// Unmounts a disk from a VM.
pub fn detach(layout: &StateLayout, vm: &str, disk: &str) -> Result<()> {
    unmount_and_remove(&layout.disk_mount(vm, disk))
}

/// Unmounts everything under the VM's directory and removes it. Never deletes
/// through a mount: the directory is only removed once nothing is mounted below it.
pub fn remove_vm(layout: &StateLayout, vm: &str) -> Result<()> {
    let dir = layout.vm_dir(vm);
    if !dir.exists() {
        return Ok(());
    }
    let dir = dir
        .canonicalize()
        .map_err(|e| DockerError::io("resolving", &dir, e))?;
    if let Some(points) = vm_mount_points(&dir)? {
        for p in points {
            unmount_and_remove(&p)?;
        }
        if remove_tree_on_one_mount(&dir)?.is_some() {
            return Ok(());
        }
    }
    for m in mounts::mounts_below(&read_mounts()?, &dir) {
        unmount_and_remove(&m.mount_point)?;
    }
    if let Some(m) = mounts::mounts_below(&read_mounts()?, &dir).first() {
        return Err(DockerError::Conflict(format!(
            "{} is still mounted after unmounting; not removing {}",
            m.mount_point.display(),
            dir.display()
        )));
    }
    std::fs::remove_dir_all(&dir).map_err(|e| DockerError::io("removing the VM directory", &dir, e))
}

/// Whether this process shares the mount namespace of the daemon (found by its pid
/// file, else by process name). `false` when that cannot be told.
pub fn shares_daemon_mount_namespace() -> bool {
    let ours = match std::fs::read_link("/proc/self/ns/mnt") {
        Ok(l) => l,
        Err(_) => return false,
    };
    let from_pid_file = ["/var/run/docker.pid", "/run/docker.pid"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .and_then(|s| s.trim().parse::<u32>().ok());
    let pids: Vec<u32> = match from_pid_file {
        Some(pid) => vec![pid],
        None => std::fs::read_dir("/proc")
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                    .filter(|pid| {
                        std::fs::read_to_string(format!("/proc/{pid}/comm"))
                            .is_ok_and(|c| c.trim() == "dockerd")
                    })
                    .collect()
            })
            .unwrap_or_default(),
    };
    !pids.is_empty()
        && pids
            .iter()
            .all(|pid| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).is_ok_and(|l| l == ours))
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root (CAP_SYS_ADMIN), as attach mode `local` itself does.
    #[test]
    fn attachments_are_found_by_mount_id_and_a_vm_is_removed_without_touching_its_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = ensure_shared(&dir.path().join("state")).expect("shared state directory");
        assert_eq!(is_mount_point(&root).expect("statx"), Some(true));
        let table = read_mounts().expect("mount table");
        assert!(mounts::mount_at(&table, &root).is_some_and(|m| m.is_shared()));
        // A second call takes the fast path and stacks nothing.
        ensure_shared(&root).expect("again");
        let stacked = read_mounts().expect("mount table");
        assert_eq!(
            stacked.iter().filter(|m| m.mount_point == root).count(),
            1,
            "one mount at the state directory"
        );

        let layout = StateLayout::new(&root);
        let volume = dir.path().join("volume");
        std::fs::create_dir(&volume).expect("mkdir");
        std::fs::write(volume.join("marker"), b"keep").expect("write");
        for vm in ["vm-a", "vm-b"] {
            prepare_vm(&layout, vm).expect("prepare");
        }
        assert!(vms_with_disk(&layout, "disk-1").expect("scan").is_empty());
        attach(&layout, "vm-b", "disk-1", &volume).expect("attach");
        // Stacked, as a retried attach killed at the wrong moment could leave it.
        mount_bind(&volume, layout.disk_mount("vm-b", "disk-1")).expect("bind again");
        assert_eq!(
            vms_with_disk(&layout, "disk-1").expect("scan"),
            vec!["vm-b".to_owned()]
        );
        // The mount table agrees.
        assert_eq!(
            mounts::vms_with_disk(&read_mounts().expect("table"), &layout, "disk-1"),
            vec!["vm-b".to_owned()]
        );
        assert!(is_attached(&layout, "vm-b", "disk-1").expect("check"));
        assert!(!is_attached(&layout, "vm-a", "disk-1").expect("check"));

        remove_vm(&layout, "vm-b").expect("remove the VM with its disk still bound");
        assert!(!layout.vm_dir("vm-b").exists());
        assert_eq!(std::fs::read(volume.join("marker")).expect("kept"), b"keep");
        assert!(vms_with_disk(&layout, "disk-1").expect("scan").is_empty());

        // A foreign mount below a VM directory stops the removal instead of deleting
        // through it.
        let foreign = layout.vm_dir("vm-a").join("other");
        std::fs::create_dir(&foreign).expect("mkdir");
        mount_bind(&volume, &foreign).expect("bind");
        let err = remove_tree_on_one_mount(&layout.vm_dir("vm-a")).expect_err("refused");
        assert!(err.to_string().contains("still mounted"), "{err}");
        assert_eq!(std::fs::read(volume.join("marker")).expect("kept"), b"keep");
        remove_vm(&layout, "vm-a").expect("remove_vm unmounts what is below it");
        assert_eq!(std::fs::read(volume.join("marker")).expect("kept"), b"keep");
        unmount(&root, UnmountFlags::DETACH).expect("unmount the state directory");
    }
}
