//! The measuring parent of the benchmark (`cpi-measure`): runs one child and reports
//! its wall time, peak RSS and CPU time.
//!
//! Peak RSS of a child is `ru_maxrss` of its rusage. The workspace forbids unsafe code,
//! std has no `wait4`, and neither rustix nor nix exposes `wait4` with a rusage, so the
//! parent spawns exactly one child, waits for it, and reads
//! `getrusage(RUSAGE_CHILDREN)` (nix): with a single waited-for child, the maximum over
//! "all children" *is* that child's own peak (plus any grandchild it waited for, such
//! as CNI plugins on containerd's `create_vm`: the largest of them). The wall time is
//! taken from just before `spawn` to the return of a blocking `wait` (no polling), so
//! the parent's own start-up is not counted.
//!
//! The parent must be small. On `exec` the kernel counts the replaced address space's
//! peak into the process's `ru_maxrss`, and a spawned child replaces the parent's
//! (`vfork`) or a copy of it (`fork`): a child never reads below the RSS its parent
//! had when it spawned it. `cpi-bench` itself spawning the `cpi` made `/bin/true` read
//! as 2.8 MiB (1.0 MiB under a small C parent); `cpi-measure` links little besides std.
//! The bench reports what `/bin/true` reads as under it, the lowest figure a row can
//! show.

use std::io::Write;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

/// The prefix of the measuring parent's report line on stderr.
pub const REPORT_PREFIX: &str = "@cpi-bench-measure ";

/// The numbers on a report line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// From just before spawn to the end of a blocking wait.
    pub wall: Duration,
    /// `ru_maxrss` of the child, KiB.
    pub max_rss_kib: u64,
    /// User plus system CPU time of the child.
    pub cpu: Duration,
    /// Its exit code (128 + signal when killed).
    pub exit_code: i32,
}

/// The report line, as [`measuring_parent`] writes it.
pub fn format_report(r: &Report) -> String {
    format!(
        "{REPORT_PREFIX}wall_ns={} maxrss_kib={} cpu_ns={} exit={}",
        r.wall.as_nanos(),
        r.max_rss_kib,
        r.cpu.as_nanos(),
        r.exit_code
    )
}

fn timeval(tv: nix::sys::time::TimeVal) -> Duration {
    let secs = u64::try_from(tv.tv_sec()).unwrap_or(0);
    let micros = u64::try_from(tv.tv_usec()).unwrap_or(0);
    Duration::from_secs(secs) + Duration::from_micros(micros)
}

/// The measuring parent: `cpi-measure <timeout_secs> <program> [args…]`.
/// Spawns the program with this process's stdin, stdout and stderr and the director's
/// environment, waits for it, and appends the report line to stderr.
pub fn measuring_parent(args: &[String]) -> ExitCode {
    let mut stderr = std::io::stderr();
    let (Some(timeout), Some(program)) = (args.first(), args.get(1)) else {
        let _ = writeln!(
            stderr,
            "usage: cpi-measure <timeout_secs> <program> [args...]"
        );
        return ExitCode::from(2);
    };
    let timeout = Duration::from_secs(timeout.parse().unwrap_or(600));
    let mut cmd = Command::new(program);
    crate::runner::director_env(&mut cmd).args(&args[2..]);
    let started = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(stderr, "cpi-measure: cannot start {program}: {e}");
            return ExitCode::from(127);
        }
    };
    // A watchdog kills a hung child; the blocking wait below stays exact.
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(timeout).is_err() {
            if let Some(pid) = pid {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    });
    let status = child.wait();
    let wall = started.elapsed();
    let _ = done_tx.send(());
    let _ = watchdog.join();
    let exit_code = status.map_or(-1, crate::process::exit_code);
    let (max_rss_kib, cpu) =
        match nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN) {
            Ok(u) => (
                u64::try_from(u.max_rss()).unwrap_or(0),
                timeval(u.user_time()) + timeval(u.system_time()),
            ),
            Err(_) => (0, Duration::ZERO),
        };
    let line = format_report(&Report {
        wall,
        max_rss_kib,
        cpu,
        exit_code,
    });
    let _ = writeln!(stderr, "\n{line}");
    ExitCode::SUCCESS
}
