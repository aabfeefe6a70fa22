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
//!   VMs, which are then destroyed like `delete_vm` does.

use std::path::Path;

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

/// Makes the VM directory `vm_dir` (0700) holding `owner.json`, atomically: built
/// under a temporary name that names this process, then renamed into place.
pub fn create_vm_dir(vm_dir: &Path, agent_id: &str, ctx: &CallContext) -> Result<()> {
    let parent = vm_dir.parent().unwrap_or(Path::new("/"));
    crate::fsutil::create_dirs(parent, true)?;
    let pid = std::process::id();
    let start = start_time(pid).unwrap_or_default();
    let name = vm_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!("{NEW_DIR_PREFIX}{pid}-{start}-{name}"));
    crate::fsutil::create_dirs(&tmp, true)?;
    record_owner(&tmp, agent_id, ctx)?;
    std::fs::rename(&tmp, vm_dir).map_err(|e| ContainerdError::io("renaming into place", &tmp, e))
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
        let (Some(pid), Some(start)) = (parts.next(), parts.next()) else {
            continue;
        };
        let alive = pid
            .parse::<u32>()
            .ok()
            .and_then(start_time)
            .is_some_and(|s| s == start);
        if !alive && std::fs::remove_dir_all(e.path()).is_ok() {
            tracing::warn!(dir = %name, "removed a VM directory a killed create_vm was making");
            removed += 1;
        }
    }
    removed
}

/// Writes `owner.json` into a new VM directory.
pub fn record_owner(vm_dir: &Path, agent_id: &str, ctx: &CallContext) -> Result<()> {
    let owner = VmOwner {
        agent_id: agent_id.to_owned(),
        director_uuid: ctx.director_uuid.clone(),
    };
    let bytes = serde_json::to_vec(&owner)
        .map_err(|e| ContainerdError::Refused(format!("serialising the VM owner: {e}")))?;
    crate::fsutil::write_atomic(&vm_dir.join(OWNER_FILE), &bytes, 0o600)
}

/// The VMs under `state_dir` made for `agent_id` (by the same director) other than
/// `except`: earlier attempts of a `create_vm` the director is retrying.
pub fn earlier_attempts(
    state_dir: &Path,
    agent_id: &str,
    ctx: &CallContext,
    except: &str,
) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(state_dir.join("vms")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let cid = e.file_name().to_string_lossy().into_owned();
            if cid == except || !crate::vm::plausible_vm_cid(&cid) {
                return None;
            }
            let text = std::fs::read(e.path().join(OWNER_FILE)).ok()?;
            let owner: VmOwner = serde_json::from_slice(&text).ok()?;
            (owner.agent_id == agent_id && owner.director_uuid == ctx.director_uuid).then_some(cid)
        })
        .collect()
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
        create_vm_dir(&vm, "agent-1", &CallContext::default()).expect("create");
        assert!(vm.join(OWNER_FILE).is_file());
        let half = dir.path().join("vms").join(".new-999999999-1-vm-2");
        let ours = dir.path().join("vms").join(format!(
            ".new-{}-{}-vm-3",
            std::process::id(),
            start_time(std::process::id()).expect("start")
        ));
        std::fs::create_dir_all(&half).expect("mkdir");
        std::fs::create_dir_all(&ours).expect("mkdir");
        assert_eq!(remove_dead_new_dirs(dir.path()), 1);
        assert!(!half.exists() && ours.exists() && vm.exists());
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
            record_owner(&d, agent, &ctx).expect("owner");
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
}
