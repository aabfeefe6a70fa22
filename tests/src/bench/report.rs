//! The results: one aligned table for people, one JSON document for tools.

use serde::Serialize;

use super::machine::Machine;
use super::measure::Stats;

/// Samples of one side of a row, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Side {
    /// Every sample, in order.
    pub samples_ms: Vec<f64>,
    /// Peak RSS of each measured process, KiB (empty when not a process).
    pub rss_kib: Vec<u64>,
    /// User + system CPU time of each measured process, ms (empty when not a process).
    pub cpu_ms: Vec<f64>,
}

impl Side {
    /// Median, min and max of the samples.
    pub fn stats(&self) -> Option<Stats> {
        Stats::of(&self.samples_ms)
    }
}

/// One row: a CPI call beside its floor.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Row {
    /// `info`, `has_vm`, `create_vm`, … `create_stemcell_500mb`.
    pub name: String,
    /// The CPI side (whole `cpi` processes).
    pub cpi: Side,
    /// The floor side.
    pub floor: Side,
    /// What the floor does.
    pub floor_does: String,
    /// Size of the image, for `create_stemcell` rows.
    pub bytes: Option<u64>,
    /// The issue-7 target of the row, for reference (never asserted).
    pub goal: Goal,
    /// Why the row stopped early, if it did.
    pub error: Option<String>,
    /// A remark for the table's note column (batch rows: the per-call figures).
    pub note: String,
}

/// An issue-7 target: shown beside the numbers, never asserted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Goal {
    /// Median wall time at most this, ms.
    pub max_ms: Option<f64>,
    /// Peak RSS at most this, MiB.
    pub max_rss_mib: Option<f64>,
    /// Median / floor median at most this.
    pub max_ratio: Option<f64>,
    /// The ratio limit is a throughput target (`≥ 1/max_ratio × floor MB/s`).
    pub throughput: bool,
}

impl Goal {
    /// In words.
    pub fn text(&self) -> String {
        let mut parts = Vec::new();
        if let Some(ms) = self.max_ms {
            parts.push(format!("<= {ms} ms"));
        }
        if let Some(mib) = self.max_rss_mib {
            parts.push(format!("<= {mib} MiB"));
        }
        match (self.max_ratio, self.throughput) {
            (Some(r), true) => parts.push(format!(">= {:.2}x floor MB/s", 1.0 / r)),
            (Some(r), false) => parts.push(format!("<= {r:.2}x floor")),
            (None, _) => {}
        }
        parts.join(", ")
    }

    /// Whether `s` meets it (`None` without a goal or without numbers).
    pub fn met(&self, s: &Summary) -> Option<bool> {
        if *self == Goal::default() {
            return None;
        }
        let mut met = true;
        if let Some(max) = self.max_ms {
            met &= s.median_ms? <= max;
        }
        if let Some(max) = self.max_rss_mib {
            met &= (s.peak_rss_kib? as f64 / 1024.0) <= max;
        }
        if let Some(max) = self.max_ratio {
            met &= s.ratio? <= max;
        }
        Some(met)
    }
}

/// The numbers a row reports, derived from its samples.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Row name.
    pub name: String,
    /// Repetitions measured on the CPI side.
    pub n: usize,
    /// CPI median, ms.
    pub median_ms: Option<f64>,
    /// CPI minimum, ms.
    pub min_ms: Option<f64>,
    /// CPI maximum, ms.
    pub max_ms: Option<f64>,
    /// Floor median, ms.
    pub floor_median_ms: Option<f64>,
    /// Floor minimum, ms.
    pub floor_min_ms: Option<f64>,
    /// Floor maximum, ms.
    pub floor_max_ms: Option<f64>,
    /// CPI median / floor median.
    pub ratio: Option<f64>,
    /// The largest peak RSS of the CPI processes, KiB.
    pub peak_rss_kib: Option<u64>,
    /// Median peak RSS of the CPI processes, KiB.
    pub median_rss_kib: Option<u64>,
    /// Median CPU time (user + system) of the CPI processes, ms.
    pub median_cpu_ms: Option<f64>,
    /// Largest peak RSS of the floor's processes (`/bin/true`), KiB.
    pub floor_peak_rss_kib: Option<u64>,
    /// Throughput of the CPI (stemcell rows), MB/s (10^6 bytes).
    pub cpi_mb_per_s: Option<f64>,
    /// Throughput of the floor (stemcell rows), MB/s.
    pub floor_mb_per_s: Option<f64>,
    /// The issue-7 target in words.
    pub target: String,
    /// Whether the target is met (information only).
    pub target_met: Option<bool>,
}

