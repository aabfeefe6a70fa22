//! `cpi light-stemcell` end to end, on both backends, through the real binary:
//! push an image to the local registry (127.0.0.1:5000, `scripts/lib.sh
//! start_registry`), build a light stemcell from its reference with the tool (the
//! digest comes from the registry), unpack the tarball as the director does, and
//! `create_stemcell`, `create_vm`, `delete_vm`, `delete_stemcell` with it. Nothing
//! may be left: not on the daemon, not in the registry.
//!
//! The image is pushed with the Docker CLI on both backends (dockerd shares the
//! machine with containerd), so these tests need dockerd, containerd and the registry.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use cpi_tests::conformance::{BackendKind, Target};
use cpi_tests::daemons::{docker, require_docker, require_registry, LOCAL_REGISTRY};
use cpi_tests::{cpi_bin, TestStemcell};
use serde_json::{json, Value};
use sha1::Digest;

/// An image pushed to the local registry under the target's director uuid (so the
/// target's leftovers check sees anything pulled from it). Dropping it deletes the
/// manifest from the registry and the local tag from Docker.
struct Pushed {
    repository: String,
    reference: String,
    digest: String,
}

impl Pushed {
    fn new(t: &Target, work: &Path) -> Pushed {
        // A runit-era OS: both backends then boot the stand-in init as runsvdir.
        let full = TestStemcell::builder()
            .os("ubuntu-jammy")
            .build_unpacked(work.join("rootfs"));
        let repository = format!("{LOCAL_REGISTRY}/{}/ubuntu-jammy", t.director_uuid);
        let reference = format!("{repository}:0.1");
        let image = full.image_path.display().to_string();
        docker(&["import", &image, &reference]).expect_success();
        let mut pushed = Pushed {
            repository,
            reference,
            digest: String::new(),
        };
        docker(&["push", &pushed.reference]).expect_success();
        let repo_digest = docker(&[
            "inspect",
            "--format",
            "{{index .RepoDigests 0}}",
            &pushed.reference,
        ])
        .expect_success();
        let digest = repo_digest
            .split_once('@')
            .map(|(_, d)| d.to_owned())
            .unwrap_or_else(|| panic!("no digest in the repo digest {repo_digest:?}"));
        // The backends must pull it, not find it already here.
        docker(&["rmi", &pushed.reference]).expect_success();
        pushed.digest = digest;
        pushed
    }
}

impl Drop for Pushed {
    fn drop(&mut self) {
        let _ = docker(&["rmi", &self.reference]);
        if self.digest.is_empty() {
            return;
        }
        let path = self
            .repository
            .strip_prefix(&format!("{LOCAL_REGISTRY}/"))
            .unwrap_or(&self.repository);
        let url = format!(
            "http://{LOCAL_REGISTRY}/v2/{path}/manifests/{}",
            self.digest
        );
        let _ = Command::new("curl")
            .args(["-fsS", "--max-time", "20", "-X", "DELETE", &url])
            .output();
    }
}

/// Deletes what a failed test created, through the binary (best effort, no asserts:
/// this runs while panicking).
struct Cleanup<'a> {
    t: &'a Target,
    vm: Option<String>,
    stemcell: Option<String>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let ctx = json!({"director_uuid": self.t.director_uuid});
        if let Some(vm) = self.vm.take() {
            let _ = self
                .t
                .runner
                .call_with_context("delete_vm", json!([vm]), ctx.clone());
        }
        if let Some(sc) = self.stemcell.take() {
            let _ = self
                .t
                .runner
                .call_with_context("delete_stemcell", json!([sc]), ctx);
        }
        self.t.remove_networks();
    }
}

/// The containerd backend speaks HTTPS to registries unless told otherwise; the
/// local registry is plain HTTP.
fn allow_local_registry(t: &Target) {
    if t.kind != BackendKind::Containerd {
        return;
    }
    let path = &t.runner.config;
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(path).expect("read config")).expect("config json");
    config["containerd"]["insecure_registries"] = json!([LOCAL_REGISTRY]);
    std::fs::write(path, serde_json::to_vec_pretty(&config).expect("json")).expect("write config");
}

