//! VM and disk `cloud_properties`: kept as JSON, with typed views of the keys we act on.
//!
//! The director passes whatever the operator wrote in the cloud config. We never
//! reject keys we do not know (a Docker `HostConfig` field is meaningful to the Docker
//! backend only), but we do reject known keys with the wrong type or an absurd value.

use serde_json::{Map, Value};

use crate::error::{CpiError, CpiResult};
use crate::network::json_kind;

/// The largest memory or disk size in MiB we accept (1 PiB): anything above is a typo.
pub const MAX_SIZE_MIB: u64 = 1 << 30;

/// Looks a key up case-insensitively, preferring an exact match. Go's JSON decoder
/// matched keys this way, so manifests written for the Go Docker CPI use both
/// `CpuShares` and `CPUShares`.
pub fn get_ci<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key).or_else(|| {
        map.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

/// The typed view of a VM's `cloud_properties`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VmCloudProperties {
    /// CPUs (`cpu`), fractional allowed.
    pub cpu: Option<f64>,
    /// Memory limit in MiB (`ram`).
    pub ram_mib: Option<u64>,
    /// Size of the ephemeral disk at `/var/vcap/data` in MiB (`ephemeral_disk`, a
    /// number or `{"size": n}`).
    pub ephemeral_disk_mib: Option<u64>,
    /// Maximum number of processes (`pids`).
    pub pids: Option<u64>,
    /// Container ports to publish (`ports`, e.g. `"6868/tcp"`).
    pub ports: Vec<String>,
    /// `force_start_with_systemd`.
    pub force_systemd: bool,
    /// `force_start_without_systemd`.
    pub force_no_systemd: bool,
    /// The whole object, for backend-specific keys.
    pub raw: Map<String, Value>,
}

impl VmCloudProperties {
    /// Parses and checks the keys we know.
    pub fn parse(value: &Value) -> CpiResult<VmCloudProperties> {
        let raw = match value {
            Value::Null => Map::new(),
            Value::Object(m) => m.clone(),
            other => {
                return Err(CpiError::bad_argument(format!(
                    "VM cloud_properties must be an object, got {}",
                    json_kind(other)
                )))
            }
        };
        let bad = |m: String| CpiError::bad_argument(format!("VM cloud_properties: {m}"));
        let cpu = match raw.get("cpu") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_f64() {
                Some(c) if c > 0.0 && c <= 4096.0 => Some(c),
                _ => {
                    return Err(bad(format!(
                        "cpu must be a number above 0 and at most 4096, got {v}"
                    )))
                }
            },
        };
        let ram_mib = size_mib(raw.get("ram"), "ram").map_err(&bad)?;
        let ephemeral_disk_mib = match raw.get("ephemeral_disk") {
            Some(Value::Object(o)) => {
                size_mib(o.get("size"), "ephemeral_disk.size").map_err(&bad)?
            }
            other => size_mib(other, "ephemeral_disk").map_err(&bad)?,
        };
        let pids = match raw.get("pids") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(p) if p > 0 && p <= 1 << 22 => Some(p),
                _ => {
                    return Err(bad(format!(
                        "pids must be a whole number from 1 to 4194304, got {v}"
                    )))
                }
            },
        };
        let ports = match get_ci(&raw, "ports") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|p| match p {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(n) => Ok(n.to_string()),
                    other => Err(bad(format!(
                        "ports entries must be strings like \"6868/tcp\", got {other}"
                    ))),
                })
                .collect::<CpiResult<_>>()?,
            Some(other) => {
                return Err(bad(format!(
                    "ports must be a list, got {}",
                    json_kind(other)
                )))
            }
        };
        let flag = |k: &str| -> CpiResult<bool> {
            match get_ci(&raw, k) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(bad(format!("{k} must be true or false, got {other}"))),
            }
        };
        let force_systemd = flag("force_start_with_systemd")?;
        let force_no_systemd = flag("force_start_without_systemd")?;
        if force_systemd && force_no_systemd {
            return Err(bad(
                "force_start_with_systemd and force_start_without_systemd are both true; set at most one".into(),
            ));
        }
        Ok(VmCloudProperties {
            cpu,
            ram_mib,
            ephemeral_disk_mib,
            pids,
            ports,
            force_systemd,
            force_no_systemd,
            raw,
        })
    }

    /// The per-VM init override: `Some(true)` for systemd, `Some(false)` for runit,
    /// `None` to let the stemcell decide.
    pub fn systemd_override(&self) -> Option<bool> {
        match (self.force_systemd, self.force_no_systemd) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }
    }
}

