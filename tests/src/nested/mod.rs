//! Nested runs: the CPI inside a CI container, tested for real.
//!
//! A nested test has two halves in one test function of one test binary:
//!
//! - **outside** (on this machine): builds a tiny root filesystem (directories,
//!   merged-`/usr` symlinks, a minimal `/etc`), `docker import`s it (no registry),
//!   and starts the *outer* container from it with this machine's `/usr` bound in
//!   read-only (containerd, runc, ctr, dockerd, iptables, the CNI plugins, busybox:
//!   nothing is downloaded). The runtime's storage (`/var/lib/containerd`,
//!   `/var/lib/docker`) and the CPI's state root are host directories bound in, not
//!   the outer container's overlay root. Then it runs [`SETUP_SCRIPT`] in the outer
//!   container (writable cgroups, then containerd and, for the Docker backend,
//!   dockerd), and runs *this same test binary* in there with [`INSIDE_ENV`] set;
//! - **inside** ([`run_inside`]): the conformance suites
//!   ([`lifecycle`](crate::conformance::lifecycle) with live disk attach,
//!   [`networks`](crate::conformance::networks),
//!   [`error_paths`](crate::conformance::error_paths)) against the inner daemon,
//!   whose sockets are at the default paths there, then `cpi doctor` in the
//!   supported set-up (no blocker) and in two broken ones (state directory on the
//!   overlay root: a blocker on containerd, a warning on Docker; a read-only cgroup
//!   hierarchy: a blocker).
//!
//! Files: `rootfs.rs` (the outer root filesystem and the setup script), `outer.rs`
//! (the outer container and its privileges), `doctor.rs` (running `cpi doctor` and
//! what it must say); the two halves are here.
//!
//! The outer container cannot be `--privileged` on a host whose bounding set lacks a
//! capability (this project's CI machine lacks `CAP_SYS_RESOURCE`: runc refuses).
//! It then gets what [`outer_privilege_args`] says: every capability the host has,
//! no seccomp/AppArmor confinement, unmasked `/proc`, every device in the device
//! cgroup; the setup script makes `/sys` and the cgroup hierarchies writable, which
//! is the rest of what `--privileged` gives. See `docs/nested-ci.md`.
//!
//! [`Outer`] removes the outer container, its image and the host directories when it
//! is dropped (also when the test fails); killing the outer container's PID 1 ends
//! every inner process, and the inner mounts, network namespaces and iptables rules
//! live and die in its namespaces.

mod doctor;
mod outer;
mod rootfs;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::conformance::{self, BackendKind, Target, STATE_ROOT};
use crate::daemons::{self, run_command as run, CliOutput};

pub use doctor::{assert_supported_report, doctor, finding};
use doctor::{status, write_config};
pub use outer::{missing_capabilities, outer_privilege_args, Outer};
pub use rootfs::{rootfs_tar, CONTAINERD_CONFIG, SETUP_SCRIPT};

/// Set (to `containerd` or `docker`) in the environment of the test binary when it
/// runs inside the outer container.
pub const INSIDE_ENV: &str = "CPI_NESTED_INSIDE";

/// Where the host directories of nested runs live by default (next to
/// `scripts/lib.sh`'s state); [`HOST_ROOT_ENV`] overrides it. It must be on a
/// filesystem that can hold overlayfs upper directories (ext4, xfs), not overlay.
pub const HOST_ROOT: &str = "/var/lib/cpi-test/nested";

/// Environment variable naming another directory for [`HOST_ROOT`].
pub const HOST_ROOT_ENV: &str = "CPI_TEST_NESTED_DIR";

/// [`HOST_ROOT`], or the directory in [`HOST_ROOT_ENV`].
pub fn host_root() -> PathBuf {
    std::env::var_os(HOST_ROOT_ENV)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(HOST_ROOT))
}

/// The label on outer containers and their images (value: the container name).
pub const LABEL: &str = "cpi-tests.nested";

/// How long the inner suite may take.
const INNER_TIMEOUT: Duration = Duration::from_secs(600);
const SHORT_TIMEOUT: Duration = Duration::from_secs(120);

/// The PATH inside the outer container.
const INNER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Which inner daemon a nested run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// containerd inside, the containerd backend.
    Containerd,
    /// containerd and dockerd inside, the Docker backend.
    Docker,
}

impl Backend {
    /// `containerd` or `docker`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Containerd => "containerd",
            Backend::Docker => "docker",
        }
    }

    fn kind(self) -> BackendKind {
        match self {
            Backend::Containerd => BackendKind::Containerd,
            Backend::Docker => BackendKind::Docker,
        }
    }
}

