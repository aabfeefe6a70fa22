//! Host-side mounts and directories of the floors (bind mounts with rustix, as the
//! backends do them: no external commands).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use rustix::mount::{mount_bind, mount_change, unmount, MountPropagationFlags, UnmountFlags};

use super::floor::FloorResult;

fn os(e: rustix::io::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.raw_os_error())
}

/// Creates `target` and bind-mounts `source` on it.
pub fn bind(source: &Path, target: &Path) -> FloorResult<()> {
    std::fs::create_dir_all(target).map_err(|e| format!("mkdir {}: {e}", target.display()))?;
    mount_bind(source, target).map_err(|e| {
        format!(
            "bind mount {} on {}: {} (the bench runs as root beside the daemon)",
            source.display(),
            target.display(),
            os(e)
        )
    })
}

/// Creates an empty file with mode 0600 (and its parent directories).
pub fn create_private_file(path: &Path) -> FloorResult<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|e| format!("creating {}: {e}", path.display()))
}

/// Rewrites `path` in place with `bytes` (same inode: a bind mount of the file shows
/// it), as the Docker backend writes a VM's bound settings file: one write at offset
/// 0, truncate, `fdatasync`.
pub fn write_in_place(path: &Path, bytes: &[u8]) -> FloorResult<()> {
    use std::os::unix::fs::FileExt;
    let io = |e: std::io::Error| format!("writing {}: {e}", path.display());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io)?;
    file.write_all_at(bytes, 0).map_err(io)?;
    file.set_len(bytes.len() as u64).map_err(io)?;
    file.sync_data().map_err(io)
}

/// Unmounts `target` (lazily when busy) and removes the directory.
pub fn unbind(target: &Path) -> FloorResult<()> {
    match unmount(target, UnmountFlags::empty()) {
        Ok(()) => {}
        Err(rustix::io::Errno::BUSY) => unmount(target, UnmountFlags::DETACH)
            .map_err(|e| format!("umount -l {}: {}", target.display(), os(e)))?,
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(format!("umount {}: {}", target.display(), os(e))),
    }
    match std::fs::remove_dir(target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("rmdir {}: {e}", target.display())),
    }
}

/// Makes `dir` a mount point of its own with shared propagation, so mounts made below
/// it later reach containers that bind it with `rslave` (what the containerd backend
/// does for each VM's disks directory).
pub fn make_shared_mount_point(dir: &Path) -> FloorResult<()> {
    mount_bind(dir, dir).map_err(|e| format!("bind {} on itself: {}", dir.display(), os(e)))?;
    mount_change(dir, MountPropagationFlags::SHARED)
        .map_err(|e| format!("make {} shared: {}", dir.display(), os(e)))
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found.dedup();
    found
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Removes the directory tree `dir`, refusing when anything is mounted below it (that
/// could be a disk whose data must not be deleted).
pub fn remove_dir_tree_unless_mounted(dir: &Path) -> FloorResult<()> {
    // By mount ids, as the backends do: the mount table is read only on a kernel
    // without them (reading it grows with every mount on the host).
    match cpi_hostfs::remove_tree_on_one_mount(dir) {
        Ok(Some(())) => return Ok(()),
        Ok(None) => {}
        Err(e) => return Err(format!("not removing {}: {e}", dir.display())),
    }
    let mounted = mounts_under(dir);
    if !mounted.is_empty() {
        return Err(format!(
            "not removing {}: still mounted below it: {mounted:?}",
            dir.display()
        ));
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("rm -r {}: {e}", dir.display())),
    }
}

/// The per-VM directory of a templated path: the path up to and including its first
/// component that contains `marker` (`/s/vms/@@/disks` → `/s/vms/@@`).
pub fn owning_dir(templated: &str, marker: &str) -> Option<String> {
    let at = templated.find(marker)?;
    let end = templated[at..]
        .find('/')
        .map(|i| at + i)
        .unwrap_or(templated.len());
    Some(templated[..end].to_owned())
}

/// Waits (polling `/proc/<pid>/status` every 2 ms, at most `limit`) until process
/// `pid` catches SIGTERM. A VM's init that is deleted before it has set its handler
/// ignores SIGTERM (PID 1 of a namespace has no default action), and the delete then
/// measures the daemon's 10 s grace instead of the stop.
pub fn wait_until_catches_sigterm(pid: u32, limit: std::time::Duration) -> FloorResult<()> {
    let path = format!("/proc/{pid}/status");
    let started = std::time::Instant::now();
    loop {
        let status = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
        if catches_sigterm(&status) {
            return Ok(());
        }
        if started.elapsed() >= limit {
            return Err(format!(
                "process {pid} did not catch SIGTERM within {} s",
                limit.as_secs()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Whether the `SigCgt` mask of a `/proc/<pid>/status` text has SIGTERM (15).
fn catches_sigterm(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (15 - 1)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigterm_in_the_caught_mask() {
        assert!(catches_sigterm("Name:\tsh\nSigCgt:\t0000000000004002\n"));
        assert!(!catches_sigterm("Name:\tsh\nSigCgt:\t0000000000000002\n"));
        assert!(!catches_sigterm("Name:\tsh\n"));
    }

    #[test]
    fn mountinfo_unescaping() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/x\\y"), r"/x\\y");
    }

    #[test]
    fn owning_dirs() {
        assert_eq!(
            owning_dir("/s/vms/@@/disks", "@@").as_deref(),
            Some("/s/vms/@@")
        );
        assert_eq!(owning_dir("/s/vms/@@", "@@").as_deref(), Some("/s/vms/@@"));
        assert_eq!(owning_dir("/s/vms/x", "@@"), None);
    }
}
