//! Runs the `cpi` binary the way the BOSH director does: one process per call,
//! the request on stdin, the response on stdout, logs on stderr, and an
//! environment holding only `PATH` and `TMPDIR`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::process;

/// The `director_uuid` the runner puts in every request's context.
pub const DIRECTOR_UUID: &str = "cpi-tests-director";

/// How long one CPI call may take before the runner kills it (override with
/// the `CPI_TEST_CALL_TIMEOUT_SECS` environment variable).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(600);

/// The `cpi` binary under test.
///
/// `CPI_BIN` when set (`scripts/test.sh` sets it), else `debug/cpi` in the
/// target directory (`CARGO_TARGET_DIR`, by default `<workspace root>/target`).
///
/// # Panics
/// When the file does not exist, with a message saying how to build it.
pub fn cpi_bin() -> PathBuf {
    let path = match std::env::var_os("CPI_BIN") {
        Some(bin) if !bin.is_empty() => PathBuf::from(bin),
        _ => {
            let root = crate::workspace_root();
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .filter(|t| !t.is_empty())
                .map(|t| root.join(t))
                .unwrap_or_else(|| root.join("target"));
            target.join("debug").join("cpi")
        }
    };
    assert!(
        path.is_file(),
        "the cpi binary {} does not exist: build it with `cargo build -p cpi-bin` \
         (or run everything with `bash scripts/test.sh`), or point CPI_BIN at it",
        path.display()
    );
    path
}

/// The `error` object of a CPI response.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CpiErrorBody {
    /// Error type, e.g. `Bosh::Clouds::CloudError`.
    #[serde(rename = "type", default)]
    pub type_: String,
    /// Human-readable message.
    #[serde(default)]
    pub message: String,
    /// Whether the director may retry the call.
    #[serde(default)]
    pub ok_to_retry: bool,
}

/// Everything one CPI call produced.
#[derive(Debug, Clone)]
pub struct CpiResponse {
    /// The response's `result` (`Value::Null` when absent or unparsable).
    pub result: Value,
    /// The response's `error`, when not null.
    pub error: Option<CpiErrorBody>,
    /// The response's `log` (empty when absent or not a string; see [`CpiResponse::response`]).
    pub log: String,
    /// The whole parsed response, or `None` when stdout was not one JSON value.
    pub response: Option<Value>,
    /// Raw standard output.
    pub stdout: String,
    /// Standard error (the CPI's logs).
    pub stderr: String,
    /// Exit code (128 + signal when killed by a signal).
    pub exit_code: i32,
    /// Wall-clock time of the call.
    pub elapsed: Duration,
}

impl CpiResponse {
    fn from_output(stdout: Vec<u8>, stderr: Vec<u8>, exit_code: i32, elapsed: Duration) -> Self {
        let stdout = String::from_utf8_lossy(&stdout).into_owned();
        let response = serde_json::from_str::<Value>(stdout.trim()).ok();
        let (result, error, log) = match &response {
            Some(r) => (
                r.get("result").cloned().unwrap_or(Value::Null),
                r.get("error").filter(|e| !e.is_null()).map(|e| {
                    serde_json::from_value::<CpiErrorBody>(e.clone()).unwrap_or_else(|_| {
                        CpiErrorBody {
                            type_: String::new(),
                            message: e.to_string(),
                            ok_to_retry: false,
                        }
                    })
                }),
                r.get("log")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            ),
            None => (Value::Null, None, String::new()),
        };
        CpiResponse {
            result,
            error,
            log,
            response,
            stdout,
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            exit_code,
            elapsed,
        }
    }

    /// Whether the call succeeded: exit code 0, a well-formed response, no error.
    pub fn is_ok(&self) -> bool {
        self.problems().is_empty() && self.error.is_none()
    }

    /// The error type (`Bosh::Clouds::...`) when the call returned an error.
    pub fn error_type(&self) -> Option<&str> {
        self.error.as_ref().map(|e| e.type_.as_str())
    }

