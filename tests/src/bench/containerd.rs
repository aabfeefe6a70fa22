//! The containerd floor, over containerd's gRPC API (containerd-client, the same crate
//! as the backend), in the CPI's namespace.
//!
//! - VM template: `Containers.Get` of the CPI's VM; its OCI runtime spec is replayed
//!   with the VM's name replaced by the floor VM's (hostname, cgroup path, per-VM
//!   directories, network namespace), on a snapshot of the same parent.
//! - The VM's network: on containerd the CPI makes it (no daemon does), so the floor
//!   makes it too, with the backend's own netlink calls and nothing around them
//!   (`backend_containerd::raw_network`): the namespace (`lo` up), a veth on the run's
//!   bridge with the VM's end in the namespace, its address (host parts 200..=254 of
//!   the run's subnet, as the Docker floor's) and default route. Docker's floor gets
//!   the same from dockerd inside its create and start. [`Floor::set_network`] turns
//!   it off: the spec then drops the namespace path and runc makes a fresh, empty
//!   one, as the floor did before 2026-12-07.
//! - `create_vm` floor: `mkdir` of the per-VM directories, the disks directory made a
//!   shared mount point (as the backend does), the network beside `Snapshots.Prepare`
//!   (labelled `containerd.io/gc.root`, so no lease is needed) and
//!   `Containers.Create`, then `Tasks.Create` (console to a file, as the backend),
//!   `Tasks.Start`.
//! - `delete_vm` floor: `Tasks.Kill` SIGTERM (the test stemcell's init exits on it,
//!   as with the backend) with `Tasks.Wait` in flight beside it; once the init
//!   exited, `Tasks.Delete` and then `Containers.Delete` and `Snapshots.Remove` at
//!   once, beside the network namespace's removal (the kernel destroys the veth),
//!   unmount and `rm -r` of the per-VM directory (as the backend arranges them since
//!   2026-12-08).
//! - attach floor: `Containers.Get` (find the VM), `Tasks.Get` (its PID 1), `mkdir` +
//!   bind mount of the disk directory into the VM's shared disks directory, and a
//!   1 KiB settings file written through `/proc/<pid>/root`. Detach: the two gets,
//!   unmount + `rmdir`, the write.
//! - `create_stemcell` floor: `Leases.Create`, `Content.Write` streaming the same
//!   `image` file in 1 MiB messages (containerd computes the digest),
//!   `Snapshots.Prepare`, `Diff.Apply` of the blob as a gzip layer, `Snapshots.Commit`.
//!   Removal (not timed) deletes the lease synchronously: the collector removes the
//!   blob and the snapshot.
//! - has_vm floor: a new channel (connect) and one `Containers.Get`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_client::services::v1::container::Runtime as ContainerRuntime;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    containers_client::ContainersClient, content_client::ContentClient, diff_client::DiffClient,
    leases_client::LeasesClient, snapshots::snapshots_client::SnapshotsClient,
    tasks_client::TasksClient, version_client::VersionClient, ApplyRequest, Container,
    CreateContainerRequest, CreateRequest as CreateLeaseRequest, CreateTaskRequest,
    DeleteContainerRequest, DeleteRequest as DeleteLeaseRequest, DeleteTaskRequest,
    GetContainerRequest, GetRequest as GetTaskRequest, KillRequest, StartRequest, WaitRequest,
    WriteAction, WriteContentRequest,
};
use containerd_client::tonic::metadata::AsciiMetadataValue;
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};
use containerd_client::types::Descriptor;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::runtime::Runtime;

use super::floor::{free_floor_host, settings_stand_in, Floor, FloorResult, SETTINGS_IN_VM};
use super::host;

const NAME: &str = "@@FLOOR_VM@@";
const SIGTERM: u32 = 15;
const SIGKILL: u32 = 9;
const STOP_GRACE: Duration = Duration::from_secs(10);
const CHUNK: usize = 1 << 20;
/// How long a VM's init may take to set its SIGTERM handler.
const INIT_LIMIT: Duration = Duration::from_secs(30);
const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The label every floor object carries, with the run's director uuid as value.
pub const RUN_LABEL: &str = "cpi-bench.run";

