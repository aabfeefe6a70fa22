//! Concurrency on the real backends, through the real `cpi` binary: one process per
//! call, as the director runs it, started from many threads at once.
//!
//! - 20 `create_vm` at once from one stemcell, each VM with its own static IP on one
//!   manual network and an address on one dynamic network: all succeed, every VM has
//!   its own addresses; then 20 `delete_vm` at once; nothing is left.
//! - `create_stemcell` of one tarball from several processes at once: all succeed;
//!   deleting some of the cids leaves the others usable; nothing is left.
//! - `attach_disk` and `detach_disk` on different VMs at once: afterwards each VM's
//!   settings file lists exactly its own disk (no lost update), and none after the
//!   detaches. Also one disk attached to two VMs at once: at most one attach wins.
//! - The same static IP asked for by several `create_vm` at once: exactly one VM gets
//!   it, the others fail with an error naming the address.
//!
//! Every scenario has its own [`Target`] (director uuid, subnets) and a guard that
//! deletes what it made when an assertion fails halfway.
#![allow(
    clippy::print_stderr,
    reason = "a test reports its counts and timings on stderr, shown with --nocapture"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Instant;

use cpi_tests::conformance::{BackendKind, Target};
use cpi_tests::{CpiResponse, TestStemcell};
use serde_json::{json, Value};

/// How many VMs the parallel create/delete scenario makes.
const PARALLEL_VMS: usize = 20;
/// How many processes import the same stemcell at once.
const PARALLEL_STEMCELLS: usize = 4;
/// How many VM/disk pairs attach and detach at once.
const PARALLEL_ATTACH: usize = 6;
/// How many `create_vm` ask for one static IP at once.
const SAME_IP_RACERS: usize = 4;
/// How many times two VMs race for one disk.
const RACE_ROUNDS: usize = 5;

/// What a scenario made, deleted on drop (also when an assertion failed).
struct Made<'a> {
    t: &'a Target,
    vms: Mutex<Vec<String>>,
    disks: Mutex<Vec<String>>,
    stemcells: Mutex<Vec<String>>,
}

impl<'a> Made<'a> {
    fn new(t: &'a Target) -> Self {
        Made {
            t,
            vms: Mutex::new(Vec::new()),
            disks: Mutex::new(Vec::new()),
            stemcells: Mutex::new(Vec::new()),
        }
    }

    fn vm(&self, cid: &str) {
        self.vms.lock().expect("lock").push(cid.to_owned());
    }

    fn disk(&self, cid: &str) {
        self.disks.lock().expect("lock").push(cid.to_owned());
    }

    fn stemcell(&self, cid: &str) {
        self.stemcells.lock().expect("lock").push(cid.to_owned());
    }

    fn forget_vm(&self, cid: &str) {
        self.vms.lock().expect("lock").retain(|v| v != cid);
    }

    fn forget_stemcell(&self, cid: &str) {
        self.stemcells.lock().expect("lock").retain(|v| v != cid);
    }
}

impl Drop for Made<'_> {
    fn drop(&mut self) {
        // Best effort: the test has already failed when anything is still listed.
        let vms = std::mem::take(&mut *self.vms.lock().unwrap_or_else(|e| e.into_inner()));
        let disks = std::mem::take(&mut *self.disks.lock().unwrap_or_else(|e| e.into_inner()));
        let stemcells =
            std::mem::take(&mut *self.stemcells.lock().unwrap_or_else(|e| e.into_inner()));
        for vm in &vms {
            let _ = self.t.runner.call("delete_vm", json!([vm]));
        }
        for disk in &disks {
            let _ = self.t.runner.call("delete_disk", json!([disk]));
        }
        for sc in &stemcells {
            let _ = self.t.runner.call("delete_stemcell", json!([sc]));
        }
        self.t.remove_networks();
    }
}

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

