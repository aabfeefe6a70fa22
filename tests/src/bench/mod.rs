//! `cpi-bench`: every CPI call that matters for performance, measured as the director
//! runs it (one `cpi` process per call), each beside its raw floor (the same daemon
//! operations issued directly by this program) measured in the same run. See
//! `docs/performance.md` for what each row and floor is, and `scripts/bench.sh`.
//!
//! - [`measure`]: wall time and peak RSS of a child process (under the small
//!   measuring parent `cpi-measure`, `cpi_tests::measure_parent`), and the statistics.
//! - [`cpi`]: the CPI side; [`floor`] with [`docker`] and [`containerd`]: the floors,
//!   with [`host`] for their mounts.
//! - [`suite`]: the rows of one backend; [`report`]: table and JSON;
//!   [`machine`]: the header.

pub mod containerd;
pub mod cpi;
pub mod docker;
pub mod floor;
pub mod host;
pub mod machine;
pub mod measure;
pub mod report;
pub mod suite;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cpi_tests::conformance::BackendKind;
use cpi_tests::stemcell::TestStemcell;

use self::report::{BackendJson, BackendReport, Document};
use self::suite::{Import, Options, Stemcells};

/// Default repetitions per row.
pub const DEFAULT_REPS: usize = 15;
/// Repetitions with `--quick`.
pub const QUICK_REPS: usize = 3;
/// Image sizes of the `create_stemcell` rows (bytes, decimal MB as in the issue).
pub const SMALL_IMAGE: u64 = 50_000_000;
/// The large one (left out by `--quick`).
pub const LARGE_IMAGE: u64 = 500_000_000;
/// The 1 GB one of the peak-RSS target (left out by `--quick`).
pub const HUGE_IMAGE: u64 = 1_000_000_000;
/// Repetitions of the 1 GB row (its target is the peak RSS, which does not vary).
pub const HUGE_REPS: usize = 3;
/// VMs created at once in the concurrency rows (issue 7: 20), and with `--quick`.
pub const CONCURRENCY: (usize, usize) = (20, 4);
/// Repetitions of the concurrency rows, and with `--quick`.
pub const BATCH_REPS: (usize, usize) = (5, 1);
/// The `create_vm` and `delete_vm` rows run this many times `--reps`: a sample is
/// ~0.1 s, and one sample's spread on this kind of machine (±15 %) is wider than
/// the target's margin, so their medians need more samples than the other rows.
pub const VM_REPS_FACTOR: usize = 3;
/// VMs and disks present in the population rows (issue 7: 100), and with `--quick`.
pub const POPULATION: (usize, usize) = (100, 10);
/// Where the floors keep scratch directories (one per run, removed at the end).
pub const SCRATCH_ROOT: &str = "/var/lib/cpi-bench";

const USAGE: &str =
    "usage: cpi-bench [--quick] [--backend docker|containerd|all|fake] [--reps N] [--json PATH]
                 [--concurrency N] [--population N]

Measures info, has_vm, has_disk, create_vm, delete_vm, attach_disk, detach_disk, get_disks,
create_stemcell (~50 MB, ~500 MB and 1 GB images), N concurrent create_vm/delete_vm from one stemcell
(20), and has_vm, attach/detach, create/delete with N more VMs and disks present (100),
through the real cpi binary (CPI_BIN, else target/debug/cpi), each beside its raw floor,
and prints one table (stdout) and a JSON document (default target/bench.json).
--reps N: repetitions per row (15); create_vm and delete_vm run 3 N times.
--quick: 3 repetitions, only the small stemcell, 4 concurrent, 10 present.
Run as root beside the daemons; `bash scripts/bench.sh` builds and runs it.";

/// Parsed command line.
#[derive(Debug, Clone, PartialEq)]
pub struct Args {
    /// `--quick`.
    pub quick: bool,
    /// Backends to measure, in order.
    pub backends: Vec<BackendKind>,
    /// Repetitions per row.
    pub reps: usize,
    /// Where the JSON goes.
    pub json: PathBuf,
    /// VMs at once in the concurrency rows.
    pub concurrency: usize,
    /// VMs and disks present in the population rows (0: no such rows).
    pub population: usize,
}

