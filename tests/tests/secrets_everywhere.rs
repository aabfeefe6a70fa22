//! Secrets never leave the one place they belong (the agent's settings file inside
//! the VM, mode 0600, owned by root).
//!
//! The test plants known secrets in every place a director or an operator puts them:
//! the agent password (`env.bosh.password`), the mbus URL's password in the config,
//! the mbus TLS private key (`env.bosh.mbus.cert.private_key`), blobstore credentials
//! (`env.bosh.blobstores[].options`), registry credentials in the backend config and,
//! for Docker, a TLS private key in `docker.tls`. It then runs create_stemcell (full
//! and a failing light one that would use the registry credentials), create_vm,
//! calls whose request context carries director cpi-config overrides with secrets
//! (valid and invalid ones),
//! create_disk, attach_disk, detach_disk and failing calls that carry the secrets in
//! their arguments, and checks stdout, stderr and the response log of every call, the
//! daemon's view of everything the run created (`docker inspect` of containers,
//! volumes and images; `ctr containers info` with the OCI spec's `process.args` and
//! `process.env`), the files the backend keeps for the VM on the host (a settings
//! copy must be 0600 root, the console log clean), and PID 1's command line and
//! environment inside the VM.
#![allow(
    clippy::print_stderr,
    reason = "a test reports its counts and timings on stderr, shown with --nocapture"
)]

use cpi_tests::conformance::{BackendKind, Target, CONTAINERD_TEST_NAMESPACE};
use cpi_tests::daemons::{ctr, docker};
use cpi_tests::runner::{CpiResponse, CpiRunner};
use cpi_tests::TestStemcell;
use serde_json::{json, Value};

const AGENT_PASSWORD: &str = "agent-password-S3CRET-7f1c";
const MBUS_PASSWORD: &str = "mbus-config-S3CRET-52aa";
const MBUS_KEY: &str = "mbus-private-key-S3CRET-9d0e";
const BLOBSTORE_PASSWORD: &str = "blobstore-password-S3CRET-e3b1";
const BLOBSTORE_KEY: &str = "blobstore-access-key-S3CRET-0c44";
const REGISTRY_PASSWORD: &str = "registry-password-S3CRET-4b2f";
const TLS_KEY: &str = "docker-tls-key-S3CRET-a6d3";
const CONTEXT_SECRET: &str = "cpi-config-context-S3CRET-19f7";

/// Every planted secret.
const SECRETS: [&str; 8] = [
    CONTEXT_SECRET,
    AGENT_PASSWORD,
    MBUS_PASSWORD,
    MBUS_KEY,
    BLOBSTORE_PASSWORD,
    BLOBSTORE_KEY,
    REGISTRY_PASSWORD,
    TLS_KEY,
];

/// The secrets the VM's settings file must carry (the agent needs them).
const AGENT_SECRETS: [&str; 5] = [
    AGENT_PASSWORD,
    MBUS_PASSWORD,
    MBUS_KEY,
    BLOBSTORE_PASSWORD,
    BLOBSTORE_KEY,
];

/// An unreachable registry: the light stemcell pull fails after using the credentials.
const DEAD_REGISTRY: &str = "127.0.0.1:9";

fn env() -> Value {
    json!({"bosh": {
        "group": "secrets", "groups": ["secrets"],
        "password": AGENT_PASSWORD,
        "mbus": {"cert": {"ca": "ca-pem", "certificate": "cert-pem", "private_key": MBUS_KEY}},
        "blobstores": [{"provider": "s3", "options": {
            "bucket_name": "b", "access_key_id": "AKIA", "secret_access_key": BLOBSTORE_KEY,
            "password": BLOBSTORE_PASSWORD}}],
    }})
}

fn assert_clean(what: &str, text: &str) {
    for secret in SECRETS {
        assert!(
            !text.contains(secret),
            "{what} shows the secret {secret}:\n{}",
            excerpt(text, secret)
        );
    }
}

