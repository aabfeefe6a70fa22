//! The agent settings file inside a VM, read and written through Docker's archive API
//! (`GET`/`PUT /containers/<id>/archive`), which works on created-but-not-started
//! containers: the file is in place before the VM's init runs (contract §4), and is
//! rewritten in place when disks come and go.
//!
//! With the local mounter (the CPI on the daemon's host), the CPI also keeps a copy
//! of what it last wrote in the VM's state directory ([`HostCopy`]), so attach and
//! detach read the settings from there instead of through a second archive round
//! trip (each costs tens of milliseconds: dockerd mounts the container's root
//! filesystem for it).
//!
//! VMs created with the local mounter go one step further: the settings file itself
//! is a host file in the VM's state directory, bind-mounted read-only at
//! [`SETTINGS_PATH`] (`HostCopy::bound`), and the CPI writes it directly, with no
//! archive request at all. It is rewritten in place (a bind mount of a single file
//! pins its inode, so a rename would not reach the VM): the new JSON, padded with
//! trailing spaces to the old length, in one write, then the file is truncated to
//! the new length, so the file holds valid JSON before and after and only a read
//! racing the write itself could see a mix; the agent reads the file at boot and
//! when the director asks it to, after the CPI's call has returned.

use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;

use bollard::query_parameters::{DownloadFromContainerOptions, UploadToContainerOptions};
use cpi_core::agent_settings::SETTINGS_PATH;
use cpi_core::AgentSettings;
use futures_util::TryStreamExt;

use crate::client::Client;
use crate::error::{DockerError, Result};

/// The settings file as a tar archive to extract at `/`: one regular file at
/// [`SETTINGS_PATH`], mode 0600, owned by root (it holds the agent's secrets).
pub fn settings_archive(settings: &AgentSettings, mtime: u64) -> Vec<u8> {
    let json = settings.to_json();
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o600);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(mtime);
    header.set_size(json.len() as u64);
    let mut builder = tar::Builder::new(Vec::new());
    let path = SETTINGS_PATH.trim_start_matches('/');
    // Writing into a Vec cannot fail, and the path is a short constant.
    let appended = builder.append_data(&mut header, path, json.as_slice());
    debug_assert!(appended.is_ok());
    builder.into_inner().unwrap_or_default()
}

/// The settings from the archive `GET /archive?path=<SETTINGS_PATH>` returns.
pub fn settings_from_archive(archive: &[u8], container: &str) -> Result<AgentSettings> {
    let bad = |what: String| {
        DockerError::Conflict(format!(
            "the agent settings file {SETTINGS_PATH} in VM container {container} {what}"
        ))
    };
    let mut tar = tar::Archive::new(archive);
    let entries = tar
        .entries()
        .map_err(|e| bad(format!("came back as an unreadable archive: {e}")))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| bad(format!("came back as an unreadable archive: {e}")))?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let mut bytes = Vec::new();
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("could not be read: {e}")))?;
        return AgentSettings::from_json(&bytes)
            .map_err(|e| bad(format!("is not valid agent settings JSON: {e}")));
    }
    Err(bad("is not a regular file".into()))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Writes the settings file into the container.
pub async fn write(client: &Client, container: &str, settings: &AgentSettings) -> Result<()> {
    let archive = settings_archive(settings, now());
    client
        .docker
        .upload_to_container(
            container,
            Some(UploadToContainerOptions {
                path: "/".into(),
                ..Default::default()
            }),
            bollard::body_full(archive.into()),
        )
        .await
        .map_err(client.err(format!(
            "writing the agent settings {SETTINGS_PATH} into container {container}"
        )))
}