/// Parses the arguments (without the program name).
pub fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut quick = false;
    let mut backends = vec![BackendKind::Docker, BackendKind::Containerd];
    let mut reps = None;
    let mut concurrency = None;
    let mut population = None;
    let mut json = cpi_tests::workspace_root()
        .join("target")
        .join("bench.json");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--quick" => quick = true,
            "--backend" => {
                backends = match value("--backend")?.as_str() {
                    "docker" => vec![BackendKind::Docker],
                    "containerd" => vec![BackendKind::Containerd],
                    "all" => vec![BackendKind::Docker, BackendKind::Containerd],
                    "fake" => vec![BackendKind::Fake],
                    other => return Err(format!("unknown backend {other:?}")),
                }
            }
            "--reps" => {
                let v = value("--reps")?;
                reps = Some(
                    v.parse::<usize>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| format!("--reps {v:?} is not a positive number"))?,
                );
            }
            "--json" => json = PathBuf::from(value("--json")?),
            "--concurrency" => {
                let v = value("--concurrency")?;
                concurrency = Some(
                    v.parse::<usize>()
                        .ok()
                        .filter(|n| (1..=suite::MAX_CONCURRENCY).contains(n))
                        .ok_or_else(|| {
                            format!(
                                "--concurrency {v:?} is not a number from 1 to {}",
                                suite::MAX_CONCURRENCY
                            )
                        })?,
                );
            }
            "--population" => {
                let v = value("--population")?;
                population = Some(
                    v.parse::<usize>()
                        .ok()
                        .filter(|n| *n <= suite::MAX_POPULATION)
                        .ok_or_else(|| {
                            format!(
                                "--population {v:?} is not a number from 0 to {}",
                                suite::MAX_POPULATION
                            )
                        })?,
                );
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Args {
        quick,
        backends,
        reps: reps.unwrap_or(if quick { QUICK_REPS } else { DEFAULT_REPS }),
        json,
        concurrency: concurrency.unwrap_or(if quick { CONCURRENCY.1 } else { CONCURRENCY.0 }),
        population: population.unwrap_or(if quick { POPULATION.1 } else { POPULATION.0 }),
    })
}

/// A progress line on stderr.
pub fn note(text: &str) {
    let _ = writeln!(std::io::stderr(), "[cpi-bench] {text}");
}

/// Builds the stemcells of the run (not timed), with padding unique to the run so no
/// daemon can reuse content from an earlier run.
fn build_stemcells(dir: &std::path::Path, quick: bool, reps: usize) -> Stemcells {
    let seed = uuid::Uuid::new_v4().as_u64_pair().0;
    let busybox = std::fs::metadata(cpi_tests::stemcell::DEFAULT_BUSYBOX)
        .map(|m| m.len())
        .unwrap_or(0);
    let build = |name: &str, total: u64| {
        let started = Instant::now();
        let padding = total.saturating_sub(busybox + 64 * 1024);
        // A version of its own: the backends adopt an existing stemcell of the same
        // name and version (a retried upload), and the VM stemcell must stay.
        let sc = TestStemcell::builder()
            .version(format!("bench-{name}"))
            .padding_bytes(padding)
            .padding_seed(seed ^ total)
            .compression_level(0)
            .build_unpacked(dir.join(name));
        let bytes = std::fs::metadata(&sc.image_path)
            .map(|m| m.len())
            .unwrap_or(0);
        note(&format!(
            "built stemcell {name}: {bytes} bytes in {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        (sc, bytes)
    };
    let vm = TestStemcell::builder().build_unpacked(dir.join("vm"));
    let mut imports = Vec::new();
    let mut add = |name: &str, file: &str, size: u64, reps: usize| {
        let (stemcell, bytes) = build(file, size);
        imports.push(Import {
            name: name.to_owned(),
            stemcell,
            bytes,
            reps,
        });
    };
    add("create_stemcell_50mb", "small", SMALL_IMAGE, reps);
    if !quick {
        add("create_stemcell_500mb", "large", LARGE_IMAGE, reps);
        add(
            "create_stemcell_1gb",
            "huge",
            HUGE_IMAGE,
            HUGE_REPS.min(reps),
        );
    }
    Stemcells { vm, imports }
}

#[allow(
    clippy::print_stdout,
    reason = "the table is the benchmark's output, on stdout"
)]
fn print_table(machine: &machine::Machine, args: &Args, reports: &[BackendReport]) {
    for line in machine.header() {
        println!("{line}");
    }
    println!(
        "run: {} repetitions per row ({} for create_vm and delete_vm){}; ratio = median / floor median; peak RSS and median cpu (user+sys) of the cpi process and what it waited for",
        args.reps,
        args.reps * VM_REPS_FACTOR,
        if args.quick { " (--quick)" } else { "" }
    );
    println!(
        "     _xN rows: N calls at once, a sample is the batch's wall time ({} repetitions); _with_N rows: N more VMs and N disks present, floor = the same call's row without them",
        if args.quick { BATCH_REPS.1 } else { BATCH_REPS.0 }.min(args.reps)
    );
    println!();
    for line in report::table(reports) {
        println!("{line}");
    }
    for r in reports {
        for l in &r.leftovers {
            println!("LEFT BEHIND ({}): {l}", r.backend);
        }
        for e in &r.cleanup_errors {
            println!(
                "CLEAN-UP FAILED ({}): {}",
                r.backend,
                e.lines().next().unwrap_or_default()
            );
        }
    }
}

/// The peak RSS `/bin/true` reads as under the measuring parent (median of 5).
fn rss_floor() -> Option<u64> {
    let kib: Vec<f64> = (0..5)
        .filter_map(|_| {
            measure::run(
                std::path::Path::new("/bin/true"),
                &[],
                b"",
                std::time::Duration::from_secs(10),
            )
            .ok()
        })
        .map(|m| m.max_rss_kib as f64)
        .collect();
    measure::Stats::of(&kib).map(|s| s.median as u64)
}

