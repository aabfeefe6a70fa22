//! The VM's entrypoint: a short `/bin/sh` prelude that makes the container look like
//! a BOSH VM and then `exec`s the stemcell's init (which becomes PID 1).
//!
//! It runs on every start (also after `reboot_vm`), so every step is idempotent. A
//! failing step is reported on stderr (`docker logs`) and does not stop the VM from
//! booting: only a missing init does.

use std::net::IpAddr;

use crate::helper::sh_quote;

/// The init a VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// `/usr/sbin/runsvdir-start` (pre-Noble warden stemcells).
    Runit,
    /// `/sbin/init` (Noble and later).
    Systemd,
}

impl Init {
    /// The init's path inside the stemcell.
    pub fn path(self) -> &'static str {
        match self {
            Init::Runit => "/usr/sbin/runsvdir-start",
            Init::Systemd => "/sbin/init",
        }
    }

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Init::Runit => "runit",
            Init::Systemd => "systemd",
        }
    }
}

/// What the prelude needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreludeInput {
    /// The init to exec.
    pub init: Init,
    /// Nameservers for `/etc/resolv.conf` (none: keep the stemcell's file).
    pub nameservers: Vec<IpAddr>,
    /// The VM's hostname (`/etc/hostname`, `/etc/hosts`).
    pub hostname: String,
    /// The VM's first address, for `/etc/hosts`.
    pub address: Option<IpAddr>,
    /// The default gateway to install when the VM has several networks (Docker picks
    /// the default route by its own rules).
    pub default_gateway: Option<IpAddr>,
    /// The VM is not `Privileged`: remount `/sys` (and, for systemd on cgroup v1, the
    /// cgroup hierarchies) read-write as a privileged container would have them.
    pub remount_rw: bool,
    /// cgroup v1 host (systemd needs its hierarchies writable there).
    pub cgroup_v1: bool,
    /// The VM has dynamic networks: Docker assigns their addresses only when the
    /// container starts, so the CPI rewrites the settings with them after the start
    /// and then creates [`SETTINGS_FINAL_MARKER`]. The prelude waits for that marker
    /// (up to 60 s) before exec'ing init, so the agent never reads settings without
    /// its addresses.
    pub wait_for_final_settings: bool,
}

/// Created by the CPI once the settings file holds every assigned address.
pub const SETTINGS_FINAL_MARKER: &str = "/var/vcap/bosh/.cpi-settings-final";

