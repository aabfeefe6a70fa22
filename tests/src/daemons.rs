//! Checks that the container daemons the tests need are running, and small
//! wrappers around their command-line tools.
//!
//! Tests that need a daemon call [`require_docker`] or [`require_containerd`]
//! first. Those panic when the daemon is missing: a test that cannot run fails
//! loudly instead of passing by skipping itself.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::process;

/// The Docker socket the tests use.
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// The containerd socket the tests use (shared by dockerd and the containerd backend).
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// The local, unauthenticated registry started by `scripts/lib.sh` (`start_registry`).
pub const LOCAL_REGISTRY: &str = "127.0.0.1:5000";

const CHECK_TIMEOUT: Duration = Duration::from_secs(20);
const CLI_TIMEOUT: Duration = Duration::from_secs(600);

const HOW_TO_START: &str = "`bash scripts/test.sh` installs and starts Docker, containerd and the \
local registry; or start them by hand: `source scripts/lib.sh && ensure_packages && \
start_containerd && start_dockerd && start_registry`";

/// The output of a command-line tool run by [`docker`] or [`ctr`].
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// The command line, for messages.
    pub command: String,
    /// Exit code (128 + signal when killed by a signal).
    pub exit_code: i32,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl CliOutput {
    /// Whether the command exited with 0.
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }

    /// Standard output with surrounding whitespace removed, or a panic showing
    /// the command, exit code and stderr when the command failed.
    ///
    /// # Panics
    /// When the command exited non-zero.
    pub fn expect_success(&self) -> String {
        assert!(
            self.success(),
            "`{}` failed with exit code {}\nstdout:\n{}\nstderr:\n{}",
            self.command,
            self.exit_code,
            self.stdout,
            self.stderr
        );
        self.stdout.trim().to_string()
    }
}

/// Runs `program` with `args` (and `stdin`, when given) under a time limit and returns
/// its output; a program that cannot be started gives exit code 127 and says why.
pub fn run_command(
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> CliOutput {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    match process::run(Command::new(program).args(args), stdin, timeout) {
        Ok(done) => {
            let mut stderr = String::from_utf8_lossy(&done.stderr).into_owned();
            if done.timed_out {
                stderr.push_str(&format!("\n[cpi-tests: killed after {timeout:?}]"));
            }
            CliOutput {
                command,
                exit_code: process::exit_code(done.status),
                stdout: String::from_utf8_lossy(&done.stdout).into_owned(),
                stderr,
            }
        }
        Err(e) => CliOutput {
            command,
            exit_code: 127,
            stdout: String::new(),
            stderr: format!("cannot run {program}: {e}"),
        },
    }
}

fn run_cli(program: &str, args: &[&str], timeout: Duration) -> CliOutput {
    run_command(program, args, None, timeout)
}

/// Runs the `docker` CLI against [`DOCKER_SOCKET`] (10 minute limit) and returns its output.
pub fn docker(args: &[&str]) -> CliOutput {
    let host = format!("unix://{DOCKER_SOCKET}");
    let mut full = vec!["-H", host.as_str()];
    full.extend_from_slice(args);
    run_cli("docker", &full, CLI_TIMEOUT)
}

/// Runs `ctr` against [`CONTAINERD_SOCKET`] in the given containerd namespace
/// (10 minute limit) and returns its output.
pub fn ctr(namespace: &str, args: &[&str]) -> CliOutput {
    let mut full = vec!["--address", CONTAINERD_SOCKET, "--namespace", namespace];
    full.extend_from_slice(args);
    run_cli("ctr", &full, CLI_TIMEOUT)
}

/// Runs `/bin/sh -c script` inside the namespaces of a running containerd task
/// (its mount, UTS, IPC, network and PID namespaces) with `nsenter`, and
/// returns its output.
///
/// `ctr task exec` is not used: containerd 1.6's `ctr` can lose the standard
/// output of a process that exits quickly (its FIFO copy races the exit), which
/// made tests read an empty string now and then. `nsenter` writes straight to
/// our pipes.
pub fn containerd_exec(namespace: &str, container: &str, script: &str) -> CliOutput {
    let listing = ctr(namespace, &["task", "ls"]);
    if !listing.success() {
        return listing;
    }
    let pid = listing.stdout.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next() == Some(container))
            .then(|| fields.next())
            .flatten()
            .filter(|pid| pid.parse::<u32>().is_ok_and(|p| p > 0))
            .map(str::to_owned)
    });
    let Some(pid) = pid else {
        return CliOutput {
            command: format!("nsenter into task {container}"),
            exit_code: 1,
            stdout: String::new(),
            stderr: format!(
                "no running task {container} in namespace {namespace}:\n{}",
                listing.stdout
            ),
        };
    };
    run_cli(
        "nsenter",
        &[
            "--target", &pid, "--mount", "--uts", "--ipc", "--net", "--pid", "--", "/bin/sh", "-c",
            script,
        ],
        CLI_TIMEOUT,
    )
}

