//! The CPI inside a CI container, on the containerd backend: an outer container (made by
//! this machine's Docker from a root filesystem the test builds, as privileged as
//! the host allows) runs containerd with its storage on a volume, and
//! this test binary runs again inside it: the conformance lifecycle (live disk
//! attach included, overlayfs) and `cpi doctor`. See `cpi_tests::nested`.

use cpi_tests::nested::{self, Backend};

#[test]
fn nested_containerd() {
    if nested::inside() {
        nested::run_inside(Backend::Containerd);
    } else {
        nested::run_outside(Backend::Containerd, "nested_containerd");
    }
}
