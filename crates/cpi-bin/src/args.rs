//! The command line.
//!
//! The director runs `cpi -configPath /var/vcap/jobs/<job>/config/cpi.json` (the Go
//! CPIs' flag spelling, single dash). Like Go's `flag` package we accept one or two
//! dashes and `NAME VALUE` or `NAME=VALUE`; `--config` is a shorter synonym.
//! Subcommands (`doctor`, `light-stemcell`) are recognised only as the first argument.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::light_stemcell::cli::Parsed;

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Answer one request from stdin with this config file.
    Run {
        /// The config file.
        config: PathBuf,
    },
    /// `cpi doctor`: check the environment and print a report.
    Doctor {
        /// The config file, if given.
        config: Option<PathBuf>,
        /// `--json`: a JSON document instead of text.
        json: bool,
    },
    /// `cpi doctor` with a bad command line: the problem, for stderr.
    DoctorUsage(String),
    /// `cpi light-stemcell IMAGE ...`: build a light stemcell tarball.
    LightStemcell(Box<crate::light_stemcell::cli::Options>),
    /// `cpi light-stemcell` with a bad command line: the problem, for stderr.
    LightStemcellUsage(String),
    /// Print the version.
    Version,
    /// Print the usage.
    Help,
}

/// The usage text for `--help`.
pub const HELP: &str = "\
cpi - the BOSH CPI of bosh-container-cpi (Docker and containerd backends)

USAGE:
    cpi -configPath FILE < request.json
    cpi doctor [-configPath FILE] [--json]
    cpi light-stemcell IMAGE [--digest sha256:HEX] [--name NAME] [--version VERSION]
                       [--os OS] [--api-version N] [--output FILE]
                       [--insecure-registry] [--offline]
                       [--username USER --password-file FILE]

    Reads one CPI request (JSON) from standard input and writes one JSON response
    line to standard output. Logs go to standard error and into the response's
    `log`, with secrets redacted. The exit status is 0 whenever a response was
    written, whether or not the call succeeded.

