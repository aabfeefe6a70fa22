//! # cpi
//!
//! The executable the BOSH director runs for every CPI call:
//! `cpi -configPath FILE < request.json`. It reads one request from stdin, builds the
//! backend named by the config (Docker, containerd, or the in-memory fake), runs the
//! call, and writes exactly one JSON response line to stdout, then exits 0 whatever
//! the outcome (non-zero only when no response could be written).
//!
//! Modules:
//! - [`args`]: the command line (`-configPath`, `--config`, `--version`, `--help`);
//! - [`config`]: our config format and the Go Docker CPI's, validation, context
//!   overrides;
//! - [`run`]: one call end to end, panics contained;
//! - [`logging`]: stderr + the response's `log`, secrets scrubbed;
//! - [`doctor`]: `cpi doctor`, the environment check (a report, not a response);
//! - [`light_stemcell`]: `cpi light-stemcell`, builds a light stemcell tarball;
//! - [`fake_store`]: the fake backend's state file, locked and saved atomically;
//! - [`output`]: the only writer to stdout.

mod args;
mod config;
mod doctor;
mod fake_store;
mod light_stemcell;
mod logging;
mod output;
mod run;

use std::process::ExitCode;

use args::Command;

fn main() -> ExitCode {
    let config_path = match args::parse(std::env::args_os().skip(1)) {
        Ok(Command::Help) => return output::finish(args::HELP.as_bytes()),
        Ok(Command::Version) => return output::finish(args::version().as_bytes()),
        Ok(Command::Doctor { config, json }) => return doctor::run(config, json),
        Ok(Command::DoctorUsage(problem)) => return doctor::usage(&problem),
        Ok(Command::LightStemcell(options)) => return light_stemcell::run(*options),
        Ok(Command::LightStemcellUsage(problem)) => return light_stemcell::usage(&problem),
        Ok(Command::Run { config }) => Ok(config),
        Err(problem) => Err(problem),
    };
    output::finish(&run::respond(config_path))
}
