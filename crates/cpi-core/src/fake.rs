//! An in-memory backend implementing the whole [`Cpi`] trait, for protocol and
//! conformance tests that must run without a daemon.
//!
//! [`FakeCpi`] behaves like a correct CPI, not like the Go ones: typed errors
//! (`VMNotFound`, `DiskNotFound`, `DiskNotAttached`), idempotent deletes, a truthful
//! `get_disks`, real (recorded) reboots, resizes and snapshots, live attach that
//! updates the VM's agent settings, addresses assigned to dynamic networks and
//! manual addresses refused when another VM holds them.
//!
//! Everything lives in a [`FakeState`], which is serde-serialisable so that the `cpi`
//! binary can keep it in a file between processes ([`FakeCpi::new`] /
//! [`FakeCpi::state`]); the binary owns the file locking.
//!
//! **IO:** this is the one module of `cpi-core` that touches the file system:
//! `create_stemcell` reads `stemcell.MF` beside the image path with `std::fs`, as every
//! real backend must. It is test-only code behind the `fake` feature, and a blocking
//! read of a few KiB is harmless there.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::agent_settings::{disk_path_in_vm, AgentOptions, AgentSettings};
use crate::cpi::Metadata;
use crate::cpi::{CallContext, Cpi, CreateDisk, CreateStemcell, CreateVm, CreatedVm, DiskHint};
use crate::error::{CpiError, CpiResult};
use crate::ids::{DiskCid, SnapshotCid, StemcellCid, VmCid};
use crate::network::NetworkType;
use crate::stemcell::{manifest_path_for, StemcellManifest, MAX_MANIFEST_BYTES};

/// The stemcell formats the fake accepts (those of the Docker CPI).
pub const FAKE_STEMCELL_FORMATS: [&str; 3] = ["warden-tar", "general-tar", "docker-light"];

/// The pool dynamic networks get their addresses from, with its gateway at `.1`.
pub const DYNAMIC_POOL: &str = "10.254.0.0/16";

/// Everything the fake knows, by cid. Serialises to JSON for the binary's state file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FakeState {
    /// Imported stemcells.
    pub stemcells: BTreeMap<String, FakeStemcell>,
    /// Existing VMs.
    pub vms: BTreeMap<String, FakeVm>,
    /// Existing persistent disks.
    pub disks: BTreeMap<String, FakeDisk>,
    /// Existing disk snapshots.
    pub snapshots: BTreeMap<String, FakeSnapshot>,
}

/// One imported stemcell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FakeStemcell {
    /// `name` from `stemcell.MF`.
    pub name: String,
    /// `version` from `stemcell.MF`.
    pub version: String,
    /// The operating system (from the manifest, or guessed from the name).
    pub operating_system: String,
    /// `stemcell_formats` from the manifest.
    pub stemcell_formats: Vec<String>,
    /// For a light stemcell, the image it names (`reference@digest` when the digest
    /// is known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_reference: Option<String>,
    /// Size of the `image` file in bytes.
    pub image_bytes: u64,
    /// The cloud properties `create_stemcell` was called with.
    pub cloud_properties: Map<String, Value>,
    /// The `director_uuid` of the call that created it, as the real backends label
    /// what they create (tests find leftovers by it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub director_uuid: Option<String>,
}

/// One VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FakeVm {
    /// The stemcell it was created from.
    pub stemcell: String,
    /// Its VM cloud properties as the director sent them.
    pub cloud_properties: Map<String, Value>,
    /// The agent settings document the VM's agent would read; updated on attach and
    /// detach like the real file. Holds `env`, which holds secrets.
    pub settings: AgentSettings,
    /// `set_vm_metadata`, merged.
    pub metadata: Map<String, Value>,
    /// How many times the VM has booted: 1 after `create_vm`, +1 per `reboot_vm`.
    pub boots: u64,
    /// The `director_uuid` of the call that created it, as the real backends label
    /// what they create (tests find leftovers by it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub director_uuid: Option<String>,
}

/// One persistent disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FakeDisk {
    /// Size in MiB.
    pub size_mib: u64,
    /// Its cloud properties.
    pub cloud_properties: Map<String, Value>,
    /// `set_disk_metadata`, merged.
    pub metadata: Map<String, Value>,
    /// The VM it is attached to, if any.
    pub attached_to: Option<String>,
    /// The VM `create_disk` was asked to place it near, if any.
    pub created_near: Option<String>,
    /// The `director_uuid` of the call that created it, as the real backends label
    /// what they create (tests find leftovers by it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub director_uuid: Option<String>,
}

/// One snapshot of a disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FakeSnapshot {
    /// The disk it was taken of (which may since have been deleted).
    pub disk: String,
    /// The disk's size when the snapshot was taken.
    pub size_mib: u64,
    /// The metadata `snapshot_disk` was called with.
    pub metadata: Map<String, Value>,
    /// The `director_uuid` of the call that created it, as the real backends label
    /// what they create (tests find leftovers by it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub director_uuid: Option<String>,
}

/// The in-memory backend. Cheap to build; all state is in [`FakeState`].
#[derive(Debug)]
pub struct FakeCpi {
    state: Mutex<FakeState>,
    agent: AgentOptions,
}

