//! What a CPI process killed halfway through `create_vm` or `create_stemcell` leaves
//! behind, and how the director's retry finds and removes (or reuses) it.
//!
//! The director retries a call that never answered, but it never learnt the cid the
//! killed call minted, so nothing would ever delete that call's objects. The labels
//! make them findable:
//!
//! - A VM's ephemeral volume is created first and removed last, and carries the
//!   VM cid, the agent id and the director uuid; the container carries the same
//!   agent id and director. The director mints one agent id per VM and retries
//!   `create_vm` with it, so a VM of ours with the agent id of a `create_vm` being
//!   made now is an earlier attempt whose answer was lost:
//!   [`remove_earlier_attempts`] deletes it as `delete_vm` would (container, metadata
//!   holders, mounts and directory, ephemeral volume), before the new attempt takes
//!   its IP address.
//! - A stemcell image is tagged only once the import is complete, with the
//!   stemcell's name, version, the director uuid and a fingerprint of the image file:
//!   [`existing_stemcell`] finds the image an earlier `create_stemcell` of the same
//!   stemcell made, and the retry
//!   answers its cid instead of importing a second copy nobody would delete. An
//!   import killed before it finished leaves no image (dockerd drops a half-received
//!   import).

use std::collections::{BTreeSet, HashMap};

use bollard::query_parameters::{ListContainersOptions, ListImagesOptions, ListVolumesOptions};
use cpi_core::{CallContext, StemcellManifest, VmCid};

use crate::client::Client;
use crate::error::{DockerError, Result};
use crate::{labels, DockerCpi};

/// The label with the image file's fingerprint ([`image_fingerprint`]).
pub const IMAGE_FINGERPRINT: &str = "bosh-container-cpi.stemcell.image-fingerprint";

/// The fingerprint of the stemcell image file at `path`
/// ([`cpi_core::stemcell::image_fingerprint`]).
pub fn image_fingerprint(path: &std::path::Path) -> std::io::Result<String> {
    cpi_core::stemcell::image_fingerprint(std::fs::File::open(path)?)
}

/// How often [`remove_earlier_attempts`] looks for earlier attempts.
const ROUNDS: u32 = 10;

fn owner_filter(
    kind: &str,
    ctx: &CallContext,
    extra: &[(&str, &str)],
) -> HashMap<String, Vec<String>> {
    let mut filter = labels::filter(kind);
    if let Some(uuid) = ctx.director_uuid.as_deref().filter(|u| !u.is_empty()) {
        filter.push(format!("{}={uuid}", labels::DIRECTOR));
    }
    for (k, v) in extra {
        filter.push(format!("{k}={v}"));
    }
    HashMap::from([("label".to_owned(), filter)])
}

/// The VM cids of ours made for `agent_id` by this director, other than `except`.
pub async fn earlier_attempts(
    client: &Client,
    ctx: &CallContext,
    agent_id: &str,
    except: &str,
) -> Result<BTreeSet<String>> {
    let mut found = BTreeSet::new();
    let volumes = client
        .docker
        .list_volumes(Some(ListVolumesOptions {
            filters: Some(owner_filter(
                labels::KIND_EPHEMERAL,
                ctx,
                &[(labels::AGENT_ID, agent_id)],
            )),
        }))
        .await
        .map_err(client.err("listing ephemeral volumes by agent id"))?;
    for v in volumes.volumes.unwrap_or_default() {
        if let Some(vm) = v.labels.get(labels::VM_CID) {
            found.insert(vm.clone());
        }
    }
    let containers = client
        .docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(owner_filter(
                labels::KIND_VM,
                ctx,
                &[(labels::AGENT_ID, agent_id)],
            )),
            ..Default::default()
        }))
        .await
        .map_err(client.err("listing VM containers by agent id"))?;
    for c in containers {
        if let Some(name) = c.names.unwrap_or_default().first() {
            found.insert(name.trim_start_matches('/').to_owned());
        }
    }
    // Without a director uuid in the context, only objects without one match.
    found.remove(except);
    Ok(found
        .into_iter()
        .filter(|vm| cpi_core::ids::is_simple_name(vm))
        .collect())
}

/// Deletes the earlier attempts of this `create_vm` (see the module docs).
pub async fn remove_earlier_attempts(
    cpi: &DockerCpi,
    client: &Client,
    ctx: &CallContext,
    agent_id: &str,
    new_vm: &str,
) -> Result<()> {
    // dockerd finishes a request whose client was killed: the earlier attempt's
    // container can appear while we remove its volume ("volume is in use"). Look
    // again until nothing is found, a few times.
    let mut last = None;
    for round in 0..ROUNDS {
        let found = earlier_attempts(client, ctx, agent_id, new_vm).await?;
        if found.is_empty() {
            return Ok(());
        }
        for vm in found {
            tracing::warn!(vm_cid = %vm, agent_id, round, "removing an earlier attempt of this create_vm that never answered");
            let cid = VmCid::new(vm.clone()).map_err(|e| DockerError::Invalid(e.message))?;
            if let Err(e) = crate::vm::lifecycle::delete_vm(cpi, ctx, &cid).await {
                tracing::warn!(vm_cid = %vm, error = %e, "could not remove it yet");
                last = Some(e);
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    match last {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The cid of a complete stemcell image of ours with this manifest's name and
/// version from this director, if there is one.
pub async fn existing_stemcell(
    client: &Client,
    ctx: &CallContext,
    manifest: &StemcellManifest,
    fingerprint: &str,
) -> Result<Option<String>> {
    if manifest.name.is_empty() {
        return Ok(None);
    }
    let images = client
        .docker
        .list_images(Some(ListImagesOptions {
            filters: Some(owner_filter(
                labels::KIND_STEMCELL,
                ctx,
                &[
                    (labels::STEMCELL_NAME, &manifest.name),
                    (labels::STEMCELL_VERSION, &manifest.version),
                    (IMAGE_FINGERPRINT, fingerprint),
                ],
            )),
            ..Default::default()
        }))
        .await
        .map_err(client.err("listing stemcell images by name and version"))?;
    Ok(images
        .into_iter()
        .filter(|i| ctx.director_uuid.is_some() || !i.labels.contains_key(labels::DIRECTOR))
        .flat_map(|i| i.repo_tags)
        .find(|t| t.starts_with(&format!("{}:", crate::stemcell::REPOSITORY))))
}