struct Template {
    /// The runtime spec JSON with [`NAME`] for the VM name (its network namespace is
    /// `/var/run/netns/NAME`).
    spec: String,
    /// The same without the network namespace's path (runc makes an empty one).
    spec_without_network: String,
    type_url: String,
    image: String,
    runtime: Option<ContainerRuntime>,
    snapshotter: String,
    parent: String,
    /// Per-VM host directories the spec binds (with [`NAME`]).
    dirs: Vec<String>,
    /// Their per-VM directories (with [`NAME`]), removed with the VM.
    vm_dirs: Vec<String>,
    /// The directory bound at `/warden-cpi-dev` (with [`NAME`]).
    disks_dir: String,
}

/// A floor VM about to be created.
struct VmPlan {
    name: String,
    /// Its address on the run's bridge, when the floor makes its network.
    address: Option<ipnet::Ipv4Net>,
    dirs: Vec<PathBuf>,
    disks_dir: PathBuf,
    console: String,
    container: Container,
    prepare: PrepareSnapshotRequest,
}

/// The containerd floor.
pub struct ContainerdFloor {
    rt: Arc<Runtime>,
    channel: Channel,
    socket: PathBuf,
    namespace: AsciiMetadataValue,
    version: String,
    run: String,
    /// Where floor disks live (the bench's own directory).
    scratch: PathBuf,
    template: Option<Template>,
    counter: u32,
    /// The run's subnet (`10.x.y`), the bridge the backend made for it and the
    /// gateway (host part 1) the bridge holds.
    subnet_prefix: String,
    bridge: String,
    gateway: Ipv4Addr,
    /// Whether the next VMs get a network ([`Floor::set_network`]).
    with_network: bool,
    /// Floor VMs alive, with their address's host part when they have a network.
    vms: BTreeMap<String, Option<u8>>,
    leases: BTreeSet<String>,
    mounts: BTreeSet<PathBuf>,
    dirs: BTreeSet<PathBuf>,
}

fn status(what: impl std::fmt::Display) -> impl FnOnce(Status) -> String {
    move |s| format!("{what}: {} ({:?})", s.message(), s.code())
}

impl ContainerdFloor {
    /// Connects to `socket` and reads containerd's version. Floor VMs get addresses
    /// in the run's subnet `subnet_prefix` (`10.x.y`, a /24).
    pub fn connect(
        rt: Arc<Runtime>,
        socket: &Path,
        namespace: &str,
        run: &str,
        scratch: &Path,
        subnet_prefix: &str,
    ) -> FloorResult<ContainerdFloor> {
        let channel = rt
            .block_on(containerd_client::connect(socket))
            .map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
        let version = rt
            .block_on(VersionClient::new(channel.clone()).version(()))
            .map_err(status(format!("Version on {}", socket.display())))?
            .into_inner()
            .version;
        let namespace = namespace
            .parse()
            .map_err(|_| format!("bad namespace {namespace:?}"))?;
        let gateway = format!("{subnet_prefix}.1")
            .parse()
            .map_err(|e| format!("gateway of {subnet_prefix}: {e}"))?;
        Ok(ContainerdFloor {
            rt,
            channel,
            socket: socket.to_path_buf(),
            namespace,
            version,
            run: run.to_owned(),
            scratch: scratch.to_path_buf(),
            template: None,
            counter: 0,
            subnet_prefix: subnet_prefix.to_owned(),
            bridge: cpi_tests::daemons::cpi_bridge_name(&format!("{subnet_prefix}.0/24")),
            gateway,
            with_network: true,
            vms: BTreeMap::new(),
            leases: BTreeSet::new(),
            mounts: BTreeSet::new(),
            dirs: BTreeSet::new(),
        })
    }

    fn req<T>(&self, message: T) -> Request<T> {
        let mut r = Request::new(message);
        r.metadata_mut()
            .insert("containerd-namespace", self.namespace.clone());
        r
    }

    fn leased<T>(&self, message: T, lease: &str) -> Request<T> {
        let mut r = self.req(message);
        if let Ok(v) = lease.parse::<AsciiMetadataValue>() {
            r.metadata_mut().insert("containerd-lease", v);
        }
        r
    }

    fn labels(&self) -> HashMap<String, String> {
        HashMap::from([(RUN_LABEL.to_owned(), self.run.clone())])
    }

    fn next_name(&mut self, what: &str) -> String {
        self.counter += 1;
        format!("{}-{what}-{}", self.run, self.counter)
    }

    fn template(&self) -> FloorResult<&Template> {
        self.template.as_ref().ok_or_else(|| {
            "the floor has no VM template yet (the CPI's create_vm failed?)".to_owned()
        })
    }