impl FakeCpi {
    /// A backend starting from `state` (use `FakeState::default()` for an empty
    /// world), writing `agent` into every VM's settings.
    pub fn new(state: FakeState, agent: AgentOptions) -> FakeCpi {
        FakeCpi {
            state: Mutex::new(state),
            agent,
        }
    }

    /// A copy of the current state, for the binary to persist.
    pub fn state(&self) -> FakeState {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, FakeState> {
        // A panic while holding the lock leaves consistent data (every method
        // validates before it mutates), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4())
}

/// Every address any VM holds, with the VM holding it.
fn used_addresses(state: &FakeState) -> BTreeMap<IpAddr, String> {
    let mut used = BTreeMap::new();
    for (cid, vm) in &state.vms {
        for net in vm.settings.networks.values() {
            if let Ok(ip) = net.ip.parse::<IpAddr>() {
                used.insert(ip, format!("VM '{cid}'"));
            }
        }
    }
    used
}

fn dynamic_pool() -> Ipv4Net {
    // A constant that parses; the fallback is never taken.
    DYNAMIC_POOL
        .parse()
        .unwrap_or_else(|_| Ipv4Net::new(Ipv4Addr::new(10, 254, 0, 0), 16).unwrap_or_default())
}

fn read_manifest(req: &CreateStemcell) -> CpiResult<(StemcellManifest, u64)> {
    let image = &req.image_path;
    let image_meta = std::fs::metadata(image).map_err(|e| {
        CpiError::cloud(format!(
            "create_stemcell: cannot read the stemcell image {}: {e}; pass the path of the \
             'image' file of an unpacked stemcell",
            image.display()
        ))
    })?;
    if !image_meta.is_file() {
        return Err(CpiError::cloud(format!(
            "create_stemcell: the stemcell image {} is not a file",
            image.display()
        )));
    }
    let mf = manifest_path_for(image);
    let mf_meta = std::fs::metadata(&mf).map_err(|e| {
        CpiError::cloud(format!(
            "create_stemcell: cannot read the stemcell manifest {} beside the image: {e}; \
             an unpacked stemcell has stemcell.MF next to its image",
            mf.display()
        ))
    })?;
    if mf_meta.len() > MAX_MANIFEST_BYTES as u64 {
        return Err(CpiError::cloud(format!(
            "create_stemcell: the stemcell manifest {} is {} bytes; at most {MAX_MANIFEST_BYTES} are accepted",
            mf.display(),
            mf_meta.len()
        )));
    }
    let text = std::fs::read_to_string(&mf).map_err(|e| {
        CpiError::cloud(format!(
            "create_stemcell: cannot read the stemcell manifest {}: {e}",
            mf.display()
        ))
    })?;
    let manifest = StemcellManifest::parse(&text, &mf.display().to_string())?;
    Ok((manifest, image_meta.len()))
}

#[async_trait]
impl Cpi for FakeCpi {
    fn stemcell_formats(&self) -> Vec<String> {
        FAKE_STEMCELL_FORMATS
            .iter()
            .map(|f| (*f).to_owned())
            .collect()
    }

    async fn create_stemcell(
        &self,
        ctx: &CallContext,
        req: CreateStemcell,
    ) -> CpiResult<StemcellCid> {
        let (manifest, image_bytes) = read_manifest(&req)?;
        if !manifest.stemcell_formats.is_empty()
            && !manifest
                .stemcell_formats
                .iter()
                .any(|f| FAKE_STEMCELL_FORMATS.contains(&f.as_str()))
        {
            return Err(CpiError::cloud(format!(
                "create_stemcell: stemcell '{}' has formats [{}]; this CPI imports only [{}]",
                manifest.name,
                manifest.stemcell_formats.join(", "),
                FAKE_STEMCELL_FORMATS.join(", ")
            )));
        }
        let image_reference = if manifest.is_light() {
            let light = manifest.light_image()?;
            Some(match light.digest {
                Some(d) => format!("{}@{d}", light.reference),
                None => light.reference,
            })
        } else {
            None
        };
        let cid = StemcellCid::new(new_id("stemcell"))?;
        tracing::info!(stemcell_cid = %cid, name = %manifest.name, version = %manifest.version, "imported stemcell");
        self.lock().stemcells.insert(
            cid.to_string(),
            FakeStemcell {
                operating_system: manifest.os(),
                name: manifest.name,
                version: manifest.version,
                stemcell_formats: manifest.stemcell_formats,
                image_reference,
                image_bytes,
                cloud_properties: req.cloud_properties,
                director_uuid: ctx.director_uuid.clone(),
            },
        );
        Ok(cid)
    }

    async fn delete_stemcell(&self, _ctx: &CallContext, cid: &StemcellCid) -> CpiResult<()> {
        if self.lock().stemcells.remove(cid.as_str()).is_some() {
            tracing::info!(stemcell_cid = %cid, "deleted stemcell");
        } else {
            tracing::info!(stemcell_cid = %cid, "stemcell already gone");
        }
        Ok(())
    }

    async fn create_vm(&self, ctx: &CallContext, req: CreateVm) -> CpiResult<CreatedVm> {
        let mut state = self.lock();
        if !state.stemcells.contains_key(req.stemcell.as_str()) {
            return Err(CpiError::cloud(format!(
                "create_vm: stemcell '{}' does not exist; upload the stemcell again",
                req.stemcell
            )));
        }
        let mut used = used_addresses(&state);
        let mut networks = req.networks;
        for net in networks.iter_mut() {
            match net.kind {
                NetworkType::Manual | NetworkType::Vip => {
                    if let Some(ip) = net.ip() {
                        if let Some(holder) = used.get(&ip) {
                            return Err(CpiError::vm_creation_failed(
                                format!(
                                    "create_vm: network '{}': IP {ip} is already used by {holder}",
                                    net.name
                                ),
                                false,
                            ));
                        }
                        used.insert(ip, format!("network '{}' of the same VM", net.name));
                    }
                }
                NetworkType::Dynamic => {
                    let pool = dynamic_pool();
                    let gateway = pool.hosts().next();
                    let free = pool
                        .hosts()
                        .skip(1)
                        .find(|ip| !used.contains_key(&IpAddr::V4(*ip)))
                        .ok_or_else(|| {
                            CpiError::vm_creation_failed(
                                format!(
                                    "create_vm: network '{}': the dynamic pool {DYNAMIC_POOL} is exhausted",
                                    net.name
                                ),
                                false,
                            )
                        })?;
                    let addr = IpNet::V4(Ipv4Net::new(free, pool.prefix_len()).map_err(|e| {
                        CpiError::cloud(format!("create_vm: dynamic address: {e}"))
                    })?);
                    used.insert(
                        IpAddr::V4(free),
                        format!("network '{}' of the same VM", net.name),
                    );
                    net.set_assigned(addr, gateway.map(IpAddr::V4));
                }
            }
        }
        let cid = VmCid::new(new_id("c"))?;
        let mut settings =
            AgentSettings::for_vm(&req.agent_id, &cid, &self.agent, &networks, &req.env);
        // Disks named for placement that exist and are free are attached at creation,
        // as a container CPI can (see `CreateVm::disk_cids`); the director's later
        // attach_disk of the same disk to the same VM is then a no-op.
        for disk in &req.disk_cids {
            match state.disks.get_mut(disk.as_str()) {
                Some(d) if d.attached_to.is_none() => {
                    d.attached_to = Some(cid.to_string());
                    settings.attach_persistent(disk);
                }
                Some(d) => {
                    tracing::warn!(disk_cid = %disk, attached_to = ?d.attached_to, "disk is attached elsewhere; not attaching it at creation")
                }
                None => {
                    tracing::warn!(disk_cid = %disk, "disk does not exist; not attaching it at creation")
                }
            }
        }
        tracing::info!(vm_cid = %cid, agent_id = %req.agent_id, stemcell_cid = %req.stemcell, networks = networks.len(), "created VM");
        state.vms.insert(
            cid.to_string(),
            FakeVm {
                stemcell: req.stemcell.to_string(),
                cloud_properties: req.cloud_properties.raw,
                settings,
                metadata: Map::new(),
                boots: 1,
                director_uuid: ctx.director_uuid.clone(),
            },
        );
        Ok(CreatedVm { cid, networks })
    }

    async fn delete_vm(&self, _ctx: &CallContext, cid: &VmCid) -> CpiResult<()> {
        let mut state = self.lock();
        if state.vms.remove(cid.as_str()).is_none() {
            tracing::info!(vm_cid = %cid, "VM already gone");
            return Ok(());
        }
        for (disk_cid, disk) in state.disks.iter_mut() {
            if disk.attached_to.as_deref() == Some(cid.as_str()) {
                disk.attached_to = None;
                tracing::info!(vm_cid = %cid, disk_cid = %disk_cid, "detached disk from deleted VM");
            }
        }
        tracing::info!(vm_cid = %cid, "deleted VM");
        Ok(())
    }

    async fn has_vm(&self, _ctx: &CallContext, cid: &VmCid) -> CpiResult<bool> {
        Ok(self.lock().vms.contains_key(cid.as_str()))
    }

    async fn reboot_vm(&self, _ctx: &CallContext, cid: &VmCid) -> CpiResult<()> {
        let mut state = self.lock();
        let vm = state
            .vms
            .get_mut(cid.as_str())
            .ok_or_else(|| CpiError::vm_not_found(cid))?;
        vm.boots += 1;
        tracing::info!(vm_cid = %cid, boots = vm.boots, "rebooted VM");
        Ok(())
    }

    async fn set_vm_metadata(
        &self,
        _ctx: &CallContext,
        cid: &VmCid,
        metadata: &Metadata,
    ) -> CpiResult<()> {
        let mut state = self.lock();
        let vm = state
            .vms
            .get_mut(cid.as_str())
            .ok_or_else(|| CpiError::vm_not_found(cid))?;
        vm.metadata
            .extend(metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
        tracing::info!(vm_cid = %cid, keys = metadata.len(), "set VM metadata");
        Ok(())
    }

    async fn create_disk(&self, ctx: &CallContext, req: CreateDisk) -> CpiResult<DiskCid> {
        let cid = DiskCid::new(new_id("vol"))?;
        tracing::info!(disk_cid = %cid, size_mib = req.size_mib, "created disk");
        self.lock().disks.insert(
            cid.to_string(),
            FakeDisk {
                size_mib: req.size_mib,
                cloud_properties: req.cloud_properties,
                metadata: Map::new(),
                attached_to: None,
                created_near: req.vm.map(|v| v.to_string()),
                director_uuid: ctx.director_uuid.clone(),
            },
        );
        Ok(cid)
    }

    async fn delete_disk(&self, _ctx: &CallContext, cid: &DiskCid) -> CpiResult<()> {
        let mut state = self.lock();
        match state.disks.get(cid.as_str()) {
            None => {
                tracing::info!(disk_cid = %cid, "disk already gone");
                Ok(())
            }
            Some(FakeDisk {
                attached_to: Some(vm),
                ..
            }) => Err(CpiError::cloud(format!(
                "delete_disk: disk '{cid}' is attached to VM '{vm}'; detach it first"
            ))),
            Some(_) => {
                state.disks.remove(cid.as_str());
                tracing::info!(disk_cid = %cid, "deleted disk");
                Ok(())
            }
        }
    }

    async fn has_disk(&self, _ctx: &CallContext, cid: &DiskCid) -> CpiResult<bool> {
        Ok(self.lock().disks.contains_key(cid.as_str()))
    }

    async fn attach_disk(
        &self,
        _ctx: &CallContext,
        vm: &VmCid,
        disk: &DiskCid,
    ) -> CpiResult<DiskHint> {
        let mut state = self.lock();
        if !state.vms.contains_key(vm.as_str()) {
            return Err(CpiError::vm_not_found(vm));
        }
        let d = state
            .disks
            .get_mut(disk.as_str())
            .ok_or_else(|| CpiError::disk_not_found(disk))?;
        match &d.attached_to {
            Some(other) if other != vm.as_str() => {
                return Err(CpiError::cloud(format!(
                    "attach_disk: disk '{disk}' is attached to VM '{other}'; detach it there first"
                )))
            }
            _ => d.attached_to = Some(vm.to_string()),
        }
        if let Some(v) = state.vms.get_mut(vm.as_str()) {
            v.settings.attach_persistent(disk);
        }
        tracing::info!(vm_cid = %vm, disk_cid = %disk, "attached disk");
        Ok(DiskHint(disk_path_in_vm(disk)))
    }

    async fn detach_disk(&self, _ctx: &CallContext, vm: &VmCid, disk: &DiskCid) -> CpiResult<()> {
        let mut state = self.lock();
        if !state.vms.contains_key(vm.as_str()) {
            return Err(CpiError::vm_not_found(vm));
        }
        let d = state
            .disks
            .get_mut(disk.as_str())
            .ok_or_else(|| CpiError::disk_not_found(disk))?;
        if d.attached_to.as_deref() != Some(vm.as_str()) {
            return Err(CpiError::disk_not_attached(vm, disk));
        }
        d.attached_to = None;
        if let Some(v) = state.vms.get_mut(vm.as_str()) {
            v.settings.detach_persistent(disk);
        }
        tracing::info!(vm_cid = %vm, disk_cid = %disk, "detached disk");
        Ok(())
    }

    async fn get_disks(&self, _ctx: &CallContext, vm: &VmCid) -> CpiResult<Vec<DiskCid>> {
        let state = self.lock();
        if !state.vms.contains_key(vm.as_str()) {
            return Err(CpiError::vm_not_found(vm));
        }
        let attached: BTreeSet<&String> = state
            .disks
            .iter()
            .filter(|(_, d)| d.attached_to.as_deref() == Some(vm.as_str()))
            .map(|(cid, _)| cid)
            .collect();
        attached.into_iter().map(DiskCid::new).collect()
    }

    async fn set_disk_metadata(
        &self,
        _ctx: &CallContext,
        cid: &DiskCid,
        metadata: &Metadata,
    ) -> CpiResult<()> {
        let mut state = self.lock();
        let disk = state
            .disks
            .get_mut(cid.as_str())
            .ok_or_else(|| CpiError::disk_not_found(cid))?;
        disk.metadata
            .extend(metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
        tracing::info!(disk_cid = %cid, keys = metadata.len(), "set disk metadata");
        Ok(())
    }

    async fn resize_disk(
        &self,
        _ctx: &CallContext,
        cid: &DiskCid,
        new_size_mib: u64,
    ) -> CpiResult<()> {
        let mut state = self.lock();
        let disk = state
            .disks
            .get_mut(cid.as_str())
            .ok_or_else(|| CpiError::disk_not_found(cid))?;
        if new_size_mib < disk.size_mib {
            return Err(CpiError::not_supported(format!(
                "resize_disk: disk '{cid}' is {} MiB; shrinking it to {new_size_mib} MiB is not supported",
                disk.size_mib
            )));
        }
        tracing::info!(disk_cid = %cid, from_mib = disk.size_mib, to_mib = new_size_mib, "resized disk");
        disk.size_mib = new_size_mib;
        Ok(())
    }

    async fn snapshot_disk(
        &self,
        ctx: &CallContext,
        cid: &DiskCid,
        metadata: &Metadata,
    ) -> CpiResult<SnapshotCid> {
        let mut state = self.lock();
        let size_mib = state
            .disks
            .get(cid.as_str())
            .ok_or_else(|| CpiError::disk_not_found(cid))?
            .size_mib;
        let snap = SnapshotCid::new(new_id("snap"))?;
        state.snapshots.insert(
            snap.to_string(),
            FakeSnapshot {
                disk: cid.to_string(),
                size_mib,
                metadata: metadata.clone(),
                director_uuid: ctx.director_uuid.clone(),
            },
        );
        tracing::info!(disk_cid = %cid, snapshot_cid = %snap, "snapshotted disk");
        Ok(snap)
    }

    async fn delete_snapshot(&self, _ctx: &CallContext, cid: &SnapshotCid) -> CpiResult<()> {
        if self.lock().snapshots.remove(cid.as_str()).is_some() {
            tracing::info!(snapshot_cid = %cid, "deleted snapshot");
        } else {
            tracing::info!(snapshot_cid = %cid, "snapshot already gone");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud_properties::VmCloudProperties;
    use crate::error::ErrorKind;
    use crate::ids::AgentId;
    use crate::network::Networks;
    use serde_json::json;

    fn block<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    fn ctx() -> CallContext {
        CallContext {
            api_version: 2,
            director_uuid: Some("fake-tests-director".into()),
            ..CallContext::default()
        }
    }

    fn agent() -> AgentOptions {
        AgentOptions {
            mbus: "https://mbus:mbus-pw@0.0.0.0:6868".into(),
            ntp: vec!["time.example".into()],
        }
    }

    struct StemcellDir {
        dir: std::path::PathBuf,
    }

    impl StemcellDir {
        fn new(manifest: &str) -> StemcellDir {
            let dir = std::env::temp_dir().join(new_id("fake-cpi-test"));
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(dir.join("image"), b"not really a tarball").expect("image");
            std::fs::write(dir.join("stemcell.MF"), manifest).expect("manifest");
            StemcellDir { dir }
        }
        fn image(&self) -> std::path::PathBuf {
            self.dir.join("image")
        }
    }

    impl Drop for StemcellDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    const MF: &str = "name: bosh-warden-boshlite-ubuntu-jammy\nversion: '1.1'\noperating_system: ubuntu-jammy\nstemcell_formats: [warden-tar, general-tar]\ncloud_properties: {}\n";

    fn stemcell(cpi: &FakeCpi) -> (StemcellDir, StemcellCid) {
        let dir = StemcellDir::new(MF);
        let cid = block(cpi.create_stemcell(
            &ctx(),
            CreateStemcell {
                image_path: dir.image(),
                cloud_properties: Map::new(),
            },
        ))
        .expect("create_stemcell");
        (dir, cid)
    }

    fn create_vm_req(stemcell: &StemcellCid, networks: Value) -> CreateVm {
        CreateVm {
            agent_id: AgentId::new("agent-1").expect("agent"),
            stemcell: stemcell.clone(),
            cloud_properties: VmCloudProperties::parse(&json!({"ports": ["6868/tcp"]}))
                .expect("props"),
            networks: Networks::parse(&networks).expect("networks"),
            disk_cids: vec![],
            env: json!({"bosh": {"password": "secret-pw"}}),
        }
    }

    fn manual(ip: &str) -> Value {
        json!({"default": {"type": "manual", "ip": ip, "netmask": "255.255.255.0", "gateway": "10.0.0.1", "dns": ["10.0.0.2"], "default": ["dns", "gateway"]}})
    }

    fn new_cpi() -> FakeCpi {
        FakeCpi::new(FakeState::default(), agent())
    }

    #[test]
    fn stemcell_lifecycle_reads_the_manifest() {
        let cpi = new_cpi();
        let (_dir, cid) = stemcell(&cpi);
        let state = cpi.state();
        let sc = &state.stemcells[cid.as_str()];
        assert_eq!(sc.name, "bosh-warden-boshlite-ubuntu-jammy");
        assert_eq!(sc.operating_system, "ubuntu-jammy");
        assert_eq!(sc.image_bytes, 20);
        block(cpi.delete_stemcell(&ctx(), &cid)).expect("delete");
        block(cpi.delete_stemcell(&ctx(), &cid)).expect("delete is idempotent");
        assert!(cpi.state().stemcells.is_empty());
    }

    #[test]
    fn light_stemcell_records_its_image() {
        let cpi = new_cpi();
        let digest = "a".repeat(64);
        let dir = StemcellDir::new(&format!(
            "name: light\nversion: '1'\nstemcell_formats: [docker-light]\ncloud_properties:\n  image_reference: ghcr.io/x/y:1\n  digest: sha256:{digest}\n"
        ));
        let cid = block(cpi.create_stemcell(
            &ctx(),
            CreateStemcell {
                image_path: dir.image(),
                cloud_properties: Map::new(),
            },
        ))
        .expect("create");
        assert_eq!(
            cpi.state().stemcells[cid.as_str()].image_reference,
            Some(format!("ghcr.io/x/y:1@sha256:{digest}"))
        );
    }

    #[test]
    fn create_stemcell_fails_clearly_without_image_or_manifest() {
        let cpi = new_cpi();
        let missing = std::env::temp_dir().join(new_id("nope")).join("image");
        let err = block(cpi.create_stemcell(
            &ctx(),
            CreateStemcell {
                image_path: missing.clone(),
                cloud_properties: Map::new(),
            },
        ))
        .expect_err("missing image");
        assert_eq!(err.kind, ErrorKind::CloudError);
        assert!(
            err.message.contains(&missing.display().to_string()),
            "{err}"
        );

        let dir = StemcellDir::new(MF);
        std::fs::remove_file(dir.dir.join("stemcell.MF")).expect("rm");
        let err = block(cpi.create_stemcell(
            &ctx(),
            CreateStemcell {
                image_path: dir.image(),
                cloud_properties: Map::new(),
            },
        ))
        .expect_err("missing manifest");
        assert!(err.message.contains("stemcell.MF"), "{err}");

        let bad = StemcellDir::new("name: x\nversion: 1\nstemcell_formats: [vsphere-ova]\n");
        let err = block(cpi.create_stemcell(
            &ctx(),
            CreateStemcell {
                image_path: bad.image(),
                cloud_properties: Map::new(),
            },
        ))
        .expect_err("unsupported format");
        assert!(err.message.contains("vsphere-ova"), "{err}");
        assert!(cpi.state().stemcells.is_empty());
    }

    #[test]
    fn create_vm_writes_agent_settings_and_refuses_a_taken_ip() {
        let cpi = new_cpi();
        let (_dir, sc) = stemcell(&cpi);
        let vm = block(cpi.create_vm(&ctx(), create_vm_req(&sc, manual("10.0.0.10"))))
            .expect("create_vm");
        let state = cpi.state();
        let rec = &state.vms[vm.cid.as_str()];
        assert_eq!(rec.boots, 1);
        assert_eq!(rec.settings.agent_id, "agent-1");
        assert_eq!(rec.settings.vm.name, vm.cid.as_str());
        assert_eq!(rec.settings.mbus, agent().mbus);
        assert_eq!(rec.settings.ntp, agent().ntp);
        assert_eq!(rec.settings.networks["default"].ip, "10.0.0.10");
        assert!(rec.settings.networks["default"].preconfigured);
        assert_eq!(rec.settings.env["bosh"]["password"], "secret-pw");
        assert_eq!(rec.cloud_properties["ports"], json!(["6868/tcp"]));

        let err = block(cpi.create_vm(&ctx(), create_vm_req(&sc, manual("10.0.0.10"))))
            .expect_err("taken");
        assert_eq!(err.kind, ErrorKind::VmCreationFailed);
        assert!(!err.ok_to_retry);
        assert!(err.message.contains(vm.cid.as_str()), "{err}");
        assert_eq!(cpi.state().vms.len(), 1);

        // Once the holder is gone the address is free again.
        block(cpi.delete_vm(&ctx(), &vm.cid)).expect("delete");
        block(cpi.create_vm(&ctx(), create_vm_req(&sc, manual("10.0.0.10")))).expect("reuse");
    }

    #[test]
    fn everything_created_is_labelled_with_the_director() {
        let cpi = new_cpi();
        let (_dir, sc) = stemcell(&cpi);
        let vm = block(cpi.create_vm(&ctx(), create_vm_req(&sc, manual("10.0.0.10"))))
            .expect("vm")
            .cid;
        let disk = block(cpi.create_disk(
            &ctx(),
            CreateDisk {
                size_mib: 1,
                cloud_properties: Map::new(),
                vm: None,
            },
        ))
        .expect("disk");
        let snap = block(cpi.snapshot_disk(&ctx(), &disk, &Map::new())).expect("snap");
        let state = cpi.state();
        let label = Some("fake-tests-director".to_owned());
        assert_eq!(state.stemcells[sc.as_str()].director_uuid, label);
        assert_eq!(state.vms[vm.as_str()].director_uuid, label);
        assert_eq!(state.disks[disk.as_str()].director_uuid, label);
        assert_eq!(state.snapshots[snap.as_str()].director_uuid, label);
    }

    #[test]
    fn one_vm_cannot_use_an_address_twice() {
        let cpi = new_cpi();
        let (_dir, sc) = stemcell(&cpi);
        let nets = json!({
            "a": {"type": "manual", "ip": "10.0.0.10", "netmask": "255.255.255.0"},
            "b": {"type": "manual", "ip": "10.0.0.10", "netmask": "255.255.255.0"}});
        let err = block(cpi.create_vm(&ctx(), create_vm_req(&sc, nets))).expect_err("dup");
        assert_eq!(err.kind, ErrorKind::VmCreationFailed);
        assert!(err.message.contains("of the same VM"), "{err}");
        assert!(cpi.state().vms.is_empty());
    }

    #[test]
    fn create_vm_needs_the_stemcell() {
        let cpi = new_cpi();
        let err = block(cpi.create_vm(
            &ctx(),
            create_vm_req(&StemcellCid::new("nope").expect("cid"), manual("10.0.0.10")),
        ))
        .expect_err("no stemcell");
        assert_eq!(err.kind, ErrorKind::CloudError);
        assert!(err.message.contains("'nope'"), "{err}");
    }

    #[test]
    fn dynamic_networks_get_distinct_addresses() {
        let cpi = new_cpi();
        let (_dir, sc) = stemcell(&cpi);
        let nets = json!({"d": {"type": "dynamic", "dns": ["8.8.8.8"]}});
        let a = block(cpi.create_vm(&ctx(), create_vm_req(&sc, nets.clone()))).expect("a");
        let b = block(cpi.create_vm(&ctx(), create_vm_req(&sc, nets))).expect("b");
        let ip_a = a.networks.0["d"].ip().expect("assigned");
        let ip_b = b.networks.0["d"].ip().expect("assigned");
        assert_ne!(ip_a, ip_b);
        let pool: IpNet = DYNAMIC_POOL.parse().expect("pool");
        assert!(pool.contains(&ip_a) && pool.contains(&ip_b));
        assert_eq!(
            a.networks.0["d"].gateway,
            Some("10.254.0.1".parse().expect("gw"))
        );
        let wire = a.networks.to_wire();
        assert_eq!(wire["d"]["ip"], ip_a.to_string());
        assert_eq!(wire["d"]["netmask"], "255.255.0.0");
        assert_eq!(
            cpi.state().vms[a.cid.as_str()].settings.networks["d"].ip,
            ip_a.to_string()
        );
    }

    #[test]
    fn missing_vm_errors_are_typed_and_deletes_idempotent() {
        let cpi = new_cpi();
        let vm = VmCid::new("c-missing").expect("cid");
        let disk = DiskCid::new("vol-missing").expect("cid");
        assert!(!block(cpi.has_vm(&ctx(), &vm)).expect("has_vm"));
        block(cpi.delete_vm(&ctx(), &vm)).expect("delete_vm idempotent");
        for err in [
            block(cpi.reboot_vm(&ctx(), &vm)).expect_err("reboot"),
            block(cpi.set_vm_metadata(&ctx(), &vm, &Map::new())).expect_err("md"),
            block(cpi.get_disks(&ctx(), &vm))
                .map(|_| ())
                .expect_err("get_disks"),
            block(cpi.attach_disk(&ctx(), &vm, &disk))
                .map(|_| ())
                .expect_err("attach"),
            block(cpi.detach_disk(&ctx(), &vm, &disk)).expect_err("detach"),
        ] {
            assert_eq!(err.kind, ErrorKind::VmNotFound, "{err}");
            assert!(err.message.contains("c-missing"), "{err}");
        }
        assert!(!block(cpi.has_disk(&ctx(), &disk)).expect("has_disk"));
        block(cpi.delete_disk(&ctx(), &disk)).expect("delete_disk idempotent");
        for err in [
            block(cpi.set_disk_metadata(&ctx(), &disk, &Map::new())).expect_err("md"),
            block(cpi.resize_disk(&ctx(), &disk, 10)).expect_err("resize"),
            block(cpi.snapshot_disk(&ctx(), &disk, &Map::new()))
                .map(|_| ())
                .expect_err("snapshot"),
        ] {
            assert_eq!(err.kind, ErrorKind::DiskNotFound, "{err}");
        }
        block(cpi.delete_snapshot(&ctx(), &SnapshotCid::new("snap-x").expect("cid")))
            .expect("delete_snapshot idempotent");
    }

    #[test]
    fn disk_attach_detach_updates_settings_and_get_disks() {
        let cpi = new_cpi();
        let (_dir, sc) = stemcell(&cpi);
        let vm = block(cpi.create_vm(&ctx(), create_vm_req(&sc, manual("10.0.0.10"))))
            .expect("vm")
            .cid;
        let other = block(cpi.create_vm(&ctx(), create_vm_req(&sc, manual("10.0.0.11"))))
            .expect("vm")
            .cid;
        let disk = block(cpi.create_disk(
            &ctx(),
            CreateDisk {
                size_mib: 1024,
                cloud_properties: Map::new(),
                vm: Some(vm.clone()),
            },
        ))
        .expect("disk");
        assert!(block(cpi.get_disks(&ctx(), &vm)).expect("none").is_empty());
        let err = block(cpi.detach_disk(&ctx(), &vm, &disk)).expect_err("not attached");
        assert_eq!(err.kind, ErrorKind::DiskNotAttached);

        let hint = block(cpi.attach_disk(&ctx(), &vm, &disk)).expect("attach");
        assert_eq!(hint.0, format!("/warden-cpi-dev/{disk}"));
        // Attaching again to the same VM is a no-op; to another VM is refused.
        block(cpi.attach_disk(&ctx(), &vm, &disk)).expect("again");
        let err = block(cpi.attach_disk(&ctx(), &other, &disk)).expect_err("elsewhere");
        assert_eq!(err.kind, ErrorKind::CloudError);
        assert_eq!(
            block(cpi.get_disks(&ctx(), &vm)).expect("disks"),
            vec![disk.clone()]
        );
        assert_eq!(
            cpi.state().vms[vm.as_str()].settings.persistent_disks(),
            vec![disk.to_string()]
        );
        let err = block(cpi.detach_disk(&ctx(), &other, &disk)).expect_err("wrong vm");
        assert_eq!(err.kind, ErrorKind::DiskNotAttached);

        let err = block(cpi.delete_disk(&ctx(), &disk)).expect_err("attached");
        assert_eq!(err.kind, ErrorKind::CloudError);
        assert!(err.message.contains("detach it first"), "{err}");

        block(cpi.detach_disk(&ctx(), &vm, &disk)).expect("detach");
        assert!(block(cpi.get_disks(&ctx(), &vm)).expect("none").is_empty());
        let state = cpi.state();
        assert_eq!(
            state.vms[vm.as_str()].settings.disks.persistent,
            Some(BTreeMap::new())
        );
        assert_eq!(
            state.disks[disk.as_str()].created_near.as_deref(),
            Some(vm.as_str())
        );
        block(cpi.delete_disk(&ctx(), &disk)).expect("delete");
        assert!(!block(cpi.has_disk(&ctx(), &disk)).expect("has"));
    }

    #[test]
    fn delete_vm_releases_its_disks_and_create_vm_attaches_placement_disks() {
        let cpi = new_cpi();
        let (_dir, sc) = stemcell(&cpi);
        let disk = block(cpi.create_disk(
            &ctx(),
            CreateDisk {
                size_mib: 10,
                cloud_properties: Map::new(),
                vm: None,
            },
        ))
        .expect("disk");
        let mut req = create_vm_req(&sc, manual("10.0.0.10"));
        req.disk_cids = vec![disk.clone(), DiskCid::new("vol-gone").expect("cid")];
        let vm = block(cpi.create_vm(&ctx(), req)).expect("vm").cid;
        assert_eq!(
            block(cpi.get_disks(&ctx(), &vm)).expect("disks"),
            vec![disk.clone()]
        );
        assert_eq!(
            cpi.state().vms[vm.as_str()].settings.persistent_disks(),
            vec![disk.to_string()]
        );
        block(cpi.delete_vm(&ctx(), &vm)).expect("delete");
        assert_eq!(cpi.state().disks[disk.as_str()].attached_to, None);
        block(cpi.delete_disk(&ctx(), &disk)).expect("now deletable");
    }

    #[test]
    fn reboot_metadata_resize_and_snapshots_are_real() {
        let cpi = new_cpi();
        let (_dir, sc) = stemcell(&cpi);
        let vm = block(cpi.create_vm(&ctx(), create_vm_req(&sc, manual("10.0.0.10"))))
            .expect("vm")
            .cid;
        block(cpi.reboot_vm(&ctx(), &vm)).expect("reboot");
        block(cpi.reboot_vm(&ctx(), &vm)).expect("reboot");
        let md = json!({"director": "d", "name": "x/0"})
            .as_object()
            .cloned()
            .expect("md");
        block(cpi.set_vm_metadata(&ctx(), &vm, &md)).expect("md");
        let state = cpi.state();
        assert_eq!(state.vms[vm.as_str()].boots, 3);
        assert_eq!(state.vms[vm.as_str()].metadata["name"], "x/0");

        let disk = block(cpi.create_disk(
            &ctx(),
            CreateDisk {
                size_mib: 1024,
                cloud_properties: Map::new(),
                vm: None,
            },
        ))
        .expect("disk");
        block(cpi.set_disk_metadata(&ctx(), &disk, &md)).expect("disk md");
        block(cpi.resize_disk(&ctx(), &disk, 2048)).expect("grow");
        let err = block(cpi.resize_disk(&ctx(), &disk, 1024)).expect_err("shrink");
        assert_eq!(err.kind, ErrorKind::NotSupported);
        let snap = block(cpi.snapshot_disk(&ctx(), &disk, &md)).expect("snapshot");
        let state = cpi.state();
        assert_eq!(state.disks[disk.as_str()].size_mib, 2048);
        assert_eq!(state.disks[disk.as_str()].metadata["director"], "d");
        assert_eq!(state.snapshots[snap.as_str()].disk, disk.as_str());
        assert_eq!(state.snapshots[snap.as_str()].size_mib, 2048);
        block(cpi.delete_snapshot(&ctx(), &snap)).expect("delete snapshot");
        assert!(cpi.state().snapshots.is_empty());
        // update_disk keeps the trait's honest default.
        let err = block(cpi.update_disk(&ctx(), &disk, 4096, &Map::new())).expect_err("update");
        assert_eq!(err.kind, ErrorKind::NotSupported);
    }

    #[test]
    fn state_round_trips_through_json() {
        let cpi = new_cpi();
        let (_dir, sc) = stemcell(&cpi);
        block(cpi.create_vm(&ctx(), create_vm_req(&sc, manual("10.0.0.10")))).expect("vm");
        let state = cpi.state();
        let text = serde_json::to_string(&state).expect("serialise");
        let back: FakeState = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, state);
        // A new process continues from the saved state.
        let again = FakeCpi::new(back, agent());
        let err = block(again.create_vm(&ctx(), create_vm_req(&sc, manual("10.0.0.10"))))
            .expect_err("still taken");
        assert_eq!(err.kind, ErrorKind::VmCreationFailed);
        assert_eq!(
            serde_json::from_str::<FakeState>("{}").expect("empty"),
            FakeState::default()
        );
    }

    #[test]
    fn the_protocol_runs_on_the_fake() {
        let cpi = new_cpi();
        let resp = block(crate::protocol::handle(
            br#"{"method":"info","arguments":[],"api_version":2}"#,
            |_| Ok::<_, CpiError>(&cpi),
        ));
        assert_eq!(
            resp.result,
            json!({"api_version": 2, "stemcell_formats": ["warden-tar", "general-tar", "docker-light"]})
        );
    }
}
