//! # backend-docker
//!
//! The Docker backend of bosh-container-cpi, over bollard: BOSH VMs are containers,
//! stemcells are images, persistent disks are local volumes attached *live* through
//! a per-VM shared-propagation directory. See `docs/backend-docker.md`.
//!
//! Layout (the same module names as the containerd backend):
//! - [`config`]: the `docker` section of the config;
//! - [`client`]: the lazy daemon connection (unix, tcp + mutual TLS, negotiated API
//!   version) and the daemon's host facts;
//! - [`stemcell`]: image import (full) and pull by digest ([`stemcell::light`]);
//! - [`vm`]: [`vm::spec`] (the pure container builder, with [`vm::host_config`] for
//!   the Go CPI's `HostConfig` cloud properties), [`vm::prelude`] (the entrypoint
//!   script), [`vm::create`], [`vm::lifecycle`], [`vm::metadata`], [`vm::probe`];
//! - [`disk`]: volumes and live attach ([`disk::attach`]) over the mount table
//!   ([`disk::mounts`]), mounted directly ([`disk::local`]) or by helper containers
//!   ([`disk::remote`]);
//! - [`network`]: BOSH networks onto Docker networks ([`network::plan`](mod@network::plan) is pure);
//! - [`agent_env`]: the agent settings file, through the archive API;
//! - [`capabilities`]: privileged, or every capability the runtime has;
//! - [`helper`]: short-lived helper containers;
//! - [`doctor`]: probes for `cpi doctor` (daemon version, a throwaway container);
//! - [`labels`], [`error`].
//!
//! ## Use as a library
//!
//! [`DockerCpi`] implements [`cpi_core::Cpi`]: build it from a [`DockerConfig`] (every
//! field has the default documented in `docs/configuration.md`) and the agent's
//! options, then make the calls the director would make. [`DockerCpi::new`] checks
//! the config and does not contact the daemon; the first call that needs the daemon
//! connects. Calls are async; any tokio runtime works. A whole lifecycle is in the
//! workspace's `tests/examples/library_lifecycle.rs`:
//! `cargo run -p cpi-tests --example library_lifecycle -- docker`.
//!
//! ```no_run
//! use backend_docker::{DockerConfig, DockerCpi};
//! use cpi_core::{AgentOptions, CallContext, Cpi, CreateDisk, CreateStemcell};
//!
//! # async fn run() -> Result<(), cpi_core::CpiError> {
//! let cpi = DockerCpi::new(
//!     DockerConfig {
//!         host: "unix:///var/run/docker.sock".into(),
//!         ..DockerConfig::default()
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

pub mod agent_env;
pub mod capabilities;
pub mod client;
pub mod config;
pub mod disk;
pub mod doctor;
pub mod error;
pub mod helper;
pub mod hostlock;
pub mod labels;
pub mod network;
pub mod stemcell;
pub mod vm;

use std::path::PathBuf;

use async_trait::async_trait;
use cpi_core::{
    AgentOptions, CallContext, Cpi, CpiError, CpiResult, CreateDisk, CreateStemcell, CreateVm,
    CreatedVm, DiskCid, DiskHint, Metadata, StemcellCid, VmCid,
};
use tokio::sync::OnceCell;

use crate::client::{Client, DaemonFacts};
use crate::config::AttachMode;
use crate::disk::mounts::StateLayout;
use crate::error::{DockerError, Result};

pub use config::DockerConfig;
pub use error::DockerError as Error;

/// How this process reaches the daemon's mounts (the resolved `attach_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mounter {
    /// Direct mounts in our own mount namespace.
    Local,
    /// Helper containers.
    Helper,
}

/// The Docker backend.
pub struct DockerCpi {
    config: DockerConfig,
    agent: AgentOptions,
    client: OnceCell<Client>,
    /// The lookups' connection, with a remembered API version (boxed: most calls
    /// never make it, and the backend stays the size of one connection).
    lookup_client: OnceCell<Box<Client>>,
    facts: OnceCell<DaemonFacts>,
}

impl std::fmt::Debug for DockerCpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerCpi")
            .field("host", &self.config.host)
            .field("state_dir", &self.config.state_dir)
            .finish_non_exhaustive()
    }
}