fn excerpt(text: &str, secret: &str) -> String {
    let at = text.find(secret).unwrap_or(0);
    let from = (0..=at.saturating_sub(300))
        .rev()
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    let to = (at + secret.len() + 300).min(text.len());
    let to = (to..=text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    text[from..to].to_owned()
}

/// Every output of a call: stdout (which holds the response and its log) and stderr.
fn check_call(method: &str, resp: &CpiResponse) {
    assert_eq!(
        resp.exit_code,
        0,
        "{method}: non-zero exit\n{}",
        resp.describe()
    );
    assert_clean(&format!("{method}: stdout"), &resp.stdout);
    assert_clean(&format!("{method}: stderr"), &resp.stderr);
    assert_clean(&format!("{method}: response log"), &resp.log);
    if let Some(e) = &resp.error {
        assert_clean(&format!("{method}: error message"), &e.message);
    }
}

/// Rewrites the target's config with the planted secrets.
fn plant_config(t: &Target, extra: impl FnOnce(&mut Value)) -> CpiRunner {
    let text = std::fs::read_to_string(&t.runner.config).expect("config");
    let mut config: Value = serde_json::from_str(&text).expect("config json");
    config["agent"]["mbus"] = json!(format!("https://mbus:{MBUS_PASSWORD}@0.0.0.0:6868"));
    let auth = json!({DEAD_REGISTRY: {"username": "cpi", "password": REGISTRY_PASSWORD}});
    match t.kind {
        BackendKind::Docker => {
            config["docker"]["light_stemcell"] = json!({"registry_auth": auth});
        }
        BackendKind::Containerd => {
            config["containerd"]["registry_auth"] = auth;
            config["containerd"]["insecure_registries"] = json!([DEAD_REGISTRY]);
        }
        BackendKind::Fake => {}
    }
    extra(&mut config);
    let path = t.runner.config.with_file_name(format!(
        "secrets-{}.json",
        cpi_tests::names::unique_name("cfg")
    ));
    std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("json")).expect("write");
    CpiRunner::new(path)
}

struct Run<'a> {
    t: &'a Target,
    runner: CpiRunner,
    calls: std::cell::Cell<usize>,
}

impl Run<'_> {
    fn call(&self, method: &str, args: Value) -> CpiResponse {
        self.call_ctx(method, args, json!({}))
    }

    /// A call with extra `context` keys, as a director cpi-config sends them.
    fn call_ctx(&self, method: &str, args: Value, extra: Value) -> CpiResponse {
        self.calls.set(self.calls.get() + 1);
        let mut context = json!({"director_uuid": self.t.director_uuid});
        if let (Some(c), Value::Object(extra)) = (context.as_object_mut(), extra) {
            c.extend(extra);
        }
        let resp = self.runner.call_with_context(method, args, context);
        resp.assert_well_formed();
        check_call(method, &resp);
        resp
    }

    fn ok(&self, method: &str, args: Value) -> Value {
        let resp = self.call(method, args);
        assert!(resp.is_ok(), "{method} failed:\n{}", resp.describe());
        resp.result
    }

    fn fails(&self, method: &str, args: Value) {
        let resp = self.call(method, args);
        assert!(!resp.is_ok(), "{method} must fail:\n{}", resp.describe());
    }
}

/// The daemon's view of everything labelled with the run's director uuid.
fn daemon_view(t: &Target, vm: &str, stemcell: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    match t.kind {
        BackendKind::Fake => {}
        BackendKind::Docker => {
            out.push((
                format!("docker inspect {vm}"),
                docker(&["inspect", vm]).expect_success(),
            ));
            let filter = format!("label=bosh-container-cpi.director-uuid={}", t.director_uuid);
            for id in docker(&["ps", "-aq", "--filter", &filter])
                .expect_success()
                .lines()
            {
                out.push((
                    format!("docker inspect {id}"),
                    docker(&["inspect", id]).expect_success(),
                ));
            }
            for id in docker(&["volume", "ls", "-q", "--filter", &filter])
                .expect_success()
                .lines()
            {
                out.push((
                    format!("docker volume inspect {id}"),
                    docker(&["volume", "inspect", id]).expect_success(),
                ));
            }
            out.push((
                format!("docker image inspect {stemcell}"),
                docker(&["image", "inspect", stemcell]).stdout,
            ));
            out.push((
                "docker images".into(),
                docker(&["images", "--no-trunc"]).stdout,
            ));
        }
        BackendKind::Containerd => {
            let ns = CONTAINERD_TEST_NAMESPACE;
            let info = ctr(ns, &["containers", "info", vm]).expect_success();
            let spec: Value = serde_json::from_str(&info).unwrap_or(Value::Null);
            let args = &spec["Spec"]["process"]["args"];
            let envs = &spec["Spec"]["process"]["env"];
            assert!(
                args.is_array(),
                "ctr containers info {vm} has no OCI process.args:\n{info}"
            );
            out.push((format!("OCI process.args of {vm}"), args.to_string()));
            out.push((format!("OCI process.env of {vm}"), envs.to_string()));
            out.push((format!("ctr containers info {vm}"), info));
            for what in ["containers", "images", "snapshots", "leases"] {
                out.push((format!("ctr {what} ls"), ctr(ns, &[what, "ls"]).stdout));
            }
        }
    }
    out
}

