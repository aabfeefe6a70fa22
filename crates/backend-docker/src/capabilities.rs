//! The privileges a VM gets: Docker's `Privileged` where the runtime can grant it,
//! every capability the runtime holds otherwise.
//!
//! `Privileged: true` asks runc for every capability the kernel knows. Where the
//! runtime's own capability bounding set lacks one (nested CI containers; this
//! project's test machine lacks `CAP_SYS_RESOURCE`), runc fails with "unable to apply
//! caps" and the VM never starts. We then run the VM unprivileged but with
//! `CapAdd: [ALL]` minus the capabilities the runtime lacks, and add back the other
//! parts of "privileged" a VM needs: no seccomp, AppArmor or SELinux confinement, no
//! masked or read-only `/proc` paths, and a writable `/sys` (remounted by the VM's
//! prelude). Host devices are *not* all passed through: a VM gets Docker's default
//! devices plus whatever `Devices`/`DeviceCgroupRules` its cloud properties ask for.
//!
//! Where the bounding set comes from: when the daemon is local (unix socket) the
//! runtime shares this machine's bounding set, which we read from `/proc/self/status`;
//! otherwise we try `Privileged` and, when the runtime refuses, probe its bounding set
//! with a helper container (see [`PROBE_SCRIPT`]).

use bollard::models::HostConfig;

/// Capability names by number, as the kernel numbers them (`capability.h`).
pub const CAP_NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The capability without which a VM cannot work (the agent sets the hostname and
/// mounts disks; the prelude unmounts Docker's `/etc` files).
pub const REQUIRED: &str = "CAP_SYS_ADMIN";

/// The shell script a probe container runs (with the host's PID namespace) to print
/// the bounding set of the runtime that started it: its parent is the runtime's shim.
pub const PROBE_SCRIPT: &str =
    "cat /proc/$PPID/status; echo; echo cap_last_cap=$(cat /proc/sys/kernel/cap_last_cap)";

/// How a VM is made privileged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Privilege {
    /// Docker's `Privileged: true`.
    Privileged,
    /// Unprivileged, with `CapAdd: ALL` minus `drop`, and no confinement.
    Capabilities {
        /// Capabilities the runtime lacks (names as Docker spells them, `CAP_*`).
        drop: Vec<String>,
    },
}

impl Privilege {
    /// The plan for a runtime whose bounding set is `bounding` on a kernel whose
    /// highest capability is `last_cap`: privileged when nothing is missing.
    pub fn for_bounding_set(bounding: u64, last_cap: u32) -> Privilege {
        let drop = missing(bounding, last_cap);
        if drop.is_empty() {
            Privilege::Privileged
        } else {
            Privilege::Capabilities { drop }
        }
    }

    /// The label value recorded on the VM.
    pub fn label(&self) -> &'static str {
        match self {
            Privilege::Privileged => "privileged",
            Privilege::Capabilities { .. } => "capabilities",
        }
    }

    /// Whether the VM lacks capabilities it needs.
    pub fn lacks_required(&self) -> bool {
        matches!(self, Privilege::Capabilities { drop } if drop.iter().any(|c| c == REQUIRED))
    }

    /// Sets the privilege fields of `host`: `Privileged` or the capability list, and
    /// the confinement options either way. Keeps the operator's own `CapDrop` and
    /// `SecurityOpt` entries.
    pub fn apply(&self, host: &mut HostConfig) {
        let mut security = host.security_opt.take().unwrap_or_default();
        for opt in ["label=disable", "apparmor=unconfined", "seccomp=unconfined"] {
            let key = opt.split('=').next().unwrap_or(opt);
            if !security
                .iter()
                .any(|s| s.starts_with(&format!("{key}=")) || s.starts_with(&format!("{key}:")))
            {
                security.push(opt.to_owned());
            }
        }
        host.security_opt = Some(security);
        match self {
            Privilege::Privileged => {
                host.privileged = Some(true);
                host.cap_add = None;
            }
            Privilege::Capabilities { drop } => {
                host.privileged = Some(false);
                host.cap_add = Some(vec!["ALL".to_owned()]);
                let mut all_drops = host.cap_drop.take().unwrap_or_default();
                for cap in drop {
                    if !all_drops.iter().any(|d| same_cap(d, cap)) {
                        all_drops.push(cap.clone());
                    }
                }
                host.cap_drop = (!all_drops.is_empty()).then_some(all_drops);
                // What `--security-opt systempaths=unconfined` sends: nothing masked
                // or read-only in /proc, as in a privileged container.
                host.masked_paths = Some(Vec::new());
                host.readonly_paths = Some(Vec::new());
            }
        }
    }

    /// Removes `cap` from the drop list (the daemon does not know it, so `ALL` does
    /// not include it either). Returns whether it was there.
    pub fn forget(&mut self, cap: &str) -> bool {
        match self {
            Privilege::Capabilities { drop } => {
                let before = drop.len();
                drop.retain(|d| !same_cap(d, cap));
                before != drop.len()
            }
            Privilege::Privileged => false,
        }
    }
}

fn same_cap(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        let u = s.to_ascii_uppercase();
        u.strip_prefix("CAP_").map(str::to_owned).unwrap_or(u)
    };
    norm(a) == norm(b)
}

/// The names of capabilities `0..=last_cap` that `bounding` lacks.
pub fn missing(bounding: u64, last_cap: u32) -> Vec<String> {
    (0..=last_cap.min(63))
        .filter(|bit| bounding & (1u64 << bit) == 0)
        .map(|bit| {
            CAP_NAMES
                .get(bit as usize)
                .map(|n| (*n).to_owned())
                .unwrap_or_else(|| format!("CAP_{bit}"))
        })
        .collect()
}

