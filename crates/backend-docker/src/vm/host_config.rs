//! The Go Docker CPI inlined Docker's `HostConfig` into VM cloud properties, so
//! manifests set `Memory`, `CpuShares`, `Devices`, `Mounts`, ... there. We keep
//! accepting them, matched case-insensitively as Go's JSON decoder did, except the
//! fields the CPI must own.

use bollard::models::HostConfig;
use serde_json::{Map, Value};

use crate::error::{DockerError, Result};

/// Docker `HostConfig` fields (API 1.41 and later) the Go Docker CPI accepted in VM
/// cloud properties; matched case-insensitively like Go's JSON decoder did.
const HOST_CONFIG_KEYS: &[&str] = &[
    "CpuShares",
    "Memory",
    "CgroupParent",
    "BlkioWeight",
    "BlkioWeightDevice",
    "BlkioDeviceReadBps",
    "BlkioDeviceWriteBps",
    "BlkioDeviceReadIOps",
    "BlkioDeviceWriteIOps",
    "CpuPeriod",
    "CpuQuota",
    "CpuRealtimePeriod",
    "CpuRealtimeRuntime",
    "CpusetCpus",
    "CpusetMems",
    "Devices",
    "DeviceCgroupRules",
    "DeviceRequests",
    "MemoryReservation",
    "MemorySwap",
    "MemorySwappiness",
    "NanoCpus",
    "OomKillDisable",
    "Init",
    "PidsLimit",
    "Ulimits",
    "CpuCount",
    "CpuPercent",
    "IOMaximumIOps",
    "IOMaximumBandwidth",
    "Binds",
    "LogConfig",
    "PortBindings",
    "RestartPolicy",
    "VolumeDriver",
    "VolumesFrom",
    "Mounts",
    "Annotations",
    "CapAdd",
    "CapDrop",
    "Dns",
    "DnsOptions",
    "DnsSearch",
    "ExtraHosts",
    "GroupAdd",
    "IpcMode",
    "Cgroup",
    "Links",
    "OomScoreAdj",
    "PidMode",
    "ReadonlyRootfs",
    "SecurityOpt",
    "StorageOpt",
    "Tmpfs",
    "UTSMode",
    "UsernsMode",
    "ShmSize",
    "Sysctls",
    "Runtime",
    "Isolation",
    "MaskedPaths",
    "ReadonlyPaths",
];

/// `HostConfig` fields the CPI owns: given in cloud properties, they are ignored
/// (with a warning) because the VM would not work with another value.
const OWNED_KEYS: &[&str] = &[
    "NetworkMode",
    "Privileged",
    "AutoRemove",
    "ContainerIDFile",
    "CgroupnsMode",
    "PublishAllPorts",
    "ConsoleSize",
];

