//! The conformance suite against the docker backend, through the real `cpi` binary.

use cpi_tests::conformance::{self, BackendKind, Target};

#[test]
fn lifecycle() {
    conformance::lifecycle(&Target::new(BackendKind::Docker, "docker-life"));
}

#[test]
fn error_paths() {
    conformance::error_paths(&Target::new(BackendKind::Docker, "docker-err"));
}

#[test]
fn networks() {
    conformance::networks(&Target::new(BackendKind::Docker, "docker-net"));
}
