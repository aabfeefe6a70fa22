//! What a CPI process killed halfway through a call leaves behind, and how the next
//! call finds and removes it.
//!
//! The director retries a call that never answered; it does not know the cid the
//! killed call minted, so nobody would ever delete that call's objects. Two owner
//! records make them findable:
//!
//! - **Leases** carry the identity of the process that took them (boot id, pid
//!   namespace, pid and the process's start time). A lease whose process is gone
//!   belonged to a call that died: [`remove_dead_leases`] deletes it, and
//!   containerd's collector removes the content and snapshots only it held (a
//!   half-imported stemcell, the root filesystem of a VM that never got a container).
//!   Leases of processes we cannot judge (another pid namespace, no labels) are left
//!   to expire by themselves.
//! - **VM directories** are born with an `owner.json` (agent id, director uuid):
//!   made under a temporary name that names the making process, then renamed, before
//!   any other object of the VM exists ([`create_vm_dir`]; half-made ones of dead
//!   processes go in [`remove_dead_new_dirs`]); the directory is removed last on
//!   delete. `create_vm` with an agent id that a VM directory already
//!   records is the director retrying a `create_vm` that never answered (the director
//!   mints one agent id per VM and retries with it): [`earlier_attempts`] names those
//!   VMs, which are then destroyed like `delete_vm` does. It finds them by name, not
//!   by reading every VM's `owner.json`: each VM directory has an entry
//!   `agents/<owner key>/<cid>` in the state directory ([`VmOwner::index_key`]),
//!   made before the directory is renamed into place and removed right before the
//!   directory is (see [`create_vm_dir`]).

use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::{ListImagesRequest, ListRequest as ListLeasesRequest};
use cpi_core::CallContext;
use serde::{Deserialize, Serialize};

use crate::client::Daemon;
use crate::error::{ContainerdError, Result};
use crate::labels;

/// The lease label naming the process that took the lease: `boot/pidns/pid/start`.
pub const OWNER_PROCESS: &str = "io.bosh.cpi.owner-process";

/// The file in a VM directory that records whom the VM was made for.
pub const OWNER_FILE: &str = "owner.json";

/// What `owner.json` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmOwner {
    /// The agent id of the `create_vm` call.
    pub agent_id: String,
    /// The director uuid of the call, when it had one.
    #[serde(default)]
    pub director_uuid: Option<String>,
    /// The manual networks' addresses the VM reserves (`delete_vm` releases them by
    /// name). `None` in records written before they were recorded: then every
    /// reservation is read to find the VM's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<Vec<IpAddr>>,
}

/// The directory of the state directory that indexes VM directories by owner.
const INDEX_DIR: &str = "agents";

/// Made in [`INDEX_DIR`] once every VM directory made before the index existed has
/// its entry (a CPI upgraded with VMs in place).
const INDEXED_MARK: &str = ".indexed";

/// An index entry whose VM directory has been missing for this long is stale (the
/// paths that remove entries with their directories are in [`remove_dead_new_dirs`]
/// and `delete_vm`; this is the net under them, e.g. after a power loss). A younger
/// one may be a directory still being made: that takes milliseconds.
const STALE_ENTRY_AGE: Duration = Duration::from_secs(600);

impl VmOwner {
    /// The owner of a `create_vm` call.
    pub fn of_call(agent_id: &str, ctx: &CallContext, addresses: Vec<IpAddr>) -> VmOwner {
        VmOwner {
            agent_id: agent_id.to_owned(),
            director_uuid: ctx.director_uuid.clone(),
            addresses: Some(addresses),
        }
    }

