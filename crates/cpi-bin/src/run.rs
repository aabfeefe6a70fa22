//! One CPI call, from stdin bytes to the response line.
//!
//! The steps are those of `cpi_core::protocol::handle`, spelled out because the binary
//! needs the parsed request before anything runs (its secrets, for the log scrubber;
//! its method and request id, for the log span):
//!
//! 1. read stdin (at most `MAX_REQUEST_BYTES + 1`) and the config file, and collect
//!    the secrets of both;
//! 2. parse the request and type the call (`CpiError` when malformed,
//!    `NotImplemented` for unknown methods);
//! 3. interpret the config and apply the context's overrides (`CloudError`);
//! 4. build the backend (lazily connected) and run the call on a current-thread
//!    runtime;
//! 5. scrub the response, attach the captured log.
//!
//! A panic anywhere in 1–4 becomes a `CpiError` response ("internal error: ...").

use std::any::Any;
use std::io::Read;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::Instant;

use backend_containerd::ContainerdCpi;
use backend_docker::DockerCpi;
use cpi_core::fake::FakeCpi;
use cpi_core::protocol::{execute, Call, Request, Response, MAX_REQUEST_BYTES};
use cpi_core::redact::Secrets;
use cpi_core::{CallContext, CpiError, CpiResult, ErrorKind};
use serde_json::Value;

use crate::config::{BackendConfig, Config, ConfigFile};
use crate::fake_store;
use crate::logging::{self, Logs};

/// Answers the request on stdin; returns the response line (with its newline).
/// `config_path` is the `-configPath` argument, or why the command line was wrong.
pub fn respond(config_path: Result<PathBuf, String>) -> Vec<u8> {
    let logs = Logs::install(std::env::var(logging::LOG_ENV).ok().as_deref());
    install_panic_hook();
    contain(&logs, || process(config_path, &logs))
}

/// Runs `body`, turning a panic into an internal-error response, then attaches the
/// captured log, scrubs everything and serialises the line.
fn contain(logs: &Logs, body: impl FnOnce() -> Response) -> Vec<u8> {
    let outcome = panic::catch_unwind(AssertUnwindSafe(body));
    let mut response =
        outcome.unwrap_or_else(|payload| Response::error(&internal_error(&*payload)));
    response.log = logs.take();
    logging::scrub_response(&mut response, &logs.secrets());
    let mut line = response.to_json();
    line.push(b'\n');
    line
}

/// Replaces the default panic hook, which would print an unscrubbed message: the
/// panic goes to the log (stderr and the response), through the scrubber.
fn install_panic_hook() {
    panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(
            location = %location,
            "internal error: the CPI panicked: {}",
            payload_text(info.payload())
        );
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            tracing::error!("backtrace:\n{backtrace}");
        }
    }));
}

fn payload_text(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-text payload".to_owned())
}

fn internal_error(payload: &(dyn Any + Send)) -> CpiError {
    CpiError::new(
        ErrorKind::CpiError,
        format!(
            "internal error: {} (a bug in the CPI; the log has the details)",
            payload_text(payload)
        ),
    )
}

/// Reads the request, at most one byte more than we accept, so huge input is refused
/// without being read into memory.
fn read_stdin() -> CpiResult<Vec<u8>> {
    let mut buf = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_REQUEST_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| {
            CpiError::bad_argument(format!("reading the request from stdin failed: {e}"))
        })?;
    if buf.len() > MAX_REQUEST_BYTES {
        return Err(CpiError::bad_argument(format!(
            "the request on stdin is larger than {MAX_REQUEST_BYTES} bytes ({} MiB); refused unread",
            MAX_REQUEST_BYTES >> 20
        )));
    }
    Ok(buf)
}

fn process(config_path: Result<PathBuf, String>, logs: &Logs) -> Response {
    let started = Instant::now();
    let input = read_stdin();
    let config_file = config_path
        .map_err(|e| CpiError::cloud(format!("command line: {e}")))
        .and_then(|p| ConfigFile::read(&p));

    // Secrets first: nothing is logged before the scrubber knows them.
    let mut secrets = Secrets::new();
    if let Ok(value) = input
        .as_deref()
        .map_err(|_| ())
        .and_then(|bytes| serde_json::from_slice::<Value>(bytes).map_err(|_| ()))
    {
        logging::collect_secrets(&mut secrets, &value);
    }
    if let Ok(file) = &config_file {
        logging::collect_secrets(&mut secrets, &file.value);
    }
    logs.set_secrets(secrets);

    let request = input.and_then(|bytes| Request::parse(&bytes));
    let (method, request_id) = match &request {
        Ok(r) => (
            r.method.clone(),
            r.context
                .get("request_id")
                .and_then(Value::as_str)
                .unwrap_or("-")
                .to_owned(),
        ),
        Err(_) => ("-".to_owned(), "-".to_owned()),
    };
    let span = tracing::info_span!("cpi", method = %method, request_id = %request_id);
    let _entered = span.enter();

    let result = handle(request, config_file);
    let elapsed_ms = started.elapsed().as_millis();
    match &result {
        Ok(_) => tracing::info!(elapsed_ms, "done"),
        Err(e) => tracing::warn!(
            elapsed_ms,
            error_type = e.kind.wire_name(),
            ok_to_retry = e.ok_to_retry,
            "failed: {}",
            e.message
        ),
    }
    match result {
        Ok(value) => Response::ok(value),
        Err(e) => Response::error(&e),
    }
}