impl DockerCpi {
    /// Builds the backend. Does not contact the daemon: connections are made lazily by
    /// the first call that needs one, so `info` stays cheap.
    pub fn new(config: DockerConfig, agent: AgentOptions) -> CpiResult<DockerCpi> {
        client::Endpoint::parse(&config.host).map_err(CpiError::from)?;
        client::preferred_version(&config).map_err(CpiError::from)?;
        if !config.state_dir.is_absolute() {
            return Err(DockerError::Config(format!(
                "state_dir {} must be an absolute path on the daemon's host",
                config.state_dir.display()
            ))
            .into());
        }
        Ok(DockerCpi {
            config,
            agent,
            client: OnceCell::new(),
            lookup_client: OnceCell::new(),
            facts: OnceCell::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DockerConfig {
        &self.config
    }

    /// The agent options.
    pub fn agent(&self) -> &AgentOptions {
        &self.agent
    }

    /// The daemon connection, made on first use.
    pub async fn client(&self) -> Result<&Client> {
        self.client
            .get_or_try_init(|| Client::connect(&self.config))
            .await
    }

    /// Runs a read-only lookup (`has_vm`, `has_disk`, `get_disks`: the calls a
    /// director makes most) on a client with the API version remembered from an
    /// earlier call ([`Client::connect_remembered`]), saving the `/_ping`. If the
    /// daemon refuses that version (it was upgraded or downgraded behind a socket
    /// that outlived it), the lookup runs again on a client that asked the daemon,
    /// which also remembers the new version. The refusal comes before the daemon
    /// acts, so the lookup runs at most once in effect.
    pub async fn lookup<'s, T, F, Fut>(&'s self, run: F) -> Result<T>
    where
        F: Fn(&'s Client) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let first = match self.client.get() {
            Some(client) => client,
            None => {
                self.lookup_client
                    .get_or_try_init(|| async {
                        Client::connect_remembered(&self.config).await.map(Box::new)
                    })
                    .await?
            }
        };
        match run(first).await {
            Err(e) if first.remembered && e.is_api_version_refused() => {
                tracing::info!(endpoint = %first.endpoint, error = %e, "the daemon refused the remembered API version; asking it again");
                run(self.client().await?).await
            }
            done => done,
        }
    }

    /// Facts about the daemon's host, read on first use.
    pub async fn facts(&self) -> Result<&DaemonFacts> {
        let client = self.client().await?;
        self.facts
            .get_or_try_init(|| DaemonFacts::probe(client))
            .await
    }

    /// How disks are mounted for this daemon.
    pub fn mounter(&self, client: &Client) -> Mounter {
        match self.config.attach_mode {
            AttachMode::Local => Mounter::Local,
            AttachMode::Helper => Mounter::Helper,
            AttachMode::Auto => {
                if client.unix
                    && disk::local::is_root()
                    && disk::local::shares_daemon_mount_namespace()
                {
                    Mounter::Local
                } else {
                    Mounter::Helper
                }
            }
        }
    }

    /// The state directory layout for `mounter`: in local mode the directory is made
    /// a shared mount and its canonical path is used (the mount table has those).
    pub fn layout(&self, mounter: Mounter) -> Result<StateLayout> {
        match mounter {
            Mounter::Local => Ok(StateLayout::new(disk::local::ensure_shared(
                &self.config.state_dir,
            )?)),
            Mounter::Helper => Ok(StateLayout::new(PathBuf::from(&self.config.state_dir))),
        }
    }
}

fn check_simple(what: &str, cid: &str) -> Result<()> {
    if cpi_core::ids::is_simple_name(cid) {
        Ok(())
    } else {
        Err(DockerError::Invalid(format!(
            "{what} {cid:?} is not a cid this CPI could have made (expected letters, digits, '.', '_' and '-')"
        )))
    }
}

#[async_trait]
impl Cpi for DockerCpi {
    fn stemcell_formats(&self) -> Vec<String> {
        let mut formats = vec!["warden-tar".to_owned(), "general-tar".to_owned()];
        if !self.config.light_stemcell.disabled {
            formats.push(cpi_core::stemcell::DOCKER_LIGHT.to_owned());
        }
        formats
    }

    async fn create_stemcell(
        &self,
        ctx: &CallContext,
        req: CreateStemcell,
    ) -> CpiResult<StemcellCid> {
        let client = self.client().await?;
        Ok(stemcell::create(client, &self.config, ctx, &req).await?)
    }

    async fn delete_stemcell(&self, _ctx: &CallContext, cid: &StemcellCid) -> CpiResult<()> {
        let client = self.client().await?;
        Ok(stemcell::delete(client, cid).await?)
    }

    async fn create_vm(&self, ctx: &CallContext, req: CreateVm) -> CpiResult<CreatedVm> {
        vm::create::create_vm(self, ctx, req)
            .await
            .map_err(DockerError::into_vm_creation_error)
    }

    async fn delete_vm(&self, ctx: &CallContext, cid: &VmCid) -> CpiResult<()> {
        check_simple("VM cid", cid.as_str())?;
        Ok(vm::lifecycle::delete_vm(self, ctx, cid).await?)
    }

