//! Secrets planted in the request and the config never reach stdout or stderr, in
//! calls that log (at debug the request's arguments are logged) and in calls that fail
//! with messages that would echo them.

mod common;

use std::path::Path;

use serde_json::{json, Value};

use common::{request, run_with, stemcell, write_json, Run, MBUS};

const BOSH_PASSWORD: &str = "bosh-crypt-pw-9911";
const MBUS_CERT_KEY_BODY: &str = "MIIEagentMbusKeyBody4455";
const BLOBSTORE_PASSWORD: &str = "blob-store-pw-7733";
const TLS_KEY_BODY: &str = "MIIEdockerTlsKeyBody8822";
const REGISTRY_PASSWORD: &str = "registry-token-6644";
const CONTEXT_HOST_PASSWORD: &str = "ctx-host-pw-3311";
const NTP_PASSWORD: &str = "ntp-url-pw-2200";
/// The password inside [`MBUS`].
const MBUS_PASSWORD: &str = "mbus-secret-pw-5678";

const ALL: [&str; 8] = [
    BOSH_PASSWORD,
    MBUS_CERT_KEY_BODY,
    BLOBSTORE_PASSWORD,
    TLS_KEY_BODY,
    REGISTRY_PASSWORD,
    CONTEXT_HOST_PASSWORD,
    NTP_PASSWORD,
    MBUS_PASSWORD,
];

fn pem(body: &str) -> String {
    format!("-----BEGIN RSA PRIVATE KEY-----\n{body}\nmore+key/material==\n-----END RSA PRIVATE KEY-----\n")
}

fn env() -> Value {
    json!({"bosh": {
        "password": BOSH_PASSWORD,
        "group": "visible-group",
        "mbus": {"cert": {"ca": "-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----",
                          "certificate": "-----BEGIN CERTIFICATE-----\nCERT\n-----END CERTIFICATE-----",
                          "private_key": pem(MBUS_CERT_KEY_BODY)}},
        "blobstores": [{"provider": "dav", "options": {"endpoint": "http://10.0.0.6:25250",
                                                      "user": "agent", "password": BLOBSTORE_PASSWORD}}]}})
}

/// The fake backend selected, with a docker section holding TLS and registry secrets.
fn config(dir: &Path, docker: Value) -> std::path::PathBuf {
    write_json(
        dir,
        "cpi.json",
        &json!({"backend": "fake", "agent": {"mbus": MBUS, "ntp": []},
                "fake": {"state_file": dir.join("state.json")},
                "docker": docker}),
    )
}

fn docker_section() -> Value {
    json!({"host": "tcp://10.0.0.5:2376",
           "tls": {"ca": "CA-PEM-TEXT", "certificate": "CERT-PEM-TEXT", "private_key": pem(TLS_KEY_BODY)},
           "light_stemcell": {"registry_auth": {"ghcr.io": {"username": "me", "password": REGISTRY_PASSWORD}}}})
}

fn debug_call(config: &Path, req: &Value) -> Run {
    run_with(
        &[std::ffi::OsStr::new("-configPath"), config.as_os_str()],
        format!("{req}\n").as_bytes(),
        &[("CPI_LOG", "debug")],
    )
}

fn assert_clean(out: &Run, what: &str) {
    let v = out.response();
    assert!(
        !v["log"].as_str().unwrap_or_default().is_empty(),
        "{what}: the log is empty, so this test proves nothing\n{}",
        out.describe()
    );
    for secret in ALL {
        assert!(
            !out.stdout.contains(secret),
            "{what}: {secret} leaked to stdout\n{}",
            out.describe()
        );
        assert!(
            !out.stderr.contains(secret),
            "{what}: {secret} leaked to stderr\n{}",
            out.describe()
        );
    }
}

#[test]
fn secrets_never_reach_stdout_or_stderr() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), docker_section());
    let image = stemcell(dir.path());

    let out = debug_call(&config, &request("create_stemcell", json!([image, {}])));
    assert_clean(&out, "create_stemcell");
    let stemcell_cid = out.ok();

    let networks = json!({"default": {"type": "manual", "ip": "10.245.0.10", "netmask": "255.255.0.0",
                                      "gateway": "10.245.0.1", "dns": ["10.245.0.2"], "default": ["dns", "gateway"]}});
    // A call that logs its arguments (env included) at debug, and succeeds.
    let out = debug_call(
        &config,
        &request(
            "create_vm",
            json!(["agent-1", stemcell_cid, {}, networks, [], env()]),
        ),
    );
    assert_clean(&out, "create_vm");
    let vm = out.ok();
    assert!(
        out.stderr.contains("<redacted>"),
        "the debug log shows the arguments, scrubbed\n{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("visible-group"),
        "only secrets are scrubbed\n{}",
        out.describe()
    );

    // The same create_vm failing (the IP is taken now).
    let out = debug_call(
        &config,
        &request(
            "create_vm",
            json!(["agent-2", stemcell_cid, {}, networks, [], env()]),
        ),
    );
    assert_clean(&out, "create_vm failing");
    out.error("VMCreationFailed", "already used");

    // A failure whose message would echo a URL password: a cpi-config override of the
    // docker host on a docker config without TLS.
    let docker_config = write_json(
        dir.path(),
        "docker.json",
        &json!({"backend": "docker", "agent": {"mbus": MBUS}}),
    );
    let mut req = request("info", json!([]));
    req["context"]["host"] = json!(format!("tcp://admin:{CONTEXT_HOST_PASSWORD}@10.0.0.9:2376"));
    let out = debug_call(&docker_config, &req);
    assert_clean(&out, "override error");
    out.error("CloudError", "cpi-config overrides of: host");

    // The Docker backend selected, with TLS: the config's private key stays out of
    // the debug log (whether the backend accepts this made-up TLS material or not).
    let mut tls_config = docker_section();
    tls_config["host"] = json!("tcp://127.0.0.1:1");
    let docker_tls = write_json(
        dir.path(),
        "docker-tls.json",
        &json!({"backend": "docker", "agent": {"mbus": MBUS}, "docker": tls_config}),
    );
    let out = debug_call(&docker_tls, &request("info", json!([])));
    assert_clean(&out, "info with TLS");

    // A config error whose serde message echoes the offending value.
    let bad = write_json(
        dir.path(),
        "bad.json",
        &json!({"backend": "fake", "fake": {"state_file": dir.path().join("s.json")},
                "agent": {"mbus": MBUS, "ntp": format!("https://ntp:{NTP_PASSWORD}@pool.ntp.org")},
                "docker": docker_section()}),
    );
    let out = debug_call(&bad, &request("info", json!([])));
    assert_clean(&out, "config error");
    out.error("CloudError", "key 'agent.ntp' is invalid");

    // At the default level too, for a call that fails on the fake.
    let out = run_with(
        &[std::ffi::OsStr::new("-configPath"), config.as_os_str()],
        format!("{}\n", request("attach_disk", json!([vm[0], "vol-none"]))).as_bytes(),
        &[],
    );
    assert_clean(&out, "attach_disk");
    out.error("DiskNotFound", "vol-none");
}
