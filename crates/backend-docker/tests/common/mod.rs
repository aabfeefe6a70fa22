//! Shared harness of the daemon tests: a backend with its own state directory and
//! director uuid (so everything a test creates carries a label naming it), a drop
//! guard that removes whatever is left, and the leftover check.

#![allow(
    dead_code,
    reason = "each test file uses a different part of the harness"
)]

use std::path::{Path, PathBuf};

use backend_docker::config::AttachMode;
use backend_docker::{DockerConfig, DockerCpi};
use cpi_core::{AgentOptions, CallContext};
use cpi_tests::daemons::{docker, require_docker};
use cpi_tests::names::unique_name;

/// One test's backend and its cleanup.
pub struct Harness {
    pub cpi: DockerCpi,
    pub ctx: CallContext,
    pub director: String,
    pub state_dir: PathBuf,
    pub work: tempfile::TempDir,
}

impl Harness {
    /// A backend against the local daemon (panics with a how-to when it is missing).
    pub fn new(label: &str, mode: AttachMode) -> Harness {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "backend_docker=debug".into()),
            )
            .with_test_writer()
            .with_ansi(false)
            .try_init();
        require_docker();
        let director = unique_name(label);
        let state_dir = PathBuf::from(format!("/tmp/bosh-cpi-docker-test/{director}"));
        let config = DockerConfig {
            state_dir: state_dir.clone(),
            attach_mode: mode,
            stop_timeout_seconds: 2,
            ..Default::default()
        };
        let cpi = DockerCpi::new(
            config,
            AgentOptions {
                mbus: "https://mbus:mbus-password@0.0.0.0:6868".into(),
                ntp: vec![],
            },
        )
        .expect("backend");
        Harness {
            cpi,
            ctx: CallContext {
                director_uuid: Some(director.clone()),
                request_id: Some("test".into()),
                api_version: 2,
                ..Default::default()
            },
            director,
            state_dir,
            work: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// `docker <kind> ls -q` of everything labelled with this test's director uuid.
    pub fn leftovers(&self) -> Vec<String> {
        let filter = format!("label=bosh-container-cpi.director-uuid={}", self.director);
        let mut out = Vec::new();
        for (what, args) in [
            ("container", vec!["ps", "-aq", "--filter", &filter]),
            ("volume", vec!["volume", "ls", "-q", "--filter", &filter]),
            ("network", vec!["network", "ls", "-q", "--filter", &filter]),
            ("image", vec!["images", "-q", "--filter", &filter]),
        ] {
            let listed = docker(&args).expect_success();
            out.extend(
                listed
                    .lines()
                    .filter(|l| !l.is_empty())
                    .map(|l| format!("{what} {l}")),
            );
        }
        for m in mounts_below(&self.state_dir.join("vms")) {
            out.push(format!("mount {m}"));
        }
        out
    }

    /// Removes everything labelled with this test's director uuid, and the state dir.
    pub fn cleanup(&self) {
        let filter = format!("label=bosh-container-cpi.director-uuid={}", self.director);
        let containers = docker(&["ps", "-aq", "--filter", &filter]).stdout;
        for c in containers.lines().filter(|l| !l.is_empty()) {
            let _ = docker(&["rm", "-f", c]);
        }
        for m in mounts_below(&self.state_dir) {
            let _ = std::process::Command::new("umount")
                .args(["-l", &m])
                .status();
        }
        let volumes = docker(&["volume", "ls", "-q", "--filter", &filter]).stdout;
        for v in volumes.lines().filter(|l| !l.is_empty()) {
            let _ = docker(&["volume", "rm", "-f", v]);
        }
        let networks = docker(&["network", "ls", "-q", "--filter", &filter]).stdout;
        for n in networks.lines().filter(|l| !l.is_empty()) {
            let _ = docker(&["network", "rm", n]);
        }
        let images = docker(&["images", "-q", "--filter", &filter]).stdout;
        for i in images.lines().filter(|l| !l.is_empty()) {
            let _ = docker(&["rmi", "-f", i]);
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }

    /// Asserts that nothing labelled by this test is left, then unmounts the state
    /// directory itself (made a shared mount by the backend) and removes it.
    pub fn assert_clean(&self) {
        let left = self.leftovers();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Mount points at or below `dir` in this process's mount table, deepest first.
pub fn mounts_below(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = dir.display().to_string();
    let mut found: Vec<String> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == prefix || m.starts_with(&format!("{prefix}/")))
        .map(str::to_owned)
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.len()));
    found
}

/// `docker exec <container> sh -c <script>`, stdout trimmed; panics on failure.
pub fn exec(container: &str, script: &str) -> String {
    docker(&["exec", container, "/bin/sh", "-c", script]).expect_success()
}

/// `docker exec`, returning whether it succeeded and its stdout.
pub fn try_exec(container: &str, script: &str) -> (bool, String) {
    let out = docker(&["exec", container, "/bin/sh", "-c", script]);
    (out.success(), out.stdout.trim().to_owned())
}

/// PID 1's command name and start time (field 22 of /proc/1/stat) in a container.
///
/// Waits (up to 10 s) until the prelude has exec'd the init, so a sample taken right
/// after `create_vm` is comparable with a later one (exec keeps pid and start time
/// but changes comm from `sh`).
pub fn pid1(container: &str) -> (String, String) {
    let mut stat = exec(container, "cat /proc/1/stat");
    for _ in 0..100 {
        if !stat.contains("(sh)") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        stat = exec(container, "cat /proc/1/stat");
    }
    // comm is in parentheses and may hold spaces: split after the last ')'.
    let close = stat.rfind(')').expect("stat");
    let comm = stat[stat.find('(').expect("(") + 1..close].to_owned();
    let rest: Vec<&str> = stat[close + 2..].split(' ').collect();
    // Fields after comm start at field 3 (state); start time is field 22.
    (comm, rest[22 - 3].to_owned())
}

/// `docker inspect -f <format> <object>`.
pub fn inspect(object: &str, format: &str) -> String {
    docker(&["inspect", "-f", format, object]).expect_success()
}

/// A subnet for this test run, unlikely to clash with other runs: 10.<a>.<b>.0/24.
pub fn test_subnet(seed: &str) -> (String, String, String) {
    let h = seed.bytes().fold(7u32, |acc, b| {
        acc.wrapping_mul(31).wrapping_add(u32::from(b))
    });
    let a = 100 + (h % 100);
    let b = (h / 100) % 250;
    (
        format!("10.{a}.{b}.10"),
        format!("10.{a}.{b}.1"),
        format!("10.{a}.{b}.0/24"),
    )
}

/// `ip` with its last octet replaced.
pub fn last_octet(ip: &str, n: u8) -> String {
    let (net, _) = ip.rsplit_once('.').expect("ipv4");
    format!("{net}.{n}")
}
