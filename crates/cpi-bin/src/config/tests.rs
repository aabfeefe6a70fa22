//! Unit tests of config loading, validation and overrides.

use super::*;
use cpi_core::ErrorKind;
use serde_json::json;

const PATH: &str = "/etc/cpi/cpi.json";
const MBUS: &str = "https://mbus:mbus-pw@0.0.0.0:6868";

/// The Go Docker CPI's file as contract §6 shows it (with real-looking values).
fn go_contract_file() -> Value {
    json!({"start_containers_with_systemd": false, "mount_cgroupfs": true, "enable_lxcfs_support": false,
        "light_stemcell": {"require_image_verification": true},
        "Actions": {"Docker": {"host": "unix:///var/run/docker.sock", "api_version": "1.44",
                               "tls": {"ca": "CA-PEM", "certificate": "CERT-PEM", "private_key": "KEY-PEM"}},
                    "Agent": {"Mbus": "nats://nats:nats-pw@10.0.0.6:4222", "NTP": [], "Blobstore": {"Provider": "dav", "Options": {}}}}})
}

fn load(value: Value) -> Result<Config, CpiError> {
    Config::from_file(&ConfigFile {
        path: PathBuf::from(PATH),
        value,
    })
}

fn load_ok(value: Value) -> Config {
    load(value).unwrap_or_else(|e| panic!("config should load: {e}"))
}

/// Asserts a CloudError naming the file and containing every needle.
fn load_err(value: Value, needles: &[&str]) -> String {
    let err = load(value).expect_err("config should be refused");
    assert_eq!(err.kind, ErrorKind::CloudError, "{err}");
    assert!(
        err.message.contains(PATH),
        "names the file: {}",
        err.message
    );
    for needle in needles {
        assert!(
            err.message.contains(needle),
            "want {needle:?} in\n{}",
            err.message
        );
    }
    err.message
}

fn docker(config: &Config, overrides: Value) -> DockerConfig {
    match config
        .backend_config(overrides.as_object().expect("object"))
        .unwrap_or_else(|e| panic!("{e}"))
    {
        BackendConfig::Docker(c) => *c,
        other => panic!("not docker: {other:?}"),
    }
}

fn ours_docker() -> Value {
    json!({"backend": "docker", "agent": {"mbus": MBUS, "ntp": ["time.example"]}, "docker": {"host": "unix:///var/run/docker.sock"}})
}

#[test]
fn our_minimal_docker_config() {
    let config = load_ok(json!({"backend": "docker", "agent": {"mbus": MBUS}}));
    assert_eq!(config.format, Format::Ours);
    assert_eq!(config.backend, BackendKind::Docker);
    assert_eq!(config.agent.mbus, MBUS);
    assert!(config.agent.ntp.is_empty());
    assert_eq!(docker(&config, json!({})), DockerConfig::default());
}

#[test]
fn our_full_docker_config() {
    let config = load_ok(
        json!({"backend": "docker", "agent": {"mbus": MBUS, "ntp": ["a", "b"]},
        "docker": {"host": "tcp://10.0.0.5:2376", "api_version": "1.41",
                   "tls": {"ca": "CA", "certificate": "CERT", "private_key": "KEY"},
                   "start_containers_with_systemd": true,
                   "light_stemcell": {"require_image_verification": false}}}),
    );
    assert_eq!(config.agent.ntp, vec!["a".to_owned(), "b".to_owned()]);
    let d = docker(&config, json!({}));
    assert_eq!(d.host, "tcp://10.0.0.5:2376");
    assert_eq!(d.api_version.as_deref(), Some("1.41"));
    assert_eq!(d.tls.as_ref().map(|t| t.private_key.as_str()), Some("KEY"));
    assert_eq!(d.start_containers_with_systemd, Some(true));
    assert!(!d.light_stemcell.require_image_verification);
}

