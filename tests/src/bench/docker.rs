//! The Docker floor, over bollard (the same client and features as the backend).
//!
//! - VM template: `GET /containers/<cpi vm>/json`; its `Config` and `HostConfig` are
//!   replayed with the CPI VM's name replaced by the floor VM's (hostname, ephemeral
//!   volume, per-VM directory in binds), the bench's own labels, and the same network
//!   with another static address.
//! - `create_vm` floor: `mkdir` of the per-VM bind sources, `POST /volumes/create`
//!   (ephemeral volume), `POST /containers/create`, `POST /containers/<id>/start`.
//! - `delete_vm` floor: `POST /containers/<id>/stop` (same 10 s grace as the CPI; the
//!   test stemcell's init exits on SIGTERM), `DELETE /containers/<id>?force=1`,
//!   `DELETE /volumes/<eph>`, `rmdir` of the per-VM directories.
//! - attach floor: `GET /containers/<vm>/json` (find the VM), `GET /volumes/<disk>`
//!   (find the disk's directory), `mkdir` + bind mount of the volume's directory onto
//!   the VM's shared disks directory (propagates into the running container), and
//!   the 1 KiB settings written the way the CPI writes them: in place into the host
//!   file the VM binds at the settings path (VMs made with local attach), else an
//!   archive `PUT` into the running container. Detach: the inspect, unmount +
//!   `rmdir`, and the settings write.
//! - `create_stemcell` floor: `POST /images/create?fromSrc=-` streaming the same
//!   `image` file in 256 KiB reads (what `docker import` does, and the endpoint the
//!   backend uses; bollard's `import_image` is `POST /images/load`, which takes a
//!   `docker save` archive, not a root filesystem tarball).
//! - has_vm floor: `GET /containers/<vm>/json` on a new client (fresh connection, API
//!   version pinned to the negotiated one, so no `/version` round trip).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::models::{ContainerCreateBody, VolumeCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, RemoveContainerOptions, RemoveImageOptions,
    RemoveVolumeOptions, StopContainerOptions, UploadToContainerOptions,
};
use bollard::{ClientVersion, Docker};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::runtime::Runtime;

use super::floor::{free_floor_host, settings_stand_in, Floor, FloorResult, SETTINGS_IN_VM};
use super::host;

/// The label every floor object carries, with the run's director uuid as value (so the
/// conformance kit's leftovers check, which greps for the uuid, finds them too).
pub const RUN_LABEL: &str = "cpi-bench.run";

const NAME: &str = "@@FLOOR_VM@@";
const STOP_GRACE_SECS: i32 = 10;
const TIMEOUT_SECS: u64 = 3600;
/// How long a VM's init may take to set its SIGTERM handler.
const INIT_LIMIT: Duration = Duration::from_secs(30);

struct Template {
    /// `Config` with `HostConfig` inside, as JSON text with [`NAME`] for the VM name.
    body: String,
    network: String,
    /// Named volumes of the VM (with [`NAME`]).
    volumes: Vec<String>,
    /// Host directories bound into the VM that are per-VM (with [`NAME`]).
    dirs: Vec<String>,
    /// The per-VM directories those are in, removed with the VM (with [`NAME`]).
    vm_dirs: Vec<String>,
    /// The host directory bound at `/warden-cpi-dev` (with [`NAME`]).
    disks_dir: String,
    /// The host file bound at the settings path, if the CPI VM has one (with [`NAME`]).
    settings_file: Option<String>,
}

/// A floor VM about to be created.
struct VmPlan {
    name: String,
    body: ContainerCreateBody,
    volumes: Vec<String>,
    dirs: Vec<PathBuf>,
    settings_file: Option<PathBuf>,
    labels: HashMap<String, String>,
}