/// The operator's Docker `HostConfig` from VM cloud properties (the Go CPI inlined
/// Docker's `HostConfig` there). Returns the config and warnings.
pub fn host_config_from_props(raw: &Map<String, Value>) -> Result<(HostConfig, Vec<String>)> {
    let mut warnings = Vec::new();
    let mut canonical = Map::new();
    for (key, value) in raw {
        if let Some(owned) = OWNED_KEYS.iter().find(|k| k.eq_ignore_ascii_case(key)) {
            warnings.push(format!(
                "cloud_properties.{key} is ignored: the CPI sets {owned} itself{}",
                if *owned == "Privileged" {
                    " (see the `privileged` config key)"
                } else {
                    ""
                }
            ));
            continue;
        }
        if let Some(name) = HOST_CONFIG_KEYS
            .iter()
            .find(|k| k.eq_ignore_ascii_case(key))
        {
            let mut value = value.clone();
            canonicalise_nested(name, &mut value);
            if *name == "Mounts" {
                strip_unix_scheme(&mut value);
            }
            // An exact-case key wins over a differently cased duplicate.
            if key.as_str() == *name || !canonical.contains_key(*name) {
                canonical.insert((*name).to_owned(), value);
            }
        }
    }
    let host: HostConfig =
        serde_json::from_value(Value::Object(canonical.clone())).map_err(|e| {
            DockerError::Invalid(format!(
                "VM cloud_properties: Docker HostConfig fields ({}) do not parse: {e}",
                canonical.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
    Ok((host, warnings))
}

/// Field names of the structs nested in `HostConfig` (`Mounts[]`, `Devices[]`,
/// `Ulimits[]`, `LogConfig`, `RestartPolicy`, `PortBindings` values, the `Blkio*`
/// lists, `DeviceRequests[]`). Go's decoder matched these case-insensitively too, so
/// bosh-deployment's `mounts: [{type: bind, source: ..., target: ...}]` worked with
/// the Go CPI; serde would silently drop the lowercase spellings.
const NESTED_KEYS: &[&str] = &[
    "Target",
    "Source",
    "Type",
    "ReadOnly",
    "Consistency",
    "BindOptions",
    "Propagation",
    "NonRecursive",
    "CreateMountpoint",
    "ReadOnlyNonRecursive",
    "ReadOnlyForceRecursive",
    "VolumeOptions",
    "NoCopy",
    "Labels",
    "DriverConfig",
    "Name",
    "Options",
    "Subpath",
    "TmpfsOptions",
    "SizeBytes",
    "Mode",
    "PathOnHost",
    "PathInContainer",
    "CgroupPermissions",
    "Soft",
    "Hard",
    "Config",
    "MaximumRetryCount",
    "HostIp",
    "HostPort",
    "Path",
    "Weight",
    "Rate",
    "Driver",
    "Count",
    "DeviceIDs",
    "Capabilities",
];

/// Nested fields whose values are free-form maps: their keys are data (label names,
/// driver options, log options), never renamed.
const MAP_VALUED: &[&str] = &["Labels", "Options", "Config"];

/// Top-level `HostConfig` fields whose values are maps with data keys.
const TOP_LEVEL_MAPS: &[&str] = &["Annotations", "StorageOpt", "Sysctls", "Tmpfs"];

/// Renames the keys of the structs inside a top-level `HostConfig` field to their
/// canonical spelling (an exact-case key wins over a differently cased duplicate).
fn canonicalise_nested(field: &str, value: &mut Value) {
    if TOP_LEVEL_MAPS.contains(&field) {
        return;
    }
    if field == "PortBindings" {
        // `{"80/tcp": [{"HostIp": ..., "HostPort": ...}]}`: the port keys are data.
        if let Value::Object(ports) = value {
            for bindings in ports.values_mut() {
                canonicalise_structs(bindings);
            }
        }
        return;
    }
    canonicalise_structs(value);
}

fn canonicalise_structs(value: &mut Value) {
    match value {
        Value::Array(items) => items.iter_mut().for_each(canonicalise_structs),
        Value::Object(map) => {
            let mut out = Map::new();
            for (key, mut inner) in std::mem::take(map) {
                let Some(name) = NESTED_KEYS.iter().find(|k| k.eq_ignore_ascii_case(&key)) else {
                    out.insert(key, inner);
                    continue;
                };
                if !MAP_VALUED.contains(name) {
                    canonicalise_structs(&mut inner);
                }
                if key == *name || !out.contains_key(*name) {
                    out.insert((*name).to_owned(), inner);
                }
            }
            *map = out;
        }
        _ => {}
    }
}

/// The Go CPI let `Mounts[].Source` be written `unix:///var/run/x.sock`.
fn strip_unix_scheme(mounts: &mut Value) {
    if let Value::Array(items) = mounts {
        for m in items {
            if let Some(Value::String(src)) = m.as_object_mut().and_then(|o| {
                o.iter_mut()
                    .find(|(k, _)| k.eq_ignore_ascii_case("Source"))
                    .map(|(_, v)| v)
            }) {
                if let Some(rest) = src.strip_prefix("unix://") {
                    *src = rest.to_owned();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_fields_are_case_insensitive_but_map_keys_are_data() {
        // bosh-deployment's docker/unix-sock.yml spells the mount fields in lowercase.
        let (h, _) = host_config_from_props(
            json!({"mounts": [{"type": "bind", "source": "unix:///var/run/docker.sock",
                               "target": "/var/run/docker.sock", "readonly": true,
                               "bindoptions": {"propagation": "rshared"}},
                              {"Type": "volume", "Target": "/data", "target": "/ignored",
                               "volumeoptions": {"labels": {"keepCase": "v"}}}],
                   "logconfig": {"type": "json-file", "config": {"max-Size": "10m"}},
                   "restartpolicy": {"name": "always"},
                   "portbindings": {"80/tcp": [{"hostip": "127.0.0.1", "hostport": "8080"}]},
                   "sysctls": {"net.ipv4.Ip_forward": "1"},
                   "devices": [{"pathonhost": "/dev/fuse", "pathincontainer": "/dev/fuse", "cgrouppermissions": "rwm"}],
                   "ulimits": [{"name": "nofile", "soft": 1024, "hard": 2048}]})
            .as_object()
            .expect("obj"),
        )
        .expect("host config");
        let mounts = h.mounts.expect("mounts");
        assert_eq!(mounts[0].source.as_deref(), Some("/var/run/docker.sock"));
        assert_eq!(mounts[0].target.as_deref(), Some("/var/run/docker.sock"));
        assert_eq!(mounts[0].read_only, Some(true));
        assert_eq!(
            mounts[0].typ.map(|t| t.to_string()),
            Some("bind".to_owned())
        );
        assert_eq!(
            mounts[0]
                .bind_options
                .as_ref()
                .and_then(|b| b.propagation)
                .map(|p| p.to_string()),
            Some("rshared".to_owned())
        );
        assert_eq!(
            mounts[1].target.as_deref(),
            Some("/data"),
            "exact case wins"
        );
        let labels = mounts[1]
            .volume_options
            .as_ref()
            .and_then(|v| v.labels.clone())
            .expect("labels");
        assert_eq!(labels.get("keepCase").map(String::as_str), Some("v"));
        let log = h.log_config.expect("log config");
        assert_eq!(log.typ.as_deref(), Some("json-file"));
        assert_eq!(
            log.config
                .expect("config")
                .get("max-Size")
                .map(String::as_str),
            Some("10m")
        );
        assert!(h.restart_policy.expect("restart").name.is_some());
        let ports = h.port_bindings.expect("ports");
        let binding = &ports["80/tcp"].as_ref().expect("bindings")[0];
        assert_eq!(binding.host_port.as_deref(), Some("8080"));
        assert_eq!(binding.host_ip.as_deref(), Some("127.0.0.1"));
        assert!(h
            .sysctls
            .expect("sysctls")
            .contains_key("net.ipv4.Ip_forward"));
        let device = &h.devices.expect("devices")[0];
        assert_eq!(device.path_on_host.as_deref(), Some("/dev/fuse"));
        assert_eq!(device.cgroup_permissions.as_deref(), Some("rwm"));
        let ulimit = &h.ulimits.expect("ulimits")[0];
        assert_eq!((ulimit.soft, ulimit.hard), (Some(1024), Some(2048)));
    }

    #[test]
    fn go_cpi_host_config_fields_are_case_insensitive() {
        let (h, w) = host_config_from_props(
            json!({"memory": 1048576, "CPUShares": 512, "pidslimit": 100, "Privileged": false,
                   "Mounts": [{"Type":"bind","Source":"unix:///var/run/docker.sock","Target":"/var/run/docker.sock"}],
                   "cpu": 2, "unrelated": "x"})
            .as_object()
            .expect("obj"),
        )
        .expect("host config");
        assert_eq!(h.memory, Some(1_048_576));
        assert_eq!(h.cpu_shares, Some(512));
        assert_eq!(h.pids_limit, Some(100));
        assert_eq!(h.privileged, None);
        assert_eq!(
            h.mounts.expect("mounts")[0].source.as_deref(),
            Some("/var/run/docker.sock")
        );
        assert_eq!(w.len(), 1, "{w:?}");
        let err = host_config_from_props(json!({"Memory": "lots"}).as_object().expect("obj"))
            .expect_err("bad type");
        assert!(err.to_string().contains("Memory"), "{err}");
    }
}
