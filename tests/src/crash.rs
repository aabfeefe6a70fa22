//! Crash safety: `kill -9` of the `cpi` process at random points inside a call, then
//! recovery the way a director would, then proof that nothing of ours is left.
//!
//! For one backend and one method, [`run`] first measures an uncrashed call, then for
//! every trial: records an inventory, spawns `cpi` with the request on stdin, sleeps
//! a random delay drawn from `[0, 1.2 × measured duration]`, sends SIGKILL and
//! waits. Recovery is what a director does after a call that never answered: it
//! retries the same call (`create_vm` with the same arguments, `attach_disk` /
//! `detach_disk` of the same disk, `create_stemcell` of the same tarball, `delete_vm`
//! of the same VM), then deletes what the trial made (`delete_vm`,
//! `delete_stemcell`, `detach_disk`). The inventory must then be what it was before
//! the trial, and the persistent disk's marker file must read back unchanged after a
//! re-attach.
//!
//! Each run has its own director uuid, its own state directory
//! (`/var/lib/bosh-container-cpi-crash/<run>-<backend>`), its own containerd
//! namespace (`crash-<run>`, removed at the end: containerd refuses to remove a
//! namespace that still holds anything) and its own network, so the inventory is
//! exactly what this run made:
//! - Docker: containers, volumes and images labelled with the run's director uuid;
//! - containerd: containers, tasks, images, snapshots, leases and content in the
//!   namespace;
//! - both: the per-VM directories (and containerd's index of them by owner), address
//!   reservations, host-local allocations and mounts under the state directory,
//!   network namespaces and `/var/lib/cni/networks` allocations of every VM cid the
//!   trial saw (in the killed process's log or in the state directory right after
//!   the kill).
//!
//! The short mode runs in CI (`tests/tests/crash_safety.rs`); the long one is the
//! `cpi-crash` command (`bash scripts/soak.sh`). See `docs/reliability.md`.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::conformance::BackendKind;
use crate::daemons::{self, containerd_exec, ctr, docker};
use crate::runner::{CpiResponse, CpiRunner};
use crate::stemcell::{TestStemcell, UnpackedStemcell};

/// Where the runs keep their state directories.
pub const STATE_BASE: &str = "/var/lib/bosh-container-cpi-crash";

/// How long recovery waits after a kill (see [`Harness::interrupted`]).
pub const SETTLE: Duration = Duration::from_millis(500);

/// The label Docker objects carry with the director uuid.
const DOCKER_DIRECTOR_LABEL: &str = "bosh-container-cpi.director-uuid";

/// The methods a trial can interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Method {
    /// `create_vm`.
    CreateVm,
    /// `attach_disk`.
    AttachDisk,
    /// `detach_disk`.
    DetachDisk,
    /// `delete_vm` (of a VM with a disk attached).
    DeleteVm,
    /// `create_stemcell` (full stemcell).
    CreateStemcell,
}

impl Method {
    /// Every method, in table order.
    pub const ALL: [Method; 5] = [
        Method::CreateVm,
        Method::AttachDisk,
        Method::DetachDisk,
        Method::DeleteVm,
        Method::CreateStemcell,
    ];

    /// The CPI method name.
    pub fn name(self) -> &'static str {
        match self {
            Method::CreateVm => "create_vm",
            Method::AttachDisk => "attach_disk",
            Method::DetachDisk => "detach_disk",
            Method::DeleteVm => "delete_vm",
            Method::CreateStemcell => "create_stemcell",
        }
    }

    /// The method named `name`, if it is one of [`Method::ALL`].
    pub fn parse(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// The outcome of the trials of one method on one backend.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The method.
    pub method: String,
    /// The backend.
    pub backend: String,
    /// How many trials ran.
    pub trials: usize,
    /// The uncrashed call's duration, which scales the kill delays.
    pub measured: Duration,
    /// Kills that landed while the call was still running.
    pub killed_during: usize,
    /// Trials where the call had already finished when the kill was due.
    pub finished_first: usize,
    /// Retries of the interrupted call that succeeded (or answered the expected
    /// "already done" error, e.g. `DiskNotAttached` after a detach that completed).
    pub retries_ok: usize,
    /// Of those retries, how many logged that they removed, reused or finished what
    /// the killed call had left (see `REPAIR_MARKERS`).
    pub repaired: usize,
    /// Trials whose recovery did not go as a director would need.
    pub recovery_failures: usize,
    /// Things left behind after recovery (must be 0).
    pub leftovers: usize,
    /// Trials that checked the disk's data.
    pub data_checked: usize,
    /// Of those, how many read the marker back unchanged.
    pub data_intact: usize,
    /// What went wrong, one line per problem (empty on success).
    pub problems: Vec<String>,
}

