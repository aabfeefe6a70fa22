//! The VM methods besides `create_vm`: finding VMs, `has_vm`, `delete_vm`, `reboot_vm`
//! (`set_vm_metadata` is in [`crate::vm::metadata`]).

use std::collections::HashMap;
use std::time::Duration;

use bollard::models::ContainerInspectResponse;
use bollard::query_parameters::{
    ListContainersOptions, ListImagesOptions, RemoveContainerOptions, RemoveVolumeOptions,
    RestartContainerOptions, StopContainerOptions,
};
use cpi_core::{CallContext, VmCid};

use crate::client::Client;
use crate::error::{DockerError, Result};
use crate::vm::spec::{ephemeral_volume, DISKS_TARGET};
use crate::{disk, labels, DockerCpi, Mounter};

/// What we need to know of a VM container.
#[derive(Debug, Clone, PartialEq)]
pub struct VmInfo {
    /// The container name (the VM cid).
    pub name: String,
    /// The container id.
    pub id: String,
    /// The image id it runs.
    pub image: String,
    /// Whether it is running.
    pub running: bool,
    /// Its labels.
    pub labels: HashMap<String, String>,
    /// Whether it has the per-VM disks directory (VMs of the Go Docker CPI do not,
    /// and cannot attach disks live).
    pub live_attach: bool,
}

/// Whether a container is one of our VMs: labelled as ours, or (for VMs made by the Go
/// Docker CPI, which labelled nothing) unlabelled and named `c-…`.
pub fn is_vm(name: &str, labels: Option<&HashMap<String, String>>) -> bool {
    labels::is_ours(labels, labels::KIND_VM)
        || (name.starts_with("c-") && labels.is_none_or(|l| !l.contains_key(labels::OWNER)))
}

fn info_from(vm: &str, c: ContainerInspectResponse) -> Option<VmInfo> {
    let labels = c.config.as_ref().and_then(|cfg| cfg.labels.clone());
    let name = c.name.clone().unwrap_or_default();
    let name = name.trim_start_matches('/');
    if name != vm || !is_vm(name, labels.as_ref()) {
        return None;
    }
    let live_attach = c
        .mounts
        .unwrap_or_default()
        .iter()
        .any(|m| m.destination.as_deref() == Some(DISKS_TARGET));
    Some(VmInfo {
        name: name.to_owned(),
        id: c.id.unwrap_or_default(),
        image: c.image.unwrap_or_default(),
        running: c.state.and_then(|s| s.running).unwrap_or(false),
        labels: labels.unwrap_or_default(),
        live_attach,
    })
}

/// The VM, if it exists (and is ours).
pub async fn find(client: &Client, vm: &str) -> Result<Option<VmInfo>> {
    match client.docker.inspect_container(vm, None).await {
        Ok(c) => Ok(info_from(vm, c)),
        Err(e) => {
            let err = DockerError::api(&client.endpoint, format!("inspecting container {vm}"), e);
            if err.is_not_found() {
                Ok(None)
            } else {
                Err(err)
            }
        }
    }
}

/// The VM, or `VmNotFound`.
pub async fn require(client: &Client, vm: &str) -> Result<VmInfo> {
    find(client, vm)
        .await?
        .ok_or_else(|| DockerError::VmNotFound(vm.to_owned()))
}

/// An image to run helper containers from: the configured one, the VM's, or any of
/// our VMs' or stemcells'.
pub async fn helper_image(
    cpi: &DockerCpi,
    client: &Client,
    vm: Option<&VmInfo>,
) -> Result<Option<String>> {
    if let Some(img) = &cpi.config().helper_image {
        return Ok(Some(img.clone()));
    }
    if let Some(vm) = vm.filter(|v| !v.image.is_empty()) {
        return Ok(Some(vm.image.clone()));
    }
    let vms = client
        .docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            limit: Some(1),
            filters: Some(HashMap::from([(
                "label".to_owned(),
                labels::filter(labels::KIND_VM),
            )])),
            ..Default::default()
        }))
        .await
        .map_err(client.err("listing VM containers"))?;
    if let Some(img) = vms.into_iter().find_map(|c| c.image_id) {
        return Ok(Some(img));
    }
    let images = client
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
    Ok(images.into_iter().next().map(|i| i.id))
}

/// Stops (gracefully, then by force) and removes a container; a missing one is fine.
/// Returns only once it is gone.
pub async fn remove_container(client: &Client, name: &str, grace_seconds: u64) -> Result<()> {
    let stop = client
        .docker
        .stop_container(
            name,
            Some(StopContainerOptions {
                t: Some(grace_seconds.min(i32::MAX as u64) as i32),
                ..Default::default()
            }),
        )
        .await;
    if let Err(e) = stop {
        let err = DockerError::api(&client.endpoint, format!("stopping container {name}"), e);
        if err.is_not_found() {
            return Ok(());
        }
        // 304: already stopped; anything else: removal with force kills it.
        if err.status() != Some(304) {
            tracing::warn!(container = %name, error = %err, "graceful stop failed; removing by force");
        }
    }
    for attempt in 0..120 {
        match client
            .docker
            .remove_container(
                name,
                Some(RemoveContainerOptions {
                    force: true,
                    v: false,
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => return Ok(()),
            Err(e) => {
                let err =
                    DockerError::api(&client.endpoint, format!("removing container {name}"), e);
                if err.is_not_found() {
                    return Ok(());
                }
                // "removal of container ... is already in progress": wait for it.
                if err.is_conflict() && attempt < 119 {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
                return Err(err);
            }
        }
    }
    Ok(())
}

/// Removes a volume; a missing one is fine.
pub async fn remove_volume(client: &Client, name: &str) -> Result<()> {
    match client
        .docker
        .remove_volume(name, None::<RemoveVolumeOptions>)
        .await
    {
        Ok(()) => Ok(()),
        Err(e) => {
            let err = DockerError::api(&client.endpoint, format!("removing volume {name}"), e);
            if err.is_not_found() {
                Ok(())
            } else {
                Err(err)
            }
        }
    }
}

pub(crate) async fn list_by_label(
    client: &Client,
    kind: &str,
    key: &str,
    value: &str,
) -> Result<Vec<String>> {
    let mut filter = labels::filter(kind);
    filter.push(format!("{key}={value}"));
    let found = client
        .docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([("label".to_owned(), filter)])),
            ..Default::default()
        }))
        .await
        .map_err(client.err(format!("listing {kind} containers of {value}")))?;
    Ok(found.into_iter().filter_map(|c| c.id).collect())
}

