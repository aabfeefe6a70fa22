//! Crash safety, short mode: a few `kill -9` trials per method on each real backend
//! (`CPI_CRASH_TRIALS`, default 5). Every interrupted call is recovered the way a
//! director would (retry, then delete) and must leave nothing behind, with the
//! persistent disk's data intact. The long soak is `bash scripts/soak.sh`
//! (`cpi-crash`, 50 trials per method and backend); see `docs/reliability.md`.
#![allow(
    clippy::print_stderr,
    reason = "a test reports its table on stderr, shown with --nocapture"
)]

use cpi_tests::conformance::BackendKind;
use cpi_tests::crash::{self, Method};

fn trials() -> usize {
    std::env::var("CPI_CRASH_TRIALS")
        .ok()
        .and_then(|t| t.parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(5)
}

fn crash_safety(kind: BackendKind) {
    let seed = std::env::var("CPI_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| u64::from(std::process::id()) * 7919 + 17);
    let n = trials();
    let (reports, left) = crash::run_backend(kind, &Method::ALL, n, seed);
    eprintln!("seed {seed}\n{}", crash::table(&reports));
    assert_eq!(reports.len(), Method::ALL.len());
    let mut problems: Vec<String> = reports.iter().flat_map(|r| r.problems.clone()).collect();
    problems.extend(left);
    assert!(
        problems.is_empty(),
        "crash trials failed (seed {seed}):\n{}",
        problems.join("\n")
    );
    for r in &reports {
        assert_eq!(r.trials, n, "{}: not every trial ran", r.method);
        assert_eq!(r.killed_during + r.finished_first, n, "{}", r.method);
        assert!(r.passed(), "{r:?}");
    }
    let killed: usize = reports.iter().map(|r| r.killed_during).sum();
    assert!(
        killed > 0,
        "no kill landed inside a call: the trials proved nothing"
    );
}

#[test]
fn crash_safety_docker() {
    crash_safety(BackendKind::Docker);
}

#[test]
fn crash_safety_containerd() {
    crash_safety(BackendKind::Containerd);
}
