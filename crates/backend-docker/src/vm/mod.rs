//! VMs as containers: [`spec`] builds the container (pure), [`prelude`] writes its
//! entrypoint, [`create`] runs `create_vm`, [`lifecycle`] the other VM methods, [`orphans`] finds what a killed call left.

pub mod create;
pub mod host_config;
pub mod lifecycle;
pub mod metadata;
pub mod orphans;
pub mod prelude;
pub mod probe;
pub mod spec;
