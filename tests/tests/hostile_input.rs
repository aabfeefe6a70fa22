//! Hostile and wrong input through the real `cpi` binary, on every backend.
//!
//! Cids that try to escape paths or inject into names and command lines, sizes that
//! are zero, negative or absurd, networks that do not add up, stemcells whose
//! manifest is missing, huge, binary or not YAML, images that are a directory or
//! `/dev/zero`, and light stemcells with malformed references and digests. Each must
//! answer a clear, typed error (or, for a cid that is merely unknown, the ordinary
//! not-found answer), exit 0, and leave nothing behind: no object labelled with the
//! run's director uuid, no new container, volume or image on the daemon, no new
//! file beside the state directory, and no shell command run.
#![allow(
    clippy::print_stderr,
    reason = "a test reports its counts and timings on stderr, shown with --nocapture"
)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cpi_tests::conformance::{BackendKind, Target, CONTAINERD_TEST_NAMESPACE};
use cpi_tests::daemons::{ctr, docker};
use cpi_tests::runner::CpiResponse;
use cpi_tests::TestStemcell;
use serde_json::{json, Value};

/// A file a shell-injected cid would create if any code path ran it through a shell.
const PWNED: &str = "/tmp/cpi-hostile-pwned";

/// Cids that must never reach a path, a daemon object name or a command line as is.
fn hostile_cids() -> Vec<String> {
    vec![
        "../../etc".into(),
        "a/../../b".into(),
        "..".into(),
        "/etc/passwd".into(),
        "vol-x;rm -rf /".into(),
        "c-1 --privileged".into(),
        "-rf".into(),
        format!("$(touch${{IFS}}{PWNED})"),
        format!("`touch${{IFS}}{PWNED}`"),
        "c-1\nc-2".into(),
        "c-\0x".into(),
        "ünïcødé-☃-vm".into(),
        "x".repeat(300),
        "y".repeat(255),
        "c-1%2f..%2f..%2fetc".into(),
        "name@sha256:../../x".into(),
    ]
}

/// The error types a well-formed but unknown cid may be answered with
/// (`resize_disk` is `NotSupported` on backends that cannot resize).
const CLEAR_ERRORS: [&str; 5] = [
    "Bosh::Clouds::CpiError",
    "Bosh::Clouds::VMNotFound",
    "Bosh::Clouds::DiskNotFound",
    "Bosh::Clouds::CloudError",
    "Bosh::Clouds::NotSupported",
];

/// Asserts the call answered well-formed JSON and exit 0, and returns it.
fn answered(resp: CpiResponse, what: &str) -> CpiResponse {
    assert_eq!(
        resp.exit_code,
        0,
        "{what}: non-zero exit\n{}",
        resp.describe()
    );
    assert!(
        resp.response.is_some(),
        "{what}: no JSON response\n{}",
        resp.describe()
    );
    assert!(
        resp.stdout.len() < 64 * 1024,
        "{what}: a {}-byte response echoes the input",
        resp.stdout.len()
    );
    resp
}

/// Calls and asserts a typed error from `allowed`.
fn refused(t: &Target, method: &str, args: Value, allowed: &[&str]) -> String {
    let what = format!("{method} {}", short(&args));
    let resp = answered(t.call(method, args), &what);
    let Some(e) = &resp.error else {
        panic!(
            "{what} must fail, got result {}\n{}",
            resp.result,
            resp.describe()
        );
    };
    assert!(
        allowed.contains(&e.type_.as_str()),
        "{what}: error type {} is not one of {allowed:?}: {}",
        e.type_,
        e.message
    );
    assert!(!e.message.trim().is_empty(), "{what}: empty message");
    e.message.clone()
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 120 {
        format!("{}...", s.chars().take(120).collect::<String>())
    } else {
        s
    }
}

