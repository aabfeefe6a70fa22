//! Live attach and detach, `get_disks`, and re-establishing lost mounts: the mount
//! table on the daemon's host is the truth, the agent settings follow it.

use cpi_core::agent_settings::disk_path_in_vm;
use cpi_core::{CallContext, DiskCid, DiskHint, VmCid};

use super::mounts::{self, StateLayout};
use super::{find, local, mount_table, remote, require};
use crate::client::Client;
use crate::error::{DockerError, Result};
use crate::vm::lifecycle::{self, VmInfo};
use crate::{agent_env, DockerCpi, Mounter};

/// Mounts a disk for a VM without touching its settings (`create_vm` writes them
/// afterwards; `reboot_vm` re-establishes what they list). Returns whether it mounted:
/// a missing disk, or one attached to another VM, is skipped with a warning.
pub(crate) async fn attach_for_new_vm(
    client: &Client,
    ctx: &CallContext,
    mounter: Mounter,
    layout: &StateLayout,
    image: &str,
    vm: &str,
    disk: &str,
) -> Result<bool> {
    let Some(info) = find(client, disk).await? else {
        tracing::warn!(disk_cid = %disk, "disk does not exist (any more); not attaching it");
        return Ok(false);
    };
    match mounter {
        Mounter::Local => {
            let elsewhere = local::vms_with_disk(layout, disk)?;
            if !elsewhere.is_empty() {
                tracing::warn!(disk_cid = %disk, vms = ?elsewhere, "disk is attached to another VM; not attaching it here");
                return Ok(false);
            }
            local::attach(layout, vm, disk, std::path::Path::new(&info.mountpoint))?;
            Ok(true)
        }
        Mounter::Helper => match remote::attach(client, ctx, layout, image, vm, disk).await? {
            remote::AttachOutcome::Mounted => Ok(true),
            remote::AttachOutcome::AlreadyAttached(vms) => {
                tracing::warn!(disk_cid = %disk, vms = ?vms, "disk is attached to another VM; not attaching it here");
                Ok(false)
            }
        },
    }
}

/// Undoes a mount (for cleanup paths).
pub(crate) async fn unmount(
    client: &Client,
    ctx: &CallContext,
    mounter: Mounter,
    layout: &StateLayout,
    image: &str,
    vm: &str,
    disk: &str,
) -> Result<()> {
    match mounter {
        Mounter::Local => local::detach(layout, vm, disk),
        Mounter::Helper => remote::detach(client, ctx, layout, image, vm, disk)
            .await
            .map(|_| ()),
    }
}

/// The host lock that serializes attaches and detaches (see [`crate::hostlock`]).
async fn disks_lock(cpi: &DockerCpi, client: &Client) -> Result<crate::hostlock::HostLock> {
    crate::hostlock::acquire(
        crate::hostlock::Scope::Disks,
        &client.endpoint,
        std::time::Duration::from_secs(cpi.config().timeout_seconds),
    )
    .await
}

/// `attach_disk`: live, no restart. Idempotent for a disk already attached to this VM;
/// refused for a disk attached to another VM.
pub async fn attach_disk(
    cpi: &DockerCpi,
    ctx: &CallContext,
    vm: &VmCid,
    disk: &DiskCid,
) -> Result<DiskHint> {
    let client = cpi.client().await?;
    let info = lifecycle::require(client, vm.as_str()).await?;
    if !info.live_attach {
        return Err(DockerError::Conflict(format!(
            "VM {vm} has no {} directory (it was created by another CPI); recreate it to attach disks",
            crate::vm::spec::DISKS_TARGET
        )));
    }
    let vol = require(client, disk.as_str()).await?;
    // Check, mount and settings update as one step among concurrent CPI processes.
    let _lock = disks_lock(cpi, client).await?;
    let mounter = cpi.mounter(client);
    let layout = cpi.layout(mounter)?;
    let image = match mounter {
        Mounter::Local => String::new(),
        Mounter::Helper => lifecycle::helper_image(cpi, client, Some(&info))
            .await?
            .unwrap_or_default(),
    };
    let newly = match mounter {
        Mounter::Local => {
            let vms = local::vms_with_disk(&layout, disk.as_str())?;
            if vms.iter().any(|v| v == vm.as_str()) {
                false
            } else if !vms.is_empty() {
                return Err(attached_elsewhere(disk, &vms));
            } else {
                local::attach(
                    &layout,
                    vm.as_str(),
                    disk.as_str(),
                    std::path::Path::new(&vol.mountpoint),
                )?;
                true
            }
        }
        Mounter::Helper => {
            match remote::attach(client, ctx, &layout, &image, vm.as_str(), disk.as_str()).await? {
                remote::AttachOutcome::Mounted => true,
                remote::AttachOutcome::AlreadyAttached(vms)
                    if vms.iter().any(|v| v == vm.as_str()) =>
                {
                    false
                }
                remote::AttachOutcome::AlreadyAttached(vms) => {
                    return Err(attached_elsewhere(disk, &vms))
                }
            }
        }
    };
    let copy = super::settings_copy(mounter, &layout, vm.as_str());
    let update = async {
        let mut settings = agent_env::read_via(client, copy.as_ref(), vm.as_str()).await?;
        settings.attach_persistent(disk);
        agent_env::write_via(client, copy.as_ref(), vm.as_str(), &settings).await
    };
    if let Err(e) = update.await {
        if newly {
            let undo = unmount(
                client,
                ctx,
                mounter,
                &layout,
                &image,
                vm.as_str(),
                disk.as_str(),
            )
            .await;
            return Err(e.with_cleanup(undo.err().into_iter().collect()));
        }
        return Err(e);
    }
    tracing::info!(vm_cid = %vm, disk_cid = %disk, already = !newly, "disk attached live");
    Ok(DiskHint(disk_path_in_vm(disk)))
}

