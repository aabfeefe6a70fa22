//! The checks that mount for real: overlayfs at the state directory and shared
//! propagation, each tried in a scratch directory under the state directory that is
//! removed again (a test mount says more than any reading of the mount table), and
//! whether this process shares the daemon's mount namespace.

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};

use super::host::{self, Mount};
use super::report::{Finding, Status};
use super::Local;

/// Where overlayfs must work, with whether an overlay there is a blocker.
#[derive(Debug, Clone)]
pub struct OverlayPlace {
    /// `docker data root` or `containerd root`.
    pub what: &'static str,
    /// The directory.
    pub path: PathBuf,
    /// Whether the daemon stacks overlayfs there (`overlay2`, `overlayfs`).
    pub uses_overlay: bool,
}

/// A scratch directory under the state directory, removed on drop together with
/// the directories the doctor had to create for it (the doctor leaves no trace).
pub struct Scratch {
    dir: PathBuf,
    /// Directories created for the state directory, deepest first.
    created: Vec<PathBuf>,
}

impl Scratch {
    /// Creates `<state_dir>/.cpi-doctor-<pid>`, and the state directory if it is
    /// missing (so the checks run on the filesystem the CPI will use).
    pub fn new(state_dir: &Path) -> std::io::Result<Scratch> {
        let created: Vec<PathBuf> = state_dir
            .ancestors()
            .take_while(|p| !p.exists())
            .map(Path::to_path_buf)
            .collect();
        fs::create_dir_all(state_dir)?;
        let dir = state_dir.join(format!(".cpi-doctor-{}", std::process::id()));
        let scratch = Scratch { dir, created };
        let _ = fs::remove_dir_all(&scratch.dir);
        fs::create_dir(&scratch.dir)?;
        fs::set_permissions(&scratch.dir, fs::Permissions::from_mode(0o700))?;
        Ok(scratch)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(self.dir.join("merged"), UnmountFlags::DETACH);
        let _ = rustix::mount::unmount(self.dir.join("shared"), UnmountFlags::DETACH);
        let _ = fs::remove_dir_all(&self.dir);
        for dir in &self.created {
            // Only empty directories go: anything else is not ours.
            let _ = fs::remove_dir(dir);
        }
    }
}

fn errno_text(e: rustix::io::Errno) -> String {
    std::io::Error::from(e).to_string()
}

