//! VM networking: one network namespace per VM (made in-process, as `ip netns add`
//! would), one interface per BOSH network on a bridge per BOSH subnet
//! (`bcpi<hash>`, the host holding the gateway address).
//!
//! - Manual IPv4 networks: the CPI makes the interface itself over netlink
//!   ([`link`]), what the CNI `bridge` plugin with `static` IPAM would do, without
//!   its two plugin processes.
//! - Manual IPv6 networks: the CNI `bridge` plugin with `static` IPAM (Debian's
//!   `containernetworking-plugins`), which also waits out duplicate address
//!   detection.
//! - Dynamic networks: the CNI `bridge` plugin with `host-local` IPAM allocating
//!   from the network's `subnet` cloud property (or `containerd.dynamic_subnet`);
//!   the assigned address is reported back to the director.
//! - The host's FORWARD and outbound-NAT rules are per bridge, made once
//!   ([`rules`]); the default gateway's list ends with `portmap` when the VM
//!   publishes `ports`.
//!
//! A CNI plugin's ADD is recorded in the VM directory *before* it runs, so that its
//! DEL can be replayed after a crash halfway ([`teardown`] is idempotent); an
//! interface made over netlink goes with the VM's namespace and needs no such step.

pub mod cni;
pub mod link;
pub mod nft;
pub mod raw;
pub mod rules;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use cpi_core::{Network, NetworkType, Networks};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::error::{ContainerdError, Result};

/// One CNI attachment of a VM: an interface and the plugin list that made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attachment {
    /// The BOSH network it serves; `None` for the loopback interface.
    pub network: Option<String>,
    /// The interface in the VM (`lo`, `eth0`, ...).
    pub ifname: String,
    /// The CNI network configuration list: the whole chain, or for a [`link`]
    /// interface the plugins chained after it (`portmap`), often none.
    #[serde(default)]
    pub conflist: Value,
    /// Runtime configuration for plugins' capabilities (`portMappings`).
    #[serde(default)]
    pub runtime_config: Map<String, Value>,
    /// Whether ADD was started (recorded before it runs): only those get a DEL.
    #[serde(default)]
    pub attempted: bool,
    /// The ADD result, once ADD succeeded. Not recorded for a
    /// [netlink-only](Attachment::is_netlink_only) attachment, whose result follows
    /// from its [`native`](Attachment::native) plan.
    #[serde(default)]
    pub result: Option<Value>,
    /// The host rules its bridge needs (none for loopback, and none in records
    /// written when per-VM plugins made them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge_rules: Option<rules::BridgeRules>,
    /// The interface the CPI makes over netlink, before the `conflist` runs; `None`
    /// when a CNI plugin makes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub native: Option<link::NativeLink>,
}

impl Attachment {
    /// An interface the CPI makes over netlink with no CNI plugin chained after it:
    /// nothing of it outlives the VM's network namespace, so undoing it needs no
    /// record of its progress.
    pub fn is_netlink_only(&self) -> bool {
        self.native.is_some() && cni::plugins(&self.conflist).is_empty()
    }
}

/// Everything needed to undo a VM's networking, stored as `network.json` in its
/// directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkState {
    /// The network namespace's name (`ip netns`), the VM cid.
    pub netns: String,
    /// The attachments, in the order they are added.
    pub attachments: Vec<Attachment>,
}

/// Where network plugins keep their state, below the CPI's state dir.
pub fn host_local_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("cni").join("host-local")
}

/// The bridge of a subnet: `bcpi` and 10 hex digits of its hash (15 characters at
/// most, the kernel's limit for interface names).
pub fn bridge_name(subnet: &IpNet) -> String {
    let hash = Sha256::digest(subnet.trunc().to_string().as_bytes());
    let hex: String = hash.iter().take(5).map(|b| format!("{b:02x}")).collect();
    format!("bcpi{hex}")
}

/// A published port: host port, container port, protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMapping {
    /// Port on the host.
    pub host_port: u16,
    /// Port in the VM.
    pub container_port: u16,
    /// `tcp` or `udp`.
    pub protocol: &'static str,
}

/// Parses a `ports` cloud property entry: `6868`, `6868/tcp`, `8443:443/tcp`.
pub fn parse_port(spec: &str) -> Result<PortMapping> {
    let bad = || {
        ContainerdError::BadArgument(format!(
            "VM cloud_properties.ports entry {spec:?} is not of the form PORT[/tcp|udp] or \
             HOSTPORT:PORT[/tcp|udp]"
        ))
    };
    let (ports, protocol) = match spec.split_once('/') {
        None => (spec, "tcp"),
        Some((p, "tcp")) => (p, "tcp"),
        Some((p, "udp")) => (p, "udp"),
        Some(_) => return Err(bad()),
    };
    let port = |s: &str| s.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad);
    let (host_port, container_port) = match ports.split_once(':') {
        None => (port(ports)?, port(ports)?),
        Some((h, c)) => (port(h)?, port(c)?),
    };
    Ok(PortMapping {
        host_port,
        container_port,
        protocol,
    })
}

fn default_route(addr: &IpNet, gateway: IpAddr) -> Value {
    let dst = if addr.addr().is_ipv4() {
        "0.0.0.0/0"
    } else {
        "::/0"
    };
    json!({"dst": dst, "gw": gateway.to_string()})
}

/// The subnet a dynamic network allocates from.
fn dynamic_subnet(net: &Network, fallback: IpNet) -> Result<IpNet> {
    match net.cloud_property_str("subnet") {
        None => Ok(fallback),
        Some(s) => s.parse::<IpNet>().map(|n| n.trunc()).map_err(|_| {
            ContainerdError::BadArgument(format!(
                "network '{}': cloud_properties.subnet {s:?} is not a CIDR such as 10.252.0.0/24",
                net.name
            ))
        }),
    }
}

/// The first usable address of a subnet: the gateway host-local hands out.
fn first_host(subnet: &IpNet) -> Option<IpAddr> {
    subnet.hosts().next()
}

