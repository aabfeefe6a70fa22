//! `cpi-demo`: the README's main command. Drives the real `cpi` binary through a VM
//! lifecycle against a local daemon, the way a BOSH director would, and narrates each
//! step with its time: build a stemcell, import it, create a VM, attach a persistent
//! disk live, show that the VM kept running, clean up, and check nothing was left.
//!
//! Usage: `cpi-demo [docker|containerd|fake]` (default docker).

use std::time::Instant;

use cpi_tests::conformance::{BackendKind, Target};
use serde_json::{json, Value};

#[allow(clippy::print_stdout, reason = "the demo's narration is its output")]
fn say(step: &str, started: Instant, detail: &str) {
    println!(
        "{:>8.1} ms  {step:<28} {detail}",
        started.elapsed().as_secs_f64() * 1000.0
    );
}

fn timed<T>(step: &str, f: impl FnOnce() -> T, detail: impl FnOnce(&T) -> String) -> T {
    let started = Instant::now();
    let out = f();
    say(step, started, &detail(&out));
    out
}

fn text(v: &Value) -> String {
    v.as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| v.to_string())
}

#[allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "the demo's narration is its output; a usage error goes to stderr"
)]
fn main() {
    let kind = match std::env::args().nth(1).as_deref() {
        None | Some("docker") => BackendKind::Docker,
        Some("containerd") => BackendKind::Containerd,
        Some("fake") => BackendKind::Fake,
        Some(other) => {
            eprintln!("usage: cpi-demo [docker|containerd|fake] (got {other:?})");
            std::process::exit(2);
        }
    };
    println!(
        "bosh-container-cpi demo on the {kind:?} backend, through {}",
        cpi_tests::cpi_bin().display()
    );
    let t = Target::new(kind, "demo");
    let total = Instant::now();

    let info = timed("info", || t.ok("info", json!([])), |v| v.to_string());
    drop(info);
    let sc = timed(
        "build test stemcell",
        || t.stemcell("ubuntu-jammy"),
        |s| s.image_path.display().to_string(),
    );
    let stemcell = timed(
        "create_stemcell",
        || text(&t.ok("create_stemcell", json!([sc.image_path, {}]))),
        Clone::clone,
    );
    let net = t.manual_network(10);
    let created = timed(
        "create_vm",
        || {
            t.ok("create_vm", json!(["agent-demo", stemcell, {"cpu": 1, "ram": 256}, {"default": net}, [], t.env()]))
        },
        |v| v.to_string(),
    );
    let vm = text(&created[0]);
    let pid1 = |t: &Target| {
        t.exec(&vm, "cut -d' ' -f22 /proc/1/stat")
            .map(|s| s.trim().to_owned())
    };
    let boot = pid1(&t);
    if let Some(b) = &boot {
        t.exec(&vm, "echo hello > /var/vcap/data/demo-marker");
        println!(
            "            PID 1 start time {b} (clock ticks); wrote /var/vcap/data/demo-marker"
        );
    }
    let disk = timed(
        "create_disk 1024 MiB",
        || text(&t.ok("create_disk", json!([1024, {}, vm]))),
        Clone::clone,
    );
    timed(
        "attach_disk (live)",
        || t.ok("attach_disk", json!([vm, disk])),
        |v| format!("hint {v}"),
    );
    if let Some(after) = pid1(&t) {
        let kept = t
            .exec(&vm, "cat /var/vcap/data/demo-marker")
            .unwrap_or_default();
        let seen = t
            .exec(&vm, &format!("ls -ld /warden-cpi-dev/{disk}"))
            .unwrap_or_default();
        println!(
            "            PID 1 start time {after} ({}); marker {:?}; {}",
            if Some(&after) == boot.as_ref() {
                "unchanged: no restart"
            } else {
                "CHANGED"
            },
            kept.trim(),
            seen.trim()
        );
    }
    timed(
        "get_disks",
        || t.ok("get_disks", json!([vm])),
        |v| v.to_string(),
    );
    timed(
        "detach_disk (live)",
        || t.ok("detach_disk", json!([vm, disk])),
        |_| String::new(),
    );
    timed(
        "delete_vm",
        || t.ok("delete_vm", json!([vm])),
        |_| String::new(),
    );
    timed(
        "delete_disk",
        || t.ok("delete_disk", json!([disk])),
        |_| String::new(),
    );
    timed(
        "delete_stemcell",
        || t.ok("delete_stemcell", json!([stemcell])),
        |_| String::new(),
    );
    t.assert_nothing_left(&[vm], &[disk]);
    t.remove_networks();
    say("done, nothing left behind", total, "");
}
