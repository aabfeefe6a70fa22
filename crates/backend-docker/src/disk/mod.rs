//! Persistent disks: Docker local volumes `vol-<uuid>`, attached to running VMs live.
//!
//! Each VM binds its host directory `<state_dir>/vms/<vm>/disks` at `/warden-cpi-dev`
//! with `rslave` propagation. Attaching bind-mounts the volume's directory onto
//! `<state_dir>/vms/<vm>/disks/<disk>` on the daemon's host; propagation makes it
//! appear at `/warden-cpi-dev/<disk>` inside the running VM, with no restart. The
//! agent settings file is then updated in place. The mount table is the truth about
//! attachments ([`mounts`]); the mounting is done directly ([`local`]) or by a helper
//! container ([`remote`]).

pub mod attach;
pub mod local;
pub mod mounts;
pub mod remote;

use std::collections::HashMap;

use bollard::models::VolumeCreateRequest;
use bollard::query_parameters::ListVolumesOptions;
use cpi_core::{CallContext, CreateDisk, DiskCid, Metadata};

use crate::client::Client;
use crate::error::{DockerError, Result};
use crate::vm::lifecycle::{self, VmInfo};
use crate::{labels, DockerCpi, Mounter};

use self::mounts::{MountEntry, StateLayout};

pub use attach::{attach_disk, detach_disk, get_disks, reestablish};

/// The host copy of a VM's settings ([`crate::agent_env::HostCopy`]): kept with the local
/// mounter, where the VM's state directory is on this host; none with the helper.
pub fn settings_copy(
    mounter: Mounter,
    layout: &StateLayout,
    vm: &str,
) -> Option<crate::agent_env::HostCopy> {
    (mounter == Mounter::Local).then(|| crate::agent_env::HostCopy::new(layout.vm_dir(vm)))
}
pub(crate) use attach::{attach_for_new_vm, unmount};

/// What we need to know of a disk volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// The volume name (the disk cid).
    pub name: String,
    /// Its directory on the daemon's host.
    pub mountpoint: String,
}

/// Whether a volume is one of our disks: labelled so, or (disks of the Go Docker CPI)
/// unlabelled and named `vol-…` but not an ephemeral volume.
pub fn is_disk(name: &str, labels: &HashMap<String, String>) -> bool {
    labels::is_ours(Some(labels), labels::KIND_DISK)
        || (name.starts_with("vol-")
            && !name.starts_with("vol-eph-")
            && !labels.contains_key(labels::OWNER))
}

/// The disk, if it exists (and is ours).
pub async fn find(client: &Client, disk: &str) -> Result<Option<DiskInfo>> {
    match client.docker.inspect_volume(disk).await {
        Ok(v) if v.name == disk && is_disk(&v.name, &v.labels) => Ok(Some(DiskInfo {
            name: v.name,
            mountpoint: v.mountpoint,
        })),
        Ok(_) => Ok(None),
        Err(e) => {
            let err = DockerError::api(&client.endpoint, format!("inspecting volume {disk}"), e);
            if err.is_not_found() {
                Ok(None)
            } else {
                Err(err)
            }
        }
    }
}

pub(crate) async fn require(client: &Client, disk: &str) -> Result<DiskInfo> {
    find(client, disk)
        .await?
        .ok_or_else(|| DockerError::DiskNotFound(disk.to_owned()))
}

/// `create_disk`: a local volume, labelled with its requested size.
pub async fn create_disk(cpi: &DockerCpi, ctx: &CallContext, req: &CreateDisk) -> Result<DiskCid> {
    let size = cpi_core::cloud_properties::check_disk_size(req.size_mib)
        .map_err(|e| DockerError::Invalid(e.message))?;
    let client = cpi.client().await?;
    let name = format!("vol-{}", uuid::Uuid::new_v4());
    let mut l = labels::base(labels::KIND_DISK, ctx);
    l.insert(labels::SIZE_MIB.to_owned(), size.to_string());
    client
        .docker
        .create_volume(VolumeCreateRequest {
            name: Some(name.clone()),
            driver: Some("local".into()),
            labels: Some(l),
            ..Default::default()
        })
        .await
        .map_err(client.err(format!("creating volume {name}")))?;
    tracing::info!(disk_cid = %name, size_mib = size, "created disk; its size is recorded, not enforced (Docker's local volume driver cannot limit a volume)");
    DiskCid::new(name).map_err(|e| DockerError::Invalid(e.message))
}

