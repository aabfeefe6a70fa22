//! The containerd backend's configuration: the `containerd` section of the config file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::Deserialize;

/// The `containerd` section of the config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContainerdConfig {
    /// containerd's gRPC socket.
    pub socket: PathBuf,
    /// The containerd namespace all our objects live in.
    pub namespace: String,
    /// `overlayfs` (default) or `native`.
    pub snapshotter: String,
    /// The runtime shim.
    pub runtime: String,
    /// Per-VM directories, disks and CNI state live here (on a filesystem where
    /// overlayfs works; never on top of overlay).
    pub state_dir: PathBuf,
    /// Where the CNI plugins are (Debian: `/usr/lib/cni`).
    pub cni_bin_dir: PathBuf,
    /// Seconds to wait for one daemon request.
    pub timeout_seconds: u64,
    /// `Some(true)`/`Some(false)` forces systemd/runit for every VM; `None` picks by
    /// stemcell (Ubuntu Noble and later run systemd).
    pub start_containers_with_systemd: Option<bool>,
    /// Demand a digest for light stemcells and refuse a mismatch (default true).
    pub require_image_verification: bool,
    /// Seconds to wait for long requests: streaming a stemcell into the content store,
    /// unpacking it, pulling a light stemcell.
    pub import_timeout_seconds: u64,
    /// Seconds a VM's init gets between SIGTERM and SIGKILL (`delete_vm`, `reboot_vm`).
    pub stop_grace_seconds: u64,
    /// The subnet dynamic networks allocate from when their cloud properties name none
    /// (`subnet`).
    pub dynamic_subnet: IpNet,
    /// Extra labels put on every container, image, snapshot and lease this backend
    /// creates (tests use them to find what they left behind).
    pub labels: BTreeMap<String, String>,
    /// Registries reachable over plain HTTP for light stemcells (`host:port`, e.g.
    /// `127.0.0.1:5000`). Every other registry is spoken to over HTTPS.
    pub insecure_registries: Vec<String>,
    /// Credentials for light-stemcell registries, by registry host (`ghcr.io`).
    pub registry_auth: BTreeMap<String, RegistryAuth>,
}

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryAuth {
    /// User name.
    pub username: String,
    /// Password or token. Never logged.
    pub password: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Default for ContainerdConfig {
    fn default() -> Self {
        ContainerdConfig {
            socket: PathBuf::from("/run/containerd/containerd.sock"),
            namespace: "bosh".into(),
            snapshotter: "overlayfs".into(),
            runtime: "io.containerd.runc.v2".into(),
            state_dir: PathBuf::from("/var/lib/bosh-container-cpi/containerd"),
            cni_bin_dir: PathBuf::from("/usr/lib/cni"),
            timeout_seconds: 120,
            start_containers_with_systemd: None,
            require_image_verification: true,
            import_timeout_seconds: 3600,
            stop_grace_seconds: 10,
            dynamic_subnet: IpNet::V4(
                ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(10, 252, 0, 0), 16).unwrap_or_default(),
            ),
            labels: BTreeMap::new(),
            insecure_registries: Vec::new(),
            registry_auth: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_partial_sections() {
        let cfg: ContainerdConfig =
            serde_json::from_value(serde_json::json!({"namespace": "ci", "stop_grace_seconds": 3}))
                .expect("parse");
        assert_eq!(cfg.namespace, "ci");
        assert_eq!(cfg.stop_grace_seconds, 3);
        assert_eq!(cfg.snapshotter, "overlayfs");
        assert_eq!(cfg.dynamic_subnet.to_string(), "10.252.0.0/16");
        assert_eq!(cfg.socket, PathBuf::from("/run/containerd/containerd.sock"));
    }

    #[test]
    fn unknown_keys_are_refused_and_secrets_not_printed() {
        let err = serde_json::from_value::<ContainerdConfig>(serde_json::json!({"sokcet": "/x"}))
            .expect_err("typo");
        assert!(err.to_string().contains("sokcet"), "{err}");
        let cfg: ContainerdConfig = serde_json::from_value(serde_json::json!({
            "registry_auth": {"ghcr.io": {"username": "u", "password": "hunter22"}}
        }))
        .expect("parse");
        assert!(!format!("{cfg:?}").contains("hunter22"));
    }
}
