//! The backends used as a library: one VM lifecycle through the `Cpi` trait, with no
//! `cpi` binary and no JSON in between. The same code drives either backend; only the
//! set-up (a `DockerConfig` or a `ContainerdConfig`) and the host clean-up differ.
//!
//! ```sh
//! cargo run -p cpi-tests --example library_lifecycle -- docker                 # builds a test stemcell
//! cargo run -p cpi-tests --example library_lifecycle -- containerd STEMCELL_DIR # an unpacked stemcell
//! ```
//!
//! `STEMCELL_DIR` holds `image` and `stemcell.MF` side by side (a stemcell `.tgz`
//! unpacked with `tar -xzf`); without it the example builds a small busybox-based
//! stemcell with the project's test kit.
//!
//! - **docker**: the local daemon (`unix:///var/run/docker.sock`, or `DOCKER_HOST` when
//!   it is a `unix://` address). The VM is on a Docker network of the run's own (a
//!   dynamic BOSH network naming it; the backend creates it).
//! - **containerd**: the local containerd (`/run/containerd/containerd.sock`, or
//!   `CONTAINERD_ADDRESS`), CNI plugins from `/usr/lib/cni`. A namespace, state
//!   directory and dynamic /24 of the run's own, so it can run beside anything else.
//!
//! The example prints each call, deletes everything it made (also when a step fails)
//! and exits non-zero when a step or the clean-up failed. It runs as root: live disk
//! attach mounts in the daemon's mount namespace.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "an example program reports its steps to the person running it"
)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use backend_containerd::{ContainerdConfig, ContainerdCpi};
use backend_docker::{DockerConfig, DockerCpi};
use cpi_core::{
    AgentId, AgentOptions, CallContext, Cpi, CreateDisk, CreateStemcell, CreateVm, DiskCid,
    Networks, StemcellCid, VmCid, VmCloudProperties,
};
use serde_json::{json, Value};

/// What the example has made so far, so the clean-up removes exactly that.
#[derive(Default)]
struct Made {
    stemcell: Option<StemcellCid>,
    vm: Option<VmCid>,
    disk: Option<DiskCid>,
}

/// A backend with the example's own settings, and what its clean-up needs.
enum Backend {
    Docker {
        cpi: DockerCpi,
        network: String,
        state_dir: PathBuf,
    },
    Containerd {
        cpi: ContainerdCpi,
        socket: PathBuf,
        namespace: String,
        state_dir: PathBuf,
        subnet: String,
    },
}

