//! The backend-agnostic conformance suite: written once, run against every backend
//! through the real `cpi` binary over stdin/stdout, the way the director calls it.
//!
//! A [`Target`] is one backend with its own config file, a per-run `director_uuid`
//! (so everything the run creates can be found again on the daemon), a way to run a
//! command inside a VM, and a leftovers check. The suites ([`lifecycle`],
//! [`error_paths`], [`networks`]) take a target and assert the contract.
//!
//! The fake backend has no processes: [`Target::exec`] returns `None` there and the
//! suites check what the protocol shows (results, settings, `get_disks`) but not what
//! only a running VM can show. Every such place says so in its assertion message.

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::daemons::{self, containerd_exec, ctr, docker};
use crate::runner::{CpiResponse, CpiRunner};
use crate::stemcell::{TestStemcell, UnpackedStemcell};

/// Which backend a [`Target`] drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// The in-memory fake (state kept in a file between calls).
    Fake,
    /// A real dockerd at `/var/run/docker.sock`.
    Docker,
    /// A real containerd at `/run/containerd/containerd.sock`.
    Containerd,
}

/// The containerd namespace the conformance suite uses.
pub const CONTAINERD_TEST_NAMESPACE: &str = "bosh-conformance";

/// Where the real backends keep their per-VM directories during the suite.
pub const STATE_ROOT: &str = "/var/lib/bosh-container-cpi-test";

/// The mbus URL in the test config; its password must never appear in any output.
pub const MBUS_URL: &str = "https://mbus:mbus-conformance-secret@0.0.0.0:6868";

/// One backend under test.
pub struct Target {
    /// The backend.
    pub kind: BackendKind,
    /// Runs the binary with this target's config.
    pub runner: CpiRunner,
    /// The per-run director uuid put into every request's context.
    pub director_uuid: String,
    /// The backend's state directory (real backends).
    pub state_dir: PathBuf,
    /// A /24 subnet this target's manual networks use, unique to the run (`10.X.Y`).
    pub subnet_prefix: String,
    /// Another /24 for dynamic networks (`10.X.Y`).
    pub dynamic_prefix: String,
    dir: tempfile::TempDir,
}

impl Target {
    /// Sets up a target: checks its daemon (panicking with instructions when it is
    /// missing: suites never skip) and writes its config file.
    pub fn new(kind: BackendKind, label: &str) -> Target {
        let dir = tempfile::Builder::new()
            .prefix("cpi-conformance-")
            .tempdir()
            .expect("temp dir");
        let run = crate::names::unique_name(label);
        let director_uuid = format!("conformance-{run}");
        let hash = run
            .bytes()
            .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        let subnet_prefix = format!("10.{}.{}", 100 + hash % 100, (hash / 100) % 250 + 1);
        let dynamic_prefix = format!("10.{}.{}", 200 + hash % 50, (hash / 100) % 250 + 1);
        let state_dir = PathBuf::from(STATE_ROOT).join(match kind {
            BackendKind::Fake => "fake",
            BackendKind::Docker => "docker",
            BackendKind::Containerd => "containerd",
        });
        let agent = json!({"mbus": MBUS_URL, "ntp": []});
        let config = match kind {
            BackendKind::Fake => json!({
                "backend": "fake",
                "agent": agent,
                "fake": {"state_file": dir.path().join("fake-state.json")},
            }),
            BackendKind::Docker => {
                daemons::require_docker();
                json!({
                    "backend": "docker",
                    "agent": agent,
                    "docker": {"host": "unix:///var/run/docker.sock", "state_dir": state_dir},
                })
            }
            BackendKind::Containerd => {
                daemons::require_containerd();
                json!({
                    "backend": "containerd",
                    "agent": agent,
                    "containerd": {"namespace": CONTAINERD_TEST_NAMESPACE, "state_dir": state_dir},
                })
            }
        };
        let config_path = dir.path().join("cpi.json");
        std::fs::write(
            &config_path,
            serde_json::to_vec_pretty(&config).expect("json"),
        )
        .expect("write config");
        Target {
            kind,
            runner: CpiRunner::new(config_path),
            director_uuid,
            state_dir,
            subnet_prefix,
            dynamic_prefix,
            dir,
        }
    }

