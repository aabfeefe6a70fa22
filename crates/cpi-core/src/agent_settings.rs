//! The agent settings document a warden-type stemcell's agent reads from
//! [`SETTINGS_PATH`] inside the VM.
//!
//! Field names, order and null-versus-empty choices follow what the agent and the Go
//! CPIs exchange (contract §4), so the serialised form is byte-compatible with theirs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{AgentId, DiskCid, VmCid};
use crate::network::{Network, NetworkType, Networks};

/// Where the agent of a warden-type stemcell reads its settings.
pub const SETTINGS_PATH: &str = "/var/vcap/bosh/warden-cpi-agent-env.json";

/// The directory inside a VM under which persistent disks appear.
pub const DISK_MOUNT_ROOT: &str = "/warden-cpi-dev";

/// The ephemeral data directory inside a VM.
pub const EPHEMERAL_PATH: &str = "/var/vcap/data";

/// The path inside a VM where persistent disk `cid` appears; also the v2 disk hint.
pub fn disk_path_in_vm(cid: &DiskCid) -> String {
    format!("{DISK_MOUNT_ROOT}/{cid}")
}

/// What the CPI config says about the agent: the same for every VM.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AgentOptions {
    /// The message bus URL the agent listens on (e.g. `https://user:pw@0.0.0.0:6868`).
    /// Holds credentials: never log it.
    pub mbus: String,
    /// NTP servers.
    #[serde(default)]
    pub ntp: Vec<String>,
}

/// The whole settings document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentSettings {
    /// The agent's id (`create_vm` argument 0).
    pub agent_id: String,
    /// The VM's own cid, twice.
    pub vm: VmRef,
    /// The message bus URL from the CPI config.
    pub mbus: String,
    /// NTP servers from the CPI config.
    pub ntp: Vec<String>,
    /// Every network of the VM, all preconfigured.
    pub networks: BTreeMap<String, SettingsNetwork>,
    /// System, ephemeral and persistent disk hints.
    pub disks: Disks,
    /// `create_vm`'s `env` argument verbatim. Holds secrets: never log it.
    pub env: Value,
}

/// `vm` in the settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRef {
    /// The VM cid.
    pub name: String,
    /// The VM cid again.
    pub id: String,
}

/// One network as the agent sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettingsNetwork {
    /// manual, dynamic or vip.
    #[serde(rename = "type")]
    pub kind: String,
    /// The VM's address on it.
    pub ip: String,
    /// Its netmask.
    pub netmask: String,
    /// Its gateway.
    pub gateway: String,
    /// Nameservers.
    pub dns: Vec<String>,
    /// What it is the default for.
    pub default: Vec<String>,
    /// Static routes, `null` when none (as the Go CPIs write it).
    pub routes: Option<Vec<SettingsRoute>>,
    /// The DNS alias, omitted when none.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub alias: Option<String>,
    /// A MAC address, `""` when the CPI does not set one.
    pub mac: String,
    /// Always true: the CPI configures interfaces; the agent only writes DNS.
    pub preconfigured: bool,
}

/// A static route as the agent reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettingsRoute {
    /// Destination network address.
    pub destination: String,
    /// Destination netmask.
    pub netmask: String,
    /// Next hop.
    pub gateway: String,
}

/// `disks` in the settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Disks {
    /// Always `""` on container VMs.
    pub system: String,
    /// Always `null`: the agent skips ephemeral disk setup; `/var/vcap/data` is mounted.
    pub ephemeral: Option<Value>,
    /// Persistent disks by cid, with their hint (the path inside the VM). `null` until
    /// a disk is first attached, `{}` after the last one is detached.
    pub persistent: Option<BTreeMap<String, Value>>,
}

impl SettingsNetwork {
    fn from_network(net: &Network) -> SettingsNetwork {
        let (ip, netmask) = match net.address {
            Some(a) if net.kind != NetworkType::Vip || a.prefix_len() != a.max_prefix_len() => {
                (a.addr().to_string(), a.netmask().to_string())
            }
            Some(a) => (a.addr().to_string(), String::new()),
            None => (String::new(), String::new()),
        };
        SettingsNetwork {
            kind: net.kind.as_str().to_owned(),
            ip,
            netmask,
            gateway: net.gateway.map(|g| g.to_string()).unwrap_or_default(),
            dns: net.dns.iter().map(ToString::to_string).collect(),
            default: net.default.clone(),
            routes: (!net.routes.is_empty()).then(|| {
                net.routes
                    .iter()
                    .map(|r| SettingsRoute {
                        destination: r.destination.network().to_string(),
                        netmask: r.destination.netmask().to_string(),
                        gateway: r.gateway.to_string(),
                    })
                    .collect()
            }),
            alias: net.alias.clone(),
            mac: net.mac.clone().unwrap_or_default(),
            preconfigured: true,
        }
    }
}

