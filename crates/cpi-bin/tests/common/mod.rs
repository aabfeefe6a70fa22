//! Shared helpers of the black-box tests: run the built `cpi` binary the way the
//! director does (only `PATH` and `TMPDIR` in the environment, the request on stdin)
//! and check that it answered exactly one well-formed JSON line.

#![allow(
    dead_code,
    reason = "each test file uses a different subset of the helpers"
)]

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

/// The mbus URL of the test configs (its password is a planted secret).
pub const MBUS: &str = "https://mbus:mbus-secret-pw-5678@0.0.0.0:6868";

/// What one run of the binary produced.
#[derive(Debug)]
pub struct Run {
    /// Raw stdout.
    pub stdout: String,
    /// Raw stderr (the logs).
    pub stderr: String,
    /// Exit code.
    pub code: Option<i32>,
}

impl Run {
    /// Asserts exit 0 and exactly one JSON line with `result`, `error` and a string
    /// `log`; returns the parsed response.
    pub fn response(&self) -> Value {
        assert_eq!(self.code, Some(0), "exit code\n{}", self.describe());
        assert!(
            self.stdout.ends_with('\n') && self.stdout.matches('\n').count() == 1,
            "stdout must be exactly one line\n{}",
            self.describe()
        );
        let v: Value = serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON: {e}\n{}", self.describe()));
        let obj = v.as_object().expect("response is an object");
        assert!(obj.contains_key("result"), "no result\n{}", self.describe());
        assert!(obj.contains_key("error"), "no error\n{}", self.describe());
        assert!(
            v["log"].is_string(),
            "log is not a string\n{}",
            self.describe()
        );
        assert_eq!(
            obj.len(),
            3,
            "only result, error and log\n{}",
            self.describe()
        );
        v
    }

    /// Asserts a well-formed error response of `error_type` (short name, e.g.
    /// `CpiError`) whose message contains `needle`; returns the message.
    pub fn error(&self, error_type: &str, needle: &str) -> String {
        let v = self.response();
        assert_eq!(v["result"], Value::Null, "{}", self.describe());
        assert_eq!(
            v["error"]["type"],
            format!("Bosh::Clouds::{error_type}"),
            "{}",
            self.describe()
        );
        assert!(v["error"]["ok_to_retry"].is_boolean());
        let message = v["error"]["message"].as_str().expect("message").to_owned();
        assert!(
            message.contains(needle),
            "want {needle:?} in the message\n{}",
            self.describe()
        );
        message
    }

    /// Asserts success and returns the result.
    pub fn ok(&self) -> Value {
        let v = self.response();
        assert_eq!(v["error"], Value::Null, "{}", self.describe());
        v["result"].clone()
    }

    /// For failure messages.
    pub fn describe(&self) -> String {
        format!(
            "exit: {:?}\nstdout: {}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// The binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cpi"))
}

/// Runs the binary with `args`, `stdin` and extra environment variables.
pub fn run_with<S: AsRef<OsStr>>(args: &[S], stdin: &[u8], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .env("TMPDIR", std::env::temp_dir())
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn cpi");
    let mut child_stdin = child.stdin.take().expect("stdin");
    let input = stdin.to_vec();
    // The CPI may stop reading early (oversized input): a broken pipe is expected.
    let writer = std::thread::spawn(move || {
        let _ = child_stdin.write_all(&input);
    });
    let out = child.wait_with_output().expect("wait");
    writer.join().expect("writer thread");
    Run {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        code: out.status.code(),
    }
}

/// Runs `cpi -configPath CONFIG` with `stdin`.
pub fn run(config: &Path, stdin: &[u8]) -> Run {
    run_with(&[OsStr::new("-configPath"), config.as_os_str()], stdin, &[])
}

/// Runs `cpi -configPath CONFIG` with one request.
pub fn call(config: &Path, request: &Value) -> Run {
    run(config, format!("{request}\n").as_bytes())
}

/// A director-shaped request.
pub fn request(method: &str, arguments: Value) -> Value {
    json!({"method": method, "arguments": arguments,
           "context": {"director_uuid": "cpi-bin-tests", "request_id": "cpi-test-1"},
           "api_version": 2})
}

/// Writes `value` as `name` in `dir`; returns the path.
pub fn write_json(dir: &Path, name: &str, value: &Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(value).expect("json")).expect("write");
    path
}

/// A fake-backend config in `dir` with its state file beside it.
pub fn fake_config(dir: &Path) -> PathBuf {
    write_json(
        dir,
        "cpi.json",
        &json!({"backend": "fake", "agent": {"mbus": MBUS, "ntp": []},
                "fake": {"state_file": dir.join("state.json")}}),
    )
}

/// Builds an unpacked warden-style stemcell (an `image` file and `stemcell.MF`) in
/// `dir`; returns the image path.
pub fn stemcell(dir: &Path) -> PathBuf {
    let sc = dir.join("stemcell");
    std::fs::create_dir_all(&sc).expect("mkdir");
    std::fs::write(sc.join("image"), b"a tiny stand-in for a rootfs tarball").expect("image");
    std::fs::write(
        sc.join("stemcell.MF"),
        "---\nname: bosh-warden-boshlite-ubuntu-jammy-go_agent\nversion: '1.500'\n\
         bosh_protocol: 1\napi_version: 3\noperating_system: ubuntu-jammy\n\
         stemcell_formats:\n- warden-tar\n- general-tar\n\
         cloud_properties:\n  infrastructure: warden\n  architecture: x86_64\n",
    )
    .expect("manifest");
    sc.join("image")
}
