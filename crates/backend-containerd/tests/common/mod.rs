//! Shared helpers of the containerd backend's daemon tests: a per-test namespace and
//! state directory, host-side probes into running VMs, and the leftovers check.
//!
//! Every test runs in its own containerd namespace (`cpitest-<run>-<name>`) and
//! state directory, so tests run in parallel and what one leaves behind is found
//! exactly. A drop guard removes everything even when a test fails.

#![allow(dead_code, reason = "each test file uses a different subset")]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use backend_containerd::{ContainerdConfig, ContainerdCpi};
use cpi_core::{AgentOptions, CallContext, Cpi, CpiError, ErrorKind};
use cpi_tests::daemons::{ctr, require_containerd};

/// One test's world.
pub struct TestEnv {
    /// The backend under test.
    pub cpi: ContainerdCpi,
    /// Its config (the drop guard builds a second backend from it).
    pub config: ContainerdConfig,
    /// Its containerd namespace.
    pub namespace: String,
    /// Its state dir.
    pub state_dir: PathBuf,
    /// Stemcells and other scratch files.
    pub scratch: tempfile::TempDir,
    /// The subnets the test uses (their bridges are removed at the end).
    pub subnets: Vec<String>,
    /// Loop devices and XFS mounts before the test.
    pub loops_before: BTreeSet<String>,
    /// XFS mounts before the test.
    pub xfs_before: BTreeSet<String>,
    /// A call context as the director sends it.
    pub ctx: CallContext,
}

impl TestEnv {
    /// A fresh namespace and state dir. Fails (never skips) when containerd is down.
    pub fn new(name: &str, subnets: &[&str]) -> TestEnv {
        require_containerd();
        let run = cpi_tests::names::run_id();
        let namespace = format!("cpitest-{run}-{name}");
        let state_dir = PathBuf::from(format!("/var/lib/bosh-container-cpi-test/{run}-{name}"));
        let cfg = ContainerdConfig {
            namespace: namespace.clone(),
            state_dir: state_dir.clone(),
            stop_grace_seconds: 3,
            labels: [("io.bosh.cpi.test-run".to_owned(), run.to_owned())].into(),
            ..Default::default()
        };
        Self::with_config(name, cfg, subnets)
    }

    /// Like [`TestEnv::new`] with a config of the test's own.
    pub fn with_config(_name: &str, cfg: ContainerdConfig, subnets: &[&str]) -> TestEnv {
        require_containerd();
        let namespace = cfg.namespace.clone();
        let state_dir = cfg.state_dir.clone();
        let cpi = ContainerdCpi::new(
            cfg.clone(),
            AgentOptions {
                mbus: "https://mbus:mbus-password@0.0.0.0:6868".into(),
                ntp: vec![],
            },
        )
        .expect("backend");
        TestEnv {
            cpi,
            config: cfg,
            namespace,
            state_dir,
            scratch: tempfile::tempdir().expect("tempdir"),
            subnets: subnets.iter().map(|s| (*s).to_owned()).collect(),
            loops_before: loop_devices(),
            xfs_before: xfs_mounts(),
            ctx: CallContext {
                director_uuid: Some("director-test".into()),
                request_id: Some("req-1".into()),
                api_version: 2,
                ..Default::default()
            },
        }
    }

    /// `ctr` in the test's namespace; panics on failure.
    pub fn ctr(&self, args: &[&str]) -> String {
        ctr(&self.namespace, args).expect_success()
    }