#[test]
fn containerd_and_fake_configs() {
    let config = load_ok(json!({"backend": "containerd", "agent": {"mbus": MBUS},
        "containerd": {"socket": "/run/containerd/containerd.sock", "namespace": "bosh-test"}}));
    match config.backend_config(&Map::new()).expect("containerd") {
        BackendConfig::Containerd(c) => assert_eq!(c.namespace, "bosh-test"),
        other => panic!("{other:?}"),
    }
    // The fake needs no mbus; a relative state file is relative to the config file.
    let config = load_ok(json!({"backend": "fake", "fake": {"state_file": "state.json"}}));
    assert_eq!(config.agent.mbus, "");
    assert_eq!(
        config.backend_config(&Map::new()).expect("fake"),
        BackendConfig::Fake(FakeConfig {
            state_file: PathBuf::from("/etc/cpi/state.json")
        })
    );
}

#[test]
fn unknown_keys_are_errors_naming_file_key_and_fix() {
    let mut v = ours_docker();
    v["agnet"] = json!({});
    v["agent"]["mbsu"] = json!("x");
    let msg = load_err(
        v,
        &[
            "unknown keys",
            "'agent.mbsu'",
            "'agnet'",
            "remove them or correct the spelling",
        ],
    );
    assert!(msg.contains("valid keys there: mbus, ntp"), "{msg}");
    assert!(
        msg.contains("valid keys there: backend, agent, docker, containerd, fake"),
        "{msg}"
    );

    let mut v = ours_docker();
    v["fake"] = json!({"state_file": "/tmp/x", "statefile": "/tmp/y"});
    load_err(
        v,
        &[
            "unknown key 'fake.statefile'",
            "valid keys there: state_file",
        ],
    );
}

#[test]
fn unknown_keys_in_backend_sections_name_the_section() {
    let mut v = ours_docker();
    v["docker"]["hots"] = json!("unix:///x");
    load_err(
        v,
        &[
            "key 'docker.hots' is not a setting here",
            "unknown field `hots`",
            "`host`",
            "remove it",
        ],
    );

    // Every section present is validated, not only the selected one.
    let mut v = ours_docker();
    v["containerd"] = json!({"sokcet": "/x"});
    load_err(v, &["key 'containerd.sokcet' is not a setting here"]);

    let mut v = ours_docker();
    v["docker"]["tls"] = json!({"ca": "a", "certificate": "b", "private_key": "c", "key": "d"});
    load_err(v, &["key 'docker.tls.key' is not a setting here"]);
}

#[test]
fn wrong_types_name_the_key() {
    let mut v = ours_docker();
    v["docker"]["host"] = json!(5);
    load_err(v, &["key 'docker.host' is invalid", "expected a string"]);
    let mut v = ours_docker();
    v["agent"]["ntp"] = json!("pool.ntp.org");
    load_err(v, &["key 'agent.ntp' is invalid", "expected a sequence"]);
    let mut v = ours_docker();
    v["docker"]["tls"] = json!({"ca": "a"});
    load_err(
        v,
        &["key 'docker.tls' is invalid", "missing field `certificate`"],
    );
}

#[test]
fn backend_must_be_given_and_known() {
    load_err(
        json!({"agent": {"mbus": MBUS}}),
        &[
            "key 'backend' is missing",
            "\"docker\", \"containerd\" or \"fake\"",
        ],
    );
    load_err(
        json!({"backend": "podman", "agent": {"mbus": MBUS}}),
        &[
            "key 'backend' is invalid",
            "unknown variant `podman`",
            "`docker`",
        ],
    );
}

#[test]
fn mbus_is_required_for_real_backends_and_never_echoed() {
    for backend in ["docker", "containerd"] {
        load_err(
            json!({"backend": backend}),
            &[
                "key 'agent.mbus' is missing",
                backend,
                "mbus URL with its user and password",
            ],
        );
        load_err(
            json!({"backend": backend, "agent": {"mbus": ""}}),
            &["key 'agent.mbus' is missing"],
        );
    }
    let msg = load_err(
        json!({"backend": "docker", "agent": {"mbus": "not-a-url-s3cret"}}),
        &["key 'agent.mbus' is not a URL"],
    );
    assert!(!msg.contains("s3cret"), "{msg}");
}

