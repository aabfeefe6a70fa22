//! Findings and how they are shown: one line per check for people, one JSON
//! document for machines, and the exit status (2 when anything is a blocker).

use serde::Serialize;
use serde_json::{Map, Value};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Works as the CPI needs it.
    Ok,
    /// Works, with a limit the operator should know about.
    Warn,
    /// The CPI cannot work (or cannot do something essential) until it is fixed.
    Blocker,
}

impl Status {
    /// The word in the text report.
    pub fn word(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Blocker => "BLOCKER",
        }
    }
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    /// A stable name for machines (`daemon`, `cgroup`, `capabilities`, ...).
    pub id: &'static str,
    /// Ok, warn or blocker.
    pub status: Status,
    /// What was found, in one sentence.
    pub summary: String,
    /// What to do about it; empty when there is nothing to do.
    pub fix: String,
    /// The facts behind the summary (paths, versions, numbers).
    pub details: Map<String, Value>,
}

impl Finding {
    /// A finding without a fix or details.
    pub fn new(id: &'static str, status: Status, summary: impl Into<String>) -> Finding {
        Finding {
            id,
            status,
            summary: summary.into(),
            fix: String::new(),
            details: Map::new(),
        }
    }

    /// Sets the fix.
    pub fn fix(mut self, fix: impl Into<String>) -> Finding {
        self.fix = fix.into();
        self
    }

    /// Adds a detail.
    pub fn detail(mut self, key: &str, value: impl Into<Value>) -> Finding {
        self.details.insert(key.to_owned(), value.into());
        self
    }
}

/// The text report: a heading, one line per finding (`status  id  summary -- fix:
/// ...`), and a count.
pub fn text(heading: &str, findings: &[Finding]) -> String {
    let mut out = format!("{heading}\n");
    for f in findings {
        out.push_str(&format!(
            "{:<7}  {:<12}  {}",
            f.status.word(),
            f.id,
            f.summary
        ));
        if !f.fix.is_empty() {
            out.push_str(" -- fix: ");
            out.push_str(&f.fix);
        }
        out.push('\n');
    }
    let count = |s| findings.iter().filter(|f| f.status == s).count();
    out.push_str(&format!(
        "{} blocker(s), {} warning(s), {} ok\n",
        count(Status::Blocker),
        count(Status::Warn),
        count(Status::Ok)
    ));
    out
}

/// The JSON report: `{"config", "backend", "blockers", "warnings", "findings": [...]}`
/// on one line.
pub fn json(config: Option<&str>, backend: Option<&str>, findings: &[Finding]) -> String {
    let count = |s| findings.iter().filter(|f| f.status == s).count();
    let doc = serde_json::json!({
        "config": config,
        "backend": backend,
        "blockers": count(Status::Blocker),
        "warnings": count(Status::Warn),
        "findings": findings,
    });
    format!("{doc}\n")
}

/// 2 when any finding is a blocker, else 0.
pub fn exit_code(findings: &[Finding]) -> u8 {
    if findings.iter().any(|f| f.status == Status::Blocker) {
        2
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Finding> {
        vec![
            Finding::new("cgroup", Status::Ok, "cgroup v1 (hybrid)").detail("layout", "hybrid"),
            Finding::new("capabilities", Status::Warn, "missing: CAP_SYS_RESOURCE")
                .fix("nothing, unless a job needs them"),
            Finding::new("daemon", Status::Blocker, "cannot reach dockerd").fix("start dockerd"),
        ]
    }

    #[test]
    fn text_is_one_line_per_finding() {
        let out = text("cpi doctor: docker", &sample());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{out}");
        assert_eq!(lines[0], "cpi doctor: docker");
        assert_eq!(lines[1], "ok       cgroup        cgroup v1 (hybrid)");
        assert!(lines[2]
            .starts_with("warn     capabilities  missing: CAP_SYS_RESOURCE -- fix: nothing"));
        assert!(lines[3].starts_with("BLOCKER  daemon"), "{}", lines[3]);
        assert!(lines[3].ends_with("-- fix: start dockerd"));
        assert_eq!(lines[4], "1 blocker(s), 1 warning(s), 1 ok");
    }

    #[test]
    fn json_has_every_field() {
        let out = json(Some("/etc/cpi.json"), Some("docker"), &sample());
        assert!(out.ends_with('\n') && out.trim_end().lines().count() == 1);
        let v: Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v["backend"], "docker");
        assert_eq!(v["blockers"], 1);
        assert_eq!(v["findings"][0]["id"], "cgroup");
        assert_eq!(v["findings"][0]["status"], "ok");
        assert_eq!(v["findings"][0]["fix"], "");
        assert_eq!(v["findings"][0]["details"]["layout"], "hybrid");
        assert_eq!(v["findings"][2]["status"], "blocker");
        let v: Value = serde_json::from_str(&json(None, None, &[])).expect("json");
        assert_eq!(v["config"], Value::Null);
    }

    #[test]
    fn blockers_exit_2() {
        assert_eq!(exit_code(&sample()), 2);
        assert_eq!(exit_code(&sample()[..2]), 0);
        assert_eq!(exit_code(&[]), 0);
    }
}
