//! The BOSH release under `release/` and its bosh-deployment ops files.
//!
//! - The release has the layout `bosh create-release` reads (final.yml, blobs.yml,
//!   job specs naming templates and packages that exist, a package whose files glob
//!   matches the blob `scripts/release-blob.sh` adds).
//! - Every job template renders with Ruby's ERB through `release/test/render.rb`
//!   (which gives templates `p`, `if_p`, `spec` as BOSH does), for both backends and
//!   for the Go-compatible `docker_cpi` job; the rendered `bin/cpi` wrapper runs the
//!   real `cpi` binary (`CPI_BIN`) the way `bosh create-env` runs it, and `info`
//!   succeeds with the rendered `config/cpi.json`. The CPI rejects unknown keys, so a
//!   rendering with every property set proves each property lands on a real setting.
//! - Config validation: bad values render but the CPI refuses them as `CloudError`,
//!   and `cpi doctor` loads the rendered files (and reaches the daemons they name).
//! - The ops files are applied to the shape of bosh-deployment's `bosh.yml` (a small
//!   go-patch interpreter below), must only name jobs and properties that exist, and
//!   the properties they set render into configs the CPI accepts.
//! - The cloud-config example is valid YAML using only cloud properties the CPI reads.
//!
//! Needs `ruby` (installed by `scripts/lib.sh` `ensure_packages`). `release.rs` holds
//! the rendering and CPI helpers, `gopatch.rs` the ops-file interpreter,
//! `manifest.rs` the bosh.yml-with-ops checks.

mod gopatch;
mod manifest;
mod release;

use std::collections::BTreeSet;
use std::fs;
use std::net::Ipv4Addr;
use std::process::Command;

use cpi_tests::daemons::{require_containerd, require_docker, CONTAINERD_SOCKET, DOCKER_SOCKET};
use cpi_tests::{cpi_bin, workspace_root};
use serde_json::{json, Value};
use serde_yaml_ng::Value as Yaml;

use gopatch::{apply_ops, key, matches, variables};
use manifest::{
    bosh_deployment_dir, bosh_group, check_cpi_wiring, manifest_with, ops_dir, skeleton,
};
use release::{
    assert_info_ok, assert_info_refuses, doctor_findings, job_names, job_spec, read_yaml,
    release_dir, render, try_render, yaml_str, Rendered,
};

/// The release's `final_name` (config/final.yml).
const RELEASE_NAME: &str = "bosh-container-cpi";
const MBUS_NATS: &str = "nats://nats:nats-secret-0451@10.245.0.3:4222";
const TEST_PEM_CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBtest-ca\n-----END CERTIFICATE-----\n";
const TEST_PEM_CERT: &str =
    "-----BEGIN CERTIFICATE-----\nMIIBtest-client\n-----END CERTIFICATE-----\n";
const TEST_PEM_KEY: &str =
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEtest-key\n-----END RSA PRIVATE KEY-----\n";

// ---------------------------------------------------------------------------
// Sample properties
// ---------------------------------------------------------------------------

fn docker_sample() -> Value {
    json!({"container_cpi": {
        "backend": "docker",
        "log_level": "debug",
        "agent": {"mbus": MBUS_NATS, "ntp": ["time1.example.org", "time2.example.org"]},
        "docker": {"host": format!("unix://{DOCKER_SOCKET}")},
    }})
}

fn containerd_sample() -> Value {
    json!({"container_cpi": {
        "backend": "containerd",
        "agent": {"mbus": "https://mbus:mbus-secret-0451@0.0.0.0:6868"},
        "containerd": {"socket": CONTAINERD_SOCKET},
    }})
}

/// Every property of `container_cpi` set to a valid value that differs from the
/// default where one exists, split by the backend that reads it.
fn container_cpi_everything(backend: &str) -> Value {
    let common = json!({
        "backend": backend,
        "log_level": "info,backend_docker=debug",
        "host_ip": "10.254.50.4",
        "agent": {"mbus": MBUS_NATS, "ntp": ["time.example.org"],
                  "blobstore": {"provider": "s3", "options": {"bucket": "b"}}},
        "start_containers_with_systemd": true,
        "light_stemcell": {
            "require_image_verification": false,
            "disabled": true,
            "registry_auth": {"ghcr.io": {"username": "u", "password": "registry-secret-0451"}}
        },
        "mount_cgroupfs": false,
        "enable_lxcfs_support": true,
    });
    let mut all = common;
    if backend == "docker" {
        all["docker"] = json!({
            "host": "tcp://10.0.0.5:2376",
            "api_version": "1.41",
            "tls": {"ca": TEST_PEM_CA, "certificate": TEST_PEM_CERT, "private_key": TEST_PEM_KEY},
            "timeout_seconds": 33,
            "state_dir": "/var/vcap/data/container-cpi-docker",
            "attach_mode": "helper",
            "privileged": false,
            "stop_timeout_seconds": 7,
            "create_networks": false,
            "default_network": "bosh-dynamic",
            "helper_image": "busybox:1",
            "mount_host_modules": false,
        });
    } else {
        all["containerd"] = json!({
            "socket": "/run/other-containerd/containerd.sock",
            "namespace": "bosh-test",
            "snapshotter": "native",
            "runtime": "io.containerd.runc.v2",
            "state_dir": "/var/vcap/data/container-cpi-containerd",
            "cni_bin_dir": "/opt/cni/bin",
            "timeout_seconds": 44,
            "import_timeout_seconds": 600,
            "stop_grace_seconds": 5,
            "dynamic_subnet": "10.77.0.0/16",
            "labels": {"team": "ci"},
            "insecure_registries": ["127.0.0.1:5000"],
        });
    }
    json!({ "container_cpi": all })
}