/// Mounts an overlay in the scratch directory, writes through it, checks the write
/// landed in the upper directory, and unmounts.
fn try_overlay(scratch: &Path) -> Result<(), String> {
    let [lower, upper, work, merged] =
        ["lower", "upper", "work", "merged"].map(|d| scratch.join(d));
    for d in [&lower, &upper, &work, &merged] {
        fs::create_dir(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    fs::write(lower.join("lower-file"), b"lower")
        .map_err(|e| format!("writing into {}: {e}", lower.display()))?;
    let data = CString::new(format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    ))
    .map_err(|_| "a scratch path holds a NUL byte".to_owned())?;
    rustix::mount::mount(
        "overlay",
        &merged,
        "overlay",
        MountFlags::empty(),
        Some(data.as_c_str()),
    )
    .map_err(|e| {
        format!(
            "mount -t overlay on {}: {}",
            merged.display(),
            errno_text(e)
        )
    })?;
    let used = fs::read(merged.join("lower-file"))
        .and_then(|_| fs::write(merged.join("upper-file"), b"upper"))
        .map_err(|e| format!("using the overlay at {}: {e}", merged.display()));
    let unmounted = rustix::mount::unmount(&merged, UnmountFlags::NOFOLLOW)
        .map_err(|e| format!("unmounting {}: {}", merged.display(), errno_text(e)));
    used?;
    unmounted?;
    if !upper.join("upper-file").exists() {
        return Err(
            "a file written through the overlay did not land in its upper directory".to_owned(),
        );
    }
    Ok(())
}

/// overlayfs at the state directory (a real mount), and no overlay under the state
/// directory or the daemon's storage.
pub fn overlay(
    table: &[Mount],
    state_dir: &Path,
    scratch: Result<&Scratch, &str>,
    places: &[OverlayPlace],
    containerd: bool,
) -> Finding {
    let fs_of = |p: &Path| {
        host::mount_of(table, p)
            .map(|m| m.fs_type.clone())
            .unwrap_or_else(|| "unknown".to_owned())
    };
    let state_fs = fs_of(state_dir);
    let mut f = Finding::new("overlay", Status::Ok, "")
        .detail("state_dir", state_dir.display().to_string())
        .detail("state_dir_fs", state_fs.clone());
    let mut problems = Vec::new();
    let mut blocker = false;
    for place in places {
        let fs = fs_of(&place.path);
        f = f.detail(&format!("{}_fs", place.what.replace(' ', "_")), fs.clone());
        if fs == "overlay" && place.uses_overlay {
            problems.push(format!(
                "the {} {} is on overlay (overlay on overlay does not work)",
                place.what,
                place.path.display()
            ));
            blocker = true;
        }
    }
    if state_fs == "overlay" {
        problems.push(format!("the state directory {} is on overlay (the container's root?): it is lost with the container and cannot hold overlay layers", state_dir.display()));
        blocker |= containerd;
    }
    let trial = match scratch {
        Ok(s) => try_overlay(s.path()),
        Err(why) => Err(why.to_owned()),
    };
    f = f.detail(
        "trial_mount",
        match &trial {
            Ok(()) => "ok".to_owned(),
            Err(e) => e.clone(),
        },
    );
    if let Err(e) = &trial {
        problems.push(format!(
            "a trial overlay mount under {} failed: {e}",
            state_dir.display()
        ));
    }
    let where_ = places
        .iter()
        .map(|p| format!("{} {} on {}", p.what, p.path.display(), fs_of(&p.path)))
        .collect::<Vec<_>>();
    if problems.is_empty() {
        f.summary = format!(
            "overlayfs works at {} (on {state_fs}; a trial overlay mount succeeded){}",
            state_dir.display(),
            if where_.is_empty() {
                String::new()
            } else {
                format!("; {}", where_.join(", "))
            }
        );
        return f;
    }
    f.status = if blocker {
        Status::Blocker
    } else {
        Status::Warn
    };
    f.summary = problems.join("; ");
    f.fix("put the state directory and the daemon's storage (/var/lib/containerd, or docker's data root) on a real volume (ext4/xfs), not the container's overlay root; containerd can also use \"snapshotter\": \"native\"")
}

/// The mount namespace of `pid`, or `None`.
fn mount_ns(pid: &str) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()
}

/// The pid of the first process whose `comm` is `name`.
pub fn pid_of(name: &str) -> Option<String> {
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == name).then_some(pid)
    })
}

/// Whether this process shares the mount namespace of the daemon process `name`:
/// `Some(true|false)`, or `None` when the daemon process is not visible.
pub fn same_mount_ns(name: &str, pid_file: Option<&Path>) -> Option<bool> {
    let pid = pid_file
        .and_then(|p| fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && Path::new(&format!("/proc/{s}")).exists())
        .or_else(|| pid_of(name))?;
    Some(mount_ns(&pid)? == mount_ns("self")?)
}

/// Makes a bind mount of the scratch directory, makes it shared, and undoes it.
fn try_shared(scratch: &Path) -> Result<(), String> {
    let dir = scratch.join("shared");
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    rustix::mount::mount_bind(&dir, &dir)
        .map_err(|e| format!("mount --bind {0} {0}: {1}", dir.display(), errno_text(e)))?;
    let shared = rustix::mount::mount_change(&dir, MountPropagationFlags::SHARED)
        .map_err(|e| format!("mount --make-shared {}: {}", dir.display(), errno_text(e)));
    let unmounted = rustix::mount::unmount(&dir, UnmountFlags::NOFOLLOW)
        .map_err(|e| format!("unmounting {}: {}", dir.display(), errno_text(e)));
    shared?;
    unmounted
}