/// Plans a VM's attachments: one interface per non-vip network in name order
/// (`eth0`, `eth1`, ...). Pure: nothing runs.
pub fn plan(
    vm_cid: &str,
    networks: &Networks,
    ports: &[String],
    state_dir: &Path,
    fallback_dynamic: IpNet,
) -> Result<NetworkState> {
    // `lo` is brought up when the namespace is made (`add_netns`), not by the CNI
    // `loopback` plugin: records of VMs made before that still list a loopback
    // attachment, and their DEL still runs it.
    let mut attachments = Vec::new();
    let mappings = ports
        .iter()
        .map(|p| parse_port(p))
        .collect::<Result<Vec<_>>>()?;
    let default_gw = networks.default_gateway().map(|n| n.name.clone());
    let mut index = 0;
    for net in networks.iter() {
        if net.kind == NetworkType::Vip {
            tracing::info!(network = %net.name, "vip network: no interface is created for it");
            continue;
        }
        let is_default = default_gw.as_deref() == Some(net.name.as_str());
        let (subnet, ipam, has_gateway, native) = match net.kind {
            NetworkType::Manual => {
                let addr = net.address.ok_or_else(|| {
                    ContainerdError::BadArgument(format!("manual network '{}' has no ip", net.name))
                })?;
                let mut routes: Vec<Value> = net
                    .routes
                    .iter()
                    .map(|r| json!({"dst": r.destination.to_string(), "gw": r.gateway.to_string()}))
                    .collect();
                let mut address = json!({"address": addr.to_string()});
                if let Some(gw) = net.gateway {
                    address["gateway"] = json!(gw.to_string());
                    if is_default {
                        routes.push(default_route(&addr, gw));
                    }
                }
                let ifname = format!("eth{index}");
                let native = native_link(vm_cid, &ifname, &addr, net, is_default);
                (
                    addr.trunc(),
                    json!({"type": "static", "addresses": [address], "routes": routes}),
                    net.gateway.is_some(),
                    native,
                )
            }
            NetworkType::Dynamic => {
                let subnet = dynamic_subnet(net, fallback_dynamic)?;
                let gateway = first_host(&subnet).ok_or_else(|| {
                    ContainerdError::BadArgument(format!(
                        "network '{}': subnet {subnet} has no room for a gateway and VMs",
                        net.name
                    ))
                })?;
                let mut routes: Vec<Value> = net
                    .routes
                    .iter()
                    .map(|r| json!({"dst": r.destination.to_string(), "gw": r.gateway.to_string()}))
                    .collect();
                if is_default {
                    routes.push(default_route(&subnet, gateway));
                }
                (
                    subnet,
                    json!({"type": "host-local",
                           "ranges": [[{"subnet": subnet.to_string(), "gateway": gateway.to_string()}]],
                           "routes": routes,
                           "dataDir": host_local_dir(state_dir).display().to_string()}),
                    true,
                    None,
                )
            }
            NetworkType::Vip => continue,
        };
        let bridge = bridge_name(&subnet);
        // No `ipMasq` and no `firewall` plugin: their per-VM rules are the bridge's
        // (`rules`), made once.
        let mut bridge_plugin = json!({"type": "bridge", "bridge": bridge, "isGateway": has_gateway,
               "ipMasq": false, "hairpinMode": true, "ipam": ipam});
        if net.kind == NetworkType::Dynamic {
            // Lets a later ADD ask host-local for the address the VM had
            // (restoring a VM after a host reboot).
            bridge_plugin["capabilities"] = json!({"ips": true});
        }
        let mut plugins = Vec::new();
        if native.is_none() {
            plugins.push(bridge_plugin);
        }
        let mut runtime_config = Map::new();
        if is_default && !mappings.is_empty() {
            plugins.push(json!({"type": "portmap", "snat": true,
                                "capabilities": {"portMappings": true}}));
            runtime_config.insert(
                "portMappings".into(),
                Value::Array(
                    mappings
                        .iter()
                        .map(|m| {
                            json!({"hostPort": m.host_port, "containerPort": m.container_port,
                                        "protocol": m.protocol})
                        })
                        .collect(),
                ),
            );
        }
        attachments.push(Attachment {
            network: Some(net.name.clone()),
            ifname: format!("eth{index}"),
            conflist: json!({"cniVersion": cni::CNI_VERSION, "name": format!("bcpi-{}", &bridge[4..]),
                             "plugins": plugins}),
            runtime_config,
            attempted: false,
            result: None,
            bridge_rules: Some(rules::BridgeRules {
                bridge,
                subnet,
                masquerade: has_gateway,
            }),
            native,
        });
        index += 1;
    }
    Ok(NetworkState {
        netns: vm_cid.to_owned(),
        attachments,
    })
}

/// The interface the CPI makes itself for a manual network, when it can: IPv4
/// addresses, gateway and routes. `None` leaves it to the CNI `bridge` plugin.
fn native_link(
    vm_cid: &str,
    ifname: &str,
    addr: &IpNet,
    net: &Network,
    is_default: bool,
) -> Option<link::NativeLink> {
    let v4 = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    };
    let IpNet::V4(address) = *addr else {
        return None;
    };
    let gateway = match net.gateway {
        Some(gw) => Some(v4(gw)?),
        None => None,
    };
    let mut routes = net
        .routes
        .iter()
        .map(|r| match r.destination {
            IpNet::V4(dst) => Some(link::NativeRoute {
                dst: dst.trunc(),
                gw: v4(r.gateway)?,
            }),
            IpNet::V6(_) => None,
        })
        .collect::<Option<Vec<_>>>()?;
    if let (true, Some(gw)) = (is_default, gateway) {
        routes.push(link::NativeRoute {
            dst: ipnet::Ipv4Net::default(),
            gw,
        });
    }
    Some(link::NativeLink {
        bridge: bridge_name(&addr.trunc()),
        host_ifname: link::host_ifname(vm_cid, ifname),
        address,
        gateway,
        routes,
    })
}