/// Creates the marker that releases a prelude waiting for final settings.
pub async fn mark_final(client: &Client, container: &str) -> Result<()> {
    let marker = crate::vm::prelude::SETTINGS_FINAL_MARKER.trim_start_matches('/');
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o600);
    header.set_size(0);
    header.set_mtime(now());
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append_data(&mut header, marker, std::io::empty())
        .map_err(|e| DockerError::Invalid(format!("building the settings marker archive: {e}")))?;
    let archive = builder.into_inner().unwrap_or_default();
    client
        .docker
        .upload_to_container(
            container,
            Some(UploadToContainerOptions {
                path: "/".into(),
                ..Default::default()
            }),
            bollard::body_full(archive.into()),
        )
        .await
        .map_err(client.err(format!(
            "marking the agent settings final in container {container}"
        )))
}

/// Reads the settings file from the container.
pub async fn read(client: &Client, container: &str) -> Result<AgentSettings> {
    let bytes: Vec<u8> = client
        .docker
        .download_from_container(
            container,
            Some(DownloadFromContainerOptions {
                path: SETTINGS_PATH.into(),
            }),
        )
        .try_fold(Vec::new(), |mut acc, chunk| async move {
            acc.extend_from_slice(&chunk);
            Ok(acc)
        })
        .await
        .map_err(client.err(format!(
            "reading the agent settings {SETTINGS_PATH} from container {container}"
        )))?;
    settings_from_archive(&bytes, container)
}

/// The host's copy of a VM's settings, beside its disks directory (never inside the
/// VM): `settings.json` (mode 0600, what the last successful write put in the VM)
/// and `settings.pending` (a write whose outcome is unknown).
///
/// A write marks itself pending, writes into the VM, then replaces the copy and
/// clears the mark. A CPI killed (or a request failed) anywhere in between leaves
/// the mark, and the next read goes to the VM's own file: the copy is used only when
/// it is known to match.
#[derive(Debug, Clone)]
pub struct HostCopy {
    dir: PathBuf,
}

impl HostCopy {
    /// The copy of the VM whose state directory is `vm_dir`.
    pub fn new(vm_dir: impl Into<PathBuf>) -> HostCopy {
        HostCopy { dir: vm_dir.into() }
    }

    fn copy(&self) -> PathBuf {
        self.dir.join("settings.json")
    }

    fn pending(&self) -> PathBuf {
        self.dir.join("settings.pending")
    }

    /// The host file a VM created with the local mounter binds (read-only) at
    /// [`SETTINGS_PATH`]: the VM's settings file itself. Only the CPI writes it.
    pub fn bound(&self) -> PathBuf {
        self.dir.join("agent-env.json")
    }

    /// Whether the VM binds [`HostCopy::bound`] (it exists only for such VMs).
    fn is_bound(&self) -> bool {
        self.bound().is_file()
    }

    /// Creates the empty bound file (mode 0600, owned by the CPI's user, root), before
    /// the container that binds it; [`write_via`] fills it.
    pub fn create_bound(&self) -> Result<()> {
        let path = self.bound();
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map(drop)
            .map_err(|e| DockerError::io("creating the VM's settings file", &path, e))
    }

