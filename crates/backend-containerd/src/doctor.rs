//! Probes for `cpi doctor`: containerd's version, whether the configured
//! snapshotter is loaded, and how long a throwaway container record takes to create
//! and delete.
//!
//! They connect with the backend's own `Daemon::connect`, so the doctor reaches
//! containerd exactly as a CPI call would. Nothing here is used by CPI calls.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::snapshots::StatSnapshotRequest;
use containerd_client::services::v1::{Container, CreateContainerRequest, DeleteContainerRequest};
use containerd_client::tonic::Code;

use crate::client::Daemon;
use crate::config::ContainerdConfig;
use crate::error::{ContainerdError, Result};
use crate::labels;

/// The label that marks the doctor's throwaway containers (value `doctor`), beside
/// `io.bosh.cpi.managed-by`.
pub const KIND_LABEL: &str = "io.bosh.cpi.kind";

/// A connection made as CPI calls make it.
#[derive(Debug, Clone)]
pub struct Connection {
    daemon: Daemon,
    version: String,
    namespace: String,
    snapshotter: String,
    runtime: String,
}

impl Connection {
    /// Connects to `containerd.socket` and asks for the version.
    pub async fn connect(config: &ContainerdConfig) -> Result<Connection> {
        let daemon = Daemon::connect(
            &config.socket,
            &config.namespace,
            Duration::from_secs(config.timeout_seconds.clamp(1, 30)),
            Duration::from_secs(config.import_timeout_seconds.max(1)),
        )
        .await?;
        let version = daemon.version().await?;
        Ok(Connection {
            daemon,
            version,
            namespace: config.namespace.clone(),
            snapshotter: config.snapshotter.clone(),
            runtime: config.runtime.clone(),
        })
    }

    /// containerd's version, as its version service reported it.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Whether the configured snapshotter is loaded: `Ok(())`, or containerd's
    /// message (e.g. `snapshotter not loaded: overlayfs`, which is what an
    /// overlayfs snapshotter on top of overlay gives).
    pub async fn snapshotter_loaded(&self) -> std::result::Result<(), String> {
        let d = &self.daemon;
        let key = format!("bosh-cpi-doctor-absent-{}", uuid::Uuid::new_v4().simple());
        let asked = d
            .snapshots()
            .stat(d.req(StatSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key,
            }))
            .await;
        match asked {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Ok(()),
            Err(status) => Err(status.message().to_owned()),
        }
    }

    /// Creates a labelled container record (no snapshot, no task: nothing runs) in
    /// the configured namespace, deletes it again, and returns how long both took.
    pub async fn time_throwaway_container(&self) -> Result<Duration> {
        let d = &self.daemon;
        let id = format!("bosh-cpi-doctor-{}", uuid::Uuid::new_v4().simple());
        let container = Container {
            id: id.clone(),
            labels: HashMap::from([
                (
                    labels::MANAGED_BY.to_owned(),
                    labels::MANAGED_BY_VALUE.to_owned(),
                ),
                (KIND_LABEL.to_owned(), "doctor".to_owned()),
            ]),
            runtime: Some(Runtime {
                name: self.runtime.clone(),
                options: None,
            }),
            spec: Some(prost_types::Any {
                type_url: crate::vm::spec::SPEC_TYPE_URL.to_owned(),
                value: b"{\"ociVersion\":\"1.0.2\"}".to_vec(),
            }),
            ..Default::default()
        };
        let started = Instant::now();
        d.call(
            format!("Containers.Create {id}"),
            d.containers().create(d.req(CreateContainerRequest {
                container: Some(container),
            })),
        )
        .await?;
        let deleted = d
            .call(
                format!("Containers.Delete {id}"),
                d.containers()
                    .delete(d.req(DeleteContainerRequest { id: id.clone() })),
            )
            .await;
        match deleted {
            Ok(()) => Ok(started.elapsed()),
            Err(e) => Err(ContainerdError::Refused(format!(
                "the throwaway container {id} was created but could not be deleted \
                 (remove it with `ctr -n {} containers rm {id}`): {e}",
                self.namespace
            ))),
        }
    }
}
