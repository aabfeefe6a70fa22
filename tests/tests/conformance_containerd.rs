//! The conformance suite against the containerd backend, through the real `cpi` binary.

use cpi_tests::conformance::{self, BackendKind, Target};

#[test]
fn lifecycle() {
    conformance::lifecycle(&Target::new(BackendKind::Containerd, "containerd-life"));
}

#[test]
fn error_paths() {
    conformance::error_paths(&Target::new(BackendKind::Containerd, "containerd-err"));
}

#[test]
fn networks() {
    conformance::networks(&Target::new(BackendKind::Containerd, "containerd-net"));
}
