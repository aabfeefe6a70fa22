//! Measuring one child process: wall time and peak RSS, the way the director runs the
//! CPI (a fresh process, the request on stdin, only `PATH` and `TMPDIR` set).
//!
//! Peak RSS of a child is `ru_maxrss` of its rusage. The workspace forbids unsafe code,
//! std has no `wait4`, and neither rustix nor nix exposes `wait4` with a rusage, so the
//! bench re-executes itself as a tiny *measuring parent* (`cpi-bench __measure …`):
//! that process spawns exactly one child, waits for it, and reads
//! `getrusage(RUSAGE_CHILDREN)` (nix). With a single waited-for child, the maximum over
//! "all children" *is* that child's own peak (plus any grandchild it waited for, such
//! as CNI plugins on containerd's `create_vm`: the largest of them). The wall time is
//! taken in the same process, from just before `spawn` to the return of a blocking
//! `wait` (no polling), so the measuring parent's own start-up is not counted. It
//! reports both on the last line of its stderr, which the bench strips.
//!
//! Reusing `getrusage(RUSAGE_CHILDREN)` in the bench process itself would be wrong:
//! `ru_maxrss` there is the maximum over every child ever waited for, not a per-child
//! figure.

use std::io::Write;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// The argument that switches `cpi-bench` into measuring-parent mode.
pub const MEASURE_ARG: &str = "__measure";

/// The prefix of the measuring parent's report line on stderr.
const REPORT_PREFIX: &str = "@cpi-bench-measure ";

/// What one measured child did.
#[derive(Debug, Clone)]
pub struct Measured {
    /// From just before spawn to the end of a blocking wait.
    pub wall: Duration,
    /// Peak resident set size of the child, KiB (`ru_maxrss`).
    pub max_rss_kib: u64,
    /// User plus system CPU time of the child.
    pub cpu: Duration,
    /// Its exit code (128 + signal when killed).
    pub exit_code: i32,
    /// What it wrote on stdout.
    pub stdout: String,
    /// What it wrote on stderr (without the report line).
    pub stderr: String,
}

/// The environment a CPI gets from the director: `PATH` and `TMPDIR` only.
pub fn director_env(cmd: &mut Command) -> &mut Command {
    cmd.env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| {
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
            }),
        )
        .env(
            "TMPDIR",
            std::env::var_os("TMPDIR").unwrap_or_else(|| "/tmp".into()),
        )
}

/// Runs `program args` under a measuring parent (this binary in [`MEASURE_ARG`] mode)
/// with `stdin` as its input.
pub fn run(
    program: &Path,
    args: &[&str],
    stdin: &[u8],
    timeout: Duration,
) -> Result<Measured, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find cpi-bench itself: {e}"))?;
    let mut child = Command::new(&me)
        .arg(MEASURE_ARG)
        .arg(timeout.as_secs().max(1).to_string())
        .arg(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", me.display()))?;
    if let Some(mut pipe) = child.stdin.take() {
        // Requests are a few KiB, far below a pipe's buffer: this cannot block.
        pipe.write_all(stdin)
            .map_err(|e| format!("writing the request to {}: {e}", program.display()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for {}: {e}", program.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let (stderr, report) = split_report(&stderr).ok_or_else(|| {
        format!(
            "the measuring parent of {} reported nothing; its stderr:\n{stderr}",
            program.display()
        )
    })?;
    let report =
        parse_report(report).ok_or_else(|| format!("unreadable measurement report {report:?}"))?;
    Ok(Measured {
        wall: report.wall,
        max_rss_kib: report.max_rss_kib,
        cpu: report.cpu,
        exit_code: report.exit_code,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: stderr.to_owned(),
    })
}

/// The numbers on a report line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Report {
    wall: Duration,
    max_rss_kib: u64,
    cpu: Duration,
    exit_code: i32,
}