fn attached_elsewhere(disk: &DiskCid, vms: &[String]) -> DockerError {
    DockerError::Conflict(format!(
        "disk {disk} is attached to VM {}; detach it there first",
        vms.join(", ")
    ))
}

/// Re-mounts the disks the VM's settings list but the mount table lacks (after the
/// daemon's host rebooted, its mounts are gone while the containers and settings
/// stay). Disks that no longer exist or are attached elsewhere are left out.
pub async fn reestablish(
    cpi: &DockerCpi,
    client: &Client,
    ctx: &CallContext,
    vm: &VmInfo,
) -> Result<()> {
    let mounter = cpi.mounter(client);
    let layout = cpi.layout(mounter)?;
    let copy = super::settings_copy(mounter, &layout, &vm.name);
    let settings = agent_env::read_via(client, copy.as_ref(), &vm.name).await?;
    let wanted = settings.persistent_disks();
    if wanted.is_empty() {
        return Ok(());
    }
    let table = mount_table(cpi, client, ctx, mounter, &layout, Some(vm)).await?;
    let attached = mounts::attached_disks(&table, &layout);
    let mine = attached.get(&vm.name).cloned().unwrap_or_default();
    let image = lifecycle::helper_image(cpi, client, Some(vm))
        .await?
        .unwrap_or_default();
    if mounter == Mounter::Local {
        local::prepare_vm(&layout, &vm.name)?;
    }
    for disk in wanted.iter().filter(|d| !mine.contains(*d)) {
        if !cpi_core::ids::is_simple_name(disk) {
            continue;
        }
        tracing::info!(vm_cid = %vm.name, disk_cid = %disk, "re-establishing the mount of an attached disk");
        attach_for_new_vm(client, ctx, mounter, &layout, &image, &vm.name, disk).await?;
    }
    Ok(())
}

/// `detach_disk`: live. `DiskNotAttached` when the disk is not mounted for the VM.
pub async fn detach_disk(
    cpi: &DockerCpi,
    ctx: &CallContext,
    vm: &VmCid,
    disk: &DiskCid,
) -> Result<()> {
    let client = cpi.client().await?;
    let info = lifecycle::require(client, vm.as_str()).await?;
    let exists = find(client, disk.as_str()).await?.is_some();
    let _lock = disks_lock(cpi, client).await?;
    let mounter = cpi.mounter(client);
    let layout = cpi.layout(mounter)?;
    let was_attached = match mounter {
        Mounter::Local => {
            let attached = local::is_attached(&layout, vm.as_str(), disk.as_str())?;
            if attached {
                local::detach(&layout, vm.as_str(), disk.as_str())?;
            }
            attached
        }
        Mounter::Helper => {
            let image = lifecycle::helper_image(cpi, client, Some(&info))
                .await?
                .unwrap_or_default();
            remote::detach(client, ctx, &layout, &image, vm.as_str(), disk.as_str()).await?
        }
    };
    // The settings follow the mounts, also when only the settings still had it.
    let copy = super::settings_copy(mounter, &layout, vm.as_str());
    let mut settings = agent_env::read_via(client, copy.as_ref(), vm.as_str()).await?;
    let in_settings = settings.detach_persistent(disk);
    if in_settings || was_attached {
        agent_env::write_via(client, copy.as_ref(), vm.as_str(), &settings).await?;
    }
    if !was_attached && in_settings && exists {
        // A detach killed after the unmount, finished now: success, as the director
        // asked for.
        tracing::info!(vm_cid = %vm, disk_cid = %disk, "finished an interrupted detach");
        return Ok(());
    }
    if !was_attached {
        if !exists {
            return Err(DockerError::DiskNotFound(disk.to_string()));
        }
        return Err(DockerError::DiskNotAttached {
            vm: vm.to_string(),
            disk: disk.to_string(),
        });
    }
    tracing::info!(vm_cid = %vm, disk_cid = %disk, "disk detached live");
    Ok(())
}

/// `get_disks`: what is mounted for the VM. Takes the client because the lookups
/// may run on one with a remembered API version ([`DockerCpi::lookup`]).
pub async fn get_disks(
    cpi: &DockerCpi,
    client: &Client,
    ctx: &CallContext,
    vm: &VmCid,
) -> Result<Vec<DiskCid>> {
    let info = lifecycle::require(client, vm.as_str()).await?;
    let mounter = cpi.mounter(client);
    let layout = cpi.layout(mounter)?;
    let disks = match mounter {
        // The VM's own mount points, not the host's whole mount table.
        Mounter::Local => local::disks_of_vm(&layout, vm.as_str())?,
        Mounter::Helper => {
            let table = mount_table(cpi, client, ctx, mounter, &layout, Some(&info)).await?;
            mounts::attached_disks(&table, &layout)
                .remove(vm.as_str())
                .unwrap_or_default()
                .into_iter()
                .collect()
        }
    };
    disks
        .into_iter()
        .map(|d| DiskCid::new(d).map_err(|e| DockerError::Invalid(e.message)))
        .collect()
}
