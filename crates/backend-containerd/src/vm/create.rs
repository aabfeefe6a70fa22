//! `create_vm`: network namespace and CNI attachments, a snapshot of the stemcell,
//! the container record, and a task whose root gets the agent's files before its init
//! runs.
//!
//! Any failure removes everything made so far ([`ContainerdCpi::destroy_vm`]) and
//! reports the cleanup's failures with the cause.

use std::collections::HashMap;

use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::snapshots::PrepareSnapshotRequest;
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateTaskRequest, StartRequest,
};
use containerd_client::types::Mount as ContainerdMount;
use cpi_core::{
    AgentSettings, CallContext, CpiError, CpiResult, CreateVm, CreatedVm, ErrorKind, Networks,
    VmCid,
};

use crate::agent_env;
use crate::client::Daemon;
use crate::error::{ContainerdError, Result};
use crate::host::{self, CgroupMode};
use crate::labels;
use crate::mount;
use crate::network;
use crate::stemcell::{stemcell_info, StemcellInfo};
use crate::vm::spec::{self, Init, SpecInput};
use crate::vm::VmPaths;
use crate::ContainerdCpi;

/// The labels of a VM's container.
pub fn container_labels(
    req: &CreateVm,
    ctx: &CallContext,
    cid: &str,
    init: Init,
    extra: &std::collections::BTreeMap<String, String>,
) -> HashMap<String, String> {
    let mut out = labels::base(extra);
    out.insert(labels::AGENT_ID.into(), req.agent_id.to_string());
    out.insert(labels::STEMCELL.into(), req.stemcell.to_string());
    out.insert(labels::SNAPSHOT.into(), cid.to_owned());
    out.insert(labels::INIT.into(), init.as_str().into());
    if let Some(uuid) = &ctx.director_uuid {
        out.insert(labels::DIRECTOR_UUID.into(), uuid.clone());
    }
    out
}

/// The `file://` URI the shim writes PID 1's output to.
pub fn console_uri(paths: &VmPaths) -> String {
    format!("file://{}", paths.console_log.display())
}

/// Starts a task on the VM's container with the snapshot's `rootfs` mounts.
pub async fn start_task(
    d: &Daemon,
    cid: &str,
    rootfs: Vec<ContainerdMount>,
    paths: &VmPaths,
) -> Result<u32> {
    create_task(d, cid, rootfs, paths).await?;
    run_task(d, cid).await
}

/// Creates the VM's task: the runtime sets the container up and its init waits to
/// be started. Returns the init's PID.
async fn create_task(
    d: &Daemon,
    cid: &str,
    rootfs: Vec<ContainerdMount>,
    paths: &VmPaths,
) -> Result<u32> {
    let console = console_uri(paths);
    let created = d
        .call(
            format!("Tasks.Create {cid}"),
            d.tasks().create(d.req(CreateTaskRequest {
                container_id: cid.to_owned(),
                rootfs,
                stdin: String::new(),
                stdout: console.clone(),
                stderr: console,
                terminal: false,
                ..Default::default()
            })),
        )
        .await?;
    Ok(created.pid)
}

/// Starts a created task; returns its PID.
async fn run_task(d: &Daemon, cid: &str) -> Result<u32> {
    let started = d
        .call(
            format!("Tasks.Start {cid}"),
            d.tasks().start(d.req(StartRequest {
                container_id: cid.to_owned(),
                exec_id: String::new(),
            })),
        )
        .await?;
    Ok(started.pid)
}

/// Creates the task, writes `files` into its root filesystem before its init runs,
/// and starts it while they are made durable.
///
/// A created task's PID is the runtime's init process, which has the container's
/// root in place and waits before running the VM's init: `/proc/<pid>/root` is the
/// root the VM will see, mounted by the runtime. Writing there spares mounting the
/// snapshot a second time (and unmounting it, which syncs its filesystem), and the
/// one `syncfs` that makes the files durable runs beside `Tasks.Start` rather than
/// before it.
async fn start_task_with_files(
    d: &Daemon,
    cid: &str,
    rootfs: Vec<ContainerdMount>,
    paths: &VmPaths,
    files: Vec<agent_env::VmFile>,
) -> Result<u32> {
    let pid = create_task(d, cid, rootfs, paths).await?;
    if pid == 0 {
        return Err(ContainerdError::Refused(format!(
            "Tasks.Create {cid} answered without the init's PID; cannot write the agent's files"
        )));
    }
    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    agent_env::write_files(&root, &files, crate::fsutil::Durable::ByCaller)?;
    // Opened before the init runs, so the sync reaches this root whatever the
    // init does next.
    let root_dir =
        std::fs::File::open(&root).map_err(|e| ContainerdError::io("opening", &root, e))?;
    let sync = tokio::task::spawn_blocking(move || {
        rustix::fs::syncfs(&root_dir)
            .map_err(|e| ContainerdError::io("syncing the filesystem of", &root, e.into()))
    });
    let (started, synced) = tokio::join!(run_task(d, cid), sync);
    synced.map_err(|e| ContainerdError::Refused(format!("syncing the VM's files: {e}")))??;
    started
}