/// Whether Docker answers on [`DOCKER_SOCKET`] (`docker version` succeeds).
pub fn docker_available() -> bool {
    Path::new(DOCKER_SOCKET).exists()
        && run_cli(
            "docker",
            &["-H", &format!("unix://{DOCKER_SOCKET}"), "version"],
            CHECK_TIMEOUT,
        )
        .success()
}

/// Whether containerd answers on [`CONTAINERD_SOCKET`] (`ctr version` succeeds).
pub fn containerd_available() -> bool {
    Path::new(CONTAINERD_SOCKET).exists()
        && run_cli(
            "ctr",
            &["--address", CONTAINERD_SOCKET, "version"],
            CHECK_TIMEOUT,
        )
        .success()
}

/// Panics unless Docker answers on [`DOCKER_SOCKET`]; the message says how to start it.
///
/// # Panics
/// When `docker version` fails or the socket does not exist.
pub fn require_docker() {
    if !Path::new(DOCKER_SOCKET).exists() {
        panic!("Docker is not running: {DOCKER_SOCKET} does not exist. {HOW_TO_START}");
    }
    let out = run_cli(
        "docker",
        &["-H", &format!("unix://{DOCKER_SOCKET}"), "version"],
        CHECK_TIMEOUT,
    );
    if !out.success() {
        panic!(
            "Docker does not answer on {DOCKER_SOCKET} (`{}` exited {}: {}). {HOW_TO_START}",
            out.command,
            out.exit_code,
            out.stderr.trim()
        );
    }
}

/// Panics unless containerd answers on [`CONTAINERD_SOCKET`]; the message says how to start it.
///
/// # Panics
/// When `ctr version` fails or the socket does not exist.
pub fn require_containerd() {
    if !Path::new(CONTAINERD_SOCKET).exists() {
        panic!("containerd is not running: {CONTAINERD_SOCKET} does not exist. {HOW_TO_START}");
    }
    let out = run_cli(
        "ctr",
        &["--address", CONTAINERD_SOCKET, "version"],
        CHECK_TIMEOUT,
    );
    if !out.success() {
        panic!(
            "containerd does not answer on {CONTAINERD_SOCKET} (`{}` exited {}: {}). {HOW_TO_START}",
            out.command,
            out.exit_code,
            out.stderr.trim()
        );
    }
}

/// Panics unless the local registry answers on `http://127.0.0.1:5000/v2/`.
///
/// # Panics
/// When the registry does not answer with success.
pub fn require_registry() {
    let url = format!("http://{LOCAL_REGISTRY}/v2/");
    let out = run_cli("curl", &["-fsS", "--max-time", "5", &url], CHECK_TIMEOUT);
    if !out.success() {
        panic!(
            "the local registry does not answer on {url} ({}). {HOW_TO_START}",
            out.stderr.trim()
        );
    }
}

/// The bridge the containerd backend makes for `subnet` (`10.1.2.0/24`): `bcpi` and
/// 10 hex digits of the subnet's SHA-256.
pub fn cpi_bridge_name(subnet: &str) -> String {
    use sha2::Digest as _;
    let hash = sha2::Sha256::digest(subnet.as_bytes());
    std::iter::once("bcpi".to_owned())
        .chain(hash.iter().take(5).map(|b| format!("{b:02x}")))
        .collect()
}

/// The host rules the containerd backend keeps for `bridge` (comment
/// `bcpi:<bridge>:<role>`), as `(tool, table, rule)` with the rule as `iptables -S`
/// prints it (`-A FORWARD -i … -m comment --comment "bcpi:…:in" -j ACCEPT`).
pub fn cpi_bridge_rules(bridge: &str) -> Vec<(&'static str, &'static str, String)> {
    // iptables prints the comment quoted: `--comment "bcpi:<bridge>:in"`.
    let marker = format!("--comment \"bcpi:{bridge}:");
    let mut rules = Vec::new();
    for tool in ["iptables", "ip6tables"] {
        for (table, chain) in [("filter", "FORWARD"), ("nat", "POSTROUTING")] {
            let listing = run_command(
                tool,
                &["-w", "-t", table, "-S", chain],
                None,
                Duration::from_secs(30),
            );
            rules.extend(
                listing
                    .stdout
                    .lines()
                    .filter(|l| l.starts_with("-A ") && l.contains(&marker))
                    .map(|l| (tool, table, l.to_owned())),
            );
        }
    }
    rules
}