    /// What is wrong with the response as a response, whatever its `error`:
    /// non-zero exit, stdout not JSON, missing `result`/`error`, `log` missing or
    /// not a string. Empty when well formed.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.exit_code != 0 {
            problems.push(format!(
                "exit code {} (must be 0 whenever a response is written)",
                self.exit_code
            ));
        }
        match &self.response {
            None => problems.push("stdout is not one JSON value".to_string()),
            Some(r) => {
                if !r.is_object() {
                    problems.push("response is not a JSON object".to_string());
                }
                for key in ["result", "error"] {
                    if r.get(key).is_none() {
                        problems.push(format!("response has no `{key}`"));
                    }
                }
                if !r.get("log").is_some_and(Value::is_string) {
                    problems.push("response `log` is missing or not a string".to_string());
                }
            }
        }
        problems
    }

    /// Panics unless the response is well formed (see [`CpiResponse::problems`]);
    /// an `error` in the response is allowed.
    ///
    /// # Panics
    /// When [`CpiResponse::problems`] is not empty.
    pub fn assert_well_formed(&self) {
        let problems = self.problems();
        assert!(
            problems.is_empty(),
            "malformed CPI response: {}\n{}",
            problems.join("; "),
            self.describe()
        );
    }

    /// Panics unless the call failed with a well-formed error of type `error_type`
    /// (e.g. `Bosh::Clouds::VMNotFound`); returns the error.
    ///
    /// # Panics
    /// When the call succeeded, the response is malformed or the type differs.
    pub fn expect_error(&self, error_type: &str) -> &CpiErrorBody {
        self.assert_well_formed();
        match &self.error {
            Some(e) if e.type_ == error_type => e,
            _ => panic!("expected a {error_type} error\n{}", self.describe()),
        }
    }

    /// A multi-line description of the call's outcome for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "exit code: {}\nelapsed: {:?}\nstdout:\n{}\nstderr:\n{}",
            self.exit_code, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Builds the JSON request the director would send for `method(args)`.
pub fn request(method: &str, args: Value, request_id: &str) -> Value {
    json!({
        "method": method,
        "arguments": args,
        "context": {"director_uuid": DIRECTOR_UUID, "request_id": request_id},
        "api_version": 2,
    })
}

fn next_request_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-req-{}",
        crate::names::run_id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn call_timeout() -> Duration {
    std::env::var("CPI_TEST_CALL_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_CALL_TIMEOUT)
}

/// Runs CPI calls with one binary and one config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpiRunner {
    /// The `cpi` binary.
    pub bin: PathBuf,
    /// The config file passed as `-configPath`.
    pub config: PathBuf,
}

impl CpiRunner {
    /// A runner for the binary from [`cpi_bin`] and the given config file.
    ///
    /// # Panics
    /// When the binary does not exist (see [`cpi_bin`]).
    pub fn new(config: impl Into<PathBuf>) -> Self {
        CpiRunner {
            bin: cpi_bin(),
            config: config.into(),
        }
    }

    /// Calls `method` with `args` (a JSON array) and a context holding
    /// `director_uuid` and a fresh `request_id`, with `api_version: 2`.
    pub fn call(&self, method: &str, args: Value) -> CpiResponse {
        self.call_request(&request(method, args, &next_request_id()))
    }

    /// Like [`CpiRunner::call`], with the keys of `extra_context` (a JSON object)
    /// merged into the request's `context` (as a director cpi-config does).
    pub fn call_with_context(
        &self,
        method: &str,
        args: Value,
        extra_context: Value,
    ) -> CpiResponse {
        let mut req = request(method, args, &next_request_id());
        if let (Some(ctx), Value::Object(extra)) = (
            req.get_mut("context").and_then(Value::as_object_mut),
            extra_context,
        ) {
            ctx.extend(extra);
        }
        self.call_request(&req)
    }

    /// Sends `request` as is (serialized to one line).
    pub fn call_request(&self, request: &Value) -> CpiResponse {
        let mut line = request.to_string().into_bytes();
        line.push(b'\n');
        self.call_raw(&line)
    }

    /// Sends arbitrary bytes on stdin (for malformed-input tests).
    ///
    /// The child gets only `PATH` and `TMPDIR` (and `RUST_BACKTRACE` when set),
    /// like under the director.
    ///
    /// # Panics
    /// When the binary cannot be started at all.
    pub fn call_raw(&self, stdin: &[u8]) -> CpiResponse {
        let mut cmd = Command::new(&self.bin);
        director_env(&mut cmd).arg("-configPath").arg(&self.config);
        if let Some(bt) = std::env::var_os("RUST_BACKTRACE") {
            cmd.env("RUST_BACKTRACE", bt);
        }
        let timeout = call_timeout();
        let done = process::run(&mut cmd, Some(stdin), timeout)
            .unwrap_or_else(|e| panic!("cannot start the cpi binary {}: {e}", self.bin.display()));
        let mut stderr = done.stderr;
        if done.timed_out {
            stderr.extend_from_slice(
                format!("\n[cpi-tests: the call was killed after {timeout:?}]\n").as_bytes(),
            );
        }
        CpiResponse::from_output(
            done.stdout,
            stderr,
            process::exit_code(done.status),
            done.elapsed,
        )
    }

