//! What goes into a light stemcell, decided without any IO: the image reference split
//! into its parts, the name, operating system and version derived from it (flags
//! win), and the `stemcell.MF` text, checked by parsing it back with the parser
//! `create_stemcell` uses.
//!
//! The rules (also in `docs/light-stemcells.md`):
//! - operating system: the `ubuntu-<codename>` words of the repository's last path
//!   component (`ghcr.io/cloudfoundry/ubuntu-noble-stemcell` → `ubuntu-noble`); when
//!   there are none, that component without a trailing `-stemcell`;
//! - name: `bosh-docker-<os>` (what the Go Docker CPI's light-stemcell script writes,
//!   so manifests that name the stemcell keep working);
//! - version: the tag; `latest` or no tag needs `--version`.

use cpi_core::stemcell::{normalise_digest, validate_image_reference, DOCKER_LIGHT};
use cpi_core::StemcellManifest;
use serde::Serialize;

/// The stemcell API version written when `--api-version` is not given: what the
/// Noble-era agents in the images support (the warden stemcells say 3).
pub const DEFAULT_API_VERSION: u64 = 3;

/// SHA-1 of the empty `image` file (the director records a stemcell's `sha1`).
pub const EMPTY_SHA1: &str = "da39a3ee5e6b4b0d3255bfef95601890afd80709";

/// An image reference as typed, split into repository, tag and digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The whole reference, as given (written to the manifest as it is).
    pub whole: String,
    /// `registry/path` without tag or digest.
    pub repository: String,
    /// The tag, when the reference has one.
    pub tag: Option<String>,
    /// The digest (`sha256:<hex>`), when the reference has one.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Splits and checks `reference` (the checks of `create_stemcell`, plus a
    /// well-formed digest).
    pub fn parse(reference: &str) -> Result<ImageRef, String> {
        validate_image_reference(reference).map_err(|e| e.message)?;
        let (rest, digest) = match reference.split_once('@') {
            Some((r, d)) => (r, Some(normalise_digest(d).map_err(|e| e.message)?)),
            None => (reference, None),
        };
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (
                &rest[..last_slash + i],
                Some(rest[last_slash + i + 1..].to_owned()),
            ),
            None => (rest, None),
        };
        if repository.is_empty() || repository.ends_with('/') {
            return Err(format!("image reference {reference:?} names no repository"));
        }
        if tag.as_deref() == Some("") {
            return Err(format!("image reference {reference:?} has an empty tag"));
        }
        Ok(ImageRef {
            whole: reference.to_owned(),
            repository: repository.to_owned(),
            tag,
            digest,
        })
    }

    /// The last path component of the repository (`ubuntu-noble-stemcell`).
    pub fn basename(&self) -> &str {
        self.repository
            .rsplit('/')
            .next()
            .unwrap_or(&self.repository)
    }
}

/// The operating system a repository's last component names.
pub fn derive_os(basename: &str) -> String {
    let words: Vec<&str> = basename.split(['-', '_', '.']).collect();
    if let Some(w) = words
        .windows(2)
        .find(|w| w[0] == "ubuntu" && !w[1].is_empty())
    {
        return format!("ubuntu-{}", w[1]);
    }
    match basename.strip_suffix("-stemcell") {
        Some(rest) if !rest.is_empty() => rest.to_owned(),
        _ => basename.to_owned(),
    }
}

/// The default stemcell name for an operating system.
pub fn derive_name(os: &str) -> String {
    format!("bosh-docker-{os}")
}

/// Checks a name, version or operating system: 1–128 characters of
/// `[A-Za-z0-9._+-]`, starting with a letter or digit (they end up in file names).
pub fn check_word(what: &str, flag: &str, value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the stemcell {what} {value:?} is not usable: it must be 1-128 characters of \
             letters, digits, '.', '_', '+' and '-', starting with a letter or digit; \
             give one with {flag}"
        ))
    }
}

/// What the operator asked for beyond the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--name`.
    pub name: Option<String>,
    /// `--version`.
    pub version: Option<String>,
    /// `--os`.
    pub os: Option<String>,
    /// `--api-version`.
    pub api_version: Option<u64>,
}

/// The identity of the stemcell to write (the digest is decided later).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `name`.
    pub name: String,
    /// `version`.
    pub version: String,
    /// `operating_system`.
    pub os: String,
    /// `api_version`.
    pub api_version: u64,
}

