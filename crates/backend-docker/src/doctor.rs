//! Probes for `cpi doctor`: what the daemon says about itself, and how long a
//! throwaway container takes to create and remove.
//!
//! These use the backend's own connection code ([`Client::connect`]), so the doctor
//! reaches the daemon exactly as a CPI call would (same host parsing, TLS, version
//! negotiation). Nothing here is used by CPI calls.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{CreateContainerOptions, ListImagesOptions};

use crate::client::{Client, DaemonFacts};
use crate::config::DockerConfig;
use crate::error::Result;
use crate::labels;

/// The `kind` label of the doctor's throwaway containers.
pub const KIND_DOCTOR: &str = "doctor";

/// What the daemon told us.
#[derive(Debug, Clone)]
pub struct DaemonReport {
    /// The endpoint as configured.
    pub endpoint: String,
    /// The engine version (`20.10.24+dfsg1`).
    pub server_version: String,
    /// The daemon's own (maximum) API version.
    pub server_api_version: String,
    /// The daemon's minimum API version, when it says.
    pub min_api_version: String,
    /// The API version negotiated for this client.
    pub negotiated_api_version: String,
    /// Facts from `GET /info` (cgroup version, storage driver, data root).
    pub facts: DaemonFacts,
}

/// Connects as a CPI call would, negotiates, and reads `GET /version` and `GET /info`.
/// Returns the connected client too, for [`time_throwaway_container`].
pub async fn probe(config: &DockerConfig) -> Result<(Client, DaemonReport)> {
    let client = Client::connect(config).await?;
    let version = client
        .docker
        .version()
        .await
        .map_err(client.err("reading the daemon version (GET /version)"))?;
    let facts = DaemonFacts::probe(&client).await?;
    let (major, minor) = client.api_version();
    let report = DaemonReport {
        endpoint: client.endpoint.clone(),
        server_version: version.version.unwrap_or_default(),
        server_api_version: version.api_version.unwrap_or_default(),
        min_api_version: version.min_api_version.unwrap_or_default(),
        negotiated_api_version: format!("{major}.{minor}"),
        facts,
    };
    Ok((client, report))
}

/// Creates a labelled, never-started container from an image already present
/// (a stemcell of ours if there is one, else any tagged image), removes it again, and
/// returns the image used and the time both steps took. `None` when the daemon has
/// no image at all (nothing is pulled).
pub async fn time_throwaway_container(client: &Client) -> Result<Option<(String, Duration)>> {
    let ours = client
        .docker
        .list_images(Some(ListImagesOptions {
            filters: Some(HashMap::from([(
                "label".to_owned(),
                labels::filter(labels::KIND_STEMCELL),
            )])),
            ..Default::default()
        }))
        .await
        .map_err(client.err("listing stemcell images"))?;
    let image = match ours.into_iter().next() {
        Some(i) => Some(i.id),
        None => client
            .docker
            .list_images(None::<ListImagesOptions>)
            .await
            .map_err(client.err("listing images"))?
            .into_iter()
            .next()
            .map(|i| i.id),
    };
    let Some(image) = image else {
        return Ok(None);
    };
    let name = format!("bosh-cpi-doctor-{}", uuid::Uuid::new_v4().simple());
    let container_labels = HashMap::from([
        (labels::OWNER.to_owned(), "true".to_owned()),
        (labels::KIND.to_owned(), KIND_DOCTOR.to_owned()),
    ]);
    let started = Instant::now();
    client
        .docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.clone()),
                ..Default::default()
            }),
            ContainerCreateBody {
                image: Some(image.clone()),
                entrypoint: Some(vec!["/bin/true".into()]),
                cmd: Some(vec![]),
                labels: Some(container_labels),
                network_disabled: Some(true),
                host_config: Some(HostConfig {
                    network_mode: Some("none".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .map_err(client.err(format!("creating the throwaway container {name}")))?;
    crate::vm::lifecycle::remove_container(client, &name, 0).await?;
    Ok(Some((image, started.elapsed())))
}
