//! The Docker backend's configuration: the `docker` section of our config file, or
//! the Go Docker CPI's `cpi.json` translated by the binary.

use std::path::PathBuf;

use serde::Deserialize;

/// The `docker` section of the config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DockerConfig {
    /// `unix:///var/run/docker.sock` or `tcp://host:port` (TLS required for tcp).
    pub host: String,
    /// The Docker API version to start negotiating from; `None` negotiates freely.
    /// The Go CPI's value (`"1.44"`) is accepted and treated as a preference only.
    pub api_version: Option<String>,
    /// Mutual TLS material (PEM text) for tcp hosts.
    pub tls: Option<TlsConfig>,
    /// Seconds to wait for one daemon request.
    pub timeout_seconds: u64,
    /// Per-VM host directories (the live-attach mount points) live here, on the
    /// daemon's host.
    pub state_dir: PathBuf,
    /// `Some(true)`/`Some(false)` forces systemd/runit for every VM; `None` picks by
    /// stemcell (Ubuntu Noble and later run systemd).
    pub start_containers_with_systemd: Option<bool>,
    /// Bind the host's `/sys/fs/cgroup` into systemd VMs (cgroup v2 hosts need it).
    pub mount_cgroupfs: bool,
    /// Bind lxcfs's `/proc/meminfo` into VMs.
    pub enable_lxcfs_support: bool,
    /// Light stemcell handling.
    pub light_stemcell: LightStemcellConfig,
    /// How persistent disks are mounted into running VMs: `local` (this process
    /// shares the daemon's mount namespace and mounts directly), `helper` (a
    /// short-lived helper container does the mount on the daemon's host) or `auto`
    /// (local when the daemon is reached over a unix socket and runs in our mount
    /// namespace, helper otherwise).
    pub attach_mode: AttachMode,
    /// `Some(true)` always runs VMs with Docker's `Privileged`; `Some(false)` never does
    /// (VMs get every capability of the runtime's bounding set instead); `None` (auto)
    /// uses `Privileged` only where the runtime holds every capability. See
    /// docs/backend-docker.md, "Capabilities".
    pub privileged: Option<bool>,
    /// Seconds `delete_vm` and `reboot_vm` let a VM's init stop before it is killed.
    pub stop_timeout_seconds: u64,
    /// Create a missing Docker network for a manual network (named by
    /// `cloud_properties.name`, or after its subnet) instead of answering
    /// `NetworkNotFound`.
    pub create_networks: bool,
    /// The Docker network of dynamic networks that name none.
    pub default_network: String,
    /// The image of helper containers (attach mode `helper`, capability probes).
    /// `None` uses the VM's own stemcell image.
    pub helper_image: Option<String>,
    /// Bind the host's `/lib/modules` read-only at `/usr/lib/modules` in every VM.
    pub mount_host_modules: bool,
}

/// `attach_mode`: how disks reach running VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Local when possible, helper otherwise.
    #[default]
    Auto,
    /// Mount directly: the CPI runs as root in the daemon's mount namespace.
    Local,
    /// Mount through a short-lived helper container (remote daemons).
    Helper,
}

/// Mutual TLS material, PEM text.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA certificate.
    pub ca: String,
    /// Client certificate.
    pub certificate: String,
    /// Client private key. Secret.
    pub private_key: String,
}

/// `light_stemcell` settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LightStemcellConfig {
    /// Demand a digest in the manifest and refuse a mismatch (default true).
    pub require_image_verification: bool,
    /// Refuse light stemcells altogether.
    pub disabled: bool,
    /// Registry credentials by registry host (`127.0.0.1:5000`, `ghcr.io`).
    pub registry_auth: std::collections::BTreeMap<String, RegistryAuth>,
}

/// Credentials for one registry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryAuth {
    /// User name.
    pub username: String,
    /// Password or token. Secret.
    pub password: String,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            host: "unix:///var/run/docker.sock".into(),
            api_version: None,
            tls: None,
            timeout_seconds: 120,
            state_dir: PathBuf::from("/var/lib/bosh-container-cpi/docker"),
            start_containers_with_systemd: None,
            mount_cgroupfs: true,
            enable_lxcfs_support: false,
            light_stemcell: LightStemcellConfig::default(),
            attach_mode: AttachMode::Auto,
            privileged: None,
            stop_timeout_seconds: 10,
            create_networks: true,
            default_network: "bridge".into(),
            helper_image: None,
            mount_host_modules: true,
        }
    }
}

impl Default for LightStemcellConfig {
    fn default() -> Self {
        LightStemcellConfig {
            require_image_verification: true,
            disabled: false,
            registry_auth: Default::default(),
        }
    }
}
