//! `cpi doctor [-configPath FILE] [--json]`: checks the environment a config points at
//! and says, one line per check, what was found and how to fix it.
//!
//! Unlike a CPI call this is a command for people (and for CI scripts): it prints a
//! report rather than a response, and exits 2 when anything is a blocker, 0
//! otherwise. The checks, in order:
//!
//! - `config`: the file loads with the CPI's own loader ([`crate::config`]);
//! - `daemon` (+ `snapshotter` for containerd): reachable, its version;
//! - `cgroup`, `capabilities`: the host as a VM will see it (and whether the cgroup
//!   hierarchies are writable for the daemon's runc);
//! - `overlay`: a real overlay mount under the state directory, and no overlay under
//!   the daemon's storage;
//! - `propagation`: what the CPI will do about shared mounts, tried for real;
//! - `cni` (containerd): the plugins the backend runs;
//! - `loop`, `modules`: reported (loop devices are never needed);
//! - `container`: the time to create and delete a throwaway container.
//!
//! Modules: [`host`] (pure readings), [`checks`] (host checks that read),
//! [`mounts`] (the checks that mount), [`daemon`] (daemon
//! checks through the backends' `doctor` probes), [`report`] (rendering).

mod checks;
mod daemon;
mod host;
mod mounts;
mod report;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use backend_containerd::ContainerdConfig;
use backend_docker::config::AttachMode;
use backend_docker::DockerConfig;
use serde_json::Map;

use crate::config::{BackendConfig, Config, ConfigFile, Format};
use crate::output;
use report::{Finding, Status};

/// What the config selects.
enum Target {
    /// No usable config: host checks only.
    None,
    Fake,
    Docker(Box<DockerConfig>),
    Containerd(Box<ContainerdConfig>),
}

/// The state directory on this machine, and the daemon whose mounts must match ours.
pub struct Local {
    /// The backend's `state_dir`.
    pub state_dir: PathBuf,
    /// Whether the backend is containerd (else Docker in local attach mode).
    pub containerd: bool,
    /// The daemon's process name.
    pub daemon: &'static str,
    /// Whether we share its mount namespace; `None` when it is not visible.
    pub same_ns: Option<bool>,
}

/// Loads the config as a CPI call would, without context overrides.
fn load(path: Option<&Path>) -> (Finding, Target) {
    let Some(path) = path else {
        return (
            Finding::new(
                "config",
                Status::Warn,
                "no config file given: host checks only",
            )
            .fix("run `cpi doctor -configPath FILE` with the CPI's config to check its daemon too"),
            Target::None,
        );
    };
    let loaded = ConfigFile::read(path)
        .and_then(|file| Config::from_file(&file))
        .and_then(|config| Ok((config.backend_config(&Map::new())?, config)));
    match loaded {
        Ok((backend, config)) => {
            let finding = Finding::new(
                "config",
                Status::Ok,
                format!(
                    "{} loads ({} backend, {})",
                    path.display(),
                    config.backend.name(),
                    match config.format {
                        Format::Ours => "our format",
                        Format::GoDocker => "the Go Docker CPI's format",
                    }
                ),
            )
            .detail("path", path.display().to_string())
            .detail("backend", config.backend.name());
            let target = match backend {
                BackendConfig::Docker(c) => Target::Docker(c),
                BackendConfig::Containerd(c) => Target::Containerd(c),
                BackendConfig::Fake(_) => Target::Fake,
            };
            (finding, target)
        }
        Err(e) => (
            Finding::new("config", Status::Blocker, e.message)
                .fix("correct the file (every key: docs/configuration.md)"),
            Target::None,
        ),
    }
}

