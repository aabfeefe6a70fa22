//! Host mounts: containerd's snapshot mounts on a host directory (to write files into a
//! VM's root filesystem before it starts), the per-VM shared mount that makes live disk
//! attach work, disk bind mounts, and reading `/proc/self/mountinfo`.
//!
//! The CPI runs as root in containerd's mount namespace, so a mount made here is
//! visible to containerd and its shims. Parsing (`mountinfo`, mount options) is pure.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use containerd_client::types::Mount as ContainerdMount;
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};

use crate::error::{ContainerdError, Result};

pub use cpi_core::mountinfo::{parse_mountinfo, MountInfo};

/// The mount table of this process.
pub fn read_mountinfo() -> Result<Vec<MountInfo>> {
    let path = "/proc/self/mountinfo";
    std::fs::read_to_string(path)
        .map(|t| parse_mountinfo(&t))
        .map_err(|e| ContainerdError::io("reading", path, e))
}

/// Whether `path` is a mount point, by mount ids (see [`cpi_hostfs`]); `None` when
/// the kernel reports no mount ids: then the caller reads the mount table.
pub fn is_mount_point(path: &Path) -> Result<Option<bool>> {
    cpi_hostfs::is_mount_point(path).map_err(|e| ContainerdError::io("statx", path, e))
}

/// The names of the entries of `dir` that are mount points, sorted; `None` without
/// mount ids.
pub fn mount_points_in(dir: &Path) -> Result<Option<Vec<String>>> {
    cpi_hostfs::mount_points_in(dir).map_err(|e| ContainerdError::io("listing", dir, e))
}

/// Removes `dir` and everything below it without ever crossing into another mount
/// (a disk still bound there keeps its data); `None` without mount ids.
pub fn remove_tree_on_one_mount(dir: &Path) -> Result<Option<()>> {
    cpi_hostfs::remove_tree_on_one_mount(dir).map_err(|e| match e {
        cpi_hostfs::RemoveError::StillMounted { .. } => ContainerdError::Refused(e.to_string()),
        cpi_hostfs::RemoveError::Io { what, path, source } => {
            ContainerdError::io(what, &path, source)
        }
    })
}

/// The topmost mount at exactly `path`, if `path` is a mount point.
pub fn mount_at<'a>(table: &'a [MountInfo], path: &Path) -> Option<&'a MountInfo> {
    table.iter().rev().find(|m| m.mount_point == path)
}

/// Every mount point at or below `dir`, deepest first (the order to unmount them in),
/// without duplicates.
pub fn mounts_under(table: &[MountInfo], dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = table
        .iter()
        .filter(|m| m.mount_point.starts_with(dir))
        .map(|m| m.mount_point.clone())
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

/// Mount options split the way mount(8) and containerd split them: kernel flags and
/// the data string for the filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedOptions {
    /// `MS_*` flags other than bind/remount/propagation.
    pub flags: MountFlags,
    /// A bind mount (`bind`).
    pub bind: bool,
    /// A recursive bind mount (`rbind`).
    pub recursive: bool,
    /// Filesystem-specific options (`lowerdir=...`), comma-joined.
    pub data: String,
}

/// Parses containerd mount options (containerd's `parseMountOptions`).
pub fn parse_options(options: &[String]) -> ParsedOptions {
    let mut out = ParsedOptions {
        flags: MountFlags::empty(),
        bind: false,
        recursive: false,
        data: String::new(),
    };
    let mut data = Vec::new();
    for opt in options {
        let (set, clear): (MountFlags, MountFlags) = match opt.as_str() {
            "bind" => {
                out.bind = true;
                continue;
            }
            "rbind" => {
                out.bind = true;
                out.recursive = true;
                continue;
            }
            "defaults" | "rw" => (MountFlags::empty(), MountFlags::RDONLY),
            "ro" => (MountFlags::RDONLY, MountFlags::empty()),
            "nosuid" => (MountFlags::NOSUID, MountFlags::empty()),
            "suid" => (MountFlags::empty(), MountFlags::NOSUID),
            "nodev" => (MountFlags::NODEV, MountFlags::empty()),
            "dev" => (MountFlags::empty(), MountFlags::NODEV),
            "noexec" => (MountFlags::NOEXEC, MountFlags::empty()),
            "exec" => (MountFlags::empty(), MountFlags::NOEXEC),
            "noatime" => (MountFlags::NOATIME, MountFlags::empty()),
            "atime" => (MountFlags::empty(), MountFlags::NOATIME),
            "nodiratime" => (MountFlags::NODIRATIME, MountFlags::empty()),
            "diratime" => (MountFlags::empty(), MountFlags::NODIRATIME),
            "relatime" => (MountFlags::RELATIME, MountFlags::empty()),
            "norelatime" => (MountFlags::empty(), MountFlags::RELATIME),
            "strictatime" => (MountFlags::STRICTATIME, MountFlags::empty()),
            "nostrictatime" => (MountFlags::empty(), MountFlags::STRICTATIME),
            "sync" => (MountFlags::SYNCHRONOUS, MountFlags::empty()),
            "async" => (MountFlags::empty(), MountFlags::SYNCHRONOUS),
            "dirsync" => (MountFlags::DIRSYNC, MountFlags::empty()),
            // Propagation flags only matter for mounts a runtime makes.
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" => continue,
            other => {
                data.push(other.to_owned());
                continue;
            }
        };
        out.flags = (out.flags | set) & !clear;
    }
    out.data = data.join(",");
    out
}