    async fn pid_of(&self, vm: &str) -> FloorResult<u32> {
        ContainersClient::new(self.channel.clone())
            .get(self.req(GetContainerRequest { id: vm.to_owned() }))
            .await
            .map_err(status(format!("Containers.Get {vm}")))?;
        let task = TasksClient::new(self.channel.clone())
            .get(self.req(GetTaskRequest {
                container_id: vm.to_owned(),
                exec_id: String::new(),
            }))
            .await
            .map_err(status(format!("Tasks.Get {vm}")))?
            .into_inner();
        task.process
            .map(|p| p.pid)
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("VM {vm} has no running task"))
    }

    fn write_settings(pid: u32, disk: &str, attached: bool) -> FloorResult<()> {
        let path = Path::new("/proc")
            .join(pid.to_string())
            .join("root")
            .join(SETTINGS_IN_VM);
        std::fs::write(&path, settings_stand_in(disk, attached))
            .map_err(|e| format!("writing {}: {e}", path.display()))
    }

    /// Stops and removes a floor VM's task, container and snapshot; missing parts are
    /// fine.
    async fn remove_vm(&self, vm: &str, snapshotter: &str) -> FloorResult<()> {
        self.stop_task(vm).await?;
        self.remove_records(vm, snapshotter).await
    }

    /// SIGTERM with the wait for the exit in flight beside it (SIGKILL after the
    /// grace); a task that is gone or stopped is success.
    async fn stop_task(&self, vm: &str) -> FloorResult<()> {
        let (mut tasks, mut waiter) = (
            TasksClient::new(self.channel.clone()),
            TasksClient::new(self.channel.clone()),
        );
        let kill = |signal: u32| KillRequest {
            container_id: vm.to_owned(),
            exec_id: String::new(),
            signal,
            all: signal == SIGKILL,
        };
        let wait = WaitRequest {
            container_id: vm.to_owned(),
            exec_id: String::new(),
        };
        let (killed, waited) = tokio::join!(
            tasks.kill(self.req(kill(SIGTERM))),
            tokio::time::timeout(STOP_GRACE, waiter.wait(self.req(wait.clone())))
        );
        match killed {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound || s.code() == Code::FailedPrecondition => {}
            Err(s) => return Err(status(format!("Tasks.Kill {vm}"))(s)),
        }
        let exited = match waited {
            Ok(Ok(_)) => true,
            Ok(Err(s)) => s.code() == Code::NotFound,
            Err(_) => false,
        };
        if !exited {
            let _ = tasks.kill(self.req(kill(SIGKILL))).await;
            let _ = tasks.wait(self.req(wait)).await;
        }
        Ok(())
    }

    /// `Tasks.Delete`, then `Containers.Delete` and `Snapshots.Remove` at once.
    async fn remove_records(&self, vm: &str, snapshotter: &str) -> FloorResult<()> {
        match TasksClient::new(self.channel.clone())
            .delete(self.req(DeleteTaskRequest {
                container_id: vm.to_owned(),
            }))
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(status(format!("Tasks.Delete {vm}"))(s)),
        }
        let (mut containers, mut snapshots) = (
            ContainersClient::new(self.channel.clone()),
            SnapshotsClient::new(self.channel.clone()),
        );
        let (deleted, removed) = tokio::join!(
            containers.delete(self.req(DeleteContainerRequest { id: vm.to_owned() })),
            snapshots.remove(self.req(RemoveSnapshotRequest {
                snapshotter: snapshotter.to_owned(),
                key: vm.to_owned(),
            }))
        );
        match deleted {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(status(format!("Containers.Delete {vm}"))(s)),
        }
        match removed {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(status(format!("Snapshots.Remove {vm}"))(s)),
        }
    }

    /// Names a floor VM, picks its address (when it gets a network) and records what
    /// it will own (not timed).
    fn plan_vm(&mut self) -> FloorResult<VmPlan> {
        let name = self.next_name("fvm");
        let labels = self.labels();
        let host = if self.with_network {
            Some(free_floor_host(|h| {
                self.vms.values().any(|used| *used == Some(h))
            })?)
        } else {
            None
        };
        let address = host
            .map(|h| {
                format!("{}.{h}/24", self.subnet_prefix)
                    .parse::<ipnet::Ipv4Net>()
                    .map_err(|e| format!("floor address in {}: {e}", self.subnet_prefix))
            })
            .transpose()?;
        let t = self.template()?;
        let spec_text = if address.is_some() {
            &t.spec
        } else {
            &t.spec_without_network
        };
        let spec = prost_types::Any {
            type_url: t.type_url.clone(),
            value: spec_text.replace(NAME, &name).into_bytes(),
        };
        let (dirs, vm_dirs, disks_dir) = Self::vm_paths(t, &name);
        let console = vm_dirs
            .first()
            .map(|d| format!("file://{}", d.join("console.log").display()))
            .unwrap_or_default();
        let mut snapshot_labels = labels.clone();
        snapshot_labels.insert("containerd.io/gc.root".into(), "cpi-bench".into());
        let container = Container {
            id: name.clone(),
            labels,
            image: t.image.clone(),
            runtime: t.runtime.clone(),
            spec: Some(spec),
            snapshotter: t.snapshotter.clone(),
            snapshot_key: name.clone(),
            ..Default::default()
        };
        let prepare = PrepareSnapshotRequest {
            snapshotter: t.snapshotter.clone(),
            key: name.clone(),
            parent: t.parent.clone(),
            labels: snapshot_labels,
        };
        self.vms.insert(name.clone(), host);
        self.dirs.extend(vm_dirs);
        Ok(VmPlan {
            name,
            address,
            dirs,
            disks_dir,
            console,
            container,
            prepare,
        })
    }

    /// The timed part of a floor `create_vm`.
    async fn start_vm(&self, plan: &VmPlan) -> FloorResult<()> {
        let name = &plan.name;
        for d in &plan.dirs {
            std::fs::create_dir_all(d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
        }
        host::make_shared_mount_point(&plan.disks_dir)?;
        // The network on a blocking thread (netlink, a namespace) beside the two
        // containerd requests, as the backend does.
        let network = async {
            let Some(address) = plan.address else {
                return Ok(());
            };
            let (vm, bridge, gateway) = (name.clone(), self.bridge.clone(), self.gateway);
            tokio::task::spawn_blocking(move || {
                backend_containerd::raw_network::make(&vm, &bridge, address, gateway)
                    .map_err(|e| format!("the network of {vm}: {e}"))
            })
            .await
            .map_err(|e| format!("the network of {name}: {e}"))?
        };
        let container = async {
            let prepared = SnapshotsClient::new(self.channel.clone())
                .prepare(self.req(plan.prepare.clone()))
                .await
                .map_err(status(format!("Snapshots.Prepare {name}")))?
                .into_inner();
            ContainersClient::new(self.channel.clone())
                .create(self.req(CreateContainerRequest {
                    container: Some(plan.container.clone()),
                }))
                .await
                .map_err(status(format!("Containers.Create {name}")))?;
            Ok::<_, String>(prepared)
        };
        let (network, prepared) = tokio::join!(network, container);
        network?;
        let prepared = prepared?;
        let mut tasks = TasksClient::new(self.channel.clone());
        tasks
            .create(self.req(CreateTaskRequest {
                container_id: name.clone(),
                rootfs: prepared.mounts,
                stdout: plan.console.clone(),
                stderr: plan.console.clone(),
                ..Default::default()
            }))
            .await
            .map_err(status(format!("Tasks.Create {name}")))?;
        tasks
            .start(self.req(StartRequest {
                container_id: name.clone(),
                exec_id: String::new(),
            }))
            .await
            .map_err(status(format!("Tasks.Start {name}")))?;
        Ok(())
    }

    /// The snapshotter, per-VM directories and disks directory of floor VM `vm`.
    fn vm_leftovers(&self, vm: &str) -> FloorResult<(String, Vec<PathBuf>, PathBuf)> {
        let t = self.template()?;
        let (_, vm_dirs, disks_dir) = Self::vm_paths(t, vm);
        Ok((t.snapshotter.clone(), vm_dirs, disks_dir))
    }

    /// The timed part of a floor `delete_vm`.
    async fn stop_vm(
        &self,
        vm: &str,
        snapshotter: &str,
        vm_dirs: &[PathBuf],
        disks_dir: &Path,
    ) -> FloorResult<()> {
        self.stop_task(vm).await?;
        // Once the init exited, the records (from `Tasks.Delete` on) and the host
        // side at once, as the backend does; the host side yields first, so the
        // request goes out before its work holds the thread.
        let host_side = async {
            tokio::task::yield_now().await;
            self.remove_network(vm)?;
            host::unbind(disks_dir)?;
            for d in vm_dirs {
                host::remove_dir_tree_unless_mounted(d)?;
            }
            Ok::<_, String>(())
        };
        let (records, host_side) = tokio::join!(self.remove_records(vm, snapshotter), host_side);
        records?;
        host_side
    }

    /// Removes the network namespace of floor VM `vm`, if it has one.
    fn remove_network(&self, vm: &str) -> FloorResult<()> {
        if matches!(self.vms.get(vm), Some(Some(_))) {
            backend_containerd::raw_network::remove(vm)
                .map_err(|e| format!("removing the network namespace of {vm}: {e}"))?;
        }
        Ok(())
    }

    fn forget_vm(&mut self, vm: &str, vm_dirs: &[PathBuf]) {
        self.vms.remove(vm);
        for d in vm_dirs {
            self.dirs.remove(d);
        }
    }

    fn vm_paths(t: &Template, vm: &str) -> (Vec<PathBuf>, Vec<PathBuf>, PathBuf) {
        let dirs = t
            .dirs
            .iter()
            .map(|d| PathBuf::from(d.replace(NAME, vm)))
            .collect();
        let vm_dirs = t
            .vm_dirs
            .iter()
            .map(|d| PathBuf::from(d.replace(NAME, vm)))
            .collect();
        (dirs, vm_dirs, PathBuf::from(t.disks_dir.replace(NAME, vm)))
    }

    async fn delete_lease(&self, lease: &str) -> FloorResult<()> {
        match LeasesClient::new(self.channel.clone())
            .delete(self.req(DeleteLeaseRequest {
                id: lease.to_owned(),
                sync: true,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(status(format!("Leases.Delete {lease}"))(s)),
        }
    }
}

/// Drops the `path` of the network namespace, so runc makes a new one.
fn fresh_network_namespace(spec: &mut Value) {
    if let Some(nss) = spec
        .pointer_mut("/linux/namespaces")
        .and_then(Value::as_array_mut)
    {
        for ns in nss.iter_mut() {
            if ns.get("type").and_then(Value::as_str) == Some("network") {
                if let Some(o) = ns.as_object_mut() {
                    o.remove("path");
                }
            }
        }
    }
}

/// The per-VM host directories a spec binds, with `vm` replaced by [`NAME`], and the
/// one bound at `/warden-cpi-dev`.
fn per_vm_binds(spec: &Value, vm: &str) -> (Vec<String>, Option<String>) {
    let mut dirs = Vec::new();
    let mut disks = None;
    for m in spec
        .get("mounts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let source = m.get("source").and_then(Value::as_str).unwrap_or_default();
        let dest = m
            .get("destination")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if m.get("type").and_then(Value::as_str) == Some("bind") && source.contains(vm) {
            let templated = source.replace(vm, NAME);
            if dest == "/warden-cpi-dev" {
                disks = Some(templated.clone());
            }
            dirs.push(templated);
        }
    }
    (dirs, disks)
}

impl Floor for ContainerdFloor {
    fn version(&self) -> String {
        self.version.clone()
    }

    fn round_trip(&mut self, vm: &str) -> FloorResult<Duration> {
        let started = Instant::now();
        self.rt.block_on(async {
            let channel = containerd_client::connect(&self.socket)
                .await
                .map_err(|e| format!("connecting to {}: {e}", self.socket.display()))?;
            ContainersClient::new(channel)
                .get(self.req(GetContainerRequest { id: vm.to_owned() }))
                .await
                .map_err(status(format!("Containers.Get {vm}")))
        })?;
        Ok(started.elapsed())
    }

    fn disk_round_trip(&mut self, _disk: &str) -> FloorResult<Duration> {
        // The backend's disks are host directories with a record file: `has_disk`
        // asks containerd nothing.
        Ok(Duration::ZERO)
    }

    fn learn(&mut self, vm: &str) -> FloorResult<()> {
        let container = self
            .rt
            .block_on(
                ContainersClient::new(self.channel.clone())
                    .get(self.req(GetContainerRequest { id: vm.to_owned() })),
            )
            .map_err(status(format!("Containers.Get {vm}")))?
            .into_inner()
            .container
            .ok_or_else(|| format!("Containers.Get {vm} returned no container"))?;
        let any = container
            .spec
            .ok_or_else(|| format!("container {vm} has no spec"))?;
        let mut spec: Value = serde_json::from_slice(&any.value)
            .map_err(|e| format!("the spec of {vm} is not JSON: {e}"))?;
        let (dirs, disks_dir) = per_vm_binds(&spec, vm);
        let disks_dir = disks_dir.ok_or_else(|| format!("VM {vm} has no /warden-cpi-dev bind"))?;
        let text = spec.to_string().replace(vm, NAME);
        fresh_network_namespace(&mut spec);
        let text_without_network = spec.to_string().replace(vm, NAME);
        let snapshot = self
            .rt
            .block_on(SnapshotsClient::new(self.channel.clone()).stat(self.req(
                StatSnapshotRequest {
                    snapshotter: container.snapshotter.clone(),
                    key: container.snapshot_key.clone(),
                },
            )))
            .map_err(status(format!("Snapshots.Stat {}", container.snapshot_key)))?
            .into_inner()
            .info
            .ok_or_else(|| format!("snapshot {} has no info", container.snapshot_key))?;
        let mut vm_dirs: Vec<String> = dirs
            .iter()
            .filter_map(|d| host::owning_dir(d, NAME))
            .collect();
        vm_dirs.sort();
        vm_dirs.dedup();
        self.template = Some(Template {
            spec: text,
            spec_without_network: text_without_network,
            type_url: any.type_url,
            image: container.image,
            runtime: container.runtime,
            snapshotter: container.snapshotter,
            parent: snapshot.parent,
            dirs,
            vm_dirs,
            disks_dir,
        });
        Ok(())
    }

    fn create_vm(&mut self) -> FloorResult<(String, Duration)> {
        let plan = self.plan_vm()?;
        let started = Instant::now();
        self.rt.block_on(self.start_vm(&plan))?;
        Ok((plan.name, started.elapsed()))
    }

    fn set_network(&mut self, on: bool) -> bool {
        self.with_network = on;
        true
    }

    fn create_vms(&mut self, n: usize) -> FloorResult<(Vec<String>, Duration)> {
        let plans = (0..n)
            .map(|_| self.plan_vm())
            .collect::<FloorResult<Vec<_>>>()?;
        let started = Instant::now();
        let results = self.rt.block_on(futures_util::future::join_all(
            plans.iter().map(|p| self.start_vm(p)),
        ));
        let took = started.elapsed();
        results.into_iter().collect::<FloorResult<Vec<()>>>()?;
        Ok((plans.into_iter().map(|p| p.name).collect(), took))
    }

    fn delete_vm(&mut self, vm: &str) -> FloorResult<Duration> {
        let (snapshotter, vm_dirs, disks_dir) = self.vm_leftovers(vm)?;
        let started = Instant::now();
        self.rt
            .block_on(self.stop_vm(vm, &snapshotter, &vm_dirs, &disks_dir))?;
        let took = started.elapsed();
        self.forget_vm(vm, &vm_dirs);
        Ok(took)
    }

    fn delete_vms(&mut self, vms: &[String]) -> FloorResult<Duration> {
        let parts = vms
            .iter()
            .map(|vm| self.vm_leftovers(vm))
            .collect::<FloorResult<Vec<_>>>()?;
        let started = Instant::now();
        let results = self
            .rt
            .block_on(futures_util::future::join_all(vms.iter().zip(&parts).map(
                |(vm, (snapshotter, vm_dirs, disks_dir))| {
                    self.stop_vm(vm, snapshotter, vm_dirs, disks_dir)
                },
            )));
        let took = started.elapsed();
        results.into_iter().collect::<FloorResult<Vec<()>>>()?;
        for (vm, (_, vm_dirs, _)) in vms.iter().zip(&parts) {
            self.forget_vm(vm, vm_dirs);
        }
        Ok(took)
    }

    fn wait_init(&mut self, vm: &str) -> FloorResult<()> {
        let pid = self.rt.block_on(self.pid_of(vm))?;
        host::wait_until_catches_sigterm(pid, INIT_LIMIT)
    }

    fn create_disk(&mut self) -> FloorResult<String> {
        let name = self.next_name("fdisk");
        let dir = self.scratch.join(&name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        self.dirs.insert(dir);
        Ok(name)
    }

    fn attach(&mut self, vm: &str, disk: &str) -> FloorResult<Duration> {
        let target = Path::new(&self.template()?.disks_dir.replace(NAME, vm)).join(disk);
        let source = self.scratch.join(disk);
        let started = Instant::now();
        let pid = self.rt.block_on(self.pid_of(vm))?;
        host::bind(&source, &target)?;
        Self::write_settings(pid, disk, true)?;
        let took = started.elapsed();
        self.mounts.insert(target);
        Ok(took)
    }

    fn detach(&mut self, vm: &str, disk: &str) -> FloorResult<Duration> {
        let target = Path::new(&self.template()?.disks_dir.replace(NAME, vm)).join(disk);
        let started = Instant::now();
        let pid = self.rt.block_on(self.pid_of(vm))?;
        host::unbind(&target)?;
        Self::write_settings(pid, disk, false)?;
        let took = started.elapsed();
        self.mounts.remove(&target);
        Ok(took)
    }

    fn import(&mut self, image: &Path) -> FloorResult<(String, Duration)> {
        let lease = self.next_name("flease");
        let reference = format!("{lease}-ref");
        let key = format!("{lease}-extract");
        let committed = format!("{lease}-layer");
        let snapshotter = self
            .template
            .as_ref()
            .map(|t| t.snapshotter.clone())
            .unwrap_or_else(|| "overlayfs".into());
        let mut lease_labels = self.labels();
        // If the bench dies, containerd's collector removes the lease and its content.
        lease_labels.insert(
            "containerd.io/gc.expire".into(),
            expiry_in(Duration::from_secs(3600)),
        );
        let content_labels = self.labels();
        self.leases.insert(lease.clone());
        let started = Instant::now();
        self.rt.block_on(async {
            LeasesClient::new(self.channel.clone())
                .create(self.req(CreateLeaseRequest {
                    id: lease.clone(),
                    labels: lease_labels,
                }))
                .await
                .map_err(status(format!("Leases.Create {lease}")))?;
            let mut file = tokio::fs::File::open(image)
                .await
                .map_err(|e| format!("opening {}: {e}", image.display()))?;
            let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(4);
            let producer = async move {
                let mut offset = 0i64;
                loop {
                    let mut buf = vec![0u8; CHUNK];
                    let mut filled = 0;
                    while filled < CHUNK {
                        let n = file
                            .read(&mut buf[filled..])
                            .await
                            .map_err(|e| format!("reading the image: {e}"))?;
                        if n == 0 {
                            break;
                        }
                        filled += n;
                    }
                    if filled == 0 {
                        break;
                    }
                    buf.truncate(filled);
                    let msg = WriteContentRequest {
                        action: WriteAction::Write as i32,
                        r#ref: reference.clone(),
                        offset,
                        data: buf,
                        ..Default::default()
                    };
                    offset += filled as i64;
                    if tx.send(msg).await.is_err() {
                        return Err("containerd stopped reading the content stream".to_owned());
                    }
                }
                let commit = WriteContentRequest {
                    action: WriteAction::Commit as i32,
                    r#ref: reference.clone(),
                    total: offset,
                    offset,
                    labels: content_labels,
                    ..Default::default()
                };
                let _ = tx.send(commit).await;
                Ok::<i64, String>(offset)
            };
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|m| (m, rx))
            });
            let consumer = async {
                let mut responses = ContentClient::new(self.channel.clone())
                    .max_decoding_message_size(64 << 20)
                    .write(self.leased(stream, &lease))
                    .await
                    .map_err(status("Content.Write"))?
                    .into_inner();
                let mut digest = String::new();
                while let Some(r) = responses.message().await.map_err(status("Content.Write"))? {
                    if !r.digest.is_empty() {
                        digest = r.digest;
                    }
                }
                Ok::<String, String>(digest)
            };
            let (size, digest) = tokio::join!(producer, consumer);
            let (size, digest) = (size?, digest?);
            if digest.is_empty() {
                return Err("Content.Write committed no digest".to_owned());
            }
            let mut snapshots = SnapshotsClient::new(self.channel.clone());
            let prepared = snapshots
                .prepare(self.leased(
                    PrepareSnapshotRequest {
                        snapshotter: snapshotter.clone(),
                        key: key.clone(),
                        parent: String::new(),
                        labels: HashMap::new(),
                    },
                    &lease,
                ))
                .await
                .map_err(status(format!("Snapshots.Prepare {key}")))?
                .into_inner();
            DiffClient::new(self.channel.clone())
                .apply(self.leased(
                    ApplyRequest {
                        diff: Some(Descriptor {
                            media_type: LAYER_GZIP.into(),
                            digest: digest.clone(),
                            size,
                            annotations: HashMap::new(),
                        }),
                        mounts: prepared.mounts,
                        ..Default::default()
                    },
                    &lease,
                ))
                .await
                .map_err(status(format!("Diff.Apply {digest}")))?;
            snapshots
                .commit(self.leased(
                    CommitSnapshotRequest {
                        snapshotter,
                        name: committed.clone(),
                        key: key.clone(),
                        labels: HashMap::new(),
                    },
                    &lease,
                ))
                .await
                .map_err(status(format!("Snapshots.Commit {committed}")))?;
            Ok::<_, String>(())
        })?;
        Ok((lease, started.elapsed()))
    }

    fn remove_import(&mut self, id: &str) -> FloorResult<()> {
        self.rt.block_on(self.delete_lease(id))?;
        self.leases.remove(id);
        Ok(())
    }

    fn teardown(&mut self) -> Vec<String> {
        let mut failures = Vec::new();
        for m in std::mem::take(&mut self.mounts) {
            if let Err(e) = host::unbind(&m) {
                failures.push(e);
            }
        }
        let snapshotter = self
            .template
            .as_ref()
            .map(|t| t.snapshotter.clone())
            .unwrap_or_else(|| "overlayfs".into());
        for vm in self.vms.keys().cloned().collect::<Vec<_>>() {
            if let Err(e) = self.rt.block_on(self.remove_vm(&vm, &snapshotter)) {
                failures.push(e);
            }
            if let Err(e) = self.remove_network(&vm) {
                failures.push(e);
            }
            self.vms.remove(&vm);
            if let Some(t) = &self.template {
                let (_, _, disks) = Self::vm_paths(t, &vm);
                for m in host::mounts_under(&disks) {
                    if let Err(e) = host::unbind(&m) {
                        failures.push(e);
                    }
                }
            }
        }
        for lease in std::mem::take(&mut self.leases) {
            if let Err(e) = self.rt.block_on(self.delete_lease(&lease)) {
                failures.push(e);
            }
        }
        for d in std::mem::take(&mut self.dirs) {
            if let Err(e) = host::remove_dir_tree_unless_mounted(&d) {
                failures.push(e);
            }
        }
        failures
    }

    fn describe(&self, row: &str) -> &'static str {
        match row {
            "info" => "fork+exec of /bin/true (info makes no daemon call)",
            "has_vm" => "fork+exec of /bin/true + new gRPC channel + Containers.Get",
            "has_disk" => "fork+exec of /bin/true (has_disk reads the disk's record file: no daemon call)",
            "get_disks" => "fork+exec of /bin/true + new gRPC channel + Containers.Get (the CPI also checks the VM's disk mount points)",
            "create_vm" => "mkdir + shared bind of the disks dir + the VM's network over netlink (namespace, veth on the bridge, address, route; the backend's calls, no records) beside Snapshots.Prepare + Containers.Create (the CPI VM's spec), then Tasks.Create + Tasks.Start",
            "delete_vm" => "Tasks.Kill SIGTERM with Tasks.Wait beside it, then Tasks.Delete, then Containers.Delete + Snapshots.Remove at once, beside network namespace removal + umount + rm -r",
            "attach_disk" => "Containers.Get + Tasks.Get + mkdir + bind mount into the shared disks dir + 1 KiB write via /proc/<pid>/root",
            "detach_disk" => "Containers.Get + Tasks.Get + umount + rmdir + 1 KiB write via /proc/<pid>/root",
            _ if row.starts_with("create_stemcell") => "Leases.Create + Content.Write (1 MiB messages) + Snapshots.Prepare + Diff.Apply + Snapshots.Commit",
            _ if row.starts_with("create_vm_x") => "the create_vm floor for every VM at once, all requests in flight together on one channel; wall time of the batch",
            _ if row.starts_with("delete_vm_x") => "the delete_vm floor for every VM at once; wall time of the batch",
            _ => "",
        }
    }
}

/// An RFC 3339 UTC time `after` from now (for `containerd.io/gc.expire`).
fn expiry_in(after: Duration) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + after.as_secs();
    rfc3339(secs)
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, proleptic
/// Gregorian).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_704_067_200), "2024-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_709_210_096), "2024-02-29T12:34:56Z");
    }

    #[test]
    fn template_drops_the_netns_path_and_finds_per_vm_binds() {
        let mut spec = json!({
            "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/vm-1"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/var/vcap/data", "type": "bind", "source": "/s/vms/vm-1/data"},
                {"destination": "/warden-cpi-dev", "type": "bind", "source": "/s/vms/vm-1/disks"},
                {"destination": "/usr/lib/modules", "type": "bind", "source": "/lib/modules"},
            ],
        });
        fresh_network_namespace(&mut spec);
        assert_eq!(spec["linux"]["namespaces"][1], json!({"type": "network"}));
        let (dirs, disks) = per_vm_binds(&spec, "vm-1");
        assert_eq!(
            dirs,
            vec![
                format!("/s/vms/{NAME}/data"),
                format!("/s/vms/{NAME}/disks")
            ]
        );
        assert_eq!(disks, Some(format!("/s/vms/{NAME}/disks")));
    }
}
