//! Private containerd and dockerd instances for tests that stop and restart a daemon.
//!
//! The shared daemons (`/run/containerd/containerd.sock`, `/var/run/docker.sock`) serve
//! every other test running at the same time, so a restart test must never touch
//! them. A [`PrivateContainerd`] has its own socket, root, state and config under
//! `/run/cpi-priv/<name>` and `/var/lib/cpi-priv/<name>`; a [`PrivateDockerd`] has its
//! own socket, data root, exec root and pid file there, uses a private containerd
//! (its own namespace in it), and stays out of the host's networking (a bridge of its
//! own instead of `docker0`, `--iptables=false`, no userland proxy) so it cannot
//! disturb the shared dockerd.
//!
//! Dropping one stops it (SIGTERM, then SIGKILL), ends the runtime shims it started
//! (found by its socket in their command line), unmounts everything left below its
//! directories and removes them. Daemons run in their own process group, so a Ctrl-C
//! of the test does not reach them before the guard does.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

use crate::daemons::CliOutput;

/// How long a daemon may take to answer after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a daemon may take to exit after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// The limit of one CLI call against a private daemon.
const CLI_TIMEOUT: Duration = Duration::from_secs(120);

/// How to stop a daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM and wait for it to exit (what a service manager does).
    Term,
    /// SIGKILL (a crash, or a service manager's last resort).
    Kill,
}

impl Stop {
    fn signal(self) -> Signal {
        match self {
            Stop::Term => Signal::TERM,
            Stop::Kill => Signal::KILL,
        }
    }
}

fn run_cli(program: &str, args: &[&str]) -> CliOutput {
    crate::daemons::run_command(program, args, None, CLI_TIMEOUT)
}

fn send(pid: u32, signal: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        // The process may be gone already.
        let _ = kill_process(pid, signal);
    }
}

/// Processes whose command line contains `needle`, but not this process.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(needle)
                })
                .unwrap_or(false)
        })
        .collect()
}

/// Unmounts (lazily) every mount at or below `dir`, deepest first.
pub fn unmount_below(dir: &Path) {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = mount_points(&text)
        .into_iter()
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = rustix::mount::unmount(&p, rustix::mount::UnmountFlags::DETACH);
    }
}

/// Mount points of a mountinfo text (field 5, with `\040`-style escapes undone).
fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| {
            let mut out = String::new();
            let mut rest = m;
            while let Some(i) = rest.find('\\') {
                out.push_str(&rest[..i]);
                let code = rest.get(i + 1..i + 4).unwrap_or("");
                match u8::from_str_radix(code, 8) {
                    Ok(b) if code.len() == 3 => {
                        out.push(char::from(b));
                        rest = &rest[i + 4..];
                    }
                    _ => {
                        out.push('\\');
                        rest = &rest[i + 1..];
                    }
                }
            }
            out.push_str(rest);
            PathBuf::from(out)
        })
        .collect()
}