    async fn has_vm(&self, _ctx: &CallContext, cid: &VmCid) -> CpiResult<bool> {
        if !cpi_core::ids::is_simple_name(cid.as_str()) {
            return Ok(false);
        }
        let found = self
            .lookup(|client| vm::lifecycle::find(client, cid.as_str()))
            .await?;
        Ok(found.is_some())
    }

    async fn reboot_vm(&self, ctx: &CallContext, cid: &VmCid) -> CpiResult<()> {
        check_simple("VM cid", cid.as_str())?;
        Ok(vm::lifecycle::reboot_vm(self, ctx, cid).await?)
    }

    async fn set_vm_metadata(
        &self,
        ctx: &CallContext,
        cid: &VmCid,
        metadata: &Metadata,
    ) -> CpiResult<()> {
        check_simple("VM cid", cid.as_str())?;
        Ok(vm::metadata::set_vm_metadata(self, ctx, cid, metadata).await?)
    }

    async fn create_disk(&self, ctx: &CallContext, req: CreateDisk) -> CpiResult<DiskCid> {
        Ok(disk::create_disk(self, ctx, &req).await?)
    }

    async fn delete_disk(&self, ctx: &CallContext, cid: &DiskCid) -> CpiResult<()> {
        check_simple("disk cid", cid.as_str())?;
        Ok(disk::delete_disk(self, ctx, cid).await?)
    }

    async fn has_disk(&self, _ctx: &CallContext, cid: &DiskCid) -> CpiResult<bool> {
        if !cpi_core::ids::is_simple_name(cid.as_str()) {
            return Ok(false);
        }
        let found = self
            .lookup(|client| disk::find(client, cid.as_str()))
            .await?;
        Ok(found.is_some())
    }

    async fn attach_disk(
        &self,
        ctx: &CallContext,
        vm: &VmCid,
        disk: &DiskCid,
    ) -> CpiResult<DiskHint> {
        check_simple("VM cid", vm.as_str())?;
        check_simple("disk cid", disk.as_str())?;
        Ok(disk::attach_disk(self, ctx, vm, disk).await?)
    }

    async fn detach_disk(&self, ctx: &CallContext, vm: &VmCid, disk: &DiskCid) -> CpiResult<()> {
        check_simple("VM cid", vm.as_str())?;
        check_simple("disk cid", disk.as_str())?;
        Ok(disk::detach_disk(self, ctx, vm, disk).await?)
    }

    async fn get_disks(&self, ctx: &CallContext, vm: &VmCid) -> CpiResult<Vec<DiskCid>> {
        check_simple("VM cid", vm.as_str())?;
        Ok(self
            .lookup(|client| disk::get_disks(self, client, ctx, vm))
            .await?)
    }

    async fn set_disk_metadata(
        &self,
        ctx: &CallContext,
        cid: &DiskCid,
        metadata: &Metadata,
    ) -> CpiResult<()> {
        check_simple("disk cid", cid.as_str())?;
        Ok(disk::set_disk_metadata(self, ctx, cid, metadata).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_is_lazy_and_checks_the_config() {
        let cpi = DockerCpi::new(
            DockerConfig {
                host: "unix:///nonexistent/docker.sock".into(),
                ..Default::default()
            },
            AgentOptions::default(),
        )
        .expect("no daemon contact in new");
        assert_eq!(
            cpi.stemcell_formats(),
            vec!["warden-tar", "general-tar", "docker-light"]
        );
        let err = DockerCpi::new(
            DockerConfig {
                host: "ftp://x".into(),
                ..Default::default()
            },
            AgentOptions::default(),
        )
        .expect_err("bad host");
        assert_eq!(err.kind, cpi_core::ErrorKind::CloudError);
        assert!(err.message.contains("ftp://x"), "{}", err.message);
        let err = DockerCpi::new(
            DockerConfig {
                state_dir: "relative".into(),
                ..Default::default()
            },
            AgentOptions::default(),
        )
        .expect_err("relative");
        assert!(err.message.contains("absolute"), "{}", err.message);
    }

    #[tokio::test]
    async fn missing_daemon_is_a_clear_cloud_error() {
        let cpi = DockerCpi::new(
            DockerConfig {
                host: "unix:///nonexistent/docker.sock".into(),
                ..Default::default()
            },
            AgentOptions::default(),
        )
        .expect("new");
        let err = cpi
            .has_vm(&CallContext::default(), &VmCid::new("c-1").expect("cid"))
            .await
            .expect_err("no daemon");
        assert_eq!(err.kind, cpi_core::ErrorKind::CloudError);
        assert!(err.ok_to_retry);
        assert!(
            err.message.contains("unix:///nonexistent/docker.sock"),
            "{}",
            err.message
        );
    }
}
