//! Property tests of the wire protocol: the request parser ([`Request::parse`]), the
//! call parser ([`Call::parse`]), the dispatcher ([`execute`] on the in-memory
//! [`FakeCpi`]) and the stemcell manifest parser ([`StemcellManifest::parse`]).
//!
//! Whatever the director (or an operator, or a broken pipe) hands the CPI, the
//! answer is a result or a typed [`CpiError`] whose wire name the director knows,
//! whose message is non-empty and bounded in size (no echo of a huge input), and
//! whose serialised response is one JSON object with `result`, `error` and `log`.
//! A panic would be no response at all, so proptest's panic catching is the oracle.
//!
//! Inputs: arbitrary bytes, arbitrary JSON values, arbitrary envelopes, every request
//! of `tests/data/lifecycle` with random mutations of its arguments (types, values,
//! count, nested fields), and arbitrary or mutated manifests. The case counts are
//! fixed by [`CASES`] and quoted in `docs/reliability.md`.

use std::path::PathBuf;

use cpi_core::error::ErrorKind;
use cpi_core::fake::{FakeCpi, FakeState};
use cpi_core::protocol::{execute, Call, Request, Response};
use cpi_core::{AgentOptions, CpiError, StemcellManifest};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Map, Value};

/// Cases per property (each property states its own multiple of this).
const CASES: u32 = 2048;

/// The largest error message any input may produce (`CpiError` clamps longer ones).
const MAX_MESSAGE_BYTES: usize = cpi_core::error::MAX_MESSAGE_BYTES;

fn config(cases: u32) -> Config {
    Config {
        cases,
        // A failing case is reported with its seed; no regression files in the tree.
        failure_persistence: None,
        ..Config::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime")
}

fn fake() -> FakeCpi {
    FakeCpi::new(
        FakeState::default(),
        AgentOptions {
            mbus: "https://mbus:proptest-secret@0.0.0.0:6868".into(),
            ntp: vec![],
        },
    )
}

/// Every error must be one the director knows, say something, and stay small.
fn check_error(e: &CpiError, input_len: usize) -> Result<(), TestCaseError> {
    prop_assert!(
        ErrorKind::from_wire_name(e.kind.wire_name()).is_some(),
        "unknown error kind {:?}",
        e.kind
    );
    prop_assert!(!e.message.trim().is_empty(), "empty message for {e:?}");
    prop_assert!(
        e.message.len() <= MAX_MESSAGE_BYTES,
        "a {}-byte input produced a {}-byte message: {}...",
        input_len,
        e.message.len(),
        e.message.chars().take(200).collect::<String>()
    );
    let wire: Value = serde_json::from_slice(&Response::error(e).to_json())
        .map_err(|err| TestCaseError::fail(format!("response is not JSON: {err}")))?;
    prop_assert!(wire["result"].is_null());
    prop_assert!(wire["log"].is_string());
    prop_assert_eq!(wire["error"]["type"].as_str(), Some(e.kind.wire_name()));
    Ok(())
}

/// Runs bytes through the whole path the binary takes (parse, type, execute) on a
/// fresh fake, checking whatever comes out. Returns whether the call succeeded.
fn run_request(rt: &tokio::runtime::Runtime, input: &[u8]) -> Result<bool, TestCaseError> {
    let request = match Request::parse(input) {
        Ok(r) => r,
        Err(e) => {
            check_error(&e, input.len())?;
            return Ok(false);
        }
    };
    let call = match Call::parse(&request.method, &request.arguments) {
        Ok(c) => c,
        Err(e) => {
            check_error(&e, input.len())?;
            return Ok(false);
        }
    };
    let cpi = fake();
    match rt.block_on(execute(&cpi, &request.context(), call)) {
        Ok(v) => {
            let wire: Value = serde_json::from_slice(&Response::ok(v).to_json())
                .map_err(|err| TestCaseError::fail(format!("response is not JSON: {err}")))?;
            prop_assert!(wire["error"].is_null());
            Ok(true)
        }
        Err(e) => {
            check_error(&e, input.len())?;
            Ok(false)
        }
    }
}

/// Arbitrary JSON values, nested up to a few levels, with strings that include the
/// awkward: path escapes, NUL, unicode, long runs.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        arb_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(arb_key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn arb_key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "type",
            "ip",
            "netmask",
            "gateway",
            "dns",
            "default",
            "cloud_properties",
            "name",
            "bosh",
            "password",
            "ram",
            "cpu",
            "ephemeral_disk_size",
            "ports",
            "image_reference",
            "digest",
            "subnet",
            "Memory",
            "privileged",
        ])
        .prop_map(str::to_owned),
        "[a-z_]{1,12}",
    ]
}