    /// The PID of VM `cid`'s task and its status, from `ctr tasks ls`.
    pub fn task(&self, cid: &str) -> Option<(u32, String)> {
        self.ctr(&["tasks", "ls"]).lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&cid)).then(|| (f[1].parse().expect("pid"), f[2].to_owned()))
        })
    }

    /// The PID of VM `cid`'s running task; panics otherwise.
    pub fn running_pid(&self, cid: &str) -> u32 {
        match self.task(cid) {
            Some((pid, status)) if status == "RUNNING" => pid,
            other => panic!(
                "VM {cid} has no running task: {other:?}\nconsole:\n{}",
                self.console(cid)
            ),
        }
    }

    /// The VM's console log.
    pub fn console(&self, cid: &str) -> String {
        std::fs::read_to_string(self.state_dir.join("vms").join(cid).join("console.log"))
            .unwrap_or_default()
    }

    /// Everything of ours still in containerd, on the host or under the state dir.
    pub fn leftovers(&self, vm_cids: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        for what in [
            "containers",
            "tasks",
            "snapshots",
            "images",
            "content",
            "leases",
        ] {
            let listing = ctr(&self.namespace, &[what, "ls"]);
            let rows: Vec<String> = listing.stdout.lines().skip(1).map(str::to_owned).collect();
            if !listing.success() {
                out.push(format!("ctr {what} ls failed: {}", listing.stderr));
            } else if !rows.is_empty() {
                out.push(format!("{what}: {rows:?}"));
            }
        }
        let netns = run("ip", &["netns", "list"]);
        for cid in vm_cids {
            if netns.contains(cid.as_str()) {
                out.push(format!("network namespace {cid}"));
            }
        }
        // Interfaces left on the test's bridges (the host ends of VM interfaces). The
        // kernel destroys a VM's with its network namespace, a few milliseconds
        // after the namespace's last reference goes: allow it a moment.
        for subnet in &self.subnets {
            let bridge = bridge_name(subnet);
            for port in bridge_ports_after_settling(&bridge) {
                out.push(format!("interface on bridge {bridge}: {port}"));
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let state = self.state_dir.display().to_string();
        for line in mounts.lines().filter(|l| l.contains(&state)) {
            out.push(format!("mount: {line}"));
        }
        let vms = self.state_dir.join("vms");
        if let Ok(entries) = std::fs::read_dir(&vms) {
            let names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            if !names.is_empty() {
                out.push(format!("VM directories: {names:?}"));
            }
        }
        let ipam = self.state_dir.join("cni/host-local");
        for entry in walk(&ipam) {
            let name = entry
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            // host-local keeps `last_reserved_ip.*` and a lock file per network; an
            // address file is an allocation.
            if entry.is_file() && !name.starts_with("last_reserved_ip") && name != "lock" {
                out.push(format!("CNI allocation {}", entry.display()));
            }
        }
        for entry in walk(&self.state_dir.join("cni/reservations")) {
            out.push(format!("address reservation {}", entry.display()));
        }
        // `agents/<owner key>/<cid>`: a VM directory's index entry; `.indexed` marks
        // the index as complete and stays.
        for entry in walk(&self.state_dir.join("agents")) {
            if entry.file_name().is_some_and(|n| n != ".indexed") {
                out.push(format!("VM index entry {}", entry.display()));
            }
        }
        out
    }

    /// The host ends of the interfaces the CPI made over netlink for VM `cid`, as its
    /// network record names them.
    pub fn native_host_ifnames(&self, cid: &str) -> Vec<String> {
        let path = self.state_dir.join("vms").join(cid).join("network.json");
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("network record"))
                .expect("network record json");
        record["attachments"]
            .as_array()
            .expect("attachments")
            .iter()
            .filter_map(|a| {
                a.pointer("/native/host_ifname")?
                    .as_str()
                    .map(str::to_owned)
            })
            .collect()
    }

    /// Asserts that nothing was left behind and no loop device or XFS mount appeared.
    pub fn assert_clean(&self, vm_cids: &[String]) {
        let left = self.leftovers(vm_cids);
        assert!(left.is_empty(), "left behind: {left:#?}");
        assert_eq!(
            loop_devices(),
            self.loops_before,
            "a loop device was attached"
        );
        assert_eq!(
            xfs_mounts(),
            self.xfs_before,
            "an XFS filesystem was mounted"
        );
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        // Best effort: first the backend itself removes what the test left (VMs with
        // their networks and mounts, disks, stemcells), from a thread of its own
        // since this may run inside the test's runtime; then `ctr` and `umount`
        // remove anything still there.
        let config = self.config.clone();
        let state_dir = self.state_dir.clone();
        let ns = self.namespace.clone();
        let cleaner = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok(cpi) = ContainerdCpi::new(config, AgentOptions::default()) else {
                    return;
                };
                let ctx = CallContext::default();
                let names = |dir: &Path| -> Vec<String> {
                    std::fs::read_dir(dir)
                        .map(|d| {
                            d.flatten()
                                .map(|e| e.file_name().to_string_lossy().into_owned())
                                .collect()
                        })
                        .unwrap_or_default()
                };
                let mut vms: BTreeSet<String> = names(&state_dir.join("vms")).into_iter().collect();
                vms.extend(
                    ctr(&ns, &["containers", "ls", "-q"])
                        .stdout
                        .lines()
                        .map(str::to_owned),
                );
                for vm in vms {
                    if let Ok(cid) = cpi_core::VmCid::new(vm) {
                        let _ = cpi.delete_vm(&ctx, &cid).await;
                    }
                }
                for disk in names(&state_dir.join("disks")) {
                    if let Ok(cid) = cpi_core::DiskCid::new(disk) {
                        let _ = cpi.delete_disk(&ctx, &cid).await;
                    }
                }
                for image in ctr(&ns, &["images", "ls", "-q"]).stdout.lines() {
                    if let Ok(cid) = cpi_core::StemcellCid::new(image) {
                        let _ = cpi.delete_stemcell(&ctx, &cid).await;
                    }
                }
            });
        });
        let _ = cleaner.join();
        let ns = self.namespace.clone();
        let list = |what: &str| -> Vec<String> {
            ctr(&ns, &[what, "ls", "-q"])
                .stdout
                .lines()
                .map(str::to_owned)
                .collect()
        };
        for task in list("tasks") {
            let _ = ctr(&ns, &["tasks", "kill", "-a", "-s", "KILL", &task]);
            let _ = ctr(&ns, &["tasks", "rm", "-f", &task]);
        }
        for c in list("containers") {
            let _ = ctr(&ns, &["containers", "rm", &c]);
            let _ = run("ip", &["netns", "delete", &c]);
        }
        if let Ok(entries) = std::fs::read_dir(self.state_dir.join("vms")) {
            for e in entries.flatten() {
                let _ = run("ip", &["netns", "delete", &e.file_name().to_string_lossy()]);
            }
        }
        for s in list("snapshots") {
            let _ = ctr(&ns, &["snapshots", "rm", &s]);
        }
        for i in list("images") {
            let _ = ctr(&ns, &["images", "rm", "--sync", &i]);
        }
        for l in list("leases") {
            let _ = ctr(&ns, &["leases", "rm", "--sync", &l]);
        }
        let _ = ctr("default", &["namespaces", "rm", &ns]);
        if self.state_dir.exists() {
            let state = self.state_dir.display().to_string();
            let mut points: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
                .filter(|m| m.starts_with(&state))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                let _ = run("umount", &["-l", &p]);
            }
            let mounted = std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap_or_default()
                .contains(&state);
            if !mounted {
                let _ = std::fs::remove_dir_all(&self.state_dir);
            }
        }
        for subnet in &self.subnets {
            // Kept (an error) while a VM of another test still uses it.
            let _ = cpi_tests::daemons::remove_cpi_bridge(&bridge_name(subnet));
        }
    }
}