/// Derives the stemcell's identity from the image, flags first.
pub fn identity(image: &ImageRef, over: &Overrides) -> Result<Identity, String> {
    let os = over
        .os
        .clone()
        .unwrap_or_else(|| derive_os(image.basename()));
    check_word("operating system", "--os", &os)?;
    let name = over.name.clone().unwrap_or_else(|| derive_name(&os));
    check_word("name", "--name", &name)?;
    let version = match (&over.version, image.tag.as_deref()) {
        (Some(v), _) => v.clone(),
        (None, Some("latest")) => {
            return Err(format!(
                "the tag of {} is 'latest', which is not a stemcell version (and `latest` \
                 means \"the newest\" in deployment manifests): give one with --version",
                image.whole
            ))
        }
        (None, Some(tag)) => tag.to_owned(),
        (None, None) => {
            return Err(format!(
                "{} has no tag to take the stemcell version from: give one with --version",
                image.whole
            ))
        }
    };
    check_word("version", "--version", &version)?;
    Ok(Identity {
        name,
        version,
        os,
        api_version: over.api_version.unwrap_or(DEFAULT_API_VERSION),
    })
}

#[derive(Serialize)]
struct ManifestOut<'a> {
    name: &'a str,
    version: &'a str,
    bosh_protocol: &'a str,
    api_version: u64,
    sha1: &'a str,
    operating_system: &'a str,
    stemcell_formats: [&'a str; 1],
    cloud_properties: CloudPropertiesOut<'a>,
}

#[derive(Serialize)]
struct CloudPropertiesOut<'a> {
    image_reference: &'a str,
    digest: &'a str,
}

/// The `stemcell.MF` text, checked by parsing it back with [`StemcellManifest::parse`]
/// (the parser `create_stemcell` uses on both backends): what we write is what the
/// CPI will read.
pub fn manifest_text(id: &Identity, image: &ImageRef, digest: &str) -> Result<String, String> {
    let out = ManifestOut {
        name: &id.name,
        version: &id.version,
        bosh_protocol: "1",
        api_version: id.api_version,
        sha1: EMPTY_SHA1,
        operating_system: &id.os,
        stemcell_formats: [DOCKER_LIGHT],
        cloud_properties: CloudPropertiesOut {
            image_reference: &image.whole,
            digest,
        },
    };
    let text = serde_yaml_ng::to_string(&out)
        .map_err(|e| format!("cannot write stemcell.MF as YAML: {e}"))?;
    let back = StemcellManifest::parse(&text, "stemcell.MF (as written)").map_err(|e| e.message)?;
    let light = back.light_image().map_err(|e| e.message)?;
    let same = back.name == id.name
        && back.version == id.version
        && back.operating_system == id.os
        && back.api_version == Some(id.api_version)
        && back.is_light()
        && light.reference == image.whole
        && light.digest.as_deref() == Some(digest);
    if same {
        Ok(text)
    } else {
        Err(format!(
            "stemcell.MF would not read back as written (a bug in cpi light-stemcell):\n{text}"
        ))
    }
}