    /// Calls a method with this target's director uuid.
    pub fn call(&self, method: &str, args: Value) -> CpiResponse {
        let resp = self.runner.call_with_context(
            method,
            args,
            json!({"director_uuid": self.director_uuid}),
        );
        resp.assert_well_formed();
        assert!(
            !resp.stdout.contains("mbus-conformance-secret")
                && !resp.stderr.contains("mbus-conformance-secret"),
            "{method}: the mbus password leaked into the output:\n{}",
            resp.describe()
        );
        resp
    }

    /// Calls a method that must succeed and returns its result.
    pub fn ok(&self, method: &str, args: Value) -> Value {
        let resp = self.call(method, args);
        assert!(resp.is_ok(), "{method} failed:\n{}", resp.describe());
        resp.result
    }

    /// Calls a method that must fail with `error_type` and returns the message.
    pub fn err(&self, method: &str, args: Value, error_type: &str) -> String {
        let resp = self.call(method, args);
        resp.expect_error(error_type).message.clone()
    }

    /// Builds a small warden-style stemcell in this target's temp dir.
    pub fn stemcell(&self, os: &str) -> UnpackedStemcell {
        TestStemcell::builder()
            .os(os)
            .version("0.0.1")
            .build_unpacked(self.dir.path().join(format!("stemcell-{os}")))
    }

    /// A manual network on this target's subnet with host part `host`.
    pub fn manual_network(&self, host: u8) -> Value {
        json!({
            "type": "manual",
            "ip": format!("{}.{host}", self.subnet_prefix),
            "netmask": "255.255.255.0",
            "gateway": format!("{}.1", self.subnet_prefix),
            "dns": [format!("{}.2", self.subnet_prefix)],
            "default": ["dns", "gateway"],
            "cloud_properties": {"name": format!("cpi-{}", self.director_uuid.trim_start_matches("conformance-"))},
        })
    }

    /// The env a director sends, with secrets that must never be printed.
    pub fn env(&self) -> Value {
        json!({"bosh": {
            "group": "conformance", "groups": ["conformance", "z1"],
            "password": "$6$conformance-password-secret",
            "mbus": {"cert": {"ca": "conformance-ca", "certificate": "conformance-cert", "private_key": "conformance-private-key-secret"}},
            "blobstores": [{"provider": "dav", "options": {"endpoint": "http://127.0.0.1:25250", "user": "agent", "password": "conformance-blobstore-secret"}}],
        }})
    }

    /// Runs a shell script inside a running VM and returns its stdout, or `None` on
    /// the fake backend (which has no processes). Panics when the command fails.
    pub fn exec(&self, vm: &str, script: &str) -> Option<String> {
        let out = match self.kind {
            BackendKind::Fake => return None,
            BackendKind::Docker => docker(&["exec", vm, "/bin/sh", "-c", script]),
            BackendKind::Containerd => containerd_exec(CONTAINERD_TEST_NAMESPACE, vm, script),
        };
        assert!(
            out.success(),
            "exec in {vm} of {script:?} failed: {} {}",
            out.stdout,
            out.stderr
        );
        Some(out.stdout)
    }

    /// Everything on the daemon that still carries this run's director uuid, plus
    /// mounts left under the per-VM directories of `vms` (other runs may share the
    /// state directory concurrently). Empty when the run cleaned up after itself.
    pub fn leftovers(&self, vms: &[String]) -> Vec<String> {
        let mut found = Vec::new();
        let uuid = &self.director_uuid;
        let mut scan = |what: &str, text: String| {
            for line in text.lines().filter(|l| l.contains(uuid.as_str())) {
                found.push(format!("{what}: {line}"));
            }
        };
        match self.kind {
            BackendKind::Fake => {
                let state = std::fs::read_to_string(self.dir.path().join("fake-state.json"))
                    .unwrap_or_default();
                scan("fake state", state);
            }
            BackendKind::Docker => {
                scan(
                    "container",
                    docker(&["ps", "-a", "--format", "{{.Names}} {{.Labels}}"]).expect_success(),
                );
                scan(
                    "volume",
                    docker(&["volume", "ls", "--format", "{{.Name}} {{.Labels}}"]).expect_success(),
                );
                scan(
                    "image",
                    docker(&["images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}"])
                        .expect_success(),
                );
            }
            BackendKind::Containerd => {
                let ns = CONTAINERD_TEST_NAMESPACE;
                for what in [
                    "containers",
                    "tasks",
                    "images",
                    "snapshots",
                    "leases",
                    "content",
                ] {
                    let out = ctr(ns, &[what, "ls"]);
                    scan(what, out.stdout);
                }
                let netns = std::process::Command::new("ip")
                    .args(["netns", "list"])
                    .output();
                if let Ok(out) = netns {
                    scan("netns", String::from_utf8_lossy(&out.stdout).into_owned());
                }
            }
        }
        if self.kind != BackendKind::Fake {
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            for vm in vms {
                let vm_dir = self.state_dir.join("vms").join(vm);
                let vm_dir = vm_dir.to_string_lossy();
                for line in mountinfo.lines() {
                    if line
                        .split(' ')
                        .nth(4)
                        .is_some_and(|m| m.starts_with(vm_dir.as_ref()))
                    {
                        found.push(format!("mount: {line}"));
                    }
                }
            }
        }
        found
    }

