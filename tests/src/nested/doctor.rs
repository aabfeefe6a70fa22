//! Running `cpi doctor` (text and JSON) and what it must say in a supported set-up.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{missing_capabilities, run, Backend, SHORT_TIMEOUT};
use crate::{conformance, daemons};

/// Runs `cpi doctor` with `config` (text, then `--json`); returns the text report,
/// the JSON document and the exit code of the JSON run.
pub fn doctor(cpi: &Path, config: &Path) -> (String, Value, i32) {
    let cpi = cpi.to_string_lossy();
    let config = config.to_string_lossy();
    let text = run(
        &cpi,
        &["doctor", "-configPath", &config],
        None,
        SHORT_TIMEOUT,
    );
    let json = run(
        &cpi,
        &["doctor", "-configPath", &config, "--json"],
        None,
        SHORT_TIMEOUT,
    );
    assert_eq!(
        text.exit_code, json.exit_code,
        "text and JSON doctor runs disagree:\n{}\n{}",
        text.stdout, json.stdout
    );
    let doc: Value = serde_json::from_str(json.stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "cpi doctor --json did not print JSON ({e}):\n{}\n{}",
            json.stdout, json.stderr
        )
    });
    (
        format!(
            "$ cpi doctor -configPath {config}\n{}$ echo $?\n{}",
            text.stdout, text.exit_code
        ),
        doc,
        json.exit_code,
    )
}

/// The finding `id` of a doctor JSON document.
pub fn finding<'a>(doc: &'a Value, id: &str) -> &'a Value {
    doc["findings"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["id"] == id))
        .unwrap_or_else(|| panic!("the doctor reported no `{id}` finding: {doc}"))
}

pub(super) fn status(doc: &Value, id: &str) -> String {
    finding(doc, id)["status"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

pub(super) fn write_config(dir: &Path, file: &str, backend: Backend, state_dir: &Path) -> PathBuf {
    let agent = serde_json::json!({"mbus": "https://mbus:nested-doctor-secret@0.0.0.0:6868"});
    let config = match backend {
        Backend::Containerd => serde_json::json!({
            "backend": "containerd",
            "agent": agent,
            "containerd": {"namespace": conformance::CONTAINERD_TEST_NAMESPACE, "snapshotter": "overlayfs", "state_dir": state_dir},
        }),
        Backend::Docker => serde_json::json!({
            "backend": "docker",
            "agent": agent,
            "docker": {"host": format!("unix://{}", daemons::DOCKER_SOCKET), "state_dir": state_dir},
        }),
    };
    let path = dir.join(file);
    std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("json")).expect("config");
    path
}

/// Asserts what the doctor must say in a supported set-up (this machine, or the
/// outer container): no blocker; the daemon, cgroups, overlay and propagation ok;
/// the capability line naming exactly what the bounding set lacks.
pub fn assert_supported_report(backend: Backend, doc: &Value, exit_code: i32, text: &str) {
    assert_eq!(
        doc["blockers"], 0,
        "blockers in a supported set-up:\n{text}"
    );
    assert_eq!(exit_code, 0, "{text}");
    assert!(
        !text.contains("nested-doctor-secret"),
        "the mbus password leaked into the doctor report:\n{text}"
    );
    let mut must_be_ok = vec![
        "config",
        "daemon",
        "cgroup",
        "overlay",
        "propagation",
        "loop",
    ];
    if backend == Backend::Containerd {
        must_be_ok.extend(["snapshotter", "cni", "container"]);
    }
    for id in must_be_ok {
        assert_eq!(status(doc, id), "ok", "`{id}` should be ok here:\n{text}");
    }
    let propagation = finding(doc, "propagation")["summary"]
        .as_str()
        .unwrap_or_default();
    assert!(
        propagation.contains(&format!(
            "shares {}'s mount namespace",
            if backend == Backend::Docker {
                "dockerd"
            } else {
                "containerd"
            }
        )),
        "the CPI and its daemon share a mount namespace here: {propagation}"
    );
    let missing = missing_capabilities();
    let caps = finding(doc, "capabilities");
    let summary = caps["summary"].as_str().unwrap_or_default();
    if missing.is_empty() {
        assert_eq!(caps["status"], "ok", "{text}");
    } else {
        assert_eq!(caps["status"], "warn", "{text}");
        for cap in &missing {
            assert!(
                summary.contains(&format!("CAP_{cap}")),
                "the bounding set lacks CAP_{cap} but the doctor does not say so: {summary}"
            );
        }
    }
}
