//! The rows of one backend: set-up, each CPI call beside its floor (alternating, in
//! the same run), and a clean-up that removes everything and checks for leftovers.
//!
//! Set-up (not timed): a small stemcell for VMs, one VM (`vm0`, kept running: the
//! has_vm and attach target, and the template of the floor's VMs), one disk, and the
//! floor's own running VM and disk. Every row then runs `reps` times (`create_vm`
//! and `delete_vm` `vm_reps` times):
//!
//! | row | CPI side (whole `cpi` process) |
//! |---|---|
//! | `info` | `info` |
//! | `has_vm` | `has_vm vm0` |
//! | `has_disk` | `has_disk` of the disk |
//! | `create_vm`, `delete_vm` | a VM on a manual network, then its deletion |
//! | `attach_disk`, `detach_disk` | live attach and detach of the disk to `vm0` |
//! | `get_disks` | `get_disks vm0` with the disk attached |
//! | `create_stemcell_*` | import of a prebuilt stemcell (deleted, not timed) |

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::runtime::Runtime;

use cpi_tests::conformance::{BackendKind, Target, CONTAINERD_TEST_NAMESPACE};
use cpi_tests::stemcell::UnpackedStemcell;

use super::containerd::ContainerdFloor;
use super::cpi::CpiSide;
use super::docker::DockerFloor;
use super::floor::Floor;
use super::measure::{self, ms, Measured};
use super::report::{BackendReport, Goal, Row, Side};

/// The stemcells of a run, built once for every backend.
pub struct Stemcells {
    /// A small one that VMs are made from.
    pub vm: UnpackedStemcell,
    /// The `create_stemcell` rows.
    pub imports: Vec<Import>,
}

/// One `create_stemcell` row.
pub struct Import {
    /// Row name.
    pub name: String,
    /// The stemcell.
    pub stemcell: UnpackedStemcell,
    /// Size of its `image`.
    pub bytes: u64,
    /// Repetitions (the 1 GB row runs fewer: its target is the peak RSS).
    pub reps: usize,
}

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Repetitions per row.
    pub reps: usize,
    /// Limit of one CPI call.
    pub timeout: Duration,
    /// Where floors keep scratch directories.
    pub scratch: PathBuf,
    /// VMs created at once in the concurrency rows (at most [`MAX_CONCURRENCY`]).
    pub concurrency: usize,
    /// Repetitions of the concurrency rows.
    pub batch_reps: usize,
    /// Repetitions of the `create_vm` and `delete_vm` rows.
    pub vm_reps: usize,
    /// VMs and disks present in the population rows (at most [`MAX_POPULATION`]; 0
    /// leaves the rows out).
    pub population: usize,
}

/// Most VMs of a concurrency batch (their static addresses are hosts 20..=59).
pub const MAX_CONCURRENCY: usize = 40;
/// Most VMs of the population rows (hosts 60..=199; the floor uses 200..=254).
pub const MAX_POPULATION: usize = 140;
/// How many set-up calls run at once while populating (not measured).
const SETUP_PARALLEL: usize = 10;

/// What the CPI made, to remove whatever happens.
#[derive(Default)]
struct Ledger {
    vms: Vec<String>,
    disks: Vec<String>,
    stemcells: Vec<String>,
    /// Every VM cid the run made (for the leftovers filter).
    all_vms: Vec<String>,
}

impl Ledger {
    fn clean(&mut self, cpi: &CpiSide<'_>) -> Vec<String> {
        let mut failures = Vec::new();
        for vm in std::mem::take(&mut self.vms) {
            if let Err(e) = cpi.call("delete_vm", json!([vm])) {
                failures.push(e);
            }
        }
        for d in std::mem::take(&mut self.disks) {
            if let Err(e) = cpi.call("delete_disk", json!([d])) {
                failures.push(e);
            }
        }
        for s in std::mem::take(&mut self.stemcells) {
            if let Err(e) = cpi.call("delete_stemcell", json!([s])) {
                failures.push(e);
            }
        }
        failures
    }

    fn forget_vm(&mut self, vm: &str) {
        self.vms.retain(|v| v != vm);
    }
}

/// The backend's name in the table.
pub fn backend_name(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Docker => "docker",
        BackendKind::Containerd => "containerd",
        BackendKind::Fake => "fake",
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panic".into())
}

fn push(side: &mut Side, m: &Measured) {
    side.samples_ms.push(ms(m.wall));
    push_process(side, m);
}

/// The process figures of `m` (RSS, CPU) without its wall time (batch rows, whose
/// samples are the batch's wall time).
fn push_process(side: &mut Side, m: &Measured) {
    side.rss_kib.push(m.max_rss_kib);
    side.cpu_ms.push(ms(m.cpu));
}

