//! The OCI runtime spec of a VM, built from `create_vm`'s arguments and host facts.
//! Pure: no daemon, no filesystem; every choice is unit-tested below.
//!
//! A BOSH VM is a privileged system container: every capability the host's bounding
//! set has (and none it lacks, or runc fails), no user namespace, no seccomp, no
//! AppArmor, no masked paths, all devices allowed in the device cgroup. Its own
//! network namespace (made by CNI) is joined by path.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceCgroupBuilder,
    LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder,
    LinuxResourcesBuilder, Mount, MountBuilder, ProcessBuilder, RootBuilder, Spec, SpecBuilder,
    UserBuilder,
};

use crate::error::{ContainerdError, Result};
use crate::host::CgroupMode;

/// The type URL containerd expects for a runtime spec in a container record.
pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";

/// The CPU period for `cpu` limits (100 ms, the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// The VM's PID 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// systemd (`/sbin/init`): Ubuntu Noble and later warden stemcells.
    Systemd,
    /// runit (`/usr/sbin/runsvdir-start`): earlier warden stemcells.
    Runit,
}

impl Init {
    /// The command to start.
    pub fn command(self) -> &'static str {
        match self {
            Init::Systemd => "/sbin/init",
            Init::Runit => "/usr/sbin/runsvdir-start",
        }
    }

    /// Its label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Init::Systemd => "systemd",
            Init::Runit => "runit",
        }
    }
}

/// Picks the init: the VM's cloud properties (`force_start_with[out]_systemd`) win,
/// then the config (`start_containers_with_systemd`), then the stemcell's operating
/// system (Noble and later run systemd).
pub fn choose_init(vm: Option<bool>, config: Option<bool>, stemcell_os: &str) -> Init {
    let systemd = vm
        .or(config)
        .unwrap_or_else(|| cpi_core::stemcell::os_wants_systemd(stemcell_os));
    if systemd {
        Init::Systemd
    } else {
        Init::Runit
    }
}

/// Everything the spec depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecInput {
    /// The VM cid: hostname and cgroup name.
    pub vm_cid: String,
    /// Our containerd namespace: the cgroup parent.
    pub namespace: String,
    /// PID 1.
    pub init: Init,
    /// The host's cgroup version.
    pub cgroup: CgroupMode,
    /// The host's capability bounding set.
    pub capabilities: Vec<Capability>,
    /// The VM's network namespace.
    pub netns: PathBuf,
    /// Host directory mounted at `/var/vcap/data`.
    pub data_dir: PathBuf,
    /// Host directory mounted at `/warden-cpi-dev` (shared, for live attach).
    pub disks_dir: PathBuf,
    /// Host kernel modules, mounted read-only at `/usr/lib/modules`.
    pub host_modules: Option<PathBuf>,
    /// CPUs (`cpu`), as a CFS quota.
    pub cpu: Option<f64>,
    /// Memory limit in MiB (`ram`).
    pub ram_mib: Option<u64>,
    /// Process limit (`pids`).
    pub pids: Option<u64>,
}

fn mount(dest: &str, typ: &str, source: &Path, options: &[&str]) -> Result<Mount> {
    MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
        .build()
        .map_err(spec_error)
}

fn spec_error(e: oci_spec::OciSpecError) -> ContainerdError {
    ContainerdError::Refused(format!("building the OCI runtime spec: {e}"))
}

/// The mounts, in the order runc makes them.
pub fn mounts(input: &SpecInput) -> Result<Vec<Mount>> {
    let p = Path::new;
    let mut out = vec![
        mount("/proc", "proc", p("proc"), &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            p("tmpfs"),
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            p("devpts"),
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            p("shm"),
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            p("mqueue"),
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            p("sysfs"),
            &["nosuid", "noexec", "nodev", "rw"],
        )?,
    ];
    if host_cgroup_namespace(input) {
        // systemd on a cgroup v2 host: the host's hierarchy, writable.
        out.push(mount(
            "/sys/fs/cgroup",
            "bind",
            p("/sys/fs/cgroup"),
            &["rbind", "rw", "nosuid", "noexec", "nodev"],
        )?);
    } else {
        // runc mounts the VM's own cgroups here (v2: its namespace's root; v1: one
        // directory per controller). Never a bind of the host's v1 tree: runc wedges
        // on delete with that.
        out.push(mount(
            "/sys/fs/cgroup",
            "cgroup",
            p("cgroup"),
            &["nosuid", "noexec", "nodev", "relatime", "rw"],
        )?);
    }
    out.push(mount(
        cpi_core::agent_settings::EPHEMERAL_PATH,
        "bind",
        &input.data_dir,
        &["rbind", "rw"],
    )?);
    out.push(mount(
        cpi_core::agent_settings::DISK_MOUNT_ROOT,
        "bind",
        &input.disks_dir,
        &["rbind", "rw", "rslave"],
    )?);
    if let Some(modules) = &input.host_modules {
        out.push(mount(
            "/usr/lib/modules",
            "bind",
            modules,
            &["rbind", "ro"],
        )?);
    }
    Ok(out)
}