impl Report {
    /// Whether every trial recovered, left nothing and kept the data.
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
            && self.leftovers == 0
            && self.recovery_failures == 0
            && self.data_intact == self.data_checked
            && self.trials > 0
    }

    fn problem(&mut self, trial: usize, what: impl std::fmt::Display) {
        let line = format!("{} {} trial {trial}: {what}", self.backend, self.method);
        tracing_line(&line);
        self.problems.push(line);
    }
}

#[allow(
    clippy::print_stderr,
    reason = "the driver reports progress and problems on stderr as it goes"
)]
fn tracing_line(line: &str) {
    eprintln!("[cpi-crash] {line}");
}

/// A small xorshift generator: the kill delays only need to spread, and the seed is
/// printed so a run can be repeated.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced by a fixed odd constant).
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next value, uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One backend set up for crash trials: its config, director uuid, state directory,
/// containerd namespace and network.
pub struct Harness {
    /// The backend.
    pub kind: BackendKind,
    /// Runs uncrashed calls.
    pub runner: CpiRunner,
    /// The run's director uuid.
    pub director_uuid: String,
    /// The run's state directory.
    pub state_dir: PathBuf,
    /// The run's containerd namespace (unused on Docker).
    pub namespace: String,
    /// The run's network name.
    pub network: String,
    /// The run's `/24`, `10.X.Y`.
    pub subnet: String,
    scratch: tempfile::TempDir,
}

/// How a spawned-and-killed call ended.
#[derive(Debug)]
pub struct Interrupted {
    /// The response, when the process finished before the kill.
    pub finished: Option<CpiResponse>,
    /// What the process wrote to stderr (its log), also when killed.
    pub stderr: String,
    /// How long after the start the kill was due.
    pub delay: Duration,
}