/// Records the addresses CNI assigned to dynamic networks in `networks`.
pub fn record_assigned(state: &NetworkState, networks: &mut Networks) {
    let by_name: BTreeMap<&str, &Attachment> = state
        .attachments
        .iter()
        .filter_map(|a| a.network.as_deref().map(|n| (n, a)))
        .collect();
    for net in networks.iter_mut() {
        if net.kind != NetworkType::Dynamic {
            continue;
        }
        let ip = by_name
            .get(net.name.as_str())
            .and_then(|a| a.result.as_ref())
            .and_then(|r| cni::result_ips(r).into_iter().next());
        if let Some(ip) = ip {
            net.set_assigned(ip.address, ip.gateway);
        }
    }
}

/// Where manual addresses are reserved: one file per address in use, named by the
/// address and holding the VM's cid. Static IPAM checks nothing, so this is what
/// refuses a second VM with an address already in use.
pub fn reservations_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("cni").join("reservations")
}

/// Reserves the manual addresses of `networks` for `vm_cid` (atomically, across
/// processes). An address held by a VM whose directory is gone is taken over. On
/// failure nothing stays reserved for `vm_cid`.
pub fn reserve_addresses(state_dir: &Path, vm_cid: &str, networks: &Networks) -> Result<()> {
    let dir = reservations_dir(state_dir);
    crate::fsutil::create_dirs(&dir, true)?;
    let addresses = manual_addresses(networks);
    for ip in &addresses {
        if let Err(e) = reserve_one(state_dir, &dir, vm_cid, *ip) {
            release_addresses(state_dir, vm_cid, Some(&addresses));
            return Err(e);
        }
    }
    Ok(())
}

fn reserve_one(state_dir: &Path, dir: &Path, vm_cid: &str, ip: IpAddr) -> Result<()> {
    use std::io::Write;
    let path = dir.join(ip.to_string());
    for _ in 0..2 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                return f
                    .write_all(vm_cid.as_bytes())
                    .map_err(|e| ContainerdError::io("writing", &path, e));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let owner = std::fs::read_to_string(&path).unwrap_or_default();
                let owner = owner.trim();
                let alive = !owner.is_empty()
                    && crate::vm::plausible_vm_cid(owner)
                    && state_dir.join("vms").join(owner).exists();
                if owner == vm_cid {
                    return Ok(());
                }
                if alive {
                    return Err(ContainerdError::Refused(format!(
                        "IP address {ip} is already in use by VM {owner}"
                    )));
                }
                tracing::info!(%ip, stale_owner = owner, "taking over the address of a VM that no longer exists");
                let _ = std::fs::remove_file(&path);
            }
            Err(e) => return Err(ContainerdError::io("reserving address", &path, e)),
        }
    }
    Err(ContainerdError::Refused(format!(
        "IP address {ip} is being reserved by another VM at the same time"
    )))
}

/// The addresses [`reserve_addresses`] reserves for `networks`: the manual
/// networks' (a VM's owner record lists them, see [`release_addresses`]).
pub fn manual_addresses(networks: &Networks) -> Vec<IpAddr> {
    networks
        .iter()
        .filter(|n| n.kind == NetworkType::Manual)
        .filter_map(|n| n.ip())
        .collect()
}

/// Releases every address reserved for `vm_cid`: those its owner record lists
/// (`recorded`), else, for a VM recorded before they were, whichever reservations
/// name it (every reservation is read).
pub fn release_addresses(
    state_dir: &Path,
    vm_cid: &str,
    recorded: Option<&[IpAddr]>,
) -> Vec<String> {
    let dir = reservations_dir(state_dir);
    let candidates: Vec<PathBuf> = match recorded {
        Some(addresses) => addresses
            .iter()
            .map(|ip| dir.join(ip.to_string()))
            .collect(),
        None => match std::fs::read_dir(&dir) {
            Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
            Err(_) => return Vec::new(),
        },
    };
    let mut failures = Vec::new();
    for path in candidates {
        if std::fs::read_to_string(&path)
            .map(|o| o.trim() == vm_cid)
            .unwrap_or(false)
        {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    failures.push(ContainerdError::io("removing", &path, e).to_string());
                }
            }
        }
    }
    failures
}

/// Creates the network namespace `name` at [`cni::netns_path`], as `ip netns add`
/// does but without a process: the namespace directory made a shared mount point,
/// an empty file, and a thread that unshares its network namespace and bind-mounts
/// it on that file (the namespace lives as long as the mount).
fn add_netns(name: &str) -> Result<()> {
    let path = cni::netns_path(name);
    let dir = path.parent().unwrap_or(Path::new("/var/run/netns"));
    crate::fsutil::create_dirs(dir, false)?;
    // The mount table names `/run/netns`, not `/var/run/netns` (a symlink): look
    // it up by its real path, or every call would stack another bind mount.
    let real = std::fs::canonicalize(dir).map_err(|e| ContainerdError::io("resolving", dir, e))?;
    crate::mount::ensure_shared_mount_point(&real)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| ContainerdError::io("creating", &path, e))?;
    let made = std::thread::scope(|s| {
        s.spawn(|| -> std::io::Result<()> {
            // rustix deprecates its safe `unshare` because CLONE_FILES would leave
            // this thread with a file table of its own; CLONE_NEWNET alone only
            // moves this short-lived thread to a new network namespace, and the
            // workspace forbids unsafe code.
            #[allow(deprecated)]
            rustix::thread::unshare(rustix::thread::UnshareFlags::NEWNET)?;
            link::loopback_up()?;
            rustix::mount::mount_bind("/proc/thread-self/ns/net", &path)?;
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")))
    });
    made.map_err(|e| {
        let _ = std::fs::remove_file(&path);
        ContainerdError::io("creating the network namespace", &path, e)
    })
}

/// Whether `path` is a network namespace (a bind mount of one: `nsfs`).
fn is_netns(path: &Path) -> bool {
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    // `f_type` is an i64 on x86_64 but narrower on 32-bit targets.
    #[allow(clippy::useless_conversion)]
    let is_nsfs = |s: rustix::fs::StatFs| i64::from(s.f_type) == NSFS_MAGIC;
    rustix::fs::statfs(path).is_ok_and(is_nsfs)
}

/// Removes the network namespace `name` as `ip netns delete` does: a lazy unmount
/// and the file. A namespace that is not there is success.
fn delete_netns(name: &str) -> Result<()> {
    let path = cni::netns_path(name);
    match rustix::mount::unmount(&path, rustix::mount::UnmountFlags::DETACH) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOENT => {}
        Err(e) => {
            return Err(ContainerdError::io(
                "unmounting the network namespace",
                &path,
                std::io::Error::from(e),
            ))
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ContainerdError::io("removing", &path, e)),
    }
}