impl ContainerdCpi {
    pub(crate) async fn do_create_vm(
        &self,
        ctx: &CallContext,
        req: CreateVm,
    ) -> CpiResult<CreatedVm> {
        let d = self.daemon().await.map_err(creation_failed)?;
        let cid = VmCid::new(format!("vm-{}", uuid::Uuid::new_v4()))?;
        // What the request alone decides, refused before anything is made.
        let mut plan = network::plan(
            cid.as_str(),
            &req.networks,
            &req.cloud_properties.ports,
            &self.config.state_dir,
            self.config.dynamic_subnet,
        )
        .map_err(creation_failed)?;
        let paths = self.vm_paths(cid.as_str());
        // Independent of one another, all at once: the stemcell, what killed calls
        // left, and, before anything else of the VM exists, its directory with the
        // record a retry finds it by (on the blocking pool, as it syncs).
        let vm_dir = {
            let owner = crate::orphans::VmOwner::of_call(
                req.agent_id.as_str(),
                ctx,
                network::manual_addresses(&req.networks),
            );
            let (state_dir, cid, paths) = (
                self.config.state_dir.clone(),
                cid.to_string(),
                paths.clone(),
            );
            tokio::task::spawn_blocking(move || make_vm_dir(&state_dir, &cid, &paths, &owner))
        };
        let (stemcell, cleared, vm_dir) = tokio::join!(
            stemcell_info(d, req.stemcell.as_str()),
            self.remove_crash_leftovers(d, ctx, req.agent_id.as_str(), cid.as_str()),
            vm_dir
        );
        let ready = vm_dir
            .map_err(|e| ContainerdError::Refused(format!("making the VM directory: {e}")))
            .and_then(|made| made)
            .and(cleared)
            .and(stemcell)
            .and_then(|s| self.usable_stemcell(&req, s));
        let stemcell = match ready {
            Ok(stemcell) => stemcell,
            Err(e) => return Err(self.undo_create(d, &cid, e).await),
        };
        if !req.disk_cids.is_empty() {
            tracing::debug!(disks = ?req.disk_cids, "disk_cids only guide placement on a single host; the director attaches them next");
        }
        let init = spec::choose_init(
            req.cloud_properties.systemd_override(),
            self.config.start_containers_with_systemd,
            &stemcell.os,
        );
        if req.cloud_properties.ephemeral_disk_mib.is_some() {
            tracing::info!(
                "ephemeral_disk size is not enforced: /var/vcap/data is a host directory"
            );
        }
        tracing::info!(vm_cid = %cid, stemcell = %req.stemcell, init = init.as_str(), "creating VM");
        let mut networks = req.networks.clone();
        let built = self
            .build_vm(
                d,
                ctx,
                &req,
                (cid.as_str(), &paths),
                &stemcell,
                init,
                &mut plan,
                &mut networks,
            )
            .await;
        match built {
            Ok(pid) => {
                tracing::info!(vm_cid = %cid, pid, "VM started");
                Ok(CreatedVm { cid, networks })
            }
            Err(e) => Err(self.undo_create(d, &cid, e).await),
        }
    }

    /// Removes what a failed `create_vm` made, and the error to answer.
    async fn undo_create(&self, d: &Daemon, cid: &VmCid, e: ContainerdError) -> CpiError {
        tracing::warn!(vm_cid = %cid, "create_vm failed, removing what was made: {e}");
        let cleanup = self.destroy_vm(d, cid.as_str()).await;
        creation_failed(e.with_cleanup(cleanup)).context(format!("creating VM {cid}"))
    }

    /// The stemcell, if this configuration can make VMs of it.
    fn usable_stemcell(&self, req: &CreateVm, stemcell: StemcellInfo) -> Result<StemcellInfo> {
        if stemcell.snapshotter == self.config.snapshotter {
            return Ok(stemcell);
        }
        Err(ContainerdError::Refused(format!(
            "stemcell {} was unpacked into the {} snapshotter, but containerd.snapshotter is \
             now {}; delete and upload the stemcell again",
            req.stemcell, stemcell.snapshotter, self.config.snapshotter
        )))
    }

