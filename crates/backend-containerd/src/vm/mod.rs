//! VMs: one containerd container and one task per BOSH VM.
//!
//! - [`spec`][]: the OCI runtime spec (pure).
//! - [`create`][]: `create_vm`.
//! - [`lifecycle`][]: `delete_vm`, `has_vm`, `reboot_vm`, `set_vm_metadata`.
//!
//! This module holds what they share: where a VM's host-side state lives, finding its
//! container and task, stopping a task, and tearing a VM down from any half-built
//! state (which `create_vm` uses to clean up after itself, and `delete_vm` to be
//! idempotent after a crash).

pub mod create;
pub mod lifecycle;
pub mod spec;

use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::snapshots::RemoveSnapshotRequest;
use containerd_client::services::v1::{
    Container, DeleteContainerRequest, DeleteTaskRequest, GetContainerRequest, GetRequest,
    KillRequest, WaitRequest,
};
use containerd_client::tonic::Code;
use containerd_client::types::v1::Status as TaskStatus;
use cpi_core::ids::is_simple_name;

use crate::client::Daemon;
use crate::error::{ContainerdError, Result};
use crate::{labels, mount, network, ContainerdCpi};

/// SIGTERM.
const SIGTERM: u32 = 15;
/// SIGKILL.
const SIGKILL: u32 = 9;
/// SIGRTMIN+3: how systemd as PID 1 is asked to shut down (it ignores SIGTERM).
const SIGRTMIN_PLUS_3: u32 = 37;
/// How long to wait for a task after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(15);

/// Where a VM's host-side state lives: `<state_dir>/vms/<cid>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    /// The VM's directory (0700: holds the agent settings, which carry secrets).
    pub dir: PathBuf,
    /// Mounted at `/var/vcap/data` in the VM.
    pub data: PathBuf,
    /// Mounted at `/warden-cpi-dev` in the VM; a shared mount point whose children
    /// are the attached disks.
    pub disks: PathBuf,
    /// Where the root filesystem is mounted briefly to write files before start.
    pub rootfs: PathBuf,
    /// The CNI attachments (`network.json`).
    pub network_state: PathBuf,
    /// A copy of the agent settings, updated on attach and detach.
    pub agent_env: PathBuf,
    /// The VM's console: PID 1's stdout and stderr.
    pub console_log: PathBuf,
    /// The VM's init (`runit` or `systemd`), so `delete_vm` knows its stop signal
    /// without asking containerd first.
    pub init_record: PathBuf,
}

impl VmPaths {
    /// The paths of VM `cid`.
    pub fn new(state_dir: &Path, cid: &str) -> VmPaths {
        let dir = state_dir.join("vms").join(cid);
        VmPaths {
            data: dir.join("data"),
            disks: dir.join("disks"),
            rootfs: dir.join("rootfs"),
            network_state: dir.join("network.json"),
            agent_env: dir.join("agent-env.json"),
            console_log: dir.join("console.log"),
            init_record: dir.join("init"),
            dir,
        }
    }

    /// Where disk `disk` is bind-mounted when attached.
    pub fn disk_mount(&self, disk: &str) -> PathBuf {
        self.disks.join(disk)
    }
}

/// A VM cid we could have minted: anything else names no VM of ours.
pub fn plausible_vm_cid(cid: &str) -> bool {
    is_simple_name(cid) && crate::client::validate_identifier(cid).is_ok()
}

