//! The pure builder of a VM's container: `create_vm`'s arguments, the stemcell's init
//! and the host's facts in, Docker's `ContainerCreateBody` out. No IO, so every
//! decision here is unit-tested without a daemon.

use std::collections::HashMap;

use bollard::models::{
    ContainerCreateBody, EndpointSettings, NetworkingConfig, RestartPolicy, RestartPolicyNameEnum,
};
use cpi_core::agent_settings::SETTINGS_PATH;
use cpi_core::cloud_properties::get_ci;
use cpi_core::{CallContext, VmCloudProperties};
use serde_json::Value;

use crate::capabilities::Privilege;
use crate::config::DockerConfig;
use crate::disk::mounts::StateLayout;
use crate::error::{DockerError, Result};
use crate::labels;
use crate::vm::host_config::host_config_from_props;
use crate::vm::prelude::Init;

/// Where the ephemeral volume is mounted.
pub const EPHEMERAL_TARGET: &str = "/var/vcap/data";
/// Where the per-VM disks directory is bound.
pub const DISKS_TARGET: &str = "/warden-cpi-dev";

/// The name of a VM's ephemeral volume.
pub fn ephemeral_volume(vm_cid: &str) -> String {
    format!("vol-eph-{vm_cid}")
}

/// The init for a VM: the per-VM override, else the config's, else the stemcell's
/// operating system (Noble and later run systemd), else runit. Returns the init and
/// why, for the log.
pub fn choose_init(
    vm_override: Option<bool>,
    config_override: Option<bool>,
    stemcell_os: Option<&str>,
) -> (Init, String) {
    let pick = |b: bool| if b { Init::Systemd } else { Init::Runit };
    if let Some(b) = vm_override {
        return (
            pick(b),
            "force_start_with(out)_systemd in the VM's cloud properties".into(),
        );
    }
    if let Some(b) = config_override {
        return (
            pick(b),
            "start_containers_with_systemd in the CPI config".into(),
        );
    }
    match stemcell_os {
        Some(os) if !os.is_empty() => (
            pick(cpi_core::stemcell::os_wants_systemd(os)),
            format!("the stemcell's operating system {os}"),
        ),
        _ => (
            Init::Runit,
            "no operating system known for the stemcell".into(),
        ),
    }
}

/// Everything the builder needs.
#[derive(Debug, Clone)]
pub struct SpecInput<'a> {
    /// The new VM's cid (the container name).
    pub vm_cid: &'a str,
    /// The agent id.
    pub agent_id: &'a str,
    /// The stemcell cid (image reference).
    pub stemcell: &'a str,
    /// Cloud properties.
    pub props: &'a VmCloudProperties,
    /// The init.
    pub init: Init,
    /// How the VM is privileged.
    pub privilege: &'a Privilege,
    /// 1 or 2.
    pub cgroup_version: u8,
    /// The backend config.
    pub config: &'a DockerConfig,
    /// The state directory layout.
    pub layout: &'a StateLayout,
    /// The network the container is created on, with its endpoint settings.
    pub first_network: Option<(String, EndpointSettings)>,
    /// The host file to bind read-only at the settings path (VMs created with the
    /// local mounter, see `agent_env::HostCopy::bound`).
    pub settings_file: Option<&'a std::path::Path>,
    /// The prelude script.
    pub prelude: String,
    /// Whether to bind the host's kernel modules.
    pub host_modules: bool,
    /// The call context (labels).
    pub ctx: &'a CallContext,
}

/// The container to create, and what the operator should know about it.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The create request body.
    pub body: ContainerCreateBody,
    /// Warnings for the log.
    pub warnings: Vec<String>,
}

/// A `ports` entry as Docker's exposed-port key: `6868`, `6868/tcp`, `53/udp` (the Go
/// CPI's form; Docker publishes each on a random host port). Anything else, such as
/// `8443:443`, is refused: Docker would accept it as a meaningless port name.
fn exposed_port(entry: &str) -> Result<String> {
    let (port, proto) = entry.split_once('/').unwrap_or((entry, "tcp"));
    let valid_port = port.parse::<u16>().is_ok_and(|p| p > 0);
    if !valid_port || !matches!(proto, "tcp" | "udp" | "sctp") {
        return Err(DockerError::Invalid(format!(
            "VM cloud_properties.ports: {entry:?} is not a container port; the Docker \
             backend takes PORT or PORT/PROTO (tcp, udp, sctp), e.g. \"6868/tcp\", and \
             publishes each on a host port Docker picks (use PortBindings to choose one)"
        )));
    }
    Ok(format!("{port}/{proto}"))
}