/// The dotted paths of every leaf in `value` below `prefix`.
fn leaf_paths(prefix: &str, value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                leaf_paths(&format!("{prefix}.{k}"), v, out);
            }
        }
        _ => {
            out.insert(prefix.to_owned());
        }
    }
}

// ---------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------

#[test]
fn release_layout_is_what_bosh_create_release_reads() {
    let release = release_dir();
    let final_yml = read_yaml(&release.join("config/final.yml"));
    assert_eq!(yaml_str(&final_yml, "final_name"), Some(RELEASE_NAME));
    assert!(
        final_yml
            .get("blobstore")
            .and_then(|b| b.get("provider"))
            .is_some(),
        "config/final.yml needs a blobstore provider"
    );
    let blobs = read_yaml(&release.join("config/blobs.yml"));
    assert!(
        blobs.is_mapping(),
        "config/blobs.yml must be a mapping (`--- {{}}` when empty)"
    );
    for (path, entry) in blobs.as_mapping().into_iter().flatten() {
        assert!(
            entry.get("size").and_then(Yaml::as_u64).is_some() && entry.get("sha").is_some(),
            "blobs.yml entry {path:?} needs size and sha"
        );
    }

    let jobs = job_names();
    assert_eq!(
        jobs,
        ["container_cpi", "docker_cpi"],
        "jobs in release/jobs"
    );
    let mut used_packages = BTreeSet::new();
    for job in &jobs {
        let dir = release.join("jobs").join(job);
        let spec = job_spec(job);
        assert_eq!(
            &spec.name, job,
            "jobs/{job}/spec names the job after its directory"
        );
        assert!(dir.join("monit").is_file(), "jobs/{job}/monit is required");
        let mut on_disk: Vec<String> = fs::read_dir(dir.join("templates"))
            .expect("templates dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let listed: Vec<String> = spec.templates.keys().cloned().collect();
        assert_eq!(
            listed, on_disk,
            "jobs/{job}: templates in the spec vs on disk"
        );
        let destinations: BTreeSet<&str> = spec.templates.values().map(String::as_str).collect();
        for needed in ["bin/cpi", "config/cpi.json", "bin/pre-start"] {
            assert!(
                destinations.contains(needed),
                "jobs/{job} renders no {needed}"
            );
        }
        assert!(
            !spec.properties.is_empty(),
            "jobs/{job} declares no properties"
        );
        for (name, def) in &spec.properties {
            assert!(
                name.starts_with(&format!("{job}.")),
                "jobs/{job}: property {name} is not under the job's own prefix"
            );
            assert!(
                def.get("description").and_then(Yaml::as_str).is_some(),
                "jobs/{job}: property {name} has no description"
            );
        }
        used_packages.extend(spec.packages);
    }

    // Every file in release/ops is checked by a test below.
    let mut ops: Vec<String> = fs::read_dir(release.join("ops"))
        .expect("release/ops")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ops.sort();
    assert_eq!(
        ops,
        [
            "cloud-config.yml",
            "container-cpi-containerd.yml",
            "container-cpi-docker-unix-sock.yml",
            "container-cpi-docker.yml",
            "use-container-cpi-for-docker-cpi.yml",
        ],
        "release/ops: a new file needs a test in tests/tests/bosh_release/"
    );

    let mut packages: Vec<String> = fs::read_dir(release.join("packages"))
        .expect("packages")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    packages.sort();
    assert_eq!(
        used_packages.iter().cloned().collect::<Vec<_>>(),
        packages,
        "packages used by jobs vs release/packages"
    );
    for package in &packages {
        let dir = release.join("packages").join(package);
        let spec = read_yaml(&dir.join("spec"));
        assert_eq!(yaml_str(&spec, "name"), Some(package.as_str()));
        assert!(
            dir.join("packaging").is_file(),
            "packages/{package}/packaging"
        );
        let files: Vec<&str> = spec
            .get("files")
            .and_then(Yaml::as_sequence)
            .map(|s| s.iter().filter_map(Yaml::as_str).collect())
            .unwrap_or_default();
        // The blob scripts/release-blob.sh adds must match the package's files glob.
        let script = fs::read_to_string(workspace_root().join("scripts/release-blob.sh"))
            .expect("scripts/release-blob.sh");
        assert!(script.contains("blob_path=\"container-cpi/cpi-linux-${arch}\""));
        for blob in [
            "container-cpi/cpi-linux-amd64",
            "container-cpi/cpi-linux-arm64",
        ] {
            assert!(
                files.iter().any(|glob| glob_matches(glob, blob)),
                "packages/{package}/spec files {files:?} do not match the blob {blob}"
            );
        }
    }
}

/// BOSH package `files` globs: `*` within one path segment (enough for ours).
fn glob_matches(glob: &str, path: &str) -> bool {
    let g: Vec<&str> = glob.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    g.len() == p.len()
        && g.iter().zip(&p).all(|(g, p)| match g.split_once('*') {
            None => g == p,
            Some((pre, post)) => {
                p.len() >= pre.len() + post.len() && p.starts_with(pre) && p.ends_with(post)
            }
        })
}

#[test]
fn packaging_installs_the_blob_for_this_architecture() {
    // Run the package's packaging script as a compilation VM would: in a directory
    // holding the package's files, with BOSH_INSTALL_TARGET set, no network.
    let dir = tempfile::tempdir().expect("tempdir");
    let compile = dir.path().join("compile");
    let install = dir.path().join("install");
    fs::create_dir_all(compile.join("container-cpi")).expect("compile dir");
    fs::create_dir_all(&install).expect("install dir");
    // A link keeps the (large, debug) binary from being copied twice.
    std::os::unix::fs::symlink(cpi_bin(), compile.join("container-cpi/cpi-linux-amd64"))
        .expect("stage blob");
    let out = Command::new("bash")
        .arg("-e")
        .arg(release_dir().join("packages/container_cpi/packaging"))
        .current_dir(&compile)
        .env("BOSH_INSTALL_TARGET", &install)
        .env("BOSH_COMPILE_TARGET", &compile)
        .output()
        .expect("run packaging");
    let arch = std::env::consts::ARCH;
    if arch == "x86_64" {
        assert!(
            out.status.success(),
            "packaging failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let installed = install.join("bin/cpi");
        let version = Command::new(&installed)
            .arg("--version")
            .output()
            .expect("run installed cpi");
        assert!(
            String::from_utf8_lossy(&version.stdout).starts_with("cpi "),
            "installed {} does not answer --version",
            installed.display()
        );
    } else {
        // No amd64 machine: the script must refuse, naming what it has.
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("cpi-linux-amd64"));
    }
    // Without any blob it says what is missing instead of installing nothing.
    fs::remove_file(compile.join("container-cpi/cpi-linux-amd64")).expect("rm blob");
    let out = Command::new("bash")
        .arg(release_dir().join("packages/container_cpi/packaging"))
        .current_dir(&compile)
        .env("BOSH_INSTALL_TARGET", dir.path().join("install2"))
        .output()
        .expect("run packaging");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no prebuilt cpi"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// container_cpi: rendering and info, both backends
// ---------------------------------------------------------------------------

#[test]
fn container_cpi_docker_renders_and_answers_info() {
    let rendered = render("container_cpi", &docker_sample());
    let config = rendered.config();
    assert_eq!(config["backend"], "docker");
    assert_eq!(config["agent"]["mbus"], MBUS_NATS);
    assert_eq!(
        config["agent"]["ntp"],
        json!(["time1.example.org", "time2.example.org"])
    );
    assert_eq!(config["docker"]["host"], format!("unix://{DOCKER_SOCKET}"));
    assert!(
        config["docker"].get("tls").is_none(),
        "no TLS for a unix socket"
    );
    assert!(
        config.get("containerd").is_none(),
        "only the selected backend's section"
    );
    // Unset settings are left to the CPI's defaults.
    for key in [
        "api_version",
        "start_containers_with_systemd",
        "state_dir",
        "attach_mode",
    ] {
        assert!(
            config["docker"].get(key).is_none(),
            "docker.{key} rendered though unset"
        );
    }
    assert_eq!(config["docker"]["mount_cgroupfs"], true);
    assert_eq!(config["docker"]["enable_lxcfs_support"], false);
    assert_eq!(
        config["docker"]["light_stemcell"]["require_image_verification"],
        true
    );

    let wrapper = rendered.file("bin/cpi");
    assert!(wrapper.starts_with("#!/bin/bash\n"), "{wrapper}");
    assert!(wrapper.contains("export CPI_LOG='debug'"), "{wrapper}");
    assert!(
        wrapper.contains("\"${pkgs_dir}/container_cpi/bin/cpi\" -configPath \"${jobs_dir}/container_cpi/config/cpi.json\""),
        "{wrapper}"
    );
    let pre_start = rendered.file("bin/pre-start");
    assert!(
        pre_start.contains(&format!("chgrp vcap '{DOCKER_SOCKET}'")),
        "{pre_start}"
    );
    assert!(
        !pre_start.contains("ip addr add"),
        "no host_ip given: {pre_start}"
    );
    check_shell_syntax(&rendered);

    let log = assert_info_ok(&rendered);
    // The wrapper's CPI_LOG=debug took effect: the request's arguments are logged
    // at debug level only.
    assert!(
        log.contains("request arguments"),
        "no debug lines in the log: {log}"
    );
    assert!(
        !log.contains("nats-secret-0451"),
        "the mbus password leaked: {log}"
    );
}

#[test]
fn container_cpi_containerd_renders_and_answers_info() {
    let rendered = render("container_cpi", &containerd_sample());
    let config = rendered.config();
    assert_eq!(config["backend"], "containerd");
    assert_eq!(
        config["agent"]["mbus"],
        "https://mbus:mbus-secret-0451@0.0.0.0:6868"
    );
    assert_eq!(config["agent"]["ntp"], json!([]));
    assert_eq!(config["containerd"]["socket"], CONTAINERD_SOCKET);
    assert_eq!(config["containerd"]["require_image_verification"], true);
    assert!(
        config.get("docker").is_none(),
        "only the selected backend's section"
    );
    for key in ["namespace", "state_dir", "start_containers_with_systemd"] {
        assert!(
            config["containerd"].get(key).is_none(),
            "containerd.{key} rendered though unset"
        );
    }
    let wrapper = rendered.file("bin/cpi");
    assert!(
        wrapper.contains("export CPI_LOG='info'"),
        "default log level: {wrapper}"
    );
    let pre_start = rendered.file("bin/pre-start");
    assert!(
        !pre_start.contains("chgrp"),
        "no Docker socket to open: {pre_start}"
    );
    check_shell_syntax(&rendered);
    let log = assert_info_ok(&rendered);
    assert!(log.contains("backend=\"containerd\""), "{log}");
}

#[test]
fn every_container_cpi_property_reaches_a_real_setting() {
    let spec = job_spec("container_cpi");
    let mut covered = BTreeSet::new();
    for backend in ["docker", "containerd"] {
        let properties = container_cpi_everything(backend);
        leaf_paths("container_cpi", &properties["container_cpi"], &mut covered);
        let rendered = render("container_cpi", &properties);
        let config = rendered.config();
        let section = &config[backend];
        assert_eq!(section["start_containers_with_systemd"], true, "{backend}");
        if backend == "docker" {
            let d = &properties["container_cpi"]["docker"];
            for key in [
                "host",
                "api_version",
                "timeout_seconds",
                "state_dir",
                "attach_mode",
                "privileged",
                "stop_timeout_seconds",
                "create_networks",
                "default_network",
                "helper_image",
                "mount_host_modules",
            ] {
                assert_eq!(section[key], d[key], "docker.{key}");
            }
            assert_eq!(section["tls"]["private_key"], TEST_PEM_KEY);
            assert_eq!(section["mount_cgroupfs"], false);
            assert_eq!(section["enable_lxcfs_support"], true);
            assert_eq!(section["light_stemcell"]["disabled"], true);
            assert_eq!(
                section["light_stemcell"]["registry_auth"]["ghcr.io"]["username"],
                "u"
            );
        } else {
            let c = &properties["container_cpi"]["containerd"];
            for (key, value) in c.as_object().expect("containerd sample") {
                assert_eq!(&section[key], value, "containerd.{key}");
            }
            assert_eq!(section["require_image_verification"], false);
            assert_eq!(
                section["registry_auth"]["ghcr.io"]["password"],
                "registry-secret-0451"
            );
        }
        let pre_start = rendered.file("bin/pre-start");
        assert!(
            pre_start.contains("ip addr add '10.254.50.4' dev lo"),
            "{pre_start}"
        );
        check_shell_syntax(&rendered);
        // The CPI refuses unknown keys in every section: info succeeding means every
        // rendered key is one of its settings, with a value of the right type.
        let log = assert_info_ok(&rendered);
        assert!(
            !log.contains("registry-secret-0451"),
            "a password leaked: {log}"
        );
    }
    // Every declared property is exercised above (a new property must be added to
    // the sample, and so is checked against the CPI).
    let declared: BTreeSet<String> = spec.properties.keys().cloned().collect();
    let missing: Vec<&String> = declared
        .iter()
        .filter(|name| {
            !covered
                .iter()
                .any(|c| c == *name || c.starts_with(&format!("{name}.")))
        })
        .collect();
    assert!(missing.is_empty(), "properties not exercised: {missing:?}");
    let undeclared: Vec<&String> = covered
        .iter()
        .filter(|c| {
            !declared
                .iter()
                .any(|d| *c == d || c.starts_with(&format!("{d}.")))
        })
        .collect();
    assert!(
        undeclared.is_empty(),
        "sample sets undeclared properties: {undeclared:?}"
    );
}

#[test]
fn templates_refuse_what_bosh_would_refuse() {
    // A required property without a default: BOSH's "Can't find property".
    let err = try_render("container_cpi", &json!({"container_cpi": {}}))
        .err()
        .expect("rendering without agent.mbus must fail");
    assert!(
        err.contains("Can't find property '[\"container_cpi.agent.mbus\"]'"),
        "{err}"
    );
    // A value where the spec expects a hash of properties.
    let err = try_render("container_cpi", &json!({"container_cpi": {"agent": "x"}}))
        .err()
        .expect("agent given as a string must fail");
    assert!(
        err.contains("expects a hash, but received 'String'"),
        "{err}"
    );
    // A property set to null takes the spec's default, as in BOSH.
    let mut with_null = docker_sample();
    with_null["container_cpi"]["docker"]["host"] = Value::Null;
    with_null["container_cpi"]["agent"]["ntp"] = Value::Null;
    let rendered = render("container_cpi", &with_null);
    assert_eq!(
        rendered.config()["docker"]["host"],
        "unix:///var/run/docker.sock"
    );
    assert_eq!(rendered.config()["agent"]["ntp"], json!([]));
    // Properties the spec does not declare are invisible to templates.
    let mut undeclared = docker_sample();
    undeclared["container_cpi"]["docker"]["hots"] = json!("tcp://typo:1");
    let rendered = render("container_cpi", &undeclared);
    assert!(!rendered.file("config/cpi.json").contains("typo"));

    let mut bad_backend = docker_sample();
    bad_backend["container_cpi"]["backend"] = json!("podman");
    let err = try_render("container_cpi", &bad_backend)
        .err()
        .expect("podman");
    assert!(err.contains("must be docker or containerd"), "{err}");

    let mut tcp_without_tls = docker_sample();
    tcp_without_tls["container_cpi"]["docker"]["host"] = json!("tcp://10.0.0.5:2376");
    let err = try_render("container_cpi", &tcp_without_tls)
        .err()
        .expect("tls");
    assert!(
        err.contains("Can't find property '[\"container_cpi.docker.tls.ca\"]'"),
        "{err}"
    );

    let mut http_host = docker_sample();
    http_host["container_cpi"]["docker"]["host"] = json!("http://10.0.0.5:2375");
    let err = try_render("container_cpi", &http_host)
        .err()
        .expect("http host");
    assert!(
        err.contains("must be unix:///PATH or tcp://HOST:PORT"),
        "{err}"
    );

    let mut bad_level = docker_sample();
    bad_level["container_cpi"]["log_level"] = json!("info'; rm -rf /; '");
    let err = try_render("container_cpi", &bad_level)
        .err()
        .expect("log level");
    assert!(err.contains("container_cpi.log_level"), "{err}");

    let mut bad_ip = docker_sample();
    bad_ip["container_cpi"]["host_ip"] = json!("10.0.0.1; reboot");
    let err = try_render("container_cpi", &bad_ip).err().expect("host_ip");
    assert!(err.contains("not an IP address"), "{err}");

    let err = try_render(
        "docker_cpi",
        &json!({"docker_cpi": {"agent": {"mbus": MBUS_NATS}}}),
    )
    .err()
    .expect("docker_cpi without docker.host");
    assert!(
        err.contains("Can't find property '[\"docker_cpi.docker.host\"]'"),
        "{err}"
    );
}

#[test]
fn the_cpi_validates_what_the_templates_pass_through() {
    // Values the templates pass as given are checked by the CPI on every call
    // (info included), as CloudErrors naming the key.
    let mut relative_socket = containerd_sample();
    relative_socket["container_cpi"]["containerd"]["socket"] = json!("run/containerd.sock");
    assert_info_refuses(
        &render("container_cpi", &relative_socket),
        "containerd.socket",
    );

    let mut bad_version = docker_sample();
    bad_version["container_cpi"]["docker"]["api_version"] = json!("latest");
    assert_info_refuses(&render("container_cpi", &bad_version), "docker.api_version");

    let mut bad_mode = docker_sample();
    bad_mode["container_cpi"]["docker"]["attach_mode"] = json!("sideways");
    assert_info_refuses(&render("container_cpi", &bad_mode), "attach_mode");

    let mut bad_mbus = containerd_sample();
    bad_mbus["container_cpi"]["agent"]["mbus"] = json!("not-a-url");
    assert_info_refuses(&render("container_cpi", &bad_mbus), "agent.mbus");
}

#[test]
fn cpi_doctor_loads_the_rendered_configs_and_reaches_their_daemons() {
    require_docker();
    require_containerd();
    for (name, properties) in [
        ("docker", docker_sample()),
        ("containerd", containerd_sample()),
    ] {
        let rendered = render("container_cpi", &properties);
        let findings = doctor_findings(&rendered.config_path());
        for id in ["config", "daemon"] {
            let finding = findings
                .get(id)
                .unwrap_or_else(|| panic!("{name}: cpi doctor reported no '{id}' finding"));
            assert_eq!(
                finding["status"], "ok",
                "{name}: cpi doctor's {id} check on the rendered config: {finding}"
            );
        }
        assert!(
            findings["config"]["summary"]
                .as_str()
                .is_some_and(|s| s.contains(&format!("{name} backend"))),
            "{}",
            findings["config"]
        );
    }
}

// ---------------------------------------------------------------------------
// docker_cpi: the Go job's drop-in
// ---------------------------------------------------------------------------

/// The Go Docker CPI's docker_cpi job properties (cloudfoundry/bosh-docker-cpi-release
/// `jobs/docker_cpi/spec`, 2026-08) with their defaults (`None`: no default).
const GO_DOCKER_CPI_PROPERTIES: [(&str, Option<&str>); 12] = [
    ("docker_cpi.host_ip", None),
    ("docker_cpi.docker.host", None),
    ("docker_cpi.docker.api_version", Some("\"1.44\"")),
    ("docker_cpi.docker.tls", None),
    ("docker_cpi.agent.mbus", None),
    ("docker_cpi.agent.ntp", Some("[]")),
    ("docker_cpi.agent.blobstore.provider", Some("\"dav\"")),
    ("docker_cpi.agent.blobstore.options", Some("{}")),
    ("docker_cpi.start_containers_with_systemd", Some("false")),
    ("docker_cpi.mount_cgroupfs", Some("true")),
    ("docker_cpi.enable_lxcfs_support", Some("false")),
    (
        "docker_cpi.light_stemcell.require_image_verification",
        Some("true"),
    ),
];

#[test]
fn docker_cpi_job_matches_the_go_job_and_renders_its_file() {
    let spec = job_spec("docker_cpi");
    let names: BTreeSet<&str> = spec.properties.keys().map(String::as_str).collect();
    let go: BTreeSet<&str> = GO_DOCKER_CPI_PROPERTIES.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, go, "docker_cpi properties must be the Go job's");
    for (name, default) in GO_DOCKER_CPI_PROPERTIES {
        let ours = spec.properties[name].get("default").map(|d| {
            serde_json::to_string(&serde_json::to_value(d).expect("default as JSON")).expect("json")
        });
        assert_eq!(ours.as_deref(), default, "default of {name}");
    }
    assert_eq!(spec.packages, ["container_cpi"]);

    // As bosh-deployment's docker/cpi.yml sets them (tcp + TLS, blobstore nulled,
    // systemd on).
    let properties = json!({"docker_cpi": {
        "agent": {"mbus": MBUS_NATS, "blobstore": null},
        "docker": {"host": "tcp://10.0.0.5:2376",
                   "tls": {"ca": TEST_PEM_CA, "certificate": TEST_PEM_CERT, "private_key": TEST_PEM_KEY}},
        "start_containers_with_systemd": true,
    }});
    let rendered = render("docker_cpi", &properties);
    let config = rendered.config();
    assert_eq!(config["start_containers_with_systemd"], true);
    assert_eq!(config["mount_cgroupfs"], true);
    assert_eq!(config["enable_lxcfs_support"], false);
    assert_eq!(config["light_stemcell"]["require_image_verification"], true);
    assert_eq!(config["Actions"]["Docker"]["host"], "tcp://10.0.0.5:2376");
    assert_eq!(config["Actions"]["Docker"]["api_version"], "1.44");
    assert_eq!(config["Actions"]["Docker"]["tls"]["ca"], TEST_PEM_CA);
    assert_eq!(config["Actions"]["Agent"]["Mbus"], MBUS_NATS);
    assert_eq!(config["Actions"]["Agent"]["NTP"], json!([]));
    assert_eq!(config["Actions"]["Agent"]["Blobstore"]["Provider"], "dav");
    let wrapper = rendered.file("bin/cpi");
    assert!(
        wrapper.contains("\"${pkgs_dir}/container_cpi/bin/cpi\" -configPath \"${jobs_dir}/docker_cpi/config/cpi.json\""),
        "{wrapper}"
    );
    check_shell_syntax(&rendered);
    assert_info_ok(&rendered);

    // A unix socket: no TLS needed, and pre-start opens the socket to vcap's group.
    let unix = json!({"docker_cpi": {
        "host_ip": "10.254.50.4",
        "agent": {"mbus": MBUS_NATS},
        "docker": {"host": format!("unix://{DOCKER_SOCKET}")},
    }});
    let rendered = render("docker_cpi", &unix);
    assert!(rendered.config()["Actions"]["Docker"].get("tls").is_none());
    let pre_start = rendered.file("bin/pre-start");
    assert!(
        pre_start.contains("ip addr add '10.254.50.4' dev lo"),
        "{pre_start}"
    );
    assert!(
        pre_start.contains(&format!("chmod g+rw '{DOCKER_SOCKET}'")),
        "{pre_start}"
    );
    check_shell_syntax(&rendered);
    assert_info_ok(&rendered);
}

fn check_shell_syntax(rendered: &Rendered) {
    for script in ["bin/cpi", "bin/pre-start"] {
        let path = rendered.job_dir().join(script);
        let out = Command::new("bash")
            .arg("-n")
            .arg(&path)
            .output()
            .expect("bash -n");
        assert!(
            out.status.success(),
            "rendered {script} is not valid bash: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            rendered.file(script)
        );
    }
}

// ---------------------------------------------------------------------------
// Ops files
// ---------------------------------------------------------------------------

#[test]
fn docker_ops_file_wires_container_cpi_into_bosh_yml() {
    let ops = ops_dir().join("container-cpi-docker.yml");
    let manifest = manifest_with(&[&ops], "tcp://10.0.0.5:2376");
    let (director, create_env) = check_cpi_wiring(&manifest, "container-cpi-docker.yml");
    let stemcell = &manifest["resource_pools"][0]["stemcell"];
    assert!(
        yaml_str(stemcell, "url").is_some_and(|u| u.ends_with(".tgz")),
        "{stemcell:?}"
    );
    assert!(yaml_str(stemcell, "sha1").is_some(), "{stemcell:?}");
    assert_eq!(
        manifest["networks"][0]["subnets"][0]["cloud_properties"]["name"],
        key("bosh-test-net")
    );
    let ports = manifest["resource_pools"][0]["cloud_properties"]["ports"]
        .as_sequence()
        .expect("ports");
    assert!(ports.contains(&key("6868/tcp")) && ports.contains(&key("25555/tcp")));

    let d = director.config();
    assert_eq!(d["backend"], "docker");
    assert_eq!(d["agent"]["mbus"], "nats://10.245.0.11:4222");
    assert_eq!(d["docker"]["host"], "tcp://10.0.0.5:2376");
    assert_eq!(d["docker"]["tls"]["certificate"], TEST_PEM_CERT);
    assert_info_ok(&director);
    let c = create_env.config();
    assert_eq!(
        c["agent"]["mbus"],
        "https://mbus:mbus-secret-0451@0.0.0.0:6868"
    );
    assert_info_ok(&create_env);

    // With the local socket, docker_tls is not rendered and the CPI needs none.
    let manifest = manifest_with(&[&ops], &format!("unix://{DOCKER_SOCKET}"));
    let (director, create_env) = check_cpi_wiring(&manifest, "container-cpi-docker.yml");
    assert!(director.config()["docker"].get("tls").is_none());
    assert_info_ok(&director);
    assert_info_ok(&create_env);
}

#[test]
fn unix_socket_ops_file_moves_the_director_to_the_socket() {
    let manifest = manifest_with(
        &[
            &ops_dir().join("container-cpi-docker.yml"),
            &ops_dir().join("container-cpi-docker-unix-sock.yml"),
        ],
        &format!("unix://{DOCKER_SOCKET}"),
    );
    let (director, create_env) = check_cpi_wiring(&manifest, "container-cpi-docker-unix-sock.yml");
    let mounts = manifest["resource_pools"][0]["cloud_properties"]["Mounts"]
        .as_sequence()
        .expect("Mounts");
    assert_eq!(mounts.len(), 1);
    // Docker's own field names: the CPI decodes HostConfig.Mounts entries with them.
    assert_eq!(mounts[0]["Type"], key("bind"));
    assert_eq!(mounts[0]["Source"], key(&format!("unix://{DOCKER_SOCKET}")));
    assert_eq!(mounts[0]["Target"], key("/var/run/docker.sock"));
    let volumes = &bosh_group(&manifest)["properties"]["director"]["cpi_additional_volumes"];
    assert_eq!(volumes[0]["path"], key("/var/run/docker.sock"));
    for rendered in [&director, &create_env] {
        let config = rendered.config();
        assert!(config["docker"].get("tls").is_none(), "{config}");
        assert!(
            !rendered.file("config/cpi.json").contains("BEGIN"),
            "TLS material left"
        );
        assert_info_ok(rendered);
    }
    assert_eq!(
        director.config()["docker"]["host"],
        "unix:///var/run/docker.sock"
    );
    assert!(director
        .file("bin/pre-start")
        .contains("chgrp vcap '/var/run/docker.sock'"));
}

#[test]
fn containerd_ops_file_wires_container_cpi_into_bosh_yml() {
    let ops = ops_dir().join("container-cpi-containerd.yml");
    let manifest = manifest_with(&[&ops], "unused");
    let (director, create_env) = check_cpi_wiring(&manifest, "container-cpi-containerd.yml");
    for rendered in [&director, &create_env] {
        let config = rendered.config();
        assert_eq!(config["backend"], "containerd");
        assert!(config.get("docker").is_none());
        assert_info_ok(rendered);
    }
    assert_eq!(
        director.config()["agent"]["mbus"],
        "nats://10.245.0.11:4222"
    );
    assert_eq!(
        create_env.config()["agent"]["mbus"],
        "https://mbus:mbus-secret-0451@0.0.0.0:6868"
    );
}

#[test]
fn compat_ops_file_switches_a_go_docker_cpi_manifest_by_release_only() {
    // First the shape bosh-deployment's docker/cpi.yml gives bosh.yml, then ours.
    let go_shape = match bosh_deployment_dir() {
        Some(dir) => dir.join("docker/cpi.yml"),
        None => release_dir().join("test/fixtures/go-docker-cpi-ops.yml"),
    };
    let compat = ops_dir().join("use-container-cpi-for-docker-cpi.yml");
    let before = manifest_with(&[&go_shape], "tcp://10.0.0.5:2376");
    let after = manifest_with(&[&go_shape, &compat], "tcp://10.0.0.5:2376");
    let (director, create_env) = check_cpi_wiring(&after, "use-container-cpi-for-docker-cpi.yml");
    assert!(
        !after["releases"]
            .as_sequence()
            .expect("releases")
            .iter()
            .any(|r| matches(r, "name", "bosh-docker-cpi")),
        "the Go release is still listed"
    );
    // Nothing but the release changed: same job name, same properties.
    assert_eq!(
        bosh_group(&before)["properties"]["docker_cpi"],
        bosh_group(&after)["properties"]["docker_cpi"]
    );
    assert_eq!(
        before["cloud_provider"]["properties"],
        after["cloud_provider"]["properties"]
    );
    assert_eq!(
        director.config()["Actions"]["Docker"]["host"],
        "tcp://10.0.0.5:2376"
    );
    assert_eq!(director.config()["start_containers_with_systemd"], true);
    assert_info_ok(&director);
    assert_info_ok(&create_env);
}

#[test]
fn ops_interpreter_rejects_paths_bosh_yml_does_not_have() {
    // The checks above are only as good as the interpreter: a path into a part of
    // bosh.yml that does not exist must fail, an optional one must be created.
    let mut doc = skeleton();
    let bad: Yaml = serde_yaml_ng::from_str(
        "- {type: replace, path: /instance_groups/name=director/jobs/-, value: {name: x}}",
    )
    .expect("yaml");
    let err = apply_ops(&mut doc, &bad, "bad.yml").expect_err("no such group");
    assert!(err.contains("element name=director not found"), "{err}");
    let bad: Yaml = serde_yaml_ng::from_str(
        "- {type: replace, path: /resource_pools/name=vms/cloud_properties/ports, value: []}",
    )
    .expect("yaml");
    assert!(
        apply_ops(&mut doc, &bad, "bad.yml").is_err(),
        "non-optional missing key"
    );
    let good: Yaml = serde_yaml_ng::from_str(
        "- {type: replace, path: /instance_groups/name=bosh/properties/x?/y/z, value: 1}\n\
         - {type: remove, path: /releases/name=bpm}",
    )
    .expect("yaml");
    apply_ops(&mut doc, &good, "good.yml").expect("optional path");
    assert_eq!(bosh_group(&doc)["properties"]["x"]["y"]["z"], Yaml::from(1));
    assert_eq!(doc["releases"].as_sequence().map(Vec::len), Some(1));
}

// ---------------------------------------------------------------------------
// Cloud config
// ---------------------------------------------------------------------------

/// VM cloud properties the CPI reads on both backends (docs/backend-*.md); Docker
/// also passes any `HostConfig` field through, which the example does not use.
const VM_CLOUD_PROPERTIES: [&str; 9] = [
    "cpu",
    "ram",
    "ephemeral_disk",
    "pids",
    "ports",
    "force_start_with_systemd",
    "force_start_without_systemd",
    "force_lxcfs_enabled",
    "force_lxcfs_disabled",
];
/// Network cloud properties: Docker's `name`, `driver`, `enable_ipv6`; containerd's
/// `subnet` (dynamic networks).
const NETWORK_CLOUD_PROPERTIES: [&str; 4] = ["name", "driver", "enable_ipv6", "subnet"];

fn v4_cidr_contains(cidr: &str, ip: Ipv4Addr) -> bool {
    let Some((net, len)) = cidr.split_once('/') else {
        return false;
    };
    let (Ok(net), Ok(len)) = (net.parse::<Ipv4Addr>(), len.parse::<u32>()) else {
        return false;
    };
    let mask = u32::MAX.checked_shl(32 - len.min(32)).unwrap_or(0);
    len <= 32 && u32::from(net) & mask == u32::from(ip) & mask
}

#[test]
fn cloud_config_example_uses_only_what_the_cpi_reads() {
    let path = ops_dir().join("cloud-config.yml");
    let cc = read_yaml(&path);
    let names = |section: &str| -> BTreeSet<String> {
        cc[section]
            .as_sequence()
            .unwrap_or_else(|| panic!("cloud-config: {section} is not a list"))
            .iter()
            .map(|i| yaml_str(i, "name").expect("name").to_owned())
            .collect()
    };
    let azs = names("azs");
    let vm_types = names("vm_types");
    let networks = names("networks");
    assert!(!names("disk_types").is_empty());
    let check_keys = |what: &str, props: Option<&Yaml>, allowed: &[&str]| {
        for (k, _) in props.and_then(Yaml::as_mapping).into_iter().flatten() {
            let k = k.as_str().unwrap_or_default();
            assert!(
                allowed.contains(&k),
                "cloud-config {what}: unknown cloud property {k}"
            );
        }
    };
    for section in ["vm_types", "vm_extensions"] {
        for item in cc[section].as_sequence().expect(section) {
            check_keys(section, item.get("cloud_properties"), &VM_CLOUD_PROPERTIES);
        }
    }
    let mut vars = BTreeSet::new();
    variables(&cc, &mut vars);
    assert_eq!(
        vars,
        BTreeSet::from(["network".to_owned()]),
        "cloud-config variables"
    );
    for net in cc["networks"].as_sequence().expect("networks") {
        for subnet in net["subnets"].as_sequence().expect("subnets") {
            let range = yaml_str(subnet, "range").expect("range");
            let gw: Ipv4Addr = yaml_str(subnet, "gateway")
                .expect("gateway")
                .parse()
                .expect("gateway is an IPv4 address");
            assert!(v4_cidr_contains(range, gw), "gateway {gw} outside {range}");
            for az in subnet["azs"].as_sequence().expect("azs") {
                assert!(
                    azs.contains(az.as_str().unwrap_or_default()),
                    "unknown az {az:?}"
                );
            }
            check_keys(
                "networks",
                subnet.get("cloud_properties"),
                &NETWORK_CLOUD_PROPERTIES,
            );
        }
    }
    let compilation = &cc["compilation"];
    assert!(azs.contains(yaml_str(compilation, "az").expect("az")));
    assert!(vm_types.contains(yaml_str(compilation, "vm_type").expect("vm_type")));
    assert!(networks.contains(yaml_str(compilation, "network").expect("network")));
}
