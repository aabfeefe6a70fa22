//! A real systemd stemcell (Debian bookworm, debootstrapped and cached by
//! `cpi_tests::systemd_stemcell`) booted as a VM on both backends through the real
//! `cpi` binary: PID 1 is systemd, the system leaves its start-up, the stand-in
//! bosh-agent unit ran and read the CPI's settings, a disk attaches and detaches
//! live, and `delete_vm` is prompt because systemd honours SIGRTMIN+3.
//!
//! The first run debootstraps (about a minute with a close mirror); later runs
//! reuse `/var/cache/cpi-test/`. What this host cannot run is in docs/nested-ci.md,
//! section "systemd VMs".

use std::time::{Duration, Instant};

use cpi_tests::conformance::{BackendKind, Target, CONTAINERD_TEST_NAMESPACE};
use cpi_tests::daemons::{ctr, docker};
use cpi_tests::systemd_stemcell::{self, SystemdStemcellBuilder};
use serde_json::{json, Value};

/// How long systemd may take to leave `initializing`/`starting`.
const BOOT_LIMIT: Duration = Duration::from_secs(60);
/// `delete_vm` must finish well inside the backends' stop grace (10 s): systemd
/// stops on SIGRTMIN+3 instead of waiting for SIGKILL.
const DELETE_LIMIT: Duration = Duration::from_secs(9);

/// Deletes what the test created if it fails half-way.
struct Cleanup<'a> {
    t: &'a Target,
    stemcell: Option<String>,
    vm: Option<String>,
    disk: Option<String>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if let (Some(vm), Some(disk)) = (&self.vm, &self.disk) {
            let _ = self.t.call("detach_disk", json!([vm, disk]));
        }
        if let Some(vm) = self.vm.take() {
            let _ = self.t.call("delete_vm", json!([vm]));
        }
        if let Some(disk) = self.disk.take() {
            let _ = self.t.call("delete_disk", json!([disk]));
        }
        if let Some(sc) = self.stemcell.take() {
            let _ = self.t.call("delete_stemcell", json!([sc]));
        }
        self.t.remove_networks();
    }
}

/// Runs `script` in the VM and returns its trimmed stdout (the script must exit 0).
fn sh(t: &Target, vm: &str, script: &str) -> String {
    t.exec(vm, script)
        .unwrap_or_else(|| panic!("{:?} has no processes to exec in", t.kind))
        .trim()
        .to_owned()
}