fn handle(request: CpiResult<Request>, config_file: CpiResult<ConfigFile>) -> CpiResult<Value> {
    let request = request?;
    let call = Call::parse(&request.method, &request.arguments)?;
    let ctx = request.context();
    let config = Config::from_file(&config_file?)?;
    tracing::info!(
        backend = config.backend.name(),
        config = %config.path.display(),
        api_version = ctx.api_version,
        "handling {}",
        call.method()
    );
    let arguments = Value::Array(request.arguments);
    tracing::debug!(arguments = %arguments, "request arguments");
    let backend = config.backend_config(&ctx.overrides)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CpiError::cloud(format!("cannot start the async runtime: {e}")))?;
    match backend {
        BackendConfig::Docker(settings) => {
            let cpi = DockerCpi::new(*settings, config.agent.clone())
                .map_err(|e| refused(&config, "docker", e))?;
            runtime.block_on(execute(&cpi, &ctx, call))
        }
        BackendConfig::Containerd(settings) => {
            let cpi = ContainerdCpi::new(*settings, config.agent.clone())
                .map_err(|e| refused(&config, "containerd", e))?;
            runtime.block_on(execute(&cpi, &ctx, call))
        }
        BackendConfig::Fake(settings) => {
            run_fake(&runtime, &config, &settings.state_file, &ctx, call)
        }
    }
}

/// A backend that refuses its settings is a config problem: always a `CloudError`.
fn refused(config: &Config, backend: &str, e: CpiError) -> CpiError {
    CpiError::cloud(format!(
        "config file {}: the {backend} backend refused its settings: {}",
        config.path.display(),
        e.message
    ))
}

fn run_fake(
    runtime: &tokio::runtime::Runtime,
    config: &Config,
    state_file: &std::path::Path,
    ctx: &CallContext,
    call: Call,
) -> CpiResult<Value> {
    fake_store::run_locked(state_file, fake_store::LOCK_TIMEOUT, |state| {
        let cpi = FakeCpi::new(state, config.agent.clone());
        let result = runtime.block_on(execute(&cpi, ctx, call));
        (result, cpi.state())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_cpi_errors() {
        let payload: Box<dyn Any + Send> = Box::new("index out of bounds");
        let err = internal_error(&*payload);
        assert_eq!(err.kind, ErrorKind::CpiError);
        assert!(err
            .message
            .starts_with("internal error: index out of bounds"));
        let payload: Box<dyn Any + Send> = Box::new(String::from("boom"));
        assert!(internal_error(&*payload).message.contains("boom"));
        let payload: Box<dyn Any + Send> = Box::new(42_u8);
        assert!(internal_error(&*payload)
            .message
            .contains("non-text payload"));
    }

    #[test]
    fn a_panicking_call_still_answers_one_scrubbed_line() {
        let logs = Logs::default();
        let mut secrets = Secrets::new();
        secrets.add("panic-secret-123");
        logs.set_secrets(secrets);
        let line = contain(&logs, || panic!("exploded near panic-secret-123"));
        assert!(line.ends_with(b"\n"));
        let v: Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(v["error"]["type"], "Bosh::Clouds::CpiError");
        assert_eq!(v["result"], Value::Null);
        assert!(v["log"].is_string());
        let message = v["error"]["message"].as_str().expect("message");
        assert!(
            message.starts_with("internal error: exploded near <redacted>"),
            "{message}"
        );
    }

    #[test]
    fn config_problems_are_cloud_errors_even_for_info() {
        let request = Request::parse(br#"{"method":"info","arguments":[]}"#);
        let err = handle(
            request,
            Err(CpiError::cloud("config file /x: cannot be read")),
        )
        .expect_err("config");
        assert_eq!(err.kind, ErrorKind::CloudError);
        // A malformed request is reported as such before the config is looked at.
        let err = handle(
            Request::parse(br#"{"method":"has_vm","arguments":[]}"#),
            Err(CpiError::cloud("config")),
        )
        .expect_err("args");
        assert_eq!(err.kind, ErrorKind::CpiError);
    }

    #[test]
    fn info_on_the_fake_backend() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state.json");
        let file = ConfigFile {
            path: dir.path().join("cpi.json"),
            value: serde_json::json!({"backend": "fake", "fake": {"state_file": state}}),
        };
        let result = handle(
            Request::parse(br#"{"method":"info","arguments":[],"api_version":2}"#),
            Ok(file),
        )
        .expect("info");
        assert_eq!(result["api_version"], 2);
        assert!(!state.exists(), "info changes nothing");
    }
}
