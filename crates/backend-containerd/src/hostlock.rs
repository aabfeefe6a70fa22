//! Locks shared by the CPI processes of one host, as files under
//! `<state_dir>/locks/`.
//!
//! Every call is its own process, and some steps are check-then-act on host state:
//! "is this disk mounted for another VM? no: bind it", "read the VM's settings, add
//! the disk, write them", "is this address's reservation stale? take it over". Run
//! concurrently, those lose: a disk bound into two VMs, a settings update lost, one
//! address reserved twice. An `flock` on a lock file serializes them (the state
//! directory is on the CPI's host, like containerd).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};

use crate::error::{ContainerdError, Result};

/// How often a waiting process tries the lock again.
const POLL: Duration = Duration::from_millis(20);

/// What a lock serializes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Attaching and detaching persistent disks (mount table, disk records, settings).
    Disks,
    /// Reserving manual addresses.
    Addresses,
    /// Adding the host's firewall rules of a bridge.
    BridgeRules,
}

impl Scope {
    fn name(self) -> &'static str {
        match self {
            Scope::Disks => "disks",
            Scope::Addresses => "addresses",
            Scope::BridgeRules => "bridge-rules",
        }
    }
}

/// A held lock; released when dropped (closing the file releases the `flock`).
#[derive(Debug)]
pub struct HostLock {
    _file: File,
}

/// The lock file of `scope`.
pub fn path(state_dir: &Path, scope: Scope) -> PathBuf {
    state_dir
        .join("locks")
        .join(format!("{}.lock", scope.name()))
}

/// Takes the lock of `scope`, waiting up to `limit` for another CPI process to
/// release it.
pub async fn acquire(state_dir: &Path, scope: Scope, limit: Duration) -> Result<HostLock> {
    let path = path(state_dir, scope);
    if let Some(dir) = path.parent() {
        crate::fsutil::create_dirs(dir, true)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| ContainerdError::io("opening the lock file", &path, e))?;
    let start = Instant::now();
    loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(HostLock { _file: file }),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK || e == rustix::io::Errno::INTR => {}
            Err(e) => {
                return Err(ContainerdError::io(
                    "locking",
                    &path,
                    std::io::Error::from_raw_os_error(e.raw_os_error()),
                ))
            }
        }
        if start.elapsed() >= limit {
            return Err(ContainerdError::Refused(format!(
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

    #[tokio::test]
    async fn a_held_lock_makes_the_next_wait_and_time_out() {
        let dir = tempfile::tempdir().expect("tmp");
        let held = acquire(dir.path(), Scope::Disks, Duration::from_secs(1))
            .await
            .expect("first");
        let err = acquire(dir.path(), Scope::Disks, Duration::from_millis(100))
            .await
            .expect_err("held");
        assert!(err.to_string().contains("disks lock"), "{err}");
        let other = acquire(dir.path(), Scope::Addresses, Duration::from_millis(100)).await;
        assert!(other.is_ok(), "scopes are independent");
        drop(held);
        let again = acquire(dir.path(), Scope::Disks, Duration::from_millis(100)).await;
        assert!(again.is_ok(), "released on drop");
    }
}