/// The Docker floor.
pub struct DockerFloor {
    rt: Arc<Runtime>,
    docker: Docker,
    version: ClientVersion,
    socket: String,
    engine: String,
    run: String,
    subnet_prefix: String,
    template: Option<Template>,
    counter: u32,
    /// Floor VMs alive, with their static address's host part.
    vms: HashMap<String, u8>,
    volumes: BTreeSet<String>,
    images: BTreeSet<String>,
    mounts: BTreeSet<PathBuf>,
    dirs: BTreeSet<PathBuf>,
}

fn err(what: impl std::fmt::Display) -> impl FnOnce(bollard::errors::Error) -> String {
    move |e| format!("{what}: {e}")
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

impl DockerFloor {
    /// A client of its own, as a new process has: its first request opens the
    /// connection (the API version pinned, no `/version`).
    fn fresh_client(&self) -> FloorResult<Docker> {
        Docker::connect_with_unix(&self.socket, TIMEOUT_SECS, &self.version)
            .map_err(err(format!("connecting to {}", self.socket)))
    }

    /// Connects (negotiating the API version once) and reads the engine version.
    pub fn connect(
        rt: Arc<Runtime>,
        socket: &str,
        run: &str,
        subnet_prefix: &str,
    ) -> FloorResult<DockerFloor> {
        let (docker, engine) = rt.block_on(async {
            let docker =
                Docker::connect_with_unix(socket, TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
                    .map_err(err(format!("connecting to {socket}")))?
                    .negotiate_version()
                    .await
                    .map_err(err(format!("negotiating the API version with {socket}")))?;
            let v = docker
                .version()
                .await
                .map_err(err(format!("GET /version on {socket}")))?;
            let engine = format!(
                "{} (API {})",
                v.version.unwrap_or_default(),
                v.api_version.unwrap_or_default()
            );
            Ok::<_, String>((docker, engine))
        })?;
        let version = docker.client_version();
        Ok(DockerFloor {
            rt,
            docker,
            version,
            socket: socket.to_owned(),
            engine,
            run: run.to_owned(),
            subnet_prefix: subnet_prefix.to_owned(),
            template: None,
            counter: 0,
            vms: HashMap::new(),
            volumes: BTreeSet::new(),
            images: BTreeSet::new(),
            mounts: BTreeSet::new(),
            dirs: BTreeSet::new(),
        })
    }

    fn next_name(&mut self, what: &str) -> String {
        self.counter += 1;
        format!("{}-{what}-{}", self.run, self.counter)
    }

    fn labels(&self) -> HashMap<String, String> {
        HashMap::from([(RUN_LABEL.to_owned(), self.run.clone())])
    }

    fn template(&self) -> FloorResult<&Template> {
        self.template.as_ref().ok_or_else(|| {
            "the floor has no VM template yet (the CPI's create_vm failed?)".to_owned()
        })
    }

    fn disk_target(&self, vm: &str, disk: &str) -> FloorResult<PathBuf> {
        Ok(PathBuf::from(self.template()?.disks_dir.replace(NAME, vm)).join(disk))
    }

    async fn put_settings(&self, vm: &str, disk: &str, attached: bool) -> FloorResult<()> {
        let bytes = settings_stand_in(disk, attached);
        if let Some(file) = &self.template()?.settings_file {
            // As the CPI does for such a VM: in place, into the host file it binds.
            let path = PathBuf::from(file.replace(NAME, vm));
            return host::write_in_place(&path, &bytes);
        }
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o600);
        header.set_size(bytes.len() as u64);
        header.set_mtime(0);
        let mut builder = tar::Builder::new(Vec::new());
        builder
            .append_data(&mut header, SETTINGS_IN_VM, bytes.as_slice())
            .map_err(|e| format!("building the settings archive: {e}"))?;
        let archive = builder
            .into_inner()
            .map_err(|e| format!("building the settings archive: {e}"))?;
        self.docker
            .upload_to_container(
                vm,
                Some(UploadToContainerOptions {
                    path: "/".into(),
                    ..Default::default()
                }),
                bollard::body_full(archive.into()),
            )
            .await
            .map_err(err(format!("PUT /containers/{vm}/archive")))
    }

    /// Names a floor VM, picks its address and records what it will own (not timed).
    fn plan_vm(&mut self) -> FloorResult<VmPlan> {
        let name = self.next_name("fvm");
        let host = free_floor_host(|h| self.vms.values().any(|used| *used == h))?;
        let ip = format!("{}.{host}", self.subnet_prefix);
        let t = self.template()?;
        let mut body: Value = serde_json::from_str(&t.body.replace(NAME, &name))
            .map_err(|e| format!("template: {e}"))?;
        body["Labels"] = json!(self.labels());
        body["NetworkingConfig"] =
            json!({"EndpointsConfig": {t.network.clone(): {"IPAMConfig": {"IPv4Address": ip}}}});
        let body: ContainerCreateBody =
            serde_json::from_value(body).map_err(|e| format!("template: {e}"))?;
        let volumes: Vec<String> = t.volumes.iter().map(|v| v.replace(NAME, &name)).collect();
        let dirs: Vec<PathBuf> = t
            .dirs
            .iter()
            .map(|d| PathBuf::from(d.replace(NAME, &name)))
            .collect();
        let vm_dirs: Vec<PathBuf> = t
            .vm_dirs
            .iter()
            .map(|d| PathBuf::from(d.replace(NAME, &name)))
            .collect();
        let settings_file = t
            .settings_file
            .as_ref()
            .map(|f| PathBuf::from(f.replace(NAME, &name)));
        let labels = self.labels();
        self.vms.insert(name.clone(), host);
        self.volumes.extend(volumes.iter().cloned());
        self.dirs.extend(vm_dirs);
        Ok(VmPlan {
            name,
            body,
            volumes,
            dirs,
            settings_file,
            labels,
        })
    }

    /// The timed part of a floor `create_vm`: `mkdir`, volumes, create, start.
    async fn start_vm(&self, plan: &VmPlan) -> FloorResult<()> {
        for d in &plan.dirs {
            std::fs::create_dir_all(d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
        }
        if let Some(f) = &plan.settings_file {
            host::create_private_file(f)?;
        }
        for v in &plan.volumes {
            self.docker
                .create_volume(VolumeCreateRequest {
                    name: Some(v.clone()),
                    driver: Some("local".into()),
                    labels: Some(plan.labels.clone()),
                    ..Default::default()
                })
                .await
                .map_err(err(format!("POST /volumes/create {v}")))?;
        }
        self.docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(plan.name.clone()),
                    ..Default::default()
                }),
                plan.body.clone(),
            )
            .await
            .map_err(err(format!("POST /containers/create {}", plan.name)))?;
        self.docker
            .start_container(&plan.name, None)
            .await
            .map_err(err(format!("POST /containers/{}/start", plan.name)))
    }

    /// The volumes and per-VM directories of floor VM `vm`.
    fn vm_leftovers(&self, vm: &str) -> FloorResult<(Vec<String>, Vec<PathBuf>)> {
        let t = self.template()?;
        let volumes = t.volumes.iter().map(|v| v.replace(NAME, vm)).collect();
        let dirs = t
            .vm_dirs
            .iter()
            .map(|d| PathBuf::from(d.replace(NAME, vm)))
            .collect();
        Ok((volumes, dirs))
    }

    /// The timed part of a floor `delete_vm`.
    async fn stop_vm(&self, vm: &str, volumes: &[String], dirs: &[PathBuf]) -> FloorResult<()> {
        self.remove_container(vm).await?;
        self.remove_volumes(volumes).await?;
        for d in dirs {
            host::remove_dir_tree_unless_mounted(d)?;
        }
        Ok(())
    }

    fn forget_vm(&mut self, vm: &str, volumes: &[String], dirs: &[PathBuf]) {
        self.vms.remove(vm);
        for v in volumes {
            self.volumes.remove(v);
        }
        for d in dirs {
            self.dirs.remove(d);
        }
    }

    async fn remove_container(&self, vm: &str) -> FloorResult<()> {
        match self
            .docker
            .stop_container(
                vm,
                Some(StopContainerOptions {
                    t: Some(STOP_GRACE_SECS),
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => return Ok(()),
            // 304: already stopped; the forced removal deals with anything else.
            Err(_) => {}
        }
        match self
            .docker
            .remove_container(
                vm,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(format!("DELETE /containers/{vm}: {e}")),
        }
    }

    async fn remove_volumes(&self, volumes: &[String]) -> FloorResult<()> {
        for v in volumes {
            match self
                .docker
                .remove_volume(v, None::<RemoveVolumeOptions>)
                .await
            {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(format!("DELETE /volumes/{v}: {e}")),
            }
        }
        Ok(())
    }
}

/// Replaces `from` by [`NAME`] in every string of `v`.
fn templatise(v: &mut Value, from: &str) {
    match v {
        Value::String(s) if s.contains(from) => *s = s.replace(from, NAME),
        Value::Array(a) => a.iter_mut().for_each(|x| templatise(x, from)),
        Value::Object(o) => o.values_mut().for_each(|x| templatise(x, from)),
        _ => {}
    }
}

impl Floor for DockerFloor {
    fn version(&self) -> String {
        self.engine.clone()
    }

    fn round_trip(&mut self, vm: &str) -> FloorResult<Duration> {
        let started = Instant::now();
        self.rt.block_on(async {
            self.fresh_client()?
                .inspect_container(vm, None)
                .await
                .map_err(err(format!("GET /containers/{vm}/json")))
        })?;
        Ok(started.elapsed())
    }

    fn disk_round_trip(&mut self, disk: &str) -> FloorResult<Duration> {
        let started = Instant::now();
        self.rt.block_on(async {
            self.fresh_client()?
                .inspect_volume(disk)
                .await
                .map_err(err(format!("GET /volumes/{disk}")))
        })?;
        Ok(started.elapsed())
    }

    fn learn(&mut self, vm: &str) -> FloorResult<()> {
        let c = self
            .rt
            .block_on(self.docker.inspect_container(vm, None))
            .map_err(err(format!("GET /containers/{vm}/json")))?;
        let network = c
            .network_settings
            .as_ref()
            .and_then(|n| n.networks.as_ref())
            .and_then(|n| n.keys().next().cloned())
            .ok_or_else(|| format!("VM {vm} has no network"))?;
        let mut body = serde_json::to_value(c.config.as_ref().ok_or("no Config")?)
            .map_err(|e| format!("Config of {vm}: {e}"))?;
        let host = serde_json::to_value(c.host_config.as_ref().ok_or("no HostConfig")?)
            .map_err(|e| format!("HostConfig of {vm}: {e}"))?;
        body["HostConfig"] = host;
        body["Labels"] = json!({});
        templatise(&mut body, vm);
        let mut volumes = Vec::new();
        let mut dirs = Vec::new();
        let mut disks_dir = None;
        let mut settings_file = None;
        for m in c.mounts.unwrap_or_default() {
            let kind = m.typ.map(|t| t.to_string()).unwrap_or_default();
            let dest = m.destination.unwrap_or_default();
            match kind.as_str() {
                "volume" => {
                    if let Some(name) = m.name.filter(|n| n.contains(vm)) {
                        volumes.push(name.replace(vm, NAME));
                    }
                }
                "bind" => {
                    if let Some(src) = m.source.filter(|s| s.contains(vm)) {
                        let src = src.replace(vm, NAME);
                        if dest == format!("/{SETTINGS_IN_VM}") {
                            // A file, not a directory: made by `start_vm`.
                            settings_file = Some(src);
                            continue;
                        }
                        if dest == "/warden-cpi-dev" {
                            disks_dir = Some(src.clone());
                        }
                        dirs.push(src);
                    }
                }
                _ => {}
            }
        }
        let disks_dir = disks_dir.ok_or_else(|| format!("VM {vm} has no /warden-cpi-dev bind"))?;
        let mut vm_dirs: Vec<String> = dirs
            .iter()
            .filter_map(|d| host::owning_dir(d, NAME))
            .collect();
        vm_dirs.sort();
        vm_dirs.dedup();
        self.template = Some(Template {
            body: body.to_string(),
            network,
            volumes,
            dirs,
            vm_dirs,
            disks_dir,
            settings_file,
        });
        Ok(())
    }

    fn create_vm(&mut self) -> FloorResult<(String, Duration)> {
        let plan = self.plan_vm()?;
        let started = Instant::now();
        self.rt.block_on(self.start_vm(&plan))?;
        Ok((plan.name, started.elapsed()))
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
        let (volumes, dirs) = self.vm_leftovers(vm)?;
        let started = Instant::now();
        self.rt.block_on(self.stop_vm(vm, &volumes, &dirs))?;
        let took = started.elapsed();
        self.forget_vm(vm, &volumes, &dirs);
        Ok(took)
    }

    fn delete_vms(&mut self, vms: &[String]) -> FloorResult<Duration> {
        let parts = vms
            .iter()
            .map(|vm| self.vm_leftovers(vm))
            .collect::<FloorResult<Vec<_>>>()?;
        let started = Instant::now();
        let results = self.rt.block_on(futures_util::future::join_all(
            vms.iter()
                .zip(&parts)
                .map(|(vm, (volumes, dirs))| self.stop_vm(vm, volumes, dirs)),
        ));
        let took = started.elapsed();
        results.into_iter().collect::<FloorResult<Vec<()>>>()?;
        for (vm, (volumes, dirs)) in vms.iter().zip(&parts) {
            self.forget_vm(vm, volumes, dirs);
        }
        Ok(took)
    }

    fn wait_init(&mut self, vm: &str) -> FloorResult<()> {
        let c = self
            .rt
            .block_on(self.docker.inspect_container(vm, None))
            .map_err(err(format!("GET /containers/{vm}/json")))?;
        let pid = c
            .state
            .and_then(|s| s.pid)
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("VM {vm} is not running"))?;
        host::wait_until_catches_sigterm(pid, INIT_LIMIT)
    }

    fn create_disk(&mut self) -> FloorResult<String> {
        let name = self.next_name("fdisk");
        let labels = self.labels();
        self.rt
            .block_on(self.docker.create_volume(VolumeCreateRequest {
                name: Some(name.clone()),
                driver: Some("local".into()),
                labels: Some(labels),
                ..Default::default()
            }))
            .map_err(err(format!("POST /volumes/create {name}")))?;
        self.volumes.insert(name.clone());
        Ok(name)
    }

    fn attach(&mut self, vm: &str, disk: &str) -> FloorResult<Duration> {
        let target = self.disk_target(vm, disk)?;
        let started = Instant::now();
        self.rt.block_on(async {
            self.docker
                .inspect_container(vm, None)
                .await
                .map_err(err(format!("GET /containers/{vm}/json")))?;
            let volume = self
                .docker
                .inspect_volume(disk)
                .await
                .map_err(err(format!("GET /volumes/{disk}")))?;
            host::bind(Path::new(&volume.mountpoint), &target)?;
            self.put_settings(vm, disk, true).await
        })?;
        let took = started.elapsed();
        self.mounts.insert(target);
        Ok(took)
    }

    fn detach(&mut self, vm: &str, disk: &str) -> FloorResult<Duration> {
        let target = self.disk_target(vm, disk)?;
        let started = Instant::now();
        self.rt.block_on(async {
            self.docker
                .inspect_container(vm, None)
                .await
                .map_err(err(format!("GET /containers/{vm}/json")))?;
            host::unbind(&target)?;
            self.put_settings(vm, disk, false).await
        })?;
        let took = started.elapsed();
        self.mounts.remove(&target);
        Ok(took)
    }

    fn import(&mut self, image: &Path) -> FloorResult<(String, Duration)> {
        let tag = self.next_name("fimport");
        let reference = format!("cpi-bench-floor:{tag}");
        self.images.insert(reference.clone());
        let started = Instant::now();
        self.rt.block_on(async {
            let file = tokio::fs::File::open(image)
                .await
                .map_err(|e| format!("opening {}: {e}", image.display()))?;
            let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
            let mut progress = self.docker.create_image(
                Some(CreateImageOptions {
                    from_src: Some("-".into()),
                    repo: Some("cpi-bench-floor".into()),
                    tag: Some(tag.clone()),
                    ..Default::default()
                }),
                Some(bollard::body_try_stream(stream)),
                None,
            );
            while let Some(item) = progress.next().await {
                item.map_err(err(format!(
                    "POST /images/create?fromSrc=- ({})",
                    image.display()
                )))?;
            }
            Ok::<_, String>(())
        })?;
        Ok((reference, started.elapsed()))
    }

    fn remove_import(&mut self, id: &str) -> FloorResult<()> {
        match self.rt.block_on(self.docker.remove_image(
            id,
            Some(RemoveImageOptions {
                force: true,
                ..Default::default()
            }),
            None,
        )) {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(format!("DELETE /images/{id}: {e}")),
        }
        self.images.remove(id);
        Ok(())
    }

    fn teardown(&mut self) -> Vec<String> {
        let mut failures = Vec::new();
        for m in std::mem::take(&mut self.mounts) {
            if let Err(e) = host::unbind(&m) {
                failures.push(e);
            }
        }
        for vm in std::mem::take(&mut self.vms).into_keys() {
            if let Err(e) = self.rt.block_on(self.remove_container(&vm)) {
                failures.push(e);
            }
        }
        let volumes: Vec<String> = std::mem::take(&mut self.volumes).into_iter().collect();
        if let Err(e) = self.rt.block_on(self.remove_volumes(&volumes)) {
            failures.push(e);
        }
        for d in std::mem::take(&mut self.dirs) {
            if let Err(e) = host::remove_dir_tree_unless_mounted(&d) {
                failures.push(e);
            }
        }
        for image in std::mem::take(&mut self.images)
            .into_iter()
            .collect::<Vec<_>>()
        {
            if let Err(e) = self.remove_import(&image) {
                failures.push(e);
            }
        }
        failures
    }

    fn describe(&self, row: &str) -> &'static str {
        match row {
            "info" => "fork+exec of /bin/true (info makes no daemon call)",
            "has_vm" => "fork+exec of /bin/true + GET /containers/<vm>/json on a fresh connection",
            "has_disk" => "fork+exec of /bin/true + GET /volumes/<disk> on a fresh connection",
            "get_disks" => "fork+exec of /bin/true + GET /containers/<vm>/json on a fresh connection (the CPI also reads the host's mount table)",
            "create_vm" => "mkdir + POST /volumes/create + POST /containers/create (the CPI VM's Config and HostConfig) + start",
            "delete_vm" => "POST stop (t=10) + DELETE /containers/<id>?force=1 + DELETE /volumes/<eph> + rmdir",
            "attach_disk" => "GET container + GET volume + mkdir + bind mount into the shared disks dir + 1 KiB settings written in place into the VM's bound host file (archive PUT for a VM without one)",
            "detach_disk" => "GET container + umount + rmdir + the 1 KiB settings write",
            _ if row.starts_with("create_stemcell") => "POST /images/create?fromSrc=- streaming the same image file",
            _ if row.starts_with("create_vm_x") => "the create_vm floor for every VM at once, all requests in flight together on one client; wall time of the batch",
            _ if row.starts_with("delete_vm_x") => "the delete_vm floor for every VM at once; wall time of the batch",
            _ => "",
        }
    }
}