OPTIONS:
    -configPath FILE, -configPath=FILE   the config file (ours, or the Go Docker
    --config FILE, --config=FILE         CPI's cpi.json); see docs/configuration.md
    --version                            print the version and exit
    --help                               print this help and exit

DOCTOR:
    `cpi doctor` checks the environment the config points at (daemon, cgroups,
    capabilities, overlayfs, mount propagation, CNI plugins, loop devices,
    /lib/modules, a throwaway container) and prints one line per check with its
    fix; `--json` prints a JSON document instead. Exits 2 when anything is a
    BLOCKER, 0 otherwise (64 on a bad command line). See docs/nested-ci.md.

LIGHT STEMCELLS:
    `cpi light-stemcell IMAGE` writes a light stemcell (format docker-light): a gzip
    tar of `stemcell.MF` and an empty `image`, naming IMAGE and its digest, for
    `bosh upload-stemcell`. From IMAGE, e.g.
    ghcr.io/cloudfoundry/ubuntu-noble-stemcell:1.165, it takes:
      operating system   the `ubuntu-<codename>` in the repository's last path
                         component (else that component without `-stemcell`)
      name               bosh-docker-<operating system>
      version            the tag (`latest` or no tag: give --version)
      digest             asked from the registry (the manifest's sha256, as the
                         CPI pulls it); --digest must agree with it; when the
                         registry cannot be reached, --digest is used unchecked
    --digest sha256:HEX     the image's digest (IMAGE@sha256:HEX works too)
    --name, --version, --os override the derived values
    --api-version N         the stemcell API version (default 3)
    --output FILE, -o FILE  where to write (default: light-<name>-<version>.tgz)
    --insecure-registry     plain HTTP to the registry (always so for localhost
                            and 127.0.0.0/8)
    --offline               do not contact the registry (needs the digest)
    --username USER --password-file FILE   registry credentials (never printed)
    Prints the tarball's path on stdout and a summary on stderr. Exits 0 when
    written, 1 on failure (registry, digest mismatch, files), 64 on a bad command
    line. See docs/light-stemcells.md.

ENVIRONMENT:
    CPI_LOG    log level or tracing targets, e.g. `debug` or
               `info,backend_docker=trace` (default: info)

EXAMPLE:
    echo '{\"method\":\"info\",\"arguments\":[],\"context\":{\"director_uuid\":\"x\"}}' \\
      | cpi -configPath docs/examples/sample-config.json
";

const CONFIG_FLAGS: [&str; 4] = ["-configPath", "--configPath", "-config", "--config"];

fn is_config_flag(name: &[u8]) -> bool {
    CONFIG_FLAGS.iter().any(|f| f.as_bytes() == name)
}

fn set_config(value: &OsStr, config: &mut Option<PathBuf>) -> Result<(), String> {
    if value.is_empty() {
        return Err("-configPath needs a file: run as `cpi -configPath FILE`".to_owned());
    }
    if config.is_some() {
        return Err("-configPath is given more than once; give one config file".to_owned());
    }
    *config = Some(PathBuf::from(value));
    Ok(())
}

/// Parses the arguments after the program name. The error says what is wrong and
/// how to call the CPI.
pub fn parse<I: IntoIterator<Item = OsString>>(args: I) -> Result<Command, String> {
    let mut args = args.into_iter().peekable();
    if args
        .peek()
        .is_some_and(|a| a.as_bytes() == b"light-stemcell")
    {
        args.next();
        // Not a CPI call either: its own flags, its own usage errors.
        return Ok(match crate::light_stemcell::cli::parse(args) {
            Ok(Parsed::Build(options)) => Command::LightStemcell(options),
            Ok(Parsed::Help) => Command::Help,
            Err(problem) => Command::LightStemcellUsage(problem),
        });
    }
    let doctor = args.peek().is_some_and(|a| a.as_bytes() == b"doctor");
    if !doctor {
        return parse_rest(args, false);
    }
    args.next();
    // `cpi doctor` is not a CPI call: a bad command line is reported as such, not
    // as a CPI response.
    Ok(parse_rest(args, true).unwrap_or_else(|problem| {
        Command::DoctorUsage(format!(
            "cpi doctor: {problem}; usage: cpi doctor [-configPath FILE] [--json]"
        ))
    }))
}

fn parse_rest(args: impl Iterator<Item = OsString>, doctor: bool) -> Result<Command, String> {
    let mut args = args;
    let mut config: Option<PathBuf> = None;
    let mut json = false;
    while let Some(arg) = args.next() {
        let bytes = arg.as_bytes();
        match bytes {
            b"--help" | b"-help" | b"-h" => return Ok(Command::Help),
            b"--version" | b"-version" | b"-V" => return Ok(Command::Version),
            b"--json" | b"-json" if doctor => json = true,
            _ if is_config_flag(bytes) => {
                let value = args.next().ok_or_else(|| {
                    format!(
                        "{} needs a file: run as `cpi -configPath FILE`",
                        arg.to_string_lossy()
                    )
                })?;
                set_config(&value, &mut config)?;
            }
            _ => match bytes.iter().position(|b| *b == b'=') {
                Some(eq) if is_config_flag(&bytes[..eq]) => {
                    set_config(OsStr::from_bytes(&bytes[eq + 1..]), &mut config)?;
                }
                _ => {
                    return Err(format!(
                        "unknown argument '{}': run as `cpi -configPath FILE` (see `cpi --help`)",
                        arg.to_string_lossy()
                    ))
                }
            },
        }
    }
    if doctor {
        return Ok(Command::Doctor { config, json });
    }
    match config {
        Some(config) => Ok(Command::Run { config }),
        None => {
            Err("no config file given: run as `cpi -configPath FILE` (see `cpi --help`)".to_owned())
        }
    }
}

/// The text of `--version`.
pub fn version() -> String {
    format!(
        "cpi {} (bosh-container-cpi; CPI API versions 1 and {})\n",
        env!("CARGO_PKG_VERSION"),
        cpi_core::protocol::MAX_API_VERSION
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_strs(args: &[&str]) -> Result<Command, String> {
        parse(args.iter().map(OsString::from))
    }

    fn run(path: &str) -> Result<Command, String> {
        Ok(Command::Run {
            config: PathBuf::from(path),
        })
    }

    #[test]
    fn config_flag_spellings() {
        for args in [
            &["-configPath", "/c.json"][..],
            &["-configPath=/c.json"],
            &["--configPath", "/c.json"],
            &["--config", "/c.json"],
            &["--config=/c.json"],
            &["-config=/c.json"],
        ] {
            assert_eq!(parse_strs(args), run("/c.json"), "{args:?}");
        }
        // A value may itself contain '='.
        assert_eq!(parse_strs(&["--config=/a=b.json"]), run("/a=b.json"));
    }

    #[test]
    fn version_and_help_win() {
        assert_eq!(parse_strs(&["--version"]), Ok(Command::Version));
        assert_eq!(parse_strs(&["-version"]), Ok(Command::Version));
        assert_eq!(parse_strs(&["--help"]), Ok(Command::Help));
        assert_eq!(parse_strs(&["-h"]), Ok(Command::Help));
        assert_eq!(
            parse_strs(&["-configPath", "/c.json", "--help"]),
            Ok(Command::Help)
        );
        assert!(version().starts_with("cpi 0."));
    }

    #[test]
    fn doctor() {
        assert_eq!(
            parse_strs(&["doctor"]),
            Ok(Command::Doctor {
                config: None,
                json: false
            })
        );
        for args in [
            &["doctor", "-configPath", "/c.json", "--json"][..],
            &["doctor", "--json", "--config=/c.json"],
        ] {
            assert_eq!(
                parse_strs(args),
                Ok(Command::Doctor {
                    config: Some(PathBuf::from("/c.json")),
                    json: true
                }),
                "{args:?}"
            );
        }
        // `--json` means nothing to a CPI call, and `doctor` only counts first.
        assert!(parse_strs(&["--json", "-configPath", "/c.json"]).is_err());
        assert!(parse_strs(&["-configPath", "/c.json", "doctor"]).is_err());
        for args in [&["doctor", "--bogus"][..], &["doctor", "--config"]] {
            let Ok(Command::DoctorUsage(problem)) = parse_strs(args) else {
                panic!("{args:?}");
            };
            assert!(problem.starts_with("cpi doctor: "), "{problem}");
            assert!(problem.ends_with("usage: cpi doctor [-configPath FILE] [--json]"));
        }
    }

    #[test]
    fn light_stemcell() {
        let Ok(Command::LightStemcell(options)) =
            parse_strs(&["light-stemcell", "reg/ubuntu-noble:1", "--offline"])
        else {
            panic!("light-stemcell");
        };
        assert_eq!(options.image, "reg/ubuntu-noble:1");
        assert!(options.offline);
        // Its `--version` takes a value; `--help` is the usual help.
        let Ok(Command::LightStemcell(options)) =
            parse_strs(&["light-stemcell", "reg/x", "--version", "2"])
        else {
            panic!("--version");
        };
        assert_eq!(options.overrides.version.as_deref(), Some("2"));
        assert_eq!(parse_strs(&["light-stemcell", "--help"]), Ok(Command::Help));
        let Ok(Command::LightStemcellUsage(problem)) = parse_strs(&["light-stemcell", "--version"])
        else {
            panic!("usage");
        };
        assert!(problem.contains("--version needs a value"), "{problem}");
        // Only as the first argument.
        assert!(parse_strs(&["-configPath", "/c.json", "light-stemcell"]).is_err());
        assert!(HELP.contains("cpi light-stemcell IMAGE"));
    }

    #[test]
    fn errors_say_how_to_call() {
        for (args, needle) in [
            (&[][..], "no config file given"),
            (&["-configPath"], "-configPath needs a file"),
            (&["-configPath="], "-configPath needs a file"),
            (&["--frobnicate"], "unknown argument '--frobnicate'"),
            (&["/c.json"], "unknown argument '/c.json'"),
            (&["--config", "/a", "--config", "/b"], "more than once"),
        ] {
            let err = parse_strs(args).expect_err(needle);
            assert!(err.contains(needle), "{args:?}: {err}");
            assert!(err.contains("cpi -configPath FILE") || err.contains("one config file"));
        }
    }

    #[test]
    fn non_utf8_paths_are_kept() {
        let mut value = b"--config=/tmp/".to_vec();
        value.push(0xff);
        let parsed = parse([OsString::from(OsStr::from_bytes(&value))]).expect("parse");
        let Command::Run { config } = parsed else {
            panic!("{parsed:?}");
        };
        assert_eq!(config.as_os_str().as_bytes(), b"/tmp/\xff");
    }
}
