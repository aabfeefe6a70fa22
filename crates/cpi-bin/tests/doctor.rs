//! `cpi doctor` against this machine's real daemons, through the real binary.
//!
//! The Docker and containerd runs need dockerd and containerd running (and root, for
//! the trial mounts); without them the tests fail with how to start them, never skip.
//! What the report must say is checked against what the test reads from the host
//! itself (the capability bounding set, the cgroup layout), and, on this project's CI
//! machine (cgroup v1 hybrid, no `CAP_SYS_RESOURCE`), against those facts by name.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

const HINT: &str =
    "start the daemons with `source scripts/lib.sh; start_containerd; start_dockerd` (as root)";

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn doctor(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_cpi"))
        .arg("doctor")
        .args(args)
        .output()
        .expect("run cpi doctor");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A config in a temp dir, with a state directory under
/// `/var/lib/bosh-container-cpi-test/doctor-*` that must not exist before the run.
struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    state_dir: PathBuf,
}

fn setup(name: &str, backend: &str, section: Value) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = PathBuf::from(format!(
        "/var/lib/bosh-container-cpi-test/doctor-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&state_dir);
    let mut section = section;
    section["state_dir"] = json!(state_dir);
    let config = dir.path().join("cpi.json");
    let value = json!({
        "backend": backend,
        "agent": {"mbus": "https://mbus:doctor-secret@0.0.0.0:6868"},
        backend: section,
    });
    std::fs::write(&config, value.to_string()).expect("write config");
    Setup {
        _dir: dir,
        config,
        state_dir,
    }
}

fn finding<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .find(|f| f["id"] == id)
        .unwrap_or_else(|| panic!("no finding {id} in {report:#}"))
}

/// The line of the text report for `id`.
fn line<'a>(text: &'a str, id: &str) -> &'a str {
    text.lines()
        .find(|l| l.split_whitespace().nth(1) == Some(id))
        .unwrap_or_else(|| panic!("no line for {id} in\n{text}"))
}

/// The capabilities missing from this process's bounding set, read independently.
fn missing_caps_here() -> (u64, Vec<String>) {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .expect("CapBnd");
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .expect("cap_last_cap")
        .trim()
        .parse()
        .expect("number");
    let missing = (0..=last)
        .filter(|b| mask & (1 << b) == 0)
        .map(|b| backend_docker::capabilities::CAP_NAMES[b as usize].to_owned())
        .collect();
    (mask, missing)
}

/// What every healthy run on this machine must report, text and JSON alike.
fn check_healthy_host(setup: &Setup, backend: &str, daemon_word: &str) {
    let run = doctor(&["-configPath", &setup.config.display().to_string()]);
    assert!(
        run.code.is_some(),
        "doctor died: {}\n{}",
        run.stdout,
        run.stderr
    );
    let text = &run.stdout;
    let daemon_line = line(text, "daemon");
    assert!(
        daemon_line.starts_with("ok "),
        "{daemon_line}\n{HINT}\n{text}"
    );
    assert!(daemon_line.contains(daemon_word), "{daemon_line}");
    assert_eq!(run.code, Some(0), "{text}\n{}", run.stderr);
    assert!(
        text.starts_with(&format!("cpi doctor: {backend} backend")),
        "{text}"
    );
    assert!(text.trim_end().ends_with(" ok"), "{text}");
    assert!(!text.contains("doctor-secret"), "{text}");

    let cgroup = line(text, "cgroup");
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        assert!(cgroup.contains("cgroup v2"), "{cgroup}");
    } else {
        assert!(cgroup.contains("cgroup v1"), "{cgroup}");
        if Path::new("/sys/fs/cgroup/unified").is_dir() {
            assert!(cgroup.contains("hybrid"), "{cgroup}");
        }
    }

    let (mask, missing) = missing_caps_here();
    let caps = line(text, "capabilities");
    if missing.is_empty() {
        assert!(caps.starts_with("ok "), "{caps}");
    } else {
        assert!(
            caps.contains(&format!("these are missing: {}", missing.join(", "))),
            "{caps}"
        );
    }
    if mask == 0x1fff_efff_ffff {
        // This project's CI machine.
        assert!(caps.starts_with("warn "), "{caps}");
        assert!(caps.contains("CAP_SYS_RESOURCE"), "{caps}");
    }
    assert!(line(text, "overlay").starts_with("ok "), "{text}");
    assert!(line(text, "overlay").contains("a trial overlay mount succeeded"));
    assert!(line(text, "propagation").starts_with("ok "), "{text}");
    assert!(line(text, "loop").contains("not needed"), "{text}");
    assert!(line(text, "container").starts_with("ok "), "{text}");

    // JSON: the same findings, machine-readable.
    let run = doctor(&["--json", "--config", &setup.config.display().to_string()]);
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let report: Value = serde_json::from_str(&run.stdout).expect("one JSON document");
    assert_eq!(report["backend"], backend);
    assert_eq!(report["blockers"], 0);
    for id in [
        "config",
        "daemon",
        "cgroup",
        "capabilities",
        "overlay",
        "propagation",
        "loop",
        "modules",
        "container",
    ] {
        let f = finding(&report, id);
        for key in ["summary", "fix"] {
            assert!(f[key].is_string(), "{id}.{key}: {f}");
        }
        assert!(f["details"].is_object(), "{f}");
        assert_ne!(f["status"], "blocker", "{f}");
    }
    let daemon = finding(&report, "daemon");
    assert_eq!(daemon["status"], "ok");
    assert!(
        !daemon["details"]["version"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{daemon}"
    );
    let caps = finding(&report, "capabilities");
    assert_eq!(caps["details"]["missing"], json!(missing));
    assert_eq!(finding(&report, "overlay")["details"]["trial_mount"], "ok");

    // The doctor created the state directory for its trial mounts and removed it.
    assert!(
        !setup.state_dir.exists(),
        "left behind: {}",
        setup.state_dir.display()
    );
}

