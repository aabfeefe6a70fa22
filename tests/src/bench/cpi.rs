//! The CPI side of a row: the real `cpi` binary, one process per call, run under the
//! measuring parent ([`super::measure`]) with a request as the director sends it.

use std::time::Duration;

use serde_json::{json, Value};

use cpi_tests::conformance::Target;

use super::measure::{self, Measured};

/// One measured call: its measurement and result, or what went wrong.
pub type CallResult = Result<(Measured, Value), String>;

/// Calls the CPI of one [`Target`].
pub struct CpiSide<'a> {
    target: &'a Target,
    timeout: Duration,
    counter: std::cell::Cell<u64>,
}

impl<'a> CpiSide<'a> {
    /// A CPI side for `target`; each call is killed after `timeout`.
    pub fn new(target: &'a Target, timeout: Duration) -> CpiSide<'a> {
        CpiSide {
            target,
            timeout,
            counter: std::cell::Cell::new(0),
        }
    }

    fn request(&self, method: &str, args: Value) -> Vec<u8> {
        let n = self.counter.get();
        self.counter.set(n + 1);
        let id = format!("{}-bench-{n}", self.target.director_uuid);
        let mut req = cpi_tests::runner::request(method, args, &id);
        req["context"]["director_uuid"] = json!(self.target.director_uuid);
        let mut line = req.to_string().into_bytes();
        line.push(b'\n');
        line
    }

    /// Calls `method` as a measured process; the result, or the error and the logs.
    pub fn measured(&self, method: &str, args: Value) -> Result<(Measured, Value), String> {
        let config = self.target.runner.config.to_string_lossy().into_owned();
        let m = measure::run(
            &self.target.runner.bin,
            &["-configPath", &config],
            &self.request(method, args),
            self.timeout,
        )?;
        let result = outcome(method, &m.stdout, &m.stderr, m.exit_code)?;
        Ok((m, result))
    }

    /// Calls `method` once per argument list, all at once: one thread and one measured
    /// `cpi` process per call, as a director's concurrent calls. Returns the wall time
    /// from before the first spawn to the last exit, and each call's measurement and
    /// result in the order of `args`.
    pub fn measured_concurrently(
        &self,
        method: &str,
        args: Vec<Value>,
    ) -> (Duration, Vec<CallResult>) {
        let config = self.target.runner.config.to_string_lossy().into_owned();
        let requests: Vec<Vec<u8>> = args.into_iter().map(|a| self.request(method, a)).collect();
        let bin = &self.target.runner.bin;
        let timeout = self.timeout;
        let started = std::time::Instant::now();
        let results = std::thread::scope(|scope| {
            let handles: Vec<_> = requests
                .iter()
                .map(|req| {
                    let config = config.as_str();
                    scope.spawn(move || {
                        let m = measure::run(bin, &["-configPath", config], req, timeout)?;
                        let result = outcome(method, &m.stdout, &m.stderr, m.exit_code)?;
                        Ok((m, result))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(format!("{method}: the measuring thread panicked")))
                })
                .collect::<Vec<_>>()
        });
        (started.elapsed(), results)
    }

    /// Calls `method` without measuring it (set-up and clean-up).
    pub fn call(&self, method: &str, args: Value) -> Result<Value, String> {
        let resp = self.target.runner.call_with_context(
            method,
            args,
            json!({"director_uuid": self.target.director_uuid}),
        );
        outcome(method, &resp.stdout, &resp.stderr, resp.exit_code)
    }
}

/// The `result` of a response, or a message with the error and the logs.
pub fn outcome(method: &str, stdout: &str, stderr: &str, exit_code: i32) -> Result<Value, String> {
    let resp: Value = serde_json::from_str(stdout.trim()).map_err(|e| {
        format!("{method}: stdout is not a response ({e}), exit code {exit_code}:\n{stdout}\nstderr:\n{stderr}")
    })?;
    match resp.get("error") {
        Some(e) if !e.is_null() => Err(format!(
            "{method} failed: {} {}\n{}",
            e["type"].as_str().unwrap_or("?"),
            e["message"].as_str().unwrap_or("?"),
            tail(stderr, 20)
        )),
        _ if exit_code != 0 => Err(format!(
            "{method}: exit code {exit_code}\n{}",
            tail(stderr, 20)
        )),
        _ => Ok(resp.get("result").cloned().unwrap_or(Value::Null)),
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes() {
        assert_eq!(
            outcome("has_vm", r#"{"result":true,"error":null,"log":""}"#, "", 0),
            Ok(json!(true))
        );
        let e = outcome(
            "has_vm",
            r#"{"result":null,"error":{"type":"Bosh::Clouds::CloudError","message":"boom"},"log":""}"#,
            "a\nb",
            0,
        )
        .expect_err("error");
        assert!(e.contains("CloudError boom") && e.contains("a\nb"), "{e}");
        assert!(outcome("info", "garbage", "", 1).is_err());
    }
}