fn format_report(r: &Report) -> String {
    format!(
        "{REPORT_PREFIX}wall_ns={} maxrss_kib={} cpu_ns={} exit={}",
        r.wall.as_nanos(),
        r.max_rss_kib,
        r.cpu.as_nanos(),
        r.exit_code
    )
}

fn parse_report(line: &str) -> Option<Report> {
    let mut wall = None;
    let mut rss = None;
    let mut cpu = None;
    let mut exit = None;
    for field in line.trim().strip_prefix(REPORT_PREFIX)?.split(' ') {
        let (k, v) = field.split_once('=')?;
        match k {
            "wall_ns" => wall = Some(Duration::from_nanos(v.parse().ok()?)),
            "maxrss_kib" => rss = Some(v.parse().ok()?),
            "cpu_ns" => cpu = Some(Duration::from_nanos(v.parse().ok()?)),
            "exit" => exit = Some(v.parse().ok()?),
            _ => {}
        }
    }
    Some(Report {
        wall: wall?,
        max_rss_kib: rss?,
        cpu: cpu?,
        exit_code: exit?,
    })
}

/// Splits the measuring parent's stderr into the child's stderr and the report line.
fn split_report(stderr: &str) -> Option<(&str, &str)> {
    let at = stderr.rfind(REPORT_PREFIX)?;
    let before = &stderr[..at];
    Some((before.strip_suffix('\n').unwrap_or(before), &stderr[at..]))
}

fn timeval(tv: nix::sys::time::TimeVal) -> Duration {
    let secs = u64::try_from(tv.tv_sec()).unwrap_or(0);
    let micros = u64::try_from(tv.tv_usec()).unwrap_or(0);
    Duration::from_secs(secs) + Duration::from_micros(micros)
}

/// The measuring parent: `cpi-bench __measure <timeout_secs> <program> [args…]`.
/// Spawns the program with this process's stdin, stdout and stderr and the director's
/// environment, waits for it, and appends the report line to stderr.
pub fn measuring_parent(args: &[String]) -> ExitCode {
    let mut stderr = std::io::stderr();
    let (Some(timeout), Some(program)) = (args.first(), args.get(1)) else {
        let _ = writeln!(
            stderr,
            "usage: cpi-bench {MEASURE_ARG} <timeout_secs> <program> [args...]"
        );
        return ExitCode::from(2);
    };
    let timeout = Duration::from_secs(timeout.parse().unwrap_or(600));
    let mut cmd = Command::new(program);
    director_env(&mut cmd).args(&args[2..]);
    let started = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(stderr, "cpi-bench: cannot start {program}: {e}");
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
    let exit_code = match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            s.code()
                .or_else(|| s.signal().map(|n| 128 + n))
                .unwrap_or(-1)
        }
        Err(_) => -1,
    };
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

/// Median, minimum and maximum of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Number of samples.
    pub n: usize,
    /// Median (the mean of the middle two for an even count).
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
}

impl Stats {
    /// Stats of `samples`; `None` when there are none.
    pub fn of(samples: &[f64]) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stats {
            n,
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_odd_and_even_counts() {
        let s = Stats::of(&[3.0, 1.0, 2.0]).expect("stats");
        assert_eq!((s.n, s.median, s.min, s.max), (3, 2.0, 1.0, 3.0));
        let s = Stats::of(&[4.0, 1.0, 2.0, 3.0]).expect("stats");
        assert_eq!(s.median, 2.5);
        assert!(Stats::of(&[]).is_none());
    }

    #[test]
    fn report_round_trip_and_split() {
        let r = Report {
            wall: Duration::from_nanos(1_234_567),
            max_rss_kib: 4321,
            cpu: Duration::from_micros(900),
            exit_code: 0,
        };
        let stderr = format!("child log line\nanother\n\n{}\n", format_report(&r));
        let (child, line) = split_report(&stderr).expect("split");
        assert_eq!(child, "child log line\nanother\n");
        assert_eq!(parse_report(line), Some(r));
        assert!(split_report("no report here").is_none());
        assert!(parse_report("@cpi-bench-measure wall_ns=x").is_none());
    }
}