/// The settings file inside a VM, read until it parses (a reader can catch a write
/// half-way on some runtimes; the file itself is replaced whole).
fn settings_in_vm(t: &Target, vm: &str) -> Value {
    let mut last = String::new();
    for _ in 0..5 {
        last = exec(t, vm, "cat /var/vcap/bosh/warden-cpi-agent-env.json");
        if let Ok(v) = serde_json::from_str::<Value>(&last) {
            return v;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!("the settings file in {vm} is not JSON: {last}");
}

/// The persistent disks a settings document lists.
fn persistent_disks(settings: &Value) -> BTreeSet<String> {
    settings["disks"]["persistent"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// Runs `f(i)` for `i in 0..n` on `n` threads at once (released together by a
/// barrier) and returns the results in order. A panic in a thread fails the test.
fn in_parallel<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let barrier = std::sync::Barrier::new(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let f = &f;
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    f(i)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

fn import_stemcell(t: &Target, made: &Made<'_>, dir: &std::path::Path) -> String {
    let sc = TestStemcell::builder().build_unpacked(dir.join("stemcell"));
    let cid = t
        .ok("create_stemcell", json!([sc.image_path, {}]))
        .as_str()
        .expect("stemcell cid")
        .to_owned();
    made.stemcell(&cid);
    cid
}

fn dynamic_network(t: &Target) -> Value {
    let base = t.manual_network(1)["cloud_properties"]["name"]
        .as_str()
        .unwrap_or("x")
        .to_owned();
    json!({
        "type": "dynamic",
        "dns": ["1.1.1.1"],
        "cloud_properties": {"name": format!("{base}-dyn"), "subnet": format!("{}.0/24", t.dynamic_prefix)},
    })
}

/// The IPv4 addresses (without prefix) that `ip -o -4 addr` lists inside a VM.
fn addresses_in_vm(t: &Target, vm: &str) -> BTreeSet<String> {
    exec(t, vm, "ip -o -4 addr show")
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            f.position(|w| w == "inet")?;
            f.next()?.split('/').next().map(str::to_owned)
        })
        .collect()
}

fn parallel_create_and_delete(kind: BackendKind, label: &str) {
    let t = Target::new(kind, label);
    let made = Made::new(&t);
    let scratch = tempfile::Builder::new()
        .prefix("cpi-concurrency-")
        .tempdir()
        .expect("tmp");
    let stemcell = import_stemcell(&t, &made, scratch.path());
    let dynamic = dynamic_network(&t);

    let start = Instant::now();
    let created = in_parallel(PARALLEL_VMS, |i| {
        let manual = t.manual_network(100 + i as u8);
        let resp = t.call(
            "create_vm",
            json!([format!("agent-par-{i}"), stemcell, {}, {"a-manual": manual, "b-dynamic": dynamic}, [], t.env()]),
        );
        if resp.is_ok() {
            made.vm(&vm_cid(&resp.result));
        }
        (manual["ip"].as_str().unwrap_or_default().to_owned(), resp)
    });
    let create_secs = start.elapsed().as_secs_f64();
    let failed: Vec<String> = created
        .iter()
        .filter(|(_, r)| !r.is_ok())
        .map(|(ip, r)| format!("VM with {ip}:\n{}", r.describe()))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {PARALLEL_VMS} parallel create_vm failed:\n{}",
        failed.len(),
        failed.join("\n\n")
    );

    let mut vms = Vec::new();
    let mut dynamic_ips = BTreeMap::new();
    for (manual_ip, resp) in &created {
        let vm = vm_cid(&resp.result);
        assert_eq!(
            resp.result[1]["a-manual"]["ip"], *manual_ip,
            "{vm}: v2 echo of the manual network"
        );
        let assigned = resp.result[1]["b-dynamic"]["ip"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            assigned.parse::<std::net::Ipv4Addr>().is_ok(),
            "{vm}: no dynamic address reported: {}",
            resp.result
        );
        if let Some(other) = dynamic_ips.insert(assigned.clone(), vm.clone()) {
            panic!("dynamic address {assigned} was given to both {other} and {vm}");
        }
        let inside = addresses_in_vm(&t, &vm);
        assert!(
            inside.contains(manual_ip) && inside.contains(&assigned),
            "{vm} should have {manual_ip} and {assigned}; it has {inside:?}"
        );
        let settings = settings_in_vm(&t, &vm);
        assert_eq!(settings["vm"]["name"], vm.as_str());
        assert_eq!(settings["networks"]["a-manual"]["ip"], manual_ip.as_str());
        assert_eq!(settings["networks"]["b-dynamic"]["ip"], assigned.as_str());
        vms.push(vm);
    }
    let distinct: BTreeSet<_> = vms.iter().collect();
    assert_eq!(distinct.len(), PARALLEL_VMS, "VM cids must be distinct");
    for vm in &vms {
        assert_eq!(t.ok("has_vm", json!([vm])), json!(true), "{vm}");
    }

    let start = Instant::now();
    let deleted = in_parallel(PARALLEL_VMS, |i| t.call("delete_vm", json!([vms[i]])));
    let delete_secs = start.elapsed().as_secs_f64();
    for (vm, resp) in vms.iter().zip(&deleted) {
        assert!(resp.is_ok(), "delete_vm {vm}:\n{}", resp.describe());
        made.forget_vm(vm);
    }
    t.ok("delete_stemcell", json!([stemcell]));
    made.forget_stemcell(&stemcell);
    t.assert_nothing_left(&vms, &[]);
    eprintln!(
        "{label}: {PARALLEL_VMS} parallel create_vm in {create_secs:.1} s, \
         {PARALLEL_VMS} parallel delete_vm in {delete_secs:.1} s; {} distinct dynamic addresses",
        dynamic_ips.len()
    );
}

fn parallel_create_stemcell(kind: BackendKind, label: &str) {
    let t = Target::new(kind, label);
    let made = Made::new(&t);
    let scratch = tempfile::Builder::new()
        .prefix("cpi-concurrency-")
        .tempdir()
        .expect("tmp");
    let sc = TestStemcell::builder().build_unpacked(scratch.path().join("stemcell"));
    let results = in_parallel(PARALLEL_STEMCELLS, |_| {
        let resp = t.call("create_stemcell", json!([sc.image_path, {}]));
        if let Some(cid) = resp.result.as_str().filter(|_| resp.is_ok()) {
            made.stemcell(cid);
        }
        resp
    });
    let mut cids = Vec::new();
    for resp in &results {
        assert!(
            resp.is_ok(),
            "a parallel create_stemcell failed:\n{}",
            resp.describe()
        );
        cids.push(resp.result.as_str().expect("stemcell cid").to_owned());
    }
    let distinct: BTreeSet<String> = cids.iter().cloned().collect();
    eprintln!(
        "{label}: {PARALLEL_STEMCELLS} parallel create_stemcell gave {} distinct cids",
        distinct.len()
    );

    // Delete the first half of the cids; every other cid must still make VMs.
    let (gone, kept) = cids.split_at(PARALLEL_STEMCELLS / 2);
    for cid in gone {
        t.ok("delete_stemcell", json!([cid]));
    }
    let kept: Vec<&String> = kept.iter().filter(|c| !gone.contains(c)).collect();
    for (i, cid) in kept.iter().enumerate() {
        let resp = t.call(
            "create_vm",
            json!([format!("agent-sc-{i}"), cid, {}, {"default": t.manual_network(40 + i as u8)}, [], t.env()]),
        );
        assert!(
            resp.is_ok(),
            "stemcell {cid} (imported in parallel with {gone:?}, which were deleted) no longer makes VMs:\n{}",
            resp.describe()
        );
        let vm = vm_cid(&resp.result);
        made.vm(&vm);
        t.ok("delete_vm", json!([vm]));
        made.forget_vm(&vm);
    }
    for cid in &cids {
        // Deleting a cid twice (when imports gave one cid) is success, as for any
        // missing stemcell.
        t.ok("delete_stemcell", json!([cid]));
        made.forget_stemcell(cid);
    }
    t.assert_nothing_left(&[], &[]);
    t.remove_networks();
}

fn parallel_attach_detach(kind: BackendKind, label: &str) {
    let t = Target::new(kind, label);
    let made = Made::new(&t);
    let scratch = tempfile::Builder::new()
        .prefix("cpi-concurrency-")
        .tempdir()
        .expect("tmp");
    let stemcell = import_stemcell(&t, &made, scratch.path());
    let vms = in_parallel(PARALLEL_ATTACH, |i| {
        let vm = vm_cid(&t.ok(
            "create_vm",
            json!([format!("agent-att-{i}"), stemcell, {}, {"default": t.manual_network(50 + i as u8)}, [], t.env()]),
        ));
        made.vm(&vm);
        vm
    });
    let disks: Vec<String> = vms
        .iter()
        .map(|vm| {
            let d = t
                .ok("create_disk", json!([64, {}, vm]))
                .as_str()
                .expect("disk cid")
                .to_owned();
            made.disk(&d);
            d
        })
        .collect();

    // Attach disk i to VM i, all at once.
    let attached = in_parallel(PARALLEL_ATTACH, |i| {
        t.call("attach_disk", json!([vms[i], disks[i]]))
    });
    for (i, resp) in attached.iter().enumerate() {
        assert!(
            resp.is_ok(),
            "attach_disk {} to {}:\n{}",
            disks[i],
            vms[i],
            resp.describe()
        );
    }
    for (vm, disk) in vms.iter().zip(&disks) {
        let listed = persistent_disks(&settings_in_vm(&t, vm));
        assert_eq!(
            listed,
            BTreeSet::from([disk.clone()]),
            "VM {vm}'s settings must list exactly its own disk {disk}"
        );
        assert_eq!(t.ok("get_disks", json!([vm])), json!([disk]), "{vm}");
        exec(
            &t,
            vm,
            &format!("echo {disk} > /warden-cpi-dev/{disk}/owner && sync"),
        );
    }

    // One disk, two VMs, at once: exactly one attach wins and the disk is on that VM
    // only. Several rounds, as a race may need a few tries to show.
    let spare = t
        .ok("create_disk", json!([64, {}, null]))
        .as_str()
        .expect("disk cid")
        .to_owned();
    made.disk(&spare);
    for round in 0..RACE_ROUNDS {
        let pair = [round % PARALLEL_ATTACH, (round + 1) % PARALLEL_ATTACH];
        let race = in_parallel(2, |i| t.call("attach_disk", json!([vms[pair[i]], spare])));
        let winners: Vec<usize> = (0..2).filter(|i| race[*i].is_ok()).collect();
        let on: Vec<usize> = (0..2)
            .filter(|i| {
                t.ok("get_disks", json!([vms[pair[*i]]]))
                    .as_array()
                    .is_some_and(|a| a.contains(&json!(spare)))
            })
            .collect();
        assert!(
            winners.len() == 1 && on == winners,
            "round {round}: attaching disk {spare} to two VMs at once: {} attaches succeeded, \
             the disk is on {on:?}\n{}\n{}",
            winners.len(),
            race[0].describe(),
            race[1].describe()
        );
        let loser = 1 - winners[0];
        let msg = race[loser]
            .error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_default();
        assert!(
            msg.contains(spare.as_str()),
            "the losing attach must name the disk: {msg}"
        );
        let winner_vm = &vms[pair[winners[0]]];
        t.ok("detach_disk", json!([winner_vm, spare]));
        assert_eq!(
            persistent_disks(&settings_in_vm(&t, &vms[pair[loser]])),
            BTreeSet::from([disks[pair[loser]].clone()]),
            "the losing VM's settings must still list only its own disk"
        );
    }

    // Two more disks onto one VM at once: its settings must list all three.
    let extra: Vec<String> = (0..2)
        .map(|_| {
            let d = t
                .ok("create_disk", json!([64, {}, null]))
                .as_str()
                .expect("disk cid")
                .to_owned();
            made.disk(&d);
            d
        })
        .collect();
    let both = in_parallel(2, |i| t.call("attach_disk", json!([vms[0], extra[i]])));
    for (d, resp) in extra.iter().zip(&both) {
        assert!(resp.is_ok(), "attach_disk {d}:\n{}", resp.describe());
    }
    assert_eq!(
        persistent_disks(&settings_in_vm(&t, &vms[0])),
        BTreeSet::from([disks[0].clone(), extra[0].clone(), extra[1].clone()]),
        "two attaches to one VM at once: an update of its settings was lost"
    );
    let both = in_parallel(2, |i| t.call("detach_disk", json!([vms[0], extra[i]])));
    for (d, resp) in extra.iter().zip(&both) {
        assert!(resp.is_ok(), "detach_disk {d}:\n{}", resp.describe());
    }
    assert_eq!(
        persistent_disks(&settings_in_vm(&t, &vms[0])),
        BTreeSet::from([disks[0].clone()]),
        "two detaches from one VM at once: an update of its settings was lost"
    );

    // Detach all at once.
    let detached = in_parallel(PARALLEL_ATTACH, |i| {
        t.call("detach_disk", json!([vms[i], disks[i]]))
    });
    for (i, resp) in detached.iter().enumerate() {
        assert!(
            resp.is_ok(),
            "detach_disk {} from {}:\n{}",
            disks[i],
            vms[i],
            resp.describe()
        );
    }
    for vm in &vms {
        let listed = persistent_disks(&settings_in_vm(&t, vm));
        assert!(
            listed.is_empty(),
            "VM {vm}'s settings still list {listed:?}"
        );
        assert_eq!(t.ok("get_disks", json!([vm])), json!([]), "{vm}");
    }

    // Each disk kept its own data: attach disk i to VM (i+1) at once, read the owner.
    let moved = in_parallel(PARALLEL_ATTACH, |i| {
        t.call(
            "attach_disk",
            json!([vms[(i + 1) % PARALLEL_ATTACH], disks[i]]),
        )
    });
    for (i, resp) in moved.iter().enumerate() {
        assert!(resp.is_ok(), "re-attach {}:\n{}", disks[i], resp.describe());
        let vm = &vms[(i + 1) % PARALLEL_ATTACH];
        assert_eq!(
            exec(&t, vm, &format!("cat /warden-cpi-dev/{}/owner", disks[i])).trim(),
            disks[i]
        );
        assert_eq!(
            persistent_disks(&settings_in_vm(&t, vm)),
            BTreeSet::from([disks[i].clone()])
        );
    }

    let deleted = in_parallel(PARALLEL_ATTACH, |i| t.call("delete_vm", json!([vms[i]])));
    for (vm, resp) in vms.iter().zip(&deleted) {
        assert!(resp.is_ok(), "delete_vm {vm}:\n{}", resp.describe());
        made.forget_vm(vm);
    }
    let mut all_disks = disks.clone();
    all_disks.push(spare);
    all_disks.extend(extra);
    for d in &all_disks {
        t.ok("delete_disk", json!([d]));
    }
    made.disks.lock().expect("lock").clear();
    t.ok("delete_stemcell", json!([stemcell]));
    made.forget_stemcell(&stemcell);
    t.assert_nothing_left(&vms, &all_disks);
    eprintln!(
        "{label}: {PARALLEL_ATTACH} parallel attaches, {RACE_ROUNDS} rounds of 2 VMs racing \
         for one disk, 2 disks onto one VM at once, {PARALLEL_ATTACH} parallel detaches and \
         re-attaches: no lost settings update, no disk on two VMs"
    );
}

fn same_ip_at_once(kind: BackendKind, label: &str) {
    let t = Target::new(kind, label);
    let made = Made::new(&t);
    let scratch = tempfile::Builder::new()
        .prefix("cpi-concurrency-")
        .tempdir()
        .expect("tmp");
    let stemcell = import_stemcell(&t, &made, scratch.path());
    let wanted = t.manual_network(60);
    let ip = wanted["ip"].as_str().expect("ip").to_owned();
    let results: Vec<CpiResponse> = in_parallel(SAME_IP_RACERS, |i| {
        let resp = t.call(
            "create_vm",
            json!([format!("agent-ip-{i}"), stemcell, {}, {"default": wanted}, [], t.env()]),
        );
        if resp.is_ok() {
            made.vm(&vm_cid(&resp.result));
        }
        resp
    });
    let winners: Vec<&CpiResponse> = results.iter().filter(|r| r.is_ok()).collect();
    let holders: Vec<String> = winners
        .iter()
        .map(|r| vm_cid(&r.result))
        .filter(|vm| addresses_in_vm(&t, vm).contains(&ip))
        .collect();
    assert!(
        winners.len() == 1 && holders.len() == 1,
        "{SAME_IP_RACERS} create_vm asking for {ip} at once: {} succeeded, {} VMs hold the address:\n{}",
        winners.len(),
        holders.len(),
        results
            .iter()
            .map(CpiResponse::describe)
            .collect::<Vec<_>>()
            .join("\n\n")
    );
    for r in results.iter().filter(|r| !r.is_ok()) {
        let e = r.error.as_ref().expect("an error");
        assert!(
            e.message.contains(&ip)
                || e.message.to_lowercase().contains("address already in use")
                || e.message.contains("in use"),
            "a create_vm that lost the race for {ip} must say why: {}: {}",
            e.type_,
            e.message
        );
    }
    let vm = holders[0].clone();
    t.ok("delete_vm", json!([vm]));
    made.forget_vm(&vm);
    t.ok("delete_stemcell", json!([stemcell]));
    made.forget_stemcell(&stemcell);
    t.assert_nothing_left(&[vm], &[]);
    let refusal = results
        .iter()
        .find_map(|r| r.error.as_ref())
        .map(|e| format!("{}: {}", e.type_, e.message))
        .unwrap_or_default();
    eprintln!(
        "{label}: {SAME_IP_RACERS} create_vm racing for {ip}: one won, {} refused, e.g. {refusal}",
        SAME_IP_RACERS - 1
    );
}

#[test]
fn parallel_create_and_delete_docker() {
    parallel_create_and_delete(BackendKind::Docker, "conc-vms-docker");
}

#[test]
fn parallel_create_and_delete_containerd() {
    parallel_create_and_delete(BackendKind::Containerd, "conc-vms-ctrd");
}

#[test]
fn parallel_create_stemcell_docker() {
    parallel_create_stemcell(BackendKind::Docker, "conc-sc-docker");
}

#[test]
fn parallel_create_stemcell_containerd() {
    parallel_create_stemcell(BackendKind::Containerd, "conc-sc-ctrd");
}

#[test]
fn parallel_attach_detach_docker() {
    parallel_attach_detach(BackendKind::Docker, "conc-att-docker");
}

#[test]
fn parallel_attach_detach_containerd() {
    parallel_attach_detach(BackendKind::Containerd, "conc-att-ctrd");
}

#[test]
fn same_ip_at_once_docker() {
    same_ip_at_once(BackendKind::Docker, "conc-ip-docker");
}

#[test]
fn same_ip_at_once_containerd() {
    same_ip_at_once(BackendKind::Containerd, "conc-ip-ctrd");
}
