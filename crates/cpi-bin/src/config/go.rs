//! The Go Docker CPI's `cpi.json`, read as it is (contract §6).
//!
//! ```json
//! {"start_containers_with_systemd": false, "mount_cgroupfs": true, "enable_lxcfs_support": false,
//!  "light_stemcell": {"require_image_verification": true},
//!  "Actions": {"Docker": {"host": "unix:///var/run/docker.sock", "api_version": "1.44", "tls": {...}},
//!              "Agent": {"Mbus": "nats://...", "NTP": [], "Blobstore": {...}}}}
//! ```
//!
//! The file is recognised by a top-level `Actions` key (any casing) and translated
//! into our own shape (`backend: docker`, `agent`, `docker`), which then goes through
//! the same typed parsing and validation as our format. Keys match case-insensitively,
//! as Go's `encoding/json` matched them; `null` means "not set", as it did in Go.
//! While translating we remember where each of our keys came from, so that errors name
//! the key as the operator wrote it (`Actions.Docker.Host`, not `docker.host`).

use std::collections::BTreeMap;

use backend_docker::config::{LightStemcellConfig, TlsConfig};
use backend_docker::DockerConfig;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::fields::{match_field, struct_fields};
use super::{Invalid, UnknownKey};

/// Top-level keys of the Go file, as its template writes them.
const TOP_KEYS: [&str; 5] = [
    "start_containers_with_systemd",
    "mount_cgroupfs",
    "enable_lxcfs_support",
    "light_stemcell",
    "Actions",
];
/// Keys of `Actions`.
const ACTIONS_KEYS: [&str; 2] = ["Docker", "Agent"];
/// Keys of `Actions.Agent` (`Blobstore` is accepted and ignored: blobstores reach the
/// agent through `env.bosh.blobstores` now).
const AGENT_KEYS: [&str; 3] = ["Mbus", "NTP", "Blobstore"];

/// Whether a config object is in the Go Docker CPI's shape.
pub fn is_go_format(obj: &Map<String, Value>) -> bool {
    obj.keys().any(|k| k.eq_ignore_ascii_case("actions"))
}

/// A Go config translated into our shape, with the Go spelling of our keys.
#[derive(Debug)]
pub struct Translated {
    /// `{"backend": "docker", "agent": {...}, "docker": {...}}`.
    pub value: Value,
    /// Our key path → the key path as written in the Go file.
    pub names: BTreeMap<String, String>,
}

fn find_ci<'a>(known: &[&'a str], key: &str) -> Option<&'a str> {
    known
        .iter()
        .find(|k| **k == key)
        .or_else(|| known.iter().find(|k| k.eq_ignore_ascii_case(key)))
        .copied()
}

fn unknown(key: String, known: &[&str]) -> UnknownKey {
    UnknownKey {
        key,
        known: known.iter().map(|k| (*k).to_owned()).collect(),
    }
}

fn object<'a>(value: &'a Value, go_key: &str) -> Result<&'a Map<String, Value>, Invalid> {
    value.as_object().ok_or_else(|| Invalid::Value {
        key: go_key.to_owned(),
        what: "must be an object".into(),
    })
}

struct Translator {
    docker: Map<String, Value>,
    agent: Map<String, Value>,
    names: BTreeMap<String, String>,
    unknown: Vec<UnknownKey>,
}

impl Translator {
    /// Copies an object whose keys are the fields of `T`, matching them
    /// case-insensitively; `our` and `go` are the paths of the object itself.
    fn normalise<T: DeserializeOwned>(
        &mut self,
        obj: &Map<String, Value>,
        our: &str,
        go: &str,
    ) -> Map<String, Value> {
        let mut out = Map::new();
        for (key, value) in obj {
            if value.is_null() {
                continue;
            }
            match match_field::<T>(key) {
                Some(field) => {
                    self.names
                        .insert(format!("{our}.{field}"), format!("{go}.{key}"));
                    out.insert(field.to_owned(), value.clone());
                }
                None => self
                    .unknown
                    .push(unknown(format!("{go}.{key}"), struct_fields::<T>())),
            }
        }
        out
    }