    /// Rewrites the bound file in place (see the module documentation).
    fn write_bound(&self, settings: &AgentSettings) -> Result<()> {
        let path = self.bound();
        let io = |e: std::io::Error| DockerError::io("writing the VM's settings file", &path, e);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io)?;
        let json = settings.to_json();
        let old = usize::try_from(file.metadata().map_err(io)?.len()).unwrap_or(usize::MAX);
        let mut bytes = json.clone();
        if bytes.len() < old {
            bytes.resize(old, b' ');
        }
        file.write_all_at(&bytes, 0).map_err(io)?;
        file.set_len(json.len() as u64).map_err(io)?;
        file.sync_data().map_err(io)
    }

    /// The bound file's settings, as the VM sees them.
    fn read_bound(&self) -> Result<AgentSettings> {
        let path = self.bound();
        let bytes = std::fs::read(&path)
            .map_err(|e| DockerError::io("reading the VM's settings file", &path, e))?;
        AgentSettings::from_json(&bytes).map_err(|e| {
            DockerError::Conflict(format!(
                "the VM's settings file {} is not valid agent settings JSON: {e}",
                path.display()
            ))
        })
    }

    /// The settings, when the copy is known to match the VM's file.
    fn load(&self) -> Option<AgentSettings> {
        if self.pending().exists() {
            return None;
        }
        self.load_confirmed()
    }

    /// What the last write known to have finished put in the VM (ignoring a pending
    /// mark).
    fn load_confirmed(&self) -> Option<AgentSettings> {
        let bytes = std::fs::read(self.copy()).ok()?;
        AgentSettings::from_json(&bytes).ok()
    }

    fn mark_pending(&self) -> Result<()> {
        let path = self.pending();
        std::fs::write(&path, b"")
            .map_err(|e| DockerError::io("marking a settings write pending", &path, e))
    }

    /// Replaces the copy (atomically, mode 0600) and clears the pending mark.
    fn store(&self, settings: &AgentSettings) -> Result<()> {
        let path = self.copy();
        let io =
            |e: std::io::Error| DockerError::io("writing the host copy of the settings", &path, e);
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir).map_err(io)?;
        tmp.write_all(&settings.to_json()).map_err(io)?;
        tmp.persist(&path).map_err(|e| io(e.error))?;
        match std::fs::remove_file(self.pending()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DockerError::io("clearing", self.pending(), e)),
        }
    }
}

/// Reads the VM's settings: from the host copy when there is one known to match,
/// otherwise from the VM.
pub async fn read_via(
    client: &Client,
    copy: Option<&HostCopy>,
    container: &str,
) -> Result<AgentSettings> {
    if let Some(copy) = copy {
        if let Some(settings) = copy.load() {
            return Ok(settings);
        }
        if copy.is_bound() {
            return match copy.read_bound() {
                Ok(settings) => Ok(settings),
                // A write killed halfway through can leave the VM's file torn: the
                // last write known to have finished is the best there is, and the
                // caller's write replaces the torn file.
                Err(e) => match copy.load_confirmed() {
                    Some(settings) => {
                        tracing::warn!(vm_cid = %container, error = %e, "the VM's settings file is unreadable; using what the last finished write put there");
                        Ok(settings)
                    }
                    None => Err(e),
                },
            };
        }
    }
    read(client, container).await
}

