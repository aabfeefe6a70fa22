//! The command line: `--version`, `--help`, the config flag spellings, `info` without
//! a daemon, and the exit status when no response can be written.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::json;

use common::{bin, fake_config, request, run_with, write_json, MBUS};

const INFO: &[u8] =
    b"{\"method\":\"info\",\"arguments\":[],\"context\":{\"director_uuid\":\"x\"}}\n";

#[test]
fn version_and_help_print_to_stdout_and_exit_0() {
    for flag in ["--version", "-version"] {
        let out = run_with(&[flag], b"", &[]);
        assert_eq!(out.code, Some(0), "{}", out.describe());
        assert!(out.stdout.starts_with("cpi 0."), "{}", out.describe());
        assert!(out.stderr.is_empty(), "{}", out.describe());
    }
    for flag in ["--help", "-h"] {
        let out = run_with(&[flag], b"", &[]);
        assert_eq!(out.code, Some(0), "{}", out.describe());
        assert!(
            out.stdout.contains("-configPath FILE"),
            "{}",
            out.describe()
        );
        assert!(out.stdout.contains("CPI_LOG"), "{}", out.describe());
    }
}

#[test]
fn every_config_flag_spelling_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = fake_config(dir.path());
    let path = config.display().to_string();
    let eq = format!("-configPath={path}");
    let long_eq = format!("--config={path}");
    for args in [
        vec!["-configPath", path.as_str()],
        vec![eq.as_str()],
        vec!["--config", path.as_str()],
        vec![long_eq.as_str()],
    ] {
        let out = run_with(&args, INFO, &[]);
        let result = out.ok();
        assert_eq!(result["api_version"], 2, "{args:?}\n{}", out.describe());
    }
}

#[test]
fn info_on_docker_needs_no_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_json(
        dir.path(),
        "cpi.json",
        &json!({"backend": "docker", "agent": {"mbus": MBUS},
                "docker": {"host": "unix:///nonexistent/docker.sock"}}),
    );
    let out = run_with(
        &[std::ffi::OsStr::new("-configPath"), config.as_os_str()],
        INFO,
        &[],
    );
    let result = out.ok();
    assert_eq!(result["api_version"], 2, "{}", out.describe());
    assert!(result["stemcell_formats"].is_array(), "{}", out.describe());

    // The README's command, with the shipped sample config.
    let sample = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs/examples/sample-config.json");
    let out = run_with(
        &[std::ffi::OsStr::new("-configPath"), sample.as_os_str()],
        INFO,
        &[],
    );
    assert_eq!(out.ok()["api_version"], 2, "{}", out.describe());
}

#[test]
fn info_on_containerd_needs_no_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_json(
        dir.path(),
        "cpi.json",
        &json!({"backend": "containerd", "agent": {"mbus": MBUS},
                "containerd": {"socket": "/nonexistent/containerd.sock"}}),
    );
    let out = run_with(
        &[std::ffi::OsStr::new("-configPath"), config.as_os_str()],
        INFO,
        &[],
    );
    assert_eq!(out.ok()["api_version"], 2, "{}", out.describe());
}

#[test]
fn api_v1_and_v2_result_shapes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = fake_config(dir.path());
    let image = common::stemcell(dir.path());
    let sc = common::call(&config, &request("create_stemcell", json!([image, {}]))).ok();
    let nets = json!({"d": {"type": "dynamic"}});
    let mut v1 = request("create_vm", json!(["a1", sc, {}, nets, [], {}]));
    v1.as_object_mut().expect("obj").remove("api_version");
    let cid = common::call(&config, &v1).ok();
    assert!(cid.is_string(), "v1 create_vm answers the cid alone: {cid}");
    let v2 = common::call(
        &config,
        &request("create_vm", json!(["a2", sc, {}, nets, [], {}])),
    )
    .ok();
    assert!(v2[0].is_string());
    assert!(
        v2[1]["d"]["ip"]
            .as_str()
            .is_some_and(|ip| ip.starts_with("10.254.")),
        "dynamic networks get an address: {v2}"
    );
}

#[test]
fn exit_status_is_non_zero_only_when_no_response_could_be_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = fake_config(dir.path());
    let mut child = Command::new(bin())
        .arg("-configPath")
        .arg(&config)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Close our end of stdout before the CPI has read its request, so its write fails.
    drop(child.stdout.take());
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(INFO).expect("write");
    drop(stdin);
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot write the response"),
        "{out:?}"
    );
}

#[test]
fn concurrent_processes_share_the_fake_state_safely() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = fake_config(dir.path());
    let handles: Vec<_> = (0..6)
        .map(|_| {
            let config = config.clone();
            std::thread::spawn(move || {
                common::call(&config, &request("create_disk", json!([10, {}, null]))).ok()
            })
        })
        .collect();
    let cids: std::collections::BTreeSet<String> = handles
        .into_iter()
        .map(|h| h.join().expect("join").as_str().expect("cid").to_owned())
        .collect();
    assert_eq!(cids.len(), 6);
    for cid in &cids {
        assert_eq!(
            common::call(&config, &request("has_disk", json!([cid]))).ok(),
            true
        );
    }
}