#[test]
fn docker_on_this_machine() {
    let setup = setup("docker", "docker", json!({}));
    check_healthy_host(&setup, "docker", "Docker ");
    let run = doctor(&["--json", "--config", &setup.config.display().to_string()]);
    let report: Value = serde_json::from_str(&run.stdout).expect("json");
    let daemon = finding(&report, "daemon");
    assert!(
        daemon["details"]["api_version"]
            .as_str()
            .is_some_and(|v| v.starts_with("1.")),
        "{daemon}"
    );
    // No throwaway container is left.
    if let Ok(out) = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            "label=bosh-container-cpi.kind=doctor",
        ])
        .output()
    {
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "");
    }
}

#[test]
fn containerd_on_this_machine() {
    let setup = setup("containerd", "containerd", json!({}));
    check_healthy_host(&setup, "containerd", "containerd ");
    let run = doctor(&["-configPath", &setup.config.display().to_string()]);
    assert!(
        line(&run.stdout, "snapshotter").starts_with("ok "),
        "{}",
        run.stdout
    );
    assert!(
        line(&run.stdout, "cni").starts_with("ok "),
        "{}",
        run.stdout
    );
}

#[test]
fn a_missing_socket_is_a_blocker_and_exits_2() {
    for (backend, section) in [
        (
            "docker",
            json!({"host": "unix:///nonexistent/doctor/docker.sock"}),
        ),
        (
            "containerd",
            json!({"socket": "/nonexistent/doctor/containerd.sock"}),
        ),
    ] {
        let setup = setup(&format!("nosocket-{backend}"), backend, section);
        let config = setup.config.display().to_string();
        let run = doctor(&["-configPath", &config]);
        assert_eq!(run.code, Some(2), "{}\n{}", run.stdout, run.stderr);
        let daemon = line(&run.stdout, "daemon");
        assert!(daemon.starts_with("BLOCKER "), "{daemon}");
        assert!(daemon.contains("/nonexistent/doctor/"), "{daemon}");
        assert!(daemon.contains("-- fix: start "), "{daemon}");
        let run = doctor(&["-configPath", &config, "--json"]);
        assert_eq!(run.code, Some(2));
        let report: Value = serde_json::from_str(&run.stdout).expect("json");
        assert_eq!(finding(&report, "daemon")["status"], "blocker");
        assert_eq!(report["blockers"], 1, "{report:#}");
        // The host checks still ran.
        assert_eq!(finding(&report, "cgroup")["status"], "ok");
    }
}

#[test]
fn a_broken_config_is_a_blocker_and_no_config_is_host_checks_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("cpi.json");
    std::fs::write(&config, r#"{"backend": "dockr"}"#).expect("write");
    let run = doctor(&["--config", &config.display().to_string()]);
    assert_eq!(run.code, Some(2), "{}", run.stdout);
    let line = line(&run.stdout, "config");
    assert!(
        line.starts_with("BLOCKER ") && line.contains("dockr"),
        "{line}"
    );

    // A bad command line is a usage error on stderr, not a CPI response.
    let run = doctor(&["--bogus"]);
    assert_eq!(run.code, Some(64), "{}", run.stdout);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(run.stderr.contains("usage: cpi doctor"), "{}", run.stderr);

    let run = doctor(&["--json"]);
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    let report: Value = serde_json::from_str(&run.stdout).expect("json");
    assert_eq!(finding(&report, "config")["status"], "warn");
    assert!(report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .all(|f| f["id"] != "daemon"));
}