/// Writes the VM's settings, and the host copy after them (see [`HostCopy`]).
pub async fn write_via(
    client: &Client,
    copy: Option<&HostCopy>,
    container: &str,
    settings: &AgentSettings,
) -> Result<()> {
    let Some(copy) = copy.filter(|c| c.dir.is_dir()) else {
        return write(client, container, settings).await;
    };
    copy.mark_pending()?;
    if copy.is_bound() {
        copy.write_bound(settings)?;
    } else {
        write(client, container, settings).await?;
    }
    copy.store(settings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cpi_core::{AgentId, AgentOptions, DiskCid, Networks, VmCid};
    use serde_json::json;

    fn settings() -> AgentSettings {
        AgentSettings::for_vm(
            &AgentId::new("agent-1").expect("id"),
            &VmCid::new("c-1").expect("cid"),
            &AgentOptions {
                mbus: "https://u:p@0.0.0.0:6868".into(),
                ntp: vec![],
            },
            &Networks::parse(&json!({})).expect("nets"),
            &json!({"bosh": {"password": "secret"}}),
        )
    }

    #[test]
    fn archive_holds_one_private_root_file_at_the_settings_path() {
        let archive = settings_archive(&settings(), 1_700_000_000);
        let mut tar = tar::Archive::new(archive.as_slice());
        let entries: Vec<_> = tar
            .entries()
            .expect("entries")
            .map(|e| {
                let e = e.expect("entry");
                let h = e.header();
                (
                    e.path().expect("path").to_string_lossy().into_owned(),
                    h.mode().expect("mode"),
                    h.uid().expect("uid"),
                    h.entry_type(),
                )
            })
            .collect();
        assert_eq!(
            entries,
            vec![(
                "var/vcap/bosh/warden-cpi-agent-env.json".to_owned(),
                0o600,
                0,
                tar::EntryType::Regular
            )]
        );
    }

    #[test]
    fn round_trips_through_an_archive_as_docker_returns_it() {
        let mut s = settings();
        s.attach_persistent(&DiskCid::new("vol-1").expect("disk"));
        // Docker's GET archive names the entry by its base name.
        let json = s.to_json();
        let mut header = tar::Header::new_gnu();
        header.set_size(json.len() as u64);
        header.set_mode(0o600);
        header.set_entry_type(tar::EntryType::Regular);
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(&mut header, "warden-cpi-agent-env.json", json.as_slice())
            .expect("append");
        let archive = b.into_inner().expect("tar");
        let back = settings_from_archive(&archive, "c-1").expect("parse");
        assert_eq!(back, s);
        assert_eq!(back.persistent_disks(), vec!["vol-1".to_owned()]);
    }

    #[test]
    fn garbage_is_reported_with_the_container() {
        let err = settings_from_archive(b"not a tar", "c-9").expect_err("garbage");
        assert!(err.to_string().contains("c-9"), "{err}");
    }

    #[test]
    fn the_bound_file_is_rewritten_in_place_and_a_torn_one_falls_back_to_the_copy() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().expect("tempdir");
        let copy = HostCopy::new(dir.path());
        assert!(!copy.is_bound());
        copy.create_bound().expect("create");
        let meta = std::fs::metadata(copy.bound()).expect("bound");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "it holds secrets");
        let inode = meta.ino();

        let mut long = settings();
        long.attach_persistent(&DiskCid::new("disk-with-a-long-name-1").expect("disk"));
        long.attach_persistent(&DiskCid::new("disk-with-a-long-name-2").expect("disk"));
        copy.mark_pending().expect("pending");
        copy.write_bound(&long).expect("write");
        copy.store(&long).expect("store");
        assert_eq!(std::fs::read(copy.bound()).expect("read"), long.to_json());
        // Shorter content: the same inode (what the VM's bind mount shows), exactly
        // the new JSON afterwards.
        let short = settings();
        copy.write_bound(&short).expect("write");
        let meta = std::fs::metadata(copy.bound()).expect("bound");
        assert_eq!(meta.ino(), inode, "rewritten in place, never replaced");
        assert_eq!(std::fs::read(copy.bound()).expect("read"), short.to_json());
        assert_eq!(copy.read_bound().expect("parse"), short);

        // A write killed halfway (pending mark left, file torn): the last finished
        // write is used.
        copy.mark_pending().expect("pending");
        std::fs::write(copy.bound(), b"{\"agent_id\": \"ag").expect("tear");
        assert!(copy.load().is_none());
        assert!(copy.read_bound().is_err());
        assert_eq!(copy.load_confirmed(), Some(long));
    }

    #[test]
    fn the_host_copy_is_used_only_when_known_to_match() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let copy = HostCopy::new(dir.path());
        assert!(copy.load().is_none(), "no copy yet");
        // A write: pending while the VM's file is being written, then the copy.
        copy.mark_pending().expect("pending");
        assert!(copy.load().is_none(), "unknown while pending");
        let mut s = settings();
        s.attach_persistent(&DiskCid::new("disk-1").expect("disk"));
        copy.store(&s).expect("store");
        assert_eq!(copy.load().map(|l| l.to_json()), Some(s.to_json()));
        let mode = std::fs::metadata(dir.path().join("settings.json"))
            .expect("copy")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "it holds the agent's secrets");
        // A later write that never finished (killed, or the request failed).
        copy.mark_pending().expect("pending");
        assert!(copy.load().is_none(), "an unfinished write hides the copy");
        copy.store(&settings()).expect("store");
        assert!(copy.load().is_some());
        std::fs::write(dir.path().join("settings.json"), b"{not json").expect("corrupt");
        assert!(copy.load().is_none(), "an unreadable copy is not used");
    }
}
