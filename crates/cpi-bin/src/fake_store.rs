//! The fake backend's world in a file, shared by concurrent CPI processes.
//!
//! The director runs many CPI processes at once, so each call takes an exclusive
//! `flock` on `<state_file>.lock` (a separate file: the state file itself is replaced
//! by rename, and a lock on a replaced inode would protect nothing), loads the state
//! (a missing or empty file is an empty world), runs, and saves atomically (write a
//! temporary file beside it, fsync, rename) only when something changed.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use cpi_core::fake::FakeState;
use cpi_core::{CpiError, CpiResult};
use serde_json::Value;

/// How long a call waits for another process to release the state.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(120);

fn lock_path(state_file: &Path) -> PathBuf {
    let mut name = state_file.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

fn open_private(path: &Path, options: &mut OpenOptions) -> std::io::Result<File> {
    options.mode(0o600).open(path)
}

/// Loads the state; a missing or blank file is an empty world.
pub fn load(path: &Path) -> anyhow::Result<FakeState> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FakeState::default()),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("reading the fake state file {}", path.display()))
        }
    };
    if text.trim().is_empty() {
        return Ok(FakeState::default());
    }
    serde_json::from_str(&text).with_context(|| {
        format!(
            "the fake state file {} is not a valid state; delete it to start from an empty world",
            path.display()
        )
    })
}

/// Saves the state atomically (temporary file + rename), readable by the owner only:
/// VM settings hold the director's secrets.
pub fn save(path: &Path, state: &FakeState) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("the fake state file {} has no file name", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let write = || -> anyhow::Result<()> {
        let mut file = open_private(
            &tmp,
            OpenOptions::new().write(true).create(true).truncate(true),
        )?;
        serde_json::to_writer(&mut file, state)?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        e.context(format!("saving the fake state file {}", path.display()))
    })
}

/// Runs `body` on the state under an exclusive lock, and saves what it returns when it
/// differs. A failure to lock, load or save is a `CloudError`; when the call had failed
/// too, both are reported.
pub fn run_locked<F>(path: &Path, timeout: Duration, body: F) -> CpiResult<Value>
where
    F: FnOnce(FakeState) -> (CpiResult<Value>, FakeState),
{
    let as_cloud = |e: anyhow::Error| CpiError::cloud(format!("{e:#}"));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| {
                format!(
                    "creating the directory of the fake state file {}",
                    path.display()
                )
            })
            .map_err(as_cloud)?;
    }
    let lock_file = lock_path(path);
    let file = open_private(
        &lock_file,
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false),
    )
    .with_context(|| format!("opening the lock file {}", lock_file.display()))
    .map_err(as_cloud)?;
    let mut lock = fd_lock::RwLock::new(file);
    let started = Instant::now();
    let _guard = loop {
        match lock.try_write() {
            Ok(guard) => break guard,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if started.elapsed() > timeout {
                    return Err(as_cloud(anyhow::anyhow!(
                        "another CPI process has held the lock {} for over {timeout:?}; \
                         is one stuck? (find it with `fuser {}`)",
                        lock_file.display(),
                        lock_file.display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                return Err(as_cloud(
                    anyhow::Error::new(e).context(format!("locking {}", lock_file.display())),
                ))
            }
        }
    };
    let before = load(path).map_err(as_cloud)?;
    let (result, after) = body(before.clone());
    if after != before {
        if let Err(e) = save(path, &after) {
            return Err(match result {
                Ok(_) => CpiError::cloud(format!(
                    "the call succeeded but its effect could not be recorded: {e:#}"
                )),
                Err(call) => CpiError::new(call.kind, format!("{}; and then: {e:#}", call.message)),
            });
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use cpi_core::fake::FakeDisk;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;

    fn disk() -> FakeDisk {
        FakeDisk {
            size_mib: 1,
            cloud_properties: Default::default(),
            metadata: Default::default(),
            attached_to: None,
            created_near: None,
            director_uuid: None,
        }
    }

    #[test]
    fn missing_and_blank_files_are_empty_worlds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        assert_eq!(load(&path).expect("missing"), FakeState::default());
        std::fs::write(&path, "  \n").expect("write");
        assert_eq!(load(&path).expect("blank"), FakeState::default());
        std::fs::write(&path, "{nope").expect("write");
        let err = load(&path).expect_err("invalid");
        assert!(format!("{err:#}").contains("delete it"), "{err:#}");
    }

    #[test]
    fn saves_only_changes_atomically_and_privately() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub").join("state.json");
        let result = run_locked(&path, LOCK_TIMEOUT, |state| (Ok(json!(1)), state));
        assert_eq!(result, Ok(json!(1)));
        assert!(!path.exists(), "nothing changed, nothing written");

        let result = run_locked(&path, LOCK_TIMEOUT, |mut state| {
            state.disks.insert("vol-1".into(), disk());
            (Ok(Value::Null), state)
        });
        assert_eq!(result, Ok(Value::Null));
        let saved = load(&path).expect("load");
        assert!(saved.disks.contains_key("vol-1"));
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o077, 0, "state file is private: {mode:o}");
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("ls")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn a_failed_call_keeps_its_effects_and_a_bad_path_is_a_cloud_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let err = run_locked(&path, LOCK_TIMEOUT, |mut state| {
            state.disks.insert("vol-1".into(), disk());
            (Err(CpiError::disk_not_found("vol-2")), state)
        })
        .expect_err("the call's error is returned");
        assert_eq!(err.kind, cpi_core::ErrorKind::DiskNotFound);
        assert!(load(&path).expect("load").disks.contains_key("vol-1"));

        // A directory where the state file should be: loading fails clearly.
        let bad = dir.path().join("bad.json");
        std::fs::create_dir(&bad).expect("mkdir");
        let err = run_locked(&bad, LOCK_TIMEOUT, |s| (Ok(Value::Null), s)).expect_err("dir");
        assert_eq!(err.kind, cpi_core::ErrorKind::CloudError);
        assert!(err.message.contains("bad.json"), "{}", err.message);
    }

    #[test]
    fn the_lock_excludes_other_holders() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let held = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(lock_path(&path))
            .expect("open");
        let mut other = fd_lock::RwLock::new(held);
        let guard = other.try_write().expect("first holder");
        let err = run_locked(&path, Duration::from_millis(50), |s| (Ok(Value::Null), s))
            .expect_err("locked");
        assert!(err.message.contains("held the lock"), "{}", err.message);
        drop(guard);
        run_locked(&path, Duration::from_millis(50), |s| (Ok(Value::Null), s)).expect("free");
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    for j in 0..5 {
                        run_locked(&path, LOCK_TIMEOUT, |mut state| {
                            state.disks.insert(format!("vol-{i}-{j}"), disk());
                            (Ok(Value::Null), state)
                        })
                        .expect("run");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("join");
        }
        assert_eq!(load(&path).expect("load").disks.len(), 40);
    }
}