    /// Removes what killed calls left: leases of dead CPI processes (with the
    /// snapshots and content only they held) and earlier attempts of this
    /// `create_vm` (same agent id and director) that never answered.
    async fn remove_crash_leftovers(
        &self,
        d: &Daemon,
        ctx: &CallContext,
        agent_id: &str,
        cid: &str,
    ) -> Result<()> {
        crate::orphans::remove_dead_leases(d).await?;
        crate::orphans::remove_dead_new_dirs(&self.config.state_dir);
        let earlier_attempts =
            crate::orphans::earlier_attempts(&self.config.state_dir, agent_id, ctx, cid);
        for earlier in earlier_attempts {
            tracing::warn!(vm_cid = %earlier, agent_id, "removing an earlier attempt of this create_vm that never answered");
            let failures = self.destroy_vm(d, &earlier).await;
            if !failures.is_empty() {
                return Err(ContainerdError::Refused(format!(
                    "removing VM {earlier}, an earlier attempt of this create_vm: {}",
                    failures.join("; ")
                )));
            }
        }
        Ok(())
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "one private step of create_vm, called once"
    )]
    async fn build_vm(
        &self,
        d: &Daemon,
        ctx: &CallContext,
        req: &CreateVm,
        (cid, paths): (&str, &VmPaths),
        stemcell: &StemcellInfo,
        init: Init,
        plan: &mut network::NetworkState,
        networks: &mut Networks,
    ) -> Result<u32> {
        let netns = network::cni::netns_path(&plan.netns);
        // The host side: the addresses, then the network.
        let host = async {
            {
                // A stale reservation's take-over is check-then-act: one process at a
                // time.
                let _lock = crate::hostlock::acquire(
                    &self.config.state_dir,
                    crate::hostlock::Scope::Addresses,
                    std::time::Duration::from_secs(self.config.timeout_seconds),
                )
                .await?;
                network::reserve_addresses(&self.config.state_dir, cid, &req.networks)?;
            }
            network::setup(
                &self.config.state_dir,
                &paths.network_state,
                plan,
                &self.config.cni_bin_dir,
            )
            .await
        };
        // The containerd side: the container record, then its snapshot. The record
        // names the snapshot's key, which containerd validates nothing about, and
        // holds the snapshot from the collector from the moment it exists: no lease
        // is needed between the two (two metadata commits fewer than taking one and
        // removing it). Neither side depends on the other's results: only the
        // settings need the network's addresses, and they are written after both.
        // `join!`, so neither is cut short when the other fails: the cleanup then
        // finds a complete state of each.
        let rootfs = async {
            self.create_container(d, ctx, req, cid, init, netns, paths)
                .await?;
            let prepared = d
                .call(
                    format!("Snapshots.Prepare {cid} on {}", stemcell.chain_id),
                    d.snapshots().prepare(d.req(PrepareSnapshotRequest {
                        snapshotter: self.config.snapshotter.clone(),
                        key: cid.to_owned(),
                        parent: stemcell.chain_id.clone(),
                        labels: labels::base(&self.config.labels),
                    })),
                )
                .await?;
            Ok::<_, ContainerdError>(prepared.mounts)
        };
        let (net, rootfs) = tokio::join!(host, rootfs);
        net?;
        let mounts = rootfs?;
        network::record_assigned(plan, networks);

        let vm_cid = VmCid::new(cid).map_err(|e| ContainerdError::BadArgument(e.message))?;
        let settings =
            AgentSettings::for_vm(&req.agent_id, &vm_cid, &self.agent, networks, &req.env);
        // The host copy later calls change the settings from (attach, detach), and
        // the record of the VM's init `delete_vm` signals it by, written while the
        // task is made. The init record is not synced: a missing or torn one sends
        // `delete_vm` to the container's label instead.
        let host_copy = {
            let (path, bytes) = (paths.agent_env.clone(), settings.to_json());
            let init_record = paths.init_record.clone();
            tokio::task::spawn_blocking(move || {
                crate::fsutil::write_atomic(&path, &bytes, 0o600)?;
                std::fs::write(&init_record, init.as_str())
                    .map_err(|e| ContainerdError::io("writing", &init_record, e))
            })
        };
        let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let files = agent_env::vm_files(&settings, cid, networks, &host_resolv);
        let (started, copied) = tokio::join!(
            start_task_with_files(d, cid, mounts, paths, files),
            host_copy
        );
        copied.map_err(|e| {
            ContainerdError::Refused(format!("writing the host copy of the settings: {e}"))
        })??;
        started
    }

    /// The VM's container record (its OCI spec names the network namespace at
    /// `netns`, which need not be set up yet).
    #[allow(
        clippy::too_many_arguments,
        reason = "one private step of create_vm, called once"
    )]
    async fn create_container(
        &self,
        d: &Daemon,
        ctx: &CallContext,
        req: &CreateVm,
        cid: &str,
        init: Init,
        netns: std::path::PathBuf,
        paths: &VmPaths,
    ) -> Result<()> {
        let bounding = host::bounding_set()?;
        let (capabilities, unknown) = host::capabilities_of(bounding);
        if !unknown.is_empty() {
            tracing::info!(bits = ?unknown, "capabilities without a name in this CPI are not granted");
        }
        let input = SpecInput {
            vm_cid: cid.to_owned(),
            namespace: self.config.namespace.clone(),
            init,
            cgroup: CgroupMode::detect(),
            capabilities,
            netns,
            data_dir: paths.data.clone(),
            disks_dir: paths.disks.clone(),
            host_modules: host::host_modules_dir(),
            cpu: req.cloud_properties.cpu,
            ram_mib: req.cloud_properties.ram_mib,
            pids: req.cloud_properties.pids,
        };
        let oci = spec::build(&input)?;
        let container = Container {
            id: cid.to_owned(),
            labels: container_labels(req, ctx, cid, init, &self.config.labels),
            image: req.stemcell.to_string(),
            runtime: Some(Runtime {
                name: self.config.runtime.clone(),
                options: None,
            }),
            spec: Some(spec::to_any(&oci)?),
            snapshotter: self.config.snapshotter.clone(),
            snapshot_key: cid.to_owned(),
            ..Default::default()
        };
        d.call(
            format!("Containers.Create {cid}"),
            d.containers().create(d.req(CreateContainerRequest {
                container: Some(container),
            })),
        )
        .await?;
        Ok(())
    }
}

