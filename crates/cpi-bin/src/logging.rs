//! Logging: every line goes to stderr and into the response's `log`, with secrets
//! redacted on the way out.
//!
//! Only the binary installs a subscriber (libraries just emit `tracing` events). The
//! fmt layer formats each event into one [`Line`]; when the line is dropped it is
//! scrubbed with the call's [`Secrets`] (values from the request and the config, plus
//! secret shapes such as URL passwords and PEM private keys), written to stderr, and
//! appended to the captured log. The secrets are set once the request and the config
//! have been read, before anything is logged.

use std::io::Write;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use cpi_core::protocol::Response;
use cpi_core::redact::Secrets;
use serde_json::Value;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

/// The environment variable holding the log filter.
pub const LOG_ENV: &str = "CPI_LOG";

/// The most log text a response carries; beyond it the log is cut (stderr keeps all).
pub const MAX_CAPTURED_LOG: usize = 1 << 20;

#[derive(Debug, Default)]
struct Shared {
    captured: Mutex<String>,
    truncated: Mutex<bool>,
    secrets: RwLock<Secrets>,
}

/// A handle on the installed subscriber's capture buffer and secrets.
#[derive(Debug, Clone, Default)]
pub struct Logs {
    shared: Arc<Shared>,
}

impl Logs {
    /// Installs the global subscriber with the filter from `spec` (the value of
    /// `CPI_LOG`; `info` when unset). An invalid spec falls back to `info` and says
    /// so in the log.
    pub fn install(spec: Option<&str>) -> Logs {
        let logs = Logs::default();
        let (filter, bad_spec) = parse_filter(spec);
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_target(true)
            .with_filter(filter);
        let subscriber = tracing_subscriber::registry().with(layer);
        // Fails only if a subscriber is already installed (a second call in tests);
        // the first one keeps working.
        let _ = tracing::subscriber::set_global_default(subscriber);
        if let Some(spec) = bad_spec {
            tracing::warn!(
                "{LOG_ENV}={spec:?} is not a log filter (try `debug` or `info,backend_docker=trace`); using info"
            );
        }
        logs
    }

    /// Sets the secrets every later line is scrubbed of.
    pub fn set_secrets(&self, secrets: Secrets) {
        *self
            .shared
            .secrets
            .write()
            .unwrap_or_else(PoisonError::into_inner) = secrets;
    }

    /// The secrets in force.
    pub fn secrets(&self) -> Secrets {
        self.shared
            .secrets
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Takes the captured log, leaving the buffer empty.
    pub fn take(&self) -> String {
        std::mem::take(
            &mut *self
                .shared
                .captured
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    fn emit(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(bytes);
        let clean = self.secrets().scrub(&text).into_owned();
        // Nothing useful can be done if stderr is closed; the line is still captured.
        // Unit tests check the capture only: the test harness does not capture direct
        // stderr writes, which would flood its output.
        if !cfg!(test) {
            let _ = std::io::stderr().lock().write_all(clean.as_bytes());
        }
        let mut captured = self
            .shared
            .captured
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if captured.len() + clean.len() <= MAX_CAPTURED_LOG {
            captured.push_str(&clean);
        } else {
            let mut truncated = self
                .shared
                .truncated
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !*truncated {
                *truncated = true;
                captured.push_str("[log cut here: it passed 1 MiB; stderr has the rest]\n");
            }
        }
    }
}

/// One formatted event, emitted when dropped.
pub struct Line {
    logs: Logs,
    buf: Vec<u8>,
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        self.logs.emit(&self.buf);
    }
}

impl<'a> MakeWriter<'a> for Logs {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            logs: self.clone(),
            buf: Vec::new(),
        }
    }
}

/// Parses `CPI_LOG`; returns the filter and, when the spec was invalid, the spec.
pub fn parse_filter(spec: Option<&str>) -> (Targets, Option<String>) {
    let default = Targets::new().with_default(LevelFilter::INFO);
    match spec.map(str::trim) {
        None | Some("") => (default, None),
        Some(s) => match Targets::from_str(s) {
            Ok(t) => (t, None),
            Err(_) => (default, Some(s.to_owned())),
        },
    }
}

/// Adds the secrets of a JSON document (the request, the config) to `secrets`: every
/// value under a secret-named key and every URL password, as written and also as they
/// appear once escaped into JSON or `{:?}` text (a PEM block's newlines become `\n`
/// there, and the raw value would no longer match).
pub fn collect_secrets(secrets: &mut Secrets, value: &Value) {
    secrets.collect(value);
    secrets.collect(&map_strings(value, &|s| {
        unquote(&serde_json::to_string(s).unwrap_or_default())
    }));
    secrets.collect(&map_strings(value, &|s| unquote(&format!("{s:?}"))));
}

fn unquote(quoted: &str) -> String {
    quoted
        .strip_prefix('"')
        .and_then(|q| q.strip_suffix('"'))
        .unwrap_or(quoted)
        .to_owned()
}