    fn docker_section(&mut self, obj: &Map<String, Value>, go: &str) {
        for (key, value) in obj {
            let Some(field) = match_field::<DockerConfig>(key) else {
                self.unknown.push(unknown(
                    format!("{go}.{key}"),
                    struct_fields::<DockerConfig>(),
                ));
                continue;
            };
            let go_key = format!("{go}.{key}");
            let our_key = format!("docker.{field}");
            let value = match (field, value) {
                (_, Value::Null) => continue,
                // The Go CPI's default "1.44" was a demand; for us it is a preference,
                // and an empty one means "negotiate".
                ("api_version", Value::String(s)) if s.is_empty() => continue,
                ("tls", Value::Object(tls)) => {
                    Value::Object(self.normalise::<TlsConfig>(tls, &our_key, &go_key))
                }
                ("light_stemcell", Value::Object(ls)) => {
                    Value::Object(self.normalise::<LightStemcellConfig>(ls, &our_key, &go_key))
                }
                (_, v) => v.clone(),
            };
            self.names.insert(our_key, go_key);
            self.docker.insert(field.to_owned(), value);
        }
    }

    fn agent_section(&mut self, obj: &Map<String, Value>, go: &str) {
        for (key, value) in obj {
            match find_ci(&AGENT_KEYS, key) {
                Some("Mbus") if !value.is_null() => {
                    self.names
                        .insert("agent.mbus".into(), format!("{go}.{key}"));
                    self.agent.insert("mbus".into(), value.clone());
                }
                Some("NTP") if !value.is_null() => {
                    self.names.insert("agent.ntp".into(), format!("{go}.{key}"));
                    self.agent.insert("ntp".into(), value.clone());
                }
                Some(_) => {}
                None => self
                    .unknown
                    .push(unknown(format!("{go}.{key}"), &AGENT_KEYS)),
            }
        }
    }

    fn actions(&mut self, obj: &Map<String, Value>, go: &str) -> Result<(), Invalid> {
        for (key, value) in obj {
            let go_key = format!("{go}.{key}");
            match find_ci(&ACTIONS_KEYS, key) {
                _ if value.is_null() => {}
                Some("Docker") => {
                    self.names.insert("docker".into(), go_key.clone());
                    self.docker_section(object(value, &go_key)?, &go_key);
                }
                Some(_) => {
                    self.names.insert("agent".into(), go_key.clone());
                    self.agent_section(object(value, &go_key)?, &go_key);
                }
                None => self.unknown.push(unknown(go_key, &ACTIONS_KEYS)),
            }
        }
        Ok(())
    }
}

