//! What machine the benchmark ran on: the header of the table and of the JSON.

use serde::Serialize;

/// Facts about this machine and its daemons.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    /// Online CPUs.
    pub nproc: usize,
    /// CPU model name.
    pub cpu_model: String,
    /// Total memory, MiB.
    pub memory_mib: u64,
    /// Kernel release.
    pub kernel: String,
    /// `v1`, `v2` or `hybrid`.
    pub cgroup: String,
    /// Docker engine version and API version, when Docker answered.
    pub docker: Option<String>,
    /// containerd version, when containerd answered.
    pub containerd: Option<String>,
    /// The `cpi` binary measured.
    pub cpi_bin: String,
    /// Its build profile, from its path (`release` or `debug`).
    pub cpi_profile: String,
    /// Its size in bytes.
    pub cpi_bytes: u64,
    /// `/proc/loadavg` when the run started (other work on the machine skews numbers).
    pub load_before: String,
    /// `/proc/loadavg` when the run ended.
    pub load_after: String,
    /// Median peak RSS, KiB, that `/bin/true` reads as under the measuring parent: a
    /// child never reads below its parent's RSS at the spawn, so no row can read lower
    /// (`cpi_tests::measure_parent`). `None` when it could not be measured.
    pub rss_floor_kib: Option<u64>,
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    read("/proc/loadavg")
        .split(' ')
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The cgroup layout of this host.
pub fn cgroup_version() -> String {
    let root = std::path::Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        "v2".into()
    } else if root.join("unified").join("cgroup.controllers").exists() {
        "hybrid (v1 + v2 at /sys/fs/cgroup/unified)".into()
    } else {
        "v1".into()
    }
}

impl Machine {
    /// Reads the host facts; the daemon versions are filled in by the caller.
    pub fn probe(cpi_bin: &std::path::Path) -> Machine {
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default();
        let memory_mib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib / 1024)
            .unwrap_or(0);
        let path = cpi_bin.display().to_string();
        let cpi_profile = if path.contains("/release/") {
            "release"
        } else if path.contains("/debug/") {
            "debug"
        } else {
            "unknown"
        };
        Machine {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu_model,
            memory_mib,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cgroup: cgroup_version(),
            docker: None,
            containerd: None,
            cpi_bin: path,
            cpi_profile: cpi_profile.into(),
            cpi_bytes: std::fs::metadata(cpi_bin).map(|m| m.len()).unwrap_or(0),
            load_before: load_average(),
            load_after: String::new(),
            rss_floor_kib: None,
        }
    }

    /// The header lines of the table.
    pub fn header(&self) -> Vec<String> {
        vec![
            format!(
                "machine: {} CPUs ({}), {} MiB memory, kernel {}, cgroup {}",
                self.nproc, self.cpu_model, self.memory_mib, self.kernel, self.cgroup
            ),
            format!(
                "daemons: Docker {}, containerd {}",
                self.docker.as_deref().unwrap_or("not measured"),
                self.containerd.as_deref().unwrap_or("not measured")
            ),
            format!(
                "cpi: {} ({} build, {:.1} MiB)",
                self.cpi_bin,
                self.cpi_profile,
                self.cpi_bytes as f64 / (1024.0 * 1024.0)
            ),
            format!(
                "load average: {} at the start, {} at the end",
                self.load_before, self.load_after
            ),
            match self.rss_floor_kib {
                Some(kib) => format!(
                    "peak RSS floor: /bin/true reads as {:.1} MiB under the measuring parent; no row reads lower",
                    kib as f64 / 1024.0
                ),
                None => "peak RSS floor: not measured (/bin/true did not run)".to_owned(),
            },
        ]
    }
}