impl Row {
    /// The derived numbers.
    pub fn summary(&self) -> Summary {
        let c = self.cpi.stats();
        let f = self.floor.stats();
        let ratio = match (c, f) {
            (Some(c), Some(f)) if f.median > 0.0 => Some(c.median / f.median),
            _ => None,
        };
        let mut rss = self.cpi.rss_kib.clone();
        rss.sort_unstable();
        let mbps = |s: Option<Stats>| match (self.bytes, s) {
            (Some(b), Some(s)) if s.median > 0.0 => Some(b as f64 / 1e6 / (s.median / 1000.0)),
            _ => None,
        };
        let mut summary = Summary {
            name: self.name.clone(),
            n: c.map(|s| s.n).unwrap_or(0),
            median_ms: c.map(|s| s.median),
            min_ms: c.map(|s| s.min),
            max_ms: c.map(|s| s.max),
            floor_median_ms: f.map(|s| s.median),
            floor_min_ms: f.map(|s| s.min),
            floor_max_ms: f.map(|s| s.max),
            ratio,
            peak_rss_kib: rss.last().copied(),
            median_rss_kib: rss.get(rss.len() / 2).copied(),
            median_cpu_ms: Stats::of(&self.cpi.cpu_ms).map(|s| s.median),
            floor_peak_rss_kib: self.floor.rss_kib.iter().max().copied(),
            cpi_mb_per_s: mbps(c),
            floor_mb_per_s: mbps(f),
            target: self.goal.text(),
            target_met: None,
        };
        summary.target_met = self.goal.met(&summary);
        summary
    }
}

/// All rows of one backend.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BackendReport {
    /// `docker` or `containerd`.
    pub backend: String,
    /// The daemon's version.
    pub daemon: String,
    /// The run's director uuid: every object the run made carries it.
    pub director_uuid: String,
    /// The rows.
    pub rows: Vec<Row>,
    /// What the run left on the daemon or the host (should be empty).
    pub leftovers: Vec<String>,
    /// Why the backend could not be measured at all, if so.
    pub setup_error: Option<String>,
    /// Failures while cleaning up.
    pub cleanup_errors: Vec<String>,
}

impl BackendReport {
    /// Whether anything went wrong (not timings: those are never judged here).
    pub fn failed(&self) -> bool {
        self.setup_error.is_some()
            || !self.leftovers.is_empty()
            || !self.cleanup_errors.is_empty()
            || self.rows.iter().any(|r| r.error.is_some())
    }
}

/// The JSON document.
#[derive(Debug, Clone, Serialize)]
pub struct Document {
    /// Seconds since the epoch when the run ended.
    pub finished_at: u64,
    /// `--quick` was given.
    pub quick: bool,
    /// Repetitions per row.
    pub reps: usize,
    /// The machine.
    pub machine: Machine,
    /// Per backend: rows with their summaries.
    pub backends: Vec<BackendJson>,
}

/// A backend in the JSON document.
#[derive(Debug, Clone, Serialize)]
pub struct BackendJson {
    /// The raw report.
    #[serde(flatten)]
    pub report: BackendReport,
    /// The derived numbers per row.
    pub summary: Vec<Summary>,
}

/// Milliseconds with a precision that suits their size.
pub fn fmt_ms(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v < 10.0 => format!("{v:.2}"),
        Some(v) if v < 1000.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
    }
}

fn fmt_mib(kib: Option<u64>) -> String {
    kib.map(|k| format!("{:.1}", k as f64 / 1024.0))
        .unwrap_or_else(|| "-".into())
}

const COLUMNS: usize = 12;