    /// Calls `method` and returns its `result`.
    ///
    /// # Panics
    /// When the call failed or the response is malformed, showing the error,
    /// stdout and stderr.
    pub fn ok(&self, method: &str, args: Value) -> Value {
        let resp = self.call(method, args);
        resp.assert_well_formed();
        if let Some(e) = &resp.error {
            panic!(
                "CPI call {method} failed: {}: {} (ok_to_retry: {})\n{}",
                e.type_,
                e.message,
                e.ok_to_retry,
                resp.describe()
            );
        }
        resp.result
    }
}

/// The environment a CPI gets from the director: `PATH` and `TMPDIR` only (both kept
/// from this process, with the usual defaults when unset).
pub fn director_env(cmd: &mut Command) -> &mut Command {
    cmd.env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| {
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
            }),
        )
        .env(
            "TMPDIR",
            std::env::var_os("TMPDIR").unwrap_or_else(|| "/tmp".into()),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_success_and_error_responses() {
        let ok = CpiResponse::from_output(
            br#"{"result":"vm-1","error":null,"log":"a\n"}"#.to_vec(),
            b"logs".to_vec(),
            0,
            Duration::from_millis(3),
        );
        assert!(ok.is_ok());
        assert_eq!(ok.result, json!("vm-1"));
        assert_eq!(ok.log, "a\n");
        assert_eq!(ok.stderr, "logs");

        let err = CpiResponse::from_output(
            br#"{"result":null,"error":{"type":"Bosh::Clouds::VMNotFound","message":"no vm","ok_to_retry":false},"log":""}"#.to_vec(),
            Vec::new(),
            0,
            Duration::ZERO,
        );
        assert!(!err.is_ok());
        assert_eq!(
            err.expect_error("Bosh::Clouds::VMNotFound").message,
            "no vm"
        );
    }

    #[test]
    fn reports_malformed_responses() {
        let garbage = CpiResponse::from_output(b"nope".to_vec(), Vec::new(), 1, Duration::ZERO);
        assert!(!garbage.is_ok());
        let problems = garbage.problems();
        assert_eq!(problems.len(), 2, "{problems:?}");

        let no_log = CpiResponse::from_output(
            br#"{"result":true,"error":null}"#.to_vec(),
            Vec::new(),
            0,
            Duration::ZERO,
        );
        assert!(!no_log.is_ok());
        assert_eq!(no_log.problems().len(), 1);
    }

    #[test]
    fn request_has_context_and_api_version() {
        let r = request("has_vm", json!(["vm-1"]), "r1");
        assert_eq!(r["method"], "has_vm");
        assert_eq!(r["arguments"], json!(["vm-1"]));
        assert_eq!(r["context"]["director_uuid"], DIRECTOR_UUID);
        assert_eq!(r["context"]["request_id"], "r1");
        assert_eq!(r["api_version"], 2);
    }

    #[test]
    fn call_raw_runs_a_program_with_a_clean_environment() {
        // /bin/sh stands in for the cpi binary: it prints a response built from
        // its input and environment, showing what the child sees.
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("fake-cpi");
        std::fs::write(
            &script,
            "#!/bin/sh\nread -r line\nprintf '{\"result\":{\"args\":\"%s %s\",\"home\":\"%s\",\"in\":%s},\"error\":null,\"log\":\"\"}' \"$1\" \"$2\" \"${HOME:-unset}\" \"$line\"\necho to-stderr >&2\n",
        )
        .expect("write script");
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let runner = CpiRunner {
            bin: script,
            config: PathBuf::from("/nonexistent/cpi.json"),
        };
        let result = runner.ok("info", json!([]));
        assert_eq!(result["args"], "-configPath /nonexistent/cpi.json");
        assert_eq!(result["home"], "unset");
        assert_eq!(result["in"]["method"], "info");
        let resp = runner.call("info", json!([]));
        assert_eq!(resp.stderr.trim(), "to-stderr");
        assert_eq!(resp.exit_code, 0);
    }
}
