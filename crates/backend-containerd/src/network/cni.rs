//! A small CNI client: runs plugin chains (network configuration lists) the way the
//! CNI specification says, with no library.
//!
//! The protocol is an exec: the plugin binary `<bin_dir>/<type>` gets `CNI_COMMAND`,
//! `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME` and `CNI_PATH` in its environment and
//! its configuration as JSON on stdin; it answers a result (ADD) or nothing (DEL) on
//! stdout, or an error object `{"code", "msg", "details"}` with a non-zero exit.
//! In a chain each plugin's ADD gets the previous plugin's result as `prevResult`;
//! DEL runs the chain in reverse with the cached ADD result.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ipnet::IpNet;
use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;

use crate::error::{ContainerdError, Result};

/// The CNI version of the configurations we write (Debian 12's and Noble's plugins
/// speak 0.1.0 to 1.0.0).
pub const CNI_VERSION: &str = "1.0.0";

/// How long one plugin may run.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// A PATH for plugins: the director starts the CPI with a minimal PATH, and plugins
/// run `iptables` and friends from the sbin directories.
const PLUGIN_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The CNI commands we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach.
    Add,
    /// Detach (idempotent by specification).
    Del,
}

impl Command {
    /// The `CNI_COMMAND` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
        }
    }
}

/// Where and for whom a plugin runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtime {
    /// `CNI_CONTAINERID`: the VM cid.
    pub container_id: String,
    /// `CNI_NETNS`: the path of the network namespace.
    pub netns: PathBuf,
    /// `CNI_IFNAME`: the interface inside the namespace.
    pub ifname: String,
    /// `CNI_PATH`: where plugins are.
    pub bin_dir: PathBuf,
}

impl Runtime {
    /// The environment for `command`.
    pub fn env(&self, command: Command) -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", command.as_str().to_owned()),
            ("CNI_CONTAINERID", self.container_id.clone()),
            ("CNI_NETNS", self.netns.display().to_string()),
            ("CNI_IFNAME", self.ifname.clone()),
            ("CNI_PATH", self.bin_dir.display().to_string()),
            ("PATH", PLUGIN_PATH.to_owned()),
        ]
    }
}

/// The configuration one plugin of `conflist` gets: its own object plus the list's
/// `cniVersion` and `name`, the previous result, and the runtime config for the
/// capabilities it declares.
pub fn plugin_config(
    conflist: &Value,
    plugin: &Value,
    prev_result: Option<&Value>,
    runtime_config: &Map<String, Value>,
) -> Value {
    let mut conf = plugin.as_object().cloned().unwrap_or_default();
    for key in ["cniVersion", "name"] {
        if let Some(v) = conflist.get(key) {
            conf.insert(key.to_owned(), v.clone());
        }
    }
    if let Some(prev) = prev_result {
        conf.insert("prevResult".into(), prev.clone());
    }
    let wanted: Map<String, Value> = plugin
        .get("capabilities")
        .and_then(Value::as_object)
        .map(|caps| {
            caps.iter()
                .filter(|(_, on)| on.as_bool() == Some(true))
                .filter_map(|(cap, _)| runtime_config.get(cap).map(|v| (cap.clone(), v.clone())))
                .collect()
        })
        .unwrap_or_default();
    if !wanted.is_empty() {
        conf.insert("runtimeConfig".into(), Value::Object(wanted));
    }
    Value::Object(conf)
}

/// The plugins of a configuration list.
pub fn plugins(conflist: &Value) -> Vec<Value> {
    conflist
        .get("plugins")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// An address from a result: the address with its prefix and the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultIp {
    /// e.g. `10.252.0.5/16`.
    pub address: IpNet,
    /// The gateway, when the IPAM plugin gave one.
    pub gateway: Option<IpAddr>,
}