/// Runs every check.
fn collect(config: Option<&Path>) -> (Vec<Finding>, Option<&'static str>) {
    let (config_finding, target) = load(config);
    let mut findings = vec![config_finding];
    let backend = match &target {
        Target::None => None,
        Target::Fake => Some("fake"),
        Target::Docker(_) => Some("docker"),
        Target::Containerd(_) => Some("containerd"),
    };
    let daemon = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => match &target {
            Target::Docker(c) => rt.block_on(daemon::docker(c)),
            Target::Containerd(c) => rt.block_on(daemon::containerd(c)),
            _ => daemon::DaemonFindings::default(),
        },
        Err(e) => daemon::DaemonFindings {
            findings: vec![Finding::new(
                "daemon",
                Status::Blocker,
                format!("cannot start the async runtime: {e}"),
            )],
            places: Vec::new(),
        },
    };
    let (container, before): (Vec<Finding>, Vec<Finding>) = daemon
        .findings
        .into_iter()
        .partition(|f| f.id == "container");
    findings.extend(before);
    let table = checks::mount_table();
    // Whether the daemon's runc sees this machine's cgroup mounts (as the backends
    // find their daemon: dockerd by its pid file or name, containerd by name).
    let daemon_here = match &target {
        Target::Docker(c)
            if c.host.trim().starts_with("unix://") || c.host.trim().starts_with('/') =>
        {
            mounts::same_mount_ns("dockerd", Some(Path::new("/var/run/docker.pid")))
        }
        Target::Containerd(_) => mounts::same_mount_ns("containerd", None),
        _ => None,
    };
    findings.push(checks::cgroup(
        &table,
        &checks::read_only_cgroups(&table),
        daemon_here,
    ));
    findings.push(checks::capabilities());

    let state = match &target {
        Target::Docker(c) => {
            let host = c.host.trim();
            let unix = host.starts_with("unix://") || host.starts_with('/');
            let same_ns = mounts::same_mount_ns("dockerd", Some(Path::new("/var/run/docker.pid")));
            // As the backend resolves `auto`: local mounts for a unix socket whose
            // daemon shares our mount namespace.
            let local = unix
                && match c.attach_mode {
                    AttachMode::Helper => false,
                    AttachMode::Local => true,
                    AttachMode::Auto => same_ns == Some(true),
                };
            local.then(|| Local {
                state_dir: c.state_dir.clone(),
                containerd: false,
                daemon: "dockerd",
                same_ns,
            })
        }
        Target::Containerd(c) => Some(Local {
            state_dir: c.state_dir.clone(),
            containerd: true,
            daemon: "containerd",
            same_ns: mounts::same_mount_ns("containerd", None),
        }),
        _ => None,
    };
    match state {
        Some(local) => {
            let state_dir = &local.state_dir;
            let scratch = mounts::Scratch::new(state_dir).map_err(|e| {
                format!(
                    "cannot create a scratch directory under {}: {e}",
                    state_dir.display()
                )
            });
            let scratch_ref = scratch.as_ref().map_err(String::as_str);
            let places: &[mounts::OverlayPlace] = if local.same_ns == Some(true) {
                &daemon.places
            } else {
                // The daemon's storage is in another mount namespace: what we see
                // at its path here is not it.
                &[]
            };
            findings.push(mounts::overlay(
                &table,
                state_dir,
                scratch_ref,
                places,
                local.containerd,
            ));
            findings.push(mounts::propagation(&table, scratch_ref, &local));
        }
        None => {
            let why = match &target {
                Target::Docker(_) => "not checked here: the Docker daemon is remote or not in this mount namespace (or attach_mode is helper), so the CPI reaches its host's state directory through helper containers",
                _ => "not checked: no Docker or containerd backend configured",
            };
            findings.push(Finding::new("overlay", Status::Ok, why));
            findings.push(Finding::new("propagation", Status::Ok, why));
        }
    }
    if let Target::Containerd(c) = &target {
        findings.push(checks::cni(&c.cni_bin_dir));
    }
    findings.push(checks::loop_devices());
    findings.push(checks::modules());
    findings.extend(container);
    (findings, backend)
}

/// The exit status of a bad `cpi doctor` command line (BSD's `EX_USAGE`).
const EXIT_USAGE: u8 = 64;

/// Reports a bad `cpi doctor` command line on stderr.
pub fn usage(problem: &str) -> ExitCode {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{problem}");
    ExitCode::from(EXIT_USAGE)
}

/// Runs the doctor and prints its report to stdout; exits 2 on a blocker.
pub fn run(config: Option<PathBuf>, json: bool) -> ExitCode {
    let (findings, backend) = collect(config.as_deref());
    let config_text = config.as_ref().map(|p| p.display().to_string());
    let text = if json {
        report::json(config_text.as_deref(), backend, &findings)
    } else {
        let heading = match (&config_text, backend) {
            (Some(path), Some(b)) => format!("cpi doctor: {b} backend, config {path}"),
            (Some(path), None) => format!("cpi doctor: config {path}"),
            _ => "cpi doctor: host checks only".to_owned(),
        };
        report::text(&heading, &findings)
    };
    match output::write_stdout(text.as_bytes()) {
        Ok(()) => ExitCode::from(report::exit_code(&findings)),
        Err(_) => ExitCode::FAILURE,
    }
}