impl Backend {
    /// The backend named `kind`, configured for a run called `name`.
    fn new(kind: &str, name: &str) -> Result<Backend, String> {
        let agent = AgentOptions {
            mbus: "https://mbus:mbus-password@0.0.0.0:6868".to_owned(),
            ntp: vec![],
        };
        match kind {
            "docker" => {
                // A state directory of its own, removed afterwards. A real
                // installation keeps the default (/var/lib/bosh-container-cpi/docker).
                let state_dir = std::env::temp_dir()
                    .join("bosh-container-cpi-example")
                    .join(name);
                let config = DockerConfig {
                    host: std::env::var("DOCKER_HOST")
                        .ok()
                        .filter(|h| h.starts_with("unix://"))
                        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_owned()),
                    state_dir: state_dir.clone(),
                    stop_timeout_seconds: 2,
                    ..DockerConfig::default()
                };
                println!(
                    "backend: docker at {} (state directory {})",
                    config.host,
                    state_dir.display()
                );
                let cpi = DockerCpi::new(config, agent)
                    .map_err(|e| format!("the config was refused: {e}"))?;
                Ok(Backend::Docker {
                    cpi,
                    network: format!("cpi-{name}"),
                    state_dir,
                })
            }
            "containerd" => {
                // A namespace and state directory of its own, removed afterwards. A
                // real installation keeps the defaults (`bosh`,
                // /var/lib/bosh-container-cpi/containerd).
                let namespace = format!("cpi-{name}");
                let state_dir = PathBuf::from("/var/lib/bosh-container-cpi-example").join(name);
                // A /24 for this run's dynamic network, out of 10.236.0.0/16.
                let subnet = format!("10.236.{}.0/24", uuid::Uuid::new_v4().as_bytes()[0]);
                let config = ContainerdConfig {
                    socket: std::env::var_os("CONTAINERD_ADDRESS")
                        .map(PathBuf::from)
                        .unwrap_or_else(|| PathBuf::from("/run/containerd/containerd.sock")),
                    namespace: namespace.clone(),
                    state_dir: state_dir.clone(),
                    stop_grace_seconds: 2,
                    ..ContainerdConfig::default()
                };
                let socket = config.socket.clone();
                println!(
                    "backend: containerd at {} (namespace {namespace}, state directory {}, dynamic subnet {subnet})",
                    socket.display(),
                    state_dir.display()
                );
                let cpi = ContainerdCpi::new(config, agent)
                    .map_err(|e| format!("the config was refused: {e}"))?;
                Ok(Backend::Containerd {
                    cpi,
                    socket,
                    namespace,
                    state_dir,
                    subnet,
                })
            }
            other => Err(format!(
                "unknown backend {other:?}: the first argument is docker or containerd"
            )),
        }
    }

    /// The backend behind the trait, as a director-facing program would hold it.
    fn cpi(&self) -> &dyn Cpi {
        match self {
            Backend::Docker { cpi, .. } => cpi,
            Backend::Containerd { cpi, .. } => cpi,
        }
    }

    /// The VM's one network: dynamic, on the run's Docker network or /24.
    fn networks(&self) -> Value {
        let cloud_properties = match self {
            Backend::Docker { network, .. } => json!({"name": network}),
            Backend::Containerd { subnet, .. } => json!({"subnet": subnet}),
        };
        json!({"default": {"type": "dynamic", "default": ["dns", "gateway"],
                           "cloud_properties": cloud_properties}})
    }

    /// Removes what the backend keeps on purpose (it may serve other VMs) but this run
    /// made for itself; returns what could not be removed.
    async fn remove_leftovers(&self) -> Vec<String> {
        let mut errors = Vec::new();
        match self {
            Backend::Docker {
                cpi,
                network,
                state_dir,
            } => {
                // The run's Docker network; one that is not there is fine.
                match cpi.client().await {
                    Ok(client) => match client.docker.remove_network(network).await {
                        Ok(()) => println!("removed Docker network {network}"),
                        Err(bollard::errors::Error::DockerResponseServerError {
                            status_code: 404,
                            ..
                        }) => {}
                        Err(e) => errors.push(format!("removing Docker network {network}: {e}")),
                    },
                    Err(e) => errors.push(e.to_string()),
                }
                // The backend made the state directory a shared bind mount of itself
                // (local attach mode): undo that.
                for _ in mounts_under(state_dir)
                    .iter()
                    .filter(|m| m.as_path() == state_dir)
                {
                    let _ = std::process::Command::new("umount").arg(state_dir).status();
                }
                remove_state_dir(state_dir, &mut errors);
            }
            Backend::Containerd {
                socket,
                namespace,
                state_dir,
                subnet,
                ..
            } => {
                let address = socket.display().to_string();
                match std::process::Command::new("ctr")
                    .args(["--address", &address, "namespaces", "remove", namespace])
                    .output()
                {
                    Ok(out) if out.status.success() => {}
                    Ok(out) => errors.push(format!(
                        "containerd namespace {namespace} not removed (is something left in it?): {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )),
                    Err(e) => {
                        errors.push(format!("running ctr to remove namespace {namespace}: {e}"))
                    }
                }
                remove_state_dir(state_dir, &mut errors);
                // The backend keeps a subnet's bridge for the next VM on that subnet.
                let bridge = cpi_tests::daemons::cpi_bridge_name(subnet);
                // `delete_vm` leaves a VM's interfaces to the kernel, which destroys
                // them shortly after the namespace goes: give it a few seconds.
                let ports = cpi_tests::daemons::bridge_ports_after(
                    &bridge,
                    cpi_tests::daemons::BRIDGE_DRAIN_WAIT,
                );
                if !ports.is_empty() {
                    errors.push(format!("bridge {bridge} still has interfaces: {ports:?}"));
                } else if Path::new("/sys/class/net").join(&bridge).exists() {
                    let _ = std::process::Command::new("ip")
                        .args(["link", "delete", &bridge])
                        .status();
                }
            }
        }
        errors
    }
}

/// Mount points at or below `dir`.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    cpi_core::mountinfo::parse_mountinfo(&text)
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// Removes the run's state directory once nothing is mounted below it.
fn remove_state_dir(state_dir: &Path, errors: &mut Vec<String>) {
    let left = mounts_under(state_dir);
    if !left.is_empty() {
        errors.push(format!(
            "mounts left under {}: {left:?}",
            state_dir.display()
        ));
        return;
    }
    if let Err(e) = std::fs::remove_dir_all(state_dir) {
        errors.push(format!("removing {}: {e}", state_dir.display()));
    }
    if let Some(parent) = state_dir.parent() {
        // Only removed when empty: other runs may be using it.
        let _ = std::fs::remove_dir(parent);
    }
}

fn main() -> ExitCode {
    // One thread is plenty: the calls run one after another, as the director's do.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("FAILED: cannot start a tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run())
}

async fn run() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let kind = args
        .next()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stemcell_dir = args.next().map(PathBuf::from);
    let name = format!("example-{}", uuid::Uuid::new_v4().simple());
    let backend = match Backend::new(&kind, &name) {
        Ok(backend) => backend,
        Err(e) => {
            eprintln!("FAILED: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cpi = backend.cpi();
    // What the director would send as `context`; the director uuid becomes a label
    // on everything the backend creates.
    let ctx = CallContext {
        director_uuid: Some(name.clone()),
        request_id: Some("library-example".to_owned()),
        api_version: 2,
        ..CallContext::default()
    };
    println!("stemcell formats: {:?}", cpi.stemcell_formats());

    let scratch = std::env::temp_dir().join(format!("{name}-stemcell"));
    let image_path = match stemcell_dir {
        Some(dir) => dir.join("image"),
        None => {
            println!("building a test stemcell in {}", scratch.display());
            cpi_tests::stemcell::TestStemcell::builder()
                .build_unpacked(&scratch)
                .image_path
        }
    };

    let mut made = Made::default();
    let outcome = lifecycle(cpi, &ctx, &image_path, &backend.networks(), &mut made).await;
    if let Err(e) = &outcome {
        eprintln!("FAILED: {e}");
    }
    let mut cleanup_errors = cleanup(cpi, &ctx, &mut made).await;
    cleanup_errors.extend(backend.remove_leftovers().await);
    let _ = std::fs::remove_dir_all(&scratch);
    for e in &cleanup_errors {
        eprintln!("cleanup FAILED: {e}");
    }

    if outcome.is_ok() && cleanup_errors.is_empty() {
        println!("lifecycle complete: everything created was deleted");
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The calls a director makes for one VM with a persistent disk, in order.
async fn lifecycle(
    cpi: &dyn Cpi,
    ctx: &CallContext,
    image_path: &Path,
    networks: &Value,
    made: &mut Made,
) -> Result<(), String> {
    println!("create_stemcell {}", image_path.display());
    let stemcell = cpi
        .create_stemcell(
            ctx,
            CreateStemcell {
                image_path: image_path.to_path_buf(),
                cloud_properties: serde_json::Map::new(),
            },
        )
        .await
        .map_err(|e| format!("create_stemcell: {e}"))?;
    println!("  -> {stemcell}");
    made.stemcell = Some(stemcell.clone());

    // One dynamic network: the backend reports the address it got.
    let networks = Networks::parse(networks).map_err(|e| format!("networks: {e}"))?;
    let cloud_properties = VmCloudProperties::parse(&json!({"cpu": 1, "ram": 256}))
        .map_err(|e| format!("cloud properties: {e}"))?;
    let agent_id = AgentId::new(format!("agent-{}", uuid::Uuid::new_v4()))
        .map_err(|e| format!("agent id: {e}"))?;
    println!("create_vm (agent {agent_id}, cpu 1, ram 256 MiB, one dynamic network)");
    let created = cpi
        .create_vm(
            ctx,
            CreateVm {
                agent_id,
                stemcell,
                cloud_properties,
                networks,
                disk_cids: vec![],
                env: json!({"bosh": {"group": "library-example"}}),
            },
        )
        .await
        .map_err(|e| format!("create_vm: {e}"))?;
    let vm = created.cid;
    println!("  -> {vm}, networks {}", created.networks.to_wire());
    made.vm = Some(vm.clone());

    let exists = cpi
        .has_vm(ctx, &vm)
        .await
        .map_err(|e| format!("has_vm: {e}"))?;
    println!("has_vm {vm} -> {exists}");
    if !exists {
        return Err(format!("has_vm says the new VM {vm} does not exist"));
    }

    println!("create_disk 1024 MiB");
    let disk = cpi
        .create_disk(
            ctx,
            CreateDisk {
                size_mib: 1024,
                cloud_properties: serde_json::Map::new(),
                vm: Some(vm.clone()),
            },
        )
        .await
        .map_err(|e| format!("create_disk: {e}"))?;
    println!("  -> {disk}");
    made.disk = Some(disk.clone());

    let hint = cpi
        .attach_disk(ctx, &vm, &disk)
        .await
        .map_err(|e| format!("attach_disk: {e}"))?;
    println!("attach_disk {vm} {disk} -> the VM sees it at {}", hint.0);
    let attached = cpi
        .get_disks(ctx, &vm)
        .await
        .map_err(|e| format!("get_disks: {e}"))?;
    let listed: Vec<&str> = attached.iter().map(DiskCid::as_str).collect();
    println!("get_disks {vm} -> [{}]", listed.join(", "));
    if !attached.contains(&disk) {
        return Err(format!("get_disks does not list the attached disk {disk}"));
    }

    cpi.detach_disk(ctx, &vm, &disk)
        .await
        .map_err(|e| format!("detach_disk: {e}"))?;
    println!("detach_disk {vm} {disk}");

    cpi.delete_disk(ctx, &disk)
        .await
        .map_err(|e| format!("delete_disk: {e}"))?;
    println!("delete_disk {disk}");
    made.disk = None;

    cpi.delete_vm(ctx, &vm)
        .await
        .map_err(|e| format!("delete_vm: {e}"))?;
    let exists = cpi
        .has_vm(ctx, &vm)
        .await
        .map_err(|e| format!("has_vm: {e}"))?;
    println!("delete_vm {vm}; has_vm -> {exists}");
    made.vm = None;
    if exists {
        return Err(format!("has_vm still finds {vm} after delete_vm"));
    }

    if let Some(stemcell) = made.stemcell.take() {
        cpi.delete_stemcell(ctx, &stemcell)
            .await
            .map_err(|e| format!("delete_stemcell: {e}"))?;
        println!("delete_stemcell {stemcell}");
    }
    Ok(())
}

/// Deletes whatever a failed lifecycle left (deletes are idempotent), and returns
/// what could not be deleted.
async fn cleanup(cpi: &dyn Cpi, ctx: &CallContext, made: &mut Made) -> Vec<String> {
    let mut errors = Vec::new();
    if let Some(vm) = made.vm.take() {
        println!("cleanup: delete_vm {vm}");
        if let Err(e) = cpi.delete_vm(ctx, &vm).await {
            errors.push(format!("delete_vm {vm}: {e}"));
        }
    }
    if let Some(disk) = made.disk.take() {
        println!("cleanup: delete_disk {disk}");
        if let Err(e) = cpi.delete_disk(ctx, &disk).await {
            errors.push(format!("delete_disk {disk}: {e}"));
        }
    }
    if let Some(stemcell) = made.stemcell.take() {
        println!("cleanup: delete_stemcell {stemcell}");
        if let Err(e) = cpi.delete_stemcell(ctx, &stemcell).await {
            errors.push(format!("delete_stemcell {stemcell}: {e}"));
        }
    }
    errors
}