impl Harness {
    /// Sets up `kind` (panicking with instructions when its daemon is missing).
    pub fn new(kind: BackendKind) -> Harness {
        let run = crate::names::unique_name("crash");
        let scratch = tempfile::Builder::new()
            .prefix("cpi-crash-")
            .tempdir()
            .expect("temp dir");
        let backend = backend_name(kind);
        let state_dir = PathBuf::from(STATE_BASE).join(format!("{run}-{backend}"));
        let namespace = format!("crash-{run}");
        let hash = run
            .bytes()
            .fold(11u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        let subnet = format!("10.{}.{}", 60 + hash % 30, (hash / 30) % 250 + 1);
        let agent = json!({"mbus": "nats://crash:crash-secret@127.0.0.1:4222", "ntp": []});
        let config = match kind {
            BackendKind::Docker => {
                daemons::require_docker();
                json!({"backend": "docker", "agent": agent,
                       "docker": {"host": "unix:///var/run/docker.sock", "state_dir": state_dir}})
            }
            BackendKind::Containerd => {
                daemons::require_containerd();
                json!({"backend": "containerd", "agent": agent,
                       "containerd": {"namespace": namespace, "state_dir": state_dir}})
            }
            BackendKind::Fake => panic!("crash trials need a real backend"),
        };
        let config_path = scratch.path().join("cpi.json");
        std::fs::write(&config_path, config.to_string()).expect("write config");
        Harness {
            kind,
            runner: CpiRunner::new(config_path),
            director_uuid: format!("crash-{run}"),
            state_dir,
            namespace,
            network: format!("cpi-{run}"),
            subnet,
            scratch,
        }
    }

    fn request(&self, method: &str, args: &Value) -> Value {
        let mut req = crate::runner::request(method, args.clone(), &crate::names::unique_name("r"));
        req["context"]["director_uuid"] = json!(self.director_uuid);
        req
    }

    /// An uncrashed call.
    pub fn call(&self, method: &str, args: &Value) -> CpiResponse {
        self.runner.call_request(&self.request(method, args))
    }

    /// An uncrashed call that must succeed; its result, or what went wrong.
    pub fn ok(&self, method: &str, args: &Value) -> Result<Value, String> {
        let resp = self.call(method, args);
        if resp.is_ok() {
            Ok(resp.result)
        } else {
            Err(format!("{method} failed: {}", short(&resp)))
        }
    }

    /// Spawns `method(args)`, kills it with SIGKILL after `delay` unless it finished
    /// first, and waits for it.
    pub fn interrupted(&self, method: &str, args: &Value, delay: Duration) -> Interrupted {
        let mut line = self.request(method, args).to_string().into_bytes();
        line.push(b'\n');
        let mut cmd = Command::new(&self.runner.bin);
        crate::runner::director_env(&mut cmd)
            .arg("-configPath")
            .arg(&self.runner.config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd.spawn().expect("spawn the cpi binary");
        let out = child.stdout.take().map(drain);
        let err = child.stderr.take().map(drain);
        if let Some(mut stdin) = child.stdin.take() {
            // A child killed early closes the pipe: not an error here.
            let _ = stdin.write_all(&line);
        }
        let mut exited = None;
        while start.elapsed() < delay {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some(status);
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let status = match exited {
            Some(s) => Some(s),
            None => match child.try_wait() {
                Ok(Some(s)) => Some(s),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    None
                }
            },
        };
        let elapsed = start.elapsed();
        if status.is_none() {
            // The daemon still finishes the request the killed process had sent (an
            // import, a container create). A director's retry comes no sooner than
            // its task failed and was run again; let those requests land first.
            std::thread::sleep(SETTLE);
        }
        let stdout = out.and_then(|h| h.join().ok()).unwrap_or_default();
        let stderr = err.and_then(|h| h.join().ok()).unwrap_or_default();
        let stderr_text = String::from_utf8_lossy(&stderr).into_owned();
        let finished =
            status.map(|s| response(&stdout, &stderr, crate::process::exit_code(s), elapsed));
        Interrupted {
            finished,
            stderr: stderr_text,
            delay,
        }
    }

    /// Builds a small stemcell in the scratch directory (`version` tells it apart:
    /// a director never uploads one name and version twice).
    pub fn stemcell(&self, name: &str, version: &str) -> UnpackedStemcell {
        TestStemcell::builder()
            .version(version)
            .build_unpacked(self.scratch.path().join(name))
    }

    /// A manual network on the run's subnet with host part `host`.
    pub fn networks(&self, host: u8) -> Value {
        json!({"default": {
            "type": "manual",
            "ip": format!("{}.{host}", self.subnet),
            "netmask": "255.255.255.0",
            "gateway": format!("{}.1", self.subnet),
            "dns": [format!("{}.1", self.subnet)],
            "default": ["dns", "gateway"],
            "cloud_properties": {"name": self.network},
        }})
    }

    /// `create_vm` arguments.
    pub fn create_vm_args(&self, agent: &str, stemcell: &str, host: u8) -> Value {
        json!([agent, stemcell, {}, self.networks(host), [], {"bosh": {"group": "crash"}}])
    }

    /// Runs a shell script in a VM; its stdout, or what went wrong.
    pub fn exec(&self, vm: &str, script: &str) -> Result<String, String> {
        let out = match self.kind {
            BackendKind::Docker => docker(&["exec", vm, "/bin/sh", "-c", script]),
            BackendKind::Containerd => containerd_exec(&self.namespace, vm, script),
            BackendKind::Fake => return Err("no processes on the fake".into()),
        };
        if out.success() {
            Ok(out.stdout)
        } else {
            Err(format!(
                "exec in {vm} of {script:?} failed: {}{}",
                out.stdout, out.stderr
            ))
        }
    }

    /// Everything of this run on the daemon and under the state directory, plus the
    /// global traces (network namespaces, `/var/lib/cni/networks` allocations) of
    /// the VM cids in `cids`.
    pub fn inventory(&self, cids: &BTreeSet<String>) -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        let mut add = |what: &str, text: &str| {
            for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                found.insert(format!("{what}: {line}"));
            }
        };
        match self.kind {
            BackendKind::Docker => {
                let label = format!("label={DOCKER_DIRECTOR_LABEL}={}", self.director_uuid);
                add(
                    "container",
                    &docker(&["ps", "-a", "--filter", &label, "--format", "{{.Names}}"]).stdout,
                );
                add(
                    "volume",
                    &docker(&["volume", "ls", "--filter", &label, "--format", "{{.Name}}"]).stdout,
                );
                add(
                    "image",
                    &docker(&["images", "-a", "--filter", &label, "--format", "{{.ID}}"]).stdout,
                );
                for cid in cids {
                    let name = format!("name=^/?{cid}$");
                    add(
                        "container",
                        &docker(&["ps", "-a", "--filter", &name, "--format", "{{.Names}}"]).stdout,
                    );
                    add(
                        "volume",
                        &docker(&[
                            "volume",
                            "ls",
                            "--filter",
                            &format!("name={cid}"),
                            "--format",
                            "{{.Name}}",
                        ])
                        .stdout,
                    );
                }
            }
            BackendKind::Containerd => {
                for (what, args) in [
                    ("containerd container", &["containers", "ls", "-q"][..]),
                    ("task", &["tasks", "ls"][..]),
                    ("image", &["images", "ls", "-q"][..]),
                    ("snapshot", &["snapshots", "ls"][..]),
                    ("lease", &["leases", "ls"][..]),
                    ("content", &["content", "ls", "-q"][..]),
                ] {
                    let out = ctr(&self.namespace, args);
                    // Drop the header line of the tables.
                    let body: Vec<&str> = out
                        .stdout
                        .lines()
                        .filter(|l| {
                            !(l.starts_with("TASK") || l.starts_with("KEY") || l.starts_with("ID "))
                        })
                        .map(|l| l.split_whitespace().next().unwrap_or(""))
                        .collect();
                    add(what, &body.join("\n"));
                }
            }
            BackendKind::Fake => {}
        }
        for sub in ["vms", "cni/reservations"] {
            if let Ok(entries) = std::fs::read_dir(self.state_dir.join(sub)) {
                for e in entries.flatten() {
                    found.insert(format!("state {sub}: {}", e.file_name().to_string_lossy()));
                }
            }
        }
        // containerd's index of VM directories by owner, `agents/<key>/<cid>` (the
        // `.indexed` mark stays once made).
        if let Ok(keys) = std::fs::read_dir(self.state_dir.join("agents")) {
            for key in keys.flatten().filter(|k| k.path().is_dir()) {
                let key_name = key.file_name().to_string_lossy().into_owned();
                let entries: Vec<String> = std::fs::read_dir(key.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                if entries.is_empty() {
                    found.insert(format!("state agents: {key_name}/ (empty)"));
                }
                for entry in entries {
                    found.insert(format!("state agents: {key_name}/{entry}"));
                }
            }
        }
        if let Ok(nets) = std::fs::read_dir(self.state_dir.join("cni/host-local")) {
            for net in nets.flatten() {
                for f in std::fs::read_dir(net.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let name = f.file_name().to_string_lossy().into_owned();
                    if name != "lock" && !name.starts_with("last_reserved_ip") {
                        found.insert(format!(
                            "host-local allocation: {}/{name}",
                            net.file_name().to_string_lossy()
                        ));
                    }
                }
            }
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let root = self.state_dir.to_string_lossy().into_owned();
        for line in mountinfo.lines() {
            if let Some(point) = line.split(' ').nth(4) {
                if point.starts_with(&format!("{root}/")) {
                    found.insert(format!("mount: {point}"));
                }
            }
        }
        let netns = Command::new("ip").args(["netns", "list"]).output();
        if let Ok(out) = netns {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or("");
                if cids.contains(name) {
                    found.insert(format!("netns: {name}"));
                }
            }
        }
        if !cids.is_empty() {
            for net in std::fs::read_dir("/var/lib/cni/networks")
                .into_iter()
                .flatten()
                .flatten()
            {
                for f in std::fs::read_dir(net.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let text = std::fs::read_to_string(f.path()).unwrap_or_default();
                    if cids.iter().any(|c| text.contains(c.as_str())) {
                        found.insert(format!("cni allocation: {}", f.path().display()));
                    }
                }
            }
        }
        found
    }

    /// VM cids in the state directory now.
    pub fn vm_dirs(&self) -> BTreeSet<String> {
        std::fs::read_dir(self.state_dir.join("vms"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// Removes the run's namespace, network and state directory; returns what could
    /// not be removed (a leftover).
    pub fn finish(&self) -> Vec<String> {
        let mut left = Vec::new();
        match self.kind {
            BackendKind::Docker => {
                let _ = docker(&["network", "rm", &self.network]);
                // The backend made the state directory a shared mount of itself.
                let _ = Command::new("umount").arg(&self.state_dir).output();
            }
            BackendKind::Containerd => {
                let out = ctr("default", &["namespaces", "rm", &self.namespace]);
                if !out.success() {
                    left.push(format!(
                        "containerd namespace {} could not be removed: {}",
                        self.namespace,
                        out.stderr.trim()
                    ));
                }
            }
            BackendKind::Fake => {}
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let root = self.state_dir.to_string_lossy().into_owned();
        let mounted: Vec<&str> = mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| p.starts_with(root.as_str()))
            .collect();
        if mounted.is_empty() {
            let _ = std::fs::remove_dir_all(&self.state_dir);
        } else {
            left.push(format!(
                "still mounted under the state directory: {mounted:?}"
            ));
        }
        left
    }
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// A response from what a finished process wrote.
fn response(stdout: &[u8], stderr: &[u8], exit_code: i32, elapsed: Duration) -> CpiResponse {
    let stdout = String::from_utf8_lossy(stdout).into_owned();
    let parsed = serde_json::from_str::<Value>(stdout.trim()).ok();
    let field = |k: &str| parsed.as_ref().and_then(|r| r.get(k)).cloned();
    CpiResponse {
        result: field("result").unwrap_or(Value::Null),
        error: field("error").filter(|e| !e.is_null()).map(|e| {
            serde_json::from_value(e.clone()).unwrap_or(crate::runner::CpiErrorBody {
                type_: String::new(),
                message: e.to_string(),
                ok_to_retry: false,
            })
        }),
        log: field("log")
            .and_then(|l| l.as_str().map(str::to_owned))
            .unwrap_or_default(),
        response: parsed,
        stdout,
        stderr: String::from_utf8_lossy(stderr).into_owned(),
        exit_code,
        elapsed,
    }
}

fn short(resp: &CpiResponse) -> String {
    match &resp.error {
        Some(e) => format!("{}: {}", e.type_, e.message),
        None => format!("{:?}", resp.problems()),
    }
}

fn backend_name(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Docker => "docker",
        BackendKind::Containerd => "containerd",
        BackendKind::Fake => "fake",
    }
}

/// The VM cids (`vm-<uuid>`, `c-<uuid>`) named in `text`.
pub fn cids_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    for prefix in ["vm-", "c-"] {
        let mut from = 0;
        while let Some(pos) = text[from..].find(prefix) {
            let start = from + pos;
            let id_start = start + prefix.len();
            let boundary = start == 0 || !bytes[start - 1].is_ascii_alphanumeric();
            if boundary && text.len() >= id_start + 36 {
                let id = &text[id_start..id_start + 36];
                if uuid::Uuid::parse_str(id).is_ok() && id.len() == 36 {
                    out.insert(format!("{prefix}{id}"));
                }
            }
            from = id_start;
        }
    }
    out
}

fn vm_cid(result: &Value) -> Option<String> {
    result
        .get(0)
        .and_then(Value::as_str)
        .or_else(|| result.as_str())
        .map(str::to_owned)
}

fn diff(before: &BTreeSet<String>, after: &BTreeSet<String>) -> Vec<String> {
    after.difference(before).cloned().collect()
}

/// What the trials of one method share: a stemcell, a disk with a marker, a VM that
/// stays up (for attach/detach and for reading the disk after the others).
struct Fixture {
    stemcell: String,
    image_path: PathBuf,
    disk: String,
    marker: String,
    vm: String,
}

const MARKER_FILE: &str = "crash-marker";
const FIXTURE_HOST: u8 = 3;
const TRIAL_HOST: u8 = 10;

impl Harness {
    fn fixture(&self) -> Result<Fixture, String> {
        let sc = self.stemcell("stemcell", "0.0.1");
        // The stemcell create_stemcell trials upload (another version).
        let trial_sc = self.stemcell("trial-stemcell", "0.0.2");
        let stemcell = self
            .ok("create_stemcell", &json!([sc.image_path, {}]))?
            .as_str()
            .ok_or("create_stemcell answered no cid")?
            .to_owned();
        let vm = vm_cid(&self.ok(
            "create_vm",
            &self.create_vm_args("agent-crash-fixture", &stemcell, FIXTURE_HOST),
        )?)
        .ok_or("create_vm answered no cid")?;
        let disk = self
            .ok("create_disk", &json!([64, {}, vm]))?
            .as_str()
            .ok_or("create_disk answered no cid")?
            .to_owned();
        self.ok("attach_disk", &json!([vm, disk]))?;
        let marker = crate::names::unique_name("marker");
        self.exec(
            &vm,
            &format!("echo {marker} > /warden-cpi-dev/{disk}/{MARKER_FILE} && sync"),
        )?;
        self.ok("detach_disk", &json!([vm, disk]))?;
        Ok(Fixture {
            stemcell,
            image_path: trial_sc.image_path.clone(),
            disk,
            marker,
            vm,
        })
    }

    fn teardown_fixture(&self, f: &Fixture) -> Vec<String> {
        let mut problems = Vec::new();
        let _ = self.call("detach_disk", &json!([f.vm, f.disk]));
        for (m, a) in [
            ("delete_vm", json!([f.vm])),
            ("delete_disk", json!([f.disk])),
            ("delete_stemcell", json!([f.stemcell])),
        ] {
            if let Err(e) = self.ok(m, &a) {
                problems.push(e);
            }
        }
        problems
    }

    /// Reads the marker through `vm` (the disk must be attached there).
    fn marker_in(&self, vm: &str, f: &Fixture) -> Result<String, String> {
        self.exec(vm, &format!("cat /warden-cpi-dev/{}/{MARKER_FILE}", f.disk))
            .map(|s| s.trim().to_owned())
    }

    /// Attaches the disk to the fixture VM, reads the marker, detaches it.
    fn check_data(&self, f: &Fixture) -> Result<bool, String> {
        self.ok("attach_disk", &json!([f.vm, f.disk]))?;
        let read = self.marker_in(&f.vm, f);
        self.ok("detach_disk", &json!([f.vm, f.disk]))?;
        Ok(read? == f.marker)
    }

    /// Whether the VM's settings list the disk (read inside the VM).
    fn settings_list(&self, vm: &str, disk: &str) -> Result<bool, String> {
        let text = self.exec(vm, "cat /var/vcap/bosh/warden-cpi-agent-env.json")?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("settings: {e}: {text}"))?;
        Ok(v["disks"]["persistent"].get(disk).is_some())
    }
}

/// Runs `trials` crash trials of `method` on `h` with kill delays from `rng`.
pub fn run(h: &Harness, method: Method, trials: usize, rng: &mut Rng) -> Report {
    let mut report = Report {
        method: method.name().to_owned(),
        backend: backend_name(h.kind).to_owned(),
        ..Default::default()
    };
    let fixture = match h.fixture() {
        Ok(f) => f,
        Err(e) => {
            report.problem(0, format!("setting up: {e}"));
            return report;
        }
    };
    let measured = match measure(h, method, &fixture) {
        Ok(d) => d,
        Err(e) => {
            report.problem(0, format!("measuring an uncrashed call: {e}"));
            report.problems.extend(h.teardown_fixture(&fixture));
            return report;
        }
    };
    report.measured = measured;
    for i in 1..=trials {
        let delay = measured.mul_f64(1.2 * rng.next_f64());
        let before = h.inventory(&BTreeSet::new());
        report.trials += 1;
        let outcome = trial(h, method, &fixture, i, delay, &mut report);
        let (cids, recovered) = match outcome {
            Ok(c) => (c, true),
            Err((c, e)) => {
                report.recovery_failures += 1;
                report.problem(i, e);
                (c, false)
            }
        };
        // Global traces (netns, CNI allocations) of the trial's cids cannot have
        // existed before it: the cids are new.
        let after = h.inventory(&cids);
        let left = diff(&before, &after);
        if !left.is_empty() {
            report.leftovers += left.len();
            report.problem(i, format!("left behind: {}", left.join(", ")));
        }
        let gone = diff(&after, &before);
        if recovered && !gone.is_empty() {
            report.problem(i, format!("missing after recovery: {}", gone.join(", ")));
        }
    }
    report.problems.extend(h.teardown_fixture(&fixture));
    report
}

fn measure(h: &Harness, method: Method, f: &Fixture) -> Result<Duration, String> {
    let timed = |m: &str, a: &Value| -> Result<(Value, Duration), String> {
        let resp = h.call(m, a);
        if resp.is_ok() {
            Ok((resp.result, resp.elapsed))
        } else {
            Err(format!("{m}: {}", short(&resp)))
        }
    };
    match method {
        Method::CreateVm => {
            let (r, d) = timed(
                "create_vm",
                &h.create_vm_args("agent-crash-measure", &f.stemcell, TRIAL_HOST),
            )?;
            let vm = vm_cid(&r).ok_or("no cid")?;
            h.ok("delete_vm", &json!([vm]))?;
            Ok(d)
        }
        Method::AttachDisk => {
            let (_, d) = timed("attach_disk", &json!([f.vm, f.disk]))?;
            h.ok("detach_disk", &json!([f.vm, f.disk]))?;
            Ok(d)
        }
        Method::DetachDisk => {
            h.ok("attach_disk", &json!([f.vm, f.disk]))?;
            let (_, d) = timed("detach_disk", &json!([f.vm, f.disk]))?;
            Ok(d)
        }
        Method::DeleteVm => {
            let vm = vm_cid(&h.ok(
                "create_vm",
                &h.create_vm_args("agent-crash-measure", &f.stemcell, TRIAL_HOST),
            )?)
            .ok_or("no cid")?;
            h.ok("attach_disk", &json!([vm, f.disk]))?;
            let (_, d) = timed("delete_vm", &json!([vm]))?;
            Ok(d)
        }
        Method::CreateStemcell => {
            let (r, d) = timed("create_stemcell", &json!([f.image_path, {}]))?;
            h.ok("delete_stemcell", &json!([r]))?;
            Ok(d)
        }
    }
}

type TrialResult = Result<BTreeSet<String>, (BTreeSet<String>, String)>;

/// One trial: interrupt, recover, check the method's own postconditions. Returns the
/// VM cids the trial saw (for the global leftovers check).
fn trial(
    h: &Harness,
    method: Method,
    f: &Fixture,
    i: usize,
    delay: Duration,
    report: &mut Report,
) -> TrialResult {
    let mut cids = BTreeSet::new();
    let outcome = trial_steps(h, method, f, i, delay, report, &mut cids);
    match outcome {
        Ok(()) => Ok(cids),
        Err(e) => {
            // Best effort: leave the next trial a clean slate.
            for vm in h.vm_dirs().into_iter().filter(|v| v != &f.vm) {
                cids.insert(vm.clone());
                let _ = h.call("delete_vm", &json!([vm]));
            }
            let _ = h.call("detach_disk", &json!([f.vm, f.disk]));
            Err((cids, e))
        }
    }
}

/// What the CPI logs when it finds and removes, reuses or finishes the work of a
/// killed call (the `repaired` column counts retries that logged one).
const REPAIR_MARKERS: [&str; 5] = [
    "earlier attempt of this create_vm",
    "CPI process that died",
    "imported already",
    "interrupted detach",
    "already",
];

/// Retries an interrupted call the way the director would; its result. `accept`
/// is an error type that also means success (the killed call had finished).
fn retry(
    h: &Harness,
    report: &mut Report,
    method: &str,
    args: &Value,
    accept: Option<&str>,
) -> Result<Value, String> {
    let resp = h.call(method, args);
    if !(resp.is_ok() || (accept.is_some() && resp.error_type() == accept)) {
        return Err(format!("retry of {method}: {}", short(&resp)));
    }
    report.retries_ok += 1;
    if REPAIR_MARKERS.iter().any(|m| resp.stderr.contains(m)) {
        report.repaired += 1;
    }
    Ok(resp.result)
}

/// Notes how the interrupted call ended; returns its response when it finished.
fn note(
    report: &mut Report,
    run: &Interrupted,
    f: &Fixture,
    cids: &mut BTreeSet<String>,
) -> Option<CpiResponse> {
    // The fixture VM lives on; its cid is in the logs of attach and detach.
    cids.extend(cids_in(&run.stderr).into_iter().filter(|c| c != &f.vm));
    match &run.finished {
        Some(resp) => {
            report.finished_first += 1;
            if !resp.is_ok() {
                report.problems.push(format!(
                    "{} {}: an uninterrupted call failed: {}",
                    report.backend,
                    report.method,
                    short(resp)
                ));
            }
            Some(resp.clone())
        }
        None => {
            report.killed_during += 1;
            None
        }
    }
}

#[allow(
    clippy::too_many_arguments,
    reason = "one trial's state, threaded through its steps"
)]
fn trial_steps(
    h: &Harness,
    method: Method,
    f: &Fixture,
    i: usize,
    delay: Duration,
    report: &mut Report,
    cids: &mut BTreeSet<String>,
) -> Result<(), String> {
    match method {
        Method::CreateVm => {
            let args = h.create_vm_args(&format!("agent-crash-{i}"), &f.stemcell, TRIAL_HOST);
            let run = h.interrupted("create_vm", &args, delay);
            let finished = note(report, &run, f, cids);
            cids.extend(h.vm_dirs().into_iter().filter(|v| v != &f.vm));
            let vm = match finished.filter(CpiResponse::is_ok) {
                Some(resp) => vm_cid(&resp.result).ok_or("no cid")?,
                None => vm_cid(&retry(h, report, "create_vm", &args, None)?)
                    .ok_or("retry answered no cid")?,
            };
            cids.insert(vm.clone());
            h.exec(&vm, "true")
                .map_err(|e| format!("the VM does not run: {e}"))?;
            h.ok("delete_vm", &json!([vm]))?;
        }
        Method::AttachDisk => {
            let args = json!([f.vm, f.disk]);
            let run = h.interrupted("attach_disk", &args, delay);
            let finished = note(report, &run, f, cids);
            if !finished.as_ref().is_some_and(CpiResponse::is_ok) {
                retry(h, report, "attach_disk", &args, None)?;
            }
            let disks = h.ok("get_disks", &json!([f.vm]))?;
            if disks != json!([f.disk]) {
                return Err(format!("get_disks after attach: {disks}"));
            }
            if !h.settings_list(&f.vm, &f.disk)? {
                return Err("the settings do not list the attached disk".into());
            }
            report.data_checked += 1;
            if h.marker_in(&f.vm, f)? == f.marker {
                report.data_intact += 1;
            } else {
                return Err("the marker on the disk changed".into());
            }
            h.ok("detach_disk", &args)?;
        }
        Method::DetachDisk => {
            let args = json!([f.vm, f.disk]);
            h.ok("attach_disk", &args)?;
            let run = h.interrupted("detach_disk", &args, delay);
            let finished = note(report, &run, f, cids);
            if !finished.as_ref().is_some_and(CpiResponse::is_ok) {
                // DiskNotAttached: the killed call had finished the detach.
                retry(
                    h,
                    report,
                    "detach_disk",
                    &args,
                    Some("Bosh::Clouds::DiskNotAttached"),
                )?;
            }
            let disks = h.ok("get_disks", &json!([f.vm]))?;
            if disks != json!([]) {
                return Err(format!("get_disks after detach: {disks}"));
            }
            if h.settings_list(&f.vm, &f.disk)? {
                return Err("the settings still list the detached disk".into());
            }
            let visible = h.exec(
                &f.vm,
                &format!(
                    "ls /warden-cpi-dev/{}/{MARKER_FILE} 2>/dev/null || true",
                    f.disk
                ),
            )?;
            if !visible.trim().is_empty() {
                return Err("the disk is still visible in the VM".into());
            }
            report.data_checked += 1;
            if h.check_data(f)? {
                report.data_intact += 1;
            } else {
                return Err("the marker on the disk changed".into());
            }
        }
        Method::DeleteVm => {
            let vm = vm_cid(&h.ok(
                "create_vm",
                &h.create_vm_args(&format!("agent-crash-{i}"), &f.stemcell, TRIAL_HOST),
            )?)
            .ok_or("no cid")?;
            cids.insert(vm.clone());
            h.ok("attach_disk", &json!([vm, f.disk]))?;
            let run = h.interrupted("delete_vm", &json!([vm]), delay);
            let finished = note(report, &run, f, cids);
            if !finished.as_ref().is_some_and(CpiResponse::is_ok) {
                retry(h, report, "delete_vm", &json!([vm]), None)?;
            }
            if h.ok("has_vm", &json!([vm]))? != json!(false) {
                return Err("has_vm is still true after delete_vm".into());
            }
            report.data_checked += 1;
            if h.check_data(f)? {
                report.data_intact += 1;
            } else {
                return Err("the marker on the disk changed".into());
            }
        }
        Method::CreateStemcell => {
            let args = json!([f.image_path, {}]);
            let run = h.interrupted("create_stemcell", &args, delay);
            let finished = note(report, &run, f, cids);
            let cid = match finished.filter(CpiResponse::is_ok) {
                Some(resp) => resp.result,
                None => retry(h, report, "create_stemcell", &args, None)?,
            };
            // The stemcell works: a VM boots from it.
            let vm = vm_cid(&h.ok(
                "create_vm",
                &h.create_vm_args(
                    &format!("agent-crash-sc-{i}"),
                    cid.as_str().unwrap_or(""),
                    TRIAL_HOST,
                ),
            )?)
            .ok_or("no cid")?;
            cids.insert(vm.clone());
            h.ok("delete_vm", &json!([vm]))?;
            h.ok("delete_stemcell", &json!([cid]))?;
        }
    }
    Ok(())
}

