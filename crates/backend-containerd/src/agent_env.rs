//! The files a VM needs before its init starts: the agent settings
//! (`/var/vcap/bosh/warden-cpi-agent-env.json`), `/etc/resolv.conf`, `/etc/hosts` and
//! `/etc/hostname`, all regular files the VM owns (contract §4, §5).
//!
//! Building the contents is pure; [`write_files`] puts them below a root on the host
//! (the mounted snapshot before the first start, `/proc/<pid>/root` of a running VM).

use std::net::IpAddr;
use std::path::Path;

use cpi_core::agent_settings::SETTINGS_PATH;
use cpi_core::{AgentSettings, Networks};

use crate::error::Result;
use crate::fsutil;

/// A file to put into a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmFile {
    /// Absolute path inside the VM.
    pub path: &'static str,
    /// Contents.
    pub contents: Vec<u8>,
    /// Permission bits.
    pub mode: u32,
}

/// `/etc/resolv.conf` with `nameservers` (the networks' DNS, else the host's).
pub fn resolv_conf(nameservers: &[IpAddr]) -> String {
    let mut out = String::from("# written by bosh-container-cpi; the agent may rewrite it\n");
    for ns in nameservers {
        out.push_str(&format!("nameserver {ns}\n"));
    }
    out
}

/// `/etc/hosts` naming the VM by its cid on each of its addresses.
pub fn hosts(hostname: &str, addresses: &[IpAddr]) -> String {
    let mut out = String::from("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n");
    for ip in addresses {
        out.push_str(&format!("{ip} {hostname}\n"));
    }
    out
}

/// The nameservers a VM gets: those of its networks, else the host's usable ones.
pub fn nameservers(networks: &Networks, host_resolv_conf: &str) -> Vec<IpAddr> {
    let from_networks = networks.nameservers();
    if from_networks.is_empty() {
        crate::host::host_nameservers(host_resolv_conf)
    } else {
        from_networks
    }
}

/// Every file a new VM needs.
pub fn vm_files(
    settings: &AgentSettings,
    hostname: &str,
    networks: &Networks,
    host_resolv_conf: &str,
) -> Vec<VmFile> {
    let addresses: Vec<IpAddr> = networks.iter().filter_map(|n| n.ip()).collect();
    vec![
        VmFile {
            path: SETTINGS_PATH,
            contents: settings.to_json(),
            mode: 0o600,
        },
        VmFile {
            path: "/etc/resolv.conf",
            contents: resolv_conf(&nameservers(networks, host_resolv_conf)).into_bytes(),
            mode: 0o644,
        },
        VmFile {
            path: "/etc/hosts",
            contents: hosts(hostname, &addresses).into_bytes(),
            mode: 0o644,
        },
        VmFile {
            path: "/etc/hostname",
            contents: format!("{hostname}\n").into_bytes(),
            mode: 0o644,
        },
    ]
}

/// Writes `files` below `root`, never following the VM's symlinks out of it.
pub fn write_files(root: &Path, files: &[VmFile], durable: fsutil::Durable) -> Result<()> {
    for f in files {
        fsutil::write_in_root(root, f.path, &f.contents, f.mode, durable)?;
    }
    Ok(())
}

/// The settings file alone (after a disk was attached or detached).
pub fn settings_file(settings: &AgentSettings) -> VmFile {
    VmFile {
        path: SETTINGS_PATH,
        contents: settings.to_json(),
        mode: 0o600,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cpi_core::{AgentId, AgentOptions, VmCid};
    use serde_json::json;

    fn networks() -> Networks {
        Networks::parse(&json!({"default": {"type": "manual", "ip": "10.245.0.12", "netmask": "255.255.0.0",
            "gateway": "10.245.0.1", "dns": ["10.245.0.2", "8.8.8.8"], "default": ["dns", "gateway"]}}))
        .expect("networks")
    }

    #[test]
    fn files_for_a_new_vm() {
        let settings = AgentSettings::for_vm(
            &AgentId::new("agent-1").expect("id"),
            &VmCid::new("vm-1").expect("cid"),
            &AgentOptions {
                mbus: "https://u:p@0.0.0.0:6868".into(),
                ntp: vec![],
            },
            &networks(),
            &json!({"bosh": {"password": "secret"}}),
        );
        let files = vm_files(&settings, "vm-1", &networks(), "nameserver 9.9.9.9\n");
        let get = |p: &str| files.iter().find(|f| f.path == p).expect(p);
        let env = get("/var/vcap/bosh/warden-cpi-agent-env.json");
        assert_eq!(env.mode, 0o600);
        let parsed: serde_json::Value = serde_json::from_slice(&env.contents).expect("json");
        assert_eq!(parsed["agent_id"], "agent-1");
        assert_eq!(parsed["networks"]["default"]["preconfigured"], true);
        let resolv = String::from_utf8(get("/etc/resolv.conf").contents.clone()).expect("utf8");
        assert!(
            resolv.contains("nameserver 10.245.0.2\nnameserver 8.8.8.8\n"),
            "{resolv}"
        );
        assert!(!resolv.contains("9.9.9.9"));
        let hosts = String::from_utf8(get("/etc/hosts").contents.clone()).expect("utf8");
        assert!(hosts.contains("10.245.0.12 vm-1\n"), "{hosts}");
        assert!(hosts.starts_with("127.0.0.1 localhost\n"));
        assert_eq!(get("/etc/hostname").contents, b"vm-1\n");
    }

    #[test]
    fn host_nameservers_when_networks_have_none() {
        let n = Networks::parse(&json!({"d": {"type": "dynamic"}})).expect("n");
        let got = nameservers(&n, "nameserver 127.0.0.53\nnameserver 10.0.0.2\n");
        assert_eq!(got, vec!["10.0.0.2".parse::<IpAddr>().expect("ip")]);
    }

    #[test]
    fn written_below_a_root() {
        let root = std::env::temp_dir().join(format!("agent-env-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(root.join("etc")).expect("mkdir");
        write_files(
            &root,
            &[VmFile {
                path: "/var/vcap/bosh/warden-cpi-agent-env.json",
                contents: b"{}".to_vec(),
                mode: 0o600,
            }],
            fsutil::Durable::Now,
        )
        .expect("write");
        assert!(root
            .join("var/vcap/bosh/warden-cpi-agent-env.json")
            .is_file());
        std::fs::remove_dir_all(&root).expect("rm");
    }
}