/// Builds the container (pure).
pub fn build(input: &SpecInput<'_>) -> Result<Spec> {
    let (mut host, mut warnings) = host_config_from_props(&input.props.raw)?;
    let props = input.props;

    // Resources: our typed keys win over the raw Docker fields.
    if let Some(cpu) = props.cpu {
        if host.nano_cpus.is_some() {
            warnings.push("cloud_properties.cpu overrides NanoCpus".into());
        }
        host.nano_cpus = Some((cpu * 1e9).round() as i64);
    }
    if let Some(ram) = props.ram_mib {
        if host.memory.is_some() {
            warnings.push("cloud_properties.ram overrides Memory".into());
        }
        host.memory = Some((ram as i64) << 20);
    }
    if let Some(pids) = props.pids {
        host.pids_limit = Some(pids as i64);
    }
    if let Some(size) = props.ephemeral_disk_mib {
        warnings.push(format!(
            "ephemeral_disk {size} MiB is recorded on volume {} but not enforced: Docker's local volume driver cannot limit a volume's size",
            ephemeral_volume(input.vm_cid)
        ));
    }

    // Mounts: the operator's, then ours.
    let mut binds = host.binds.take().unwrap_or_default();
    for b in &binds {
        let target = b
            .split(':')
            .nth(1)
            .unwrap_or_default()
            .trim_end_matches('/');
        if target == EPHEMERAL_TARGET
            || target == DISKS_TARGET
            || (input.settings_file.is_some() && target == SETTINGS_PATH)
        {
            return Err(DockerError::Invalid(format!(
                "VM cloud_properties.Binds entry {b:?} would hide {target}, which the CPI mounts"
            )));
        }
    }
    binds.push(format!(
        "{}:{EPHEMERAL_TARGET}",
        ephemeral_volume(input.vm_cid)
    ));
    binds.push(format!(
        "{}:{DISKS_TARGET}:rslave",
        input.layout.disks_dir(input.vm_cid).display()
    ));
    if let Some(file) = input.settings_file {
        binds.push(format!("{}:{SETTINGS_PATH}:ro", file.display()));
    }
    if input.host_modules {
        binds.push("/lib/modules:/usr/lib/modules:ro".into());
    }
    let lxcfs = get_ci(&props.raw, "force_lxcfs_enabled")
        .and_then(Value::as_bool)
        .unwrap_or(false)
        || (input.config.enable_lxcfs_support
            && !get_ci(&props.raw, "force_lxcfs_disabled")
                .and_then(Value::as_bool)
                .unwrap_or(false));
    if lxcfs {
        binds.push("/var/lib/lxcfs/proc/meminfo:/proc/meminfo:rw".into());
    }
    let mut stop_signal = None;
    if input.init == Init::Systemd {
        if input.cgroup_version >= 2 {
            host.cgroupns_mode = Some(bollard::models::HostConfigCgroupnsModeEnum::HOST);
            if input.config.mount_cgroupfs {
                binds.push("/sys/fs/cgroup:/sys/fs/cgroup:rw".into());
            }
        } else {
            // On cgroup v1 never bind /sys/fs/cgroup: runc then wedges on delete.
            // Docker mounts only the container's own subtree there, while with the
            // host's cgroup namespace /proc/1/cgroup names the full host path
            // (`/docker/<id>`): systemd then nests a second `/docker/<id>` in the
            // named hierarchy and gives its units no memory, pids or devices cgroups.
            // A private namespace makes the subtree its root, so both views agree.
            host.cgroupns_mode = Some(bollard::models::HostConfigCgroupnsModeEnum::PRIVATE);
        }
        let tmpfs = host.tmpfs.get_or_insert_with(HashMap::new);
        tmpfs
            .entry("/run".into())
            .or_insert_with(|| "rw,exec,mode=755".into());
        tmpfs
            .entry("/run/lock".into())
            .or_insert_with(|| "rw,noexec,nosuid,nodev".into());
        stop_signal = Some("SIGRTMIN+3".to_owned());
    }
    host.binds = Some(binds);

    input.privilege.apply(&mut host);
    host.publish_all_ports = Some(true);
    host.auto_remove = Some(false);
    // A VM comes back when dockerd (or the host) restarts, as an IaaS VM does after a
    // host reboot; `delete_vm`'s stop ends that. An operator's `RestartPolicy` wins.
    if host.restart_policy.is_none() {
        host.restart_policy = Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
            maximum_retry_count: None,
        });
    }
    host.network_mode = input.first_network.as_ref().map(|(n, _)| n.clone());

    let mut labels = labels::base(labels::KIND_VM, input.ctx);
    labels.insert(labels::AGENT_ID.into(), input.agent_id.into());
    labels.insert(labels::STEMCELL.into(), input.stemcell.into());
    labels.insert(labels::INIT.into(), input.init.label().into());
    labels.insert(labels::PRIVILEGE.into(), input.privilege.label().into());

    let exposed = props
        .ports
        .iter()
        .map(|p| exposed_port(p))
        .collect::<Result<Vec<String>>>()?;
    let networking = input
        .first_network
        .as_ref()
        .map(|(name, ep)| NetworkingConfig {
            endpoints_config: Some(HashMap::from([(name.clone(), ep.clone())])),
        });

    let body = ContainerCreateBody {
        hostname: Some(input.vm_cid.chars().take(63).collect()),
        user: Some("0".into()),
        working_dir: Some("/".into()),
        image: Some(input.stemcell.into()),
        entrypoint: Some(vec!["/bin/sh".into()]),
        cmd: Some(vec!["-c".into(), input.prelude.clone()]),
        env: Some(vec![]),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        labels: Some(labels),
        stop_signal,
        stop_timeout: Some(input.config.stop_timeout_seconds as i64),
        host_config: Some(host),
        networking_config: networking,
        ..Default::default()
    };
    Ok(Spec { body, warnings })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn props(v: Value) -> VmCloudProperties {
        VmCloudProperties::parse(&v).expect("props")
    }

    fn build_with(p: &VmCloudProperties, init: Init, privilege: &Privilege, cgroup: u8) -> Spec {
        let config = DockerConfig::default();
        let layout = StateLayout::new("/srv/state");
        let ctx = CallContext {
            director_uuid: Some("dir".into()),
            ..Default::default()
        };
        build(&SpecInput {
            vm_cid: "c-1",
            agent_id: "agent-1",
            stemcell: "bosh-stemcell:x",
            props: p,
            init,
            privilege,
            cgroup_version: cgroup,
            config: &config,
            layout: &layout,
            first_network: Some(("net".into(), EndpointSettings::default())),
            settings_file: Some(std::path::Path::new("/srv/state/vms/c-1/agent-env.json")),
            prelude: "exec /usr/sbin/runsvdir-start".into(),
            host_modules: true,
            ctx: &ctx,
        })
        .expect("spec")
    }

    #[test]
    fn ports_are_container_ports_only() {
        assert_eq!(exposed_port("6868").expect("port"), "6868/tcp");
        assert_eq!(exposed_port("53/udp").expect("port"), "53/udp");
        for bad in [
            "8443:443",
            "0",
            "65536",
            "80/icmp",
            "",
            "x/tcp",
            "127.0.0.1:80:80",
        ] {
            let err = exposed_port(bad).expect_err(bad);
            assert!(err.to_string().contains("PORT/PROTO"), "{bad}: {err}");
        }
    }

    #[test]
    fn resources_ports_and_mounts() {
        let p = props(
            json!({"cpu": 1.5, "ram": 512, "pids": 300, "ports": ["6868/tcp", 22], "Memory": 1}),
        );
        let spec = build_with(&p, Init::Runit, &Privilege::Privileged, 1);
        let host = spec.body.host_config.clone().expect("host");
        assert_eq!(host.nano_cpus, Some(1_500_000_000));
        assert_eq!(host.memory, Some(512 << 20));
        assert_eq!(host.pids_limit, Some(300));
        assert_eq!(host.publish_all_ports, Some(true));
        assert_eq!(
            spec.body.exposed_ports,
            Some(vec!["6868/tcp".to_owned(), "22/tcp".to_owned()])
        );
        assert_eq!(
            host.binds,
            Some(vec![
                "vol-eph-c-1:/var/vcap/data".to_owned(),
                "/srv/state/vms/c-1/disks:/warden-cpi-dev:rslave".to_owned(),
                "/srv/state/vms/c-1/agent-env.json:/var/vcap/bosh/warden-cpi-agent-env.json:ro"
                    .to_owned(),
                "/lib/modules:/usr/lib/modules:ro".to_owned(),
            ])
        );
        assert_eq!(host.network_mode.as_deref(), Some("net"));
        assert_eq!(host.privileged, Some(true));
        assert_eq!(
            host.restart_policy.and_then(|r| r.name),
            Some(RestartPolicyNameEnum::UNLESS_STOPPED),
            "VMs come back after a daemon or host restart"
        );
        assert!(spec.warnings.iter().any(|w| w.contains("overrides Memory")));
        let body = &spec.body;
        assert_eq!(body.entrypoint, Some(vec!["/bin/sh".to_owned()]));
        assert_eq!(body.cmd.as_ref().map(|c| c[0].as_str()), Some("-c"));
        assert_eq!(body.hostname.as_deref(), Some("c-1"));
        let l = body.labels.as_ref().expect("labels");
        assert!(labels::is_ours(Some(l), labels::KIND_VM));
        assert_eq!(l[labels::AGENT_ID], "agent-1");
        assert_eq!(l[labels::DIRECTOR], "dir");
        assert_eq!(l[labels::INIT], "runit");
        assert!(body
            .networking_config
            .as_ref()
            .and_then(|n| n.endpoints_config.as_ref())
            .expect("eps")
            .contains_key("net"));
    }

    #[test]
    fn constrained_host_gets_capabilities_not_privileged() {
        let p = props(json!({}));
        let privilege = Privilege::Capabilities {
            drop: vec!["CAP_SYS_RESOURCE".into()],
        };
        let spec = build_with(&p, Init::Runit, &privilege, 1);
        let host = spec.body.host_config.expect("host");
        assert_eq!(host.privileged, Some(false));
        assert_eq!(host.cap_add, Some(vec!["ALL".to_owned()]));
        assert_eq!(host.cap_drop, Some(vec!["CAP_SYS_RESOURCE".to_owned()]));
        let sec = host.security_opt.expect("security");
        for opt in ["label=disable", "apparmor=unconfined", "seccomp=unconfined"] {
            assert!(sec.contains(&opt.to_owned()), "{opt}");
        }
        assert_eq!(
            host.devices, None,
            "no host devices beyond Docker's defaults"
        );
        assert_eq!(
            spec.body.labels.expect("l")[labels::PRIVILEGE],
            "capabilities"
        );
    }

    #[test]
    fn systemd_on_cgroup_v2_and_v1() {
        let p = props(json!({}));
        let v2 = build_with(&p, Init::Systemd, &Privilege::Privileged, 2);
        let host = v2.body.host_config.expect("host");
        assert_eq!(
            host.cgroupns_mode,
            Some(bollard::models::HostConfigCgroupnsModeEnum::HOST)
        );
        assert!(host
            .binds
            .expect("binds")
            .contains(&"/sys/fs/cgroup:/sys/fs/cgroup:rw".to_owned()));
        assert!(host.tmpfs.expect("tmpfs").contains_key("/run"));
        assert_eq!(v2.body.stop_signal.as_deref(), Some("SIGRTMIN+3"));

        let v1 = build_with(&p, Init::Systemd, &Privilege::Privileged, 1);
        let host = v1.body.host_config.expect("host");
        assert_eq!(
            host.cgroupns_mode,
            Some(bollard::models::HostConfigCgroupnsModeEnum::PRIVATE)
        );
        assert!(!host
            .binds
            .expect("binds")
            .iter()
            .any(|b| b.contains("/sys/fs/cgroup")));

        let runit = build_with(&p, Init::Runit, &Privilege::Privileged, 2);
        let host = runit.body.host_config.expect("host");
        assert_eq!(host.cgroupns_mode, None);
        assert_eq!(host.tmpfs, None);
        assert_eq!(runit.body.stop_signal, None);
    }

    #[test]
    fn an_operator_restart_policy_wins() {
        let p = props(json!({"RestartPolicy": {"Name": "no"}}));
        let spec = build_with(&p, Init::Runit, &Privilege::Privileged, 1);
        let host = spec.body.host_config.expect("host");
        assert_eq!(
            host.restart_policy.and_then(|r| r.name),
            Some(RestartPolicyNameEnum::NO)
        );
    }

    #[test]
    fn operator_binds_may_not_hide_ours() {
        let config = DockerConfig::default();
        let layout = StateLayout::new("/s");
        let ctx = CallContext::default();
        let bound = std::path::Path::new("/s/vms/c-1/agent-env.json");
        for (bind, hidden) in [
            ("/tmp:/var/vcap/data/", "/var/vcap/data"),
            (
                "/tmp/x.json:/var/vcap/bosh/warden-cpi-agent-env.json",
                SETTINGS_PATH,
            ),
        ] {
            let p = props(json!({ "Binds": [bind] }));
            let err = build(&SpecInput {
                vm_cid: "c-1",
                agent_id: "a",
                stemcell: "s",
                props: &p,
                init: Init::Runit,
                privilege: &Privilege::Privileged,
                cgroup_version: 1,
                config: &config,
                layout: &layout,
                first_network: None,
                settings_file: Some(bound),
                prelude: String::new(),
                host_modules: false,
                ctx: &ctx,
            })
            .expect_err("hidden");
            assert!(err.to_string().contains(hidden), "{err}");
        }
    }

    #[test]
    fn init_choice() {
        assert_eq!(
            choose_init(None, None, Some("ubuntu-noble")).0,
            Init::Systemd
        );
        assert_eq!(choose_init(None, None, Some("ubuntu-jammy")).0, Init::Runit);
        assert_eq!(choose_init(None, None, None).0, Init::Runit);
        assert_eq!(
            choose_init(None, Some(true), Some("ubuntu-jammy")).0,
            Init::Systemd
        );
        assert_eq!(
            choose_init(Some(false), Some(true), Some("ubuntu-noble")).0,
            Init::Runit
        );
        assert_eq!(
            choose_init(Some(true), None, Some("ubuntu-jammy")).0,
            Init::Systemd
        );
    }
}