/// The default output file: `light-<name>-<version>.tgz`.
pub fn default_output(id: &Identity) -> String {
    format!("light-{}-{}.tgz", id.name, id.version)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn splits_references() {
        let r = ImageRef::parse("127.0.0.1:5000/bosh/ubuntu-noble:1.5").expect("ref");
        assert_eq!(r.repository, "127.0.0.1:5000/bosh/ubuntu-noble");
        assert_eq!(r.tag.as_deref(), Some("1.5"));
        assert_eq!(r.digest, None);
        assert_eq!(r.basename(), "ubuntu-noble");
        let r = ImageRef::parse(&format!("ghcr.io/cf/x:1@{}", hex('a'))).expect("ref");
        assert_eq!(r.repository, "ghcr.io/cf/x");
        assert_eq!(r.digest, Some(hex('a')));
        let r = ImageRef::parse("localhost:5000/stemcell").expect("ref");
        assert_eq!(r.repository, "localhost:5000/stemcell");
        assert_eq!(r.tag, None);
        for bad in ["", "a b:1", "/x:1", "x@sha256:nothex", "x:", "reg/:1"] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn os_and_name_from_the_repository() {
        for (basename, os) in [
            ("ubuntu-noble", "ubuntu-noble"),
            ("ubuntu-noble-stemcell", "ubuntu-noble"),
            ("bosh-warden-boshlite-ubuntu-jammy-go_agent", "ubuntu-jammy"),
            ("ubuntu_bionic", "ubuntu-bionic"),
            ("alpine-stemcell", "alpine"),
            ("stemcell", "stemcell"),
            ("busybox", "busybox"),
        ] {
            assert_eq!(derive_os(basename), os, "{basename}");
        }
        assert_eq!(derive_name("ubuntu-noble"), "bosh-docker-ubuntu-noble");
    }

    #[test]
    fn identity_flags_win_and_versions_come_from_tags() {
        let image = ImageRef::parse("127.0.0.1:5000/bosh/ubuntu-noble:1.5").expect("ref");
        let id = identity(&image, &Overrides::default()).expect("id");
        assert_eq!(
            id,
            Identity {
                name: "bosh-docker-ubuntu-noble".into(),
                version: "1.5".into(),
                os: "ubuntu-noble".into(),
                api_version: DEFAULT_API_VERSION,
            }
        );
        assert_eq!(
            default_output(&id),
            "light-bosh-docker-ubuntu-noble-1.5.tgz"
        );
        let over = Overrides {
            name: Some("my-stemcell".into()),
            version: Some("2.0".into()),
            os: Some("ubuntu-jammy".into()),
            api_version: Some(2),
        };
        let id = identity(&image, &over).expect("id");
        assert_eq!(
            (
                id.name.as_str(),
                id.version.as_str(),
                id.os.as_str(),
                id.api_version
            ),
            ("my-stemcell", "2.0", "ubuntu-jammy", 2)
        );
        // --os alone also renames.
        let id = identity(
            &image,
            &Overrides {
                os: Some("ubuntu-jammy".into()),
                ..Default::default()
            },
        )
        .expect("id");
        assert_eq!(id.name, "bosh-docker-ubuntu-jammy");
    }

    #[test]
    fn identity_refusals_name_the_flag() {
        for (reference, over, needle) in [
            ("reg/ubuntu-noble:latest", Overrides::default(), "--version"),
            ("reg/ubuntu-noble", Overrides::default(), "--version"),
            (
                "reg/ubuntu-noble:1",
                Overrides {
                    name: Some("a/b".into()),
                    ..Default::default()
                },
                "--name",
            ),
            (
                "reg/ubuntu-noble:1",
                Overrides {
                    os: Some(String::new()),
                    ..Default::default()
                },
                "--os",
            ),
        ] {
            let image = ImageRef::parse(reference).expect("ref");
            let err = identity(&image, &over).expect_err(needle);
            assert!(err.contains(needle), "{reference}: {err}");
        }
        // A flag rescues a tagless reference.
        let image = ImageRef::parse(&format!("reg/ubuntu-noble@{}", hex('b'))).expect("ref");
        let over = Overrides {
            version: Some("3.1".into()),
            ..Default::default()
        };
        assert_eq!(identity(&image, &over).expect("id").version, "3.1");
    }

    #[test]
    fn the_manifest_reads_back_as_written() {
        let image = ImageRef::parse("127.0.0.1:5000/bosh/ubuntu-noble:1.50").expect("ref");
        let id = identity(&image, &Overrides::default()).expect("id");
        let text = manifest_text(&id, &image, &hex('c')).expect("manifest");
        let m = StemcellManifest::parse(&text, "x").expect("parse");
        // `1.50` must stay a string, not become the number 1.5.
        assert_eq!(m.version, "1.50");
        assert_eq!(m.name, "bosh-docker-ubuntu-noble");
        assert_eq!(m.os(), "ubuntu-noble");
        assert!(m.wants_systemd());
        assert_eq!(m.stemcell_formats, vec![DOCKER_LIGHT.to_owned()]);
        let light = m.light_image().expect("light");
        assert_eq!(light.reference, image.whole);
        assert_eq!(light.digest, Some(hex('c')));
        let raw: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("yaml");
        assert_eq!(raw["sha1"].as_str(), Some(EMPTY_SHA1));
        assert_eq!(raw["bosh_protocol"].as_str(), Some("1"));
        // Versions that YAML would read as other types stay strings too.
        for version in ["1", "1e3", "true", "0x10"] {
            let id = Identity {
                version: version.into(),
                ..id.clone()
            };
            let text = manifest_text(&id, &image, &hex('c')).expect(version);
            let m = StemcellManifest::parse(&text, "x").expect("parse");
            assert_eq!(m.version, version);
        }
    }
}
