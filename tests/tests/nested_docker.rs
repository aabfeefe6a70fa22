//! The CPI inside a CI container, on the docker backend: an outer container (made by
//! this machine's Docker from a root filesystem the test builds, as privileged as
//! the host allows) runs containerd and dockerd with its storage on a volume, and
//! this test binary runs again inside it: the conformance lifecycle (live disk
//! attach included, overlayfs) and `cpi doctor`. See `cpi_tests::nested`.

use cpi_tests::nested::{self, Backend};

#[test]
fn nested_docker() {
    if nested::inside() {
        nested::run_inside(Backend::Docker);
    } else {
        nested::run_outside(Backend::Docker, "nested_docker");
    }
}
