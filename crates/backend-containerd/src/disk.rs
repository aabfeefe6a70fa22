//! Persistent disks: directories under `<state_dir>/disks/<cid>/`, attached live by a
//! bind mount below the VM's shared `/warden-cpi-dev` directory.
//!
//! A disk is `<state_dir>/disks/<cid>/data` (what the VM sees) and a small
//! `disk.json` beside it (size, cloud properties, metadata, last VM). Whether and where
//! a disk is attached is read from the mount table, never from memory: a disk is
//! attached to VM `v` exactly when `<state_dir>/vms/v/disks/<cid>` is a mount point.
//! Attaching first names `v` in the disk's record, then mounts it there (so a disk is
//! only ever mounted into the VM its record names, and finding where it is needs no
//! look into every VM); the mount propagates into the running VM at
//! `/warden-cpi-dev/<cid>` (no restart), and the agent settings file is updated in
//! place so the agent finds it. No loop devices, no filesystem images: sizes are not
//! enforced (see [`size_enforcement`]).

use std::path::{Path, PathBuf};

use cpi_core::agent_settings::disk_path_in_vm;
use cpi_core::ids::is_simple_name;
use cpi_core::{AgentSettings, CpiResult, CreateDisk, DiskCid, DiskHint, Metadata, VmCid};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::client::Daemon;
use crate::error::{ContainerdError, Result};
use crate::vm::{require_container, task_state, VmPaths};
use crate::{agent_env, fsutil, mount, ContainerdCpi};

/// `disk.json`: what we know about a disk besides its data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// The disk cid.
    pub cid: String,
    /// Requested size in MiB (informational: not enforced).
    pub size_mib: u64,
    /// `create_disk`'s cloud properties.
    #[serde(default)]
    pub cloud_properties: Map<String, Value>,
    /// `set_disk_metadata`'s last metadata.
    #[serde(default)]
    pub metadata: Map<String, Value>,
    /// The VM it was last attached to (the mount table is the truth).
    #[serde(default)]
    pub attached_to: Option<String>,
    /// When it was created (RFC 3339).
    pub created_at: String,
}

/// Where a disk lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPaths {
    /// `<state_dir>/disks/<cid>`.
    pub dir: PathBuf,
    /// The data, bind-mounted into VMs.
    pub data: PathBuf,
    /// `disk.json`.
    pub record: PathBuf,
}

impl DiskPaths {
    /// The paths of disk `cid`.
    pub fn new(state_dir: &Path, cid: &str) -> DiskPaths {
        let dir = state_dir.join("disks").join(cid);
        DiskPaths {
            data: dir.join("data"),
            record: dir.join("disk.json"),
            dir,
        }
    }
}

/// The VM a disk is mounted into, read from a mount table: the `<vm>` of a mount point
/// `<state_dir>/vms/<vm>/disks/<cid>`.
pub fn attached_vm(table: &[mount::MountInfo], state_dir: &Path, cid: &str) -> Option<String> {
    let vms = state_dir.join("vms");
    table.iter().find_map(|m| {
        let rel = m.mount_point.strip_prefix(&vms).ok()?;
        let parts: Vec<&str> = rel.iter().filter_map(|c| c.to_str()).collect();
        match parts.as_slice() {
            [vm, "disks", disk] if *disk == cid => Some((*vm).to_owned()),
            _ => None,
        }
    })
}

