//! # backend-containerd
//!
//! The containerd backend of bosh-container-cpi: BOSH VMs as containerd containers,
//! spoken to over containerd's gRPC API (containerd-client), for hosts where Garden's
//! loop devices and XFS are not available (nested CI on Ubuntu Noble). Nothing here
//! uses loop devices, XFS or user namespaces.
//!
//! - [`stemcell`]: stemcells as images in the content store (full ones streamed
//!   from the director's file, light ones pulled from a registry), unpacked into the
//!   snapshotter.
//! - `vm`: one container and one task per VM (`spec` builds the OCI runtime spec,
//!   `create` and `lifecycle` do the calls).
//! - `network`: a network namespace per VM, configured by CNI plugins.
//! - `disk`: persistent disks as host directories, attached live through a shared
//!   mount.
//! - `agent_env`: the files the agent needs before it starts.
//! - [`doctor`]: probes for `cpi doctor` (version, snapshotter, a throwaway
//!   container record).
//! - [`config`], [`error`], [`labels`]: configuration, the error type, the labels on
//!   containerd objects.
//!
//! The backend keeps nothing in memory between calls: what it needs later is in
//! containerd (labels) or under `containerd.state_dir`. Tasks outlive the CPI
//! process (containerd's shim keeps them).
//!
//! ## Use as a library
//!
//! [`ContainerdCpi`] implements [`cpi_core::Cpi`]: build it from a
//! [`ContainerdConfig`] (every field has the default documented in
//! `docs/configuration.md`) and the agent's options, then make the calls the director
//! would make. [`ContainerdCpi::new`] checks the config and does not contact the
//! daemon; the first call that needs it connects. The process must run as root on
//! containerd's host (it mounts, creates network namespaces and runs CNI plugins).
//! Calls are async; any tokio runtime works. A whole lifecycle is in the workspace's
//! `tests/examples/library_lifecycle.rs`:
//! `cargo run -p cpi-tests --example library_lifecycle -- containerd`.
//!
//! ```no_run
//! use backend_containerd::{ContainerdConfig, ContainerdCpi};
//! use cpi_core::{AgentOptions, CallContext, Cpi, CreateDisk, CreateStemcell};
//!
//! # async fn run() -> Result<(), cpi_core::CpiError> {
//! let cpi = ContainerdCpi::new(
//!     ContainerdConfig {
//!         socket: "/run/containerd/containerd.sock".into(),
//!         namespace: "bosh".into(),
//!         ..ContainerdConfig::default()
//!     },
//!     AgentOptions {
//!         mbus: "https://mbus:mbus-password@0.0.0.0:6868".into(),
//!         ntp: vec![],
//!     },
//! )?;
//! let ctx = CallContext {
//!     api_version: 2,
//!     ..CallContext::default()
//! };
//! // `image_path` is the `image` file of an unpacked stemcell, `stemcell.MF` beside it.
//! let stemcell = cpi
//!     .create_stemcell(
//!         &ctx,
//!         CreateStemcell {
//!             image_path: "/tmp/stemcell/image".into(),
//!             cloud_properties: serde_json::Map::new(),
//!         },
//!     )
//!     .await?;
//! let disk = cpi
//!     .create_disk(
//!         &ctx,
//!         CreateDisk {
//!             size_mib: 1024,
//!             cloud_properties: serde_json::Map::new(),
//!             vm: None,
//!         },
//!     )
//!     .await?;
//! cpi.delete_disk(&ctx, &disk).await?;
//! cpi.delete_stemcell(&ctx, &stemcell).await?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod agent_env;
mod client;
pub mod config;
mod disk;
pub mod doctor;
pub mod error;
mod fsutil;
mod host;
mod hostlock;
pub mod labels;
mod mount;
mod network;
mod orphans;
pub mod stemcell;
mod vm;

#[doc(hidden)]
pub use network::raw as raw_network;

use std::time::Duration;

use async_trait::async_trait;
use cpi_core::{
    AgentOptions, CallContext, Cpi, CpiError, CpiResult, CreateDisk, CreateStemcell, CreateVm,
    CreatedVm, DiskCid, DiskHint, Metadata, StemcellCid, VmCid,
};
use tokio::sync::OnceCell;

pub use config::ContainerdConfig;
pub use error::ContainerdError;

use client::Daemon;

/// The containerd backend.
pub struct ContainerdCpi {
    config: ContainerdConfig,
    agent: AgentOptions,
    daemon: OnceCell<Daemon>,
}

