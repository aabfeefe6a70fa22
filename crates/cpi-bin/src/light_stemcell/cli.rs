//! The command line of `cpi light-stemcell`. Like the rest of `cpi`, a flag takes one
//! or two dashes and its value as the next argument or after `=`.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use cpi_core::stemcell::normalise_digest;

use super::plan::Overrides;

/// The usage line, appended to command-line errors.
pub const USAGE: &str = "usage: cpi light-stemcell IMAGE [--digest sha256:HEX] [--name NAME] \
[--version VERSION] [--os OS] [--api-version N] [--output FILE] [--insecure-registry] \
[--offline] [--username USER --password-file FILE] (see `cpi --help`)";

/// What `cpi light-stemcell` was asked to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// The image reference, e.g. `ghcr.io/cloudfoundry/ubuntu-noble-stemcell:1.165`.
    pub image: String,
    /// `--digest`, normalised to `sha256:<hex>`.
    pub digest: Option<String>,
    /// `--name`, `--version`, `--os`, `--api-version`.
    pub overrides: Overrides,
    /// `--output`.
    pub output: Option<PathBuf>,
    /// `--insecure-registry`: plain HTTP to the image's registry.
    pub insecure_registry: bool,
    /// `--offline`: do not ask the registry (needs a digest).
    pub offline: bool,
    /// `--username`.
    pub username: Option<String>,
    /// `--password-file`.
    pub password_file: Option<PathBuf>,
}

/// The outcome of parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Build a tarball.
    Build(Box<Options>),
    /// `--help`.
    Help,
}

const VALUED: [&str; 9] = [
    "digest",
    "name",
    "version",
    "os",
    "api-version",
    "output",
    "o",
    "username",
    "password-file",
];
const SWITCHES: [&str; 2] = ["insecure-registry", "offline"];

fn set<T>(slot: &mut Option<T>, flag: &str, value: T) -> Result<(), String> {
    if slot.is_some() {
        return Err(format!("--{flag} is given more than once"));
    }
    *slot = Some(value);
    Ok(())
}

fn text(flag: &str, value: OsString) -> Result<String, String> {
    match value.into_string() {
        Ok(s) if !s.is_empty() => Ok(s),
        Ok(_) => Err(format!("--{flag} needs a value")),
        Err(_) => Err(format!("the value of --{flag} is not UTF-8")),
    }
}

fn apply(o: &mut Options, flag: &str, value: OsString) -> Result<(), String> {
    match flag {
        "digest" => {
            let d = normalise_digest(&text(flag, value)?).map_err(|e| e.message)?;
            set(&mut o.digest, flag, d)
        }
        "name" => set(&mut o.overrides.name, flag, text(flag, value)?),
        "version" => set(&mut o.overrides.version, flag, text(flag, value)?),
        "os" => set(&mut o.overrides.os, flag, text(flag, value)?),
        "api-version" => {
            let v = text(flag, value)?;
            let n = v
                .parse::<u64>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| format!("--api-version needs a positive number, not {v:?}"))?;
            set(&mut o.overrides.api_version, flag, n)
        }
        "output" | "o" => {
            if value.is_empty() {
                return Err("--output needs a file".to_owned());
            }
            set(&mut o.output, "output", PathBuf::from(value))
        }
        "username" => set(&mut o.username, flag, text(flag, value)?),
        "password-file" => {
            if value.is_empty() {
                return Err("--password-file needs a file".to_owned());
            }
            set(&mut o.password_file, flag, PathBuf::from(value))
        }
        _ => Err(format!("unknown option --{flag}")),
    }
}

