//! The closed set of CPI calls, their argument validation and result shapes.

use std::path::PathBuf;

use serde_json::{json, Map, Value};

use super::request::{short, MAX_API_VERSION};
use crate::cloud_properties::{check_disk_size, VmCloudProperties, VmResources};
use crate::cpi::{CallContext, Cpi, CreateDisk, CreateStemcell, CreateVm, Metadata};
use crate::error::{CpiError, CpiResult};
use crate::ids::{AgentId, DiskCid, SnapshotCid, StemcellCid, VmCid};
use crate::network::{json_kind, Networks};

/// One CPI call with typed arguments.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    /// `info`
    Info,
    /// `create_stemcell`
    CreateStemcell(CreateStemcell),
    /// `delete_stemcell`
    DeleteStemcell(StemcellCid),
    /// `create_vm`
    CreateVm(Box<CreateVm>),
    /// `delete_vm`
    DeleteVm(VmCid),
    /// `has_vm`
    HasVm(VmCid),
    /// `reboot_vm`
    RebootVm(VmCid),
    /// `set_vm_metadata`
    SetVmMetadata(VmCid, Metadata),
    /// `calculate_vm_cloud_properties`
    CalculateVmCloudProperties(VmResources),
    /// `create_disk`
    CreateDisk(CreateDisk),
    /// `delete_disk`
    DeleteDisk(DiskCid),
    /// `has_disk`
    HasDisk(DiskCid),
    /// `attach_disk`
    AttachDisk(VmCid, DiskCid),
    /// `detach_disk`
    DetachDisk(VmCid, DiskCid),
    /// `get_disks`
    GetDisks(VmCid),
    /// `set_disk_metadata`
    SetDiskMetadata(DiskCid, Metadata),
    /// `resize_disk`
    ResizeDisk(DiskCid, u64),
    /// `update_disk`
    UpdateDisk(DiskCid, u64, Map<String, Value>),
    /// `snapshot_disk`
    SnapshotDisk(DiskCid, Metadata),
    /// `delete_snapshot`
    DeleteSnapshot(SnapshotCid),
}

/// Reads positional arguments of one method with messages naming method and argument.
struct Args<'a> {
    method: &'static str,
    names: &'static [&'static str],
    values: &'a [Value],
}

impl<'a> Args<'a> {
    fn new(
        method: &'static str,
        names: &'static [&'static str],
        values: &'a [Value],
    ) -> CpiResult<Self> {
        // Surplus arguments are ignored: API v3 adds one to create_stemcell.
        if values.len() < names.len() {
            return Err(CpiError::bad_argument(format!(
                "{method}: expected {} argument{} ({}), got {}",
                names.len(),
                if names.len() == 1 { "" } else { "s" },
                names.join(", "),
                values.len()
            )));
        }
        Ok(Args {
            method,
            names,
            values,
        })
    }

    fn err(&self, i: usize, what: impl std::fmt::Display) -> CpiError {
        CpiError::bad_argument(format!(
            "{}: argument {} ('{}') {what}",
            self.method,
            i + 1,
            self.names[i]
        ))
    }

    fn string(&self, i: usize) -> CpiResult<&'a str> {
        self.values[i].as_str().ok_or_else(|| {
            self.err(
                i,
                format!("must be a string, got {}", short(&self.values[i])),
            )
        })
    }

    fn id<T>(&self, i: usize, make: fn(String) -> CpiResult<T>) -> CpiResult<T> {
        make(self.string(i)?.to_owned())
            .map_err(|e| self.err(i, format!("is invalid: {}", e.message)))
    }

    fn object(&self, i: usize) -> CpiResult<Map<String, Value>> {
        match &self.values[i] {
            Value::Object(m) => Ok(m.clone()),
            Value::Null => Ok(Map::new()),
            other => Err(self.err(i, format!("must be an object, got {}", json_kind(other)))),
        }
    }

    fn size(&self, i: usize) -> CpiResult<u64> {
        let v = &self.values[i];
        let n = v
            .as_u64()
            .or_else(|| {
                v.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                    .map(|f| f as u64)
            })
            .ok_or_else(|| {
                self.err(
                    i,
                    format!("must be a whole number of MiB, got {}", short(v)),
                )
            })?;
        check_disk_size(n).map_err(|e| self.err(i, e.message))
    }
}