/// The container of VM `cid`, or `None`.
pub async fn get_container(d: &Daemon, cid: &str) -> Result<Option<Container>> {
    if !plausible_vm_cid(cid) {
        return Ok(None);
    }
    match d
        .call(
            format!("Containers.Get {cid}"),
            d.containers()
                .get(d.req(GetContainerRequest { id: cid.to_owned() })),
        )
        .await
    {
        Ok(resp) => Ok(resp.container),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// The container of VM `cid`, or `VmNotFound`.
pub async fn require_container(d: &Daemon, cid: &str) -> Result<Container> {
    get_container(d, cid)
        .await?
        .ok_or_else(|| ContainerdError::VmNotFound(cid.to_owned()))
}

/// The task's PID and status, or `None` when the VM has no task.
pub async fn task_state(d: &Daemon, cid: &str) -> Result<Option<(u32, TaskStatus)>> {
    match d
        .call(
            format!("Tasks.Get {cid}"),
            d.tasks().get(d.req(GetRequest {
                container_id: cid.to_owned(),
                exec_id: String::new(),
            })),
        )
        .await
    {
        Ok(resp) => Ok(resp.process.map(|p| {
            (
                p.pid,
                TaskStatus::try_from(p.status).unwrap_or(TaskStatus::Unknown),
            )
        })),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

async fn kill(d: &Daemon, cid: &str, signal: u32, all: bool) -> Result<()> {
    match d
        .call(
            format!("Tasks.Kill {cid} signal {signal}"),
            d.tasks().kill(d.req(KillRequest {
                container_id: cid.to_owned(),
                exec_id: String::new(),
                signal,
                all,
            })),
        )
        .await
    {
        Ok(_) => Ok(()),
        // Gone, or already stopped.
        Err(e) if e.is_not_found() || e.code() == Some(Code::FailedPrecondition) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Waits up to `limit` for the task to exit; true when it did.
async fn wait_exit(d: &Daemon, cid: &str, limit: Duration) -> Result<bool> {
    let mut tasks = d.tasks();
    let wait = tasks.wait(d.req(WaitRequest {
        container_id: cid.to_owned(),
        exec_id: String::new(),
    }));
    match tokio::time::timeout(limit, wait).await {
        Ok(Ok(_)) => Ok(true),
        Ok(Err(status)) if status.code() == Code::NotFound => Ok(true),
        Ok(Err(status)) => Err(d.status_error(format!("Tasks.Wait {cid}"), status)),
        Err(_) => Ok(false),
    }
}

/// Stops and deletes the VM's task: the init's shutdown signal, `grace` to exit,
/// then SIGKILL to every process. No task is success.
pub async fn stop_task(d: &Daemon, cid: &str, init: &str, grace: Duration) -> Result<()> {
    let task = task_state(d, cid).await?;
    stop_found_task(d, cid, task, init, grace).await
}

/// [`stop_task`] for a task already looked up with [`task_state`].
async fn stop_found_task(
    d: &Daemon,
    cid: &str,
    task: Option<(u32, TaskStatus)>,
    init: &str,
    grace: Duration,
) -> Result<()> {
    if end_found_task(d, cid, task, init, grace).await? {
        delete_task(d, cid).await?;
    }
    Ok(())
}

/// Makes a task already looked up with [`task_state`] exit, unless it has stopped
/// already. Returns whether there is a task (to delete).
async fn end_found_task(
    d: &Daemon,
    cid: &str,
    task: Option<(u32, TaskStatus)>,
    init: &str,
    grace: Duration,
) -> Result<bool> {
    let Some((pid, status)) = task else {
        return Ok(false);
    };
    if status != TaskStatus::Stopped {
        tracing::debug!(vm_cid = %cid, pid, "the VM's task is {status:?}");
        signal_and_wait(d, cid, init, grace).await?;
    }
    Ok(true)
}

/// Sends the init's shutdown signal and waits `grace` for the task to exit, then
/// SIGKILL to every process. A task that is gone or stopped is success.
async fn signal_and_wait(d: &Daemon, cid: &str, init: &str, grace: Duration) -> Result<()> {
    let signal = if init == spec::Init::Systemd.as_str() {
        SIGRTMIN_PLUS_3
    } else {
        SIGTERM
    };
    tracing::debug!(vm_cid = %cid, signal, "stopping the VM's init");
    // The wait goes out with the signal, not after it: the exit is reported on a
    // request already in flight. A failed signal ends both.
    let (_, exited) = tokio::try_join!(kill(d, cid, signal, false), wait_exit(d, cid, grace))?;
    if !exited {
        tracing::info!(vm_cid = %cid, grace_secs = grace.as_secs(), "init did not exit in time; killing every process");
        kill(d, cid, SIGKILL, true).await?;
        if !wait_exit(d, cid, KILL_WAIT).await? {
            return Err(ContainerdError::Refused(format!(
                "the task of VM {cid} did not exit {}s after SIGKILL",
                KILL_WAIT.as_secs()
            )));
        }
    }
    Ok(())
}

/// Deletes the VM's (stopped) task; no task is success.
async fn delete_task(d: &Daemon, cid: &str) -> Result<()> {
    match d
        .call(
            format!("Tasks.Delete {cid}"),
            d.tasks().delete(d.req(DeleteTaskRequest {
                container_id: cid.to_owned(),
            })),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}

/// The init `create_vm` recorded in the VM directory, if it is there and readable.
fn recorded_init(paths: &VmPaths) -> Option<spec::Init> {
    let text = std::fs::read_to_string(&paths.init_record).ok()?;
    [spec::Init::Runit, spec::Init::Systemd]
        .into_iter()
        .find(|init| init.as_str() == text.trim())
}

impl ContainerdCpi {
    /// The paths of VM `cid`.
    pub(crate) fn vm_paths(&self, cid: &str) -> VmPaths {
        VmPaths::new(&self.config.state_dir, cid)
    }

    /// Removes everything VM `cid` may have, from any state: task, container,
    /// snapshot, network attachments and namespace, disk mounts (the disks' data
    /// stays) and the VM directory. Every step runs even when an earlier one failed;
    /// the failures are returned.
    pub(crate) async fn destroy_vm(&self, d: &Daemon, cid: &str) -> Vec<String> {
        let mut failures = Vec::new();
        let paths = self.vm_paths(cid);
        let grace = Duration::from_secs(self.config.stop_grace_seconds);
        // First the task's exit. `has_task`: whether a task may be there to delete.
        let (container, exited, has_task) = match recorded_init(&paths) {
            // The init is on record: the signal goes out with the container's
            // lookup (which the records below need), not after it; a stopped or
            // missing task answers it as gone.
            Some(init) => {
                let (container, exited) = tokio::join!(
                    get_container(d, cid),
                    signal_and_wait(d, cid, init.as_str(), grace)
                );
                (container, exited, true)
            }
            // A VM without the record (made before it, or a create_vm killed before
            // writing it): the container's label names the init, the task's state
            // says whether to signal it. One round trip for both.
            None => {
                let (container, task) = tokio::join!(get_container(d, cid), task_state(d, cid));
                let init = container
                    .as_ref()
                    .ok()
                    .and_then(Option::as_ref)
                    .and_then(|c| c.labels.get(labels::INIT).cloned())
                    .unwrap_or_default();
                let ended = match task {
                    Ok(task) => end_found_task(d, cid, task, &init, grace).await,
                    Err(e) => Err(e),
                };
                // A task whose exit failed is not deleted; nor is one not found.
                let has_task = matches!(ended, Ok(true));
                (container, ended.map(drop), has_task)
            }
        };
        let container = match container {
            Ok(c) => c,
            Err(e) => {
                failures.push(e.to_string());
                None
            }
        };
        let exited = match exited {
            Ok(()) => true,
            Err(e) => {
                failures.push(e.to_string());
                false
            }
        };
        // The setup mount (left by a settings write into a stopped VM's snapshot)
        // holds the snapshot's directories busy; gone before either branch below.
        if let Err(e) = mount::unmount(&paths.rootfs) {
            failures.push(e.to_string());
        }
        // With the init exited, nothing of the VM runs (the kernel kills every
        // process of a PID namespace before its init's exit is reported), so two
        // branches at once: containerd's records (the task, then the container and
        // the snapshot) and what the VM has on the host (network, addresses, disk
        // binds, its directory), whose work hides behind `Tasks.Delete`, the
        // longest request (the shim unmounts the root and ends). The host side
        // runs on the blocking pool, so that its unmounts and file work do not
        // hold the requests back on this thread.
        let records = async {
            if has_task && exited {
                if let Err(e) = delete_task(d, cid).await {
                    return vec![e.to_string()];
                }
            }
            // The container record and the snapshot at once: removing a snapshot
            // asks nothing of the record that names it.
            let delete_container = async {
                if container.is_none() {
                    return Ok(());
                }
                match d
                    .call(
                        format!("Containers.Delete {cid}"),
                        d.containers()
                            .delete(d.req(DeleteContainerRequest { id: cid.to_owned() })),
                    )
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(e) if e.is_not_found() => Ok(()),
                    Err(e) => Err(e.to_string()),
                }
            };
            let (snapshotter, key) = match &container {
                Some(c) if !c.snapshot_key.is_empty() => {
                    (c.snapshotter.clone(), c.snapshot_key.clone())
                }
                _ => (self.config.snapshotter.clone(), cid.to_owned()),
            };
            let remove_snapshot = async {
                if !plausible_vm_cid(&key) {
                    return Ok(());
                }
                match d
                    .call(
                        format!("Snapshots.Remove {key}"),
                        d.snapshots().remove(d.req(RemoveSnapshotRequest {
                            snapshotter,
                            key: key.clone(),
                        })),
                    )
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(e) if e.is_not_found() => Ok(()),
                    Err(e) => Err(e.to_string()),
                }
            };
            let (deleted, removed) = tokio::join!(delete_container, remove_snapshot);
            [deleted, removed]
                .into_iter()
                .filter_map(std::result::Result::err)
                .collect::<Vec<_>>()
        };
        let host = async {
            // Its first steps are file reads on this thread: `Tasks.Delete` goes
            // out first.
            tokio::task::yield_now().await;
            let mut failures =
                network::teardown(&paths.network_state, cid, &self.config.cni_bin_dir).await;
            let (state_dir, vm_paths, vm) =
                (self.config.state_dir.clone(), paths.clone(), cid.to_owned());
            let rest =
                tokio::task::spawn_blocking(move || remove_host_state(&state_dir, &vm_paths, &vm))
                    .await;
            match rest {
                Ok(f) => failures.extend(f),
                Err(e) => failures.push(format!("removing VM {cid}'s host state: {e}")),
            }
            failures
        };
        let (records, host) = tokio::join!(records, host);
        failures.extend(records);
        failures.extend(host);
        failures
    }
}

/// Removes what VM `cid` has in the state directory and the host's mount table,
/// once its network is down: its address reservations, the binds of its disks, the
/// mounts below its directory, its index entry and its directory. Returns the
/// failures; every step runs.
fn remove_host_state(state_dir: &Path, paths: &VmPaths, cid: &str) -> Vec<String> {
    let owner = crate::orphans::read_owner(&paths.dir);
    let mut failures = network::release_addresses(
        state_dir,
        cid,
        owner.as_ref().and_then(|o| o.addresses.as_deref()),
    );
    failures.extend(crate::disk::release_vm_disks(state_dir, paths));
    match mount::unmount_all_under(&paths.dir) {
        Ok(f) => failures.extend(f),
        Err(e) => failures.push(e.to_string()),
    }
    failures.extend(remove_vm_dir_and_entry(
        state_dir,
        &paths.dir,
        cid,
        owner.as_ref(),
    ));
    failures
}

/// Removes the VM's index entry and then its directory (see [`remove_vm_dir`]). The
/// entry goes first, while the owner record it is found by still exists: a
/// `delete_vm` killed in between leaves a directory its retry removes. If the
/// directory stays (something is still mounted below it), so does the entry, for a
/// retried `create_vm` to find this VM again.
fn remove_vm_dir_and_entry(
    state_dir: &Path,
    dir: &Path,
    cid: &str,
    owner: Option<&crate::orphans::VmOwner>,
) -> Vec<String> {
    let Some(owner) = owner else {
        return remove_vm_dir(dir);
    };
    if let Err(e) = crate::orphans::remove_index_entry(state_dir, owner, cid) {
        return vec![e.to_string()];
    }
    let failures = remove_vm_dir(dir);
    if dir.exists() {
        if let Err(e) = crate::orphans::add_index_entry(state_dir, owner, cid) {
            tracing::warn!("{e}");
        }
    }
    failures
}

/// Removes the VM directory, but never while anything is mounted below it: that could
/// be a persistent disk, whose data must survive.
fn remove_vm_dir(dir: &Path) -> Vec<String> {
    match mount::remove_tree_on_one_mount(dir) {
        Ok(Some(())) => return Vec::new(),
        Ok(None) => {} // no mount ids: check the mount table instead
        Err(e) => return vec![e.to_string()],
    }
    let still_mounted = match mount::read_mountinfo() {
        Ok(table) => mount::mounts_under(&table, dir),
        Err(e) => return vec![e.to_string()],
    };
    if !still_mounted.is_empty() {
        return vec![format!(
            "not removing {}: still mounted below it: {still_mounted:?}",
            dir.display()
        )];
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Vec::new(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => vec![ContainerdError::io("removing", dir, e).to_string()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_of_a_vm() {
        let p = VmPaths::new(Path::new("/state"), "vm-1");
        assert_eq!(p.dir, PathBuf::from("/state/vms/vm-1"));
        assert_eq!(p.data, PathBuf::from("/state/vms/vm-1/data"));
        assert_eq!(
            p.disk_mount("disk-1"),
            PathBuf::from("/state/vms/vm-1/disks/disk-1")
        );
        assert_eq!(
            p.network_state,
            PathBuf::from("/state/vms/vm-1/network.json")
        );
    }

    #[test]
    fn only_plausible_cids_name_vms() {
        assert!(plausible_vm_cid("vm-0c6b6f0e-7d4b-4f2c-9d7c-1b2a3c4d5e6f"));
        for bad in ["", "../x", "a b", "-x", "x--y", "a/b"] {
            assert!(!plausible_vm_cid(bad), "{bad}");
        }
    }

    /// Needs root (CAP_SYS_ADMIN), as the CPI does.
    #[test]
    fn the_vm_dir_is_not_removed_while_mounted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vm = dir.path().join("vm-1");
        let disk = dir.path().join("disk");
        std::fs::create_dir_all(vm.join("disks").join("disk-1")).expect("mkdir");
        std::fs::create_dir_all(&disk).expect("mkdir");
        std::fs::write(disk.join("data"), b"kept").expect("write");
        mount::bind(&disk, &vm.join("disks").join("disk-1")).expect("bind");
        let failures = remove_vm_dir(&vm);
        assert_eq!(failures.len(), 1);
        assert!(failures[0].contains("still mounted"), "{failures:?}");
        assert_eq!(std::fs::read(disk.join("data")).expect("kept"), b"kept");
        mount::unmount(&vm.join("disks").join("disk-1")).expect("unmount");
        assert!(remove_vm_dir(&vm).is_empty());
        assert!(!vm.exists());
        assert_eq!(std::fs::read(disk.join("data")).expect("kept"), b"kept");
    }
}
