//! Locks shared by the CPI processes of one host.
//!
//! Every call is its own process, and some steps are check-then-act against the
//! daemon: "is there a network of this name? no: create it" (API versions before 1.44
//! let two creates make two networks of one name, and a second create of a subnet
//! fails with "Pool overlaps" before the first one is listed), "is this disk mounted
//! for another VM? no: mount it", "read the settings, add the disk, write them". Run
//! concurrently, those lose: two networks of one name, a disk on two VMs, a settings
//! update lost. The director runs all CPI processes of a deployment on its own host,
//! so an `flock` on a file in the temp directory serializes them. The lock file is
//! named after the daemon endpoint, so CPIs talking to different daemons do not wait
//! for each other.

use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};

use crate::error::{DockerError, Result};

/// How often a waiting process tries the lock again.
const POLL: Duration = Duration::from_millis(20);

/// What a lock serializes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Listing and creating Docker networks in `create_vm`.
    Networks,
    /// Attaching and detaching persistent disks (mount table and settings files).
    Disks,
}

impl Scope {
    fn name(self) -> &'static str {
        match self {
            Scope::Networks => "networks",
            Scope::Disks => "disks",
        }
    }
}

/// A held lock; released when dropped (closing the file releases the `flock`).
#[derive(Debug)]
pub struct HostLock {
    _file: File,
}

/// FNV-1a, 64 bits: a stable name for an endpoint across processes and builds.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The lock file of `scope` for the daemon at `endpoint`.
pub fn path(scope: Scope, endpoint: &str) -> PathBuf {
    std::env::temp_dir()
        .join("bosh-container-cpi-locks")
        .join(format!(
            "docker-{}-{:016x}.lock",
            scope.name(),
            fnv1a(endpoint)
        ))
}

/// Takes the lock of `scope` for `endpoint`, waiting up to `limit` for another CPI
/// process to release it.
pub async fn acquire(scope: Scope, endpoint: &str, limit: Duration) -> Result<HostLock> {
    let path = path(scope, endpoint);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| DockerError::io("creating the lock directory", dir, e))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| DockerError::io("opening the lock file", &path, e))?;
    let start = Instant::now();
    loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(HostLock { _file: file }),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK || e == rustix::io::Errno::INTR => {}
            Err(e) => {
                return Err(DockerError::io(
                    "locking",
                    &path,
                    std::io::Error::from_raw_os_error(e.raw_os_error()),
                ))
            }
        }
        if start.elapsed() >= limit {
            return Err(DockerError::Conflict(format!(
                "another CPI process has held the {} lock {} for over {}s; retry, or look for a \
                 hung cpi process",
                scope.name(),
                path.display(),
                limit.as_secs()
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_files_are_per_scope_and_endpoint() {
        let a = path(Scope::Networks, "unix:///var/run/docker.sock");
        assert_eq!(a, path(Scope::Networks, "unix:///var/run/docker.sock"));
        assert_ne!(a, path(Scope::Disks, "unix:///var/run/docker.sock"));
        assert_ne!(a, path(Scope::Networks, "unix:///run/other.sock"));
        assert!(a.starts_with(std::env::temp_dir()));
    }

    #[tokio::test]
    async fn a_held_lock_makes_the_next_wait_and_time_out() {
        let endpoint = format!("test-{}", uuid::Uuid::new_v4());
        let held = acquire(Scope::Disks, &endpoint, Duration::from_secs(1))
            .await
            .expect("first");
        let err = acquire(Scope::Disks, &endpoint, Duration::from_millis(100))
            .await
            .expect_err("held");
        assert!(err.to_string().contains("disks lock"), "{err}");
        drop(held);
        let again = acquire(Scope::Disks, &endpoint, Duration::from_millis(100)).await;
        assert!(again.is_ok(), "released on drop");
        let _ = std::fs::remove_file(path(Scope::Disks, &endpoint));
    }
}