    /// The name of this owner's index directory: 32 hex digits of the SHA-256 of
    /// the director uuid and the agent id (both arbitrary strings from the request).
    pub fn index_key(&self) -> String {
        use sha2::Digest as _;
        let mut hash = sha2::Sha256::new();
        hash.update(self.director_uuid.as_deref().unwrap_or("").as_bytes());
        hash.update([0u8]);
        hash.update(self.agent_id.as_bytes());
        hash.finalize()
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn same_owner(&self, other: &VmOwner) -> bool {
        self.agent_id == other.agent_id && self.director_uuid == other.director_uuid
    }
}

/// The owner record of the VM directory `vm_dir`; `None` when there is none or it
/// cannot be read.
pub fn read_owner(vm_dir: &Path) -> Option<VmOwner> {
    let text = std::fs::read(vm_dir.join(OWNER_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

fn index_entry(state_dir: &Path, owner: &VmOwner, cid: &str) -> PathBuf {
    state_dir.join(INDEX_DIR).join(owner.index_key()).join(cid)
}

/// Adds VM `cid` to its owner's index directory (an empty file).
pub fn add_index_entry(state_dir: &Path, owner: &VmOwner, cid: &str) -> Result<()> {
    let path = index_entry(state_dir, owner, cid);
    let dir = path.parent().unwrap_or(state_dir);
    let mut attempts = 0;
    loop {
        crate::fsutil::create_dirs(dir, true)?;
        match std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
        {
            Ok(_) => return Ok(()),
            // A `delete_vm` of the same owner removed the emptied directory between
            // the two steps.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 3 => {
                attempts += 1;
            }
            Err(e) => {
                return Err(ContainerdError::io(
                    "indexing the VM directory at",
                    &path,
                    e,
                ))
            }
        }
    }
}

/// Removes VM `cid`'s index entry, and its owner's index directory once empty.
pub fn remove_index_entry(state_dir: &Path, owner: &VmOwner, cid: &str) -> Result<()> {
    let path = index_entry(state_dir, owner, cid);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ContainerdError::io("removing the index entry", &path, e)),
    }
    if let Some(dir) = path.parent() {
        // Fails while another VM of the owner has an entry: nothing to do then.
        let _ = std::fs::remove_dir(dir);
    }
    Ok(())
}

/// Gives every VM directory made before the index existed its entry, once.
fn ensure_indexed(state_dir: &Path) {
    let index = state_dir.join(INDEX_DIR);
    let mark = index.join(INDEXED_MARK);
    if mark.exists() {
        return;
    }
    let mut complete = true;
    match std::fs::read_dir(state_dir.join("vms")) {
        Ok(entries) => {
            for e in entries.flatten() {
                let cid = e.file_name().to_string_lossy().into_owned();
                if !crate::vm::plausible_vm_cid(&cid) {
                    continue;
                }
                if let Some(owner) = read_owner(&e.path()) {
                    if let Err(err) = add_index_entry(state_dir, &owner, &cid) {
                        tracing::warn!("indexing the VM directories: {err}");
                        complete = false;
                    }
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!("indexing the VM directories: listing them: {e}");
            complete = false;
        }
    }
    if complete {
        let marked = crate::fsutil::create_dirs(&index, true).and_then(|()| {
            std::fs::write(&mark, b"").map_err(|e| ContainerdError::io("writing", &mark, e))
        });
        if let Err(e) = marked {
            tracing::warn!("indexing the VM directories: {e}");
        }
    }
}

/// This process's identity for [`OWNER_PROCESS`]; `None` when `/proc` cannot tell.
pub fn this_process() -> Option<String> {
    let pid = std::process::id();
    process_identity(pid, &std::fs::read_link("/proc/self/ns/pid").ok()?)
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// The start time (field 22 of `/proc/<pid>/stat`, after the command name, which may
/// hold spaces and parentheses).
fn start_time(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19).map(str::to_owned)
}

fn process_identity(pid: u32, pidns: &Path) -> Option<String> {
    let ns = pidns.to_string_lossy();
    let ns = ns.trim_start_matches("pid:[").trim_end_matches(']');
    Some(format!("{}/{ns}/{pid}/{}", boot_id()?, start_time(pid)?))
}

/// Whether the process an [`OWNER_PROCESS`] value names is certainly gone: another
/// boot, or the same pid namespace without that pid at that start time. `false` when
/// it cannot be told.
pub fn owner_is_dead(owner: &str) -> bool {
    let parts: Vec<&str> = owner.split('/').collect();
    let [boot, ns, pid, start] = parts.as_slice() else {
        return false;
    };
    let Some(our_boot) = boot_id() else {
        return false;
    };
    if *boot != our_boot {
        return true;
    }
    let Some(our_ns) = std::fs::read_link("/proc/self/ns/pid").ok() else {
        return false;
    };
    let our_ns = our_ns.to_string_lossy();
    if our_ns.trim_start_matches("pid:[").trim_end_matches(']') != *ns {
        return false;
    }
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    start_time(pid).as_deref() != Some(*start)
}

/// Deletes our leases whose process is gone (synchronously, so the collector has
/// removed what they held when this returns). Returns how many.
pub async fn remove_dead_leases(d: &Daemon) -> Result<usize> {
    let leases = d
        .call(
            "Leases.List".to_owned(),
            d.leases().list(d.req(ListLeasesRequest {
                filters: vec![format!(
                    "labels.\"{}\"=={}",
                    labels::MANAGED_BY,
                    labels::MANAGED_BY_VALUE
                )],
            })),
        )
        .await?
        .leases;
    let mut removed = 0;
    for lease in leases {
        let dead = lease
            .labels
            .get(OWNER_PROCESS)
            .is_some_and(|o| owner_is_dead(o));
        if dead {
            tracing::warn!(lease = %lease.id, "removing the lease of a CPI process that died (and what only it held)");
            crate::stemcell::content::delete_lease(d, &lease.id, true).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Prefix of a VM directory being made: `.new-<pid>-<start time>-<cid>`, renamed to
/// `<cid>` once it holds `owner.json`, so no VM directory is ever without its owner.
const NEW_DIR_PREFIX: &str = ".new-";

/// Makes the directory of VM `cid` (`<state_dir>/vms/<cid>`, 0700) holding
/// `owner.json`, atomically: built under a temporary name that names this process,
/// then renamed into place. Its index entry is made before the rename, so every VM
/// directory has one (until `delete_vm` removes it, right before the directory);
/// [`remove_dead_new_dirs`] removes the entry of a half-made directory with it.
pub fn create_vm_dir(state_dir: &Path, cid: &str, owner: &VmOwner) -> Result<()> {
    let parent = state_dir.join("vms");
    crate::fsutil::create_dirs(&parent, true)?;
    let pid = std::process::id();
    let start = start_time(pid).unwrap_or_default();
    let tmp = parent.join(format!("{NEW_DIR_PREFIX}{pid}-{start}-{cid}"));
    crate::fsutil::create_dirs(&tmp, true)?;
    record_owner(&tmp, owner)?;
    add_index_entry(state_dir, owner, cid)?;
    let vm_dir = parent.join(cid);
    std::fs::rename(&tmp, &vm_dir).map_err(|e| ContainerdError::io("renaming into place", &tmp, e))
}

/// Removes VM directories being made by processes that are gone (killed between
/// making the directory and renaming it). Returns how many.
pub fn remove_dead_new_dirs(state_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(state_dir.join("vms")) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NEW_DIR_PREFIX) else {
            continue;
        };
        let mut parts = rest.splitn(3, '-');
        let (Some(pid), Some(start), Some(cid)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let alive = pid
            .parse::<u32>()
            .ok()
            .and_then(start_time)
            .is_some_and(|s| s == start);
        if alive {
            continue;
        }
        // Its index entry, if the killed call got that far (it is made after the
        // owner record, before the rename).
        if let Some(owner) = read_owner(&e.path()) {
            if let Err(err) = remove_index_entry(state_dir, &owner, cid) {
                tracing::warn!(dir = %name, "{err}");
                continue;
            }
        }
        if std::fs::remove_dir_all(e.path()).is_ok() {
            tracing::warn!(dir = %name, "removed a VM directory a killed create_vm was making");
            removed += 1;
        }
    }
    removed
}

/// Writes `owner.json` into a new VM directory.
pub fn record_owner(vm_dir: &Path, owner: &VmOwner) -> Result<()> {
    let bytes = serde_json::to_vec(owner)
        .map_err(|e| ContainerdError::Refused(format!("serialising the VM owner: {e}")))?;
    crate::fsutil::write_atomic(&vm_dir.join(OWNER_FILE), &bytes, 0o600)
}

/// The VMs under `state_dir` made for `agent_id` (by the same director) other than
/// `except`: earlier attempts of a `create_vm` the director is retrying. Read from
/// the owner's index directory; stale entries found there are removed.
pub fn earlier_attempts(
    state_dir: &Path,
    agent_id: &str,
    ctx: &CallContext,
    except: &str,
) -> Vec<String> {
    ensure_indexed(state_dir);
    let wanted = VmOwner::of_call(agent_id, ctx, Vec::new());
    let dir = state_dir.join(INDEX_DIR).join(wanted.index_key());
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for e in entries.flatten() {
        let cid = e.file_name().to_string_lossy().into_owned();
        if cid == except || !crate::vm::plausible_vm_cid(&cid) {
            continue;
        }
        let vm_dir = state_dir.join("vms").join(&cid);
        match read_owner(&vm_dir) {
            Some(owner) if owner.same_owner(&wanted) => found.push(cid),
            Some(_) => {}
            None if !vm_dir.exists() => {
                let age = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok());
                if age.is_some_and(|a| a > STALE_ENTRY_AGE) {
                    tracing::info!(vm_cid = %cid, "removing a stale index entry of a VM directory that is gone");
                    let _ = remove_index_entry(state_dir, &wanted, &cid);
                }
            }
            None => {}
        }
    }
    found.sort();
    found
}

/// A complete full stemcell of ours with this director, name, version and image
/// fingerprint ([`image_fingerprint`]; the image
/// record is written last, so it exists only once everything else does): an earlier
/// `create_stemcell` of the same stemcell whose answer was lost.
pub async fn existing_stemcell(
    d: &Daemon,
    ctx: &CallContext,
    name: &str,
    version: &str,
    fingerprint: &str,
) -> Result<Option<String>> {
    if name.is_empty() {
        return Ok(None);
    }
    let mut filter = format!(
        "labels.\"{}\"=={},labels.\"{}\"==\"{}\",labels.\"{}\"==\"{}\",labels.\"{}\"==full,labels.\"{}\"==\"{}\"",
        labels::MANAGED_BY,
        labels::MANAGED_BY_VALUE,
        labels::STEMCELL_NAME,
        quote(name),
        labels::STEMCELL_VERSION,
        quote(version),
        labels::STEMCELL_KIND,
        IMAGE_FINGERPRINT,
        quote(fingerprint),
    );
    if let Some(uuid) = &ctx.director_uuid {
        filter.push_str(&format!(
            ",labels.\"{}\"==\"{}\"",
            labels::DIRECTOR_UUID,
            quote(uuid)
        ));
    }
    let images = d
        .call(
            "Images.List".to_owned(),
            d.images().list(d.req(ListImagesRequest {
                filters: vec![filter],
            })),
        )
        .await?
        .images;
    Ok(images
        .into_iter()
        .filter(|i| ctx.director_uuid.is_some() || !i.labels.contains_key(labels::DIRECTOR_UUID))
        .map(|i| i.name)
        .find(|n| n.starts_with("stemcell-")))
}

/// The label with the image file's fingerprint ([`image_fingerprint`]).
pub const IMAGE_FINGERPRINT: &str = "io.bosh.cpi.image-fingerprint";

/// The fingerprint of the stemcell image file at `path`
/// ([`cpi_core::stemcell::image_fingerprint`]).
pub fn image_fingerprint(path: &std::path::Path) -> std::io::Result<String> {
    cpi_core::stemcell::image_fingerprint(std::fs::File::open(path)?)
}

/// Escapes a value for a quoted containerd filter.
fn quote(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_made_up_one_is_not() {
        let me = this_process().expect("/proc tells who we are");
        assert!(!owner_is_dead(&me), "{me}");
        let parts: Vec<&str> = me.split('/').collect();
        let gone = format!("{}/{}/{}/1", parts[0], parts[1], parts[2]);
        assert!(owner_is_dead(&gone), "{gone}");
        let other_boot = format!("x/{}/{}/{}", parts[1], parts[2], parts[3]);
        assert!(owner_is_dead(&other_boot));
        let other_ns = format!("{}/1/{}/1", parts[0], parts[2]);
        assert!(
            !owner_is_dead(&other_ns),
            "another pid namespace cannot be judged"
        );
        assert!(!owner_is_dead("garbage"));
    }

    #[test]
    fn fingerprints_tell_images_apart() {
        let dir = tempfile::tempdir().expect("tmp");
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).expect("write");
            image_fingerprint(&p).expect("fingerprint")
        };
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut tail_changed = big.clone();
        tail_changed[299_999] ^= 1;
        assert_eq!(write("a", &big), write("b", &big));
        assert_ne!(write("a", &big), write("c", &tail_changed));
        assert_ne!(write("a", &big), write("d", &big[..299_999]));
        assert_ne!(write("e", b"small"), write("f", b"smalL"));
    }

    #[test]
    fn vm_dirs_appear_with_their_owner_and_dead_half_made_ones_go() {
        let dir = tempfile::tempdir().expect("tmp");
        let vm = dir.path().join("vms").join("vm-1");
        let owner = VmOwner::of_call("agent-1", &CallContext::default(), Vec::new());
        create_vm_dir(dir.path(), "vm-1", &owner).expect("create");
        assert_eq!(read_owner(&vm), Some(owner.clone()));
        assert!(index_entry(dir.path(), &owner, "vm-1").is_file());
        let half = dir.path().join("vms").join(".new-999999999-1-vm-2");
        let ours = dir.path().join("vms").join(format!(
            ".new-{}-{}-vm-3",
            std::process::id(),
            start_time(std::process::id()).expect("start")
        ));
        std::fs::create_dir_all(&half).expect("mkdir");
        std::fs::create_dir_all(&ours).expect("mkdir");
        // The dead maker got as far as the owner record and the index entry.
        let half_owner = VmOwner::of_call("agent-2", &CallContext::default(), Vec::new());
        record_owner(&half, &half_owner).expect("owner");
        add_index_entry(dir.path(), &half_owner, "vm-2").expect("index");
        assert_eq!(remove_dead_new_dirs(dir.path()), 1);
        assert!(!half.exists() && ours.exists() && vm.exists());
        assert!(!index_entry(dir.path(), &half_owner, "vm-2").exists());
        assert!(index_entry(dir.path(), &owner, "vm-1").exists());
    }

    #[test]
    fn earlier_attempts_match_agent_and_director() {
        let dir = tempfile::tempdir().expect("tmp");
        let vm = |cid: &str, agent: &str, director: Option<&str>| {
            let d = dir.path().join("vms").join(cid);
            std::fs::create_dir_all(&d).expect("mkdir");
            let ctx = CallContext {
                director_uuid: director.map(str::to_owned),
                ..Default::default()
            };
            record_owner(&d, &VmOwner::of_call(agent, &ctx, Vec::new())).expect("owner");
        };
        let a = "vm-00000000-0000-4000-8000-00000000000a";
        let b = "vm-00000000-0000-4000-8000-00000000000b";
        let c = "vm-00000000-0000-4000-8000-00000000000c";
        vm(a, "agent-1", Some("dir-1"));
        vm(b, "agent-1", Some("dir-2"));
        vm(c, "agent-2", Some("dir-1"));
        let ctx = CallContext {
            director_uuid: Some("dir-1".into()),
            ..Default::default()
        };
        assert_eq!(
            earlier_attempts(dir.path(), "agent-1", &ctx, "vm-new"),
            vec![a.to_owned()]
        );
        assert!(earlier_attempts(dir.path(), "agent-1", &ctx, a).is_empty());
        assert!(earlier_attempts(dir.path(), "agent-3", &ctx, "x").is_empty());
    }

    /// VM directories made before the index existed (as the test above makes them)
    /// get their entries on the first lookup, once; later ones are found by name.
    #[test]
    fn earlier_attempts_are_found_by_name_through_the_index() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = dir.path();
        let ctx = CallContext {
            director_uuid: Some("dir-1".into()),
            ..Default::default()
        };
        let legacy = "vm-00000000-0000-4000-8000-00000000000a";
        let legacy_dir = state.join("vms").join(legacy);
        std::fs::create_dir_all(&legacy_dir).expect("mkdir");
        let legacy_owner = VmOwner {
            agent_id: "agent-1".into(),
            director_uuid: Some("dir-1".into()),
            addresses: None,
        };
        record_owner(&legacy_dir, &legacy_owner).expect("owner");
        assert!(!state.join(INDEX_DIR).exists());
        assert_eq!(
            earlier_attempts(state, "agent-1", &ctx, "vm-new"),
            vec![legacy.to_owned()]
        );
        assert!(state.join(INDEX_DIR).join(INDEXED_MARK).is_file());
        assert!(index_entry(state, &legacy_owner, legacy).is_file());

        // After the mark, only the index is read: a directory without an entry is
        // not found (the invariant create_vm_dir keeps is that none exists).
        let unindexed = "vm-00000000-0000-4000-8000-00000000000b";
        std::fs::create_dir_all(state.join("vms").join(unindexed)).expect("mkdir");
        record_owner(&state.join("vms").join(unindexed), &legacy_owner).expect("owner");
        let made = "vm-00000000-0000-4000-8000-00000000000c";
        let owner = VmOwner::of_call("agent-1", &ctx, vec!["10.0.0.5".parse().expect("ip")]);
        create_vm_dir(state, made, &owner).expect("create");
        assert_eq!(
            owner.index_key(),
            legacy_owner.index_key(),
            "the key ignores addresses"
        );
        assert_eq!(
            earlier_attempts(state, "agent-1", &ctx, "vm-new"),
            vec![legacy.to_owned(), made.to_owned()]
        );
        let other_director = CallContext::default();
        assert!(earlier_attempts(state, "agent-1", &other_director, "vm-new").is_empty());

        // Removing an entry twice is no failure; the owner's index directory goes with
        // its last entry.
        std::fs::remove_dir_all(state.join("vms").join(made)).expect("rm");
        remove_index_entry(state, &owner, made).expect("unindex");
        remove_index_entry(state, &owner, made).expect("twice");
        assert_eq!(
            earlier_attempts(state, "agent-1", &ctx, "vm-new"),
            vec![legacy.to_owned()]
        );
        std::fs::remove_dir_all(&legacy_dir).expect("rm");
        // A young entry without its directory may be one being made: kept.
        assert!(earlier_attempts(state, "agent-1", &ctx, "vm-new").is_empty());
        assert!(index_entry(state, &legacy_owner, legacy).is_file());
        remove_index_entry(state, &legacy_owner, legacy).expect("unindex");
        assert!(!index_entry(state, &legacy_owner, legacy)
            .parent()
            .expect("dir")
            .exists());
    }

    /// An entry whose directory has been gone for longer than any `create_vm` takes to
    /// make one is removed by the lookup.
    #[test]
    fn stale_index_entries_are_removed() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = dir.path();
        let ctx = CallContext::default();
        let owner = VmOwner::of_call("agent-9", &ctx, Vec::new());
        let cid = "vm-00000000-0000-4000-8000-00000000000d";
        create_vm_dir(state, cid, &owner).expect("create");
        std::fs::remove_dir_all(state.join("vms").join(cid)).expect("rm");
        let entry = index_entry(state, &owner, cid);
        let old = std::time::SystemTime::now() - STALE_ENTRY_AGE - Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&entry)
            .and_then(|f| f.set_modified(old))
            .expect("age the entry");
        assert!(earlier_attempts(state, "agent-9", &ctx, "vm-new").is_empty());
        assert!(!entry.exists());
    }
}
