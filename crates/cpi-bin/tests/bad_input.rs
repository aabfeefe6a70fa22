//! Malformed requests, oversized input and broken configs: every one answers exactly
//! one JSON line with the right error type and a clear message, and exits 0.

mod common;

use std::ffi::OsStr;

use serde_json::json;

use common::{call, fake_config, request, run, run_with, write_json, MBUS};

fn with_fake<T>(f: impl FnOnce(&std::path::Path) -> T) -> T {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = fake_config(dir.path());
    f(&config)
}

#[test]
fn malformed_envelopes_are_cpi_errors() {
    with_fake(|config| {
        for (input, needle) in [
            (
                &b""[..],
                "Must provide valid JSON payload: the request on stdin was empty",
            ),
            (b" \n\t ", "the request on stdin was empty"),
            (b"{\"method\":", "Must provide valid JSON payload"),
            (b"[1, 2]", "expected an object, got a list"),
            (b"\"info\"", "expected an object, got a string"),
            (b"42", "expected an object, got a number"),
            (b"{\"arguments\": []}", "Must provide 'method' key"),
            (b"{\"method\": \"info\"}", "Must provide 'arguments' key"),
            (
                b"{\"method\": \"info\", \"arguments\": {}}",
                "'arguments' must be a list, got an object",
            ),
            (
                b"{\"method\": \"info\", \"arguments\": [], \"context\": 5}",
                "'context' must be an object",
            ),
            // Invalid UTF-8 inside a JSON string.
            (
                b"{\"method\": \"inf\xff\", \"arguments\": []}",
                "Must provide valid JSON payload",
            ),
        ] {
            let out = run(config, input);
            out.error("CpiError", needle);
        }
    });
}

#[test]
fn argument_errors_name_method_and_argument() {
    with_fake(|config| {
        call(config, &request("has_vm", json!([])))
            .error("CpiError", "has_vm: expected 1 argument (vm_cid), got 0");
        call(config, &request("has_vm", json!([42]))).error(
            "CpiError",
            "has_vm: argument 1 ('vm_cid') must be a string, got 42",
        );
        call(config, &request("create_disk", json!(["big", {}, null])))
            .error("CpiError", "create_disk: argument 1 ('size')");
        call(
            config,
            &request("create_vm", json!(["agent", "sc", "props", {}, [], {}])),
        )
        .error("CpiError", "create_vm: argument 3 ('cloud_properties')");
    });
}

#[test]
fn unknown_methods_and_versions_are_not_implemented() {
    with_fake(|config| {
        call(config, &request("frobnicate", json!([]))).error(
            "NotImplemented",
            "Must call implemented method: Unknown method 'frobnicate'",
        );
        let mut req = request("info", json!([]));
        req["api_version"] = json!(3);
        call(config, &req).error(
            "NotImplemented",
            "CPI API version requested is '3', max supported is '2'",
        );
    });
}

#[test]
fn oversized_input_is_refused_without_reading_it_all() {
    with_fake(|config| {
        // 17 MiB of a syntactically plausible request.
        let mut input = b"{\"method\":\"info\",\"arguments\":[\"".to_vec();
        input.resize(17 << 20, b'a');
        let started = std::time::Instant::now();
        let out = run(config, &input);
        out.error("CpiError", "larger than 16777216 bytes");
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
        // The refusal does not echo the input.
        assert!(out.stdout.len() < 4096, "{} bytes", out.stdout.len());
    });
}

#[test]
fn a_missing_config_file_is_a_cloud_error_even_for_info() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.json");
    let out = call(&missing, &request("info", json!([])));
    let msg = out.error("CloudError", "cannot be read");
    assert!(msg.contains(&missing.display().to_string()), "{msg}");
    assert!(msg.contains("-configPath"), "{msg}");
}

#[test]
fn no_config_argument_is_a_cloud_error() {
    let out = run_with::<&OsStr>(&[], b"{\"method\":\"info\",\"arguments\":[]}", &[]);
    out.error(
        "CloudError",
        "no config file given: run as `cpi -configPath FILE`",
    );
    let out = run_with(&["--bogus"], b"{\"method\":\"info\",\"arguments\":[]}", &[]);
    out.error("CloudError", "unknown argument '--bogus'");
}

#[test]
fn a_config_with_an_unknown_key_names_file_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_json(
        dir.path(),
        "cpi.json",
        &json!({"backend": "docker", "agent": {"mbus": MBUS, "ntpp": []}, "docker": {"host": "unix:///var/run/docker.sock"}}),
    );
    let msg =
        call(&config, &request("info", json!([]))).error("CloudError", "unknown key 'agent.ntpp'");
    assert!(msg.contains(&config.display().to_string()), "{msg}");
    assert!(msg.contains("valid keys there: mbus, ntp"), "{msg}");
    assert!(msg.contains("remove it or correct the spelling"), "{msg}");

    let config = write_json(
        dir.path(),
        "cpi2.json",
        &json!({"backend": "docker", "agent": {"mbus": MBUS}, "docker": {"hots": "unix:///x"}}),
    );
    call(&config, &request("info", json!([])))
        .error("CloudError", "key 'docker.hots' is not a setting here");

    let config = write_json(dir.path(), "cpi3.json", &json!({"backend": "docker"}));
    call(&config, &request("info", json!([]))).error("CloudError", "key 'agent.mbus' is missing");

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"backend\": \"docker\",,}").expect("write");
    call(&bad, &request("info", json!([]))).error("CloudError", "is not valid JSON");
}

#[test]
fn a_go_style_config_is_read_as_it_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let go = json!({"start_containers_with_systemd": false, "mount_cgroupfs": true, "enable_lxcfs_support": false,
        "light_stemcell": {"require_image_verification": true},
        "Actions": {"Docker": {"host": "unix:///nonexistent/docker.sock", "api_version": "1.44"},
                    "Agent": {"Mbus": MBUS, "NTP": [], "Blobstore": {"Provider": "dav", "Options": {}}}}});
    let config = write_json(dir.path(), "cpi.json", &go);
    let result = call(&config, &request("info", json!([]))).ok();
    assert_eq!(result["api_version"], 2);

    let mut bad = go.clone();
    bad["Actions"]["Docker"]["Hots"] = json!("x");
    let config = write_json(dir.path(), "bad.json", &bad);
    let msg = call(&config, &request("info", json!([])))
        .error("CloudError", "unknown key 'Actions.Docker.Hots'");
    assert!(msg.contains("Go Docker CPI's cpi.json format"), "{msg}");
}

#[test]
fn fake_backend_errors_are_typed() {
    with_fake(|config| {
        call(config, &request("reboot_vm", json!(["c-nope"])))
            .error("VMNotFound", "VM 'c-nope' not found");
        call(
            config,
            &request("detach_disk", json!(["c-nope", "vol-nope"])),
        )
        .error("VMNotFound", "c-nope");
        call(
            config,
            &request("set_disk_metadata", json!(["vol-nope", {}])),
        )
        .error("DiskNotFound", "Disk 'vol-nope' not found");
        assert_eq!(
            call(config, &request("has_vm", json!(["c-nope"]))).ok(),
            false
        );
        call(
            config,
            &request("create_stemcell", json!(["/nonexistent/image", {}])),
        )
        .error("CloudError", "/nonexistent/image");
    });
}
