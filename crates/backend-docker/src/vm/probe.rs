//! What the daemon's host and a stemcell image are like, found out with throwaway
//! containers: the runtime's capability bounding set (for the VM's privileges) and an
//! image's operating system (for its init, when the image has no label saying so).

use std::io::Read;

use bollard::query_parameters::{CreateContainerOptions, DownloadFromContainerOptions};
use cpi_core::CallContext;
use futures_util::TryStreamExt;

use crate::capabilities::{self, Privilege};
use crate::client::Client;
use crate::error::{DockerError, Result};
use crate::helper::{self, HelperSpec};
use crate::vm::lifecycle;
use crate::{stemcell, DockerCpi};

/// The privilege to try first: the config's choice; in auto mode, from this
/// machine's bounding set when the daemon is local, else `Privileged`.
pub(crate) async fn initial_privilege(
    cpi: &DockerCpi,
    client: &Client,
    ctx: &CallContext,
    image: &str,
) -> Result<Privilege> {
    match cpi.config().privileged {
        Some(true) => Ok(Privilege::Privileged),
        Some(false) if !client.unix => probe_privilege(client, ctx, image).await.map(|p| match p {
            Privilege::Privileged => Privilege::Capabilities { drop: vec![] },
            other => other,
        }),
        forced => {
            let (bounding, last) = if client.unix {
                capabilities::own_bounding_set().unwrap_or((u64::MAX, 40))
            } else {
                (u64::MAX, 40)
            };
            Ok(
                match (forced, Privilege::for_bounding_set(bounding, last)) {
                    (Some(false), Privilege::Privileged) => {
                        Privilege::Capabilities { drop: vec![] }
                    }
                    (_, p) => p,
                },
            )
        }
    }
}

/// Reads the runtime's bounding set with a helper in the host's PID namespace (its
/// parent is the runtime's shim) and plans the privilege from it.
pub(crate) async fn probe_privilege(
    client: &Client,
    ctx: &CallContext,
    image: &str,
) -> Result<Privilege> {
    let out = helper::run(
        client,
        ctx,
        &HelperSpec {
            purpose: "probing the container runtime's capability bounding set".into(),
            image: image.to_owned(),
            script: capabilities::PROBE_SCRIPT.into(),
            pid_host: true,
            ..Default::default()
        },
    )
    .await?;
    let bounding = capabilities::parse_cap_bnd(&out.stdout).ok_or_else(|| {
        DockerError::Conflict(format!(
            "the capability probe printed no CapBnd: {}",
            out.stdout.trim()
        ))
    })?;
    let last = capabilities::parse_last_cap(&out.stdout).unwrap_or(40);
    let p = Privilege::for_bounding_set(bounding, last);
    tracing::info!(
        bounding = format!("{bounding:#x}"),
        privilege = p.label(),
        "probed the runtime's capabilities"
    );
    Ok(p)
}

/// Reads `/etc/os-release` of an image through a created, never-started container.
pub(crate) async fn probe_os(
    client: &Client,
    ctx: &CallContext,
    image: &str,
) -> Result<Option<String>> {
    let name = format!("bosh-cpi-probe-{}", uuid::Uuid::new_v4());
    client
        .docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.clone()),
                ..Default::default()
            }),
            HelperSpec {
                purpose: "reading /etc/os-release".into(),
                image: image.to_owned(),
                script: "true".into(),
                ..Default::default()
            }
            .body(ctx),
        )
        .await
        .map_err(client.err(format!("creating probe container {name} from {image}")))?;
    let mut found = None;
    let mut path = "/etc/os-release".to_owned();
    for _ in 0..3 {
        let bytes = client
            .docker
            .download_from_container(
                &name,
                Some(DownloadFromContainerOptions { path: path.clone() }),
            )
            .try_fold(Vec::new(), |mut acc, chunk| async move {
                acc.extend_from_slice(&chunk);
                Ok(acc)
            })
            .await;
        let Ok(bytes) = bytes else { break };
        match first_entry(&bytes) {
            Some(Entry::File(text)) => {
                found = stemcell::os_from_os_release(&text);
                break;
            }
            Some(Entry::Link(target)) => {
                path = if target.starts_with('/') {
                    target
                } else {
                    format!("/etc/{target}")
                };
            }
            None => break,
        }
    }
    if let Err(e) = lifecycle::remove_container(client, &name, 0).await {
        tracing::warn!(container = %name, error = %e, "could not remove the probe container");
    }
    Ok(found)
}

enum Entry {
    File(String),
    Link(String),
}

fn first_entry(archive: &[u8]) -> Option<Entry> {
    let mut tar = tar::Archive::new(archive);
    let mut entry = tar.entries().ok()?.next()?.ok()?;
    match entry.header().entry_type() {
        tar::EntryType::Symlink => Some(Entry::Link(
            entry.link_name().ok()??.to_string_lossy().into_owned(),
        )),
        _ => {
            let mut text = String::new();
            entry.read_to_string(&mut text).ok()?;
            Some(Entry::File(text))
        }
    }
}