fn wait_exit(child: &mut Child, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
    let err = out
        .try_clone()
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e} (is it installed?)"))
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A containerd of the test's own.
pub struct PrivateContainerd {
    /// Its gRPC socket.
    pub socket: PathBuf,
    /// Its root (content, snapshots, metadata) and other persistent files.
    pub lib_dir: PathBuf,
    /// Its runtime directory (socket, state).
    pub run_dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// Waits until a just-spawned daemon `what` answers (`answers`), and returns its
/// child.
///
/// # Panics
/// When it exits first, or does not answer within [`START_TIMEOUT`] (the message has
/// the tail of its log).
fn await_start(
    what: &str,
    mut child: Child,
    socket: &Path,
    log: &Path,
    answers: impl Fn() -> bool,
) -> Child {
    let start = Instant::now();
    while start.elapsed() < START_TIMEOUT {
        if answers() {
            return child;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "private {what} exited while starting ({status}); its log {}:\n{}",
                log.display(),
                log_tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!(
        "private {what} did not answer on {} within {START_TIMEOUT:?}; its log:\n{}",
        socket.display(),
        log_tail(log)
    );
}

/// Stops a daemon with `how` and waits until it has exited (SIGKILL after
/// [`STOP_TIMEOUT`]).
fn stop_child(mut child: Child, how: Stop) {
    send(child.id(), how.signal());
    if !wait_exit(&mut child, STOP_TIMEOUT) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl PrivateContainerd {
    /// Starts a containerd named `name` (a short `[a-z0-9-]` string, unique to the
    /// run) and waits until it answers.
    ///
    /// # Panics
    /// When it does not start or answer within a minute (the message has its log).
    pub fn start(name: &str) -> PrivateContainerd {
        let lib_dir = PathBuf::from("/var/lib/cpi-priv").join(name);
        let run_dir = PathBuf::from("/run/cpi-priv").join(name);
        for d in [&lib_dir, &run_dir] {
            std::fs::create_dir_all(d)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
        }
        let socket = run_dir.join("containerd.sock");
        let config = lib_dir.join("containerd.toml");
        let toml = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
            root = lib_dir.join("root").display(),
            state = run_dir.join("state").display(),
            sock = socket.display(),
            opt = lib_dir.join("opt").display(),
        );
        std::fs::write(&config, toml)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        let mut me = PrivateContainerd {
            socket,
            log: lib_dir.join("containerd.log"),
            lib_dir,
            run_dir,
            config,
            child: None,
        };
        me.start_again();
        me
    }

    /// The last lines of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// Whether it answers (`ctr version`).
    pub fn answers(&self) -> bool {
        self.socket.exists()
            && run_cli(
                "ctr",
                &["--address", &self.socket.to_string_lossy(), "version"],
            )
            .success()
    }

    /// Starts it again (after [`PrivateContainerd::stop`]) and waits until it answers.
    ///
    /// # Panics
    /// When it does not answer within a minute.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "containerd is already running");
        let child = spawn_logged(
            Command::new("containerd").arg("--config").arg(&self.config),
            &self.log,
        );
        self.child = Some(await_start(
            "containerd",
            child,
            &self.socket,
            &self.log,
            || self.answers(),
        ));
    }

    /// Stops it with `how` and waits until it has exited (SIGKILL after a minute).
    pub fn stop(&mut self, how: Stop) {
        if let Some(child) = self.child.take() {
            stop_child(child, how);
        }
    }

    /// Runs `ctr` against it in `namespace`.
    pub fn ctr(&self, namespace: &str, args: &[&str]) -> CliOutput {
        let socket = self.socket.to_string_lossy().into_owned();
        let mut full = vec!["--address", socket.as_str(), "--namespace", namespace];
        full.extend_from_slice(args);
        run_cli("ctr", &full)
    }

    /// The PID of the running task of `container`, if any.
    pub fn task_pid(&self, namespace: &str, container: &str) -> Option<u32> {
        let listing = self.ctr(namespace, &["task", "ls"]);
        listing.stdout.lines().find_map(|line| {
            let mut f = line.split_whitespace();
            if f.next() != Some(container) {
                return None;
            }
            let pid = f.next()?.parse::<u32>().ok().filter(|p| *p > 0)?;
            (f.next() == Some("RUNNING")).then_some(pid)
        })
    }

    /// Runs `/bin/sh -c script` in the namespaces of `container`'s running task.
    pub fn exec(&self, namespace: &str, container: &str, script: &str) -> CliOutput {
        let Some(pid) = self.task_pid(namespace, container) else {
            return CliOutput {
                command: format!("nsenter into {container}"),
                exit_code: 1,
                stdout: String::new(),
                stderr: format!("no running task {container} in namespace {namespace}"),
            };
        };
        let pid = pid.to_string();
        run_cli(
            "nsenter",
            &[
                "--target", &pid, "--mount", "--uts", "--ipc", "--net", "--pid", "--", "/bin/sh",
                "-c", script,
            ],
        )
    }

    /// The runtime shims this containerd started.
    pub fn shims(&self) -> Vec<u32> {
        processes_mentioning(&self.socket.to_string_lossy())
            .into_iter()
            .filter(|pid| Some(*pid) != self.child.as_ref().map(Child::id))
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.starts_with("containerd-shim"))
            })
            .collect()
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        self.stop(Stop::Term);
        for pid in self.shims() {
            send(pid, Signal::KILL);
        }
        std::thread::sleep(Duration::from_millis(200));
        unmount_below(&self.run_dir);
        unmount_below(&self.lib_dir);
        let _ = std::fs::remove_dir_all(&self.run_dir);
        let _ = std::fs::remove_dir_all(&self.lib_dir);
    }
}

/// A dockerd of the test's own, on a [`PrivateContainerd`].
pub struct PrivateDockerd {
    /// Its API socket.
    pub socket: PathBuf,
    lib_dir: PathBuf,
    run_dir: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    bridge: String,
}

/// A bridge of the private dockerd's own for its default `bridge` network, named and
/// addressed after `name`. `--bridge=none` is not an option: a dockerd started with
/// it deletes the host's `docker0` (the shared dockerd's default bridge).
fn private_bridge(name: &str) -> String {
    use sha2::Digest as _;
    let hash = sha2::Sha256::digest(name.as_bytes());
    let bridge = format!("cpipd{:02x}{:02x}{:02x}", hash[0], hash[1], hash[2]);
    let address = format!("10.254.{}.1/24", hash[3]);
    let _ = run_cli("ip", &["link", "delete", &bridge]);
    for args in [
        vec!["link", "add", bridge.as_str(), "type", "bridge"],
        vec!["addr", "add", address.as_str(), "dev", bridge.as_str()],
        vec!["link", "set", bridge.as_str(), "up"],
    ] {
        let out = run_cli("ip", &args);
        assert!(
            out.success(),
            "ip {} failed: {}",
            args.join(" "),
            out.stderr
        );
    }
    bridge
}

