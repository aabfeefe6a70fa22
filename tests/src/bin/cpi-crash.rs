//! `cpi-crash`: the long crash-safety soak (not a test). Kills the `cpi` process with
//! SIGKILL at random points inside `create_vm`, `attach_disk`, `detach_disk`,
//! `delete_vm` and `create_stemcell`, recovers the way a director would and checks
//! that nothing is left behind and the disk's data is intact (see
//! `cpi_tests::crash` and `docs/reliability.md`). Run it with `bash scripts/soak.sh`.
//!
//! ```text
//! cpi-crash [--backend docker|containerd|all] [--trials N] [--methods m1,m2,...] [--seed S]
//! ```
//!
//! Prints one table line per method × backend and exits 1 when any trial failed or
//! left anything behind (64 on a bad command line).
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a command-line tool: the table goes to stdout, problems to stderr"
)]

use std::process::ExitCode;

use cpi_tests::conformance::BackendKind;
use cpi_tests::crash::{self, Method};

struct Args {
    backends: Vec<BackendKind>,
    trials: usize,
    methods: Vec<Method>,
    seed: u64,
}

fn usage(problem: &str) -> ExitCode {
    eprintln!(
        "cpi-crash: {problem}\nusage: cpi-crash [--backend docker|containerd|all] [--trials N] \
         [--methods create_vm,attach_disk,detach_disk,delete_vm,create_stemcell] [--seed S]"
    );
    ExitCode::from(64)
}

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut args = Args {
        backends: vec![BackendKind::Docker, BackendKind::Containerd],
        trials: 50,
        methods: Method::ALL.to_vec(),
        seed: u64::from_str_radix(&uuid::Uuid::new_v4().simple().to_string()[..16], 16)
            .unwrap_or(1),
    };
    while let Some(flag) = argv.next() {
        let mut value = || argv.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--backend" => {
                args.backends = match value()?.as_str() {
                    "docker" => vec![BackendKind::Docker],
                    "containerd" => vec![BackendKind::Containerd],
                    "all" => vec![BackendKind::Docker, BackendKind::Containerd],
                    other => return Err(format!("unknown backend {other:?}")),
                }
            }
            "--trials" => {
                args.trials = value()?.parse().map_err(|e| format!("--trials: {e}"))?;
            }
            "--seed" => {
                args.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?;
            }
            "--methods" => {
                args.methods = value()?
                    .split(',')
                    .map(|m| Method::parse(m.trim()).ok_or(format!("unknown method {m:?}")))
                    .collect::<Result<_, _>>()?;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.trials == 0 {
        return Err("--trials must be at least 1".into());
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => return usage(&e),
    };
    eprintln!(
        "cpi-crash: {} trials per method, seed {} (repeat with --seed {})",
        args.trials, args.seed, args.seed
    );
    let started = std::time::Instant::now();
    let mut reports = Vec::new();
    let mut left = Vec::new();
    for kind in &args.backends {
        let (r, l) = crash::run_backend(*kind, &args.methods, args.trials, args.seed);
        reports.extend(r);
        left.extend(l);
    }
    print!("{}", crash::table(&reports));
    println!(
        "seed {}, {:.0?} in all; columns: killed = SIGKILL landed while the call ran, done = the \
         call had already answered; leftover must be 0",
        args.seed,
        started.elapsed()
    );
    let mut failed = false;
    for r in &reports {
        for p in &r.problems {
            eprintln!("problem: {p}");
        }
        failed |= !r.passed();
    }
    for l in &left {
        eprintln!("left at the end: {l}");
        failed = true;
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