fn arb_string() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "",
            "..",
            "../../etc",
            "a/../../b",
            "/etc/passwd",
            "vol-x;rm -rf /",
            "c-1 --privileged",
            "-rf",
            "\0",
            "c-\0x",
            "ünïcødé-☃",
            "10.0.0.300",
            "255.255.0.255",
            "0.0.0.0",
            "::1",
            "manual",
            "dynamic",
            "vip",
            "sha256:zz",
            "1e30",
            "-1",
            "9223372036854775808",
        ])
        .prop_map(str::to_owned),
        ".{0,40}",
        // Long strings: the message must not echo them whole.
        (1usize..20_000, any::<char>()).prop_map(|(n, c)| std::iter::repeat_n(c, n).collect()),
    ]
}

/// The captured lifecycle requests (`tests/data/lifecycle/*.request.json`).
fn fixture_requests() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/lifecycle");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("fixture dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_owned();
        if !name.ends_with(".request.json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("fixture");
        // 27-invalid-json is deliberately not JSON: it is covered by the byte fuzzing.
        if let Ok(v) = serde_json::from_str::<Value>(&text) {
            out.push((name, v));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        out.len() >= 25,
        "expected the lifecycle fixtures, found {}",
        out.len()
    );
    out
}

/// One way to damage a request.
#[derive(Debug, Clone)]
enum Mutation {
    /// Replace argument `i` (modulo the count) with an arbitrary value.
    ReplaceArg(usize, Value),
    /// Change the type of argument `i` while keeping its "content".
    RetypeArg(usize, u8),
    /// Replace a nested field reached by walking `path` (indices modulo sizes).
    ReplaceNested(Vec<usize>, Value),
    /// Drop the last `n` arguments.
    Truncate(usize),
    /// Append extra arguments (the contract says extra trailing ones are ignored).
    Extend(Vec<Value>),
    /// Replace `method`, `arguments`, `context` or `api_version` wholesale.
    Envelope(u8, Value),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<usize>(), arb_json()).prop_map(|(i, v)| Mutation::ReplaceArg(i, v)),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(i, t)| Mutation::RetypeArg(i, t)),
        4 => (prop::collection::vec(any::<usize>(), 1..5), arb_json())
            .prop_map(|(p, v)| Mutation::ReplaceNested(p, v)),
        1 => (0usize..8).prop_map(Mutation::Truncate),
        1 => prop::collection::vec(arb_json(), 1..3).prop_map(Mutation::Extend),
        1 => (any::<u8>(), arb_json()).prop_map(|(k, v)| Mutation::Envelope(k, v)),
    ]
}

fn retype(v: &Value, how: u8) -> Value {
    let text = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match how % 7 {
        0 => Value::String(text),
        1 => json!(-(text.len() as i64) - 1),
        2 => json!(1e30),
        3 => json!(u64::MAX),
        4 => json!([v.clone()]),
        5 => json!({ "value": v.clone() }),
        _ => Value::Null,
    }
}

fn replace_nested(v: &mut Value, path: &[usize], new: Value) {
    let Some((first, rest)) = path.split_first() else {
        *v = new;
        return;
    };
    let child = match v {
        Value::Array(items) if !items.is_empty() => {
            let n = items.len();
            &mut items[first % n]
        }
        Value::Object(map) if !map.is_empty() => {
            let n = map.len();
            let key = map.keys().nth(first % n).cloned().unwrap_or_default();
            match map.get_mut(&key) {
                Some(c) => c,
                None => return,
            }
        }
        _ => {
            *v = new;
            return;
        }
    };
    replace_nested(child, rest, new);
}