/// Whether this process is the inner half of a nested run.
pub fn inside() -> bool {
    std::env::var_os(INSIDE_ENV).is_some_and(|v| !v.is_empty())
}

#[allow(
    clippy::print_stderr,
    reason = "the doctor reports and the inner suite's output are for the person reading the test log (--nocapture)"
)]
fn show(title: &str, text: &str) {
    eprintln!(
        "===== {title} =====\n{}\n===== end of {title} =====",
        text.trim_end()
    );
}

fn docker(args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> CliOutput {
    let host = format!("unix://{}", daemons::DOCKER_SOCKET);
    let mut full = vec!["-H", host.as_str()];
    full.extend_from_slice(args);
    run("docker", &full, stdin, timeout)
}

/// The outer half: checks the doctor on this machine, starts the outer container,
/// runs the inner half (`test_name` of this test binary) in it, cleans up.
///
/// # Panics
/// When anything fails; the inner suite's output and the inner daemons' logs are in
/// the message or the test output.
pub fn run_outside(backend: Backend, test_name: &str) {
    daemons::require_docker();
    if backend == Backend::Containerd {
        daemons::require_containerd();
    }
    let cpi = crate::runner::cpi_bin();
    let suite = std::env::current_exe().expect("the test binary's path");

    // The doctor on this machine, against the shared daemon the host suites use.
    let scratch = tempfile::Builder::new()
        .prefix("cpi-nested-")
        .tempdir()
        .expect("temp dir");
    let host_state = PathBuf::from(STATE_ROOT).join(crate::names::unique_name("doctor-host"));
    let config = write_config(scratch.path(), "host.json", backend, &host_state);
    let (text, doc, code) = doctor(&cpi, &config);
    show(
        &format!("cpi doctor on this machine ({})", backend.name()),
        &text,
    );
    assert_supported_report(backend, &doc, code, &text);
    assert!(
        !host_state.exists(),
        "the doctor left the state directory it created: {}",
        host_state.display()
    );

    let mut outer = Outer::start(backend, &cpi, &suite);
    show(
        "outer container",
        &format!("docker {}", outer.run_args.join(" ")),
    );
    let setup = outer.exec(
        &[],
        &["sh", "/nested/setup.sh", backend.name()],
        SHORT_TIMEOUT,
    );
    assert!(
        setup.success(),
        "setting up the outer container failed ({}):\n{}\n{}\n{}",
        setup.exit_code,
        setup.stdout,
        setup.stderr,
        outer.daemon_logs()
    );
    show("outer container setup", &setup.stdout);

    let inner = outer.exec(
        &[
            (INSIDE_ENV, backend.name()),
            ("CPI_BIN", "/nested/bin/cpi"),
            ("RUST_BACKTRACE", "1"),
            ("HOME", "/root"),
        ],
        &[
            "/nested/bin/suite",
            "--exact",
            test_name,
            "--nocapture",
            "--test-threads=1",
        ],
        INNER_TIMEOUT,
    );
    show("inner suite (stdout)", &inner.stdout);
    show("inner suite (stderr)", &inner.stderr);
    if !inner.success() {
        show("inner daemon logs", &outer.daemon_logs());
    }
    assert!(
        inner.success() && inner.stdout.contains("test result: ok. 1 passed"),
        "the inner suite failed (exit {}) or did not run exactly one test ({test_name}); its output is above",
        inner.exit_code
    );
    // Proof that the VMs ran under the inner daemon: its shims started tasks (the
    // lifecycle's VM 1, VM 2 and VM 2 again after reboot_vm, one VM of `networks`
    // and one of `error_paths`) in the namespace the backend uses (the conformance
    // namespace; dockerd's `moby`).
    let namespace = match backend {
        Backend::Containerd => conformance::CONTAINERD_TEST_NAMESPACE,
        Backend::Docker => "moby",
    };
    let started = outer.exec(
        &[],
        &[
            "grep",
            "-c",
            &format!("msg=\"starting signal loop\" namespace={namespace} "),
            "/var/log/containerd.log",
        ],
        SHORT_TIMEOUT,
    );
    let tasks: u32 = started.stdout.trim().parse().unwrap_or(0);
    show(
        "inner containerd",
        &format!("{tasks} tasks started in namespace {namespace} (from /var/log/containerd.log)"),
    );
    assert!(
        tasks >= 5,
        "the inner containerd started {tasks} tasks in namespace {namespace}; the suites start at least 5 ({})",
        started.stderr.trim()
    );
    let problems = outer.cleanup();
    assert!(
        problems.is_empty(),
        "the nested run left things behind:\n{}",
        problems.join("\n")
    );
}

/// The inner half, in the outer container: the conformance lifecycle, networks and
/// error paths against the inner daemon, then the doctor in the supported set-up and
/// in two broken ones.
///
/// # Panics
/// When the lifecycle or a doctor expectation fails.
pub fn run_inside(backend: Backend) {
    assert_eq!(
        std::env::var(INSIDE_ENV).ok().as_deref(),
        Some(backend.name()),
        "the inner half runs for the backend the outer half asked for"
    );
    let root = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let state_fs = root
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(STATE_ROOT))
        .filter_map(|l| l.split(" - ").nth(1))
        .filter_map(|rest| rest.split(' ').next())
        .next_back()
        .unwrap_or("none")
        .to_owned();
    assert_ne!(
        state_fs, "overlay",
        "{STATE_ROOT} must be a volume, not the outer container's overlay root"
    );

    let target = Target::new(backend.kind(), &format!("nested-{}", backend.name()));
    conformance::lifecycle(&target);
    conformance::networks(&Target::new(
        backend.kind(),
        &format!("nested-{}-net", backend.name()),
    ));
    conformance::error_paths(&Target::new(
        backend.kind(),
        &format!("nested-{}-err", backend.name()),
    ));

    let cpi = crate::runner::cpi_bin();
    let scratch = tempfile::Builder::new()
        .prefix("cpi-nested-doctor-")
        .tempdir()
        .expect("temp dir");

    // Supported: state directory on the volume.
    let good_state = PathBuf::from(STATE_ROOT).join(crate::names::unique_name("doctor"));
    let good = write_config(scratch.path(), "good.json", backend, &good_state);
    let (text, doc, code) = doctor(&cpi, &good);
    show(
        &format!(
            "cpi doctor inside the nested container ({})",
            backend.name()
        ),
        &text,
    );
    assert_supported_report(backend, &doc, code, &text);

    // Broken: the state directory on the outer container's overlay root. On
    // containerd it holds the VMs' disks and the live-attach mounts: a blocker. On
    // Docker it holds only per-VM directories (disks are volumes in the data root,
    // which is on the volume here): a warning, the run still works.
    let on_overlay = PathBuf::from("/var/lib").join(crate::names::unique_name("state-on-overlay"));
    let bad = write_config(scratch.path(), "overlay.json", backend, &on_overlay);
    let (text, doc, code) = doctor(&cpi, &bad);
    show("cpi doctor, state directory on the overlay root", &text);
    let (want_code, want_status) = match backend {
        Backend::Containerd => (2, "blocker"),
        Backend::Docker => (0, "warn"),
    };
    assert_eq!(code, want_code, "{text}");
    assert_eq!(status(&doc, "overlay"), want_status, "{text}");
    let overlay = finding(&doc, "overlay");
    assert!(
        overlay["summary"]
            .as_str()
            .unwrap_or_default()
            .contains("on overlay")
            && overlay["fix"]
                .as_str()
                .unwrap_or_default()
                .contains("volume"),
        "the overlay finding must say why and what to do: {overlay}"
    );
    assert!(
        !on_overlay.exists(),
        "the doctor left the state directory it created: {}",
        on_overlay.display()
    );

    // Broken: a cgroup hierarchy read-only (a container not made writable).
    let hierarchy = "/sys/fs/cgroup/cpu";
    let cgroup_v1 = Path::new(hierarchy).is_dir()
        && root.lines().any(|l| l.split(' ').nth(4) == Some(hierarchy));
    if cgroup_v1 {
        let remount = |mode: &str| {
            run(
                "mount",
                &["-o", &format!("remount,bind,{mode}"), hierarchy],
                None,
                SHORT_TIMEOUT,
            )
            .expect_success()
        };
        remount("ro");
        let (text, doc, code) = doctor(&cpi, &good);
        remount("rw");
        show("cpi doctor, a read-only cgroup hierarchy", &text);
        assert_eq!(code, 2, "a blocker must exit 2:\n{text}");
        let cgroup = finding(&doc, "cgroup");
        assert_eq!(cgroup["status"], "blocker", "{text}");
        assert!(
            cgroup["summary"]
                .as_str()
                .unwrap_or_default()
                .contains(hierarchy)
                && cgroup["fix"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("remount"),
            "the cgroup blocker must name the hierarchy and the fix: {cgroup}"
        );
    }
}
