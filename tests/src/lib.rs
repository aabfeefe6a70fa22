//! Test kit for bosh-container-cpi, plus the end-to-end tests under `tests/tests/`.
//!
//! - [`stemcell`]: builds small warden-style BOSH stemcells (full and light) in Rust.
//! - [`runner`]: runs the `cpi` binary the way the BOSH director does and parses its answer.
//! - [`daemons`]: checks that Docker and containerd are running (and panics with
//!   instructions when they are not: tests never skip silently).
//! - [`crash`]: kill -9 trials of the `cpi` process and the leftovers check after recovery.
//! - [`names`]: per-run unique names for the containers, images and disks tests create.
//! - [`private_daemon`]: private containerd and dockerd instances for restart tests
//!   (the shared daemons are never restarted).
//! - [`nested`]: the CPI and its daemon inside an outer CI container (nested runs).
//! - [`systemd_stemcell`]: a real systemd stemcell (Debian, debootstrapped and cached).
//! - [`measure_parent`]: the benchmark's measuring parent (`cpi-measure`).
//!
//! `bash scripts/test.sh` installs and starts everything these tests need.
#![deny(missing_docs)]

pub mod conformance;
pub mod crash;
pub mod daemons;
pub mod measure_parent;
pub mod names;
pub mod nested;
pub mod private_daemon;
mod process;
pub mod runner;
pub mod stemcell;
pub mod systemd_stemcell;

pub use runner::{cpi_bin, CpiErrorBody, CpiResponse, CpiRunner};
pub use stemcell::{LightStemcellBuilder, StemcellBuilder, TestStemcell, UnpackedStemcell};

/// Absolute path of the workspace root (the directory holding the root `Cargo.toml`).
pub fn workspace_root() -> std::path::PathBuf {
    let manifest_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}