/// Translates a Go Docker CPI config object into our shape.
pub fn translate(obj: &Map<String, Value>) -> Result<Translated, Invalid> {
    let mut t = Translator {
        docker: Map::new(),
        agent: Map::new(),
        names: BTreeMap::new(),
        unknown: Vec::new(),
    };
    // Defaults for keys that may be missing, so errors about them use Go names.
    t.names.insert("backend".into(), "Actions".into());
    t.names.insert("agent".into(), "Actions.Agent".into());
    t.names
        .insert("agent.mbus".into(), "Actions.Agent.Mbus".into());
    t.names.insert("docker".into(), "Actions.Docker".into());
    for (key, value) in obj {
        let Some(top) = find_ci(&TOP_KEYS, key) else {
            t.unknown.push(unknown(key.clone(), &TOP_KEYS));
            continue;
        };
        match (top, value) {
            (_, Value::Null) => {}
            ("Actions", v) => t.actions(object(v, key)?, key)?,
            // Go's false meant "runit for every VM"; ours picks by stemcell, which is
            // what the operator wanted on every stemcell the Go CPI could run.
            ("start_containers_with_systemd", Value::Bool(false)) => {}
            ("light_stemcell", Value::Object(ls)) => {
                let normalised =
                    t.normalise::<LightStemcellConfig>(ls, "docker.light_stemcell", key);
                t.names.insert("docker.light_stemcell".into(), key.clone());
                t.docker
                    .insert("light_stemcell".into(), Value::Object(normalised));
            }
            (field, v) => {
                t.names.insert(format!("docker.{field}"), key.clone());
                t.docker.insert(field.to_owned(), v.clone());
            }
        }
    }
    if !t.unknown.is_empty() {
        t.unknown.sort_by(|a, b| a.key.cmp(&b.key));
        return Err(Invalid::Unknown(t.unknown));
    }
    let mut out = Map::new();
    out.insert("backend".into(), Value::String("docker".into()));
    out.insert("agent".into(), Value::Object(t.agent));
    out.insert("docker".into(), Value::Object(t.docker));
    Ok(Translated {
        value: Value::Object(out),
        names: t.names,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("object")
    }

    #[test]
    fn translates_the_contract_example() {
        let go = obj(
            json!({"start_containers_with_systemd": false, "mount_cgroupfs": true, "enable_lxcfs_support": false,
            "light_stemcell": {"require_image_verification": true},
            "Actions": {"Docker": {"host": "tcp://10.0.0.5:2376", "api_version": "1.44",
                                   "tls": {"ca": "CA", "certificate": "CERT", "private_key": "KEY"}},
                        "Agent": {"Mbus": "nats://nats:pw@10.0.0.6:4222", "NTP": ["0.pool.ntp.org"], "Blobstore": {"Provider": "dav", "Options": {}}}}}),
        );
        assert!(is_go_format(&go));
        let t = translate(&go).expect("translate");
        assert_eq!(
            t.value,
            json!({"backend": "docker",
                   "agent": {"mbus": "nats://nats:pw@10.0.0.6:4222", "ntp": ["0.pool.ntp.org"]},
                   "docker": {"mount_cgroupfs": true, "enable_lxcfs_support": false,
                              "light_stemcell": {"require_image_verification": true},
                              "host": "tcp://10.0.0.5:2376", "api_version": "1.44",
                              "tls": {"ca": "CA", "certificate": "CERT", "private_key": "KEY"}}})
        );
        assert_eq!(t.names["agent.mbus"], "Actions.Agent.Mbus");
        assert_eq!(
            t.names["docker.tls.private_key"],
            "Actions.Docker.tls.private_key"
        );
    }

    #[test]
    fn keys_match_in_any_casing_and_nulls_are_unset() {
        let go = obj(
            json!({"ACTIONS": {"docker": {"Host": "unix:///x.sock", "API_Version": "", "TLS": {"CA": "a", "Certificate": "b", "Private_Key": "c"}},
                                        "agent": {"mbus": "https://u:p@0.0.0.0:6868", "ntp": null, "blobstore": null}},
                             "Start_Containers_With_Systemd": true, "MOUNT_CGROUPFS": null}),
        );
        assert!(is_go_format(&go));
        let t = translate(&go).expect("translate");
        assert_eq!(
            t.value["docker"],
            json!({"host": "unix:///x.sock", "tls": {"ca": "a", "certificate": "b", "private_key": "c"}, "start_containers_with_systemd": true})
        );
        assert_eq!(
            t.value["agent"],
            json!({"mbus": "https://u:p@0.0.0.0:6868"})
        );
        assert_eq!(t.names["docker.host"], "ACTIONS.docker.Host");
        assert_eq!(t.names["docker.tls.ca"], "ACTIONS.docker.TLS.CA");
        assert_eq!(
            t.names["docker.start_containers_with_systemd"],
            "Start_Containers_With_Systemd"
        );
    }

    #[test]
    fn unknown_keys_are_listed_with_their_go_paths() {
        let go = obj(
            json!({"Actions": {"Docker": {"hots": "x"}, "Agnet": {}, "Agent": {"Mbus": "m", "Registry": {}}}, "host_ip": "10.0.0.1"}),
        );
        let Err(Invalid::Unknown(keys)) = translate(&go) else {
            panic!("expected unknown keys");
        };
        let names: Vec<&str> = keys.iter().map(|k| k.key.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "Actions.Agent.Registry",
                "Actions.Agnet",
                "Actions.Docker.hots",
                "host_ip"
            ]
        );
        assert!(keys[2].known.contains(&"host".to_owned()));
        assert!(keys[0].known.contains(&"Mbus".to_owned()));
    }

    #[test]
    fn non_objects_are_named() {
        let Err(Invalid::Value { key, what }) =
            translate(&obj(json!({"Actions": {"Docker": "x"}})))
        else {
            panic!("expected an error");
        };
        assert_eq!(key, "Actions.Docker");
        assert_eq!(what, "must be an object");
    }
}