impl AgentSettings {
    /// The settings for a new VM.
    pub fn for_vm(
        agent_id: &AgentId,
        vm: &VmCid,
        agent: &AgentOptions,
        networks: &Networks,
        env: &Value,
    ) -> AgentSettings {
        AgentSettings {
            agent_id: agent_id.to_string(),
            vm: VmRef {
                name: vm.to_string(),
                id: vm.to_string(),
            },
            mbus: agent.mbus.clone(),
            ntp: agent.ntp.clone(),
            networks: networks
                .iter()
                .map(|n| (n.name.clone(), SettingsNetwork::from_network(n)))
                .collect(),
            disks: Disks {
                system: String::new(),
                ephemeral: None,
                persistent: None,
            },
            env: if env.is_null() {
                Value::Object(Default::default())
            } else {
                env.clone()
            },
        }
    }

    /// Records persistent disk `cid` at its path under [`DISK_MOUNT_ROOT`].
    pub fn attach_persistent(&mut self, cid: &DiskCid) {
        self.disks
            .persistent
            .get_or_insert_with(BTreeMap::new)
            .insert(cid.to_string(), Value::String(disk_path_in_vm(cid)));
    }

    /// Forgets persistent disk `cid`; returns whether it was recorded.
    pub fn detach_persistent(&mut self, cid: &DiskCid) -> bool {
        self.disks
            .persistent
            .get_or_insert_with(BTreeMap::new)
            .remove(cid.as_str())
            .is_some()
    }

    /// The persistent disks recorded, in cid order.
    pub fn persistent_disks(&self) -> Vec<String> {
        self.disks
            .persistent
            .as_ref()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The document as the agent reads it (compact JSON).
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising a tree of strings, maps and `Value`s cannot fail.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }

    /// Parses a document read back from a VM.
    pub fn from_json(bytes: &[u8]) -> Result<AgentSettings, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const FIXTURE_ENV: &str =
        include_str!("../tests/data/lifecycle/04-create_vm.container-agent-env.json");
    const FIXTURE_ATTACHED: &str = include_str!(
        "../tests/data/lifecycle-legacy-attach/11-attach_disk.container-agent-env-after.json"
    );
    const FIXTURE_DETACHED: &str = include_str!(
        "../tests/data/lifecycle-legacy-attach/14-detach_disk.container-agent-env-after.json"
    );

    fn fixture_settings(vm: &str) -> AgentSettings {
        let networks = Networks::parse(&json!({"default":{"type":"manual","ip":"10.245.0.10","netmask":"255.255.0.0","gateway":"10.245.0.1","dns":["10.245.0.2"],"default":["dns","gateway"],"cloud_properties":{"name":"dcpi-peer-net"}}})).expect("networks");
        AgentSettings::for_vm(
            &AgentId::new("agent-dcpi-0001").expect("id"),
            &VmCid::new(vm).expect("cid"),
            &AgentOptions {
                mbus: "https://user:pass@0.0.0.0:6868".into(),
                ntp: vec![],
            },
            &networks,
            &json!({"bosh":{"group":"dcpi-bench-z1","groups":["dcpi-bench","z1"]}}),
        )
    }

    #[test]
    fn serialises_byte_for_byte_like_the_go_cpi() {
        let settings = fixture_settings("c-c1fa0a9f-1f0d-4d86-5253-db14e6566d63");
        assert_eq!(
            String::from_utf8(settings.to_json()).expect("utf8"),
            FIXTURE_ENV.trim()
        );
    }

    #[test]
    fn attach_and_detach_match_the_go_cpi_files() {
        let mut settings = fixture_settings("c-5d14bb97-d14b-4663-4f10-e5b64c26a176");
        let disk = DiskCid::new("vol-d27f349f-2e6f-4bc6-776c-acfd01aeafa7").expect("disk");
        settings.attach_persistent(&disk);
        assert_eq!(
            String::from_utf8(settings.to_json()).expect("utf8"),
            FIXTURE_ATTACHED.trim()
        );
        assert_eq!(settings.persistent_disks(), vec![disk.to_string()]);
        assert!(settings.detach_persistent(&disk));
        assert!(!settings.detach_persistent(&disk));
        assert_eq!(
            String::from_utf8(settings.to_json()).expect("utf8"),
            FIXTURE_DETACHED.trim()
        );
    }

    #[test]
    fn round_trips() {
        let settings = AgentSettings::from_json(FIXTURE_ATTACHED.as_bytes()).expect("parse");
        assert_eq!(
            serde_json::from_slice::<Value>(&settings.to_json()).expect("json"),
            serde_json::from_str::<Value>(FIXTURE_ATTACHED).expect("json")
        );
    }

    #[test]
    fn no_blobstore_key_and_preconfigured_everywhere() {
        let v: Value = serde_json::from_slice(&fixture_settings("c-1").to_json()).expect("json");
        assert!(v.get("blobstore").is_none());
        assert_eq!(v["networks"]["default"]["preconfigured"], true);
    }
}
