//! Measuring one child process: wall time and peak RSS, the way the director runs the
//! CPI (a fresh process, the request on stdin, only `PATH` and `TMPDIR` set).
//!
//! Each child runs under a *measuring parent*, the small `cpi-measure` binary beside
//! `cpi-bench` ([`cpi_tests::measure_parent`]): it spawns exactly one child, waits for
//! it, and reports wall time, `ru_maxrss` and CPU on the last line of its stderr, which
//! the bench strips. Why a separate, small binary: see that module.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use cpi_tests::measure_parent::{Report, REPORT_PREFIX};

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

/// Runs `program args` under the measuring parent (`cpi-measure`, beside this binary)
/// with `stdin` as its input.
pub fn run(
    program: &Path,
    args: &[&str],
    stdin: &[u8],
    timeout: Duration,
) -> Result<Measured, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find cpi-bench itself: {e}"))?;
    let parent = me.with_file_name("cpi-measure");
    if !parent.is_file() {
        return Err(format!(
            "{} is missing: build it beside cpi-bench (cargo build -p cpi-tests --bin cpi-measure; scripts/bench.sh does)",
            parent.display()
        ));
    }
    let mut child = Command::new(&parent)
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
    use cpi_tests::measure_parent::format_report;

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
