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

/// Makes the state directory exist and sit on a shared mount (binding it onto itself
/// and marking it `rshared` when it does not), under an exclusive lock so concurrent
/// CPI processes do it once. Returns the canonical path.
pub fn ensure_shared(root: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(root)
        .map_err(|e| DockerError::io("creating the state directory", root, e))?;
    let root = root
        .canonicalize()
        .map_err(|e| DockerError::io("resolving the state directory", root, e))?;
    let table = read_mounts()?;
    if containing_mount(&table, &root).is_some_and(|m| m.is_shared()) {
        return Ok(root);
    }
    let lock = File::open(&root).map_err(|e| DockerError::io("opening", &root, e))?;
    flock(&lock, FlockOperation::LockExclusive)
        .map_err(|e| DockerError::io("locking", &root, os_err(e)))?;
    let table = read_mounts()?;
    let result = match mounts::mount_at(&table, &root) {
        Some(m) if m.is_shared() => Ok(()),
        Some(_) => mount_change(
            &root,
            MountPropagationFlags::SHARED | MountPropagationFlags::REC,
        ),
        None => mount_bind(&root, &root).and_then(|()| {
            mount_change(
                &root,
                MountPropagationFlags::SHARED | MountPropagationFlags::REC,
            )
        }),
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
fn unmount_and_remove(target: &Path) -> Result<()> {
    match unmount(target, UnmountFlags::empty()) {
        Ok(()) => {}
        Err(rustix::io::Errno::BUSY) => {
            tracing::warn!(path = %target.display(), "mount busy on the host; detaching it lazily");
            unmount(target, UnmountFlags::DETACH)
                .map_err(|e| DockerError::io("unmounting (lazily)", target, os_err(e)))?;
        }
        Err(rustix::io::Errno::INVAL) => {} // not mounted (any more)
        Err(e) => return Err(DockerError::io("unmounting", target, os_err(e))),
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