/// The prelude script (pure).
pub fn script(input: &PreludeInput) -> String {
    let mut s = String::new();
    let mut step = |line: &str| {
        s.push_str(line);
        s.push('\n');
    };
    step("# bosh-container-cpi VM prelude: runs on every start, then execs the init");
    step("warn() { echo \"bosh-container-cpi prelude: $*\" >&2; }");
    // Replaces a file by a rename, so that the path never goes missing: dockerd
    // mounts its resolv.conf, hosts and hostname over these paths whenever it
    // handles an archive request for the container (the settings written after
    // start), and a path that `rm` removed a moment earlier fails that request with
    // ENOENT. `mv` also replaces a symlink (Ubuntu's resolv.conf) instead of writing
    // through it.
    step("put() { f=$1; shift; printf '%s\\n' \"$@\" > \"$f.bosh-cpi-new\" && mv -f \"$f.bosh-cpi-new\" \"$f\"; }");
    // Docker bind-mounts its own resolv.conf, hosts and hostname: the VM owns them
    // (the agent and bosh-dns replace them; a bind mount makes that fail with EBUSY).
    step("for f in /etc/resolv.conf /etc/hosts /etc/hostname; do while umount \"$f\" 2>/dev/null; do :; done; done");
    if input.remount_rw {
        step("mount -o remount,rw /sys 2>/dev/null || warn 'cannot remount /sys read-write'");
        if input.cgroup_v1 && input.init == Init::Systemd {
            step("while read -r _ mnt fstype _; do");
            step("  case \"$fstype\" in cgroup|cgroup2|tmpfs) case \"$mnt\" in /sys/fs/cgroup*) mount -o remount,rw \"$mnt\" 2>/dev/null || mount -o remount,bind,rw \"$mnt\" 2>/dev/null || warn \"cannot remount $mnt read-write\";; esac;; esac");
            step("done < /proc/mounts");
        }
    }
    let hostname = sh_quote(&input.hostname);
    if !input.nameservers.is_empty() {
        let lines: Vec<String> = input
            .nameservers
            .iter()
            .map(|ip| format!("nameserver {ip}"))
            .collect();
        step(&format!(
            "put /etc/resolv.conf {} || warn 'cannot write /etc/resolv.conf'",
            lines
                .iter()
                .map(|l| sh_quote(l))
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    let mut hosts = vec![
        "127.0.0.1 localhost".to_owned(),
        "::1 localhost ip6-localhost ip6-loopback".to_owned(),
    ];
    if let Some(ip) = input.address {
        hosts.push(format!("{ip} {}", input.hostname));
    }
    step(&format!(
        "put /etc/hosts {} || warn 'cannot write /etc/hosts'",
        hosts
            .iter()
            .map(|l| sh_quote(l))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    step(&format!(
        "put /etc/hostname {hostname} || warn 'cannot write /etc/hostname'"
    ));
    // Stale pid files and sockets of the previous boot; logs under data/sys stay.
    step("rm -rf /var/vcap/data/sys/run");
    step("mkdir -p /var/vcap/data/sys/log /var/vcap/data/sys/run /var/vcap/store || warn 'cannot create /var/vcap directories'");
    // A VM must not set the host's clock (as the Go CPI does, sync-time is disarmed).
    step("if [ -f /var/vcap/bosh/bin/sync-time ]; then sed -i 's/^\\([[:space:]]*\\)chronyc/\\1# chronyc/' /var/vcap/bosh/bin/sync-time || warn 'cannot disarm sync-time'; fi");
    if let Some(gw) = input.default_gateway {
        step(&format!(
            "if command -v ip >/dev/null 2>&1; then ip route replace default via {gw} 2>/dev/null || warn 'cannot set the default route via {gw}'; fi"
        ));
    }
    if input.init == Init::Systemd {
        // Only the units a BOSH VM needs (as the Go CPI does): the rest fight the
        // container runtime (networkd, udev, getty, ...).
        step("if command -v find >/dev/null 2>&1; then find /etc/systemd/system /lib/systemd/system -path '*.wants/*' -not -name '*journald*' -not -name '*logrotate*' -not -name '*systemd-tmpfiles*' -not -name '*systemd-user-sessions*' -not -name '*runit*' -not -name '*bosh-agent*' -exec rm -f {} + 2>/dev/null; fi");
    }
    if input.wait_for_final_settings {
        step(&format!(
            "i=0; while [ ! -e {m} ] && [ $i -lt 600 ]; do sleep 0.1 2>/dev/null || sleep 1; i=$((i+1)); done; [ -e {m} ] || warn 'the CPI did not finalise the agent settings within 60 s; booting anyway'",
            m = SETTINGS_FINAL_MARKER
        ));
    }
    let path = "PATH=/usr/sbin:/usr/bin:/sbin:/bin";
    let init = input.init.path();
    step(&format!(
        "[ -x {init} ] || {{ warn '{init} is missing from the stemcell: cannot boot'; exit 127; }}"
    ));
    match input.init {
        Init::Runit => step(&format!("exec env -i {path} {init}")),
        Init::Systemd => step(&format!("exec env -i {path} container=docker {init}")),
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(init: Init) -> PreludeInput {
        PreludeInput {
            init,
            nameservers: vec!["10.245.0.2".parse().expect("ip")],
            hostname: "c-1".into(),
            address: Some("10.245.0.10".parse().expect("ip")),
            default_gateway: None,
            remount_rw: false,
            cgroup_v1: true,
            wait_for_final_settings: false,
        }
    }

    #[test]
    fn dynamic_networks_make_the_prelude_wait_for_final_settings() {
        let plain = script(&input(Init::Runit));
        assert!(!plain.contains(SETTINGS_FINAL_MARKER));
        let waiting = script(&PreludeInput {
            wait_for_final_settings: true,
            ..input(Init::Runit)
        });
        let wait_at = waiting
            .find(SETTINGS_FINAL_MARKER)
            .expect("waits for the marker");
        let exec_at = waiting.find("exec env -i").expect("execs init");
        assert!(wait_at < exec_at, "must wait before init:\n{waiting}");
    }

    #[test]
    fn runit_prelude_owns_etc_files_and_execs_runsvdir() {
        let s = script(&input(Init::Runit));
        assert!(s.contains("for f in /etc/resolv.conf /etc/hosts /etc/hostname; do while umount"));
        assert!(
            s.contains("put /etc/resolv.conf 'nameserver 10.245.0.2'"),
            "{s}"
        );
        assert!(s.contains("'10.245.0.10 c-1'"), "{s}");
        assert!(s.contains("put /etc/hostname c-1"), "{s}");
        // Files are replaced by a rename, never removed first (see `put`).
        assert!(s.contains("mv -f \"$f.bosh-cpi-new\" \"$f\""), "{s}");
        assert!(!s.contains("rm -f /etc/"), "{s}");
        assert!(
            s.contains("mkdir -p /var/vcap/data/sys/log /var/vcap/data/sys/run /var/vcap/store")
        );
        assert!(s
            .trim_end()
            .ends_with("exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin /usr/sbin/runsvdir-start"));
        assert!(!s.contains("remount,rw /sys"));
        assert!(!s.contains("systemd"));
        assert!(!s.contains("ip route"));
    }

    #[test]
    fn systemd_prelude_on_constrained_cgroup_v1_host() {
        let mut i = input(Init::Systemd);
        i.remount_rw = true;
        i.default_gateway = Some("10.245.0.1".parse().expect("ip"));
        let s = script(&i);
        assert!(s.contains("mount -o remount,rw /sys"));
        assert!(s.contains("/sys/fs/cgroup*"));
        assert!(s.contains("ip route replace default via 10.245.0.1"));
        assert!(s.contains("find /etc/systemd/system"));
        assert!(s.trim_end().ends_with("container=docker /sbin/init"));
        i.cgroup_v1 = false;
        assert!(!script(&i).contains("/sys/fs/cgroup*"));
    }

    #[test]
    fn no_nameservers_keeps_the_stemcells_resolv_conf() {
        let mut i = input(Init::Runit);
        i.nameservers.clear();
        i.address = None;
        let s = script(&i);
        assert!(!s.contains("put /etc/resolv.conf"));
        assert!(!s.contains("c-1'"));
    }

    #[test]
    fn prelude_is_valid_sh() {
        let s = script(&PreludeInput {
            remount_rw: true,
            default_gateway: Some("10.0.0.1".parse().expect("ip")),
            ..input(Init::Systemd)
        });
        sh_ok(&["-n", "-c", &s]);
    }

    /// Runs `sh` with `args` and asserts it succeeded.
    fn sh_ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) {
        let out = std::process::Command::new("sh")
            .args(args)
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn put_replaces_a_file_or_symlink_by_a_rename() {
        let s = script(&input(Init::Runit));
        let put = s
            .lines()
            .find(|l| l.starts_with("put() {"))
            .expect("the put helper");
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("resolv.conf");
        std::os::unix::fs::symlink("/nonexistent/stub-resolv.conf", &target).expect("symlink");
        let script = format!(
            "{put}\nput \"$1\" 'nameserver 10.0.0.2' 'search x' && put \"$1\" 'nameserver 10.0.0.3'"
        );
        sh_ok(&[
            std::ffi::OsStr::new("-c"),
            script.as_ref(),
            "sh".as_ref(),
            target.as_os_str(),
        ]);
        let meta = std::fs::symlink_metadata(&target).expect("meta");
        assert!(meta.file_type().is_file(), "the symlink itself is replaced");
        assert_eq!(
            std::fs::read_to_string(&target).expect("read"),
            "nameserver 10.0.0.3\n"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            1,
            "no temporary left"
        );
    }
}
