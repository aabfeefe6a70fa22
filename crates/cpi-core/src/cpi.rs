//! The [`Cpi`] trait: what every backend implements, in typed terms.
//!
//! The dispatcher ([`crate::protocol`]) turns wire requests into these calls and their
//! results back into wire shapes, so a backend never sees JSON arrays or API versions.

use std::path::PathBuf;

use async_trait::async_trait;
use serde_json::{Map, Value};

use crate::cloud_properties::{VmCloudProperties, VmResources};
use crate::error::{CpiError, CpiResult};
use crate::ids::{AgentId, DiskCid, SnapshotCid, StemcellCid, VmCid};
use crate::network::Networks;

/// What the request's `context` told us, for backends that label what they create.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallContext {
    /// `context.director_uuid`.
    pub director_uuid: Option<String>,
    /// `context.request_id`.
    pub request_id: Option<String>,
    /// The request's `api_version` (1 when absent).
    pub api_version: u32,
    /// `context.vm.stemcell.api_version`, when the director knows it.
    pub stemcell_api_version: Option<u64>,
    /// Every other top-level `context` key: cpi-config properties that override the
    /// config file. The binary applies them before building the backend.
    pub overrides: Map<String, Value>,
}

/// Arguments of `create_stemcell`.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateStemcell {
    /// The unpacked stemcell's `image` file; `stemcell.MF` sits beside it.
    pub image_path: PathBuf,
    /// The stemcell's cloud properties as the director sent them.
    pub cloud_properties: Map<String, Value>,
}

/// Arguments of `create_vm`.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateVm {
    /// The agent's id.
    pub agent_id: AgentId,
    /// The stemcell to boot.
    pub stemcell: StemcellCid,
    /// VM cloud properties.
    pub cloud_properties: VmCloudProperties,
    /// The VM's networks.
    pub networks: Networks,
    /// Disks the VM should be placed near (and, on a container CPI, attached at
    /// creation when they already exist).
    pub disk_cids: Vec<DiskCid>,
    /// `env` verbatim; holds secrets.
    pub env: Value,
}

/// Result of `create_vm`.
#[derive(Debug, Clone, PartialEq)]
pub struct CreatedVm {
    /// The new VM's cid.
    pub cid: VmCid,
    /// The networks as configured, with addresses assigned to dynamic networks.
    pub networks: Networks,
}

/// Arguments of `create_disk`.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateDisk {
    /// Size in MiB.
    pub size_mib: u64,
    /// Disk cloud properties.
    pub cloud_properties: Map<String, Value>,
    /// The VM the disk will be attached to, if the director knows it.
    pub vm: Option<VmCid>,
}

/// Metadata of `set_vm_metadata` / `set_disk_metadata` / `snapshot_disk`.
pub type Metadata = Map<String, Value>;

/// The persistent-disk hint returned by a v2 `attach_disk`: the path of the disk
/// inside the VM for warden-type stemcells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskHint(pub String);

/// A BOSH Cloud Provider Interface backend.
///
/// Every method is one CPI call of one process. Implementations must be idempotent
/// where the contract says so, must clean up after themselves on failure, and must use
/// the specific error kinds (`VmNotFound`, `DiskNotFound`, `DiskNotAttached`, ...) where
/// they apply. Optional methods default to an honest `NotImplemented`/`NotSupported`.
#[async_trait]
pub trait Cpi: Send + Sync {
    /// The stemcell formats this backend can actually import, for `info`.
    fn stemcell_formats(&self) -> Vec<String>;

    /// Imports a stemcell (full: the `image` rootfs; light: pulls the named image).
    async fn create_stemcell(
        &self,
        ctx: &CallContext,
        req: CreateStemcell,
    ) -> CpiResult<StemcellCid>;

    /// Removes a stemcell. A missing stemcell is success.
    async fn delete_stemcell(&self, ctx: &CallContext, cid: &StemcellCid) -> CpiResult<()>;