    /// Asserts that none of `vms` and `disks` exist on the daemon any more and that
    /// nothing labelled with this run's director uuid is left.
    pub fn assert_nothing_left(&self, vms: &[String], disks: &[String]) {
        for vm in vms {
            assert_eq!(
                self.ok("has_vm", json!([vm])),
                json!(false),
                "VM {vm} still exists"
            );
            let vm_dir = self.state_dir.join("vms").join(vm);
            assert!(
                self.kind == BackendKind::Fake || !vm_dir.exists(),
                "per-VM directory {} was left behind",
                vm_dir.display()
            );
        }
        for disk in disks {
            assert_eq!(
                self.ok("has_disk", json!([disk])),
                json!(false),
                "disk {disk} still exists"
            );
        }
        let left = self.leftovers(vms);
        assert!(
            left.is_empty(),
            "the run left these behind:\n{}",
            left.join("\n")
        );
    }

    /// Removes networks this run made the backend create (they are shared
    /// infrastructure, like a subnet, and outlive VMs by design).
    pub fn remove_networks(&self) {
        if self.kind == BackendKind::Docker {
            let run = self.director_uuid.trim_start_matches("conformance-");
            let out = docker(&["network", "ls", "--format", "{{.Name}} {{.Labels}}"]);
            for line in out.stdout.lines().filter(|l| l.contains(run)) {
                if let Some(name) = line.split(' ').next() {
                    let _ = docker(&["network", "rm", name]);
                }
            }
        }
    }
}

/// PID 1's start time (field 22 of `/proc/1/stat`) inside a VM.
fn pid1_start(t: &Target, vm: &str) -> Option<String> {
    t.exec(vm, "cut -d' ' -f22 /proc/1/stat")
        .map(|s| s.trim().to_owned())
}

/// The agent settings document inside a VM (real backends).
fn settings_in_vm(t: &Target, vm: &str) -> Option<Value> {
    t.exec(vm, "cat /var/vcap/bosh/warden-cpi-agent-env.json")
        .map(|s| {
            serde_json::from_str(&s)
                .unwrap_or_else(|e| panic!("settings in {vm} are not JSON ({e}): {s}"))
        })
}

fn vm_cid(created: &Value) -> String {
    created[0]
        .as_str()
        .unwrap_or_else(|| panic!("create_vm v2 result must be [cid, networks], got {created}"))
        .to_owned()
}