/// Whether a cid should be refused by validation (as opposed to merely not found).
fn invalid_cid(cid: &str) -> bool {
    cid.is_empty()
        || cid.len() > 255
        || cid.chars().any(|c| c.is_control() || c.is_whitespace())
        || cid == "."
        || cid.split('/').any(|p| p == "..")
        || cid.starts_with('/')
        || cid.starts_with('-')
}

/// Every object of ours on the daemon, one line each (id and labels), to diff.
fn inventory(t: &Target) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut add = |kind: &str, text: String| {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            out.insert(format!("{kind} {line}"));
        }
    };
    match t.kind {
        BackendKind::Fake => {}
        BackendKind::Docker => {
            add(
                "container",
                docker(&[
                    "ps",
                    "-a",
                    "--no-trunc",
                    "--format",
                    "{{.ID}} {{.Names}} {{.Labels}}",
                ])
                .expect_success(),
            );
            add(
                "volume",
                docker(&["volume", "ls", "--format", "{{.Name}} {{.Labels}}"]).expect_success(),
            );
            add(
                "image",
                docker(&[
                    "images",
                    "-a",
                    "--no-trunc",
                    "--format",
                    "{{.ID}} {{.Repository}}:{{.Tag}}",
                ])
                .expect_success(),
            );
        }
        BackendKind::Containerd => {
            for what in ["containers", "images"] {
                add(
                    what,
                    ctr(CONTAINERD_TEST_NAMESPACE, &[what, "ls", "-q"]).expect_success(),
                );
            }
        }
    }
    out
}

/// New daemon objects that are not another concurrent run's (those carry a different
/// director uuid label or a different run's name).
fn new_objects(t: &Target, before: &BTreeSet<String>) -> Vec<String> {
    inventory(t)
        .difference(before)
        .filter(|line| {
            let foreign_label = line.contains("director-uuid=") && !line.contains(&t.director_uuid);
            let labels = if line.starts_with("image ") && t.kind == BackendKind::Docker {
                let id = line.split(' ').nth(1).unwrap_or("");
                docker(&["image", "inspect", "-f", "{{json .Config.Labels}}", id]).stdout
            } else if t.kind == BackendKind::Containerd {
                let id = line.split(' ').nth(1).unwrap_or("");
                let sub = if line.starts_with("containers ") {
                    "containers"
                } else {
                    "images"
                };
                ctr(CONTAINERD_TEST_NAMESPACE, &[sub, "info", id]).stdout
            } else {
                String::new()
            };
            let foreign_inspected =
                labels.contains("director-uuid") && !labels.contains(&t.director_uuid);
            !(foreign_label || foreign_inspected)
        })
        .cloned()
        .collect()
}

/// Entries of the state directory and its parents, to prove no cid made a path.
fn state_paths(t: &Target) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let root = &t.state_dir;
    for dir in [
        root.clone(),
        root.join("vms"),
        root.join("disks"),
        root.parent().map(Path::to_path_buf).unwrap_or_default(),
        PathBuf::from("/var/lib"),
        PathBuf::from("/"),
    ] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            out.extend(entries.flatten().map(|e| e.path()));
        }
    }
    out
}

/// Runs a raw request with a hard deadline, so that an import reading `/dev/zero`
/// cannot hang the suite: returns `None` when the deadline passed (after killing).
fn call_with_deadline(
    t: &Target,
    method: &str,
    args: Value,
    deadline: Duration,
) -> Option<CpiResponse> {
    let req = json!({"method": method, "arguments": args, "context": {"director_uuid": t.director_uuid, "request_id": "hostile"}, "api_version": 2});
    let mut child = Command::new(&t.runner.bin)
        .arg("-configPath")
        .arg(&t.runner.config)
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .env("TMPDIR", "/tmp")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cpi");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(req.to_string().as_bytes())
        .expect("write request");
    drop(stdin);
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_thread = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let err_thread = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    let status = status?;
    let text = String::from_utf8_lossy(&stdout).into_owned();
    let response = serde_json::from_str::<Value>(text.trim()).ok();
    let error = response
        .as_ref()
        .and_then(|r| r.get("error"))
        .filter(|e| !e.is_null())
        .and_then(|e| serde_json::from_value(e.clone()).ok());
    Some(CpiResponse {
        result: response
            .as_ref()
            .and_then(|r| r.get("result").cloned())
            .unwrap_or(Value::Null),
        error,
        log: String::new(),
        response,
        stdout: text,
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        exit_code: status.code().unwrap_or(-1),
        elapsed: start.elapsed(),
    })
}