fn apply(request: &mut Value, m: &Mutation) {
    let Some(args) = request.get_mut("arguments").and_then(Value::as_array_mut) else {
        return;
    };
    match m {
        Mutation::ReplaceArg(i, v) if !args.is_empty() => {
            let n = args.len();
            args[i % n] = v.clone();
        }
        Mutation::RetypeArg(i, how) if !args.is_empty() => {
            let n = args.len();
            args[i % n] = retype(&args[i % n], *how);
        }
        Mutation::ReplaceNested(path, v) => {
            let mut whole = Value::Array(std::mem::take(args));
            replace_nested(&mut whole, path, v.clone());
            *args = match whole {
                Value::Array(a) => a,
                other => vec![other],
            };
        }
        Mutation::Truncate(n) => {
            let keep = args.len().saturating_sub(*n);
            args.truncate(keep);
        }
        Mutation::Extend(extra) => args.extend(extra.iter().cloned()),
        Mutation::Envelope(k, v) => {
            let key = ["method", "arguments", "context", "api_version"][usize::from(*k) % 4];
            request[key] = v.clone();
        }
        _ => {}
    }
}

#[test]
fn the_unmutated_fixtures_run_cleanly() {
    let rt = runtime();
    let mut runner = TestRunner::new(config(1));
    runner
        .run(&Just(()), |()| {
            for (name, req) in fixture_requests() {
                let bytes = serde_json::to_vec(&req).expect("json");
                run_request(&rt, &bytes)
                    .map_err(|e| TestCaseError::fail(format!("{name}: {e}")))?;
            }
            Ok(())
        })
        .expect("fixtures");
}

#[test]
fn arbitrary_bytes_never_panic() {
    let rt = runtime();
    let mut runner = TestRunner::new(config(CASES * 2));
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        // Almost-JSON: a valid request with a few bytes flipped or cut.
        (
            0usize..28,
            prop::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            any::<usize>()
        )
            .prop_map(|(i, flips, cut)| {
                let reqs = fixture_requests();
                let mut b = serde_json::to_vec(&reqs[i % reqs.len()].1).expect("json");
                for (at, byte) in flips {
                    let n = b.len();
                    b[at % n] = byte;
                }
                let n = b.len();
                b.truncate(cut % (n + 1));
                b
            }),
    ];
    runner
        .run(&bytes, |input| run_request(&rt, &input).map(|_| ()))
        .expect("arbitrary bytes");
}

#[test]
fn arbitrary_json_values_never_panic() {
    let rt = runtime();
    let mut runner = TestRunner::new(config(CASES));
    runner
        .run(&arb_json(), |v| {
            run_request(&rt, &serde_json::to_vec(&v).expect("json")).map(|_| ())
        })
        .expect("arbitrary json");
}

#[test]
fn arbitrary_envelopes_never_panic() {
    let rt = runtime();
    let methods = prop::sample::select(vec![
        "info",
        "create_stemcell",
        "delete_stemcell",
        "create_vm",
        "delete_vm",
        "has_vm",
        "reboot_vm",
        "set_vm_metadata",
        "calculate_vm_cloud_properties",
        "create_disk",
        "delete_disk",
        "has_disk",
        "attach_disk",
        "detach_disk",
        "get_disks",
        "set_disk_metadata",
        "resize_disk",
        "update_disk",
        "snapshot_disk",
        "delete_snapshot",
        "no_such_method",
        "",
    ]);
    let envelope = (
        methods,
        prop::collection::vec(arb_json(), 0..8),
        arb_json(),
        prop_oneof![Just(json!(1)), Just(json!(2)), arb_json()],
    )
        .prop_map(|(m, args, ctx, api)| {
            json!({"method": m, "arguments": args, "context": ctx, "api_version": api})
        });
    let mut runner = TestRunner::new(config(CASES * 2));
    runner
        .run(&envelope, |v| {
            run_request(&rt, &serde_json::to_vec(&v).expect("json")).map(|_| ())
        })
        .expect("arbitrary envelopes");
}

