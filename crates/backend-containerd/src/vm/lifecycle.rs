//! `delete_vm`, `has_vm`, `reboot_vm` and `set_vm_metadata`.

use std::time::Duration;

use containerd_client::services::v1::snapshots::MountsRequest;
use containerd_client::services::v1::{Container, UpdateContainerRequest};
use cpi_core::{CpiResult, Metadata, VmCid};
use prost_types::FieldMask;

use crate::error::{ContainerdError, Result};
use crate::vm::{create, get_container, require_container, stop_task};
use crate::ContainerdCpi;
use crate::{labels, mount, network};

impl ContainerdCpi {
    pub(crate) async fn do_delete_vm(&self, cid: &VmCid) -> CpiResult<()> {
        if !crate::vm::plausible_vm_cid(cid.as_str()) {
            tracing::info!(vm_cid = %cid, "not a VM cid of this CPI: nothing to delete");
            return Ok(());
        }
        let d = self.daemon().await?;
        let failures = self.destroy_vm(d, cid.as_str()).await;
        if failures.is_empty() {
            tracing::info!(vm_cid = %cid, "VM deleted");
            Ok(())
        } else {
            Err(ContainerdError::Refused(format!(
                "deleting VM {cid} left work undone (delete_vm can be retried): {}",
                failures.join("; ")
            ))
            .into())
        }
    }

    pub(crate) async fn do_has_vm(&self, cid: &VmCid) -> CpiResult<bool> {
        let d = self.daemon().await?;
        Ok(get_container(d, cid.as_str()).await?.is_some())
    }

    pub(crate) async fn do_reboot_vm(&self, cid: &VmCid) -> CpiResult<()> {
        let d = self.daemon().await?;
        let container = require_container(d, cid.as_str()).await?;
        let init = container
            .labels
            .get(labels::INIT)
            .cloned()
            .unwrap_or_default();
        let grace = Duration::from_secs(self.config.stop_grace_seconds);
        stop_task(d, cid.as_str(), &init, grace).await?;
        self.restore_host_state(cid.as_str()).await?;
        // The same snapshot: root filesystem changes, /var/vcap/data and the disk
        // mounts below the VM's shared directory all stay.
        let mounts = d
            .call(
                format!("Snapshots.Mounts {}", container.snapshot_key),
                d.snapshots().mounts(d.req(MountsRequest {
                    snapshotter: container.snapshotter.clone(),
                    key: container.snapshot_key.clone(),
                })),
            )
            .await?
            .mounts;
        let paths = self.vm_paths(cid.as_str());
        let pid = create::start_task(d, cid.as_str(), mounts, &paths).await?;
        tracing::info!(vm_cid = %cid, pid, "VM restarted");
        Ok(())
    }

    /// Puts back what the host loses on a reboot while containerd keeps the
    /// container: the shared disks mount point, the binds of the disks recorded as
    /// attached to the VM, and the network namespace with its CNI attachments (the
    /// recorded configuration, so manual addresses are the same; `host-local` hands a
    /// dynamic network the address it still has on record for the VM).
    async fn restore_host_state(&self, cid: &str) -> Result<()> {
        let paths = self.vm_paths(cid);
        if !paths.dir.is_dir() {
            return Err(ContainerdError::Refused(format!(
                "VM {cid} has no directory {} any more; recreate the VM",
                paths.dir.display()
            )));
        }
        mount::ensure_shared_mount_point(&paths.disks)?;
        self.rebind_disks(&paths, cid)?;
        if network::cni::netns_path(cid).exists() {
            return Ok(());
        }
        let Some(mut state) = network::read_state(&paths.network_state)? else {
            return Ok(());
        };
        tracing::info!(vm_cid = %cid, "the VM's network namespace is gone (host reboot?): setting its networks up again");
        let before: Vec<_> = state
            .attachments
            .iter()
            .map(|a| a.result.as_ref().map(network::cni::result_ips))
            .collect();
        // Release what the old attachments still hold (host-local's allocations,
        // host rules), then add them again with the same addresses.
        // The namespace is gone (that is why this runs): nothing waits on it.
        let failures = network::del_all(&state, &self.config.cni_bin_dir, false).await;
        if !failures.is_empty() {
            return Err(ContainerdError::Refused(format!(
                "releasing the old network attachments of VM {cid}: {}",
                failures.join("; ")
            )));
        }
        network::prepare_readd(&mut state);
        network::setup(
            &self.config.state_dir,
            &paths.network_state,
            &mut state,
            &self.config.cni_bin_dir,
        )
        .await?;
        for (a, old) in state.attachments.iter().zip(before) {
            let new = a.result.as_ref().map(network::cni::result_ips);
            if old.is_some() && new != old {
                tracing::warn!(vm_cid = %cid, ifname = %a.ifname, ?old, ?new,
                    "the interface got a different address than before; the agent settings still name the old one");
            }
        }
        Ok(())
    }

    pub(crate) async fn do_set_vm_metadata(
        &self,
        cid: &VmCid,
        metadata: &Metadata,
    ) -> CpiResult<()> {
        let d = self.daemon().await?;
        let container = require_container(d, cid.as_str()).await?;
        let new_labels = labels::replace_metadata(&container.labels, metadata);
        d.call(
            format!("Containers.Update {cid} labels"),
            d.containers().update(d.req(UpdateContainerRequest {
                container: Some(Container {
                    id: cid.to_string(),
                    labels: new_labels,
                    ..Default::default()
                }),
                update_mask: Some(FieldMask {
                    paths: vec!["labels".into()],
                }),
            })),
        )
        .await?;
        Ok(())
    }
}