/// systemd on cgroup v2 shares the host's cgroup namespace (contract §5).
fn host_cgroup_namespace(input: &SpecInput) -> bool {
    input.init == Init::Systemd && input.cgroup == CgroupMode::V2
}

/// The whole runtime spec.
pub fn build(input: &SpecInput) -> Result<Spec> {
    let caps: HashSet<Capability> = input.capabilities.iter().copied().collect();
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps.clone())
        .inheritable(caps.clone())
        .ambient(caps)
        .build()
        .map_err(spec_error)?;
    let mut env =
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned()];
    if input.init == Init::Systemd {
        // How systemd learns it runs in a container (systemd-detect-virt).
        env.push("container=containerd".to_owned());
    }
    let mut process = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(0u32)
                .gid(0u32)
                .build()
                .map_err(spec_error)?,
        )
        .args(vec![input.init.command().to_owned()])
        .env(env)
        .cwd("/")
        .capabilities(capabilities)
        .no_new_privileges(false)
        .build()
        .map_err(spec_error)?;
    // No rlimits: the VM inherits the shim's. Raising a hard limit needs
    // CAP_SYS_RESOURCE, which some hosts' bounding sets lack.
    process.set_rlimits(None);
    process.set_apparmor_profile(None);
    process.set_oom_score_adj(None);

    let mut namespaces = vec![
        LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Pid)
            .build()
            .map_err(spec_error)?,
        LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Ipc)
            .build()
            .map_err(spec_error)?,
        LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Uts)
            .build()
            .map_err(spec_error)?,
        LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Mount)
            .build()
            .map_err(spec_error)?,
        LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Network)
            .path(input.netns.clone())
            .build()
            .map_err(spec_error)?,
    ];
    if !host_cgroup_namespace(input) {
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Cgroup)
                .build()
                .map_err(spec_error)?,
        );
    }

    let mut resources =
        LinuxResourcesBuilder::default().devices(vec![LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .access("rwm")
            .build()
            .map_err(spec_error)?]);
    if let Some(mib) = input.ram_mib {
        let bytes = i64::try_from(mib.saturating_mul(1 << 20)).unwrap_or(i64::MAX);
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit(bytes)
                .build()
                .map_err(spec_error)?,
        );
    }
    if let Some(cpu) = input.cpu {
        let quota = (cpu * CPU_PERIOD_US as f64).round() as i64;
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(quota.max(1000))
                .period(CPU_PERIOD_US)
                .build()
                .map_err(spec_error)?,
        );
    }
    if let Some(pids) = input.pids {
        resources = resources.pids(
            LinuxPidsBuilder::default()
                .limit(i64::try_from(pids).unwrap_or(i64::MAX))
                .build()
                .map_err(spec_error)?,
        );
    }
    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources.build().map_err(spec_error)?)
        .cgroups_path(PathBuf::from(format!(
            "/{}/{}",
            input.namespace, input.vm_cid
        )))
        .masked_paths(Vec::<String>::new())
        .readonly_paths(Vec::<String>::new())
        .build()
        .map_err(spec_error)?;

    let mut spec = SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path("rootfs")
                .readonly(false)
                .build()
                .map_err(spec_error)?,
        )
        .mounts(mounts(input)?)
        .process(process)
        .hostname(input.vm_cid.clone())
        .linux(linux)
        .build()
        .map_err(spec_error)?;
    spec.set_annotations(None);
    spec.set_hooks(None);
    Ok(spec)
}