/// The full lifecycle, with live-attach proofs on real backends.
pub fn lifecycle(t: &Target) {
    let info = t.ok("info", json!([]));
    assert_eq!(info["api_version"], 2);
    let formats = info["stemcell_formats"]
        .as_array()
        .expect("formats")
        .clone();
    assert!(
        formats.contains(&json!("warden-tar")),
        "formats: {formats:?}"
    );

    let sc = t.stemcell("ubuntu-jammy");
    let stemcell = t.ok(
        "create_stemcell",
        json!([sc.image_path, {"infrastructure": "warden", "architecture": "x86_64"}]),
    );
    let stemcell = stemcell.as_str().expect("stemcell cid").to_owned();

    let props = t.ok(
        "calculate_vm_cloud_properties",
        json!([{"cpu": 1, "ram": 512, "ephemeral_disk_size": 1024}]),
    );
    assert!(
        props.is_object(),
        "cloud properties must be an object: {props}"
    );

    let net1 = t.manual_network(10);
    let created = t.ok(
        "create_vm",
        json!(["agent-1", stemcell, props, {"default": net1}, [], t.env()]),
    );
    let vm1 = vm_cid(&created);
    assert_eq!(
        created[1]["default"]["ip"], net1["ip"],
        "v2 networks echo: {created}"
    );
    assert_eq!(t.ok("has_vm", json!([vm1])), json!(true));

    if let Some(settings) = settings_in_vm(t, &vm1) {
        assert_eq!(settings["agent_id"], "agent-1");
        assert_eq!(settings["vm"]["name"], vm1.as_str());
        assert_eq!(settings["mbus"], MBUS_URL);
        assert_eq!(settings["networks"]["default"]["ip"], net1["ip"]);
        assert_eq!(settings["networks"]["default"]["preconfigured"], true);
        assert!(settings.get("blobstore").is_none());
        let resolv = t.exec(&vm1, "cat /etc/resolv.conf").unwrap_or_default();
        assert!(
            resolv.contains(net1["dns"][0].as_str().unwrap_or("?")),
            "resolv.conf: {resolv}"
        );
        let mounts = t.exec(&vm1, "cat /proc/self/mountinfo").unwrap_or_default();
        for owned in ["/etc/resolv.conf", "/etc/hosts", "/etc/hostname"] {
            assert!(
                !mounts.lines().any(|l| l.split(' ').nth(4) == Some(owned)),
                "{owned} must be the VM's own file, not a runtime bind mount"
            );
        }
        let addrs = t.exec(&vm1, "ip -o addr").unwrap_or_default();
        assert!(
            addrs.contains(net1["ip"].as_str().unwrap_or("?")),
            "VM lacks its IP: {addrs}"
        );
        let cmdline = t
            .exec(&vm1, "tr '\\0' ' ' < /proc/1/cmdline")
            .unwrap_or_default();
        assert!(
            cmdline.contains("runsvdir-start"),
            "PID 1 should be runit's stand-in: {cmdline}"
        );
    }

    t.ok("set_vm_metadata", json!([vm1, {"director": "d", "deployment": "dep", "instance_group": "ig", "job": "ig", "id": "0f5b", "name": "ig/0f5b", "index": "0", "created_at": "2026-11-23T08:30:00Z"}]));

    let disk = t
        .ok("create_disk", json!([1024, {}, vm1]))
        .as_str()
        .expect("disk cid")
        .to_owned();
    assert_eq!(t.ok("has_disk", json!([disk])), json!(true));
    t.ok("set_disk_metadata", json!([disk, {"director": "d", "deployment": "dep", "instance_id": "0f5b", "instance_index": "0", "instance_group": "ig", "attached_at": "2026-11-23T08:31:00Z"}]));
    assert_eq!(t.ok("get_disks", json!([vm1])), json!([]));

    // Live attach: same PID 1, same start time, ephemeral data untouched.
    let before = pid1_start(t, &vm1);
    t.exec(
        &vm1,
        "echo ephemeral-marker > /var/vcap/data/marker && echo root-marker > /root/marker",
    );
    let hint = t.ok("attach_disk", json!([vm1, disk]));
    assert_eq!(hint, json!(format!("/warden-cpi-dev/{disk}")));
    assert_eq!(t.ok("get_disks", json!([vm1])), json!([disk]));
    if let Some(after) = pid1_start(t, &vm1) {
        assert_eq!(
            Some(after),
            before,
            "attach_disk restarted the VM (PID 1 start time changed)"
        );
        let kept = t
            .exec(&vm1, "cat /var/vcap/data/marker /root/marker")
            .unwrap_or_default();
        assert_eq!(
            kept, "ephemeral-marker\nroot-marker\n",
            "attach_disk lost VM state"
        );
        let settings = settings_in_vm(t, &vm1).expect("settings");
        assert_eq!(
            settings["disks"]["persistent"][&disk],
            format!("/warden-cpi-dev/{disk}")
        );
        t.exec(
            &vm1,
            &format!("echo disk-payload > /warden-cpi-dev/{disk}/payload && sync"),
        );
    }

    // A second VM sees nothing of the first VM's disk.
    let vm2 = vm_cid(&t.ok(
        "create_vm",
        json!(["agent-2", stemcell, {}, {"default": t.manual_network(11)}, [], t.env()]),
    ));
    if let Some(listing) = t.exec(&vm2, "ls -A /warden-cpi-dev") {
        assert_eq!(listing.trim(), "", "VM 2 sees another VM's disks");
    }

    // Detach live; a second detach says DiskNotAttached.
    t.ok("detach_disk", json!([vm1, disk]));
    assert_eq!(t.ok("get_disks", json!([vm1])), json!([]));
    if let Some(gone) = t.exec(
        &vm1,
        &format!("cat /warden-cpi-dev/{disk}/payload 2>/dev/null || echo absent"),
    ) {
        assert_eq!(
            gone.trim(),
            "absent",
            "the disk is still visible in VM 1 after detach"
        );
        assert_eq!(pid1_start(t, &vm1), before, "detach_disk restarted the VM");
        let settings = settings_in_vm(t, &vm1).expect("settings");
        assert!(
            settings["disks"]["persistent"].get(&disk).is_none(),
            "settings still list the disk"
        );
    }
    t.err(
        "detach_disk",
        json!([vm1, disk]),
        "Bosh::Clouds::DiskNotAttached",
    );

    // Re-attach to VM 2: the data is there.
    t.ok("attach_disk", json!([vm2, disk]));
    if let Some(payload) = t.exec(&vm2, &format!("cat /warden-cpi-dev/{disk}/payload")) {
        assert_eq!(
            payload, "disk-payload\n",
            "data did not survive detach and re-attach"
        );
    }
    // An attached disk cannot be deleted.
    let resp = t.call("delete_disk", json!([disk]));
    assert!(
        !resp.is_ok(),
        "delete_disk of an attached disk must fail:\n{}",
        resp.describe()
    );
    assert_eq!(t.ok("has_disk", json!([disk])), json!(true));

    // Reboot for real, keeping ephemeral data and the attached disk.
    t.exec(&vm2, "echo survives-reboot > /var/vcap/data/reboot-marker");
    let boot1 = pid1_start(t, &vm2);
    t.ok("reboot_vm", json!([vm2]));
    assert_eq!(t.ok("has_vm", json!([vm2])), json!(true));
    if let Some(boot2) = pid1_start(t, &vm2) {
        assert_ne!(Some(boot2), boot1, "reboot_vm did not restart the VM");
        let kept = t
            .exec(
                &vm2,
                &format!("cat /var/vcap/data/reboot-marker /warden-cpi-dev/{disk}/payload"),
            )
            .unwrap_or_default();
        assert_eq!(
            kept, "survives-reboot\ndisk-payload\n",
            "reboot lost ephemeral data or the disk"
        );
    }
    assert_eq!(t.ok("get_disks", json!([vm2])), json!([disk]));

    // delete_vm with the disk still attached: the VM goes, the disk and its data stay.
    t.ok("delete_vm", json!([vm2]));
    assert_eq!(t.ok("has_vm", json!([vm2])), json!(false));
    t.ok("delete_vm", json!([vm2]));
    assert_eq!(t.ok("has_disk", json!([disk])), json!(true));
    t.ok("attach_disk", json!([vm1, disk]));
    if let Some(payload) = t.exec(&vm1, &format!("cat /warden-cpi-dev/{disk}/payload")) {
        assert_eq!(
            payload, "disk-payload\n",
            "data did not survive delete_vm of the VM it was attached to"
        );
    }
    t.ok("detach_disk", json!([vm1, disk]));

    t.ok("delete_vm", json!([vm1]));
    t.ok("delete_disk", json!([disk]));
    t.ok("delete_disk", json!([disk]));
    t.ok("delete_stemcell", json!([stemcell]));
    t.ok("delete_stemcell", json!([stemcell]));
    t.assert_nothing_left(&[vm1, vm2], &[disk]);
    t.remove_networks();
}