fn vm_cid(created: &Value) -> Result<String, String> {
    created[0]
        .as_str()
        .or_else(|| created.as_str())
        .map(str::to_owned)
        .ok_or_else(|| format!("create_vm answered no VM cid: {created}"))
}

/// Measures every row of one backend. Never panics on a daemon or CPI failure: the
/// failure is recorded in the report.
pub fn run(
    kind: BackendKind,
    opts: &Options,
    stemcells: &Stemcells,
    rt: &Arc<Runtime>,
) -> BackendReport {
    let mut report = BackendReport {
        backend: backend_name(kind).into(),
        ..Default::default()
    };
    let target = match std::panic::catch_unwind(|| Target::new(kind, "bench")) {
        Ok(t) => t,
        Err(p) => {
            report.setup_error = Some(panic_text(p.as_ref()));
            return report;
        }
    };
    report.director_uuid = target.director_uuid.clone();
    let scratch = opts.scratch.join(&target.director_uuid);
    let floor: Result<Option<Box<dyn Floor>>, String> = match kind {
        BackendKind::Docker => DockerFloor::connect(
            Arc::clone(rt),
            cpi_tests::daemons::DOCKER_SOCKET,
            &target.director_uuid,
            &target.subnet_prefix,
        )
        .map(|f| Some(Box::new(f) as Box<dyn Floor>)),
        BackendKind::Containerd => ContainerdFloor::connect(
            Arc::clone(rt),
            Path::new(cpi_tests::daemons::CONTAINERD_SOCKET),
            CONTAINERD_TEST_NAMESPACE,
            &target.director_uuid,
            &scratch,
            &target.subnet_prefix,
        )
        .map(|f| Some(Box::new(f) as Box<dyn Floor>)),
        BackendKind::Fake => Ok(None),
    };
    let mut floor = match floor {
        Ok(f) => f,
        Err(e) => {
            report.setup_error = Some(format!("connecting the floor: {e}"));
            return report;
        }
    };
    if let Some(f) = &floor {
        report.daemon = f.version();
    }
    let cpi = CpiSide::new(&target, opts.timeout);
    let mut ledger = Ledger::default();
    let measured = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rows(
            &target,
            &cpi,
            floor.as_deref_mut(),
            &mut ledger,
            opts,
            stemcells,
            &mut report,
        )
    }));
    match measured {
        Ok(Ok(())) => {}
        Ok(Err(e)) => report.setup_error = Some(e),
        Err(p) => report.setup_error = Some(format!("panic: {}", panic_text(p.as_ref()))),
    }
    // The floor first: its VMs run the CPI's stemcell image.
    if let Some(f) = floor.as_deref_mut() {
        report.cleanup_errors.extend(f.teardown());
    }
    report.cleanup_errors.extend(ledger.clean(&cpi));
    if let Err(e) = super::host::remove_dir_tree_unless_mounted(&scratch) {
        report.cleanup_errors.push(e);
    }
    target.remove_networks();
    if kind == BackendKind::Containerd {
        if let Err(e) = remove_containerd_bridge(&target.subnet_prefix) {
            report.cleanup_errors.push(e);
        }
    }
    // Everything labelled with the run, and mounts under this run's VMs.
    report.leftovers = target.leftovers(&ledger.all_vms);
    report
}

/// The bridge the containerd backend made for the run's manual subnet (one per
/// subnet, `bcpi` and 10 hex digits of the subnet's SHA-256, kept after its VMs like a
/// Docker network): removed when nothing is plugged into it any more.
fn remove_containerd_bridge(subnet_prefix: &str) -> Result<(), String> {
    let name = cpi_tests::daemons::cpi_bridge_name(&format!("{subnet_prefix}.0/24"));
    cpi_tests::daemons::remove_cpi_bridge(&name).map(|_| ())
}