/// The mount table of the daemon's host (the attachments), through `mounter`.
pub(crate) async fn mount_table(
    cpi: &DockerCpi,
    client: &Client,
    ctx: &CallContext,
    mounter: Mounter,
    layout: &StateLayout,
    vm: Option<&VmInfo>,
) -> Result<Vec<MountEntry>> {
    match mounter {
        Mounter::Local => local::read_mounts(),
        Mounter::Helper => match lifecycle::helper_image(cpi, client, vm).await? {
            Some(image) => remote::mount_table(client, ctx, layout, &image).await,
            // No image at all means no VM at all: nothing can be attached.
            None => Ok(Vec::new()),
        },
    }
}

/// `delete_disk`: refuses while the disk is attached to any VM; a missing disk is
/// success.
pub async fn delete_disk(cpi: &DockerCpi, ctx: &CallContext, disk: &DiskCid) -> Result<()> {
    let client = cpi.client().await?;
    if find(client, disk.as_str()).await?.is_some() {
        let mounter = cpi.mounter(client);
        let layout = cpi.layout(mounter)?;
        let table = mount_table(cpi, client, ctx, mounter, &layout, None).await?;
        let vms = mounts::vms_with_disk(&table, &layout, disk.as_str());
        if !vms.is_empty() {
            return Err(DockerError::Conflict(format!(
                "disk {disk} is attached to VM {}; detach it before deleting it",
                vms.join(", ")
            )));
        }
        lifecycle::remove_volume(client, disk.as_str()).await.map_err(|e| {
            if e.is_conflict() {
                DockerError::Conflict(format!(
                    "disk {disk} is in use by a container ({}); is a helper container still running?",
                    e.daemon_message().unwrap_or_default()
                ))
            } else {
                e
            }
        })?;
    }
    lifecycle::remove_volume(client, &metadata_volume(disk.as_str())).await
}

/// The name of a disk's metadata holder volume.
pub fn metadata_volume(disk: &str) -> String {
    format!("{disk}.meta")
}

/// `set_disk_metadata`: volume labels cannot change, so the metadata goes on a
/// holder volume `<disk>.meta` (no data), replaced on every call.
pub async fn set_disk_metadata(
    cpi: &DockerCpi,
    ctx: &CallContext,
    disk: &DiskCid,
    metadata: &Metadata,
) -> Result<()> {
    let client = cpi.client().await?;
    require(client, disk.as_str()).await?;
    let name = metadata_volume(disk.as_str());
    lifecycle::remove_volume(client, &name).await?;
    let mut l = labels::base(labels::KIND_DISK_METADATA, ctx);
    l.extend(crate::vm::metadata::metadata_labels(metadata));
    l.insert(labels::DISK_CID.to_owned(), disk.to_string());
    client
        .docker
        .create_volume(VolumeCreateRequest {
            name: Some(name.clone()),
            driver: Some("local".into()),
            labels: Some(l),
            ..Default::default()
        })
        .await
        .map_err(client.err(format!("creating the metadata holder volume {name}")))?;
    Ok(())
}

/// Every disk volume of ours (for tests and operators).
pub async fn list(client: &Client) -> Result<Vec<String>> {
    let resp = client
        .docker
        .list_volumes(Some(ListVolumesOptions {
            filters: Some(HashMap::from([(
                "label".to_owned(),
                labels::filter(labels::KIND_DISK),
            )])),
        }))
        .await
        .map_err(client.err("listing volumes"))?;
    Ok(resp
        .volumes
        .unwrap_or_default()
        .into_iter()
        .map(|v| v.name)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_are_ours_or_go_cpi_volumes() {
        let mut ours = labels::base(labels::KIND_DISK, &CallContext::default());
        assert!(is_disk("vol-1", &ours));
        assert!(is_disk("vol-1", &HashMap::new()));
        assert!(!is_disk("vol-eph-c-1", &HashMap::new()));
        assert!(!is_disk("data", &HashMap::new()));
        ours.insert(labels::KIND.into(), labels::KIND_EPHEMERAL.into());
        assert!(!is_disk("vol-1", &ours));
    }

    #[test]
    fn metadata_volume_names() {
        assert_eq!(metadata_volume("vol-1"), "vol-1.meta");
    }
}