/// Unknown ids, double deletes and wrong states answer the director's error types.
pub fn error_paths(t: &Target) {
    let ghost_vm = "c-00000000-0000-4000-8000-000000000000";
    let ghost_disk = "vol-00000000-0000-4000-8000-000000000000";
    assert_eq!(t.ok("has_vm", json!([ghost_vm])), json!(false));
    t.ok("delete_vm", json!([ghost_vm]));
    assert_eq!(t.ok("has_disk", json!([ghost_disk])), json!(false));
    t.ok("delete_disk", json!([ghost_disk]));
    t.ok(
        "delete_stemcell",
        json!(["bosh-stemcell:00000000-0000-4000-8000-000000000000"]),
    );
    t.err("reboot_vm", json!([ghost_vm]), "Bosh::Clouds::VMNotFound");
    t.err("get_disks", json!([ghost_vm]), "Bosh::Clouds::VMNotFound");
    t.err(
        "set_vm_metadata",
        json!([ghost_vm, {"deployment": "x"}]),
        "Bosh::Clouds::VMNotFound",
    );
    t.err(
        "set_disk_metadata",
        json!([ghost_disk, {"deployment": "x"}]),
        "Bosh::Clouds::DiskNotFound",
    );

    let disk = t
        .ok("create_disk", json!([64, {}, null]))
        .as_str()
        .expect("disk")
        .to_owned();
    t.err(
        "attach_disk",
        json!([ghost_vm, disk]),
        "Bosh::Clouds::VMNotFound",
    );
    t.err(
        "detach_disk",
        json!([ghost_vm, disk]),
        "Bosh::Clouds::VMNotFound",
    );

    let sc = t.stemcell("ubuntu-jammy");
    let stemcell = t
        .ok("create_stemcell", json!([sc.image_path, {}]))
        .as_str()
        .expect("stemcell")
        .to_owned();
    let vm = vm_cid(&t.ok(
        "create_vm",
        json!(["agent-e", stemcell, {}, {"default": t.manual_network(20)}, [], t.env()]),
    ));
    t.err(
        "attach_disk",
        json!([vm, ghost_disk]),
        "Bosh::Clouds::DiskNotFound",
    );
    t.err(
        "detach_disk",
        json!([vm, disk]),
        "Bosh::Clouds::DiskNotAttached",
    );

    // A VM from a stemcell that does not exist fails and leaves nothing behind.
    let resp = t.call(
        "create_vm",
        json!(["agent-x", "bosh-stemcell:00000000-0000-4000-8000-000000000000", {}, {"default": t.manual_network(21)}, [], t.env()]),
    );
    assert!(
        !resp.is_ok(),
        "create_vm from a missing stemcell must fail:\n{}",
        resp.describe()
    );
    // The same IP twice is refused, not silently given to two VMs.
    let resp = t.call(
        "create_vm",
        json!(["agent-dup", stemcell, {}, {"default": t.manual_network(20)}, [], t.env()]),
    );
    assert!(
        !resp.is_ok(),
        "a second VM with the same IP must be refused:\n{}",
        resp.describe()
    );

    // A missing stemcell image answers an error that names it.
    let resp = t.call(
        "create_stemcell",
        json!(["/nonexistent/stemcell/image", {}]),
    );
    let msg = resp
        .error
        .as_ref()
        .map(|e| e.message.clone())
        .unwrap_or_default();
    assert!(
        !resp.is_ok() && msg.contains("/nonexistent/stemcell"),
        "{}",
        resp.describe()
    );

    t.ok("delete_vm", json!([vm]));
    t.ok("delete_disk", json!([disk]));
    t.ok("delete_stemcell", json!([stemcell]));
    t.assert_nothing_left(&[vm], &[disk]);
    t.remove_networks();
}