/// The disks mounted into VM `vm`, in cid order.
pub fn disks_of(table: &[mount::MountInfo], paths: &VmPaths) -> Vec<String> {
    let mut out: Vec<String> = table
        .iter()
        .filter(|m| m.mount_point.parent() == Some(paths.disks.as_path()))
        .filter_map(|m| m.mount_point.file_name()?.to_str().map(str::to_owned))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The disks mounted into the VM of `paths`, in cid order: by mount ids, else from
/// the mount table.
pub fn mounted_disks(paths: &VmPaths) -> Result<Vec<String>> {
    match mount::mount_points_in(&paths.disks)? {
        Some(d) => Ok(d),
        None => Ok(disks_of(&mount::read_mountinfo()?, paths)),
    }
}

/// Whether disk sizes can be enforced on the filesystem of `dir`, and why not. This
/// backend never uses loop devices or filesystem images; project quotas would be the
/// way, and are not implemented: the answer is always an explanation for the log.
pub fn size_enforcement(table: &[mount::MountInfo], dir: &Path) -> String {
    let fs = table
        .iter()
        .filter(|m| dir.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count());
    match fs {
        Some(m) if m.super_options.split(',').any(|o| o == "prjquota") => format!(
            "disk sizes are not enforced: {} ({}) supports project quotas, but this CPI does \
             not set them yet",
            m.mount_point.display(),
            m.fs_type
        ),
        Some(m) => format!(
            "disk sizes are not enforced: {} ({}) is not mounted with project quotas \
             (prjquota), and this CPI uses no loop devices",
            m.mount_point.display(),
            m.fs_type
        ),
        None => "disk sizes are not enforced".to_owned(),
    }
}

/// Made in the state directory once every mounted disk's record names the VM it is
/// mounted into (see `ensure_attachments_recorded`).
const ATTACHMENTS_RECORDED: &str = ".disk-attachments-recorded";

fn read_record(paths: &DiskPaths, cid: &str) -> Result<DiskRecord> {
    let bytes = std::fs::read(&paths.record).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ContainerdError::DiskNotFound(cid.to_owned())
        } else {
            ContainerdError::io("reading", &paths.record, e)
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ContainerdError::Refused(format!(
            "{} is not a disk record: {e}",
            paths.record.display()
        ))
    })
}

fn write_record(paths: &DiskPaths, record: &DiskRecord) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(record)
        .map_err(|e| ContainerdError::Refused(format!("serialising a disk record: {e}")))?;
    fsutil::write_atomic(&paths.record, &bytes, 0o600)
}

fn now_rfc3339() -> String {
    crate::labels::expire_in(0)
}

impl ContainerdCpi {
    fn disk_paths(&self, cid: &str) -> Result<DiskPaths> {
        if !is_simple_name(cid) {
            return Err(ContainerdError::DiskNotFound(cid.to_owned()));
        }
        Ok(DiskPaths::new(&self.config.state_dir, cid))
    }

    pub(crate) async fn do_create_disk(&self, req: CreateDisk) -> CpiResult<DiskCid> {
        let size = cpi_core::cloud_properties::check_disk_size(req.size_mib)?;
        let cid = DiskCid::new(format!("disk-{}", uuid::Uuid::new_v4()))?;
        let paths = self.disk_paths(cid.as_str())?;
        fsutil::create_dirs(&paths.dir, true)?;
        fsutil::create_dirs(&paths.data, false)?;
        write_record(
            &paths,
            &DiskRecord {
                cid: cid.to_string(),
                size_mib: size,
                cloud_properties: req.cloud_properties,
                metadata: Map::new(),
                attached_to: None,
                created_at: now_rfc3339(),
            },
        )?;
        let table = mount::read_mountinfo()?;
        tracing::info!(disk_cid = %cid, size_mib = size, "disk created; {}", size_enforcement(&table, &paths.dir));
        Ok(cid)
    }

    pub(crate) async fn do_delete_disk(&self, cid: &DiskCid) -> CpiResult<()> {
        let Ok(paths) = self.disk_paths(cid.as_str()) else {
            return Ok(());
        };
        let table = mount::read_mountinfo()?;
        if let Some(vm) = attached_vm(&table, &self.config.state_dir, cid.as_str()) {
            return Err(ContainerdError::Refused(format!(
                "disk {cid} is attached to VM {vm}; detach it first"
            ))
            .into());
        }
        if !mount::mounts_under(&table, &paths.dir).is_empty() {
            return Err(ContainerdError::Refused(format!(
                "disk {cid}: something is mounted below {}; not deleting it",
                paths.dir.display()
            ))
            .into());
        }
        match std::fs::remove_dir_all(&paths.dir) {
            Ok(()) => {
                tracing::info!(disk_cid = %cid, "disk deleted");
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ContainerdError::io("removing", &paths.dir, e).into()),
        }
    }