/// Hostile cids on every method that takes one.
fn hostile_cids_are_refused(t: &Target, stemcell: &str) {
    for cid in hostile_cids() {
        let invalid = invalid_cid(&cid);
        let expect = |method: &str, args: Value, not_found: Option<Value>| {
            let what = format!("{method} {}", short(&args));
            let resp = answered(t.call(method, args), &what);
            match (&resp.error, invalid) {
                (Some(e), true) => assert_eq!(
                    e.type_, "Bosh::Clouds::CpiError",
                    "{what}: an invalid cid must be a CpiError, got {}: {}",
                    e.type_, e.message
                ),
                (Some(e), false) => assert!(
                    CLEAR_ERRORS.contains(&e.type_.as_str()),
                    "{what}: {}: {}",
                    e.type_,
                    e.message
                ),
                (None, true) => panic!("{what}: an invalid cid was accepted: {}", resp.result),
                (None, false) => assert_eq!(
                    Some(&resp.result),
                    not_found.as_ref(),
                    "{what}: a cid that names nothing must answer not-found"
                ),
            }
        };
        expect("has_vm", json!([cid]), Some(json!(false)));
        expect("delete_vm", json!([cid]), Some(Value::Null));
        expect("reboot_vm", json!([cid]), None);
        expect("get_disks", json!([cid]), None);
        expect("set_vm_metadata", json!([cid, {"name": "x"}]), None);
        expect("has_disk", json!([cid]), Some(json!(false)));
        expect("delete_disk", json!([cid]), Some(Value::Null));
        expect("set_disk_metadata", json!([cid, {"name": "x"}]), None);
        expect("resize_disk", json!([cid, 2048]), None);
        expect("attach_disk", json!([cid, cid]), None);
        expect("detach_disk", json!([cid, cid]), None);
        expect("delete_stemcell", json!([cid]), Some(Value::Null));
        // Creating from a hostile stemcell cid or next to a hostile VM cid.
        let resp = answered(
            t.call(
                "create_vm",
                json!(["agent-h", cid, {}, {"default": t.manual_network(40)}, [], {}]),
            ),
            "create_vm from a hostile stemcell cid",
        );
        assert!(
            !resp.is_ok(),
            "create_vm from stemcell {cid:?} succeeded:\n{}",
            resp.describe()
        );
        let resp = answered(
            t.call(
                "create_vm",
                json!([cid, stemcell, {}, {"default": t.manual_network(41)}, [], {}]),
            ),
            "create_vm with a hostile agent id",
        );
        assert!(
            !resp.is_ok() || !invalid,
            "create_vm with agent id {cid:?} succeeded:\n{}",
            resp.describe()
        );
        if resp.is_ok() {
            // A unicode or long agent id is legal; the VM must then be deletable.
            let vm = resp.result[0].as_str().unwrap_or_default().to_owned();
            t.ok("delete_vm", json!([vm]));
        }
        let resp = answered(
            t.call("create_disk", json!([64, {}, cid])),
            "create_disk near a hostile VM",
        );
        if resp.is_ok() {
            let disk = resp.result.as_str().unwrap_or_default().to_owned();
            assert!(!invalid, "create_disk near {cid:?} accepted an invalid cid");
            t.ok("delete_disk", json!([disk]));
        }
    }
    assert!(
        !Path::new(PWNED).exists(),
        "a cid was run through a shell: {PWNED} exists"
    );
}