#[test]
fn mutated_fixture_requests_never_panic() {
    let rt = runtime();
    let fixtures = fixture_requests();
    let n = fixtures.len();
    let mut runner = TestRunner::new(config(CASES * 4));
    let strategy = (0..n, prop::collection::vec(arb_mutation(), 1..4));
    runner
        .run(&strategy, |(i, mutations)| {
            let mut req = fixtures[i].1.clone();
            for m in &mutations {
                apply(&mut req, m);
            }
            run_request(&rt, &serde_json::to_vec(&req).expect("json")).map(|_| ())
        })
        .expect("mutated fixtures");
}

const VALID_MANIFEST: &str = "---\nname: bosh-warden-boshlite-ubuntu-jammy\nversion: '1.1'\nbosh_protocol: 1\napi_version: 3\noperating_system: ubuntu-jammy\nstemcell_formats:\n- warden-tar\ncloud_properties:\n  infrastructure: warden\n  image_reference: ghcr.io/x/y:1\n  digest: sha256:0000000000000000000000000000000000000000000000000000000000000000\n";

fn check_manifest(text: &str) -> Result<(), TestCaseError> {
    match StemcellManifest::parse(text, "/tmp/stemcell.MF") {
        Ok(m) => {
            // The derived accessors must not panic either.
            let _ = m.os();
            let _ = m.wants_systemd();
            if let Err(e) = m.light_image() {
                check_error(&e, text.len())?;
            }
        }
        Err(e) => check_error(&e, text.len())?,
    }
    Ok(())
}

#[test]
fn stemcell_manifests_never_panic() {
    let mut runner = TestRunner::new(config(CASES * 2));
    let text = prop_oneof![
        // Arbitrary text, including binary turned lossy.
        prop::collection::vec(any::<u8>(), 0..1024)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        ".{0,200}",
        // A valid manifest with one value replaced by arbitrary YAML-ish text.
        (
            prop::sample::select(vec![
                "bosh-warden-boshlite-ubuntu-jammy", "'1.1'", "ubuntu-jammy", "warden-tar",
                "ghcr.io/x/y:1", "sha256:0000000000000000000000000000000000000000000000000000000000000000",
                "warden", "3",
            ]),
            prop_oneof![arb_string(), arb_json().prop_map(|v| v.to_string())],
        )
            .prop_map(|(old, new)| VALID_MANIFEST.replacen(old, &new, 1)),
        // Light manifests with arbitrary references and digests.
        (arb_string(), arb_string()).prop_map(|(r, d)| {
            format!(
                "name: l\nversion: '1'\nstemcell_formats: [docker-light]\ncloud_properties:\n  image_reference: {}\n  digest: {}\n",
                serde_json::to_string(&r).unwrap_or_default(),
                serde_json::to_string(&d).unwrap_or_default()
            )
        }),
    ];
    runner
        .run(&text, |t| check_manifest(&t))
        .expect("manifests");
}

#[test]
fn huge_inputs_are_refused_with_short_messages() {
    let rt = runtime();
    let mut runner = TestRunner::new(config(1));
    runner
        .run(&Just(()), |()| {
            // Over the request limit.
            let big = vec![b' '; cpi_core::protocol::MAX_REQUEST_BYTES + 1];
            prop_assert!(!run_request(&rt, &big)?);
            // A 1 MiB cid, method and path.
            let long = "a".repeat(1 << 20);
            for req in [
                json!({"method": "has_vm", "arguments": [long], "context": {}}),
                json!({"method": long, "arguments": [], "context": {}}),
                json!({"method": "create_stemcell", "arguments": [format!("/{long}/image"), {}]}),
                json!({"method": "create_disk", "arguments": [long, {}, null]}),
            ] {
                prop_assert!(!run_request(&rt, &serde_json::to_vec(&req).expect("json"))?);
            }
            // Manifests: over the limit, and with a huge reference and digest.
            check_manifest(&"x".repeat(cpi_core::stemcell::MAX_MANIFEST_BYTES + 1))?;
            let half = "b".repeat(400_000);
            check_manifest(&format!(
                "name: l\nversion: '1'\nstemcell_formats: [docker-light]\ncloud_properties:\n  image_reference: {half}\n  digest: sha256:{half}\n"
            ))?;
            Ok(())
        })
        .expect("huge inputs");
}