/// The bridge the backend makes for a subnet (`bcpi` + 10 hex digits of its hash).
pub fn bridge_name(subnet: &str) -> String {
    cpi_tests::daemons::cpi_bridge_name(subnet)
}

/// The interfaces of `bridge` once they have all gone, or what stays after 5 s: left
/// behind, not on its way out.
pub fn bridge_ports_after_settling(bridge: &str) -> Vec<String> {
    cpi_tests::daemons::bridge_ports_after(bridge, std::time::Duration::from_secs(5))
}

/// Runs a host command, returning stdout (empty on failure).
pub fn run(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// One ping from VM `ns`'s network namespace to `ip`; panics when unanswered.
pub fn ping_from(ns: &str, ip: &str) {
    run_ok(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "/bin/busybox",
            "ping",
            "-c",
            "1",
            "-W",
            "3",
            ip,
        ],
    );
}

/// Runs a host command and panics unless it succeeds; returns stdout.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect(program);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Loop devices with a backing file (`/sys/block/loop*/loop/backing_file`) and the
/// output of `losetup -a`.
pub fn loop_devices() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Ok(entries) = std::fs::read_dir("/sys/block") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("loop") {
                if let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
                    out.insert(format!("{name} {}", backing.trim()));
                }
            }
        }
    }
    for line in run("losetup", &["-a"]).lines() {
        out.insert(line.to_owned());
    }
    out
}

/// Mount points of XFS filesystems.
pub fn xfs_mounts() -> BTreeSet<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(" - ").nth(1).is_some_and(|r| r.starts_with("xfs ")))
        .map(str::to_owned)
        .collect()
}

/// The files below `dir`, at any depth.
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    walk(dir)
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The start time (clock ticks since boot, field 22) of a process.
pub fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // The command may contain spaces: fields after the closing parenthesis.
    let after = &stat[stat.rfind(')').expect(")") + 2..];
    after
        .split(' ')
        .nth(19)
        .expect("starttime")
        .parse()
        .expect("number")
}

/// A path inside a running VM, seen from the host through its root.
pub fn in_vm(pid: u32, path: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/root{path}"))
}

/// The mount points inside a running VM.
pub fn vm_mount_points(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .expect("mountinfo")
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .collect()
}

/// Asserts an error's kind.
pub fn assert_kind<T: std::fmt::Debug>(result: Result<T, CpiError>, kind: ErrorKind) -> CpiError {
    match result {
        Err(e) if e.kind == kind => e,
        other => panic!("expected {kind}, got {other:?}"),
    }
}

/// Builds and imports the test stemcell.
pub async fn import_stemcell(env: &TestEnv, os: &str) -> cpi_core::StemcellCid {
    let image = build_stemcell_image(env, os);
    import_stemcell_image(env, &image).await
}

/// Builds a test stemcell for `os` in the scratch directory; returns its image.
pub fn build_stemcell_image(env: &TestEnv, os: &str) -> PathBuf {
    let dir = env.scratch.path().join(format!("stemcell-{os}"));
    cpi_tests::TestStemcell::builder()
        .os(os)
        .build_unpacked(&dir)
        .image_path
}

/// Imports the stemcell image at `image`.
pub async fn import_stemcell_image(env: &TestEnv, image: &Path) -> cpi_core::StemcellCid {
    env.cpi
        .create_stemcell(
            &env.ctx,
            cpi_core::CreateStemcell {
                image_path: image.to_path_buf(),
                cloud_properties: Default::default(),
            },
        )
        .await
        .expect("create_stemcell")
}