/// Runs every method in `methods` on `kind`, `trials` each; the reports, and what
/// the run's final cleanup could not remove (a leftover too).
pub fn run_backend(
    kind: BackendKind,
    methods: &[Method],
    trials: usize,
    seed: u64,
) -> (Vec<Report>, Vec<String>) {
    let h = Harness::new(kind);
    let mut rng = Rng::new(seed);
    let mut reports = Vec::new();
    for &m in methods {
        let started = Instant::now();
        let r = run(&h, m, trials, &mut rng);
        tracing_line(&format!(
            "{} {}: {} trials in {:.0?}, {} problems",
            r.backend,
            r.method,
            r.trials,
            started.elapsed(),
            r.problems.len()
        ));
        reports.push(r);
    }
    let mut left: Vec<String> = h
        .inventory(&BTreeSet::new())
        .into_iter()
        .map(|l| format!("{}: at the end: {l}", backend_name(kind)))
        .collect();
    left.extend(h.finish());
    (reports, left)
}

/// The table of reports, one line per method × backend.
pub fn table(reports: &[Report]) -> String {
    let mut out = format!(
        "{:<16} {:<11} {:>6} {:>9} {:>7} {:>7} {:>8} {:>8} {:>9} {:>9} {:>11}\n",
        "method",
        "backend",
        "trials",
        "call",
        "killed",
        "done",
        "retry ok",
        "repaired",
        "rec.fail",
        "leftover",
        "data intact"
    );
    for r in reports {
        out.push_str(&format!(
            "{:<16} {:<11} {:>6} {:>8.2}s {:>7} {:>7} {:>8} {:>8} {:>9} {:>9} {:>6}/{:<4}\n",
            r.method,
            r.backend,
            r.trials,
            r.measured.as_secs_f64(),
            r.killed_during,
            r.finished_first,
            r.retries_ok,
            r.repaired,
            r.recovery_failures,
            r.leftovers,
            r.data_intact,
            r.data_checked,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_vm_cids_in_logs() {
        let text = "INFO creating VM vm_cid=vm-0c6b6f0e-7d4b-4f2c-9d7c-1b2a3c4d5e6f stemcell=x\n\
                    vm_cid=c-11111111-2222-4333-8444-555555555555; xc-11111111-2222-4333-8444-555555555555 vm-nope";
        let cids = cids_in(text);
        assert_eq!(
            cids.into_iter().collect::<Vec<_>>(),
            vec![
                "c-11111111-2222-4333-8444-555555555555".to_owned(),
                "vm-0c6b6f0e-7d4b-4f2c-9d7c-1b2a3c4d5e6f".to_owned()
            ]
        );
    }

    #[test]
    fn delays_spread_over_the_unit_interval() {
        let mut rng = Rng::new(42);
        let xs: Vec<f64> = (0..1000).map(|_| rng.next_f64()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let low = xs.iter().filter(|x| **x < 0.5).count();
        assert!((400..600).contains(&low), "{low}");
    }

    #[test]
    fn methods_parse_by_name() {
        for m in Method::ALL {
            assert_eq!(Method::parse(m.name()), Some(m));
        }
        assert_eq!(Method::parse("reboot_vm"), None);
    }
}