/// Mounts containerd's `mounts` (a snapshot's, usually one overlay or bind) on
/// `target`, in order.
pub fn mount_all(mounts: &[ContainerdMount], target: &Path) -> Result<()> {
    for m in mounts {
        mount_one(m, target)?;
    }
    Ok(())
}

fn mount_one(m: &ContainerdMount, target: &Path) -> Result<()> {
    let opts = parse_options(&m.options);
    let fail = |e: rustix::io::Errno| {
        ContainerdError::io(
            format!(
                "mounting {} {} (options {:?}) on",
                m.r#type, m.source, m.options
            ),
            target,
            std::io::Error::from(e),
        )
    };
    if opts.bind || m.r#type == "bind" {
        if opts.recursive {
            rustix::mount::mount_bind_recursive(m.source.as_str(), target).map_err(fail)?;
        } else {
            rustix::mount::mount_bind(m.source.as_str(), target).map_err(fail)?;
        }
        if opts.flags.contains(MountFlags::RDONLY) {
            rustix::mount::mount_remount(target, MountFlags::BIND | opts.flags, "")
                .map_err(fail)?;
        }
        return Ok(());
    }
    let data = std::ffi::CString::new(opts.data.clone()).map_err(|_| {
        ContainerdError::Refused(format!("mount options of {} contain a NUL byte", m.source))
    })?;
    rustix::mount::mount(
        m.source.as_str(),
        target,
        m.r#type.as_str(),
        opts.flags,
        Some(data.as_c_str()),
    )
    .map_err(fail)
}

/// How long [`unmount`] keeps retrying a busy mount. A process that another thread
/// is spawning holds copies of this process's open files from its fork until its
/// exec, so a mount whose files were written and closed a moment ago can still be
/// busy for that moment (seen in CI: `EBUSY` on the setup mount of a VM's root
/// filesystem while a parallel test started CNI plugins).
const BUSY_GRACE: Duration = Duration::from_millis(1500);

/// Unmounts `target`; a path that is not mounted (or does not exist) is success.
/// `EBUSY` is retried for up to [`BUSY_GRACE`] (blocking the calling thread, which
/// happens only when the mount really is busy) before it is reported.
pub fn unmount(target: &Path) -> Result<()> {
    unmount_within(target, BUSY_GRACE)
}

fn unmount_within(target: &Path, grace: Duration) -> Result<()> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        match rustix::mount::unmount(target, UnmountFlags::NOFOLLOW) {
            Ok(()) => return Ok(()),
            Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOENT => {
                return Ok(())
            }
            Err(e) if e == rustix::io::Errno::BUSY && started.elapsed() < grace => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(e) => {
                return Err(ContainerdError::io(
                    "unmounting",
                    target,
                    std::io::Error::from(e),
                ))
            }
        }
    }
}