/// Several networks on one VM: a manual one with its static IP and a dynamic one
/// whose address the backend reports in the v2 result.
pub fn networks(t: &Target) {
    let sc = t.stemcell("ubuntu-jammy");
    let stemcell = t
        .ok("create_stemcell", json!([sc.image_path, {}]))
        .as_str()
        .expect("stemcell")
        .to_owned();
    let dyn_subnet = format!("{}.0/24", t.dynamic_prefix);
    let dynamic = json!({
        "type": "dynamic",
        "dns": ["1.1.1.1"],
        "cloud_properties": {"name": format!("{}-dyn", t.manual_network(1)["cloud_properties"]["name"].as_str().unwrap_or("x")), "subnet": dyn_subnet},
    });
    let manual = t.manual_network(30);
    let created = t.ok(
        "create_vm",
        json!(["agent-n", stemcell, {}, {"a-manual": manual, "b-dynamic": dynamic}, [], t.env()]),
    );
    let vm = vm_cid(&created);
    let assigned = created[1]["b-dynamic"]["ip"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        assigned.parse::<std::net::IpAddr>().is_ok(),
        "the dynamic network's assigned address must be reported: {created}"
    );
    assert_eq!(created[1]["a-manual"]["ip"], manual["ip"]);
    if let Some(addrs) = t.exec(&vm, "ip -o addr") {
        assert!(
            addrs.contains(manual["ip"].as_str().unwrap_or("?")),
            "{addrs}"
        );
        assert!(addrs.contains(&assigned), "{addrs}");
    }
    if let Some(settings) = settings_in_vm(t, &vm) {
        assert_eq!(settings["networks"]["b-dynamic"]["ip"], assigned.as_str());
    }
    t.ok("delete_vm", json!([vm]));
    t.ok("delete_stemcell", json!([stemcell]));
    t.assert_nothing_left(&[vm], &[]);
    t.remove_networks();
}