/// The `CapBnd` of a `/proc/<pid>/status` text.
pub fn parse_cap_bnd(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// The `cap_last_cap=<n>` line of the probe's output.
pub fn parse_last_cap(output: &str) -> Option<u32> {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix("cap_last_cap="))
        .and_then(|n| n.trim().parse().ok())
}

/// The capability a daemon error says it does not know
/// (`invalid CapDrop: unknown capability: "CAP_BPF"`).
pub fn unknown_capability(message: &str) -> Option<String> {
    let rest = &message[message.find("unknown capability")?..];
    let start = rest.find('"')? + 1;
    let end = start + rest[start..].find('"')?;
    Some(rest[start..end].to_owned())
}

/// Whether a start failure means the runtime could not grant the capabilities asked.
pub fn is_caps_failure(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("unable to apply caps")
        || (m.contains("caps") && m.contains("operation not permitted"))
}

/// This process's bounding set and the kernel's highest capability number.
pub fn own_bounding_set() -> std::io::Result<(u64, u32)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let bounding = parse_cap_bnd(&status).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no CapBnd in /proc/self/status",
        )
    })?;
    let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    Ok((bounding, last_cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    const THIS_MACHINE: u64 = 0x1ff_feff_ffff; // lacks CAP_SYS_RESOURCE (24)

    #[test]
    fn names_are_numbered_like_the_kernel() {
        assert_eq!(CAP_NAMES[21], "CAP_SYS_ADMIN");
        assert_eq!(CAP_NAMES[24], "CAP_SYS_RESOURCE");
        assert_eq!(CAP_NAMES[40], "CAP_CHECKPOINT_RESTORE");
    }

    #[test]
    fn full_bounding_set_means_privileged() {
        assert_eq!(
            Privilege::for_bounding_set(0x1ff_ffff_ffff, 40),
            Privilege::Privileged
        );
        assert_eq!(
            Privilege::for_bounding_set(0x3f_ffff_ffff, 37),
            Privilege::Privileged
        );
    }

    #[test]
    fn constrained_host_drops_what_is_missing() {
        let p = Privilege::for_bounding_set(THIS_MACHINE, 40);
        assert_eq!(
            p,
            Privilege::Capabilities {
                drop: vec!["CAP_SYS_RESOURCE".into()]
            }
        );
        assert!(!p.lacks_required());
        let p = Privilege::for_bounding_set(THIS_MACHINE & !(1 << 21), 40);
        assert!(p.lacks_required());
    }

    #[test]
    fn applies_caps_and_unconfinement_keeping_operator_entries() {
        let mut host = HostConfig {
            cap_drop: Some(vec!["NET_RAW".into(), "sys_resource".into()]),
            security_opt: Some(vec!["seccomp=/etc/profile.json".into()]),
            ..Default::default()
        };
        Privilege::for_bounding_set(THIS_MACHINE, 40).apply(&mut host);
        assert_eq!(host.privileged, Some(false));
        assert_eq!(host.cap_add, Some(vec!["ALL".to_owned()]));
        assert_eq!(
            host.cap_drop,
            Some(vec!["NET_RAW".to_owned(), "sys_resource".to_owned()])
        );
        assert_eq!(
            host.security_opt,
            Some(vec![
                "seccomp=/etc/profile.json".to_owned(),
                "label=disable".to_owned(),
                "apparmor=unconfined".to_owned()
            ])
        );
        assert_eq!(host.masked_paths, Some(vec![]));
        assert_eq!(host.readonly_paths, Some(vec![]));

        let mut host = HostConfig::default();
        Privilege::Privileged.apply(&mut host);
        assert_eq!(host.privileged, Some(true));
        assert_eq!(host.cap_add, None);
        assert_eq!(host.masked_paths, None);
    }

    #[test]
    fn forgets_capabilities_the_daemon_does_not_know() {
        let mut p = Privilege::for_bounding_set(THIS_MACHINE & !(1 << 39), 40);
        assert!(p.forget("CAP_BPF"));
        assert!(!p.forget("CAP_BPF"));
        assert_eq!(
            p,
            Privilege::Capabilities {
                drop: vec!["CAP_SYS_RESOURCE".into()]
            }
        );
    }

    #[test]
    fn parses_status_probe_and_errors() {
        let status =
            "Name:\tcontainerd-shim\nCapInh:\t0000000000000000\nCapBnd:\t000001fffeffffff\n";
        assert_eq!(parse_cap_bnd(status), Some(THIS_MACHINE));
        assert_eq!(
            parse_last_cap(&format!("{status}\ncap_last_cap=40\n")),
            Some(40)
        );
        assert_eq!(parse_cap_bnd("nothing"), None);
        assert_eq!(
            unknown_capability(r#"invalid CapDrop: unknown capability: "CAP_BPF""#),
            Some("CAP_BPF".into())
        );
        assert_eq!(unknown_capability("something else"), None);
        assert!(is_caps_failure("OCI runtime create failed: runc create failed: unable to start container process: unable to apply caps: operation not permitted: unknown"));
        assert!(!is_caps_failure("exec: \"sh\": executable file not found"));
    }

    #[test]
    fn missing_lists_names_in_order() {
        assert_eq!(
            missing(THIS_MACHINE & !1, 40),
            vec!["CAP_CHOWN".to_owned(), "CAP_SYS_RESOURCE".to_owned()]
        );
        assert!(missing(u64::MAX, 40).is_empty());
    }
}
