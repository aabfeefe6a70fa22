//! The outer container: its privileges and its life cycle (start, exec, cleanup).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{docker, host_root, rootfs_tar, show, Backend, INNER_PATH, LABEL, SHORT_TIMEOUT};
use crate::conformance::STATE_ROOT;
use crate::daemons::CliOutput;

/// The capabilities of `0..=cap_last_cap` missing from this process's bounding set,
/// as Docker spells them (`SYS_RESOURCE`).
pub fn missing_capabilities() -> Vec<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap_or(0);
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(40);
    backend_caps::names(bounding, last)
}

/// Capability names by number (kept here so the test kit needs no backend crate).
mod backend_caps {
    const NAMES: [&str; 41] = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];

    pub(super) fn names(bounding: u64, last: u32) -> Vec<String> {
        (0..=last.min(63))
            .filter(|bit| bounding & (1u64 << bit) == 0)
            .map(|bit| {
                NAMES
                    .get(bit as usize)
                    .map(|n| (*n).to_owned())
                    .unwrap_or_else(|| format!("CAP_{bit}"))
            })
            .collect()
    }
}

/// The `docker run` options that make the outer container privileged, or as
/// privileged as this host allows: `--privileged` when the bounding set is full;
/// otherwise `--cap-add ALL` and a `--cap-drop` for each capability the host lacks
/// (runc cannot grant them), with seccomp and AppArmor unconfined, `/proc` unmasked
/// (`systempaths=unconfined`) and every device allowed in the device cgroup (the
/// inner runc creates device nodes for the VMs).
pub fn outer_privilege_args(missing: &[String]) -> Vec<String> {
    if missing.is_empty() {
        return vec!["--privileged".to_owned()];
    }
    let mut args: Vec<String> = ["--cap-add", "ALL"].map(str::to_owned).to_vec();
    for cap in missing {
        args.push("--cap-drop".to_owned());
        args.push(cap.clone());
    }
    for opt in [
        "seccomp=unconfined",
        "apparmor=unconfined",
        "systempaths=unconfined",
    ] {
        args.push("--security-opt".to_owned());
        args.push(opt.to_owned());
    }
    args.push("--device-cgroup-rule".to_owned());
    args.push("a *:* rwm".to_owned());
    args
}

/// The outer container of one nested run, its image and its host directories;
/// removed on drop.
pub struct Outer {
    /// The container's (and image's) name.
    pub name: String,
    /// The container's full id (its cgroup is `docker/<id>` on cgroup v1).
    pub id: String,
    image: String,
    /// The host directory holding the volumes.
    pub dir: PathBuf,
    /// The `docker run` command line, for the report.
    pub run_args: Vec<String>,
    cleaned: bool,
}

