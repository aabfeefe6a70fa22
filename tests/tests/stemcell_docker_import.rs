//! The test stemcell's `image` is a root filesystem Docker accepts: `docker import`
//! takes it and a container from it runs busybox and sees the `/var/vcap` layout.

use cpi_tests::daemons::{docker, require_docker};
use cpi_tests::names::unique_name;
use cpi_tests::TestStemcell;

#[test]
fn docker_imports_the_stemcell_image_and_runs_it() {
    require_docker();
    let dir = tempfile::tempdir().expect("tempdir");
    let stemcell = TestStemcell::builder().build_unpacked(dir.path());
    let image = format!("cpi-tests/{}:latest", unique_name("stemcell-import"));
    let image_path = stemcell.image_path.to_string_lossy().into_owned();

    docker(&["import", &image_path, &image]).expect_success();
    let run = docker(&["run", "--rm", &image, "/bin/busybox", "ls", "/var/vcap"]);
    let listing = run.stdout.clone();
    let init = docker(&[
        "run",
        "--rm",
        &image,
        "/bin/sh",
        "-c",
        "test -x /usr/sbin/runsvdir-start && ls -ld /tmp /warden-cpi-dev",
    ]);
    // Remove the image before asserting, so a failure leaves nothing behind.
    let rm = docker(&["rmi", "-f", &image]);

    run.expect_success();
    for d in ["bosh", "data", "jobs", "store", "sys"] {
        assert!(
            listing.split_whitespace().any(|e| e == d),
            "/var/vcap lacks {d}: {listing}"
        );
    }
    let init_out = init.expect_success();
    assert!(
        init_out.contains("drwxrwxrwt"),
        "/tmp must be 1777: {init_out}"
    );
    rm.expect_success();
}