#[test]
fn docker_host_and_tls_rules() {
    let with_docker = |d: Value| {
        let mut v = ours_docker();
        v["docker"] = d;
        v
    };
    load_err(
        with_docker(json!({"host": ""})),
        &["key 'docker.host' is empty", "unix:///var/run/docker.sock"],
    );
    load_err(
        with_docker(json!({"host": "unix://docker.sock"})),
        &["key 'docker.host'", "absolute socket path"],
    );
    load_err(
        with_docker(json!({"host": "ssh://me@box"})),
        &["key 'docker.host'", "unix:///PATH", "tcp://HOST:PORT"],
    );
    load_err(
        with_docker(json!({"host": "tcp://10.0.0.5:2376"})),
        &["key 'docker.tls' is missing", "tcp://", "\"ca\""],
    );
    load_err(
        with_docker(
            json!({"host": "tcp://10.0.0.5:2376", "tls": {"ca": "a", "certificate": " ", "private_key": "c"}}),
        ),
        &["key 'docker.tls.certificate' is empty", "PEM"],
    );
    load_err(
        with_docker(json!({"api_version": "v1.44"})),
        &["key 'docker.api_version'", "\"1.44\"", "remove it"],
    );
    // An empty api_version means "negotiate".
    let config = load_ok(with_docker(json!({"api_version": ""})));
    assert_eq!(docker(&config, json!({})).api_version, None);
}

#[test]
fn containerd_rules() {
    let with =
        |c: Value| json!({"backend": "containerd", "agent": {"mbus": MBUS}, "containerd": c});
    load_err(
        with(json!({"socket": "containerd.sock"})),
        &["key 'containerd.socket'", "absolute path"],
    );
    load_err(
        with(json!({"namespace": ""})),
        &["key 'containerd.namespace' is empty"],
    );
}

#[test]
fn fake_needs_a_state_file() {
    load_err(
        json!({"backend": "fake"}),
        &["key 'fake.state_file' is missing", "/tmp/"],
    );
    load_err(
        json!({"backend": "fake", "fake": {"state_file": ""}}),
        &["key 'fake.state_file' is missing"],
    );
}

#[test]
fn go_config_from_the_contract_means_docker() {
    let config = load_ok(go_contract_file());
    assert_eq!(config.format, Format::GoDocker);
    assert_eq!(config.backend, BackendKind::Docker);
    assert_eq!(config.agent.mbus, "nats://nats:nats-pw@10.0.0.6:4222");
    assert!(config.agent.ntp.is_empty());
    let d = docker(&config, json!({}));
    assert_eq!(d.host, "unix:///var/run/docker.sock");
    // Kept as a preference; the backend negotiates.
    assert_eq!(d.api_version.as_deref(), Some("1.44"));
    // false meant "never systemd" in Go; we pick by stemcell.
    assert_eq!(d.start_containers_with_systemd, None);
    assert!(d.mount_cgroupfs);
    assert!(!d.enable_lxcfs_support);
    assert!(d.light_stemcell.require_image_verification);
    let tls = d.tls.expect("tls mapped");
    assert_eq!(
        (
            tls.ca.as_str(),
            tls.certificate.as_str(),
            tls.private_key.as_str()
        ),
        ("CA-PEM", "CERT-PEM", "KEY-PEM")
    );
}