impl Call {
    /// Types the arguments of `method`. Unknown methods answer `NotImplemented`.
    pub fn parse(method: &str, args: &[Value]) -> CpiResult<Call> {
        Ok(match method {
            "info" => Call::Info,
            "create_stemcell" => {
                let a = Args::new("create_stemcell", &["image_path", "cloud_properties"], args)?;
                let path = a.string(0)?;
                if path.is_empty() || path.contains('\0') {
                    return Err(a.err(0, "must be a non-empty path"));
                }
                Call::CreateStemcell(CreateStemcell {
                    image_path: PathBuf::from(path),
                    cloud_properties: a.object(1)?,
                })
            }
            "delete_stemcell" => {
                let a = Args::new("delete_stemcell", &["stemcell_cid"], args)?;
                Call::DeleteStemcell(a.id(0, StemcellCid::new)?)
            }
            "create_vm" => {
                let a = Args::new(
                    "create_vm",
                    &[
                        "agent_id",
                        "stemcell_cid",
                        "cloud_properties",
                        "networks",
                        "disk_cids",
                        "env",
                    ],
                    args,
                )?;
                let cloud_properties = VmCloudProperties::parse(&a.values[2])
                    .map_err(|e| a.err(2, format!("is invalid: {}", e.message)))?;
                let networks = Networks::parse(&a.values[3])
                    .map_err(|e| a.err(3, format!("is invalid: {}", e.message)))?;
                let disk_cids = match &a.values[4] {
                    Value::Null => Vec::new(),
                    Value::Array(items) => items
                        .iter()
                        .map(|d| {
                            d.as_str()
                                .ok_or_else(|| {
                                    a.err(4, format!("entries must be strings, got {}", short(d)))
                                })
                                .and_then(|s| DiskCid::new(s).map_err(|e| a.err(4, e.message)))
                        })
                        .collect::<CpiResult<_>>()?,
                    other => {
                        return Err(a.err(4, format!("must be a list, got {}", json_kind(other))))
                    }
                };
                let env = match &a.values[5] {
                    Value::Null => Value::Object(Map::new()),
                    v @ Value::Object(_) => v.clone(),
                    other => {
                        return Err(a.err(5, format!("must be an object, got {}", json_kind(other))))
                    }
                };
                Call::CreateVm(Box::new(CreateVm {
                    agent_id: a.id(0, AgentId::new)?,
                    stemcell: a.id(1, StemcellCid::new)?,
                    cloud_properties,
                    networks,
                    disk_cids,
                    env,
                }))
            }
            "delete_vm" => {
                Call::DeleteVm(Args::new("delete_vm", &["vm_cid"], args)?.id(0, VmCid::new)?)
            }
            "has_vm" => Call::HasVm(Args::new("has_vm", &["vm_cid"], args)?.id(0, VmCid::new)?),
            "reboot_vm" => {
                Call::RebootVm(Args::new("reboot_vm", &["vm_cid"], args)?.id(0, VmCid::new)?)
            }
            "set_vm_metadata" => {
                let a = Args::new("set_vm_metadata", &["vm_cid", "metadata"], args)?;
                Call::SetVmMetadata(a.id(0, VmCid::new)?, a.object(1)?)
            }
            "calculate_vm_cloud_properties" => {
                let a = Args::new(
                    "calculate_vm_cloud_properties",
                    &["desired_instance_size"],
                    args,
                )?;
                let res: VmResources = serde_json::from_value(a.values[0].clone()).map_err(|e| {
                    a.err(0, format!("must be an object with whole numbers ram, cpu and ephemeral_disk_size: {e}"))
                })?;
                Call::CalculateVmCloudProperties(res)
            }
            "create_disk" => {
                let a = Args::new("create_disk", &["size", "cloud_properties", "vm_cid"], args)?;
                let vm = match &a.values[2] {
                    Value::Null => None,
                    Value::String(s) if s.is_empty() => None,
                    _ => Some(a.id(2, VmCid::new)?),
                };
                Call::CreateDisk(CreateDisk {
                    size_mib: a.size(0)?,
                    cloud_properties: a.object(1)?,
                    vm,
                })
            }
            "delete_disk" => Call::DeleteDisk(
                Args::new("delete_disk", &["disk_cid"], args)?.id(0, DiskCid::new)?,
            ),
            "has_disk" => {
                Call::HasDisk(Args::new("has_disk", &["disk_cid"], args)?.id(0, DiskCid::new)?)
            }
            "attach_disk" => {
                let a = Args::new("attach_disk", &["vm_cid", "disk_cid"], args)?;
                Call::AttachDisk(a.id(0, VmCid::new)?, a.id(1, DiskCid::new)?)
            }
            "detach_disk" => {
                let a = Args::new("detach_disk", &["vm_cid", "disk_cid"], args)?;
                Call::DetachDisk(a.id(0, VmCid::new)?, a.id(1, DiskCid::new)?)
            }
            "get_disks" => {
                Call::GetDisks(Args::new("get_disks", &["vm_cid"], args)?.id(0, VmCid::new)?)
            }
            "set_disk_metadata" => {
                let a = Args::new("set_disk_metadata", &["disk_cid", "metadata"], args)?;
                Call::SetDiskMetadata(a.id(0, DiskCid::new)?, a.object(1)?)
            }
            "resize_disk" => {
                let a = Args::new("resize_disk", &["disk_cid", "new_size"], args)?;
                Call::ResizeDisk(a.id(0, DiskCid::new)?, a.size(1)?)
            }
            "update_disk" => {
                let a = Args::new(
                    "update_disk",
                    &["disk_cid", "new_size", "cloud_properties"],
                    args,
                )?;
                Call::UpdateDisk(a.id(0, DiskCid::new)?, a.size(1)?, a.object(2)?)
            }
            "snapshot_disk" => {
                let a = Args::new("snapshot_disk", &["disk_cid", "metadata"], args)?;
                Call::SnapshotDisk(a.id(0, DiskCid::new)?, a.object(1)?)
            }
            "delete_snapshot" => Call::DeleteSnapshot(
                Args::new("delete_snapshot", &["snapshot_cid"], args)?.id(0, SnapshotCid::new)?,
            ),
            other => {
                return Err(CpiError::not_implemented(format!(
                    "Must call implemented method: Unknown method '{}'",
                    other.chars().take(100).collect::<String>()
                )))
            }
        })
    }

