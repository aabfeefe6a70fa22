//! The conformance suite against the fake backend, through the real `cpi` binary.

use cpi_tests::conformance::{self, BackendKind, Target};

#[test]
fn lifecycle() {
    conformance::lifecycle(&Target::new(BackendKind::Fake, "fake-life"));
}

#[test]
fn error_paths() {
    conformance::error_paths(&Target::new(BackendKind::Fake, "fake-err"));
}

#[test]
fn networks() {
    conformance::networks(&Target::new(BackendKind::Fake, "fake-net"));
}