    pub(crate) async fn do_has_disk(&self, cid: &DiskCid) -> CpiResult<bool> {
        Ok(self
            .disk_paths(cid.as_str())
            .map(|p| p.record.is_file())
            .unwrap_or(false))
    }

    pub(crate) async fn do_set_disk_metadata(
        &self,
        cid: &DiskCid,
        metadata: &Metadata,
    ) -> CpiResult<()> {
        let paths = self.disk_paths(cid.as_str())?;
        let mut record = read_record(&paths, cid.as_str())?;
        record.metadata = metadata.clone();
        write_record(&paths, &record)?;
        Ok(())
    }

    pub(crate) async fn do_attach_disk(&self, vm: &VmCid, disk: &DiskCid) -> CpiResult<DiskHint> {
        let d = self.daemon().await?;
        require_container(d, vm.as_str()).await?;
        // Check, bind and settings update as one step among concurrent CPI processes.
        let _lock = self.disks_lock().await?;
        self.ensure_attachments_recorded()?;
        let paths = self.disk_paths(disk.as_str())?;
        let mut record = read_record(&paths, disk.as_str())?;
        let hint = DiskHint(disk_path_in_vm(disk));
        match self.attached_vm(disk.as_str(), vm.as_str(), &record)? {
            Some(v) if v == vm.as_str() => {
                tracing::info!(vm_cid = %vm, disk_cid = %disk, "disk already attached to this VM");
                // An attach killed after the bind has not written the record yet.
                if record.attached_to.as_deref() != Some(vm.as_str()) {
                    record.attached_to = Some(vm.to_string());
                    write_record(&paths, &record)?;
                }
                self.update_settings(d, vm, |s| s.attach_persistent(disk))
                    .await?;
                return Ok(hint);
            }
            Some(other) => {
                return Err(ContainerdError::Refused(format!(
                    "disk {disk} is attached to VM {other}; detach it there first"
                ))
                .into())
            }
            None => {}
        }
        let vm_paths = self.vm_paths(vm.as_str());
        mount::ensure_shared_mount_point(&vm_paths.disks)?;
        let target = vm_paths.disk_mount(disk.as_str());
        fsutil::create_dirs(&target, false)?;
        // The record names the VM before the bind: a disk is only ever mounted into
        // the VM its record names, which is what lets `attached_vm` look there alone.
        let previous = record.attached_to.replace(vm.to_string());
        write_record(&paths, &record)?;
        let attached = match mount::bind(&paths.data, &target) {
            Ok(()) => {
                self.update_settings(d, vm, |s| s.attach_persistent(disk))
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = attached {
            let mut cleanup = Vec::new();
            if let Err(c) = mount::unmount(&target) {
                cleanup.push(c.to_string());
            }
            let _ = std::fs::remove_dir(&target);
            record.attached_to = previous;
            if let Err(c) = write_record(&paths, &record) {
                cleanup.push(c.to_string());
            }
            return Err(e.with_cleanup(cleanup).into());
        }
        tracing::info!(vm_cid = %vm, disk_cid = %disk, "disk attached live at {}", hint.0);
        Ok(hint)
    }

    pub(crate) async fn do_detach_disk(&self, vm: &VmCid, disk: &DiskCid) -> CpiResult<()> {
        let d = self.daemon().await?;
        require_container(d, vm.as_str()).await?;
        let _lock = self.disks_lock().await?;
        let paths = self.disk_paths(disk.as_str())?;
        let mut record = read_record(&paths, disk.as_str())?;
        let target = self.vm_paths(vm.as_str()).disk_mount(disk.as_str());
        if !self.is_attached_to(&target, vm.as_str(), disk.as_str())? {
            // A detach killed after the unmount: finish it (record, then settings),
            // or a reboot_vm would bind the disk again from the stale record and the
            // agent would still look for it.
            // The settings are written even when neither copy lists the disk any
            // more: a kill between the host copy and the VM's leaves the VM's stale.
            let stale_record = record.attached_to.as_deref() == Some(vm.as_str());
            let in_settings = self.settings_list(vm, disk);
            if stale_record {
                record.attached_to = None;
                write_record(&paths, &record)?;
            }
            self.update_settings(d, vm, |s| {
                s.detach_persistent(disk);
            })
            .await?;
            if stale_record || in_settings {
                tracing::info!(vm_cid = %vm, disk_cid = %disk, "finished an interrupted detach");
                return Ok(());
            }
            return Err(ContainerdError::DiskNotAttached {
                vm: vm.to_string(),
                disk: disk.to_string(),
            }
            .into());
        }
        mount::unmount(&target)?;
        if let Err(e) = std::fs::remove_dir(&target) {
            tracing::warn!("could not remove {}: {e}", target.display());
        }
        record.attached_to = None;
        write_record(&paths, &record)?;
        self.update_settings(d, vm, |s| {
            s.detach_persistent(disk);
        })
        .await?;
        tracing::info!(vm_cid = %vm, disk_cid = %disk, "disk detached");
        Ok(())
    }

    pub(crate) async fn do_get_disks(&self, vm: &VmCid) -> CpiResult<Vec<DiskCid>> {
        let d = self.daemon().await?;
        require_container(d, vm.as_str()).await?;
        mounted_disks(&self.vm_paths(vm.as_str()))?
            .into_iter()
            .map(DiskCid::new)
            .collect()
    }

    /// The VM disk `cid` is mounted into (a mount point
    /// `<state_dir>/vms/<vm>/disks/<cid>`). Attach writes the disk's record before
    /// the bind, so a disk is mounted only into the VM its record names: that VM's
    /// mount point is checked, and the `asking` VM's (a bind left by an attach killed
    /// before its record was written, by a CPI older than that order). One `statx`
    /// pair each, whatever the number of VMs; the host's mount table when the kernel
    /// reports no mount ids.
    fn attached_vm(&self, cid: &str, asking: &str, record: &DiskRecord) -> Result<Option<String>> {
        let named = record.attached_to.as_deref().into_iter();
        for vm in named.chain(std::iter::once(asking)) {
            if !crate::vm::plausible_vm_cid(vm) {
                continue;
            }
            match mount::is_mount_point(&self.vm_paths(vm).disk_mount(cid))? {
                Some(true) => return Ok(Some(vm.to_owned())),
                Some(false) => {}
                None => {
                    let table = mount::read_mountinfo()?;
                    return Ok(attached_vm(&table, &self.config.state_dir, cid));
                }
            }
        }
        Ok(None)
    }

    /// Once per state directory, for a CPI upgraded from one that wrote a disk's
    /// record after the bind (an attach killed in between left a disk mounted into a
    /// VM its record does not name): makes every mounted disk's record name its VM,
    /// so that [`Self::attached_vm`] can go by the records. Walks every VM directory
    /// once, then leaves a mark.
    fn ensure_attachments_recorded(&self) -> Result<()> {
        let mark = self.config.state_dir.join(ATTACHMENTS_RECORDED);
        if mark.exists() {
            return Ok(());
        }
        let vms = self.config.state_dir.join("vms");
        let entries = match std::fs::read_dir(&vms) {
            Ok(e) => e.flatten().collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(ContainerdError::io("listing", &vms, e)),
        };
        for entry in entries {
            let vm = entry.file_name().to_string_lossy().into_owned();
            if !crate::vm::plausible_vm_cid(&vm) {
                continue;
            }
            for disk in mounted_disks(&self.vm_paths(&vm))? {
                let Ok(paths) = self.disk_paths(&disk) else {
                    continue;
                };
                let Ok(mut record) = read_record(&paths, &disk) else {
                    continue;
                };
                if record.attached_to.as_deref() != Some(vm.as_str()) {
                    tracing::info!(vm_cid = %vm, disk_cid = %disk, "recording the VM a disk is mounted into");
                    record.attached_to = Some(vm.clone());
                    write_record(&paths, &record)?;
                }
            }
        }
        std::fs::write(&mark, b"").map_err(|e| ContainerdError::io("writing", &mark, e))
    }

    /// Whether disk `disk` is mounted at `target`, its mount point in VM `vm`.
    fn is_attached_to(&self, target: &Path, vm: &str, disk: &str) -> Result<bool> {
        match mount::is_mount_point(target)? {
            Some(m) => Ok(m),
            None => {
                let table = mount::read_mountinfo()?;
                Ok(attached_vm(&table, &self.config.state_dir, disk).as_deref() == Some(vm))
            }
        }
    }

    /// Whether the host copy of the VM's settings lists `disk` (false when unreadable).
    fn settings_list(&self, vm: &VmCid, disk: &DiskCid) -> bool {
        std::fs::read(self.vm_paths(vm.as_str()).agent_env)
            .ok()
            .and_then(|b| AgentSettings::from_json(&b).ok())
            .is_some_and(|s| s.persistent_disks().iter().any(|d| d == disk.as_str()))
    }

    /// The host lock that serializes attaches and detaches (see `hostlock`).
    async fn disks_lock(&self) -> Result<crate::hostlock::HostLock> {
        crate::hostlock::acquire(
            &self.config.state_dir,
            crate::hostlock::Scope::Disks,
            std::time::Duration::from_secs(self.config.timeout_seconds),
        )
        .await
    }

    /// Changes the VM's agent settings and writes them into the VM: through the
    /// running task's root (`/proc/<pid>/root`), else into its mounted snapshot.
    async fn update_settings(
        &self,
        d: &Daemon,
        vm: &VmCid,
        change: impl FnOnce(&mut AgentSettings),
    ) -> Result<()> {
        let paths = self.vm_paths(vm.as_str());
        let bytes = std::fs::read(&paths.agent_env)
            .map_err(|e| ContainerdError::io("reading the agent settings", &paths.agent_env, e))?;
        let mut settings = AgentSettings::from_json(&bytes).map_err(|e| {
            ContainerdError::Refused(format!(
                "{} is not agent settings: {e}",
                paths.agent_env.display()
            ))
        })?;
        change(&mut settings);
        fsutil::write_atomic(&paths.agent_env, &settings.to_json(), 0o600)?;
        let file = agent_env::settings_file(&settings);
        match task_state(d, vm.as_str()).await? {
            Some((pid, status))
                if pid > 0 && status != containerd_client::types::v1::Status::Stopped =>
            {
                let root = PathBuf::from(format!("/proc/{pid}/root"));
                agent_env::write_files(&root, &[file], crate::fsutil::Durable::Now)
            }
            _ => {
                let container = require_container(d, vm.as_str()).await?;
                let mounts = d
                    .call(
                        format!("Snapshots.Mounts {}", container.snapshot_key),
                        d.snapshots().mounts(d.req(
                            containerd_client::services::v1::snapshots::MountsRequest {
                                snapshotter: container.snapshotter.clone(),
                                key: container.snapshot_key.clone(),
                            },
                        )),
                    )
                    .await?
                    .mounts;
                fsutil::create_dirs(&paths.rootfs, true)?;
                crate::vm::create::write_into_snapshot(&mounts, &paths, &[file])
            }
        }
    }

    /// Binds again every disk whose record says it is attached to `vm` but which is not
    /// mounted (the host rebooted). Returns the disks bound.
    pub(crate) fn rebind_disks(&self, vm_paths: &VmPaths, vm: &str) -> Result<Vec<String>> {
        let disks_dir = self.config.state_dir.join("disks");
        let entries = match std::fs::read_dir(&disks_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ContainerdError::io("listing", &disks_dir, e)),
        };
        let table = mount::read_mountinfo()?;
        let mounted = disks_of(&table, vm_paths);
        let mut bound = Vec::new();
        for entry in entries.flatten() {
            let cid = entry.file_name().to_string_lossy().into_owned();
            let Ok(paths) = self.disk_paths(&cid) else {
                continue;
            };
            let Ok(record) = read_record(&paths, &cid) else {
                continue;
            };
            if record.attached_to.as_deref() != Some(vm) || mounted.contains(&cid) {
                continue;
            }
            if attached_vm(&table, &self.config.state_dir, &cid).is_some() {
                continue;
            }
            let target = vm_paths.disk_mount(&cid);
            fsutil::create_dirs(&target, false)?;
            mount::bind(&paths.data, &target)?;
            tracing::info!(vm_cid = %vm, disk_cid = %cid, "disk mounted again");
            bound.push(cid);
        }
        Ok(bound)
    }
}

/// Unmounts every disk attached to a VM being deleted (their data stays) and
/// records them as detached. Returns the failures.
pub(crate) fn release_vm_disks(state_dir: &Path, vm_paths: &VmPaths) -> Vec<String> {
    let mounted = match mounted_disks(vm_paths) {
        Ok(d) => d,
        Err(e) => return vec![e.to_string()],
    };
    let mut failures = Vec::new();
    for disk in mounted {
        let target = vm_paths.disk_mount(&disk);
        if let Err(e) = mount::unmount(&target) {
            failures.push(e.to_string());
            continue;
        }
        if is_simple_name(&disk) {
            let paths = DiskPaths::new(state_dir, &disk);
            if let Ok(mut record) = read_record(&paths, &disk) {
                record.attached_to = None;
                if let Err(e) = write_record(&paths, &record) {
                    failures.push(e.to_string());
                }
            }
        }
        tracing::info!(disk_cid = %disk, "disk unmounted from the deleted VM; its data is kept");
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
100 22 254:0 /s/vms/vm-1/disks /s/vms/vm-1/disks rw shared:55 - ext4 /dev/vda rw
101 100 254:0 /s/disks/disk-1/data /s/vms/vm-1/disks/disk-1 rw shared:55 - ext4 /dev/vda rw
102 100 254:0 /s/disks/disk-2/data /s/vms/vm-1/disks/disk-2 rw shared:55 - ext4 /dev/vda rw
103 22 254:0 /s/vms/vm-2/disks /s/vms/vm-2/disks rw shared:56 - ext4 /dev/vda rw
104 22 0:5 / /s/quota rw - xfs /dev/vdb rw,prjquota
";

    #[test]
    fn attachment_is_read_from_the_mount_table() {
        let table = mount::parse_mountinfo(TABLE);
        let s = Path::new("/s");
        assert_eq!(attached_vm(&table, s, "disk-1").as_deref(), Some("vm-1"));
        assert_eq!(attached_vm(&table, s, "disk-3"), None);
        assert_eq!(attached_vm(&table, s, "disks"), None);
        assert_eq!(
            disks_of(&table, &VmPaths::new(s, "vm-1")),
            vec!["disk-1".to_owned(), "disk-2".to_owned()]
        );
        assert!(disks_of(&table, &VmPaths::new(s, "vm-2")).is_empty());
    }

    #[test]
    fn size_enforcement_is_explained() {
        let table = mount::parse_mountinfo(TABLE);
        let msg = size_enforcement(&table, Path::new("/s/disks/disk-1"));
        assert!(msg.contains("not mounted with project quotas"), "{msg}");
        let msg = size_enforcement(&table, Path::new("/s/quota/disks/disk-1"));
        assert!(msg.contains("does not set them yet"), "{msg}");
    }

    #[test]
    fn disk_layout_and_record_round_trip() {
        let p = DiskPaths::new(Path::new("/s"), "disk-1");
        assert_eq!(p.data, PathBuf::from("/s/disks/disk-1/data"));
        assert_eq!(p.record, PathBuf::from("/s/disks/disk-1/disk.json"));
        let r = DiskRecord {
            cid: "disk-1".into(),
            size_mib: 1024,
            cloud_properties: Map::new(),
            metadata: Map::new(),
            attached_to: Some("vm-1".into()),
            created_at: "2024-01-01T00:00:00Z".into(),
        };
        let back: DiskRecord =
            serde_json::from_slice(&serde_json::to_vec(&r).expect("json")).expect("parse");
        assert_eq!(back, r);
    }
}