fn map_strings(value: &Value, f: &dyn Fn(&str) -> String) -> Value {
    match value {
        Value::String(s) => Value::String(f(s)),
        Value::Array(items) => Value::Array(items.iter().map(|v| map_strings(v, f)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), map_strings(v, f)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Scrubs every string of a response (result, error message, log) before it is
/// serialised, so a replacement can never break the JSON.
pub fn scrub_response(response: &mut Response, secrets: &Secrets) {
    scrub_value(&mut response.result, secrets);
    if let Some(err) = &mut response.error {
        err.message = secrets.scrub(&err.message).into_owned();
    }
    response.log = secrets.scrub(&response.log).into_owned();
}

fn scrub_value(value: &mut Value, secrets: &Secrets) {
    match value {
        Value::String(s) => {
            if let std::borrow::Cow::Owned(clean) = secrets.scrub(s) {
                *s = clean;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| scrub_value(v, secrets)),
        Value::Object(map) => map.values_mut().for_each(|v| scrub_value(v, secrets)),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cpi_core::CpiError;
    use serde_json::json;

    #[test]
    fn filters() {
        assert_eq!(parse_filter(None).1, None);
        assert_eq!(parse_filter(Some("debug")).1, None);
        assert_eq!(parse_filter(Some("info,backend_docker=trace")).1, None);
        assert_eq!(
            parse_filter(Some("backend_docker=loud")).1,
            Some("backend_docker=loud".to_owned())
        );
        let (t, _) = parse_filter(Some("debug"));
        assert!(t.would_enable("anything", &tracing::Level::DEBUG));
        let (t, _) = parse_filter(None);
        assert!(!t.would_enable("anything", &tracing::Level::DEBUG));
        assert!(t.would_enable("anything", &tracing::Level::INFO));
    }

    #[test]
    fn escaped_forms_of_secrets_are_scrubbed() {
        let key = "-----BEGIN CERTIFICATE-----\nMIIcertbody\n-----END CERTIFICATE-----";
        let mut secrets = Secrets::new();
        collect_secrets(
            &mut secrets,
            &json!({"tls": {"certificate": key}, "pw": {"password": "quote\"d-pw"}}),
        );
        let json_text = serde_json::to_string(&json!({"echo": key})).expect("json");
        assert!(!secrets.scrub(&json_text).contains("MIIcertbody"));
        let debug_text = format!("{key:?} and {:?}", "quote\"d-pw");
        let out = secrets.scrub(&debug_text);
        assert!(
            !out.contains("MIIcertbody") && !out.contains("d-pw"),
            "{out}"
        );
        assert!(!secrets.scrub(key).contains("MIIcertbody"));
    }

    #[test]
    fn responses_are_scrubbed_field_by_field() {
        let mut secrets = Secrets::new();
        collect_secrets(&mut secrets, &json!({"password": "null-ish-secret"}));
        // A secret spelled like JSON syntax must not break the response.
        collect_secrets(&mut secrets, &json!({"password": "true"}));
        let mut resp = Response::error(&CpiError::cloud("boom null-ish-secret true"));
        resp.log = "line with null-ish-secret\n".into();
        scrub_response(&mut resp, &secrets);
        let text = String::from_utf8(resp.to_json()).expect("utf8");
        assert!(!text.contains("null-ish-secret"), "{text}");
        let v: Value = serde_json::from_str(&text).expect("still JSON");
        assert_eq!(v["error"]["message"], "boom <redacted> <redacted>");

        let mut ok = Response::ok(json!(["c-1", {"n": {"ip": "x null-ish-secret"}}]));
        scrub_response(&mut ok, &secrets);
        assert_eq!(ok.result[1]["n"]["ip"], "x <redacted>");
        assert_eq!(ok.result[0], "c-1");
    }

    #[test]
    fn lines_are_scrubbed_and_captured() {
        let logs = Logs::default();
        let mut secrets = Secrets::new();
        secrets.add("hunter2-pw");
        logs.set_secrets(secrets);
        {
            let mut line = logs.make_writer();
            line.write_all(b"INFO login with hunter2-pw and nats://a:b-pw@host\n")
                .expect("write");
        }
        let text = logs.take();
        assert_eq!(
            text,
            "INFO login with <redacted> and nats://<redacted>@host\n"
        );
        assert_eq!(logs.take(), "");
    }

    #[test]
    fn the_captured_log_is_bounded() {
        let logs = Logs::default();
        let big = vec![b'x'; MAX_CAPTURED_LOG / 2 + 1];
        for _ in 0..3 {
            logs.make_writer().write_all(&big).expect("write");
        }
        let text = logs.take();
        assert!(text.len() < MAX_CAPTURED_LOG + 100);
        assert!(text.ends_with("stderr has the rest]\n"));
    }
}