#[test]
fn go_config_variants() {
    let mut v = go_contract_file();
    v["start_containers_with_systemd"] = json!(true);
    v["light_stemcell"] = json!({"Require_Image_Verification": false});
    v["Actions"]["Docker"] = json!({"Host": "tcp://10.0.0.5:2376", "API_VERSION": "1.41",
        "TLS": {"CA": "a", "Certificate": "b", "PRIVATE_KEY": "c"}});
    v["Actions"]["Agent"] = json!({"mbus": MBUS, "ntp": ["pool.ntp.org"]});
    let config = load_ok(v);
    assert_eq!(config.agent.ntp, vec!["pool.ntp.org".to_owned()]);
    let d = docker(&config, json!({}));
    assert_eq!(d.start_containers_with_systemd, Some(true));
    assert!(!d.light_stemcell.require_image_verification);
    assert_eq!(d.host, "tcp://10.0.0.5:2376");
    assert_eq!(d.api_version.as_deref(), Some("1.41"));
    assert_eq!(d.tls.map(|t| t.private_key), Some("c".to_owned()));

    // Detected by `Actions` in any casing.
    let mut v = go_contract_file();
    let actions = v
        .as_object_mut()
        .and_then(|o| o.remove("Actions"))
        .expect("actions");
    v["actions"] = actions;
    assert_eq!(load_ok(v).format, Format::GoDocker);
}

#[test]
fn go_config_errors_use_go_key_names() {
    let mut v = go_contract_file();
    v["Actions"]["Docker"]["hots"] = json!("x");
    v["host_ip"] = json!("10.0.0.1");
    load_err(
        v,
        &[
            "Go Docker CPI's cpi.json format",
            "unknown keys",
            "'Actions.Docker.hots'",
            "'host_ip'",
            "valid keys there: host,",
        ],
    );

    let mut v = go_contract_file();
    v["Actions"]["Agent"] = json!({"NTP": []});
    load_err(v, &["key 'Actions.Agent.Mbus' is missing"]);

    let mut v = go_contract_file();
    v["Actions"]["Docker"] = json!({"Host": 5});
    load_err(
        v,
        &["key 'Actions.Docker.Host' is invalid", "expected a string"],
    );

    let mut v = go_contract_file();
    v["Actions"]["Docker"]["TLS"] = json!({"CA": "a"});
    if let Some(d) = v["Actions"]["Docker"].as_object_mut() {
        d.remove("tls");
    }
    load_err(
        v,
        &[
            "key 'Actions.Docker.TLS' is invalid",
            "missing field `certificate`",
        ],
    );

    let mut v = go_contract_file();
    v["Actions"]["Docker"]["host"] = json!("tcp://10.0.0.5:2376");
    if let Some(d) = v["Actions"]["Docker"].as_object_mut() {
        d.remove("tls");
    }
    load_err(v, &["key 'Actions.Docker.tls' is missing", "mutual TLS"]);

    let mut v = go_contract_file();
    v["mount_cgroupfs"] = json!("yes");
    load_err(
        v,
        &["key 'mount_cgroupfs' is invalid", "expected a boolean"],
    );

    let mut v = go_contract_file();
    v["Actions"] = json!([]);
    load_err(v, &["key 'Actions' must be an object"]);
}

#[test]
fn context_overrides_replace_settings_case_insensitively() {
    let config = load_ok(ours_docker());
    let d = docker(
        &config,
        json!({"Host": "tcp://10.0.0.9:2376", "TLS": {"ca": "a", "certificate": "b", "private_key": "c"}, "api_version": "1.43", "datacenters": [1]}),
    );
    assert_eq!(d.host, "tcp://10.0.0.9:2376");
    assert_eq!(d.api_version.as_deref(), Some("1.43"));
    assert_eq!(d.tls.map(|t| t.ca), Some("a".to_owned()));

    // The same on a Go file.
    let config = load_ok(go_contract_file());
    let d = docker(&config, json!({"host": "unix:///run/other.sock"}));
    assert_eq!(d.host, "unix:///run/other.sock");
    assert!(d.tls.is_some(), "the file's tls is kept");

    // null restores the default.
    let d = docker(&config, json!({"TLS": null, "host": null}));
    assert_eq!(d.host, DockerConfig::default().host);
    assert_eq!(d.tls, None);

    // Any key of the selected backend's section, for every backend.
    let config = load_ok(json!({"backend": "fake", "fake": {"state_file": "/tmp/a.json"}}));
    assert_eq!(
        config
            .backend_config(
                json!({"STATE_FILE": "/tmp/b.json"})
                    .as_object()
                    .expect("obj")
            )
            .expect("fake"),
        BackendConfig::Fake(FakeConfig {
            state_file: "/tmp/b.json".into()
        })
    );
}