fn rows(
    t: &Target,
    cpi: &CpiSide<'_>,
    mut floor: Option<&mut (dyn Floor + '_)>,
    ledger: &mut Ledger,
    opts: &Options,
    stemcells: &Stemcells,
    report: &mut BackendReport,
) -> Result<(), String> {
    let reps = opts.reps;
    let timeout = opts.timeout;
    let describe = |floor: &Option<&mut (dyn Floor + '_)>, row: &str| -> String {
        floor
            .as_ref()
            .map(|f| f.describe(row).to_owned())
            .unwrap_or_else(|| "fork+exec of /bin/true (fake backend: no daemon)".into())
    };

    // Set-up.
    cpi.call("info", json!([]))?;
    let stemcell = cpi
        .call("create_stemcell", json!([stemcells.vm.image_path, {}]))?
        .as_str()
        .ok_or("create_stemcell answered no cid")?
        .to_owned();
    ledger.stemcells.push(stemcell.clone());
    let created = cpi.call(
        "create_vm",
        json!(["agent-bench-0", stemcell, {}, {"default": t.manual_network(10)}, [], t.env()]),
    )?;
    let vm0 = vm_cid(&created)?;
    ledger.vms.push(vm0.clone());
    ledger.all_vms.push(vm0.clone());
    let disk = cpi
        .call("create_disk", json!([1024, {}, vm0]))?
        .as_str()
        .ok_or("create_disk answered no cid")?
        .to_owned();
    ledger.disks.push(disk.clone());
    let mut floor_vm = None;
    if let Some(f) = floor.as_deref_mut() {
        f.learn(&vm0)
            .map_err(|e| format!("floor: learning from {vm0}: {e}"))?;
        let (fvm, _) = f.create_vm().map_err(|e| format!("floor: first VM: {e}"))?;
        let fdisk = f.create_disk().map_err(|e| format!("floor: disk: {e}"))?;
        floor_vm = Some((fvm, fdisk));
    }
    let true_bin = Path::new("/bin/true");

    // info: the process alone.
    let mut row = Row {
        name: "info".into(),
        floor_does: describe(&floor, "info"),
        goal: Goal {
            max_ms: Some(2.0),
            max_rss_mib: Some(6.0),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut go = || -> Result<(), String> {
        cpi.measured("info", json!([]))?;
        for _ in 0..reps {
            let (m, _) = cpi.measured("info", json!([]))?;
            push(&mut row.cpi, &m);
            let f = measure::run(true_bin, &[], b"", timeout).map_err(|e| format!("floor: {e}"))?;
            push(&mut row.floor, &f);
        }
        Ok(())
    };
    let error = go().err();
    row.error = error;
    report.rows.push(row);

    // has_vm: the process and one container lookup.
    let row = trivial_row(
        cpi,
        ("has_vm", json!([vm0]), json!(true)),
        describe(&floor, "has_vm"),
        opts,
        || vm_lookup(&mut floor, &vm0),
    );
    report.rows.push(row);

    // has_disk: the process and one disk lookup.
    let row = trivial_row(
        cpi,
        ("has_disk", json!([disk]), json!(true)),
        describe(&floor, "has_disk"),
        opts,
        || match (floor.as_deref_mut(), &floor_vm) {
            (Some(f), Some((_, fdisk))) => f.disk_round_trip(fdisk),
            _ => Ok(Duration::ZERO),
        },
    );
    report.rows.push(row);

    // create_vm and delete_vm, alternating which side goes first.
    let vm_goal = Goal {
        max_ratio: Some(1.10),
        ..Default::default()
    };
    let mut create = Row {
        name: "create_vm".into(),
        floor_does: describe(&floor, "create_vm"),
        goal: vm_goal,
        ..Default::default()
    };
    let mut delete = Row {
        name: "delete_vm".into(),
        floor_does: describe(&floor, "delete_vm"),
        goal: vm_goal,
        ..Default::default()
    };
    // The floor without the VM's network, where the floor makes it (containerd).
    let (mut bare_create, mut bare_delete) = (Vec::new(), Vec::new());
    for i in 0..opts.vm_reps {
        let sides: [bool; 2] = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for cpi_side in sides {
            if cpi_side {
                let args = json!([format!("agent-bench-{}", i + 1), stemcell, {}, {"default": t.manual_network(11)}, [], t.env()]);
                match cpi
                    .measured("create_vm", args)
                    .and_then(|(m, v)| Ok((m, vm_cid(&v)?)))
                {
                    Ok((m, vm)) => {
                        ledger.vms.push(vm.clone());
                        ledger.all_vms.push(vm.clone());
                        push(&mut create.cpi, &m);
                        if let Some(f) = floor.as_deref_mut() {
                            if let Err(e) = f.wait_init(&vm) {
                                delete.error = Some(format!("before delete_vm: {e}"));
                                break;
                            }
                        }
                        match cpi.measured("delete_vm", json!([vm])) {
                            Ok((m, _)) => {
                                ledger.forget_vm(&vm);
                                push(&mut delete.cpi, &m);
                            }
                            Err(e) => delete.error = Some(e),
                        }
                    }
                    Err(e) => create.error = Some(e),
                }
            } else if let Some(f) = floor.as_deref_mut() {
                // The floor without the network goes after the other one in even
                // repetitions and before it in odd ones, as the sides alternate.
                if i % 2 == 1 {
                    if let Some(e) =
                        sample_without_network(f, None, &mut bare_create, &mut bare_delete)
                    {
                        create.error = Some(e);
                        break;
                    }
                }
                match floor_create_delete(f, None) {
                    Ok((took, deleted)) => {
                        create.floor.samples_ms.push(took);
                        match deleted {
                            Ok(took) => delete.floor.samples_ms.push(took),
                            Err(e) => delete.error = Some(format!("floor: {e}")),
                        }
                    }
                    Err(e) => create.error = Some(format!("floor: {e}")),
                }
                if i % 2 == 0 {
                    if let Some(e) =
                        sample_without_network(f, None, &mut bare_create, &mut bare_delete)
                    {
                        create.error = Some(e);
                    }
                }
            }
            if create.error.is_some() || delete.error.is_some() {
                break;
            }
        }
        if create.error.is_some() || delete.error.is_some() {
            break;
        }
    }
    create.note = without_network_note(&create.cpi.samples_ms, &bare_create);
    delete.note = without_network_note(&delete.cpi.samples_ms, &bare_delete);
    report.rows.push(create);
    report.rows.push(delete);

    // attach_disk and detach_disk, live, on the running VMs.
    let disk_goal = Goal {
        max_ms: Some(150.0),
        ..Default::default()
    };
    let mut attach = Row {
        name: "attach_disk".into(),
        floor_does: describe(&floor, "attach_disk"),
        goal: disk_goal,
        ..Default::default()
    };
    let mut detach = Row {
        name: "detach_disk".into(),
        floor_does: describe(&floor, "detach_disk"),
        goal: disk_goal,
        ..Default::default()
    };
    let mut go = |attach: &mut Row, detach: &mut Row| -> Result<(), (bool, String)> {
        for i in 0..=reps {
            let (a, _) = cpi
                .measured("attach_disk", json!([vm0, disk]))
                .map_err(|e| (true, e))?;
            let (d, _) = cpi
                .measured("detach_disk", json!([vm0, disk]))
                .map_err(|e| (false, e))?;
            let fl = match (floor.as_deref_mut(), &floor_vm) {
                (Some(f), Some((fvm, fdisk))) => {
                    let fa = f
                        .attach(fvm, fdisk)
                        .map_err(|e| (true, format!("floor: {e}")))?;
                    let fd = f
                        .detach(fvm, fdisk)
                        .map_err(|e| (false, format!("floor: {e}")))?;
                    Some((fa, fd))
                }
                _ => None,
            };
            if i == 0 {
                continue; // warm-up
            }
            push(&mut attach.cpi, &a);
            push(&mut detach.cpi, &d);
            if let Some((fa, fd)) = fl {
                attach.floor.samples_ms.push(ms(fa));
                detach.floor.samples_ms.push(ms(fd));
            }
        }
        Ok(())
    };
    match go(&mut attach, &mut detach) {
        Ok(()) => {}
        Err((true, e)) => attach.error = Some(e),
        Err((false, e)) => detach.error = Some(e),
    }
    report.rows.push(attach);
    report.rows.push(detach);

    // get_disks of vm0 with the disk attached (attach and detach not timed).
    let row = match cpi.call("attach_disk", json!([vm0, disk])) {
        Ok(_) => {
            let row = trivial_row(
                cpi,
                ("get_disks", json!([vm0]), json!([disk])),
                describe(&floor, "get_disks"),
                opts,
                || vm_lookup(&mut floor, &vm0),
            );
            // The rows after this one attach the disk themselves.
            cpi.call("detach_disk", json!([vm0, disk]))?;
            row
        }
        Err(e) => Row {
            name: "get_disks".into(),
            error: Some(format!("attaching the disk first: {e}")),
            ..Default::default()
        },
    };
    report.rows.push(row);

    // create_stemcell of each size; each import is removed before the next one.
    for import in &stemcells.imports {
        let (name, sc, bytes) = (&import.name, &import.stemcell, &import.bytes);
        let mut row = Row {
            name: name.clone(),
            floor_does: describe(&floor, name),
            bytes: Some(*bytes),
            goal: Goal {
                max_ratio: Some(1.0 / 0.95),
                throughput: true,
                // Issue 7: peak RSS <= 30 MB for a 1 GB image.
                max_rss_mib: (*bytes >= 1_000_000_000).then_some(30.0),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut go = || -> Result<(), String> {
            for i in 0..import.reps {
                let sides: [bool; 2] = if i % 2 == 0 {
                    [true, false]
                } else {
                    [false, true]
                };
                for cpi_side in sides {
                    if cpi_side {
                        let (m, v) = cpi.measured(
                            "create_stemcell",
                            json!([sc.image_path, {"infrastructure": "warden", "architecture": "x86_64"}]),
                        )?;
                        let cid = v
                            .as_str()
                            .ok_or("create_stemcell answered no cid")?
                            .to_owned();
                        ledger.stemcells.push(cid.clone());
                        push(&mut row.cpi, &m);
                        cpi.call("delete_stemcell", json!([cid]))?;
                        ledger.stemcells.retain(|s| *s != cid);
                    } else if let Some(f) = floor.as_deref_mut() {
                        let (id, took) = f
                            .import(&sc.image_path)
                            .map_err(|e| format!("floor: {e}"))?;
                        row.floor.samples_ms.push(ms(took));
                        f.remove_import(&id).map_err(|e| format!("floor: {e}"))?;
                    }
                }
            }
            Ok(())
        };
        let error = go().err();
        row.error = error;
        report.rows.push(row);
    }

    concurrent_rows(
        t,
        cpi,
        floor.as_deref_mut(),
        ledger,
        opts,
        &stemcell,
        report,
    );
    population_rows(t, cpi, floor, ledger, opts, &stemcell, &vm0, &disk, report)
}

/// The floor's lookup of `vm` on a fresh connection (nothing without a daemon).
fn vm_lookup(floor: &mut Option<&mut (dyn Floor + '_)>, vm: &str) -> Result<Duration, String> {
    match floor.as_deref_mut() {
        Some(f) => f.round_trip(vm),
        None => Ok(Duration::ZERO),
    }
}

/// The row of a trivial call: `call` (method, arguments, the answer it must give) as a
/// whole process, warm-up first, each repetition beside fork+exec of `/bin/true`
/// plus `lookup`, the daemon round trip the call needs (a fresh connection, as a
/// new process has). Target: 2 ms wall and 6 MiB peak RSS (issue 7).
fn trivial_row(
    cpi: &CpiSide<'_>,
    call: (&str, Value, Value),
    floor_does: String,
    opts: &Options,
    mut lookup: impl FnMut() -> Result<Duration, String>,
) -> Row {
    let (method, args, expect) = call;
    let mut row = Row {
        name: method.into(),
        floor_does,
        goal: Goal {
            max_ms: Some(2.0),
            max_rss_mib: Some(6.0),
            ..Default::default()
        },
        ..Default::default()
    };
    let true_bin = Path::new("/bin/true");
    let mut go = || -> Result<(), String> {
        for i in 0..=opts.reps {
            let (m, answer) = cpi.measured(method, args.clone())?;
            if answer != expect {
                return Err(format!("{method} {args} answered {answer}, not {expect}"));
            }
            let f = measure::run(true_bin, &[], b"", opts.timeout)
                .map_err(|e| format!("floor: {e}"))?;
            let rt = lookup().map_err(|e| format!("floor: {e}"))?;
            if i == 0 {
                continue; // warm-up
            }
            push(&mut row.cpi, &m);
            row.floor.samples_ms.push(ms(f.wall + rt));
            row.floor.rss_kib.push(f.max_rss_kib);
        }
        Ok(())
    };
    row.error = go().err();
    row
}

/// The create_vm arguments of a VM at host part `host` of the run's subnet.
fn vm_args(t: &Target, agent: &str, stemcell: &str, host: usize) -> Result<Value, String> {
    let host = u8::try_from(host).map_err(|_| format!("host part {host} is not an address"))?;
    Ok(json!([agent, stemcell, {}, {"default": t.manual_network(host)}, [], t.env()]))
}

/// The results of a batch of CPI calls: the successes' measurements and values, and
/// the first failure with the number of failures.
type BatchOutcome = (Vec<(Measured, Value)>, Option<String>);

fn batch_outcome(what: &str, results: Vec<super::cpi::CallResult>) -> BatchOutcome {
    let total = results.len();
    let mut ok = Vec::new();
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(v) => ok.push(v),
            Err(e) => failures.push(e),
        }
    }
    let error = failures.first().map(|first| {
        format!(
            "{} of {total} concurrent {what} failed; the first: {first}",
            failures.len()
        )
    });
    (ok, error)
}

/// Median of the per-call wall times of a batch, for the note.
fn per_call_note(walls: &[f64], n: usize) -> String {
    match measure::Stats::of(walls) {
        Some(s) => format!(
            "{n} calls at once; per call median {} ms, max {} ms",
            super::report::fmt_ms(Some(s.median)),
            super::report::fmt_ms(Some(s.max))
        ),
        None => String::new(),
    }
}

/// One create and delete of floor VMs without their network (`batch`: `None` for one
/// VM, `Some(n)` for `n` at once), their times pushed to `creates` and `deletes`.
/// `None` when the floor has no such variant (Docker) or all went well, else the
/// failure.
fn sample_without_network(
    f: &mut dyn Floor,
    batch: Option<usize>,
    creates: &mut Vec<f64>,
    deletes: &mut Vec<f64>,
) -> Option<String> {
    if !f.set_network(false) {
        return None;
    }
    let sample = floor_create_delete(f, batch).and_then(|(c, d)| Ok((c, d?)));
    f.set_network(true);
    match sample {
        Ok((c, d)) => {
            creates.push(c);
            deletes.push(d);
            None
        }
        Err(e) => Some(format!("floor without the network: {e}")),
    }
}

/// One floor create (`batch`: `None` for one VM, `Some(n)` for `n` at once) and,
/// once their inits catch SIGTERM, their delete: the create's milliseconds and the
/// delete's, or the delete's failure; or the create's failure.
fn floor_create_delete(
    f: &mut dyn Floor,
    batch: Option<usize>,
) -> Result<(f64, Result<f64, String>), String> {
    let (vms, took) = match batch {
        None => f.create_vm().map(|(vm, took)| (vec![vm], took))?,
        Some(n) => f.create_vms(n)?,
    };
    let deleted = vms
        .iter()
        .try_for_each(|vm| f.wait_init(vm))
        .and_then(|()| match (batch, vms.as_slice()) {
            (None, [vm]) => f.delete_vm(vm),
            _ => f.delete_vms(&vms),
        })
        .map(ms);
    Ok((ms(took), deleted))
}

/// What a row's floor read without the VMs' network (containerd, where the floor
/// makes it as the CPI does), and the CPI's ratio against that: the figure of the
/// runs before 2026-12-07, shown beside the judged one.
fn without_network_note(cpi: &[f64], bare: &[f64]) -> String {
    match (measure::Stats::of(cpi), measure::Stats::of(bare)) {
        (Some(c), Some(b)) if b.median > 0.0 => format!(
            "floor without the VM network {} ms (ratio {:.2})",
            super::report::fmt_ms(Some(b.median)),
            c.median / b.median
        ),
        _ => String::new(),
    }
}

fn joined_notes(a: String, b: String) -> String {
    match (a.is_empty(), b.is_empty()) {
        (_, true) => a,
        (true, false) => b,
        (false, false) => format!("{a}; {b}"),
    }
}

/// `create_vm_xN` and `delete_vm_xN`: N VMs from one stemcell at once, as the director
/// does, beside N raw creates (and deletes) at once. A sample is the wall time of the
/// whole batch; RSS and CPU are per process.
fn concurrent_rows(
    t: &Target,
    cpi: &CpiSide<'_>,
    mut floor: Option<&mut (dyn Floor + '_)>,
    ledger: &mut Ledger,
    opts: &Options,
    stemcell: &str,
    report: &mut BackendReport,
) {
    let n = opts.concurrency.min(MAX_CONCURRENCY);
    if n == 0 || opts.batch_reps == 0 {
        return;
    }
    let describe = |floor: &Option<&mut (dyn Floor + '_)>, row: &str| -> String {
        floor
            .as_ref()
            .map(|f| f.describe(row).to_owned())
            .unwrap_or_default()
    };
    let mut create = Row {
        name: format!("create_vm_x{n}"),
        floor_does: describe(&floor, "create_vm_x"),
        goal: Goal {
            max_ratio: Some(1.2),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut delete = Row {
        name: format!("delete_vm_x{n}"),
        floor_does: describe(&floor, "delete_vm_x"),
        ..Default::default()
    };
    let mut create_walls = Vec::new();
    let mut delete_walls = Vec::new();
    // The floor without the VMs' network, where the floor makes it (containerd).
    let (mut bare_create, mut bare_delete) = (Vec::new(), Vec::new());
    'reps: for rep in 0..opts.batch_reps {
        let sides: [bool; 2] = if rep % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for cpi_side in sides {
            if cpi_side {
                let args: Result<Vec<Value>, String> = (0..n)
                    .map(|i| vm_args(t, &format!("agent-bench-c{rep}-{i}"), stemcell, 20 + i))
                    .collect();
                let args = match args {
                    Ok(a) => a,
                    Err(e) => {
                        create.error = Some(e);
                        break 'reps;
                    }
                };
                let (wall, results) = cpi.measured_concurrently("create_vm", args);
                let (ok, error) = batch_outcome("create_vm", results);
                let mut vms = Vec::new();
                for (m, v) in &ok {
                    match vm_cid(v) {
                        Ok(vm) => {
                            ledger.vms.push(vm.clone());
                            ledger.all_vms.push(vm.clone());
                            vms.push(vm);
                            push_process(&mut create.cpi, m);
                            create_walls.push(ms(m.wall));
                        }
                        Err(e) => create.error = Some(e),
                    }
                }
                if let Some(e) = error {
                    create.error = Some(e);
                } else if create.error.is_none() {
                    create.cpi.samples_ms.push(ms(wall));
                }
                if let Some(f) = floor.as_deref_mut() {
                    if let Err(e) = vms.iter().try_for_each(|vm| f.wait_init(vm)) {
                        delete.error = Some(format!("before delete_vm: {e}"));
                    }
                }
                let (wall, results) = cpi
                    .measured_concurrently("delete_vm", vms.iter().map(|vm| json!([vm])).collect());
                let all = results.len();
                for (vm, r) in vms.iter().zip(&results) {
                    if r.is_ok() {
                        ledger.forget_vm(vm);
                    }
                }
                let (ok, error) = batch_outcome("delete_vm", results);
                for (m, _) in &ok {
                    push_process(&mut delete.cpi, m);
                    delete_walls.push(ms(m.wall));
                }
                match error {
                    Some(e) => delete.error = Some(e),
                    None if all == n => delete.cpi.samples_ms.push(ms(wall)),
                    None => {}
                }
            } else if let Some(f) = floor.as_deref_mut() {
                if rep % 2 == 1 {
                    if let Some(e) =
                        sample_without_network(f, Some(n), &mut bare_create, &mut bare_delete)
                    {
                        create.error = Some(e);
                        break 'reps;
                    }
                }
                match floor_create_delete(f, Some(n)) {
                    Ok((took, deleted)) => {
                        create.floor.samples_ms.push(took);
                        match deleted {
                            Ok(took) => delete.floor.samples_ms.push(took),
                            Err(e) => delete.error = Some(format!("floor: {e}")),
                        }
                    }
                    Err(e) => create.error = Some(format!("floor: {e}")),
                }
                if rep % 2 == 0 {
                    if let Some(e) =
                        sample_without_network(f, Some(n), &mut bare_create, &mut bare_delete)
                    {
                        create.error = Some(e);
                    }
                }
            }
            if create.error.is_some() || delete.error.is_some() {
                break 'reps;
            }
        }
    }
    create.note = joined_notes(
        per_call_note(&create_walls, n),
        without_network_note(&create.cpi.samples_ms, &bare_create),
    );
    delete.note = joined_notes(
        per_call_note(&delete_walls, n),
        without_network_note(&delete.cpi.samples_ms, &bare_delete),
    );
    report.rows.push(create);
    report.rows.push(delete);
}

/// Runs `method` for every argument list, [`SETUP_PARALLEL`] at a time (set-up and
/// clean-up, not measured); the results in order.
fn calls_in_parallel(
    cpi: &CpiSide<'_>,
    method: &str,
    args: Vec<Value>,
) -> Vec<Result<Value, String>> {
    let mut out = Vec::with_capacity(args.len());
    let mut args = args.into_iter().peekable();
    while args.peek().is_some() {
        let chunk: Vec<Value> = args.by_ref().take(SETUP_PARALLEL).collect();
        let (_, results) = cpi.measured_concurrently(method, chunk);
        out.extend(results.into_iter().map(|r| r.map(|(_, v)| v)));
    }
    out
}

/// `has_vm`, `attach_disk`, `detach_disk`, `create_vm` and `delete_vm` with N more VMs
/// and N more disks present, beside the same call's samples from this run's rows with
/// none of them present (the "floor" column of these rows).
#[allow(
    clippy::too_many_arguments,
    reason = "the run's context, spelled out like the other row groups"
)]
fn population_rows(
    t: &Target,
    cpi: &CpiSide<'_>,
    mut floor: Option<&mut (dyn Floor + '_)>,
    ledger: &mut Ledger,
    opts: &Options,
    stemcell: &str,
    vm0: &str,
    disk: &str,
    report: &mut BackendReport,
) -> Result<(), String> {
    let n = opts.population.min(MAX_POPULATION);
    if n == 0 {
        return Ok(());
    }
    let reps = opts.reps;
    let started = std::time::Instant::now();
    let args = (0..n)
        .map(|i| vm_args(t, &format!("agent-bench-p{i}"), stemcell, 60 + i))
        .collect::<Result<Vec<_>, _>>()?;
    let mut present_vms = Vec::new();
    let mut first_error = None;
    for r in calls_in_parallel(cpi, "create_vm", args) {
        match r.and_then(|v| vm_cid(&v)) {
            Ok(vm) => {
                ledger.vms.push(vm.clone());
                ledger.all_vms.push(vm.clone());
                present_vms.push(vm);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let mut present_disks = Vec::new();
    for r in calls_in_parallel(cpi, "create_disk", vec![json!([1024, {}, vm0]); n]) {
        match r.and_then(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("create_disk answered {v}"))
        }) {
            Ok(d) => {
                ledger.disks.push(d.clone());
                present_disks.push(d);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(format!("populating {n} VMs and {n} disks: {e}"));
    }
    super::note(&format!(
        "{n} VMs and {n} disks present (made in {:.1} s)",
        started.elapsed().as_secs_f64()
    ));
    // Making them loads the machine (their processes start, the daemons settle):
    // the rows compare against samples taken before, so let that pass first, up to
    // a minute, until the 1-minute load average is below the number of CPUs.
    let settle = std::time::Instant::now();
    let cpus = std::thread::available_parallelism().map_or(2, usize::from) as f64;
    let load1 = || -> f64 {
        super::machine::load_average()
            .split(' ')
            .next()
            .and_then(|l| l.parse().ok())
            .unwrap_or(0.0)
    };
    while load1() >= cpus && settle.elapsed() < std::time::Duration::from_secs(60) {
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    super::note(&format!(
        "waited {:.0} s for the machine to settle (load average now {})",
        settle.elapsed().as_secs_f64(),
        super::machine::load_average()
    ));

    let baseline = |name: &str| -> Side {
        report
            .rows
            .iter()
            .find(|r| r.name == name)
            .map(|r| Side {
                samples_ms: r.cpi.samples_ms.clone(),
                ..Default::default()
            })
            .unwrap_or_default()
    };
    let row = |name: &str| Row {
        name: format!("{name}_with_{n}"),
        floor: baseline(name),
        floor_does: format!(
            "the same call in this run's {name} row, without the {n} VMs and {n} disks"
        ),
        goal: Goal {
            max_ratio: Some(1.10),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut has_vm = row("has_vm");
    let mut attach = row("attach_disk");
    let mut detach = row("detach_disk");
    let mut create = row("create_vm");
    let mut delete = row("delete_vm");
    // The raw floor's create and delete with the population present too: how much
    // of a slower create or delete is the daemon's own (not part of the ratio).
    let mut floor_create = Side::default();
    let mut floor_delete = Side::default();
    let mut go = || -> Result<(), String> {
        for i in 0..=reps {
            let (h, found) = cpi.measured("has_vm", json!([vm0]))?;
            if found != json!(true) {
                return Err(format!("has_vm {vm0} answered {found}"));
            }
            let (a, _) = cpi.measured("attach_disk", json!([vm0, disk]))?;
            let (d, _) = cpi.measured("detach_disk", json!([vm0, disk]))?;
            let (c, v) = cpi.measured(
                "create_vm",
                vm_args(t, &format!("agent-bench-q{i}"), stemcell, 12)?,
            )?;
            let vm = vm_cid(&v)?;
            ledger.vms.push(vm.clone());
            ledger.all_vms.push(vm.clone());
            if let Some(f) = floor.as_deref_mut() {
                f.wait_init(&vm)?;
            }
            let (x, _) = cpi.measured("delete_vm", json!([vm]))?;
            ledger.forget_vm(&vm);
            if let Some(f) = floor.as_deref_mut() {
                let (fvm, fc) = f.create_vm()?;
                f.wait_init(&fvm)?;
                let fd = f.delete_vm(&fvm)?;
                if i > 0 {
                    floor_create.samples_ms.push(ms(fc));
                    floor_delete.samples_ms.push(ms(fd));
                }
            }
            if i == 0 {
                continue; // warm-up
            }
            push(&mut has_vm.cpi, &h);
            push(&mut attach.cpi, &a);
            push(&mut detach.cpi, &d);
            push(&mut create.cpi, &c);
            push(&mut delete.cpi, &x);
        }
        Ok(())
    };
    let error = go().err();
    for (r, with, base) in [
        (&mut create, &floor_create, "create_vm"),
        (&mut delete, &floor_delete, "delete_vm"),
    ] {
        let without = report
            .rows
            .iter()
            .find(|r| r.name == base)
            .and_then(|r| r.floor.stats());
        if let (Some(w), Some(b)) = (with.stats(), without) {
            r.note = format!(
                "raw floor with them {:.1} ms ({:.2}x its {:.1} ms without)",
                w.median,
                w.median / b.median,
                b.median
            );
        }
    }
    for r in [
        &mut has_vm,
        &mut attach,
        &mut detach,
        &mut create,
        &mut delete,
    ] {
        r.error.clone_from(&error);
    }
    report.rows.extend([has_vm, attach, detach, create, delete]);

    // Remove the population now (the ledger retries whatever fails here).
    let args: Vec<Value> = present_vms.iter().map(|vm| json!([vm])).collect();
    for (vm, r) in present_vms
        .iter()
        .zip(calls_in_parallel(cpi, "delete_vm", args))
    {
        if r.is_ok() {
            ledger.forget_vm(vm);
        }
    }
    let args: Vec<Value> = present_disks.iter().map(|d| json!([d])).collect();
    for (d, r) in present_disks
        .iter()
        .zip(calls_in_parallel(cpi, "delete_disk", args))
    {
        if r.is_ok() {
            ledger.disks.retain(|x| x != d);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_note_without_the_network_gives_that_floor_and_the_ratio() {
        let note = without_network_note(&[60.0, 66.0, 63.0], &[50.0, 60.0, 55.0]);
        assert_eq!(note, "floor without the VM network 55.0 ms (ratio 1.15)");
        assert_eq!(without_network_note(&[60.0], &[]), "");
        assert_eq!(without_network_note(&[], &[50.0]), "");
    }

    #[test]
    fn notes_join_with_a_semicolon_and_skip_empty_ones() {
        assert_eq!(joined_notes("a".into(), "b".into()), "a; b");
        assert_eq!(joined_notes("a".into(), String::new()), "a");
        assert_eq!(joined_notes(String::new(), "b".into()), "b");
        assert_eq!(joined_notes(String::new(), String::new()), "");
    }
}