impl Outer {
    /// Builds the root filesystem, imports it and starts the outer container for
    /// `backend` with `cpi` and `suite` (this test binary) bound in.
    ///
    /// # Panics
    /// When any step fails (after removing what was made).
    pub fn start(backend: Backend, cpi: &Path, suite: &Path) -> Outer {
        let name = crate::names::unique_name(&format!("nested-{}", backend.name()));
        let dir = host_root().join(&name);
        let mut outer = Outer {
            image: format!("cpi-tests-nested:{name}"),
            name,
            id: String::new(),
            dir,
            run_args: Vec::new(),
            cleaned: false,
        };
        let mut volumes = vec![
            ("containerd", "/var/lib/containerd"),
            ("cpi-state", STATE_ROOT),
        ];
        if backend == Backend::Docker {
            volumes.push(("docker", "/var/lib/docker"));
        }
        for (sub, _) in &volumes {
            let path = outer.dir.join(sub);
            std::fs::create_dir_all(&path)
                .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        }
        let tar = rootfs_tar().expect("building the outer root filesystem");
        let label = format!("LABEL {LABEL}={}", outer.name);
        docker(
            &["import", "--change", &label, "-", &outer.image],
            Some(&tar),
            SHORT_TIMEOUT,
        )
        .expect_success();

        let mut args: Vec<String> = [
            "run",
            "-d",
            "--name",
            &outer.name,
            "--hostname",
            "nested",
            "--label",
            &format!("{LABEL}={}", outer.name),
        ]
        .map(str::to_owned)
        .to_vec();
        // No network from this machine: nothing is downloaded, and the inner
        // daemons make their bridges in the outer container's own network
        // namespace, so the run needs nothing of this machine's Docker networking.
        args.extend(["--network".to_owned(), "none".to_owned()]);
        args.extend(outer_privilege_args(&missing_capabilities()));
        args.extend(["--tmpfs".to_owned(), "/run:rw,exec,mode=755".to_owned()]);
        args.extend(["-v".to_owned(), "/usr:/usr:ro".to_owned()]);
        for (sub, at) in &volumes {
            args.push("-v".to_owned());
            args.push(format!("{}:{at}", outer.dir.join(sub).display()));
        }
        args.push("-v".to_owned());
        args.push(format!("{}:/nested/bin/cpi:ro", cpi.display()));
        args.push("-v".to_owned());
        args.push(format!("{}:/nested/bin/suite:ro", suite.display()));
        args.extend([outer.image.clone(), "/bin/sleep".into(), "infinity".into()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        outer.id = docker(&refs, None, SHORT_TIMEOUT).expect_success();
        outer.run_args = args;
        outer
    }

    /// Runs `args` in the outer container with `env` (and the inner PATH).
    pub fn exec(&self, env: &[(&str, &str)], args: &[&str], timeout: Duration) -> CliOutput {
        let mut full: Vec<String> = vec!["exec".into(), "-e".into(), format!("PATH={INNER_PATH}")];
        for (k, v) in env {
            full.push("-e".into());
            full.push(format!("{k}={v}"));
        }
        full.push(self.name.clone());
        full.extend(args.iter().map(|a| (*a).to_owned()));
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        docker(&refs, None, timeout)
    }

    /// The inner daemons' logs, for a failure message.
    pub fn daemon_logs(&self) -> String {
        self.exec(
            &[],
            &[
                "sh",
                "-c",
                "for f in /var/log/containerd.log /var/log/dockerd.log; do [ -f $f ] && { echo \"--- $f\"; tail -n 60 $f; }; done; true",
            ],
            SHORT_TIMEOUT,
        )
        .stdout
    }

    /// Removes the outer container (killing every inner process with it), its
    /// image and the host directories; returns what could not be removed or was
    /// left behind.
    pub fn cleanup(&mut self) -> Vec<String> {
        self.cleaned = true;
        let mut problems = Vec::new();
        let rm = docker(&["rm", "-f", "-v", &self.name], None, SHORT_TIMEOUT);
        if !rm.success() && !rm.stderr.contains("No such container") {
            problems.push(format!("docker rm -f {}: {}", self.name, rm.stderr.trim()));
        }
        let rmi = docker(&["rmi", "-f", &self.image], None, SHORT_TIMEOUT);
        if !rmi.success() && !rmi.stderr.contains("No such image") {
            problems.push(format!("docker rmi {}: {}", self.image, rmi.stderr.trim()));
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let dir = self.dir.to_string_lossy().into_owned();
        for line in mountinfo.lines() {
            if line.split(' ').nth(4).is_some_and(|m| m.starts_with(&dir)) {
                problems.push(format!("mount left on this machine: {line}"));
            }
        }
        if self.dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                problems.push(format!("removing {}: {e}", self.dir.display()));
            }
        }
        let left = docker(
            &[
                "ps",
                "-a",
                "--filter",
                &format!("label={LABEL}={}", self.name),
                "--format",
                "{{.Names}}",
            ],
            None,
            SHORT_TIMEOUT,
        );
        if !left.stdout.trim().is_empty() {
            problems.push(format!("outer container left: {}", left.stdout.trim()));
        }
        if !self.id.is_empty() {
            for hierarchy in ["memory", "pids", "cpu", "devices"] {
                let cg = Path::new("/sys/fs/cgroup")
                    .join(hierarchy)
                    .join("docker")
                    .join(&self.id);
                if cg.exists() {
                    problems.push(format!("cgroup left: {}", cg.display()));
                }
            }
        }
        problems
    }
}

impl Drop for Outer {
    fn drop(&mut self) {
        if !self.cleaned {
            let problems = self.cleanup();
            if !problems.is_empty() {
                show("nested cleanup problems", &problems.join("\n"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privileged_only_when_nothing_is_missing() {
        assert_eq!(outer_privilege_args(&[]), vec!["--privileged".to_owned()]);
        let args = outer_privilege_args(&["SYS_RESOURCE".to_owned()]);
        let line = args.join(" ");
        assert!(!line.contains("--privileged"), "{line}");
        assert!(
            line.starts_with("--cap-add ALL --cap-drop SYS_RESOURCE "),
            "{line}"
        );
        for opt in [
            "seccomp=unconfined",
            "apparmor=unconfined",
            "systempaths=unconfined",
        ] {
            assert!(line.contains(&format!("--security-opt {opt}")), "{line}");
        }
        assert!(line.ends_with("--device-cgroup-rule a *:* rwm"), "{line}");
    }

    #[test]
    fn missing_capabilities_by_bit() {
        // This project's CI machine: everything up to CAP_CHECKPOINT_RESTORE (40)
        // but CAP_SYS_RESOURCE (24).
        assert_eq!(
            backend_caps::names(0x1fffeffffff, 40),
            vec!["SYS_RESOURCE".to_owned()]
        );
        assert_eq!(
            backend_caps::names(0x3ffeffffff, 40),
            ["SYS_RESOURCE", "PERFMON", "BPF", "CHECKPOINT_RESTORE"].map(str::to_owned)
        );
        assert!(backend_caps::names(u64::MAX, 40).is_empty());
    }
}