/// What the backend does about propagation, whether it can (tried for real), and
/// whether this process shares the daemon's mount namespace (it must: the CPI's
/// mounts are the ones the daemon's containers receive).
pub fn propagation(table: &[Mount], scratch: Result<&Scratch, &str>, local: &Local) -> Finding {
    let state_dir = local.state_dir.as_path();
    let daemon = local.daemon;
    let holder = host::mount_of(table, state_dir);
    let own_mount = holder.is_some_and(|m| m.mount_point == state_dir);
    let prop = holder.map(Mount::propagation).unwrap_or("unknown");
    let on = holder
        .map(|m| m.mount_point.display().to_string())
        .unwrap_or_else(|| "?".to_owned());
    let trial = match scratch {
        Ok(s) => try_shared(s.path()),
        Err(why) => Err(why.to_owned()),
    };
    let mut f = Finding::new("propagation", Status::Ok, "")
        .detail("state_dir_mount", on.clone())
        .detail("state_dir_propagation", prop)
        .detail(
            "trial_shared_mount",
            match &trial {
                Ok(()) => "ok".to_owned(),
                Err(e) => e.clone(),
            },
        )
        .detail("same_mount_namespace_as_daemon", local.same_ns);
    let current = if own_mount {
        format!("{} is a {prop} mount", state_dir.display())
    } else {
        format!(
            "{} is not a mount point of its own (it is on {on}, {prop})",
            state_dir.display()
        )
    };
    let plan = if local.containerd {
        "the CPI makes each VM's disks directory a shared mount point (bind onto itself, make-shared) and binds it into the VM rslave"
    } else if own_mount && prop.starts_with("shared") {
        "the CPI uses it as it is and binds each VM's disks directory into the VM rslave"
    } else {
        "on first use the CPI bind-mounts it onto itself and makes it rshared (local attach mode)"
    };
    let fix_ns = if local.containerd {
        "run the CPI in containerd's mount namespace (start both in the same CI container, from the same shell)"
    } else {
        "run the CPI beside dockerd, or set docker.attach_mode to \"helper\""
    };
    match (&trial, local.same_ns) {
        (Err(e), _) => {
            f.status = Status::Blocker;
            f.summary = format!(
                "{current}; making a shared mount there failed ({e}): live disk attach cannot work"
            );
            f.fix("run the CPI as root with CAP_SYS_ADMIN in the daemon's mount namespace (for Docker, or set docker.attach_mode to \"helper\")")
        }
        (Ok(()), Some(false)) => {
            f.status = Status::Blocker;
            f.summary = format!("{current}; shared mounts work here, but this process is not in {daemon}'s mount namespace: the disks it mounts are not the ones {daemon}'s containers see");
            f.fix(fix_ns)
        }
        (Ok(()), None) => {
            f.status = Status::Warn;
            f.summary = format!("{current}; {plan}; a trial shared mount succeeded, but no {daemon} process is visible from here (another PID namespace?), so whether the CPI shares its mount namespace, as it must, cannot be confirmed");
            f.fix(fix_ns)
        }
        (Ok(()), Some(true)) => {
            f.summary = format!("{current}; {plan}; a trial shared mount succeeded, and this process shares {daemon}'s mount namespace");
            f
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Vec<Mount> {
        host::parse_mountinfo(text)
    }

    #[test]
    fn overlay_on_overlay_is_named_and_blocks() {
        // A CI container: the root is overlay, /var/lib/containerd a real volume.
        let t = table(
            "1 0 0:50 / / rw - overlay overlay rw,lowerdir=/l\n\
             2 1 8:1 / /var/lib/containerd rw - ext4 /dev/sdb rw\n",
        );
        let ctrd = OverlayPlace {
            what: "containerd root",
            path: PathBuf::from("/var/lib/containerd"),
            uses_overlay: true,
        };
        let state = Path::new("/var/lib/bosh-container-cpi/containerd");
        let f = overlay(
            &t,
            state,
            Err("not tried"),
            std::slice::from_ref(&ctrd),
            true,
        );
        assert_eq!(f.status, Status::Blocker, "{f:?}");
        assert!(f.summary.contains("state directory"), "{}", f.summary);
        assert!(!f.summary.contains("containerd root /var"), "{}", f.summary);
        assert!(f.fix.contains("real volume"));
        assert_eq!(f.details["containerd_root_fs"], "ext4");
        // The Docker backend only warns about its state directory on overlay.
        let f = overlay(&t, state, Err("not tried"), &[], false);
        assert_eq!(f.status, Status::Warn, "{f:?}");
        // The daemon's storage on overlay blocks whatever the backend.
        let all_overlay = table("1 0 0:50 / / rw - overlay overlay rw\n");
        let f = overlay(&all_overlay, state, Err("not tried"), &[ctrd], false);
        assert_eq!(f.status, Status::Blocker);
        assert!(f.summary.contains("overlay on overlay"), "{}", f.summary);
    }
}