/// Reads a VM's network state; `None` when there is none.
pub fn read_state(path: &Path) -> Result<Option<NetworkState>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            ContainerdError::Refused(format!(
                "{} is not valid network state: {e}",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ContainerdError::io("reading", path, e)),
    }
}

fn runtime_for(state: &NetworkState, a: &Attachment, bin_dir: &Path) -> cni::Runtime {
    cni::Runtime {
        container_id: state.netns.clone(),
        netns: cni::netns_path(&state.netns),
        ifname: a.ifname.clone(),
        bin_dir: bin_dir.to_path_buf(),
    }
}

/// Runs a blocking step of [`setup`] (file syncs, netlink, namespace threads) on the
/// runtime's blocking pool. `create_vm` runs `setup` beside containerd requests on
/// one thread; done inline, these steps kept those requests from going out until
/// the whole network was made.
async fn off_thread<T: Send + 'static>(
    what: &'static str,
    step: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(step)
        .await
        .map_err(|e| ContainerdError::Refused(format!("{what}: {e}")))?
}

/// Records the VM's network state (atomically and durably), off the runtime's thread.
/// The state is serialised before this returns its future, which borrows nothing.
fn record_state(
    path: &Path,
    state: &NetworkState,
) -> impl std::future::Future<Output = Result<()>> + Send + 'static {
    let bytes = serde_json::to_vec_pretty(state)
        .map_err(|e| ContainerdError::Refused(format!("serialising network state: {e}")));
    let path = path.to_path_buf();
    async move {
        let bytes = bytes?;
        off_thread("recording the network state", move || {
            crate::fsutil::write_atomic(&path, &bytes, 0o600)
        })
        .await
    }
}

/// Makes sure the host has its bridges' rules, creates the VM's network namespace
/// and adds every attachment; the state is in `state_path` when this returns. On
/// failure the caller runs [`teardown`].
///
/// What is written when: a CNI plugin's ADD is recorded as started before it runs
/// and its result after, since only the record lets its DEL (host-local's
/// allocation, portmap's rules) run after a crash. An interface the CPI makes itself
/// with no plugin chained after it ([`Attachment::is_netlink_only`]) needs no record
/// to be undone: it lives in the VM's namespace, which [`teardown`] finds by the VM's
/// name, and its result follows from the plan. Such attachments are recorded once,
/// as started, while the namespace and interfaces are made: one durable write per
/// VM instead of three.
pub async fn setup(
    state_dir: &Path,
    state_path: &Path,
    state: &mut NetworkState,
    bin_dir: &Path,
) -> Result<()> {
    for a in &mut state.attachments {
        if a.is_netlink_only() {
            a.attempted = true;
        }
    }
    let record = record_state(state_path, state);
    let bridges: Vec<&rules::BridgeRules> = state
        .attachments
        .iter()
        .filter_map(|a| a.bridge_rules.as_ref())
        .collect();
    let name = state.netns.clone();
    // The netlink-only interfaces are made with the namespace, on the same thread.
    let links: Vec<(String, link::NativeLink)> = state
        .attachments
        .iter()
        .filter(|a| a.is_netlink_only())
        .filter_map(|a| Some((a.ifname.clone(), a.native.clone()?)))
        .collect();
    let namespace = off_thread("creating the network namespace", move || {
        let netns = cni::netns_path(&name);
        if !is_netns(&netns) {
            // A file without a namespace on it: a create killed halfway.
            if netns.exists() {
                delete_netns(&name)?;
            }
            add_netns(&name)?;
        }
        for (ifname, native) in &links {
            add_link(&netns, ifname, native, &name)?;
        }
        Ok(())
    });
    // The record, the host rules and the namespace with its netlink-only interfaces
    // do not depend on each other. `join!`, not `try_join!`: a failure of one must
    // not cut the others short, whose result the caller's teardown then finds.
    let (recorded, ruled, made) =
        tokio::join!(record, rules::ensure(state_dir, &bridges), namespace);
    recorded?;
    ruled?;
    made?;
    for i in 0..state.attachments.len() {
        let netlink_only = state.attachments[i].is_netlink_only();
        if !netlink_only {
            state.attachments[i].attempted = true;
            record_state(state_path, state).await?;
        }
        let a = state.attachments[i].clone();
        let runtime = runtime_for(state, &a, bin_dir);
        let made = match &a.native {
            Some(native) => {
                if !netlink_only {
                    let (netns, ifname, link) =
                        (runtime.netns.clone(), a.ifname.clone(), native.clone());
                    let vm = state.netns.clone();
                    off_thread("making an interface", move || {
                        add_link(&netns, &ifname, &link, &vm)
                    })
                    .await?;
                }
                Some(native.result(&a.ifname, &runtime.netns))
            }
            None => None,
        };
        let result = cni::add_list(&runtime, &a.conflist, &a.runtime_config, made).await?;
        tracing::debug!(ifname = %a.ifname, ips = ?cni::result_ips(&result), "CNI ADD done");
        state.attachments[i].result = Some(result);
        if !netlink_only {
            record_state(state_path, state).await?;
        }
    }
    Ok(())
}