/// A failure of `create_vm` as the director sees it: `VMCreationFailed` unless the
/// error is one of the CPI's own kinds.
fn creation_failed(e: ContainerdError) -> CpiError {
    match e.kind() {
        ErrorKind::CpiError | ErrorKind::NotSupported => e.into(),
        _ => CpiError::vm_creation_failed(e.to_string(), e.is_transient()),
    }
}

/// Makes the VM directory with its owner record, and the directories and shared
/// mount point below it that the container's spec names.
fn make_vm_dir(
    state_dir: &std::path::Path,
    cid: &str,
    paths: &VmPaths,
    owner: &crate::orphans::VmOwner,
) -> Result<()> {
    crate::orphans::create_vm_dir(state_dir, cid, owner)?;
    crate::fsutil::create_dirs(&paths.data, false)?;
    crate::fsutil::create_dirs(&paths.disks, false)?;
    crate::fsutil::create_dirs(&paths.rootfs, true)?;
    mount::ensure_shared_mount_point(&paths.disks)
}

/// Mounts the snapshot on the VM's setup directory, writes `files`, and unmounts it
/// again whatever happened (the task mounts it afresh).
///
/// The files are made durable together by one `syncfs` of the snapshot's filesystem,
/// not an `fsync` each: unmounting an overlay syncs its upper filesystem anyway, so
/// the per-file `fsync`s were paid twice (4 files: 3.9 ms → 2.0 ms measured here).
pub fn write_into_snapshot(
    mounts: &[ContainerdMount],
    paths: &VmPaths,
    files: &[agent_env::VmFile],
) -> Result<()> {
    mount::mount_all(mounts, &paths.rootfs)?;
    let written = agent_env::write_files(&paths.rootfs, files, crate::fsutil::Durable::ByCaller)
        .and_then(|()| crate::fsutil::sync_filesystem(&paths.rootfs));
    let unmounted = mount::unmount(&paths.rootfs);
    written?;
    unmounted
}

#[cfg(test)]
mod tests {
    use super::*;
    use cpi_core::{AgentId, StemcellCid, VmCloudProperties};
    use serde_json::json;

    #[test]
    fn labels_of_a_vm() {
        let req = CreateVm {
            agent_id: AgentId::new("agent-7").expect("id"),
            stemcell: StemcellCid::new("stemcell-1").expect("sc"),
            cloud_properties: VmCloudProperties::parse(&json!({})).expect("props"),
            networks: Networks::default(),
            disk_cids: vec![],
            env: json!({}),
        };
        let ctx = CallContext {
            director_uuid: Some("dir-9".into()),
            ..Default::default()
        };
        let l = container_labels(&req, &ctx, "vm-1", Init::Systemd, &Default::default());
        assert_eq!(l[labels::AGENT_ID], "agent-7");
        assert_eq!(l[labels::STEMCELL], "stemcell-1");
        assert_eq!(l[labels::SNAPSHOT], "vm-1");
        assert_eq!(l[labels::INIT], "systemd");
        assert_eq!(l[labels::DIRECTOR_UUID], "dir-9");
        assert_eq!(l[labels::MANAGED_BY], labels::MANAGED_BY_VALUE);
    }

    #[test]
    fn console_goes_to_a_file_in_the_vm_dir() {
        let p = VmPaths::new(std::path::Path::new("/s"), "vm-1");
        assert_eq!(console_uri(&p), "file:///s/vms/vm-1/console.log");
    }
}
