//! Small filesystem helpers: atomic writes, and writing a file into a VM's root
//! filesystem from the host without following the VM's symlinks out of it.
//!
//! A stemcell's `/etc/resolv.conf` is typically a symlink to
//! `/run/systemd/resolve/stub-resolv.conf`; followed from the host, that absolute
//! target would name the *host's* file. [`write_in_root`] resolves every directory
//! component inside the root (like `chroot` would) and replaces the final component
//! by rename, so a symlink there is replaced, never followed.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{ContainerdError, Result};

/// Who makes a write durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durable {
    /// The write itself: the file is `fsync`ed before it is renamed into place.
    Now,
    /// The caller, with one [`sync_filesystem`] once all its files are written.
    ByCaller,
}

/// Writes `bytes` to `path` with `mode` via a temporary file and a rename, so readers
/// see the old or the new content, never a half-written file; durable on return.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    write_replacing(path, bytes, mode, Durable::Now)
}

/// Makes everything written to the filesystem holding `dir` durable (`syncfs`): one
/// call for many files instead of an `fsync` each.
pub fn sync_filesystem(dir: &Path) -> Result<()> {
    let synced =
        std::fs::File::open(dir).and_then(|d| rustix::fs::syncfs(&d).map_err(std::io::Error::from));
    synced.map_err(|e| ContainerdError::io("syncing the filesystem of", dir, e))
}

/// [`write_atomic`], with the `fsync` left to the caller when `durable` says so.
fn write_replacing(path: &Path, bytes: &[u8], mode: u32, durable: Durable) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", uuid::Uuid::new_v4().simple()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        if durable == Durable::Now {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ContainerdError::io("writing", path, e)
    })
}

/// Creates `dir` and its parents with mode 0755 (0700 for `private`).
pub fn create_dirs(dir: &Path, private: bool) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(if private { 0o700 } else { 0o755 })
        .create(dir)
        .map_err(|e| ContainerdError::io("creating directory", dir, e))
}

/// Resolves directory `vm_dir` (absolute inside the VM) to a host path below `root`,
/// following symlinks as if `root` were `/` and creating missing directories (0755).
pub fn resolve_dir_in_root(root: &Path, vm_dir: &Path) -> std::io::Result<PathBuf> {
    let mut pending: VecDeque<OsString> = components(vm_dir);
    let mut current = PathBuf::new();
    let mut links = 0;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            current.pop();
            continue;
        }
        let candidate = root.join(&current).join(&part);
        match std::fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(std::io::Error::other(format!(
                        "too many levels of symbolic links at {}",
                        candidate.display()
                    )));
                }
                let target = std::fs::read_link(&candidate)?;
                if target.is_absolute() {
                    current = PathBuf::new();
                }
                let mut next = components(&target);
                next.extend(pending);
                pending = next;
            }
            Ok(meta) if meta.is_dir() => current.push(&part),
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "{} is not a directory",
                    candidate.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new().mode(0o755).create(&candidate)?;
                current.push(&part);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(root.join(current))
}

fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// Writes file `vm_path` (absolute inside the VM) below the VM's `root` as a regular
/// file with `mode`, replacing whatever was there (a symlink included) atomically.
pub fn write_in_root(
    root: &Path,
    vm_path: &str,
    bytes: &[u8],
    mode: u32,
    durable: Durable,
) -> Result<()> {
    let vm_path = Path::new(vm_path);
    let (Some(parent), Some(name)) = (vm_path.parent(), vm_path.file_name()) else {
        return Err(ContainerdError::Refused(format!(
            "cannot write {} into a VM: not a file path",
            vm_path.display()
        )));
    };
    let dir = resolve_dir_in_root(root, parent).map_err(|e| {
        ContainerdError::io(
            "resolving inside the VM root",
            root.join(parent.strip_prefix("/").unwrap_or(parent)),
            e,
        )
    })?;
    write_replacing(&dir.join(name), bytes, mode, durable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fsutil-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn absolute_symlinks_stay_inside_the_root() {
        let base = tempdir();
        let root = base.join("root");
        let outside = base.join("outside");
        std::fs::create_dir_all(root.join("etc")).expect("mkdir");
        std::fs::create_dir_all(root.join("run/real")).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        // /var -> /run/real inside the VM; an escape attempt via an absolute link
        // to the host's directory must land inside the root.
        symlink("/run/real", root.join("var")).expect("symlink");
        symlink(&outside, root.join("escape")).expect("symlink");
        write_in_root(
            &root,
            "/var/vcap/bosh/settings.json",
            b"{}",
            0o600,
            Durable::Now,
        )
        .expect("write");
        let written = root.join("run/real/vcap/bosh/settings.json");
        assert_eq!(std::fs::read(&written).expect("read"), b"{}");
        assert_eq!(
            std::fs::metadata(&written)
                .expect("meta")
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        write_in_root(&root, "/escape/x", b"x", 0o644, Durable::Now).expect("write");
        assert!(!outside.join("x").exists(), "wrote outside the root");
        assert!(root
            .join(outside.strip_prefix("/").expect("abs"))
            .join("x")
            .exists());
        write_in_root(&root, "/../../etc/y", b"y", 0o644, Durable::Now).expect("write");
        assert!(root.join("etc/y").exists());
        std::fs::remove_dir_all(&base).expect("rm");
    }

    #[test]
    fn a_symlinked_file_is_replaced_not_followed() {
        let base = tempdir();
        let root = base.join("root");
        std::fs::create_dir_all(root.join("etc")).expect("mkdir");
        let host_file = base.join("host-resolv.conf");
        std::fs::write(&host_file, "nameserver 127.0.0.53\n").expect("write");
        symlink(&host_file, root.join("etc/resolv.conf")).expect("symlink");
        write_in_root(
            &root,
            "/etc/resolv.conf",
            b"nameserver 1.1.1.1\n",
            0o644,
            Durable::Now,
        )
        .expect("write");
        assert_eq!(
            std::fs::read_to_string(&host_file).expect("read"),
            "nameserver 127.0.0.53\n"
        );
        let meta = std::fs::symlink_metadata(root.join("etc/resolv.conf")).expect("meta");
        assert!(meta.file_type().is_file());
        std::fs::remove_dir_all(&base).expect("rm");
    }

    #[test]
    fn a_write_left_to_the_callers_sync_is_complete_and_in_place() {
        let base = tempdir();
        write_in_root(&base, "/etc/hostname", b"vm-1\n", 0o600, Durable::ByCaller).expect("write");
        sync_filesystem(&base).expect("syncfs");
        let written = base.join("etc/hostname");
        assert_eq!(std::fs::read(&written).expect("read"), b"vm-1\n");
        let mode = std::fs::metadata(&written)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // No temporary file is left beside it.
        let names: Vec<_> = std::fs::read_dir(base.join("etc"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["hostname"]);
        let e = sync_filesystem(&base.join("gone")).expect_err("no such directory");
        assert!(e.to_string().contains("gone"), "{e}");
        std::fs::remove_dir_all(&base).expect("rm");
    }

    #[test]
    fn symlink_loops_are_refused() {
        let base = tempdir();
        symlink("/b", base.join("a")).expect("symlink");
        symlink("/a", base.join("b")).expect("symlink");
        assert!(write_in_root(&base, "/a/x", b"", 0o644, Durable::Now).is_err());
        assert!(write_in_root(&base, "/", b"", 0o644, Durable::Now).is_err());
        std::fs::remove_dir_all(&base).expect("rm");
    }
}