/// The files the backend keeps for the VM on the host (its per-VM directory, not
/// the VM's root filesystem): a file holding secrets (the settings copy) must be
/// readable by root only; any other (the console log, network state) must hold none.
fn host_files_are_private(t: &Target, vm: &str) {
    use std::os::unix::fs::MetadataExt;
    let dir = t.state_dir.join("vms").join(vm);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_file() || meta.len() > 64 << 20 {
            continue;
        }
        let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned();
        if SECRETS.iter().any(|s| text.contains(s)) {
            assert!(
                meta.mode() & 0o077 == 0 && meta.uid() == 0,
                "{} holds secrets with mode {:o} and uid {}",
                path.display(),
                meta.mode() & 0o777,
                meta.uid()
            );
            assert!(
                !text.contains(REGISTRY_PASSWORD) && !text.contains(TLS_KEY),
                "{} holds CPI-only credentials",
                path.display()
            );
        }
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains("console"))
        {
            assert_clean(&format!("the VM's console log {}", path.display()), &text);
        }
    }
}

fn secrets_everywhere(kind: BackendKind, label: &str) {
    let t = Target::new(kind, label);
    let run = Run {
        t: &t,
        runner: plant_config(&t, |_| {}),
        calls: std::cell::Cell::new(0),
    };
    let started = std::time::Instant::now();
    let scratch = tempfile::Builder::new()
        .prefix("cpi-secrets-")
        .tempdir()
        .expect("tmp");

    run.ok("info", json!([]));
    let sc = TestStemcell::builder().build_unpacked(scratch.path().join("full"));
    let stemcell = run
        .ok("create_stemcell", json!([sc.image_path, {}]))
        .as_str()
        .expect("stemcell cid")
        .to_owned();
    // A light stemcell from a registry that does not answer: the backend looks up
    // the credentials and must not print them.
    let light = TestStemcell::light(format!("{DEAD_REGISTRY}/secrets/busybox:1"))
        .digest(Some(format!("sha256:{}", "1".repeat(64))))
        .build_unpacked(scratch.path().join("light"));
    let resp = run.call("create_stemcell", json!([light.image_path, {}]));
    if kind != BackendKind::Fake {
        assert!(
            !resp.is_ok(),
            "a pull from {DEAD_REGISTRY} cannot succeed:\n{}",
            resp.describe()
        );
    } else if resp.is_ok() {
        run.ok("delete_stemcell", json!([resp.result]));
    }

    let net = t.manual_network(60);
    let created = run.ok(
        "create_vm",
        json!(["agent-secrets", stemcell, {}, {"default": net}, [], env()]),
    );
    let vm = created[0].as_str().expect("vm cid").to_owned();
    // Failing calls that carry the secrets: the same IP again, a stemcell that does
    // not exist, a network that does not parse.
    run.fails(
        "create_vm",
        json!(["agent-dup", stemcell, {}, {"default": net}, [], env()]),
    );
    run.fails(
        "create_vm",
        json!(["agent-x", "bosh-stemcell:00000000-0000-4000-8000-000000000000", {}, {"default": t.manual_network(61)}, [], env()]),
    );
    run.fails(
        "create_vm",
        json!(["agent-y", stemcell, {}, {"default": {"type": "manual", "ip": "x"}}, [], env()]),
    );
    let disk = run
        .ok("create_disk", json!([64, {}, vm]))
        .as_str()
        .expect("disk cid")
        .to_owned();
    run.ok("attach_disk", json!([vm, disk]));
    run.ok(
        "set_vm_metadata",
        json!([vm, {"name": "secrets/0", "director": "d"}]),
    );

    // The daemon's view, while the VM runs with its disk attached.
    let views = daemon_view(&t, &vm, &stemcell);
    for (what, text) in &views {
        assert_clean(what, text);
    }
    let views = views.len();
    host_files_are_private(&t, &vm);
    // Inside the VM: the settings file holds the agent's secrets, root-only; PID 1's
    // command line and environment hold none.
    if let Some(mode) = t.exec(
        &vm,
        "stat -c %a:%U /var/vcap/bosh/warden-cpi-agent-env.json",
    ) {
        assert_eq!(mode.trim(), "600:root", "settings file mode and owner");
        eprintln!("{label}: settings file in {vm} is {}", mode.trim());
        // `ctr task exec` has been seen to return short output once under load: read
        // until the document parses (a few tries), then check it.
        let mut settings = String::new();
        for _ in 0..5 {
            settings = t
                .exec(&vm, "cat /var/vcap/bosh/warden-cpi-agent-env.json")
                .unwrap_or_default();
            if serde_json::from_str::<Value>(&settings).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        for secret in AGENT_SECRETS {
            assert!(
                settings.contains(secret),
                "the agent needs {secret} in its settings: {settings}"
            );
        }
        assert!(
            !settings.contains(REGISTRY_PASSWORD) && !settings.contains(TLS_KEY),
            "the settings carry CPI-only credentials"
        );
        let dir_mode = t
            .exec(&vm, "stat -c %a:%U /var/vcap/bosh")
            .unwrap_or_default();
        let world = dir_mode.trim().split(':').next().unwrap_or("");
        assert!(!world.is_empty(), "stat of /var/vcap/bosh: {dir_mode}");
        let pid1 = t
            .exec(
                &vm,
                "tr '\\0' '\\n' < /proc/1/cmdline; tr '\\0' '\\n' < /proc/1/environ",
            )
            .unwrap_or_default();
        assert_clean("PID 1's command line and environment", &pid1);
        // An unprivileged user in the VM cannot read the file.
        let as_nobody = t
            .exec(
                &vm,
                "su -s /bin/sh nobody -c 'cat /var/vcap/bosh/warden-cpi-agent-env.json' 2>&1 || true",
            )
            .unwrap_or_default();
        assert_clean("the settings file read as nobody", &as_nobody);
    }

    // Director cpi-config properties in the request context, valid and invalid, with
    // secrets in their credential slots (also pasted in the wrong shape, which the
    // config parser's "invalid type" error would quote): applied or refused, never
    // printed.
    let pem_key =
        format!("-----BEGIN PRIVATE KEY-----\n{CONTEXT_SECRET}\n-----END PRIVATE KEY-----\n");
    let overrides = match kind {
        BackendKind::Docker => vec![
            json!({"registry_auth": {"bogus": CONTEXT_SECRET}}),
            json!({"light_stemcell": {"registry_auth": {DEAD_REGISTRY: {"username": "u", "password": CONTEXT_SECRET}}}}),
            json!({"light_stemcell": {"registry_auth": CONTEXT_SECRET}}),
            json!({"tls": {"ca": CONTEXT_SECRET, "certificate": CONTEXT_SECRET, "private_key": pem_key}}),
            json!({"tls": CONTEXT_SECRET, "host": "tcp://127.0.0.1:9"}),
            json!({"password": CONTEXT_SECRET}),
        ],
        BackendKind::Containerd => vec![
            json!({"registry_auth": {DEAD_REGISTRY: {"username": "u", "password": CONTEXT_SECRET}}}),
            json!({"registry_auth": CONTEXT_SECRET}),
            json!({"registry_auth": {DEAD_REGISTRY: {"password": CONTEXT_SECRET, "extra": 1}}}),
            json!({"password": CONTEXT_SECRET}),
        ],
        BackendKind::Fake => vec![json!({"state_file": 7, "password": CONTEXT_SECRET})],
    };
    for extra in overrides {
        run.call_ctx(
            "create_stemcell",
            json!([light.image_path, {}]),
            extra.clone(),
        );
        run.call_ctx("has_vm", json!([vm]), extra);
    }

    run.ok("detach_disk", json!([vm, disk]));
    run.ok("delete_vm", json!([vm]));
    run.ok("delete_disk", json!([disk]));
    run.ok("delete_stemcell", json!([stemcell]));

    // Docker with a TLS private key for a daemon that is not there: the failing
    // connection must not print the key.
    let mut tls_calls = 0;
    if kind == BackendKind::Docker {
        let key = format!("-----BEGIN PRIVATE KEY-----\n{TLS_KEY}\n-----END PRIVATE KEY-----\n");
        let tls_run = Run {
            t: &t,
            runner: plant_config(&t, |c| {
                c["docker"]["host"] = json!("tcp://127.0.0.1:9");
                c["docker"]["tls"] = json!({
                    "ca": "-----BEGIN CERTIFICATE-----\nnot-a-ca\n-----END CERTIFICATE-----\n",
                    "certificate": "-----BEGIN CERTIFICATE-----\nnot-a-cert\n-----END CERTIFICATE-----\n",
                    "private_key": key,
                });
            }),
            calls: std::cell::Cell::new(0),
        };
        tls_run.fails("has_vm", json!(["c-00000000-0000-4000-8000-000000000000"]));
        tls_run.fails(
            "create_vm",
            json!(["agent-tls", "img", {}, {"default": t.manual_network(62)}, [], env()]),
        );
        tls_calls = tls_run.calls.get();
    }
    t.assert_nothing_left(&[vm], &[disk]);
    t.remove_networks();
    eprintln!(
        "{label}: {} calls, {} daemon views checked, in {:?}",
        run.calls.get() + tls_calls,
        views,
        started.elapsed()
    );
}

#[test]
fn secrets_everywhere_fake() {
    secrets_everywhere(BackendKind::Fake, "secrets-fake");
}

#[test]
fn secrets_everywhere_docker() {
    secrets_everywhere(BackendKind::Docker, "secrets-docker");
}

#[test]
fn secrets_everywhere_containerd() {
    secrets_everywhere(BackendKind::Containerd, "secrets-ctrd");
}
