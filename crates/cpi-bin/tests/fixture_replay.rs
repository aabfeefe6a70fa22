//! Replays the Go Docker CPI's captured lifecycle (crates/cpi-core/tests/data/
//! lifecycle/, see its README.md) through the `cpi` binary against the fake backend,
//! one process per request as the director does.
//!
//! For every step the response must have the Go response's JSON shape: the same type
//! of `result`, the same error type where the Go CPI was right. Where we deliberately
//! do better (contract §3), the step asserts our documented behaviour instead, and the
//! comment says why. The four malformed requests (25–28) must answer the Go CPI's
//! error types and messages.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use common::{fake_config, run, stemcell};

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../cpi-core/tests/data/lifecycle")
}

/// The JSON type of a value, for shape comparison.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Replaces every string equal to a Go cid by ours.
fn rewrite(v: &mut Value, cids: &BTreeMap<String, String>) {
    match v {
        Value::String(s) => {
            if let Some(ours) = cids.get(s.as_str()) {
                *s = ours.clone();
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| rewrite(i, cids)),
        Value::Object(map) => map.values_mut().for_each(|i| rewrite(i, cids)),
        _ => {}
    }
}

fn error_type(resp: &Value) -> Option<&str> {
    resp["error"]["type"].as_str()
}

#[test]
fn the_go_cpi_lifecycle_replays_against_the_fake_backend() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = fake_config(dir.path());
    let image = stemcell(dir.path());
    let state_file = dir.path().join("state.json");

    let mut steps: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .expect("fixtures")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".request.json"))
        })
        .collect();
    steps.sort();
    assert_eq!(steps.len(), 28, "the fixture set changed");

    // Go cid → our cid, learned from our responses.
    let mut cids: BTreeMap<String, String> = BTreeMap::new();
    let mut our_disk = String::new();
    for path in &steps {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .trim_end_matches(".request.json")
            .to_owned();
        let raw = std::fs::read(path).expect("request");
        let go: Value = serde_json::from_slice(
            &std::fs::read(path.with_file_name(format!("{name}.response.json"))).expect("response"),
        )
        .expect("go response");

        let input = match serde_json::from_slice::<Value>(&raw) {
            Ok(mut req) => {
                rewrite(&mut req, &cids);
                if req["method"] == "create_stemcell" {
                    req["arguments"][0] = Value::String(image.display().to_string());
                }
                format!("{req}\n").into_bytes()
            }
            // 27-invalid-json goes as it is.
            Err(_) => raw.clone(),
        };
        let out = run(&config, &input);
        let ours = out.response();
        let ctx = format!("step {name}\n{}", out.describe());
        assert!(
            !ours["log"].as_str().unwrap_or_default().is_empty(),
            "we always log: {ctx}"
        );

        let step = name.split_once('-').map_or(name.as_str(), |(_, s)| s);
        match step {
            // The fake advertises the same formats as the Go Docker CPI.
            "info" => assert_eq!(ours["result"], go["result"], "{ctx}"),
            "create_stemcell" | "create_disk" => {
                assert_eq!(kind(&ours["result"]), "string", "{ctx}");
                let (g, o) = (go["result"].as_str(), ours["result"].as_str());
                cids.insert(g.expect("go cid").to_owned(), o.expect("cid").to_owned());
                if step == "create_disk" {
                    our_disk = o.expect("cid").to_owned();
                }
            }
            // Different content (we return properties our create_vm honours; the Go
            // CPI returns {}), same type.
            "calculate_vm_cloud_properties" => {
                assert_eq!(kind(&ours["result"]), kind(&go["result"]), "{ctx}");
                assert_eq!(ours["result"]["ram"], 1024, "{ctx}");
            }
            "create_vm" => {
                assert_eq!(kind(&ours["result"]), "array", "{ctx}");
                assert_eq!(
                    ours["result"][1], go["result"][1],
                    "same networks echo: {ctx}"
                );
                cids.insert(
                    go["result"][0].as_str().expect("go vm").to_owned(),
                    ours["result"][0].as_str().expect("vm").to_owned(),
                );
            }
            // We reboot for real and answer null, as the contract says (the Go CPI
            // answers "" after doing nothing).
            "reboot_vm" => assert_eq!(ours["result"], Value::Null, "{ctx}"),
            // The Go CPI at HEAD destroys the VM here (its attach recreates the
            // container and fails on Docker API < 1.44). Ours attaches live and
            // returns the v2 hint.
            "attach_disk" => {
                assert_eq!(error_type(&go), Some("Bosh::Clouds::CloudError"));
                assert_eq!(ours["error"], Value::Null, "{ctx}");
                assert_eq!(
                    ours["result"],
                    format!("/warden-cpi-dev/{our_disk}"),
                    "{ctx}"
                );
            }
            // ...so the VM still exists (the Go CPI: false).
            "has_vm-after-attach" => assert_eq!(ours["result"], true, "{ctx}"),
            // We return the truth (the Go CPI always returns []): the disk is attached.
            "get_disks" => {
                assert_eq!(kind(&ours["result"]), kind(&go["result"]), "{ctx}");
                assert_eq!(ours["result"], serde_json::json!([our_disk]), "{ctx}");
            }
            // The Go CPI fails ("VM does not exist": it destroyed it at attach);
            // ours detaches from the living VM.
            "detach_disk" => {
                assert_eq!(error_type(&go), Some("Bosh::Clouds::CloudError"));
                assert_eq!(ours["error"], Value::Null, "{ctx}");
                assert_eq!(ours["result"], Value::Null, "{ctx}");
            }
            // Same answer, but ours really resized (checked in the state file).
            "resize_disk" => {
                assert_eq!(ours["result"], go["result"], "{ctx}");
                let state: Value =
                    serde_json::from_slice(&std::fs::read(&state_file).expect("state file"))
                        .expect("state");
                assert_eq!(state["disks"][&our_disk]["size_mib"], 2048, "{ctx}");
            }
            // A real snapshot with a real cid (the Go CPI returns "" and does nothing).
            "snapshot_disk" => {
                assert_eq!(kind(&ours["result"]), kind(&go["result"]), "{ctx}");
                let snap = ours["result"].as_str().expect("snapshot cid");
                assert!(snap.starts_with("snap-"), "{ctx}");
                let state: Value =
                    serde_json::from_slice(&std::fs::read(&state_file).expect("state file"))
                        .expect("state");
                assert_eq!(state["snapshots"][snap]["disk"], our_disk.as_str(), "{ctx}");
            }
            // The malformed requests: the Go CPI's error types and messages. For
            // invalid JSON we append the parser's detail after the Go message.
            "unknown_method" | "api_version-3" | "missing-arguments" => {
                assert_eq!(ours["error"], go["error"], "{ctx}");
                assert_eq!(ours["result"], Value::Null, "{ctx}");
            }
            "invalid-json" => {
                assert_eq!(error_type(&ours), error_type(&go), "{ctx}");
                let go_msg = go["error"]["message"].as_str().expect("go message");
                let msg = ours["error"]["message"].as_str().expect("message");
                assert!(msg.starts_with(go_msg), "{ctx}");
                assert_eq!(ours["error"]["ok_to_retry"], false, "{ctx}");
            }
            // Everything else: the Go CPI was right; we answer the same.
            // (has_vm, set_vm_metadata, has_disk, set_disk_metadata, update_disk's
            // NotSupported, delete_snapshot, delete_disk, has_disk-after-delete,
            // delete_vm twice, has_vm-after-delete, delete_stemcell)
            _ => {
                assert_eq!(ours["result"], go["result"], "{ctx}");
                assert_eq!(error_type(&ours), error_type(&go), "{ctx}");
            }
        }
    }

    // Everything the lifecycle created was deleted, except the snapshot (the Go
    // script deletes "snap-none", not the snapshot it got back).
    let state: Value =
        serde_json::from_slice(&std::fs::read(&state_file).expect("state")).expect("json");
    for kind in ["stemcells", "vms", "disks"] {
        assert_eq!(
            state[kind],
            serde_json::json!({}),
            "{kind} left behind: {state}"
        );
    }
    assert_eq!(state["snapshots"].as_object().map(|m| m.len()), Some(1));
}
