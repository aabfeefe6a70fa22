//! `cpi light-stemcell IMAGE [flags]`: builds a light stemcell tarball (format
//! `docker-light`) for an image in a registry, ready for `bosh upload-stemcell` and
//! accepted by `create_stemcell` on both backends.
//!
//! Like `cpi doctor` this is a command for people and scripts, not a CPI call: it
//! writes no JSON response. stdout gets one line, the path of the tarball (so
//! `tgz=$(cpi light-stemcell ...)` works); what it decided and why goes to stderr.
//! Exit status: 0 written, 1 failed (registry, digest mismatch, file system), 64 bad
//! command line (BSD's `EX_USAGE`, as `cpi doctor`).
//!
//! Modules: [`cli`] (flags), [`plan`] (name, OS and version from the reference, the
//! manifest; pure), [`registry`] (the digest from the registry), [`tarball`] (the
//! file, written atomically).

pub mod cli;
pub mod plan;
pub mod registry;
pub mod tarball;

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;

use cli::Options;
use plan::ImageRef;
use registry::{Access, LookupError};

use crate::output;

/// Exit status of a bad command line.
const EXIT_USAGE: u8 = 64;
/// Exit status when no tarball was written for another reason.
const EXIT_FAILED: u8 = 1;

/// Why the command stopped.
enum Stop {
    /// The command line cannot work: fix the flags.
    Usage(String),
    /// Something outside failed (registry, files).
    Failed(String),
}

fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "cpi light-stemcell: {line}");
}

/// Reports a bad command line (from [`cli::parse`]) and exits 64.
pub fn usage(problem: &str) -> ExitCode {
    say(&format!("{problem}\n{}", cli::USAGE));
    ExitCode::from(EXIT_USAGE)
}

/// Builds the tarball and reports; see the module docs for the exit status.
pub fn run(options: Options) -> ExitCode {
    match build(&options) {
        Ok(path) => {
            let mut line = path.as_os_str().as_bytes().to_vec();
            line.push(b'\n');
            output::finish(&line)
        }
        Err(Stop::Usage(problem)) => usage(&problem),
        Err(Stop::Failed(problem)) => {
            say(&format!("{problem}; no tarball was written"));
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// Where the digest came from, for the summary.
fn provenance(given: Option<&str>, from_registry: bool) -> &'static str {
    match (given, from_registry) {
        (Some(_), true) => "from the registry, matches --digest",
        (None, true) => "from the registry",
        (Some(_), false) => "from --digest or the reference, NOT checked against the registry",
        (None, false) => "unknown",
    }
}

fn build(o: &Options) -> Result<PathBuf, Stop> {
    let image = ImageRef::parse(&o.image).map_err(Stop::Usage)?;
    // The containerd backend parses it with oci-client: refuse what it would refuse.
    oci_client::Reference::from_str(&o.image).map_err(|e| {
        Stop::Usage(format!(
            "{:?} is not an image reference the CPI can pull: {e}",
            o.image
        ))
    })?;
    let id = plan::identity(&image, &o.overrides).map_err(Stop::Usage)?;
    if o.overrides.os.is_none() && !id.os.starts_with("ubuntu-") {
        say(&format!(
            "warning: no ubuntu-<codename> in {:?}, so the operating system is {:?} \
             (deployments select stemcells by it, and the containerd backend boots runit \
             for it); give --os (e.g. --os ubuntu-noble) if that is wrong",
            image.basename(),
            id.os
        ));
    }
    let given = match (&o.digest, &image.digest) {
        (Some(flag), Some(in_ref)) if flag != in_ref => {
            return Err(Stop::Usage(format!(
                "--digest {flag} and the digest in {} ({in_ref}) disagree",
                image.whole
            )))
        }
        (Some(d), _) | (None, Some(d)) => Some(d.clone()),
        (None, None) => None,
    };
    let (digest, from_registry) = if o.offline {
        let d = given.clone().ok_or_else(|| {
            Stop::Usage(
                "--offline needs the digest: give --digest sha256:HEX (or IMAGE@sha256:HEX)"
                    .to_owned(),
            )
        })?;
        (d, false)
    } else {
        let access = Access {
            plain_http: o.insecure_registry,
            credentials: credentials(o)?,
        };
        match lookup(&image.whole, &access)? {
            Ok(found) => match &given {
                Some(g) if *g != found => {
                    return Err(Stop::Failed(format!(
                        "the registry says {} has digest {found}, but {g} was given; the \
                         stemcell would never import (check the tag, or drop --digest)",
                        image.whole
                    )))
                }
                _ => (found, true),
            },
            Err(LookupError::NotFound(m)) => return Err(Stop::Failed(m)),
            Err(e) => match &given {
                Some(g) => {
                    say(&format!(
                        "warning: could not check the digest with the registry ({}); \
                         using {g} as given",
                        e.message()
                    ));
                    (g.clone(), false)
                }
                None => {
                    return Err(Stop::Failed(format!(
                        "no digest for {}: {}. Fix the registry access, or give the digest \
                         with --digest sha256:HEX (add --offline to skip the registry)",
                        image.whole,
                        e.message()
                    )))
                }
            },
        }
    };
    let manifest = plan::manifest_text(&id, &image, &digest).map_err(Stop::Failed)?;
    let bytes = tarball::tarball_bytes(&manifest).map_err(|e| Stop::Failed(format!("{e:#}")))?;
    let path = o
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(plan::default_output(&id)));
    tarball::write_atomically(&path, &bytes).map_err(|e| Stop::Failed(format!("{e:#}")))?;
    say(&format!(
        "wrote {}: stemcell {}/{} (operating system {}, api_version {}), image {}, \
         digest {digest} ({})",
        path.display(),
        id.name,
        id.version,
        id.os,
        id.api_version,
        image.whole,
        provenance(given.as_deref(), from_registry)
    ));
    Ok(path)
}

/// Runs the registry lookup on a small runtime of its own.
fn lookup(reference: &str, access: &Access) -> Result<Result<String, LookupError>, Stop> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Stop::Failed(format!("cannot start the async runtime: {e}")))?;
    Ok(rt.block_on(registry::manifest_digest(reference, access)))
}

/// Reads `--password-file` (one line; a trailing newline is not part of the
/// password). Neither the password nor the file's content is ever printed.
fn credentials(o: &Options) -> Result<Option<(String, String)>, Stop> {
    let (Some(user), Some(file)) = (&o.username, &o.password_file) else {
        return Ok(None);
    };
    let raw = std::fs::read(file).map_err(|e| {
        Stop::Failed(format!(
            "cannot read --password-file {}: {e}",
            file.display()
        ))
    })?;
    let text = String::from_utf8(raw).map_err(|_| {
        Stop::Failed(format!(
            "--password-file {} is not UTF-8 text",
            file.display()
        ))
    })?;
    let password = text.strip_suffix('\n').unwrap_or(&text);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        return Err(Stop::Failed(format!(
            "--password-file {} is empty",
            file.display()
        )));
    }
    Ok(Some((user.clone(), password.to_owned())))
}