/// Disk sizes that are zero, negative, fractional, absurd or not numbers.
fn bad_sizes_are_refused(t: &Target) {
    let sizes = [
        json!(0),
        json!(-1),
        json!(-9223372036854775807_i64),
        json!(1.5),
        json!(1e30),
        json!(9223372036854775808_u64),
        json!(u64::MAX),
        json!("1024"),
        json!(null),
        json!([1024]),
    ];
    for size in &sizes {
        refused(
            t,
            "create_disk",
            json!([size, {}, null]),
            &["Bosh::Clouds::CpiError"],
        );
        refused(
            t,
            "resize_disk",
            json!(["vol-00000000-0000-4000-8000-000000000000", size]),
            &["Bosh::Clouds::CpiError"],
        );
    }
    for res in [
        json!({"ram": -1, "cpu": 1, "ephemeral_disk_size": 1024}),
        json!({"ram": 1e30, "cpu": 1, "ephemeral_disk_size": 1024}),
        json!({"ram": 512, "cpu": "many", "ephemeral_disk_size": 1024}),
        json!("big"),
    ] {
        refused(
            t,
            "calculate_vm_cloud_properties",
            json!([res]),
            &["Bosh::Clouds::CpiError"],
        );
    }
}

/// Networks that do not add up are refused before anything is created.
fn bad_networks_are_refused(t: &Target, stemcell: &str) {
    let base = t.manual_network(50);
    let with = |k: &str, v: Value| {
        let mut n = base.clone();
        n[k] = v;
        n
    };
    let p = &t.subnet_prefix;
    let nets = vec![
        with("gateway", json!("192.0.2.1")),
        with("gateway", json!(format!("{p}.50"))),
        with("ip", json!(format!("{p}.0"))),
        with("ip", json!(format!("{p}.255"))),
        with("ip", json!("10.0.0.300")),
        with("ip", json!("fe80::1")),
        with("netmask", json!("255.0.255.0")),
        with("netmask", json!("300.0.0.0")),
        with("netmask", json!("/33")),
        with("netmask", json!("abc")),
        with("netmask", json!("")),
        with("type", json!("ipsec")),
        with("type", json!(7)),
        with("dns", json!(["not-an-ip"])),
        with("dns", json!("1.1.1.1")),
        with("routes", json!("everywhere")),
        json!("a network"),
    ];
    for net in nets {
        refused(
            t,
            "create_vm",
            json!(["agent-net", stemcell, {}, {"default": net}, [], {}]),
            &["Bosh::Clouds::CpiError"],
        );
    }
    refused(
        t,
        "create_vm",
        json!(["agent-net", stemcell, {}, "networks", [], {}]),
        &["Bosh::Clouds::CpiError"],
    );
}

