//! The daemons `scripts/test.sh` starts are up and wired as the backends expect:
//! dockerd runs its containers on the shared containerd, and the local registry
//! holds the image `start_registry` pushed.

use cpi_tests::daemons::{
    ctr, docker, require_containerd, require_docker, require_registry, LOCAL_REGISTRY,
};
use cpi_tests::names::unique_name;
use cpi_tests::TestStemcell;

#[test]
fn dockerd_uses_the_shared_containerd() {
    require_containerd();
    require_docker();
    let name = unique_name("shared-containerd");
    let dir = tempfile::tempdir().expect("tempdir");
    let stemcell = TestStemcell::builder().build_unpacked(dir.path());
    let image = format!("cpi-tests/{name}:latest");
    docker(&["import", &stemcell.image_path.to_string_lossy(), &image]).expect_success();
    let id = docker(&[
        "run",
        "-d",
        "--name",
        &name,
        &image,
        "/bin/busybox",
        "sleep",
        "60",
    ])
    .expect_success();
    let listed = ctr("moby", &["containers", "ls", "-q"]);
    let rm = docker(&["rm", "-f", &name]);
    let rmi = docker(&["rmi", "-f", &image]);
    let listed = listed.expect_success();
    rm.expect_success();
    rmi.expect_success();
    assert!(
        listed.lines().any(|l| l.trim() == id),
        "container {id} of dockerd is not in containerd's `moby` namespace on the shared socket: {listed}"
    );
}

#[test]
fn local_registry_holds_the_pushed_image() {
    require_registry();
    let out = std::process::Command::new("curl")
        .args([
            "-fsS",
            &format!("http://{LOCAL_REGISTRY}/v2/cpi-test/busybox/tags/list"),
        ])
        .output()
        .expect("run curl");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && body.contains("\"1\""),
        "registry has no cpi-test/busybox:1 (start_registry pushes it): {body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