/// Parses the arguments after `light-stemcell`.
pub fn parse<I: IntoIterator<Item = OsString>>(args: I) -> Result<Parsed, String> {
    let mut o = Options::default();
    let mut image: Option<String> = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let bytes = arg.as_bytes();
        let Some(flag) = bytes
            .strip_prefix(b"--")
            .or_else(|| bytes.strip_prefix(b"-"))
            .filter(|f| !f.is_empty())
        else {
            let value = text("IMAGE", arg).map_err(|_| "the IMAGE is not UTF-8".to_owned())?;
            if let Some(first) = &image {
                return Err(format!(
                    "more than one image given ({first:?} and {value:?}); give one"
                ));
            }
            image = Some(value);
            continue;
        };
        let (name, inline) = match flag.iter().position(|b| *b == b'=') {
            Some(eq) => (
                &flag[..eq],
                Some(OsString::from(std::ffi::OsStr::from_bytes(&flag[eq + 1..]))),
            ),
            None => (flag, None),
        };
        let name = String::from_utf8_lossy(name).into_owned();
        if matches!(name.as_str(), "help" | "h") {
            return Ok(Parsed::Help);
        }
        if SWITCHES.contains(&name.as_str()) {
            if inline.is_some() {
                return Err(format!("--{name} takes no value"));
            }
            match name.as_str() {
                "offline" => o.offline = true,
                _ => o.insecure_registry = true,
            }
        } else if VALUED.contains(&name.as_str()) {
            let value = match inline {
                Some(v) => v,
                None => args
                    .next()
                    .ok_or_else(|| format!("--{name} needs a value"))?,
            };
            apply(&mut o, &name, value)?;
        } else {
            return Err(format!("unknown option '{}'", arg.to_string_lossy()));
        }
    }
    o.image = image.ok_or("no image given")?;
    match (&o.username, &o.password_file) {
        (Some(_), None) => return Err("--username needs --password-file".to_owned()),
        (None, Some(_)) => return Err("--password-file needs --username".to_owned()),
        _ => {}
    }
    if o.offline && (o.username.is_some() || o.insecure_registry) {
        return Err(
            "--offline does not contact the registry: drop --username, --password-file and \
             --insecure-registry"
                .to_owned(),
        );
    }
    Ok(Parsed::Build(Box::new(o)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_strs(args: &[&str]) -> Result<Parsed, String> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn every_flag_in_both_spellings() {
        let hex = "ab".repeat(32);
        let want = Options {
            image: "127.0.0.1:5000/bosh/ubuntu-noble:1.5".into(),
            digest: Some(format!("sha256:{hex}")),
            overrides: Overrides {
                name: Some("n".into()),
                version: Some("2".into()),
                os: Some("ubuntu-jammy".into()),
                api_version: Some(2),
            },
            output: Some("/tmp/x.tgz".into()),
            insecure_registry: true,
            offline: false,
            username: Some("u".into()),
            password_file: Some("/run/pw".into()),
        };
        let spaced = parse_strs(&[
            "127.0.0.1:5000/bosh/ubuntu-noble:1.5",
            "--digest",
            &hex,
            "--name",
            "n",
            "--version",
            "2",
            "--os",
            "ubuntu-jammy",
            "--api-version",
            "2",
            "-o",
            "/tmp/x.tgz",
            "--insecure-registry",
            "--username",
            "u",
            "--password-file",
            "/run/pw",
        ]);
        assert_eq!(spaced, Ok(Parsed::Build(Box::new(want.clone()))));
        let digest = format!("-digest=sha256:{hex}");
        let inline = parse_strs(&[
            "-name=n",
            "--version=2",
            "-os=ubuntu-jammy",
            "--api-version=2",
            "--output=/tmp/x.tgz",
            "-insecure-registry",
            "--username=u",
            "--password-file=/run/pw",
            &digest,
            "127.0.0.1:5000/bosh/ubuntu-noble:1.5",
        ]);
        assert_eq!(inline, Ok(Parsed::Build(Box::new(want))));
        assert_eq!(parse_strs(&["x:1", "--help"]), Ok(Parsed::Help));
        assert_eq!(parse_strs(&["-h"]), Ok(Parsed::Help));
    }

    #[test]
    fn bad_command_lines_say_what_is_wrong() {
        for (args, needle) in [
            (&[][..], "no image given"),
            (&["a:1", "b:1"], "more than one image"),
            (&["a:1", "--digest"], "--digest needs a value"),
            (&["a:1", "--digest", "md5:x"], "is not of the form sha256"),
            (&["a:1", "--name", "x", "--name", "y"], "more than once"),
            (&["a:1", "--api-version", "0"], "positive number"),
            (&["a:1", "--bogus"], "unknown option '--bogus'"),
            (&["a:1", "--offline=yes"], "takes no value"),
            (&["a:1", "--username", "u"], "needs --password-file"),
            (&["a:1", "--password-file", "/p"], "needs --username"),
            (&["a:1", "--version="], "--version needs a value"),
            (&["a:1", "--offline", "--insecure-registry"], "--offline"),
        ] {
            let err = parse_strs(args).expect_err(needle);
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }
}