struct Tool {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn light_stemcell(args: &[&str]) -> Tool {
    let out = Command::new(cpi_bin())
        .arg("light-stemcell")
        .args(args)
        .output()
        .expect("run cpi light-stemcell");
    Tool {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Unpacks the tarball into `dir` as the director does; returns the `image` path and
/// the manifest. Exactly `stemcell.MF` and an empty `image` must be in it.
fn unpack(tarball: &Path, dir: &Path) -> (PathBuf, serde_yaml_ng::Value) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let file = std::fs::File::open(tarball).expect("open tarball");
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut names = Vec::new();
    for entry in archive.entries().expect("tar entries") {
        let mut entry = entry.expect("entry");
        names.push(entry.path().expect("path").display().to_string());
        entry.unpack_in(dir).expect("unpack");
    }
    assert_eq!(names, ["stemcell.MF", "image"], "tarball entries");
    let image = dir.join("image");
    let mut content = Vec::new();
    std::fs::File::open(&image)
        .and_then(|mut f| f.read_to_end(&mut content))
        .expect("read image");
    assert!(content.is_empty(), "image must be empty");
    let text = std::fs::read_to_string(dir.join("stemcell.MF")).expect("manifest");
    let manifest = serde_yaml_ng::from_str(&text).expect("manifest is YAML");
    (image, manifest)
}

fn end_to_end(kind: BackendKind, label: &str) {
    require_registry();
    require_docker();
    let t = Target::new(kind, label);
    allow_local_registry(&t);
    let work = tempfile::tempdir().expect("tempdir");
    let pushed = Pushed::new(&t, work.path());

    // A --digest the registry contradicts: refused, nothing written.
    let wrong_out = work.path().join("wrong.tgz");
    let wrong = format!("sha256:{:x}", sha2::Sha256::digest(b"not the image"));
    let refused = light_stemcell(&[
        &pushed.reference,
        "--digest",
        &wrong,
        "-o",
        &wrong_out.display().to_string(),
    ]);
    assert_eq!(refused.code, Some(1), "{}", refused.stderr);
    assert!(
        refused.stderr.contains(&pushed.digest),
        "{}",
        refused.stderr
    );
    assert!(
        !wrong_out.exists(),
        "a refused build wrote {}",
        wrong_out.display()
    );

    // A tag the registry does not have: refused even with a --digest.
    let missing = format!("{}:no-such-tag", pushed.repository);
    let refused = light_stemcell(&[
        &missing,
        "--digest",
        &pushed.digest,
        "-o",
        &wrong_out.display().to_string(),
    ]);
    assert_eq!(refused.code, Some(1), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("has no image"),
        "{}",
        refused.stderr
    );
    assert!(
        !wrong_out.exists(),
        "a refused build wrote {}",
        wrong_out.display()
    );

    // The digest comes from the registry and is the one Docker pushed.
    let out = work.path().join("light.tgz");
    let built = light_stemcell(&[&pushed.reference, "-o", &out.display().to_string()]);
    assert_eq!(built.code, Some(0), "{}", built.stderr);
    assert_eq!(built.stdout, format!("{}\n", out.display()));
    assert!(
        built.stderr.contains("(from the registry)"),
        "{}",
        built.stderr
    );
    let (image_path, manifest) = unpack(&out, &work.path().join("unpacked"));
    assert_eq!(manifest["name"].as_str(), Some("bosh-docker-ubuntu-jammy"));
    assert_eq!(manifest["version"].as_str(), Some("0.1"));
    assert_eq!(manifest["operating_system"].as_str(), Some("ubuntu-jammy"));
    assert_eq!(
        manifest["stemcell_formats"],
        serde_yaml_ng::from_str::<serde_yaml_ng::Value>("[docker-light]").expect("yaml")
    );
    let cp = &manifest["cloud_properties"];
    assert_eq!(
        cp["image_reference"].as_str(),
        Some(pushed.reference.as_str())
    );
    assert_eq!(cp["digest"].as_str(), Some(pushed.digest.as_str()));
    let empty_sha1 = format!("{:x}", sha1::Sha1::digest(b""));
    assert_eq!(manifest["sha1"].as_str(), Some(empty_sha1.as_str()));

    // The CPI takes it: pulled by digest, the cid is the immutable reference.
    let mut cleanup = Cleanup {
        t: &t,
        vm: None,
        stemcell: None,
    };
    let stemcell = t.ok("create_stemcell", json!([image_path, {}]));
    let stemcell = stemcell.as_str().expect("stemcell cid").to_owned();
    cleanup.stemcell = Some(stemcell.clone());
    assert_eq!(stemcell, format!("{}@{}", pushed.repository, pushed.digest));

    let created = t.ok(
        "create_vm",
        json!(["agent-light-tool", stemcell, {}, {"default": t.manual_network(40)}, [], t.env()]),
    );
    let vm = created[0]
        .as_str()
        .unwrap_or_else(|| panic!("create_vm result: {created}"))
        .to_owned();
    cleanup.vm = Some(vm.clone());
    assert_eq!(t.ok("has_vm", json!([vm])), json!(true));
    let settings = t
        .exec(&vm, "cat /var/vcap/bosh/warden-cpi-agent-env.json")
        .expect("a real backend runs processes");
    let settings: Value = serde_json::from_str(&settings).expect("settings json");
    assert_eq!(settings["agent_id"], "agent-light-tool");
    let cmdline = t
        .exec(&vm, "tr '\\0' ' ' < /proc/1/cmdline")
        .unwrap_or_default();
    assert!(
        cmdline.contains("runsvdir-start"),
        "an ubuntu-jammy light stemcell boots runit: {cmdline}"
    );

    t.ok("delete_vm", json!([vm]));
    cleanup.vm = None;
    t.ok("delete_stemcell", json!([stemcell]));
    t.ok("delete_stemcell", json!([stemcell]));
    cleanup.stemcell = None;
    drop(cleanup);
    t.assert_nothing_left(&[vm], &[]);
}

#[test]
fn docker_imports_what_the_tool_builds() {
    end_to_end(BackendKind::Docker, "lighttool-docker");
}

#[test]
fn containerd_imports_what_the_tool_builds() {
    end_to_end(BackendKind::Containerd, "lighttool-ctrd");
}