/// Stemcells with a missing, huge, binary or non-YAML manifest, or an image that is
/// a directory or `/dev/zero`, and light stemcells with malformed references.
fn bad_stemcells_are_refused(t: &Target, scratch: &Path) {
    let good = TestStemcell::builder().build_unpacked(scratch.join("good"));
    let stemcell_errors = ["Bosh::Clouds::CpiError", "Bosh::Clouds::CloudError"];
    let variant = |name: &str, manifest: Option<&[u8]>, image: Option<&Path>| -> PathBuf {
        let dir = scratch.join(name);
        std::fs::create_dir_all(&dir).expect("dir");
        if let Some(m) = manifest {
            std::fs::write(dir.join("stemcell.MF"), m).expect("manifest");
        }
        let image_path = dir.join("image");
        match image {
            Some(src) if src == Path::new("/dev/zero") => {
                std::os::unix::fs::symlink(src, &image_path).expect("symlink")
            }
            Some(src) => {
                std::fs::copy(src, &image_path).expect("image");
            }
            None => {}
        }
        image_path
    };
    let manifest = std::fs::read(&good.manifest_path).expect("manifest");
    let no_name = String::from_utf8_lossy(&manifest)
        .lines()
        .filter(|l| !l.starts_with("name:"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut huge = manifest.clone();
    huge.extend(std::iter::repeat_n(b'#', 3 << 20));
    let binary: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let cases: Vec<(&str, PathBuf)> = vec![
        ("no image file", variant("no-image", Some(&manifest), None)),
        (
            "no manifest",
            variant("no-manifest", None, Some(&good.image_path)),
        ),
        (
            "manifest without name",
            variant("no-name", Some(no_name.as_bytes()), Some(&good.image_path)),
        ),
        (
            "huge manifest",
            variant("huge", Some(&huge), Some(&good.image_path)),
        ),
        (
            "binary manifest",
            variant("binary", Some(&binary), Some(&good.image_path)),
        ),
        (
            "not YAML",
            variant(
                "not-yaml",
                Some(b"{{{ [ : this is : not yaml"),
                Some(&good.image_path),
            ),
        ),
        (
            "YAML list",
            variant("yaml-list", Some(b"- a\n- b\n"), Some(&good.image_path)),
        ),
        (
            "image is text",
            variant("text-image", Some(&manifest), Some(&good.manifest_path)),
        ),
        ("image is a directory", {
            let dir = scratch.join("dir-image");
            std::fs::create_dir_all(dir.join("image")).expect("dir");
            std::fs::write(dir.join("stemcell.MF"), &manifest).expect("manifest");
            dir.join("image")
        }),
        ("image path is a directory", scratch.join("good")),
        (
            "image is /dev/zero",
            variant("dev-zero", Some(&manifest), Some(Path::new("/dev/zero"))),
        ),
        ("image path is /dev/zero", PathBuf::from("/dev/zero")),
        ("relative path", PathBuf::from("../../etc/passwd")),
    ];
    for (what, image_path) in cases {
        let started = Instant::now();
        let resp = call_with_deadline(
            t,
            "create_stemcell",
            json!([image_path, {}]),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|| {
            panic!("create_stemcell with {what} did not answer within 30 s (it hangs)")
        });
        let resp = answered(resp, what);
        if t.kind == BackendKind::Docker && resp.is_ok() && what == "no manifest" {
            // The Docker backend imports a stemcell without stemcell.MF on purpose
            // (with a warning), as the Go Docker CPI does: not hostile, just bare.
            t.ok("delete_stemcell", json!([resp.result]));
            continue;
        }
        if t.kind == BackendKind::Fake && resp.is_ok() && what.starts_with("image is") {
            // The fake records stemcells without unpacking their images: only the
            // real backends read the image's content.
            t.ok("delete_stemcell", json!([resp.result]));
            continue;
        }
        let Some(e) = &resp.error else {
            panic!(
                "create_stemcell with {what} succeeded: {}\n{}",
                resp.result,
                resp.describe()
            );
        };
        assert!(
            stemcell_errors.contains(&e.type_.as_str()),
            "create_stemcell with {what}: {}: {}",
            e.type_,
            e.message
        );
        eprintln!(
            "create_stemcell with {what}: {} in {:?}: {}",
            e.type_,
            started.elapsed(),
            e.message
        );
    }

    // Light stemcells with malformed references and digests.
    let valid_digest = format!("sha256:{}", "0".repeat(64));
    let light = [
        ("../../etc/passwd", Some(valid_digest.clone())),
        ("/abs/path", Some(valid_digest.clone())),
        ("UPPER/Case:tag", Some(valid_digest.clone())),
        ("ref with space", Some(valid_digest.clone())),
        ("127.0.0.1:1/none/busybox:1", Some("sha256:zz".to_owned())),
        ("127.0.0.1:1/none/busybox:1", Some("md5:abc".to_owned())),
        (
            "127.0.0.1:1/none/busybox:1",
            Some(format!("sha256:{}", "A".repeat(64))),
        ),
        (
            "127.0.0.1:1/none/busybox:1",
            Some(format!("sha256:{}", "0".repeat(63))),
        ),
        ("127.0.0.1:1/none/busybox:1", None),
        ("127.0.0.1:1/none/busybox:1", Some(valid_digest.clone())),
    ];
    for (i, (reference, digest)) in light.iter().enumerate() {
        let sc = TestStemcell::light(*reference)
            .digest(digest.clone())
            .build_unpacked(scratch.join(format!("light-{i}")));
        let resp = call_with_deadline(
            t,
            "create_stemcell",
            json!([sc.image_path, {}]),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|| {
            panic!("light stemcell {reference} {digest:?} did not answer within 60 s")
        });
        let resp = answered(resp, reference);
        let well_formed = !reference.contains("..")
            && !reference.starts_with('/')
            && !reference.contains(' ')
            && digest.as_ref().is_none_or(|d| *d == valid_digest);
        if t.kind == BackendKind::Fake && well_formed && resp.is_ok() {
            // The fake checks the shape of a light stemcell but pulls nothing.
            t.ok("delete_stemcell", json!([resp.result]));
            continue;
        }
        let Some(e) = &resp.error else {
            panic!(
                "light stemcell {reference} {digest:?} succeeded: {}",
                resp.result
            );
        };
        assert!(
            stemcell_errors.contains(&e.type_.as_str()),
            "light stemcell {reference} {digest:?}: {}: {}",
            e.type_,
            e.message
        );
    }
}

fn hostile_input(kind: BackendKind, label: &str) {
    let t = Target::new(kind, label);
    let scratch = tempfile::Builder::new()
        .prefix("cpi-hostile-")
        .tempdir()
        .expect("tmp");
    let _ = std::fs::remove_file(PWNED);
    let before = inventory(&t);
    let paths_before = state_paths(&t);

    // One real stemcell, so that the network cases would otherwise get as far as
    // creating a VM.
    let sc = TestStemcell::builder().build_unpacked(scratch.path().join("real"));
    let stemcell = t
        .ok("create_stemcell", json!([sc.image_path, {}]))
        .as_str()
        .expect("stemcell cid")
        .to_owned();
    let started = Instant::now();
    hostile_cids_are_refused(&t, &stemcell);
    bad_sizes_are_refused(&t);
    bad_networks_are_refused(&t, &stemcell);
    bad_stemcells_are_refused(&t, scratch.path());
    t.ok("delete_stemcell", json!([stemcell]));
    eprintln!("{label}: hostile cases ran in {:?}", started.elapsed());

    let left = t.leftovers(&[]);
    assert!(
        left.is_empty(),
        "hostile input left these behind:\n{}",
        left.join("\n")
    );
    let new = new_objects(&t, &before);
    assert!(
        new.is_empty(),
        "hostile input created daemon objects:\n{}",
        new.join("\n")
    );
    let paths_after = state_paths(&t);
    // Other runs may create their own per-VM directories meanwhile: look for names
    // made from the hostile cids.
    let fragments = [
        "etc",
        "passwd",
        "rm -rf",
        "privileged",
        "ünïcødé",
        "yyyyyyyy",
        "xxxxxxxx",
        "%2f",
        "pwned",
        "-rf",
    ];
    let created: Vec<_> = paths_after
        .difference(&paths_before)
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            fragments.iter().any(|f| name.contains(f))
        })
        .collect();
    assert!(
        created.is_empty(),
        "hostile input created paths: {created:?}"
    );
    assert!(!Path::new(PWNED).exists(), "a cid was run through a shell");
    t.remove_networks();
}

#[test]
fn hostile_input_fake() {
    hostile_input(BackendKind::Fake, "hostile-fake");
}

#[test]
fn hostile_input_docker() {
    hostile_input(BackendKind::Docker, "hostile-docker");
}

#[test]
fn hostile_input_containerd() {
    hostile_input(BackendKind::Containerd, "hostile-ctrd");
}