/// The spec as containerd stores it in a container record (JSON in an `Any`).
pub fn to_any(spec: &Spec) -> Result<prost_types::Any> {
    let value = serde_json::to_vec(spec)
        .map_err(|e| ContainerdError::Refused(format!("serialising the OCI runtime spec: {e}")))?;
    Ok(prost_types::Any {
        type_url: SPEC_TYPE_URL.to_owned(),
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn input() -> SpecInput {
        let (caps, _) = crate::host::capabilities_of(0x0000_01ff_feff_ffff);
        SpecInput {
            vm_cid: "vm-1".into(),
            namespace: "bosh".into(),
            init: Init::Runit,
            cgroup: CgroupMode::V1,
            capabilities: caps,
            netns: "/var/run/netns/vm-1".into(),
            data_dir: "/state/vms/vm-1/data".into(),
            disks_dir: "/state/vms/vm-1/disks".into(),
            host_modules: Some("/lib/modules".into()),
            cpu: Some(1.5),
            ram_mib: Some(512),
            pids: Some(1000),
        }
    }

    fn json_of(input: &SpecInput) -> Value {
        serde_json::to_value(build(input).expect("spec")).expect("json")
    }

    fn mount_at<'a>(spec: &'a Value, dest: &str) -> Option<&'a Value> {
        spec["mounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .find(|m| m["destination"] == dest)
    }

    fn namespaces(spec: &Value) -> Vec<String> {
        spec["linux"]["namespaces"]
            .as_array()
            .expect("ns")
            .iter()
            .map(|n| n["type"].as_str().expect("type").to_owned())
            .collect()
    }

    #[test]
    fn init_choice_order() {
        assert_eq!(choose_init(None, None, "ubuntu-noble"), Init::Systemd);
        assert_eq!(choose_init(None, None, "ubuntu-jammy"), Init::Runit);
        assert_eq!(choose_init(None, Some(true), "ubuntu-jammy"), Init::Systemd);
        assert_eq!(
            choose_init(Some(false), Some(true), "ubuntu-noble"),
            Init::Runit
        );
        assert_eq!(choose_init(Some(true), None, "ubuntu-jammy"), Init::Systemd);
        assert_eq!(Init::Runit.command(), "/usr/sbin/runsvdir-start");
        assert_eq!(Init::Systemd.command(), "/sbin/init");
    }

    #[test]
    fn capabilities_are_exactly_the_bounding_set_in_all_five_sets() {
        let spec = json_of(&input());
        for set in [
            "bounding",
            "effective",
            "permitted",
            "inheritable",
            "ambient",
        ] {
            let caps: Vec<&str> = spec["process"]["capabilities"][set]
                .as_array()
                .expect(set)
                .iter()
                .map(|c| c.as_str().expect("str"))
                .collect();
            assert_eq!(caps.len(), 40, "{set}");
            assert!(caps.contains(&"CAP_SYS_ADMIN"), "{set}");
            assert!(!caps.contains(&"CAP_SYS_RESOURCE"), "{set}");
        }
    }

    #[test]
    fn privileged_system_container_without_userns_seccomp_or_apparmor() {
        let spec = json_of(&input());
        assert_eq!(spec["process"]["args"], json!(["/usr/sbin/runsvdir-start"]));
        assert_eq!(spec["process"]["user"]["uid"], 0);
        assert_eq!(spec["process"]["noNewPrivileges"], false);
        assert!(spec["process"].get("apparmorProfile").is_none());
        assert!(spec["process"].get("rlimits").is_none());
        assert!(spec["linux"].get("seccomp").is_none());
        assert!(spec["linux"].get("uidMappings").is_none());
        assert!(!namespaces(&spec).contains(&"user".to_owned()));
        assert_eq!(spec["linux"]["maskedPaths"], json!([]));
        assert_eq!(spec["linux"]["readonlyPaths"], json!([]));
        assert_eq!(
            spec["linux"]["resources"]["devices"],
            json!([{"allow": true, "access": "rwm"}])
        );
        assert_eq!(spec["hostname"], "vm-1");
        assert_eq!(spec["root"], json!({"path": "rootfs", "readonly": false}));
        assert_eq!(spec["linux"]["cgroupsPath"], "/bosh/vm-1");
    }

    #[test]
    fn namespaces_join_the_vms_netns() {
        let spec = json_of(&input());
        assert_eq!(
            namespaces(&spec),
            vec!["pid", "ipc", "uts", "mount", "network", "cgroup"]
        );
        let net = spec["linux"]["namespaces"]
            .as_array()
            .expect("ns")
            .iter()
            .find(|n| n["type"] == "network")
            .expect("net");
        assert_eq!(net["path"], "/var/run/netns/vm-1");
    }

    #[test]
    fn the_contracts_mounts() {
        let spec = json_of(&input());
        let data = mount_at(&spec, "/var/vcap/data").expect("data");
        assert_eq!(data["source"], "/state/vms/vm-1/data");
        assert_eq!(data["type"], "bind");
        let disks = mount_at(&spec, "/warden-cpi-dev").expect("disks");
        assert_eq!(disks["source"], "/state/vms/vm-1/disks");
        assert_eq!(disks["options"], json!(["rbind", "rw", "rslave"]));
        let modules = mount_at(&spec, "/usr/lib/modules").expect("modules");
        assert_eq!(modules["options"], json!(["rbind", "ro"]));
        assert_eq!(mount_at(&spec, "/sys").expect("sys")["options"][3], "rw");
        for dest in ["/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue"] {
            assert!(mount_at(&spec, dest).is_some(), "{dest}");
        }
        // The VM owns these files: no runtime bind mounts over them.
        for dest in ["/etc/resolv.conf", "/etc/hosts", "/etc/hostname"] {
            assert!(mount_at(&spec, dest).is_none(), "{dest}");
        }
        let mut no_modules = input();
        no_modules.host_modules = None;
        assert!(mount_at(&json_of(&no_modules), "/usr/lib/modules").is_none());
    }

    #[test]
    fn cgroup_handling_by_host_version_and_init() {
        // v1, any init: runc's own cgroup mount, never the host's tree; own namespace.
        for init in [Init::Runit, Init::Systemd] {
            let mut i = input();
            i.init = init;
            let spec = json_of(&i);
            let cg = mount_at(&spec, "/sys/fs/cgroup").expect("cgroup");
            assert_eq!(cg["type"], "cgroup");
            assert_ne!(cg["source"], "/sys/fs/cgroup");
            assert!(namespaces(&spec).contains(&"cgroup".to_owned()));
        }
        // v2 + systemd: host cgroup namespace and the host's hierarchy, writable.
        let mut i = input();
        i.init = Init::Systemd;
        i.cgroup = CgroupMode::V2;
        let spec = json_of(&i);
        let cg = mount_at(&spec, "/sys/fs/cgroup").expect("cgroup");
        assert_eq!(cg["source"], "/sys/fs/cgroup");
        assert_eq!(cg["options"][1], "rw");
        assert!(!namespaces(&spec).contains(&"cgroup".to_owned()));
        assert_eq!(spec["process"]["args"], json!(["/sbin/init"]));
        assert!(spec["process"]["env"]
            .as_array()
            .expect("env")
            .contains(&json!("container=containerd")));
        // v2 + runit: a private cgroup namespace.
        let mut i = input();
        i.cgroup = CgroupMode::V2;
        assert!(namespaces(&json_of(&i)).contains(&"cgroup".to_owned()));
    }

    #[test]
    fn resources_from_cloud_properties() {
        let spec = json_of(&input());
        let r = &spec["linux"]["resources"];
        assert_eq!(r["memory"]["limit"], 512 * 1024 * 1024);
        assert_eq!(r["cpu"]["quota"], 150_000);
        assert_eq!(r["cpu"]["period"], 100_000);
        assert_eq!(r["pids"]["limit"], 1000);
        let mut none = input();
        none.cpu = None;
        none.ram_mib = None;
        none.pids = None;
        let spec = json_of(&none);
        let r = &spec["linux"]["resources"];
        assert!(r.get("memory").is_none() && r.get("cpu").is_none() && r.get("pids").is_none());
    }

    #[test]
    fn packed_for_containerd() {
        let any = to_any(&build(&input()).expect("spec")).expect("any");
        assert_eq!(any.type_url, SPEC_TYPE_URL);
        let back: Value = serde_json::from_slice(&any.value).expect("json");
        assert_eq!(back["ociVersion"], "1.0.2");
    }
}