/// The benchmark's `main`.
pub fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) => {
            let mut err = std::io::stderr();
            if !e.is_empty() {
                let _ = writeln!(err, "cpi-bench: {e}");
            }
            let _ = writeln!(err, "{USAGE}");
            return ExitCode::from(if e.is_empty() { 0 } else { 2 });
        }
    };
    let started = Instant::now();
    let cpi_bin = cpi_tests::cpi_bin();
    let mut machine = machine::Machine::probe(&cpi_bin);
    machine.rss_floor_kib = rss_floor();
    let dir = match tempfile::Builder::new().prefix("cpi-bench-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            note(&format!("cannot create a temporary directory: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let stemcells = build_stemcells(dir.path(), args.quick, args.reps);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Arc::new(rt),
        Err(e) => {
            note(&format!("cannot start a tokio runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let opts = Options {
        reps: args.reps,
        timeout: Duration::from_secs(600),
        scratch: PathBuf::from(SCRATCH_ROOT),
        concurrency: args.concurrency,
        batch_reps: if args.quick {
            BATCH_REPS.1
        } else {
            BATCH_REPS.0
        }
        .min(args.reps),
        vm_reps: args.reps * VM_REPS_FACTOR,
        population: args.population,
    };
    let mut reports = Vec::new();
    for kind in &args.backends {
        let name = suite::backend_name(*kind);
        note(&format!(
            "measuring {name} ({} repetitions per row)",
            args.reps
        ));
        let t = Instant::now();
        let r = suite::run(*kind, &opts, &stemcells, &rt);
        note(&format!(
            "{name} done in {:.1} s",
            t.elapsed().as_secs_f64()
        ));
        match kind {
            BackendKind::Docker if !r.daemon.is_empty() => machine.docker = Some(r.daemon.clone()),
            BackendKind::Containerd if !r.daemon.is_empty() => {
                machine.containerd = Some(r.daemon.clone())
            }
            _ => {}
        }
        reports.push(r);
    }
    machine.load_after = machine::load_average();
    print_table(&machine, &args, &reports);
    let doc = Document {
        finished_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        quick: args.quick,
        reps: args.reps,
        machine,
        backends: reports
            .iter()
            .map(|r| BackendJson {
                summary: r.rows.iter().map(report::Row::summary).collect(),
                report: r.clone(),
            })
            .collect(),
    };
    let written = serde_json::to_vec_pretty(&doc)
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            if let Some(parent) = args.json.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
            }
            std::fs::write(&args.json, bytes).map_err(|e| e.to_string())
        });
    match written {
        Ok(()) => note(&format!("JSON written to {}", args.json.display())),
        Err(e) => note(&format!("cannot write {}: {e}", args.json.display())),
    }
    note(&format!("total {:.1} s", started.elapsed().as_secs_f64()));
    for r in &reports {
        if let Some(e) = &r.setup_error {
            note(&format!("{}: not measured: {e}", r.backend));
        }
        for row in &r.rows {
            if let Some(e) = &row.error {
                note(&format!("{} {}: {e}", r.backend, row.name));
            }
        }
    }
    if reports.iter().any(BackendReport::failed) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, String> {
        parse_args(&list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn defaults_and_quick() {
        let a = args(&[]).expect("args");
        assert_eq!(a.reps, DEFAULT_REPS);
        assert_eq!(
            a.backends,
            vec![BackendKind::Docker, BackendKind::Containerd]
        );
        assert!(a.json.ends_with("target/bench.json"));
        let q = args(&[
            "--quick",
            "--backend",
            "containerd",
            "--json",
            "/tmp/x.json",
        ])
        .expect("args");
        assert!(q.quick);
        assert_eq!(q.reps, QUICK_REPS);
        assert_eq!(q.backends, vec![BackendKind::Containerd]);
        assert_eq!(q.json, PathBuf::from("/tmp/x.json"));
        assert_eq!(args(&["--quick", "--reps", "5"]).expect("args").reps, 5);
        assert_eq!((a.concurrency, a.population), (20, 100));
        assert_eq!((q.concurrency, q.population), (4, 10));
        let c = args(&["--concurrency", "8", "--population", "0"]).expect("args");
        assert_eq!((c.concurrency, c.population), (8, 0));
    }

    #[test]
    fn bad_arguments() {
        assert!(args(&["--backend", "lxd"]).is_err());
        assert!(args(&["--reps", "0"]).is_err());
        assert!(args(&["--reps"]).is_err());
        assert!(args(&["--frobnicate"]).is_err());
        assert!(args(&["--concurrency", "0"]).is_err());
        assert!(args(&["--concurrency", "41"]).is_err());
        assert!(args(&["--population", "141"]).is_err());
        assert_eq!(args(&["--help"]), Err(String::new()));
    }
}