/// Makes interface `ifname` of VM `vm` over netlink in the namespace at `netns`.
fn add_link(netns: &Path, ifname: &str, native: &link::NativeLink, vm: &str) -> Result<()> {
    link::add(netns, ifname, native).map_err(|source| ContainerdError::Link {
        action: "making",
        ifname: ifname.to_owned(),
        vm: vm.to_owned(),
        source,
    })
}

/// Runs DEL for every attachment whose ADD was started, in reverse; returns the
/// failures. Works without the network namespace (IPAM and host rules are released).
///
/// With `namespace_goes_next` (the caller removes the namespace right after) the
/// interfaces the CPI made are left to the kernel, which destroys them with the
/// namespace, off the caller's path: removing a veth pair explicitly waits for the
/// kernel to quiesce the device (10–20 ms here), destroying the namespace does not.
pub async fn del_all(
    state: &NetworkState,
    bin_dir: &Path,
    namespace_goes_next: bool,
) -> Vec<String> {
    let mut failures = Vec::new();
    for a in state.attachments.iter().rev().filter(|a| a.attempted) {
        let runtime = runtime_for(state, a, bin_dir);
        failures.extend(
            cni::del_list(&runtime, &a.conflist, a.result.as_ref(), &a.runtime_config).await,
        );
        if let Some(native) = a.native.as_ref().filter(|_| !namespace_goes_next) {
            if let Err(source) = link::remove(native) {
                failures.push(
                    ContainerdError::Link {
                        action: "removing",
                        ifname: a.ifname.clone(),
                        vm: state.netns.clone(),
                        source,
                    }
                    .to_string(),
                );
            }
        }
    }
    failures
}

/// Prepares a recorded state for a fresh ADD that gives every interface the
/// addresses it had: dynamic networks ask host-local for them (`ips` runtime
/// config); manual ones have them in their static configuration anyway.
pub fn prepare_readd(state: &mut NetworkState) {
    for a in &mut state.attachments {
        let previous: Vec<Value> = a
            .result
            .as_ref()
            .map(cni::result_ips)
            .unwrap_or_default()
            .iter()
            .map(|ip| Value::String(ip.address.to_string()))
            .collect();
        let wants_ips = cni::plugins(&a.conflist)
            .iter()
            .any(|p| p.pointer("/capabilities/ips").and_then(Value::as_bool) == Some(true));
        if wants_ips && !previous.is_empty() {
            a.runtime_config
                .insert("ips".into(), Value::Array(previous));
        }
        a.attempted = false;
        a.result = None;
    }
}

/// A leftover outbound-NAT rule of the `bridge` plugin: `-A POSTROUTING -s SRC -m
/// comment --comment "name: \"NET\" id: \"CID\"" -j CHAIN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasqRule {
    /// The VM's address (`10.0.0.5/32`).
    pub source: String,
    /// The comment, unescaped: `name: "bcpi-…" id: "vm-…"`.
    pub comment: String,
    /// The per-attachment chain it jumps to (`CNI-…`).
    pub chain: String,
}

/// The bridge plugin's NAT rules of VM `cid` in `iptables -t nat -S POSTROUTING` output.
pub fn masquerade_rules(listing: &str, cid: &str) -> Vec<MasqRule> {
    let marker = format!("id: \\\"{cid}\\\"\"");
    listing
        .lines()
        .filter(|l| l.starts_with("-A POSTROUTING ") && l.contains(&marker))
        .filter_map(|l| {
            let source = l.split("-s ").nth(1)?.split(' ').next()?.to_owned();
            let quoted = l.split("--comment \"").nth(1)?;
            let end = quoted.rfind("\" -j ")?;
            let comment = quoted[..end].replace("\\\"", "\"");
            let chain = l.rsplit("-j ").next()?.trim().to_owned();
            chain.starts_with("CNI-").then_some(MasqRule {
                source,
                comment,
                chain,
            })
        })
        .collect()
}

/// Removes the outbound-NAT rules the `bridge` plugin made for `cid` and could not
/// remove itself (its DEL finds the addresses on the interface, which is gone with
/// the network namespace after a crash or a host reboot). Nothing to do is the
/// usual case.
async fn remove_masquerade(cid: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for tool in ["iptables", "ip6tables"] {
        let Some(bin) = rules::sbin(tool) else {
            continue;
        };
        let Ok(out) = tokio::process::Command::new(&bin)
            .args(["-w", "-t", "nat", "-S", "POSTROUTING"])
            .output()
            .await
        else {
            continue;
        };
        for rule in masquerade_rules(&String::from_utf8_lossy(&out.stdout), cid) {
            tracing::info!(vm_cid = %cid, chain = %rule.chain, "removing a NAT rule the bridge plugin left");
            let steps: [Vec<&str>; 3] = [
                vec![
                    "-w",
                    "-t",
                    "nat",
                    "-D",
                    "POSTROUTING",
                    "-s",
                    &rule.source,
                    "-m",
                    "comment",
                    "--comment",
                    &rule.comment,
                    "-j",
                    &rule.chain,
                ],
                vec!["-w", "-t", "nat", "-F", &rule.chain],
                vec!["-w", "-t", "nat", "-X", &rule.chain],
            ];
            for args in steps {
                match tokio::process::Command::new(&bin)
                    .args(&args)
                    .output()
                    .await
                {
                    Ok(o) if o.status.success() => {}
                    Ok(o) => failures.push(format!(
                        "{tool} {}: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&o.stderr).trim()
                    )),
                    Err(e) => failures.push(format!("{tool}: {e}")),
                }
            }
        }
    }
    failures
}