/// The table, one line per row, with a header line.
pub fn table(backends: &[BackendReport]) -> Vec<String> {
    let header = [
        "backend",
        "row",
        "n",
        "median ms",
        "min ms",
        "max ms",
        "floor ms",
        "ratio",
        "peak RSS MiB",
        "cpu ms",
        "issue-7 target",
        "note",
    ];
    let mut lines: Vec<[String; COLUMNS]> = vec![header.map(str::to_owned)];
    for b in backends {
        if let Some(e) = &b.setup_error {
            let first = e.lines().next().unwrap_or_default();
            lines.push([
                b.backend.clone(),
                "(not measured)".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                first.chars().take(100).collect(),
            ]);
        }
        for r in &b.rows {
            let s = r.summary();
            let mut note = match (s.cpi_mb_per_s, s.floor_mb_per_s, r.bytes) {
                (Some(c), Some(f), Some(bytes)) => format!(
                    "{:.1} MB image; {c:.0} MB/s vs floor {f:.0} MB/s",
                    bytes as f64 / 1e6
                ),
                _ => r.note.clone(),
            };
            if let Some(e) = &r.error {
                let first = e.lines().next().unwrap_or_default();
                note = format!("ERROR: {}", first.chars().take(100).collect::<String>());
            }
            lines.push([
                b.backend.clone(),
                r.name.clone(),
                s.n.to_string(),
                fmt_ms(s.median_ms),
                fmt_ms(s.min_ms),
                fmt_ms(s.max_ms),
                fmt_ms(s.floor_median_ms),
                s.ratio
                    .map(|r| format!("{r:.2}"))
                    .unwrap_or_else(|| "-".into()),
                fmt_mib(s.peak_rss_kib),
                fmt_ms(s.median_cpu_ms),
                match s.target_met {
                    Some(true) => format!("{} (met)", s.target),
                    Some(false) => format!("{} (NOT met)", s.target),
                    None if s.target.is_empty() => "-".into(),
                    None => s.target.clone(),
                },
                note,
            ]);
        }
    }
    let mut widths = [0usize; COLUMNS];
    for l in &lines {
        for (w, c) in widths.iter_mut().zip(l.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    lines
        .iter()
        .map(|l| {
            let mut out = String::new();
            for (i, (c, w)) in l.iter().zip(widths).enumerate() {
                let pad = w - c.chars().count();
                // Names left-aligned, numbers right-aligned, the note last and unpadded.
                match i {
                    0 | 1 | 10 => {
                        out.push_str(c);
                        out.push_str(&" ".repeat(pad));
                    }
                    11 => out.push_str(c),
                    _ => {
                        out.push_str(&" ".repeat(pad));
                        out.push_str(c);
                    }
                }
                if i < COLUMNS - 1 {
                    out.push_str("  ");
                }
            }
            out.trim_end().to_owned()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> Row {
        Row {
            name: "create_stemcell_50mb".into(),
            cpi: Side {
                samples_ms: vec![110.0, 100.0, 120.0],
                rss_kib: vec![4096, 5120, 4000],
                cpu_ms: vec![],
            },
            floor: Side {
                samples_ms: vec![100.0, 90.0, 95.0],
                ..Default::default()
            },
            bytes: Some(50_000_000),
            goal: Goal {
                max_ratio: Some(1.0 / 0.95),
                throughput: true,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn summary_of_a_row() {
        let s = row().summary();
        assert_eq!(s.n, 3);
        assert_eq!(s.median_ms, Some(110.0));
        assert_eq!(s.floor_median_ms, Some(95.0));
        let ratio = s.ratio.expect("ratio");
        assert!((ratio - 110.0 / 95.0).abs() < 1e-9);
        assert_eq!(s.peak_rss_kib, Some(5120));
        assert_eq!(s.median_rss_kib, Some(4096));
        let mbps = s.cpi_mb_per_s.expect("mb/s");
        assert!((mbps - 50.0 / 0.11).abs() < 1e-6);
        assert_eq!(s.target, ">= 0.95x floor MB/s");
        assert_eq!(s.target_met, Some(false));
        let fast = Goal {
            max_ms: Some(200.0),
            max_rss_mib: Some(6.0),
            ..Default::default()
        };
        assert_eq!(fast.met(&s), Some(true));
        assert_eq!(Goal::default().met(&s), None);
    }

    #[test]
    fn the_table_is_aligned() {
        let b = BackendReport {
            backend: "docker".into(),
            rows: vec![
                row(),
                Row {
                    name: "info".into(),
                    error: Some("boom\nmore".into()),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let lines = table(&[b]);
        assert_eq!(lines.len(), 3);
        let col = lines[0].find("median ms").expect("header");
        assert_eq!(&lines[1][col..col + 9], "    110.0");
        assert!(lines[2].ends_with("ERROR: boom"), "{}", lines[2]);
    }
}
