//! # cpi-core
//!
//! The backend-agnostic heart of bosh-container-cpi: the [`Cpi`] trait every backend
//! implements, the typed values it speaks in (ids, networks, cloud properties, agent
//! settings, stemcell manifests), the director's error kinds, and the JSON wire
//! protocol with its dispatcher.
//!
//! This crate does no IO: it has no daemon clients and sets up no runtime. The
//! `cpi` binary reads stdin, builds a backend, calls [`protocol::handle`] and writes
//! the response; backends live in their own crates.
//!
//! With the `fake` feature, `fake::FakeCpi` implements the whole trait in memory so
//! the protocol and the conformance suite can run without a daemon.
//!
//! ## Use
//!
//! A backend (`backend_docker::DockerCpi`, `backend_containerd::ContainerdCpi`, or the
//! fake) is called either directly through the [`Cpi`] trait, with typed arguments
//! such as [`CreateVm`], or with a request as the director sends it, through
//! [`protocol::handle`], which parses and checks the request, calls the backend and
//! shapes the [`protocol::Response`] for the request's API version:
//!
//! ```
//! # #[cfg(feature = "fake")]
//! # {
//! use cpi_core::fake::{FakeCpi, FakeState};
//! use cpi_core::{protocol, AgentOptions, CallContext, Cpi, CpiError};
//!
//! let cpi = FakeCpi::new(FakeState::default(), AgentOptions::default());
//! let runtime = tokio::runtime::Builder::new_current_thread()
//!     .build()
//!     .expect("runtime");
//! runtime.block_on(async {
//!     // The wire protocol: one JSON request in, one response out.
//!     let request = br#"{"method":"info","arguments":[],"context":{"director_uuid":"d"}}"#;
//!     let response = protocol::handle(request, |_ctx: &CallContext| Ok::<_, CpiError>(&cpi)).await;
//!     assert!(response.error.is_none());
//!     assert_eq!(response.result["api_version"], 2);
//!
//!     // The trait: typed calls.
//!     let vm = cpi_core::VmCid::new("vm-1").expect("a valid cid");
//!     assert!(!cpi.has_vm(&CallContext::default(), &vm).await.expect("has_vm"));
//! });
//! # }
//! ```
#![deny(missing_docs)]

pub mod agent_settings;
pub mod cloud_properties;
pub mod cpi;
pub mod error;
#[cfg(feature = "fake")]
pub mod fake;
pub mod ids;
pub mod mountinfo;
pub mod network;
pub mod protocol;
pub mod redact;
pub mod stemcell;

pub use agent_settings::{AgentOptions, AgentSettings};
pub use cloud_properties::{VmCloudProperties, VmResources};
pub use cpi::{
    CallContext, Cpi, CreateDisk, CreateStemcell, CreateVm, CreatedVm, DiskHint, Metadata,
};
pub use error::{CpiError, CpiResult, ErrorKind};
pub use ids::{AgentId, DiskCid, SnapshotCid, StemcellCid, VmCid};
pub use network::{Network, NetworkType, Networks};
pub use stemcell::StemcellManifest;