impl std::fmt::Debug for ContainerdCpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The agent options hold the mbus URL with credentials: never printed.
        f.debug_struct("ContainerdCpi")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ContainerdCpi {
    /// Builds the backend and checks the config. Does not contact the daemon:
    /// connections are made lazily by the first call that needs one, so `info` stays
    /// cheap and works without containerd.
    pub fn new(config: ContainerdConfig, agent: AgentOptions) -> CpiResult<ContainerdCpi> {
        let bad = |key: &str, why: String| {
            CpiError::cloud(format!("CPI config: containerd.{key}: {why}"))
        };
        client::validate_identifier(&config.namespace).map_err(|e| bad("namespace", e))?;
        for (key, value) in [
            ("snapshotter", &config.snapshotter),
            ("runtime", &config.runtime),
        ] {
            if value.is_empty() {
                return Err(bad(key, "must not be empty".into()));
            }
        }
        for (key, path) in [
            ("state_dir", &config.state_dir),
            ("cni_bin_dir", &config.cni_bin_dir),
            ("socket", &config.socket),
        ] {
            if !path.is_absolute() {
                return Err(bad(
                    key,
                    format!("{} must be an absolute path", path.display()),
                ));
            }
        }
        if config.timeout_seconds == 0 || config.import_timeout_seconds == 0 {
            return Err(bad(
                "timeout_seconds",
                "timeouts must be at least 1 second".into(),
            ));
        }
        Ok(ContainerdCpi {
            config,
            agent,
            daemon: OnceCell::new(),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &ContainerdConfig {
        &self.config
    }

    /// The connection, made on first use.
    async fn daemon(&self) -> Result<&Daemon, ContainerdError> {
        self.daemon
            .get_or_try_init(|| {
                Daemon::connect(
                    &self.config.socket,
                    &self.config.namespace,
                    Duration::from_secs(self.config.timeout_seconds),
                    Duration::from_secs(self.config.import_timeout_seconds),
                )
            })
            .await
    }
}

#[async_trait]
impl Cpi for ContainerdCpi {
    fn stemcell_formats(&self) -> Vec<String> {
        vec![
            "warden-tar".into(),
            "general-tar".into(),
            cpi_core::stemcell::DOCKER_LIGHT.into(),
        ]
    }

    async fn create_stemcell(
        &self,
        ctx: &CallContext,
        req: CreateStemcell,
    ) -> CpiResult<StemcellCid> {
        self.do_create_stemcell(ctx, req).await
    }

    async fn delete_stemcell(&self, _ctx: &CallContext, cid: &StemcellCid) -> CpiResult<()> {
        self.do_delete_stemcell(cid).await
    }

    async fn create_vm(&self, ctx: &CallContext, req: CreateVm) -> CpiResult<CreatedVm> {
        self.do_create_vm(ctx, req).await
    }

    async fn delete_vm(&self, _ctx: &CallContext, cid: &VmCid) -> CpiResult<()> {
        self.do_delete_vm(cid).await
    }

    async fn has_vm(&self, _ctx: &CallContext, cid: &VmCid) -> CpiResult<bool> {
        self.do_has_vm(cid).await
    }

    async fn reboot_vm(&self, _ctx: &CallContext, cid: &VmCid) -> CpiResult<()> {
        self.do_reboot_vm(cid).await
    }

    async fn set_vm_metadata(
        &self,
        _ctx: &CallContext,
        cid: &VmCid,
        metadata: &Metadata,
    ) -> CpiResult<()> {
        self.do_set_vm_metadata(cid, metadata).await
    }

    async fn create_disk(&self, _ctx: &CallContext, req: CreateDisk) -> CpiResult<DiskCid> {
        self.do_create_disk(req).await
    }

    async fn delete_disk(&self, _ctx: &CallContext, cid: &DiskCid) -> CpiResult<()> {
        self.do_delete_disk(cid).await
    }

    async fn has_disk(&self, _ctx: &CallContext, cid: &DiskCid) -> CpiResult<bool> {
        self.do_has_disk(cid).await
    }

    async fn attach_disk(
        &self,
        _ctx: &CallContext,
        vm: &VmCid,
        disk: &DiskCid,
    ) -> CpiResult<DiskHint> {
        self.do_attach_disk(vm, disk).await
    }

    async fn detach_disk(&self, _ctx: &CallContext, vm: &VmCid, disk: &DiskCid) -> CpiResult<()> {
        self.do_detach_disk(vm, disk).await
    }

    async fn get_disks(&self, _ctx: &CallContext, vm: &VmCid) -> CpiResult<Vec<DiskCid>> {
        self.do_get_disks(vm).await
    }

    async fn set_disk_metadata(
        &self,
        _ctx: &CallContext,
        cid: &DiskCid,
        metadata: &Metadata,
    ) -> CpiResult<()> {
        self.do_set_disk_metadata(cid, metadata).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_is_lazy_and_checks_the_config() {
        let cpi = ContainerdCpi::new(
            ContainerdConfig {
                socket: "/nonexistent.sock".into(),
                ..Default::default()
            },
            AgentOptions::default(),
        )
        .expect("no daemon needed");
        assert_eq!(
            cpi.stemcell_formats(),
            vec!["warden-tar", "general-tar", "docker-light"]
        );
        for (cfg, key) in [
            (
                ContainerdConfig {
                    namespace: "bad/ns".into(),
                    ..Default::default()
                },
                "containerd.namespace",
            ),
            (
                ContainerdConfig {
                    state_dir: "relative".into(),
                    ..Default::default()
                },
                "containerd.state_dir",
            ),
        ] {
            let err = ContainerdCpi::new(cfg, AgentOptions::default()).expect_err(key);
            assert!(err.message.contains(key), "{}", err.message);
            assert_eq!(err.kind, cpi_core::ErrorKind::CloudError);
        }
    }

    #[tokio::test]
    async fn calls_without_a_daemon_fail_with_a_hint() {
        let cpi = ContainerdCpi::new(
            ContainerdConfig {
                socket: "/nonexistent/containerd.sock".into(),
                ..Default::default()
            },
            AgentOptions::default(),
        )
        .expect("cpi");
        let err = cpi
            .has_vm(&CallContext::default(), &VmCid::new("vm-1").expect("cid"))
            .await
            .expect_err("no daemon");
        assert_eq!(err.kind, cpi_core::ErrorKind::CloudError);
        assert!(
            err.message.contains("/nonexistent/containerd.sock"),
            "{}",
            err.message
        );
        assert!(err.ok_to_retry);
    }
}