/// `delete_vm`: container, metadata holder, mounts and directory, ephemeral volume.
/// Idempotent; persistent disks survive. Every step runs even if an earlier one
/// failed; the first failure is reported with the others.
pub async fn delete_vm(cpi: &DockerCpi, ctx: &CallContext, vm: &VmCid) -> Result<()> {
    let client = cpi.client().await?;
    let vm = vm.as_str();
    let info = match client.docker.inspect_container(vm, None).await {
        Ok(c) => {
            let labels = c.config.as_ref().and_then(|cfg| cfg.labels.clone());
            if !is_vm(vm, labels.as_ref()) {
                return Err(DockerError::Conflict(format!(
                    "container {vm} was not created by this CPI (no {} label); not deleting it",
                    labels::OWNER
                )));
            }
            info_from(vm, c)
        }
        Err(e) => {
            let err = DockerError::api(&client.endpoint, format!("inspecting container {vm}"), e);
            if !err.is_not_found() {
                return Err(err);
            }
            None
        }
    };
    let mut errors = Vec::new();
    if info.is_some() {
        tracing::info!(vm_cid = %vm, "stopping and removing the VM container");
        if let Err(e) = remove_container(client, vm, cpi.config().stop_timeout_seconds).await {
            errors.push(e);
        }
    }
    let mounter = cpi.mounter(client);
    let layout = cpi.layout(mounter);
    let record = layout
        .as_ref()
        .ok()
        .and_then(|layout| crate::vm::metadata::HolderRecord::of(mounter, layout, vm));
    match crate::vm::metadata::holders(client, record.as_ref(), vm).await {
        Ok(ids) => {
            for id in ids {
                if let Err(e) = crate::vm::metadata::remove_holder(client, &id, vm).await {
                    errors.push(e);
                }
            }
        }
        Err(e) => errors.push(e),
    }
    let dir_result = match mounter {
        Mounter::Local => layout.and_then(|layout| disk::local::remove_vm(&layout, vm)),
        Mounter::Helper => match helper_image(cpi, client, info.as_ref()).await {
            Ok(Some(image)) => match layout {
                Ok(layout) => disk::remote::remove_vm(client, ctx, &layout, &image, vm).await,
                Err(e) => Err(e),
            },
            Ok(None) => {
                tracing::warn!(vm_cid = %vm, "no image to run a helper from: the VM's state directory (if any) is left behind");
                Ok(())
            }
            Err(e) => Err(e),
        },
    };
    if let Err(e) = dir_result {
        errors.push(e);
    }
    if let Err(e) = remove_volume(client, &ephemeral_volume(vm)).await {
        errors.push(e);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        let first = errors.remove(0);
        Err(first.with_cleanup(errors))
    }
}

/// `reboot_vm`: a real restart (stop with grace, start). The root file system, the
/// ephemeral volume and the attached disks stay: the disks are mounts on the host
/// side of the VM's `rslave` disks directory, which the restarted container binds
/// again with everything mounted below it. Mounts lost meanwhile (the daemon's host
/// rebooted) are re-established from the VM's settings first.
pub async fn reboot_vm(cpi: &DockerCpi, ctx: &CallContext, vm: &VmCid) -> Result<()> {
    let client = cpi.client().await?;
    let info = require(client, vm.as_str()).await?;
    if info.live_attach {
        disk::reestablish(cpi, client, ctx, &info).await?;
    }
    tracing::info!(vm_cid = %vm, running = info.running, "restarting the VM container");
    client
        .docker
        .restart_container(
            vm.as_str(),
            Some(RestartContainerOptions {
                t: Some(cpi.config().stop_timeout_seconds.min(i32::MAX as u64) as i32),
                ..Default::default()
            }),
        )
        .await
        .map_err(client.err(format!("restarting container {vm}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vms_are_ours_or_unlabelled_go_cpi_vms() {
        let ours = HashMap::from([
            (labels::OWNER.to_owned(), "true".to_owned()),
            (labels::KIND.to_owned(), labels::KIND_VM.to_owned()),
        ]);
        assert!(is_vm("c-1", Some(&ours)));
        assert!(is_vm("anything", Some(&ours)));
        assert!(is_vm("c-1", None));
        assert!(is_vm("c-1", Some(&HashMap::new())));
        assert!(!is_vm("web", None));
        let helper = HashMap::from([
            (labels::OWNER.to_owned(), "true".to_owned()),
            (labels::KIND.to_owned(), labels::KIND_HELPER.to_owned()),
        ]);
        assert!(!is_vm("c-1", Some(&helper)));
    }
}