/// The addresses of a CNI result (0.3.x, 0.4.0 and 1.0.0 share the `ips` shape).
pub fn result_ips(result: &Value) -> Vec<ResultIp> {
    result
        .get("ips")
        .and_then(Value::as_array)
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| {
                    let address = ip.get("address")?.as_str()?.parse::<IpNet>().ok()?;
                    let gateway = ip
                        .get("gateway")
                        .and_then(Value::as_str)
                        .and_then(|g| g.parse().ok());
                    Some(ResultIp { address, gateway })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The message of a CNI error object, or the raw output.
pub fn error_message(stdout: &[u8], stderr: &[u8]) -> String {
    let parsed: Option<Value> = serde_json::from_slice(stdout).ok();
    let from_json = parsed.as_ref().and_then(|v| {
        let msg = v.get("msg")?.as_str()?;
        let code = v.get("code").and_then(Value::as_u64).unwrap_or(0);
        Some(match v.get("details").and_then(Value::as_str) {
            Some(d) if !d.is_empty() => format!("{msg}: {d} (code {code})"),
            _ => format!("{msg} (code {code})"),
        })
    });
    from_json.unwrap_or_else(|| {
        let out = String::from_utf8_lossy(stdout);
        let err = String::from_utf8_lossy(stderr);
        let text = format!("{} {}", out.trim(), err.trim());
        let text = text.trim();
        let tail: String = text
            .chars()
            .rev()
            .take(2000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if tail.is_empty() {
            "no output".to_owned()
        } else {
            tail
        }
    })
}

/// Runs one plugin.
pub async fn exec_plugin(
    runtime: &Runtime,
    command: Command,
    config: &Value,
) -> Result<Option<Value>> {
    let plugin = config
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let fail = |message: String| ContainerdError::Cni {
        plugin: plugin.clone(),
        command: command.as_str(),
        ifname: runtime.ifname.clone(),
        message,
    };
    if plugin.is_empty() || plugin.contains('/') {
        return Err(fail(format!("invalid plugin type {plugin:?}")));
    }
    let binary = runtime.bin_dir.join(&plugin);
    if !binary.is_file() {
        return Err(fail(format!(
            "{} does not exist; install the CNI plugins (Debian/Ubuntu: \
             containernetworking-plugins) or set containerd.cni_bin_dir",
            binary.display()
        )));
    }
    let input = serde_json::to_vec(config).map_err(|e| fail(e.to_string()))?;
    let mut child = tokio::process::Command::new(&binary)
        .envs(runtime.env(command))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("cannot run {}: {e}", binary.display())))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(&input)
            .await
            .map_err(|e| fail(format!("writing its configuration: {e}")))?;
    }
    let output = tokio::time::timeout(PLUGIN_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            fail(format!(
                "did not finish within {}s",
                PLUGIN_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| fail(e.to_string()))?;
    if !output.status.success() {
        return Err(fail(error_message(&output.stdout, &output.stderr)));
    }
    if command == Command::Del || output.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&output.stdout)
        .map(Some)
        .map_err(|e| {
            fail(format!(
                "unreadable result ({e}): {}",
                error_message(&output.stdout, &[])
            ))
        })
}

/// ADD of a whole list, the first plugin getting `prev` as its `prevResult` (the
/// result of an interface made without a plugin); returns the last result.
pub async fn add_list(
    runtime: &Runtime,
    conflist: &Value,
    runtime_config: &Map<String, Value>,
    mut prev: Option<Value>,
) -> Result<Value> {
    for plugin in plugins(conflist) {
        let conf = plugin_config(conflist, &plugin, prev.as_ref(), runtime_config);
        if let Some(result) = exec_plugin(runtime, Command::Add, &conf).await? {
            prev = Some(result);
        }
    }
    Ok(prev.unwrap_or_else(|| Value::Object(Map::new())))
}

/// DEL of a whole list, in reverse, with the cached result. Every plugin runs even
/// when one fails; the failures are returned.
pub async fn del_list(
    runtime: &Runtime,
    conflist: &Value,
    cached: Option<&Value>,
    runtime_config: &Map<String, Value>,
) -> Vec<String> {
    let mut failures = Vec::new();
    for plugin in plugins(conflist).iter().rev() {
        let conf = plugin_config(conflist, plugin, cached, runtime_config);
        let kind = plugin.get("type").and_then(Value::as_str).unwrap_or("");
        if !runtime.bin_dir.join(kind).is_file() {
            // Without the plugin there is nothing to run, now or on a retry: removing
            // the namespace deletes the interfaces; host rules it made may remain.
            tracing::warn!(plugin = kind, ifname = %runtime.ifname,
                "CNI plugin {} is missing: skipping its DEL", runtime.bin_dir.join(kind).display());
            continue;
        }
        if let Err(e) = exec_plugin(runtime, Command::Del, &conf).await {
            failures.push(e.to_string());
        }
    }
    failures
}

/// Where the network namespace named `name` is (`ip netns` convention).
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/var/run/netns").join(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn list() -> Value {
        json!({"cniVersion": "1.0.0", "name": "bcpi-x", "plugins": [
            {"type": "bridge", "bridge": "bcpi0"},
            {"type": "portmap", "capabilities": {"portMappings": true, "bandwidth": false}},
        ]})
    }

    #[test]
    fn plugin_config_merges_list_fields_prev_result_and_capabilities() {
        let rc = json!({"portMappings": [{"hostPort": 1, "containerPort": 1, "protocol": "tcp"}], "bandwidth": {}});
        let rc = rc.as_object().expect("obj");
        let ps = plugins(&list());
        let first = plugin_config(&list(), &ps[0], None, rc);
        assert_eq!(
            first,
            json!({"type": "bridge", "bridge": "bcpi0", "cniVersion": "1.0.0", "name": "bcpi-x"})
        );
        let prev = json!({"ips": []});
        let second = plugin_config(&list(), &ps[1], Some(&prev), rc);
        assert_eq!(second["prevResult"], prev);
        assert_eq!(second["runtimeConfig"]["portMappings"][0]["hostPort"], 1);
        assert!(second["runtimeConfig"].get("bandwidth").is_none());
    }

    #[test]
    fn environment_of_a_plugin() {
        let rt = Runtime {
            container_id: "vm-1".into(),
            netns: netns_path("vm-1"),
            ifname: "eth0".into(),
            bin_dir: "/usr/lib/cni".into(),
        };
        let env = rt.env(Command::Del);
        let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(get("CNI_COMMAND").as_deref(), Some("DEL"));
        assert_eq!(get("CNI_NETNS").as_deref(), Some("/var/run/netns/vm-1"));
        assert_eq!(get("CNI_IFNAME").as_deref(), Some("eth0"));
        assert_eq!(get("CNI_PATH").as_deref(), Some("/usr/lib/cni"));
        assert!(get("PATH").is_some_and(|p| p.contains("/usr/sbin")));
    }

    #[test]
    fn reads_ips_of_v1_and_v04_results() {
        let v1 = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.252.0.7/16", "gateway": "10.252.0.1", "interface": 2}]});
        let v04 =
            json!({"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.0.0.2/24"}]});
        assert_eq!(
            result_ips(&v1),
            vec![ResultIp {
                address: "10.252.0.7/16".parse().expect("net"),
                gateway: Some("10.252.0.1".parse().expect("ip")),
            }]
        );
        assert_eq!(result_ips(&v04)[0].gateway, None);
        assert!(result_ips(&json!({})).is_empty());
    }

    #[test]
    fn error_messages_from_json_or_raw_output() {
        let msg = error_message(
            br#"{"code": 11, "msg": "failed to allocate", "details": "range full"}"#,
            b"",
        );
        assert_eq!(msg, "failed to allocate: range full (code 11)");
        assert_eq!(error_message(b"", b"panic: x\n"), "panic: x");
        assert_eq!(error_message(b"", b""), "no output");
    }

    #[tokio::test]
    async fn a_missing_plugin_says_what_to_install() {
        let rt = Runtime {
            container_id: "vm-1".into(),
            netns: netns_path("vm-1"),
            ifname: "eth0".into(),
            bin_dir: "/nonexistent/cni".into(),
        };
        let err = exec_plugin(&rt, Command::Add, &json!({"type": "bridge"}))
            .await
            .expect_err("missing");
        assert!(
            err.to_string().contains("containernetworking-plugins"),
            "{err}"
        );
        let err = exec_plugin(&rt, Command::Add, &json!({"type": "../x"}))
            .await
            .expect_err("bad");
        assert!(err.to_string().contains("invalid plugin type"), "{err}");
    }
}