impl PrivateDockerd {
    /// Starts a dockerd named `name` on `containerd` and waits until it answers.
    ///
    /// # Panics
    /// When it does not start or answer within a minute (the message has its log).
    pub fn start(name: &str, containerd: &PrivateContainerd) -> PrivateDockerd {
        let lib_dir = PathBuf::from("/var/lib/cpi-priv").join(format!("{name}-docker"));
        let run_dir = PathBuf::from("/run/cpi-priv").join(format!("{name}-d"));
        for d in [&lib_dir, &run_dir] {
            std::fs::create_dir_all(d)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
        }
        let socket = run_dir.join("docker.sock");
        let config = lib_dir.join("daemon.json");
        std::fs::write(&config, "{}")
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        let bridge = private_bridge(name);
        let args = vec![
            format!("--host=unix://{}", socket.display()),
            format!("--data-root={}", lib_dir.join("data").display()),
            format!("--exec-root={}", run_dir.join("x").display()),
            format!("--pidfile={}", run_dir.join("docker.pid").display()),
            format!("--config-file={}", config.display()),
            format!("--containerd={}", containerd.socket.display()),
            "--containerd-namespace=moby-private".to_owned(),
            "--containerd-plugins-namespace=plugins-moby-private".to_owned(),
            format!("--bridge={bridge}"),
            "--iptables=false".to_owned(),
            "--ip-masq=false".to_owned(),
            "--userland-proxy=false".to_owned(),
            "--storage-driver=overlay2".to_owned(),
        ];
        let mut me = PrivateDockerd {
            socket,
            log: lib_dir.join("dockerd.log"),
            lib_dir,
            run_dir,
            args,
            child: None,
            bridge,
        };
        me.start_again();
        me
    }

    /// Turns dockerd's `--live-restore` on or off for its next start.
    pub fn set_live_restore(&mut self, on: bool) {
        self.args.retain(|a| a != "--live-restore");
        if on {
            self.args.push("--live-restore".to_owned());
        }
    }

    /// The `docker.host` value for a CPI config.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Runs the `docker` CLI against it.
    pub fn docker(&self, args: &[&str]) -> CliOutput {
        let host = self.host();
        let mut full = vec!["-H", host.as_str()];
        full.extend_from_slice(args);
        run_cli("docker", &full)
    }

    /// The last lines of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// Whether it answers (`docker version`).
    pub fn answers(&self) -> bool {
        self.socket.exists() && self.docker(&["version"]).success()
    }

    /// Starts it again (after [`PrivateDockerd::stop`]) and waits until it answers.
    ///
    /// # Panics
    /// When it does not answer within a minute.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "dockerd is already running");
        let child = spawn_logged(Command::new("dockerd").args(&self.args), &self.log);
        self.child = Some(await_start(
            "dockerd",
            child,
            &self.socket,
            &self.log,
            || self.answers(),
        ));
    }

    /// Stops it with `how` and waits until it has exited (SIGKILL after a minute).
    pub fn stop(&mut self, how: Stop) {
        if let Some(child) = self.child.take() {
            stop_child(child, how);
        }
    }
}

impl Drop for PrivateDockerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            let leftovers = self.docker(&["ps", "-aq"]);
            for id in leftovers.stdout.split_whitespace() {
                let _ = self.docker(&["rm", "-f", "-v", id]);
            }
            let nets = self.docker(&["network", "ls", "-q", "--filter", "type=custom"]);
            for id in nets.stdout.split_whitespace() {
                let _ = self.docker(&["network", "rm", id]);
            }
        }
        self.stop(Stop::Term);
        unmount_below(&self.run_dir);
        unmount_below(&self.lib_dir);
        let _ = std::fs::remove_dir_all(&self.run_dir);
        let _ = std::fs::remove_dir_all(&self.lib_dir);
        let _ = run_cli("ip", &["link", "delete", &self.bridge]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_unescaped() {
        let text =
            "36 35 98:0 /x /mnt/a\\040b rw - ext3 /dev/root rw\n37 35 98:0 / / rw - ext4 x rw\n";
        assert_eq!(
            mount_points(text),
            vec![PathBuf::from("/mnt/a b"), PathBuf::from("/")]
        );
    }
}