    /// Creates and starts a VM.
    async fn create_vm(&self, ctx: &CallContext, req: CreateVm) -> CpiResult<CreatedVm>;

    /// Deletes a VM and everything it owns except persistent disks. A missing VM is
    /// success; must not return before the VM is really gone.
    async fn delete_vm(&self, ctx: &CallContext, cid: &VmCid) -> CpiResult<()>;

    /// Whether the VM exists.
    async fn has_vm(&self, ctx: &CallContext, cid: &VmCid) -> CpiResult<bool>;

    /// Restarts the VM, keeping its root filesystem, ephemeral data and disks.
    async fn reboot_vm(&self, ctx: &CallContext, cid: &VmCid) -> CpiResult<()>;

    /// Records the VM's metadata where an operator can see it.
    async fn set_vm_metadata(
        &self,
        ctx: &CallContext,
        cid: &VmCid,
        metadata: &Metadata,
    ) -> CpiResult<()>;

    /// Cloud properties that give a VM these resources when passed to `create_vm`.
    async fn calculate_vm_cloud_properties(
        &self,
        _ctx: &CallContext,
        req: VmResources,
    ) -> CpiResult<Value> {
        Ok(req.to_cloud_properties())
    }

    /// Creates a persistent disk.
    async fn create_disk(&self, ctx: &CallContext, req: CreateDisk) -> CpiResult<DiskCid>;

    /// Deletes a disk. A missing disk is success; an attached disk is refused.
    async fn delete_disk(&self, ctx: &CallContext, cid: &DiskCid) -> CpiResult<()>;

    /// Whether the disk exists.
    async fn has_disk(&self, ctx: &CallContext, cid: &DiskCid) -> CpiResult<bool>;

    /// Attaches a disk to a running VM, live, and returns where the VM sees it.
    async fn attach_disk(
        &self,
        ctx: &CallContext,
        vm: &VmCid,
        disk: &DiskCid,
    ) -> CpiResult<DiskHint>;

    /// Detaches a disk, live. `DiskNotAttached` when it is not attached to that VM.
    async fn detach_disk(&self, ctx: &CallContext, vm: &VmCid, disk: &DiskCid) -> CpiResult<()>;

    /// The disks attached to the VM.
    async fn get_disks(&self, ctx: &CallContext, vm: &VmCid) -> CpiResult<Vec<DiskCid>>;

    /// Records the disk's metadata.
    async fn set_disk_metadata(
        &self,
        ctx: &CallContext,
        cid: &DiskCid,
        metadata: &Metadata,
    ) -> CpiResult<()>;

    /// Resizes a disk for real, or answers `NotSupported` (the director then copies).
    async fn resize_disk(
        &self,
        _ctx: &CallContext,
        _cid: &DiskCid,
        _new_size_mib: u64,
    ) -> CpiResult<()> {
        Err(CpiError::not_supported(
            "Method 'resize_disk' is not supported by this CPI backend",
        ))
    }

    /// Changes a disk's size or type; `None` when done in place.
    async fn update_disk(
        &self,
        _ctx: &CallContext,
        _cid: &DiskCid,
        _new_size_mib: u64,
        _cloud_properties: &Map<String, Value>,
    ) -> CpiResult<Option<DiskCid>> {
        Err(CpiError::not_supported(
            "Method 'update_disk' is not supported by this CPI backend",
        ))
    }

    /// Snapshots a disk.
    async fn snapshot_disk(
        &self,
        _ctx: &CallContext,
        _cid: &DiskCid,
        _metadata: &Metadata,
    ) -> CpiResult<SnapshotCid> {
        Err(CpiError::not_implemented(
            "Method 'snapshot_disk' is not implemented by this CPI backend",
        ))
    }

    /// Deletes a snapshot.
    async fn delete_snapshot(&self, _ctx: &CallContext, _cid: &SnapshotCid) -> CpiResult<()> {
        Err(CpiError::not_implemented(
            "Method 'delete_snapshot' is not implemented by this CPI backend",
        ))
    }
}