/// Runs DEL for every recorded attachment (in reverse) and removes the network
/// namespace, then the state file. Idempotent; returns the failures (the state file
/// is kept when there were any, so a later call can try again).
pub async fn teardown(state_path: &Path, vm_cid: &str, bin_dir: &Path) -> Vec<String> {
    let mut failures = Vec::new();
    let state = match read_state(state_path) {
        Ok(s) => s,
        Err(e) => {
            failures.push(e.to_string());
            None
        }
    };
    let netns = state.as_ref().map_or(vm_cid, |s| s.netns.as_str());
    let had_netns = cni::netns_path(netns).exists();
    if let Some(state) = &state {
        failures.extend(del_all(state, bin_dir, had_netns).await);
    }
    // The bridge plugin's DEL removes its NAT rules by the addresses it finds on the
    // interface in the namespace. Only without the namespace, the record, or a clean
    // DEL can rules be left: scanning for them costs two iptables runs (~5 ms). Only
    // VMs recorded before the rules became per bridge have such rules.
    let per_vm_rules = state.as_ref().is_none_or(|s| {
        s.attachments
            .iter()
            .any(|a| a.network.is_some() && a.bridge_rules.is_none())
    });
    if per_vm_rules && (!had_netns || state.is_none() || !failures.is_empty()) {
        failures.extend(remove_masquerade(vm_cid).await);
    }
    if cni::netns_path(netns).exists() {
        // Off the runtime's thread: the unmount takes ~0.5 ms, and `delete_vm` has
        // containerd requests in flight beside it.
        let name = netns.to_owned();
        if let Err(e) = off_thread("removing the network namespace", move || {
            delete_netns(&name)
        })
        .await
        {
            failures.push(e.to_string());
        }
    }
    if failures.is_empty() {
        if let Err(e) = std::fs::remove_file(state_path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                failures.push(ContainerdError::io("removing", state_path, e).to_string());
            }
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nets(v: Value) -> Networks {
        Networks::parse(&v).expect("networks")
    }

    /// The plan of VM `vm-1` with state dir `/state`.
    fn planned(n: &Networks, ports: &[&str]) -> NetworkState {
        let ports: Vec<String> = ports.iter().map(|p| (*p).to_owned()).collect();
        plan(
            "vm-1",
            n,
            &ports,
            Path::new("/state"),
            "10.252.0.0/16".parse().expect("net"),
        )
        .expect("plan")
    }

    #[test]
    fn manual_ipv4_network_is_made_in_process_with_its_routes() {
        let n = nets(
            json!({"default": {"type": "manual", "ip": "10.245.0.12", "netmask": "255.255.0.0",
            "gateway": "10.245.0.1", "dns": ["1.1.1.1"], "default": ["dns", "gateway"],
            "routes": [{"destination": "192.168.0.0", "netmask": "255.255.0.0", "gateway": "10.245.0.2"}]}}),
        );
        let state = planned(&n, &[]);
        assert_eq!(state.netns, "vm-1");
        // `lo` comes up with the namespace: no loopback plugin.
        assert_eq!(state.attachments.len(), 1);
        let eth0 = &state.attachments[0];
        assert_eq!(eth0.ifname, "eth0");
        assert_eq!(eth0.network.as_deref(), Some("default"));
        let br = bridge_name(&"10.245.0.0/16".parse().expect("net"));
        assert!(br.len() <= 15);
        assert_eq!(
            eth0.native,
            Some(link::NativeLink {
                bridge: br.clone(),
                host_ifname: link::host_ifname("vm-1", "eth0"),
                address: "10.245.0.12/16".parse().expect("net"),
                gateway: Some("10.245.0.1".parse().expect("ip")),
                routes: vec![
                    link::NativeRoute {
                        dst: "192.168.0.0/16".parse().expect("net"),
                        gw: "10.245.0.2".parse().expect("ip"),
                    },
                    link::NativeRoute {
                        dst: "0.0.0.0/0".parse().expect("net"),
                        gw: "10.245.0.1".parse().expect("ip"),
                    },
                ],
            })
        );
        // No plugin runs: no port is published.
        assert_eq!(eth0.conflist["plugins"], json!([]));
        assert!(eth0.is_netlink_only());
        // The host rules are the bridge's, not a per-VM plugin's.
        assert_eq!(
            eth0.bridge_rules,
            Some(rules::BridgeRules {
                bridge: br.clone(),
                subnet: "10.245.0.0/16".parse().expect("net"),
                masquerade: true,
            })
        );
        assert_eq!(eth0.conflist["cniVersion"], cni::CNI_VERSION);
        // The record reads back as written.
        let back: NetworkState =
            serde_json::from_slice(&serde_json::to_vec(&state).expect("json")).expect("parse");
        assert_eq!(back, state);
    }

    #[test]
    fn manual_ipv6_network_stays_with_the_bridge_plugin_and_static_ipam() {
        let n = nets(
            json!({"v6": {"type": "manual", "ip": "fd00:10::12", "netmask": "64",
            "gateway": "fd00:10::1", "default": ["gateway"]}}),
        );
        let state = planned(&n, &[]);
        let eth0 = &state.attachments[0];
        assert_eq!(eth0.native, None);
        let bridge = &eth0.conflist["plugins"][0];
        assert_eq!(bridge["type"], "bridge");
        assert_eq!(
            bridge["bridge"],
            json!(bridge_name(&"fd00:10::/64".parse().expect("net")))
        );
        assert_eq!(bridge["isGateway"], true);
        assert_eq!(bridge["ipMasq"], false);
        assert!(!eth0.is_netlink_only());
        assert_eq!(
            bridge["ipam"],
            json!({"type": "static",
                   "addresses": [{"address": "fd00:10::12/64", "gateway": "fd00:10::1"}],
                   "routes": [{"dst": "::/0", "gw": "fd00:10::1"}]})
        );
    }

    #[test]
    fn several_networks_become_several_interfaces_with_one_default_route() {
        let n = nets(json!({
            "a": {"type": "manual", "ip": "10.1.0.5", "netmask": "24", "gateway": "10.1.0.1"},
            "b": {"type": "manual", "ip": "10.2.0.5", "netmask": "24", "gateway": "10.2.0.1", "default": ["gateway"]},
            "v": {"type": "vip", "ip": "192.0.2.10"}}));
        let state = planned(&n, &["6868/tcp"]);
        let names: Vec<_> = state
            .attachments
            .iter()
            .map(|a| a.ifname.as_str())
            .collect();
        assert_eq!(names, vec!["eth0", "eth1"]);
        let native = |i: usize| state.attachments[i].native.clone().expect("native");
        assert_eq!(native(0).routes, vec![]);
        assert_eq!(
            native(1).routes,
            vec![link::NativeRoute {
                dst: "0.0.0.0/0".parse().expect("net"),
                gw: "10.2.0.1".parse().expect("ip"),
            }]
        );
        assert_ne!(native(0).bridge, native(1).bridge);
        assert_ne!(native(0).host_ifname, native(1).host_ifname);
        // Ports are published on the default gateway's interface only, by the
        // `portmap` plugin chained after the interface.
        assert_eq!(state.attachments[0].conflist["plugins"], json!([]));
        assert_eq!(
            state.attachments[1].conflist["plugins"]
                .as_array()
                .map(Vec::len),
            Some(1)
        );
        assert_eq!(
            state.attachments[1].conflist["plugins"][0]["type"],
            "portmap"
        );
        assert_eq!(
            state.attachments[1].runtime_config["portMappings"],
            json!([{"hostPort": 6868, "containerPort": 6868, "protocol": "tcp"}])
        );
        // Only the first needs no record of its progress: portmap's rules outlive
        // the namespace, so the second's ADD is recorded before it runs.
        assert!(state.attachments[0].is_netlink_only());
        assert!(!state.attachments[1].is_netlink_only());
    }

    #[test]
    fn records_written_before_native_interfaces_still_read() {
        // A VM made when the bridge plugin made every interface: no `native`.
        let old = json!({"netns": "vm-1", "attachments": [{
            "network": "default", "ifname": "eth0",
            "conflist": {"cniVersion": "1.0.0", "name": "bcpi-x",
                         "plugins": [{"type": "bridge", "bridge": "bcpix"}]},
            "attempted": true, "result": {"ips": [{"address": "10.0.0.5/24"}]}}]});
        let state: NetworkState = serde_json::from_value(old).expect("old record");
        assert_eq!(state.attachments[0].native, None);
        assert_eq!(cni::plugins(&state.attachments[0].conflist).len(), 1);
        assert!(!state.attachments[0].is_netlink_only());
    }

    #[test]
    fn dynamic_network_uses_host_local_in_the_state_dir() {
        let n =
            nets(json!({"d": {"type": "dynamic", "cloud_properties": {"subnet": "10.77.0.0/24"}}}));
        let state = planned(&n, &[]);
        let ipam = &state.attachments[0].conflist["plugins"][0]["ipam"];
        assert_eq!(ipam["type"], "host-local");
        assert_eq!(
            ipam["ranges"],
            json!([[{"subnet": "10.77.0.0/24", "gateway": "10.77.0.1"}]])
        );
        assert_eq!(ipam["dataDir"], "/state/cni/host-local");
        assert!(!state.attachments[0].is_netlink_only());
        assert_eq!(
            ipam["routes"],
            json!([{"dst": "0.0.0.0/0", "gw": "10.77.0.1"}])
        );

        let fallback = plan(
            "vm-1",
            &nets(json!({"d": {"type": "dynamic"}})),
            &[],
            Path::new("/s"),
            "10.252.0.0/16".parse().expect("net"),
        )
        .expect("plan");
        assert_eq!(
            fallback.attachments[0].conflist["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.252.0.0/16"
        );
        let bad = nets(json!({"d": {"type": "dynamic", "cloud_properties": {"subnet": "nope"}}}));
        assert!(plan(
            "vm-1",
            &bad,
            &[],
            Path::new("/s"),
            "10.252.0.0/16".parse().expect("net")
        )
        .is_err());
    }

    #[test]
    fn assigned_dynamic_addresses_are_reported_back() {
        let mut n = nets(json!({"d": {"type": "dynamic"}}));
        let mut state = planned(&n, &[]);
        state.attachments[0].result =
            Some(json!({"ips": [{"address": "10.252.0.9/16", "gateway": "10.252.0.1"}]}));
        record_assigned(&state, &mut n);
        let wire = n.to_wire();
        assert_eq!(wire["d"]["ip"], "10.252.0.9");
        assert_eq!(wire["d"]["netmask"], "255.255.0.0");
        assert_eq!(wire["d"]["gateway"], "10.252.0.1");
    }

    #[test]
    fn a_readd_asks_for_the_dynamic_address_it_had() {
        let n = nets(json!({"d": {"type": "dynamic"},
            "m": {"type": "manual", "ip": "10.1.0.5", "netmask": "24", "gateway": "10.1.0.1"}}));
        let mut state = planned(&n, &[]);
        assert_eq!(
            state.attachments[0].conflist["plugins"][0]["capabilities"],
            json!({"ips": true})
        );
        assert!(state.attachments[1].conflist["plugins"][0]
            .get("capabilities")
            .is_none());
        for a in &mut state.attachments {
            a.attempted = true;
        }
        state.attachments[0].result = Some(json!({"ips": [{"address": "10.252.0.9/16"}]}));
        state.attachments[1].result = Some(json!({"ips": [{"address": "10.1.0.5/24"}]}));
        prepare_readd(&mut state);
        assert_eq!(
            state.attachments[0].runtime_config["ips"],
            json!(["10.252.0.9/16"])
        );
        assert!(state.attachments[1].runtime_config.get("ips").is_none());
        assert!(state
            .attachments
            .iter()
            .all(|a| !a.attempted && a.result.is_none()));
        // The bridge plugin receives it as runtimeConfig, which it hands to host-local.
        let a = &state.attachments[0];
        let conf = cni::plugin_config(
            &a.conflist,
            &cni::plugins(&a.conflist)[0],
            None,
            &a.runtime_config,
        );
        assert_eq!(conf["runtimeConfig"]["ips"], json!(["10.252.0.9/16"]));
    }

    #[test]
    fn finds_the_nat_rules_a_vm_left() {
        let listing = r#"-P POSTROUTING ACCEPT
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A POSTROUTING -s 10.231.24.10/32 -m comment --comment "name: \"bcpi-18b16ac052\" id: \"vm-1\"" -j CNI-b017f669e93cc9f4746100cd
-A POSTROUTING -s 10.231.24.11/32 -m comment --comment "name: \"bcpi-18b16ac052\" id: \"vm-12\"" -j CNI-aaaa
"#;
        assert_eq!(
            masquerade_rules(listing, "vm-1"),
            vec![MasqRule {
                source: "10.231.24.10/32".into(),
                comment: r#"name: "bcpi-18b16ac052" id: "vm-1""#.into(),
                chain: "CNI-b017f669e93cc9f4746100cd".into(),
            }]
        );
        assert_eq!(masquerade_rules(listing, "vm-12").len(), 1);
        assert!(masquerade_rules(listing, "vm-2").is_empty());
    }

    #[test]
    fn ports() {
        assert_eq!(
            parse_port("6868/tcp").expect("p"),
            PortMapping {
                host_port: 6868,
                container_port: 6868,
                protocol: "tcp"
            }
        );
        assert_eq!(parse_port("53/udp").expect("p").protocol, "udp");
        assert_eq!(parse_port("8443:443").expect("p").host_port, 8443);
        for bad in ["", "x", "0", "70000", "1/sctp", "a:1"] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn manual_addresses_are_reserved_once() {
        let state = std::env::temp_dir().join(format!("reserve-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(state.join("vms/vm-a")).expect("mkdir");
        std::fs::create_dir_all(state.join("vms/vm-b")).expect("mkdir");
        let n = nets(
            json!({"a": {"type": "manual", "ip": "10.9.0.5", "netmask": "24"},
                            "d": {"type": "dynamic"}}),
        );
        reserve_addresses(&state, "vm-a", &n).expect("first");
        reserve_addresses(&state, "vm-a", &n).expect("same VM again");
        let err = reserve_addresses(&state, "vm-b", &n).expect_err("taken");
        assert!(err.to_string().contains("10.9.0.5"), "{err}");
        assert!(err.to_string().contains("vm-a"), "{err}");
        // A reservation whose VM directory is gone is stale and taken over.
        std::fs::remove_dir_all(state.join("vms/vm-a")).expect("rm");
        reserve_addresses(&state, "vm-b", &n).expect("take over");
        let recorded = manual_addresses(&n);
        assert_eq!(recorded, vec!["10.9.0.5".parse::<IpAddr>().expect("ip")]);
        // By the owner record's list, and by reading every reservation (a VM
        // recorded before the list was): neither removes another VM's.
        assert!(release_addresses(&state, "vm-a", Some(&recorded)).is_empty());
        assert!(release_addresses(&state, "vm-a", None).is_empty());
        assert!(reservations_dir(&state).join("10.9.0.5").exists());
        assert!(release_addresses(&state, "vm-b", Some(&recorded)).is_empty());
        assert!(!reservations_dir(&state).join("10.9.0.5").exists());
        reserve_addresses(&state, "vm-b", &n).expect("again");
        assert!(release_addresses(&state, "vm-b", None).is_empty());
        assert!(!reservations_dir(&state).join("10.9.0.5").exists());
        // The list names only what to look at: an address listed but reserved by
        // nobody is no failure.
        assert!(release_addresses(&state, "vm-b", Some(&recorded)).is_empty());
        std::fs::remove_dir_all(&state).expect("rm");
    }

    #[test]
    fn state_round_trips_through_json() {
        let n = nets(json!({"d": {"type": "dynamic"}}));
        let state = planned(&n, &[]);
        let text = serde_json::to_string(&state).expect("json");
        assert_eq!(
            serde_json::from_str::<NetworkState>(&text).expect("parse"),
            state
        );
    }

    /// Needs root (CAP_SYS_ADMIN), as the CPI does.
    #[test]
    fn network_namespaces_are_made_and_removed_in_process() {
        let name = format!("bcpi-unit-{}", std::process::id());
        let path = cni::netns_path(&name);
        add_netns(&name).expect("add_netns needs root (CAP_SYS_ADMIN), as the CPI does");
        assert!(is_netns(&path));
        // Its `lo` is up (IFF_UP in the flags sysfs shows inside it).
        let flags = std::process::Command::new("ip")
            .args(["netns", "exec", &name, "cat", "/sys/class/net/lo/flags"])
            .output()
            .expect("ip netns exec");
        let flags = String::from_utf8_lossy(&flags.stdout).trim().to_owned();
        let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).expect("lo's flags");
        assert_eq!(flags & 1, 1, "lo is up: flags {flags:#x}");
        // Our own namespace is not that one.
        let ours = std::fs::metadata("/proc/self/ns/net").expect("own netns");
        let made = std::fs::metadata(&path).expect("made netns");
        assert_ne!(
            std::os::unix::fs::MetadataExt::ino(&ours),
            std::os::unix::fs::MetadataExt::ino(&made)
        );
        assert!(
            add_netns(&name).is_err(),
            "a second add must not replace it"
        );
        delete_netns(&name).expect("delete_netns");
        assert!(!path.exists() && !is_netns(&path));
        delete_netns(&name).expect("deleting twice");
        // A plain file (a create killed halfway) is not a namespace.
        std::fs::write(&path, b"").expect("plain file");
        assert!(!is_netns(&path));
        delete_netns(&name).expect("removing the plain file");
        assert!(!path.exists());
    }
}