/// Polls `script` until `done` accepts its output or `limit` passes; returns the
/// last output.
fn poll(
    t: &Target,
    vm: &str,
    script: &str,
    limit: Duration,
    done: impl Fn(&str) -> bool,
) -> String {
    let start = Instant::now();
    loop {
        let out = sh(t, vm, script);
        if done(&out) || start.elapsed() >= limit {
            return out;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[allow(
    clippy::print_stderr,
    reason = "the test records the systemd state it observed, for the run's log"
)]
fn systemd_vm(kind: BackendKind, label: &str, stemcell_os: &str, vm_props: Value) {
    let t = Target::new(kind, label);
    let dir = tempfile::tempdir().expect("temp dir");
    let built = Instant::now();
    let sc = SystemdStemcellBuilder::new()
        .os(stemcell_os)
        .build_unpacked(dir.path().join("stemcell"));
    let build_time = built.elapsed();
    let mut c = Cleanup {
        t: &t,
        stemcell: None,
        vm: None,
        disk: None,
    };

    let stemcell = t.ok("create_stemcell", json!([sc.image_path, {}]));
    let stemcell = stemcell.as_str().expect("stemcell cid").to_owned();
    c.stemcell = Some(stemcell.clone());

    let agent_id = format!("agent-{label}");
    let created = t.ok(
        "create_vm",
        json!([agent_id, stemcell, vm_props, {"default": t.manual_network(10)}, [], t.env()]),
    );
    let vm = created[0]
        .as_str()
        .unwrap_or_else(|| panic!("create_vm result: {created}"))
        .to_owned();
    c.vm = Some(vm.clone());

    // PID 1 is systemd (after the CPI's prelude has exec'd it).
    let comm = poll(&t, &vm, "cat /proc/1/comm", Duration::from_secs(30), |s| {
        s == "systemd"
    });
    assert_eq!(comm, "systemd", "PID 1 of {vm} is not systemd");
    let pid1 = sh(&t, &vm, "cut -d' ' -f22 /proc/1/stat");
    let run_fs = sh(&t, &vm, "awk '$2 == \"/run\" {print $3}' /proc/mounts");
    assert_eq!(run_fs, "tmpfs", "/run must be a tmpfs for systemd");

    // The system finishes its start-up: running, or degraded with the failed units named.
    let state = poll(
        &t,
        &vm,
        "systemctl is-system-running 2>&1 || true",
        BOOT_LIMIT,
        // Anything else is the start-up (`initializing`, `starting`) or systemctl
        // failing to reach PID 1 before its private socket exists.
        |s| {
            matches!(
                s,
                "running" | "degraded" | "maintenance" | "stopping" | "offline"
            )
        },
    );
    let failed = sh(
        &t,
        &vm,
        "systemctl list-units --failed --no-legend --plain 2>&1 | awk '{print $1}' || true",
    );
    eprintln!(
        "{kind:?}: systemd stemcell built in {build_time:?}; systemd state {state:?}; failed units: [{}]",
        failed.lines().collect::<Vec<_>>().join(", ")
    );
    assert!(
        matches!(state.as_str(), "running" | "degraded"),
        "systemd in {vm} did not finish starting within {BOOT_LIMIT:?}: state {state:?}; \
         failed units: {failed}; jobs: {}",
        sh(
            &t,
            &vm,
            "systemctl list-jobs --no-pager 2>&1 | head -20 || true"
        )
    );
    if state == "degraded" {
        assert!(
            !failed.is_empty(),
            "degraded but no failed unit listed in {vm}"
        );
    }

    // The stand-in agent ran under systemd and read the settings the CPI wrote.
    let agent_state = poll(
        &t,
        &vm,
        &format!(
            "systemctl is-active {} 2>&1 || true",
            systemd_stemcell::AGENT_UNIT
        ),
        Duration::from_secs(10),
        |s| s == "active",
    );
    assert_eq!(
        agent_state,
        "active",
        "{} is not active in {vm}; its status: {}",
        systemd_stemcell::AGENT_UNIT,
        sh(
            &t,
            &vm,
            &format!(
                "systemctl status --no-pager {} 2>&1 || true",
                systemd_stemcell::AGENT_UNIT
            )
        )
    );
    let agent_log = sh(&t, &vm, &format!("cat {}", systemd_stemcell::AGENT_LOG));
    assert!(
        agent_log.starts_with("started pid ")
            && agent_log
                .lines()
                .any(|l| l == format!("settings agent_id={agent_id}")),
        "the stand-in agent did not read its settings: {agent_log:?}"
    );
    let agent_cgroup = sh(
        &t,
        &vm,
        &format!(
            "systemctl show -p ControlGroup --value {}",
            systemd_stemcell::AGENT_UNIT
        ),
    );
    assert!(
        agent_cgroup.ends_with(systemd_stemcell::AGENT_UNIT),
        "systemd did not put the agent into its own cgroup: {agent_cgroup:?}"
    );

    // cgroups: systemd gave the agent unit its own cgroups, with resource accounting
    // (pids and memory), in a hierarchy whose root is the VM's own cgroup.
    let hierarchy = sh(&t, &vm, "stat -fc %T /sys/fs/cgroup");
    let tasks = sh(
        &t,
        &vm,
        &format!(
            "systemctl show -p TasksCurrent --value {}",
            systemd_stemcell::AGENT_UNIT
        ),
    );
    let agent_cgroups = sh(
        &t,
        &vm,
        &format!(
            "cat /proc/$(systemctl show -p MainPID --value {})/cgroup",
            systemd_stemcell::AGENT_UNIT
        ),
    );
    eprintln!(
        "{kind:?}: /sys/fs/cgroup is {hierarchy} (tmpfs: cgroup v1 or hybrid, cgroup2fs: v2); \
         agent tasks {tasks}; agent cgroups:\n{agent_cgroups}"
    );
    assert!(
        tasks.parse::<u32>().is_ok_and(|n| n >= 1),
        "systemd has no pids accounting for {}: TasksCurrent={tasks:?}; its cgroups:\n{agent_cgroups}",
        systemd_stemcell::AGENT_UNIT
    );
    let unit_path = format!("/system.slice/{}", systemd_stemcell::AGENT_UNIT);
    for controller in ["name=systemd", "pids", "memory"] {
        let line = agent_cgroups
            .lines()
            .find(|l| l.split(':').nth(1) == Some(controller))
            .or_else(|| agent_cgroups.lines().find(|l| l.starts_with("0::")))
            .unwrap_or_default();
        assert!(
            line.ends_with(&unit_path),
            "the agent is not in its own {controller} cgroup: {line:?}"
        );
    }
    if hierarchy == "tmpfs" && kind == BackendKind::Docker {
        // cgroup v1 on Docker: a private cgroup namespace, so the VM's cgroup is its
        // root (with the host's namespace systemd nested `/docker/<id>` twice).
        let want = format!(":name=systemd:{unit_path}");
        assert!(
            agent_cgroups
                .lines()
                .any(|l| l.ends_with(&want) && !l.contains("/docker/")),
            "on cgroup v1 the Docker VM should see its own cgroup as the root: {agent_cgroups}"
        );
    }
    match kind {
        BackendKind::Docker => assert_eq!(
            docker(&["inspect", "-f", "{{.Config.StopSignal}}", &vm])
                .expect_success()
                .trim(),
            "SIGRTMIN+3"
        ),
        BackendKind::Containerd => {
            let info =
                ctr(CONTAINERD_TEST_NAMESPACE, &["containers", "info", &vm]).expect_success();
            assert!(
                info.contains("\"io.bosh.cpi.init\": \"systemd\""),
                "containerd VM {vm} is not labelled as a systemd VM (its stop signal follows the label):\n{info}"
            );
        }
        BackendKind::Fake => {}
    }
    // Live attach: the disk shows up at the hint with PID 1 unchanged.
    let disk = t
        .ok("create_disk", json!([1024, {}, vm]))
        .as_str()
        .expect("disk cid")
        .to_owned();
    c.disk = Some(disk.clone());
    let hint = t.ok("attach_disk", json!([vm, disk]));
    let hint_path = format!("/warden-cpi-dev/{disk}");
    assert_eq!(hint, json!(hint_path));
    let seen = sh(
        &t,
        &vm,
        &format!("echo payload > {hint_path}/file && cat {hint_path}/file"),
    );
    assert_eq!(
        seen, "payload",
        "the attached disk is not usable at {hint_path}"
    );
    assert_eq!(
        sh(&t, &vm, "cut -d' ' -f22 /proc/1/stat"),
        pid1,
        "attach_disk restarted {vm}"
    );
    assert_eq!(sh(&t, &vm, "cat /proc/1/comm"), "systemd");
    let settings: Value = serde_json::from_str(&sh(
        &t,
        &vm,
        &format!("cat {}", systemd_stemcell::SETTINGS_FILE),
    ))
    .expect("settings are JSON");
    assert_eq!(settings["disks"]["persistent"][&disk], json!(hint_path));

    t.ok("detach_disk", json!([vm, disk]));
    let gone = sh(
        &t,
        &vm,
        &format!("test -e {hint_path}/file && echo present || echo absent"),
    );
    assert_eq!(
        gone, "absent",
        "{hint_path} still holds the disk after detach"
    );
    assert_eq!(
        sh(&t, &vm, "cut -d' ' -f22 /proc/1/stat"),
        pid1,
        "detach_disk restarted {vm}"
    );

    // delete_vm is prompt: systemd shuts down on SIGRTMIN+3.
    let started = Instant::now();
    t.ok("delete_vm", json!([vm]));
    let took = started.elapsed();
    c.vm = None;
    eprintln!("{kind:?}: delete_vm of the systemd VM took {took:?}");
    assert!(
        took < DELETE_LIMIT,
        "delete_vm took {took:?}: systemd did not stop on SIGRTMIN+3 and waited for SIGKILL"
    );

    t.ok("delete_disk", json!([disk]));
    c.disk = None;
    t.ok("delete_stemcell", json!([stemcell]));
    c.stemcell = None;
    drop(c);
    t.assert_nothing_left(&[vm], &[disk]);
}

#[test]
fn docker_systemd_by_stemcell_os() {
    systemd_vm(
        BackendKind::Docker,
        "sd-docker-os",
        "ubuntu-noble",
        json!({}),
    );
}

#[test]
fn containerd_systemd_by_stemcell_os() {
    systemd_vm(
        BackendKind::Containerd,
        "sd-ctrd-os",
        "ubuntu-noble",
        json!({}),
    );
}

#[test]
fn docker_systemd_forced_by_cloud_properties() {
    systemd_vm(
        BackendKind::Docker,
        "sd-docker-force",
        "debian-bookworm",
        json!({"force_start_with_systemd": true}),
    );
}

#[test]
fn containerd_systemd_forced_by_cloud_properties() {
    systemd_vm(
        BackendKind::Containerd,
        "sd-ctrd-force",
        "debian-bookworm",
        json!({"force_start_with_systemd": true}),
    );
}
