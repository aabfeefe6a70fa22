//! Isolation between VMs on the real backends: VM B cannot see VM A's persistent
//! disk, ephemeral data or settings, nor the CPI's state directory.
//!
//! Two VMs from one stemcell; A gets a persistent disk with a payload, a marker in
//! its ephemeral data and its own settings. Then, from inside B: `/warden-cpi-dev`
//! is empty, no mount names A's cid or A's disk, A's markers are nowhere under
//! `/var/vcap`, B's settings name B's agent id only, and B's mountinfo shows no
//! part of the host state directory but B's own per-VM directory.
//!
//! Not covered (see docs/reliability.md): VMs run privileged, so root in a VM can
//! still mount host block devices or reach the host through `/dev`; this test shows
//! what the CPI hands each VM, not a sandbox against a hostile VM.
#![allow(
    clippy::print_stderr,
    reason = "a test reports its counts and timings on stderr, shown with --nocapture"
)]

use cpi_tests::conformance::{BackendKind, Target};
use cpi_tests::TestStemcell;
use serde_json::{json, Value};

fn vm_cid(created: &Value) -> String {
    created[0]
        .as_str()
        .unwrap_or_else(|| panic!("create_vm v2 result must be [cid, networks], got {created}"))
        .to_owned()
}

fn exec(t: &Target, vm: &str, script: &str) -> String {
    t.exec(vm, script)
        .unwrap_or_else(|| panic!("exec is needed on {:?}", t.kind))
}

fn isolation(kind: BackendKind, label: &str) {
    let t = Target::new(kind, label);
    let scratch = tempfile::Builder::new()
        .prefix("cpi-isolation-")
        .tempdir()
        .expect("tmp");
    let sc = TestStemcell::builder().build_unpacked(scratch.path().join("stemcell"));
    let stemcell = t
        .ok("create_stemcell", json!([sc.image_path, {}]))
        .as_str()
        .expect("stemcell cid")
        .to_owned();
    let a = vm_cid(&t.ok(
        "create_vm",
        json!(["agent-iso-a", stemcell, {}, {"default": t.manual_network(70)}, [], t.env()]),
    ));
    let b = vm_cid(&t.ok(
        "create_vm",
        json!(["agent-iso-b", stemcell, {}, {"default": t.manual_network(71)}, [], t.env()]),
    ));
    let disk = t
        .ok("create_disk", json!([64, {}, a]))
        .as_str()
        .expect("disk cid")
        .to_owned();
    t.ok("attach_disk", json!([a, disk]));
    let marker = format!("iso-marker-{}", cpi_tests::names::unique_name("m"));
    exec(
        &t,
        &a,
        &format!(
            "echo {marker} > /var/vcap/data/{marker} && echo {marker} > /warden-cpi-dev/{disk}/{marker} && sync"
        ),
    );
    assert_eq!(
        exec(&t, &a, &format!("cat /warden-cpi-dev/{disk}/{marker}")).trim(),
        marker,
        "A must see its own disk"
    );

    // Disks: nothing under /warden-cpi-dev, no mount naming A or A's disk.
    let listing = exec(&t, &b, "ls -A /warden-cpi-dev");
    assert_eq!(
        listing.trim(),
        "",
        "VM B sees another VM's disks: {listing}"
    );
    let mountinfo = exec(&t, &b, "cat /proc/self/mountinfo");
    for (what, needle) in [("A's cid", a.as_str()), ("A's disk", disk.as_str())] {
        let hits: Vec<_> = mountinfo.lines().filter(|l| l.contains(needle)).collect();
        assert!(
            hits.is_empty(),
            "B's mounts name {what}:\n{}",
            hits.join("\n")
        );
    }

    let own_mount = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/warden-cpi-dev"))
        .unwrap_or_else(|| panic!("B has no /warden-cpi-dev mount:\n{mountinfo}"));
    eprintln!("{label}: B's /warden-cpi-dev: {own_mount}");

    // Ephemeral data: A's marker is nowhere B can look.
    let found = exec(
        &t,
        &b,
        &format!(
            "ls /var/vcap/data/{marker} 2>/dev/null; grep -rl {marker} /var/vcap /warden-cpi-dev /tmp /root 2>/dev/null; true"
        ),
    );
    assert_eq!(
        found.trim(),
        "",
        "B sees A's ephemeral data or disk: {found}"
    );

    // Settings: B's file names B only; there is one settings file.
    let settings: Value = serde_json::from_str(&exec(
        &t,
        &b,
        "cat /var/vcap/bosh/warden-cpi-agent-env.json",
    ))
    .expect("settings JSON");
    assert_eq!(settings["agent_id"], "agent-iso-b");
    assert_eq!(settings["vm"]["name"], b.as_str());
    let text = settings.to_string();
    assert!(
        !text.contains("agent-iso-a") && !text.contains(&a) && !text.contains(&disk),
        "B's settings mention A: {text}"
    );
    let grep_a = exec(&t, &b, "grep -rl agent-iso-a /var/vcap 2>/dev/null; true");
    assert_eq!(grep_a.trim(), "", "A's agent id is readable in B: {grep_a}");

    // The CPI's state directory: only B's own per-VM directory may be mounted in B.
    let state = t.state_dir.to_string_lossy().into_owned();
    let own = t.state_dir.join("vms").join(&b);
    let own = own.to_string_lossy();
    let foreign: Vec<_> = mountinfo
        .lines()
        .filter(|l| l.contains(state.as_str()) && !l.contains(own.as_ref()))
        .collect();
    assert!(
        foreign.is_empty(),
        "B's mounts expose the CPI's state directory {state}:\n{}",
        foreign.join("\n")
    );
    let state_visible = exec(
        &t,
        &b,
        &format!("ls -d {state} {state}/vms 2>/dev/null; true"),
    );
    assert_eq!(
        state_visible.trim(),
        "",
        "B can list the host state directory: {state_visible}"
    );

    t.ok("detach_disk", json!([a, disk]));
    t.ok("delete_vm", json!([a]));
    t.ok("delete_vm", json!([b]));
    t.ok("delete_disk", json!([disk]));
    t.ok("delete_stemcell", json!([stemcell]));
    t.assert_nothing_left(&[a, b], &[disk]);
    t.remove_networks();
}

#[test]
fn isolation_docker() {
    isolation(BackendKind::Docker, "iso-docker");
}

#[test]
fn isolation_containerd() {
    isolation(BackendKind::Containerd, "iso-ctrd");
}