fn size_mib(value: Option<&Value>, key: &str) -> Result<Option<u64>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 && n <= MAX_SIZE_MIB => Ok(Some(n)),
            _ => Err(format!(
                "{key} must be a whole number of MiB from 1 to {MAX_SIZE_MIB}, got {v}"
            )),
        },
    }
}

/// Checks a disk size argument (`create_disk`, `resize_disk`).
pub fn check_disk_size(size: u64) -> CpiResult<u64> {
    if size == 0 || size > MAX_SIZE_MIB {
        return Err(CpiError::bad_argument(format!(
            "disk size must be from 1 to {MAX_SIZE_MIB} MiB, got {size}"
        )));
    }
    Ok(size)
}

/// The argument of `calculate_vm_cloud_properties`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct VmResources {
    /// Memory in MiB.
    pub ram: u64,
    /// Number of CPUs.
    pub cpu: u64,
    /// Ephemeral disk size in MiB.
    pub ephemeral_disk_size: u64,
}

impl VmResources {
    /// The cloud properties that make `create_vm` give a VM these resources. Both
    /// backends honour `cpu`, `ram` and `ephemeral_disk`.
    pub fn to_cloud_properties(self) -> Value {
        let mut out = Map::new();
        if self.cpu > 0 {
            out.insert("cpu".into(), self.cpu.into());
        }
        if self.ram > 0 {
            out.insert("ram".into(), self.ram.into());
        }
        if self.ephemeral_disk_size > 0 {
            out.insert("ephemeral_disk".into(), self.ephemeral_disk_size.into());
        }
        Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn typed_view_of_known_keys() {
        let p = VmCloudProperties::parse(&json!({"cpu":2,"ram":1024,"ephemeral_disk":{"size":2048},"pids":500,"ports":["6868/tcp", 22],"Memory":1,"force_start_with_systemd":true})).expect("parse");
        assert_eq!(p.cpu, Some(2.0));
        assert_eq!(p.ram_mib, Some(1024));
        assert_eq!(p.ephemeral_disk_mib, Some(2048));
        assert_eq!(p.pids, Some(500));
        assert_eq!(p.ports, vec!["6868/tcp".to_owned(), "22".to_owned()]);
        assert_eq!(p.systemd_override(), Some(true));
        assert!(p.raw.contains_key("Memory"));
    }

    #[test]
    fn empty_and_null_are_fine() {
        assert_eq!(
            VmCloudProperties::parse(&json!({}))
                .expect("parse")
                .systemd_override(),
            None
        );
        assert!(VmCloudProperties::parse(&Value::Null).is_ok());
    }

    #[test]
    fn refuses_wrong_types_and_absurd_values() {
        for (input, needle) in [
            (json!({"ram": -1}), "ram"),
            (json!({"ram": 0}), "ram"),
            (json!({"ram": "lots"}), "ram"),
            (json!({"ephemeral_disk": 1u64 << 40}), "ephemeral_disk"),
            (json!({"cpu": 0}), "cpu"),
            (json!({"pids": -5}), "pids"),
            (json!({"ports": "6868"}), "ports"),
            (
                json!({"force_start_with_systemd": true, "force_start_without_systemd": true}),
                "both",
            ),
            (json!([1]), "must be an object"),
        ] {
            let err = VmCloudProperties::parse(&input).expect_err(needle);
            assert!(err.message.contains(needle), "{needle}: {}", err.message);
        }
    }

    #[test]
    fn case_insensitive_lookup_prefers_exact() {
        let m = json!({"CpuShares": 1, "cpushares": 2})
            .as_object()
            .cloned()
            .expect("obj");
        assert_eq!(get_ci(&m, "cpushares"), Some(&json!(2)));
        assert!(get_ci(&m, "CPUSHARES").is_some());
        assert_eq!(get_ci(&m, "nope"), None);
    }

    #[test]
    fn calculated_properties_round_trip_through_create_vm_view() {
        let props = VmResources {
            ram: 1024,
            cpu: 2,
            ephemeral_disk_size: 4096,
        }
        .to_cloud_properties();
        let view = VmCloudProperties::parse(&props).expect("parse");
        assert_eq!(view.cpu, Some(2.0));
        assert_eq!(view.ram_mib, Some(1024));
        assert_eq!(view.ephemeral_disk_mib, Some(4096));
    }

    #[test]
    fn disk_sizes() {
        assert!(check_disk_size(0).is_err());
        assert!(check_disk_size(MAX_SIZE_MIB + 1).is_err());
        assert_eq!(check_disk_size(1024).ok(), Some(1024));
    }
}