    /// The wire name of the method.
    pub fn method(&self) -> &'static str {
        match self {
            Call::Info => "info",
            Call::CreateStemcell(_) => "create_stemcell",
            Call::DeleteStemcell(_) => "delete_stemcell",
            Call::CreateVm(_) => "create_vm",
            Call::DeleteVm(_) => "delete_vm",
            Call::HasVm(_) => "has_vm",
            Call::RebootVm(_) => "reboot_vm",
            Call::SetVmMetadata(..) => "set_vm_metadata",
            Call::CalculateVmCloudProperties(_) => "calculate_vm_cloud_properties",
            Call::CreateDisk(_) => "create_disk",
            Call::DeleteDisk(_) => "delete_disk",
            Call::HasDisk(_) => "has_disk",
            Call::AttachDisk(..) => "attach_disk",
            Call::DetachDisk(..) => "detach_disk",
            Call::GetDisks(_) => "get_disks",
            Call::SetDiskMetadata(..) => "set_disk_metadata",
            Call::ResizeDisk(..) => "resize_disk",
            Call::UpdateDisk(..) => "update_disk",
            Call::SnapshotDisk(..) => "snapshot_disk",
            Call::DeleteSnapshot(_) => "delete_snapshot",
        }
    }
}

/// Runs a call on a backend and shapes the result for the request's API version.
pub async fn execute<C: Cpi + ?Sized>(cpi: &C, ctx: &CallContext, call: Call) -> CpiResult<Value> {
    let v2 = ctx.api_version >= 2;
    Ok(match call {
        Call::Info => {
            json!({"api_version": MAX_API_VERSION, "stemcell_formats": cpi.stemcell_formats()})
        }
        Call::CreateStemcell(req) => json!(cpi.create_stemcell(ctx, req).await?.as_str()),
        Call::DeleteStemcell(cid) => {
            cpi.delete_stemcell(ctx, &cid).await?;
            Value::Null
        }
        Call::CreateVm(req) => {
            let created = cpi.create_vm(ctx, *req).await?;
            if v2 {
                json!([created.cid.as_str(), created.networks.to_wire()])
            } else {
                json!(created.cid.as_str())
            }
        }
        Call::DeleteVm(cid) => {
            cpi.delete_vm(ctx, &cid).await?;
            Value::Null
        }
        Call::HasVm(cid) => json!(cpi.has_vm(ctx, &cid).await?),
        Call::RebootVm(cid) => {
            cpi.reboot_vm(ctx, &cid).await?;
            Value::Null
        }
        Call::SetVmMetadata(cid, md) => {
            cpi.set_vm_metadata(ctx, &cid, &md).await?;
            Value::Null
        }
        Call::CalculateVmCloudProperties(res) => {
            cpi.calculate_vm_cloud_properties(ctx, res).await?
        }
        Call::CreateDisk(req) => json!(cpi.create_disk(ctx, req).await?.as_str()),
        Call::DeleteDisk(cid) => {
            cpi.delete_disk(ctx, &cid).await?;
            Value::Null
        }
        Call::HasDisk(cid) => json!(cpi.has_disk(ctx, &cid).await?),
        Call::AttachDisk(vm, disk) => {
            let hint = cpi.attach_disk(ctx, &vm, &disk).await?;
            if hint.0.is_empty() {
                // The director raises AttachDiskResponseError on an empty v2 hint.
                return Err(CpiError::cloud(format!(
                    "attach_disk of '{disk}' to '{vm}' produced an empty disk hint"
                )));
            }
            if v2 {
                json!(hint.0)
            } else {
                Value::Null
            }
        }
        Call::DetachDisk(vm, disk) => {
            cpi.detach_disk(ctx, &vm, &disk).await?;
            Value::Null
        }
        Call::GetDisks(vm) => {
            json!(cpi
                .get_disks(ctx, &vm)
                .await?
                .iter()
                .map(DiskCid::as_str)
                .collect::<Vec<_>>())
        }
        Call::SetDiskMetadata(cid, md) => {
            cpi.set_disk_metadata(ctx, &cid, &md).await?;
            Value::Null
        }
        Call::ResizeDisk(cid, size) => {
            cpi.resize_disk(ctx, &cid, size).await?;
            Value::Null
        }
        Call::UpdateDisk(cid, size, props) => {
            if !v2 {
                return Err(CpiError::not_implemented(
                    "Must call implemented method: update_disk needs CPI API version 2",
                ));
            }
            match cpi.update_disk(ctx, &cid, size, &props).await? {
                Some(new) => json!(new.as_str()),
                None => Value::Null,
            }
        }
        Call::SnapshotDisk(cid, md) => json!(cpi.snapshot_disk(ctx, &cid, &md).await?.as_str()),
        Call::DeleteSnapshot(cid) => {
            cpi.delete_snapshot(ctx, &cid).await?;
            Value::Null
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn every_method_parses_from_a_minimal_request() {
        let ok: &[(&str, Value)] = &[
            ("info", json!([])),
            ("create_stemcell", json!(["/tmp/image", {}])),
            ("create_stemcell", json!(["/tmp/image", {}, {"tags": {}}])),
            ("delete_stemcell", json!(["img"])),
            ("create_vm", json!(["agent", "img", {}, {}, [], {}])),
            ("create_vm", json!(["agent", "img", null, {}, null, null])),
            ("delete_vm", json!(["c-1"])),
            ("has_vm", json!(["c-1"])),
            ("reboot_vm", json!(["c-1"])),
            ("set_vm_metadata", json!(["c-1", {"a": "b"}])),
            (
                "calculate_vm_cloud_properties",
                json!([{"ram": 1, "cpu": 1, "ephemeral_disk_size": 1}]),
            ),
            ("create_disk", json!([1024, {}, null])),
            ("create_disk", json!([1024, {}, "c-1"])),
            ("delete_disk", json!(["vol-1"])),
            ("has_disk", json!(["vol-1"])),
            ("attach_disk", json!(["c-1", "vol-1"])),
            ("detach_disk", json!(["c-1", "vol-1"])),
            ("get_disks", json!(["c-1"])),
            ("set_disk_metadata", json!(["vol-1", {}])),
            ("resize_disk", json!(["vol-1", 2048])),
            ("update_disk", json!(["vol-1", 2048, {}])),
            ("snapshot_disk", json!(["vol-1", {}])),
            ("delete_snapshot", json!(["snap-1"])),
        ];
        for (method, args) in ok {
            let call = Call::parse(method, args.as_array().expect("array"))
                .unwrap_or_else(|e| panic!("{method}: {e}"));
            assert_eq!(call.method(), *method);
        }
    }

    #[test]
    fn argument_errors_name_method_and_argument() {
        let cases: &[(&str, Value, &str)] = &[
            ("create_vm", json!(["a", "b"]), "create_vm: expected 6 arguments (agent_id, stemcell_cid, cloud_properties, networks, disk_cids, env), got 2"),
            ("has_vm", json!([]), "has_vm: expected 1 argument (vm_cid), got 0"),
            ("has_vm", json!([42]), "has_vm: argument 1 ('vm_cid') must be a string, got 42"),
            ("delete_vm", json!(["../../etc"]), "delete_vm: argument 1 ('vm_cid') is invalid"),
            ("create_disk", json!([-1, {}, null]), "create_disk: argument 1 ('size') must be a whole number"),
            ("create_disk", json!([0, {}, null]), "create_disk: argument 1 ('size') disk size must be from 1"),
            ("create_disk", json!(["big", {}, null]), "create_disk: argument 1 ('size')"),
            ("create_disk", json!([1e30, {}, null]), "create_disk: argument 1 ('size')"),
            ("create_vm", json!(["a", "b", {}, {"n": {"type": "manual"}}, [], {}]), "create_vm: argument 4 ('networks') is invalid: network 'n': a manual network needs an 'ip'"),
            ("create_vm", json!(["a", "b", "props", {}, [], {}]), "create_vm: argument 3 ('cloud_properties')"),
            ("create_vm", json!(["a", "b", {}, {}, "vol-1", {}]), "create_vm: argument 5 ('disk_cids') must be a list"),
            ("create_vm", json!(["a", "b", {}, {}, [], "env"]), "create_vm: argument 6 ('env') must be an object"),
            ("set_vm_metadata", json!(["c-1", [1]]), "set_vm_metadata: argument 2 ('metadata') must be an object"),
            ("calculate_vm_cloud_properties", json!([{"ram": "x"}]), "calculate_vm_cloud_properties: argument 1"),
            ("create_stemcell", json!(["", {}]), "create_stemcell: argument 1 ('image_path') must be a non-empty path"),
        ];
        for (method, args, needle) in cases {
            let err = Call::parse(method, args.as_array().expect("array")).expect_err(needle);
            assert_eq!(err.kind, ErrorKind::CpiError, "{needle}");
            assert!(
                err.message.contains(needle),
                "want {needle:?}\n got {:?}",
                err.message
            );
        }
    }

    #[test]
    fn unknown_method_is_not_implemented() {
        let err = Call::parse("frobnicate", &[]).expect_err("unknown");
        assert_eq!(err.kind, ErrorKind::NotImplemented);
        assert_eq!(
            err.message,
            "Must call implemented method: Unknown method 'frobnicate'"
        );
    }
}