/// Unmounts everything at or below `dir`, deepest first, each as often as it is
/// stacked. Returns the mount points that could not be unmounted (with why).
///
/// Only the mount points this CPI makes below a VM directory are looked for by mount
/// id (`dir/<entry>` and `dir/disks/<entry>`, see [`known_mount_points`]); anything
/// else mounted below stops [`remove_tree_on_one_mount`] later. Without mount ids
/// the mount table is read.
pub fn unmount_all_under(dir: &Path) -> Result<Vec<String>> {
    if let Some(points) = known_mount_points(dir)? {
        let mut failures = Vec::new();
        for p in points {
            // Each as often as it is stacked.
            for _ in 0..8 {
                if is_mount_point(&p)? != Some(true) {
                    break;
                }
                if let Err(e) = unmount(&p) {
                    failures.push(e.to_string());
                    break;
                }
            }
        }
        return Ok(failures);
    }
    let mut failures = Vec::new();
    // A mount point can be stacked; retry a few rounds until nothing is left.
    for _ in 0..8 {
        let table = read_mountinfo()?;
        let points = mounts_under(&table, dir);
        if points.is_empty() {
            return Ok(failures);
        }
        failures.clear();
        for p in &points {
            if let Err(e) = unmount(p) {
                failures.push(e.to_string());
            }
        }
    }
    let left = mounts_under(&read_mountinfo()?, dir);
    if !left.is_empty() && failures.is_empty() {
        failures.push(format!("still mounted: {left:?}"));
    }
    Ok(failures)
}

/// The mount points this CPI makes below a VM directory, deepest first (see
/// [`cpi_hostfs::mount_points_of_vm_dir`]); `None` without mount ids.
fn known_mount_points(dir: &Path) -> Result<Option<Vec<PathBuf>>> {
    cpi_hostfs::mount_points_of_vm_dir(dir).map_err(|e| ContainerdError::io("listing", dir, e))
}

/// Bind-mounts `source` on `target` (not recursive).
pub fn bind(source: &Path, target: &Path) -> Result<()> {
    rustix::mount::mount_bind(source, target).map_err(|e| {
        ContainerdError::io(
            format!("bind-mounting {} on", source.display()),
            target,
            std::io::Error::from(e),
        )
    })
}