/// How long [`remove_cpi_bridge`] waits for a bridge's interfaces to go. `delete_vm`
/// removes a VM's network namespace and leaves its interfaces to the kernel, which
/// destroys them later, off the caller's path: 10–25 ms after the call on an idle
/// machine here, longer under load.
pub const BRIDGE_DRAIN_WAIT: Duration = Duration::from_secs(10);

/// The interfaces plugged into `bridge`, sorted; empty when there is no such bridge.
pub fn bridge_ports(bridge: &str) -> Vec<String> {
    let mut ports: Vec<String> =
        std::fs::read_dir(Path::new("/sys/class/net").join(bridge).join("brif"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
    ports.sort();
    ports
}

/// [`bridge_ports`] once they have all gone or `wait` has passed: what stays is left
/// behind, not on its way out (see [`BRIDGE_DRAIN_WAIT`]).
pub fn bridge_ports_after(bridge: &str, wait: Duration) -> Vec<String> {
    let deadline = std::time::Instant::now() + wait;
    let mut ports = bridge_ports(bridge);
    while !ports.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        ports = bridge_ports(bridge);
    }
    ports
}

/// Removes a containerd-backend bridge and its host rules, unless a VM is still
/// plugged into it [`BRIDGE_DRAIN_WAIT`] later. `Ok(false)` when there was no such
/// bridge.
pub fn remove_cpi_bridge(bridge: &str) -> Result<bool, String> {
    let exists = Path::new("/sys/class/net").join(bridge).exists();
    if exists {
        let ports = bridge_ports_after(bridge, BRIDGE_DRAIN_WAIT);
        if !ports.is_empty() {
            return Err(format!(
                "bridge {bridge} still has {} interfaces after {} s ({}); not removing it",
                ports.len(),
                BRIDGE_DRAIN_WAIT.as_secs(),
                ports.join(", ")
            ));
        }
    }
    let mut failures = Vec::new();
    for (tool, table, rule) in cpi_bridge_rules(bridge) {
        let mut args = vec!["-w", "-t", table, "-D"];
        args.extend(
            rule["-A ".len()..]
                .split_whitespace()
                .map(|w| w.trim_matches('"')),
        );
        let out = run_command(tool, &args, None, Duration::from_secs(30));
        if out.exit_code != 0 {
            failures.push(format!("{}: {}", out.command, out.stderr.trim()));
        }
    }
    if exists {
        let out = run_command(
            "ip",
            &["link", "delete", bridge],
            None,
            Duration::from_secs(30),
        );
        if out.exit_code != 0 {
            failures.push(format!("{}: {}", out.command, out.stderr.trim()));
        }
    }
    if failures.is_empty() {
        Ok(exists)
    } else {
        Err(failures.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the bench's clean-up met in CI: the VM's namespace is gone, but the kernel
    /// has not yet destroyed its veth, whose host end is still on the bridge.
    #[test]
    fn a_bridge_is_removed_once_a_removed_namespace_s_interface_has_gone() {
        let tag = format!("{:05}", std::process::id() % 100_000);
        let (bridge, netns, host) = (
            format!("bcpitest{tag}"),
            format!("bcpi-drain-{tag}"),
            format!("bdh{tag}"),
        );
        let ip = |args: &[&str]| {
            let out = run_command("ip", args, None, Duration::from_secs(30));
            assert_eq!(out.exit_code, 0, "{}: {}", out.command, out.stderr);
        };
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["netns", "add", &netns]);
        ip(&[
            "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ]);
        ip(&["link", "set", &host, "master", &bridge, "up"]);
        assert_eq!(bridge_ports(&bridge), vec![host.clone()]);
        // A process in the namespace keeps it, and so the veth, alive for half a
        // second after the namespace is removed: what a VM's dying init does.
        let mut holder = Command::new("ip")
            .args([
                "netns",
                "exec",
                &netns,
                "sh",
                "-c",
                "echo in; exec sleep 0.5",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawning a process in the namespace");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(holder.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("reading from the process in the namespace");
        assert_eq!(line.trim(), "in");
        ip(&["netns", "delete", &netns]);
        assert_eq!(
            bridge_ports(&bridge),
            vec![host.clone()],
            "the interface outlives its removed namespace"
        );

        let removed = remove_cpi_bridge(&bridge);
        let _ = holder.wait();
        let left = Path::new("/sys/class/net").join(&bridge).exists();
        if left {
            let _ = run_command(
                "ip",
                &["link", "delete", &bridge],
                None,
                Duration::from_secs(30),
            );
        }
        assert_eq!(removed, Ok(true));
        assert!(!left, "bridge {bridge} is still there");
        assert_eq!(remove_cpi_bridge(&bridge), Ok(false), "a missing bridge");
    }
}