#[test]
fn invalid_overrides_blame_the_context() {
    let config = load_ok(ours_docker());
    let err = config
        .backend_config(
            json!({"host": "tcp://10.0.0.9:2376"})
                .as_object()
                .expect("obj"),
        )
        .expect_err("tcp without tls");
    assert_eq!(err.kind, ErrorKind::CloudError);
    // The missing key is tls, but host came from the context: both are said.
    assert!(err.message.contains(PATH), "{}", err.message);
    assert!(
        err.message.contains("key 'docker.tls' is missing"),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("cpi-config overrides of: host"),
        "{}",
        err.message
    );
    let err = config
        .backend_config(json!({"Host": 42}).as_object().expect("obj"))
        .expect_err("wrong type");
    assert!(
        err.message.contains("request context key 'Host'"),
        "{}",
        err.message
    );
    assert!(err.message.contains("cpi-config"), "{}", err.message);
    assert!(err.message.contains("docker.host"), "{}", err.message);
}

#[test]
fn reading_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.json");
    let err = ConfigFile::read(&missing).expect_err("missing");
    assert_eq!(err.kind, ErrorKind::CloudError);
    assert!(
        err.message.contains(&missing.display().to_string()),
        "{}",
        err.message
    );
    assert!(err.message.contains("-configPath"), "{}", err.message);

    let err = ConfigFile::read(dir.path()).expect_err("dir");
    assert!(err.message.contains("is a directory"), "{}", err.message);

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"backend\": ").expect("write");
    let err = ConfigFile::read(&bad).expect_err("bad json");
    assert!(err.message.contains("is not valid JSON"), "{}", err.message);

    let huge = dir.path().join("huge.json");
    std::fs::write(&huge, vec![b' '; MAX_CONFIG_BYTES as usize + 1]).expect("write");
    let err = ConfigFile::read(&huge).expect_err("huge");
    assert!(err.message.contains("larger than"), "{}", err.message);

    let list = dir.path().join("list.json");
    std::fs::write(&list, "[1]").expect("write");
    let file = ConfigFile::read(&list).expect("json");
    let err = Config::from_file(&file).expect_err("not an object");
    assert!(
        err.message.contains("must hold a JSON object"),
        "{}",
        err.message
    );
}

#[test]
fn the_example_files_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/examples");
    for (name, backend, format) in [
        ("sample-config.json", BackendKind::Docker, Format::Ours),
        (
            "containerd-config.json",
            BackendKind::Containerd,
            Format::Ours,
        ),
        ("fake-config.json", BackendKind::Fake, Format::Ours),
        ("go-docker-cpi.json", BackendKind::Docker, Format::GoDocker),
    ] {
        let file = ConfigFile::read(&root.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let config = Config::from_file(&file).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((config.backend, config.format), (backend, format), "{name}");
        config
            .backend_config(&Map::new())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// The configuration reference must name every setting the backends accept, so that
/// a new backend setting cannot go undocumented.
#[test]
fn the_reference_documents_every_setting() {
    let doc = include_str!("../../../../docs/configuration.md");
    let sections = [
        ("docker", struct_fields::<DockerConfig>()),
        (
            "docker.tls",
            struct_fields::<backend_docker::config::TlsConfig>(),
        ),
        (
            "docker.light_stemcell",
            struct_fields::<backend_docker::config::LightStemcellConfig>(),
        ),
        ("containerd", struct_fields::<ContainerdConfig>()),
        ("agent", struct_fields::<AgentSection>()),
        ("fake", struct_fields::<FakeSection>()),
    ];
    for (section, fields) in sections {
        assert!(!fields.is_empty(), "{section}");
        for field in fields {
            let key = format!("`{section}.{field}`");
            assert!(
                doc.contains(&key),
                "docs/configuration.md does not document {key}: add it to the reference"
            );
        }
    }
}