/// Makes `dir` a mount point of its own with shared propagation (`mount --bind dir
/// dir; mount --make-shared dir`), unless it already is one. Mounts made below it
/// later then appear in every container that bind-mounted it with slave propagation:
/// that is how a disk attached on the host shows up live inside a running VM.
///
/// Told by mount ids, not the mount table: making a mount point that already is
/// shared shared again changes nothing, so no table lookup of its propagation is
/// needed.
pub fn ensure_shared_mount_point(dir: &Path) -> Result<()> {
    let mounted = match is_mount_point(dir)? {
        Some(m) => m,
        None => {
            let table = read_mountinfo()?;
            match mount_at(&table, dir) {
                Some(m) if m.is_shared() => return Ok(()),
                found => found.is_some(),
            }
        }
    };
    if !mounted {
        bind(dir, dir)?;
    }
    rustix::mount::mount_change(dir, MountPropagationFlags::SHARED)
        .map_err(|e| ContainerdError::io("making a shared mount of", dir, std::io::Error::from(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
100 22 254:0 /var/lib/cpi/vms/vm-1/disks /var/lib/cpi/vms/vm-1/disks rw,relatime shared:55 - ext4 /dev/vda rw
101 100 254:0 /var/lib/cpi/disks/disk-1 /var/lib/cpi/vms/vm-1/disks/disk-1 rw,relatime shared:55 - ext4 /dev/vda rw
102 22 0:50 / /var/lib/cpi/vms/vm-1/root\\040fs rw - overlay overlay rw,lowerdir=/a,upperdir=/b,workdir=/c
103 22 0:51 / /var/lib/cpi/vms/vm-10 rw master:3 - tmpfs tmpfs rw
";

    #[test]
    fn parses_mountinfo_with_escapes_and_optional_fields() {
        let table = parse_mountinfo(MOUNTINFO);
        assert_eq!(table.len(), 5);
        assert_eq!(table[1].optional, vec!["shared:55".to_owned()]);
        assert!(table[1].is_shared());
        assert!(!table[0].is_shared());
        assert_eq!(table[2].root, "/var/lib/cpi/disks/disk-1");
        assert_eq!(
            table[3].mount_point,
            PathBuf::from("/var/lib/cpi/vms/vm-1/root fs")
        );
        assert_eq!(table[3].fs_type, "overlay");
        assert!(table[4].optional == vec!["master:3".to_owned()]);
    }

    #[test]
    fn mounts_under_a_dir_deepest_first_and_not_its_namesakes() {
        let table = parse_mountinfo(MOUNTINFO);
        let got = mounts_under(&table, Path::new("/var/lib/cpi/vms/vm-1"));
        assert_eq!(
            got,
            vec![
                PathBuf::from("/var/lib/cpi/vms/vm-1/disks/disk-1"),
                PathBuf::from("/var/lib/cpi/vms/vm-1/disks"),
                PathBuf::from("/var/lib/cpi/vms/vm-1/root fs"),
            ]
        );
        assert!(mount_at(&table, Path::new("/var/lib/cpi/vms/vm-1/disks")).is_some());
        assert!(mount_at(&table, Path::new("/var/lib/cpi/vms")).is_none());
    }

    #[test]
    fn parses_containerd_overlay_and_bind_options() {
        let o = |v: &[&str]| parse_options(&v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        let overlay = o(&["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l"]);
        assert!(!overlay.bind);
        assert_eq!(overlay.flags, MountFlags::empty());
        assert_eq!(overlay.data, "index=off,workdir=/w,upperdir=/u,lowerdir=/l");
        let bind = o(&["rbind", "ro", "nosuid"]);
        assert!(bind.bind && bind.recursive);
        assert_eq!(bind.flags, MountFlags::RDONLY | MountFlags::NOSUID);
        assert_eq!(bind.data, "");
        let rw = o(&["ro", "rw", "rslave"]);
        assert_eq!(rw.flags, MountFlags::empty());
    }

    /// A tmpfs mounted on a fresh directory; needs root, as the CPI does.
    fn tmpfs() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("m");
        std::fs::create_dir(&target).expect("mkdir");
        rustix::mount::mount("tmpfs", &target, "tmpfs", MountFlags::empty(), None)
            .expect("mounting a tmpfs needs root (CAP_SYS_ADMIN), as the CPI itself does");
        (dir, target)
    }

    #[test]
    fn a_vm_directory_is_unmounted_and_removed_but_never_through_a_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vm = dir.path().join("vms").join("vm-1");
        let disks = vm.join("disks");
        let disk_data = dir.path().join("disk-data");
        std::fs::create_dir_all(disks.join("disk-1")).expect("mkdir");
        std::fs::create_dir_all(vm.join("data").join("deep")).expect("mkdir");
        std::fs::write(vm.join("data").join("deep").join("f"), b"x").expect("write");
        std::fs::create_dir_all(&disk_data).expect("mkdir");
        std::fs::write(disk_data.join("marker"), b"keep").expect("write");
        ensure_shared_mount_point(&disks).expect("shared disks dir");
        ensure_shared_mount_point(&disks).expect("twice: no second bind");
        let table = read_mountinfo().expect("mountinfo");
        assert_eq!(mounts_under(&table, &disks).len(), 1, "one bind, shared");
        assert!(mount_at(&table, &disks).is_some_and(|m| m.is_shared()));
        // A disk bound twice (stacked).
        bind(&disk_data, &disks.join("disk-1")).expect("bind disk");
        bind(&disk_data, &disks.join("disk-1")).expect("bind disk again");

        let err = remove_tree_on_one_mount(&vm).expect_err("a disk is still mounted");
        assert!(err.to_string().contains("still mounted"), "{err}");
        assert_eq!(
            std::fs::read(disk_data.join("marker")).expect("disk data kept"),
            b"keep"
        );

        assert!(unmount_all_under(&vm).expect("unmount").is_empty());
        assert!(mounts_under(&read_mountinfo().expect("mountinfo"), &vm).is_empty());
        remove_tree_on_one_mount(&vm)
            .expect("remove")
            .expect("mount ids reported");
        assert!(!vm.exists());
        assert_eq!(
            std::fs::read(disk_data.join("marker")).expect("disk data kept"),
            b"keep"
        );
    }

    #[test]
    fn unmount_waits_out_a_file_held_open_for_a_moment() {
        let (_dir, target) = tmpfs();
        let file = std::fs::File::create(target.join("settings.json")).expect("create");
        let holder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            drop(file);
        });
        unmount(&target).expect("unmount after the file closed");
        holder.join().expect("holder");
        assert!(mount_at(&read_mountinfo().expect("mountinfo"), &target).is_none());
    }

    #[test]
    fn unmount_reports_a_mount_that_stays_busy() {
        let (_dir, target) = tmpfs();
        let file = std::fs::File::create(target.join("held")).expect("create");
        let err = unmount_within(&target, Duration::from_millis(50))
            .expect_err("a file held open keeps the mount busy");
        assert!(err.to_string().contains("busy"), "{err}");
        drop(file);
        unmount(&target).expect("unmount once the file is closed");
        // Not mounted any more: success, as the callers' cleanup paths rely on.
        unmount(&target).expect("unmounting twice");
    }
}
