//! Stemcell manifests (`stemcell.MF`), full and light.
//!
//! The director hands `create_stemcell` the path of the unpacked `image` file; the
//! manifest sits beside it. Parsing is pure here; backends read the file.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{CpiError, CpiResult};

/// The largest manifest we parse. Real ones are well under 4 KiB.
pub const MAX_MANIFEST_BYTES: usize = 1 << 20;

/// The format name that marks a light stemcell for container CPIs.
pub const DOCKER_LIGHT: &str = "docker-light";

/// `stemcell.MF`, the fields a container CPI uses.
#[derive(Debug, Clone, PartialEq)]
pub struct StemcellManifest {
    /// e.g. `bosh-warden-boshlite-ubuntu-noble`.
    pub name: String,
    /// e.g. `1.165` (YAML may write it as a number; we keep its text).
    pub version: String,
    /// e.g. `ubuntu-noble`.
    pub operating_system: String,
    /// The stemcell API version, when given.
    pub api_version: Option<u64>,
    /// e.g. `[warden-tar, general-tar]` or `[docker-light]`.
    pub stemcell_formats: Vec<String>,
    /// `cloud_properties`, kept as JSON.
    pub cloud_properties: Map<String, Value>,
}

/// What a light stemcell points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LightImage {
    /// An image reference such as `ghcr.io/cloudfoundry/ubuntu-noble-stemcell:1.165`.
    pub reference: String,
    /// `sha256:<64 hex>`, when the manifest gives one.
    pub digest: Option<String>,
}

#[derive(Deserialize)]
struct RawManifest {
    name: Option<serde_yaml_ng::Value>,
    version: Option<serde_yaml_ng::Value>,
    operating_system: Option<serde_yaml_ng::Value>,
    api_version: Option<u64>,
    #[serde(default)]
    stemcell_formats: Option<Vec<String>>,
    #[serde(default)]
    cloud_properties: Option<serde_yaml_ng::Value>,
}

fn scalar_text(v: &serde_yaml_ng::Value) -> Option<String> {
    match v {
        serde_yaml_ng::Value::String(s) => Some(s.clone()),
        serde_yaml_ng::Value::Number(n) => Some(n.to_string()),
        serde_yaml_ng::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl StemcellManifest {
    /// Parses manifest text; `origin` names the file in error messages.
    pub fn parse(text: &str, origin: &str) -> CpiResult<StemcellManifest> {
        let bad = |m: String| CpiError::bad_argument(format!("stemcell manifest {origin}: {m}"));
        if text.len() > MAX_MANIFEST_BYTES {
            return Err(bad(format!(
                "is {} bytes; at most {MAX_MANIFEST_BYTES} are accepted",
                text.len()
            )));
        }
        let raw: RawManifest =
            serde_yaml_ng::from_str(text).map_err(|e| bad(format!("is not valid YAML: {e}")))?;
        let field = |v: &Option<serde_yaml_ng::Value>, key: &str| -> CpiResult<String> {
            v.as_ref()
                .and_then(scalar_text)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad(format!("'{key}' is missing or not a string")))
        };
        let cloud_properties = match raw.cloud_properties {
            None | Some(serde_yaml_ng::Value::Null) => Map::new(),
            Some(v) => match serde_json::to_value(v) {
                Ok(Value::Object(m)) => m,
                _ => return Err(bad("'cloud_properties' must be a mapping".into())),
            },
        };
        Ok(StemcellManifest {
            name: field(&raw.name, "name")?,
            version: field(&raw.version, "version")?,
            operating_system: raw
                .operating_system
                .as_ref()
                .and_then(scalar_text)
                .unwrap_or_default(),
            api_version: raw.api_version,
            stemcell_formats: raw.stemcell_formats.unwrap_or_default(),
            cloud_properties,
        })
    }

    /// True for a light stemcell (formats include `docker-light`).
    pub fn is_light(&self) -> bool {
        self.stemcell_formats.iter().any(|f| f == DOCKER_LIGHT)
    }

    /// The image a light stemcell names, with its digest checked for shape.
    pub fn light_image(&self) -> CpiResult<LightImage> {
        let reference = self
            .cloud_properties
            .get("image_reference")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                CpiError::bad_argument(
                    "light stemcell manifest lacks cloud_properties.image_reference",
                )
            })?;
        validate_image_reference(reference)?;
        let digest = match self.cloud_properties.get("digest") {
            None | Some(Value::Null) => None,
            Some(Value::String(d)) if d.is_empty() => None,
            Some(Value::String(d)) => Some(normalise_digest(d)?),
            Some(other) => {
                return Err(CpiError::bad_argument(format!(
                    "light stemcell manifest: cloud_properties.digest must be a string, got {other}"
                )))
            }
        };
        Ok(LightImage {
            reference: reference.to_owned(),
            digest,
        })
    }

    /// The operating system, falling back to the name's `ubuntu-<codename>` part.
    pub fn os(&self) -> String {
        if !self.operating_system.is_empty() {
            return self.operating_system.clone();
        }
        self.name
            .split('-')
            .collect::<Vec<_>>()
            .windows(2)
            .find(|w| w[0] == "ubuntu")
            .map(|w| format!("ubuntu-{}", w[1]))
            .unwrap_or_default()
    }

    /// Whether VMs of this stemcell need systemd as PID 1: Ubuntu Noble and later
    /// (the warden stemcells switched with Noble), anything else runs runit.
    pub fn wants_systemd(&self) -> bool {
        os_wants_systemd(&self.os())
    }
}

/// Whether an operating system name means a systemd stemcell (Ubuntu Noble or later).
pub fn os_wants_systemd(os: &str) -> bool {
    const RUNIT_ERA: [&str; 6] = ["trusty", "xenial", "bionic", "focal", "jammy", "centos"];
    match os.strip_prefix("ubuntu-") {
        Some(codename) => !RUNIT_ERA.contains(&codename),
        None => false,
    }
}

/// Where the manifest lives for a given `image` path (the director's argument).
pub fn manifest_path_for(image_path: &Path) -> PathBuf {
    image_path
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("stemcell.MF")
}

/// Checks an image reference: non-empty, no `..`, not starting with `/`, `:` or `@`,
/// no whitespace or control characters.
pub fn validate_image_reference(reference: &str) -> CpiResult<()> {
    let bad = |m: &str| {
        Err(CpiError::bad_argument(format!(
            "image reference {reference:?} {m}"
        )))
    };
    if reference.is_empty() {
        return bad("is empty");
    }
    if reference.len() > 512 {
        return bad("is longer than 512 characters");
    }
    if reference.contains("..") {
        return bad("contains '..'");
    }
    if reference.starts_with(['/', ':', '@']) {
        return bad("must not start with '/', ':' or '@'");
    }
    if reference
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return bad("contains whitespace or control characters");
    }
    Ok(())
}

/// Accepts `sha256:<hex>` or bare `<hex>` (64 lowercase hex digits) and returns
/// `sha256:<hex>`.
pub fn normalise_digest(digest: &str) -> CpiResult<String> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    if hex.len() == 64
        && hex
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    {
        Ok(format!("sha256:{hex}"))
    } else {
        Err(CpiError::bad_argument(format!(
            "digest {digest:?} is not of the form sha256:<64 lowercase hex digits>"
        )))
    }
}

/// How many bytes of each end of a stemcell image [`image_fingerprint`] reads.
pub const FINGERPRINT_PART: u64 = 64 * 1024;

/// A cheap fingerprint of a stemcell image from its size and its first and last
/// [`FINGERPRINT_PART`] bytes (a gzip file ends with the CRC and size of its content,
/// so a different image of the same name and version almost surely differs there).
/// Backends label imported stemcells with it, so that a retried `create_stemcell`
/// whose answer was lost finds the image it made. The caller opens the file; this
/// reads at most two parts of it.
pub fn image_fingerprint<R: std::io::Read + std::io::Seek>(
    mut image: R,
) -> std::io::Result<String> {
    use std::io::{Read, SeekFrom};
    let size = image.seek(SeekFrom::End(0))?;
    image.seek(SeekFrom::Start(0))?;
    let mut head = Vec::new();
    image
        .by_ref()
        .take(FINGERPRINT_PART)
        .read_to_end(&mut head)?;
    let mut tail = Vec::new();
    if size > FINGERPRINT_PART {
        let from = size.saturating_sub(FINGERPRINT_PART).max(FINGERPRINT_PART);
        image.seek(SeekFrom::Start(from))?;
        image.take(FINGERPRINT_PART).read_to_end(&mut tail)?;
    }
    // FNV-1a, 64 bits: stable across processes, builds and versions.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in size.to_le_bytes().iter().chain(&head).chain(&tail) {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    Ok(format!("{size}-{hash:016x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_depend_on_size_and_both_ends_only() {
        use std::io::Cursor;
        let print = |bytes: &[u8]| image_fingerprint(Cursor::new(bytes)).expect("fingerprint");
        let big = vec![7u8; 3 * FINGERPRINT_PART as usize];
        let a = print(&big);
        assert_eq!(a, print(&big));
        assert!(a.starts_with(&format!("{}-", big.len())), "{a}");
        let mut first = big.clone();
        first[0] = 8;
        assert_ne!(a, print(&first));
        let mut last = big.clone();
        *last.last_mut().expect("last") = 8;
        assert_ne!(a, print(&last));
        let mut middle = big.clone();
        middle[FINGERPRINT_PART as usize + 10] = 8;
        assert_eq!(a, print(&middle), "the middle is not read");
        assert_ne!(print(b"small"), print(b"smal1"));
    }

    const FULL: &str = "---\nname: bosh-warden-boshlite-ubuntu-noble\nversion: 1.165\nbosh_protocol: 1\napi_version: 3\nsha1: abc\noperating_system: ubuntu-noble\nstemcell_formats:\n- warden-tar\n- general-tar\ncloud_properties:\n  infrastructure: warden\n  architecture: x86_64\n";

    #[test]
    fn parses_a_full_manifest() {
        let m = StemcellManifest::parse(FULL, "stemcell.MF").expect("parse");
        assert_eq!(m.name, "bosh-warden-boshlite-ubuntu-noble");
        assert_eq!(m.version, "1.165");
        assert_eq!(m.api_version, Some(3));
        assert!(!m.is_light());
        assert!(m.wants_systemd());
        assert_eq!(m.cloud_properties["architecture"], "x86_64");
    }

    #[test]
    fn parses_a_light_manifest() {
        let text = format!(
            "name: bosh-docker-ubuntu-jammy\nversion: '1.0'\noperating_system: ubuntu-jammy\nstemcell_formats: [docker-light]\ncloud_properties:\n  image_reference: 127.0.0.1:5000/stemcell:1.0\n  digest: sha256:{}\n",
            "a".repeat(64)
        );
        let m = StemcellManifest::parse(&text, "stemcell.MF").expect("parse");
        assert!(m.is_light());
        assert!(!m.wants_systemd());
        let img = m.light_image().expect("light");
        assert_eq!(img.reference, "127.0.0.1:5000/stemcell:1.0");
        assert_eq!(img.digest, Some(format!("sha256:{}", "a".repeat(64))));
    }

    #[test]
    fn os_falls_back_to_name() {
        let m = StemcellManifest::parse(
            "name: bosh-warden-boshlite-ubuntu-jammy-go_agent\nversion: 1\n",
            "x",
        )
        .expect("parse");
        assert_eq!(m.os(), "ubuntu-jammy");
        assert!(!m.wants_systemd());
    }

    #[test]
    fn init_by_os() {
        assert!(os_wants_systemd("ubuntu-noble"));
        assert!(os_wants_systemd("ubuntu-resolute"));
        assert!(!os_wants_systemd("ubuntu-jammy"));
        assert!(!os_wants_systemd("ubuntu-bionic"));
        assert!(!os_wants_systemd(""));
    }

    #[test]
    fn refuses_bad_manifests() {
        for (text, needle) in [
            ("name: [unclosed", "not valid YAML"),
            ("version: 1\n", "'name'"),
            ("name: x\n", "'version'"),
            ("name: x\nversion: 1\ncloud_properties: [1]\n", "mapping"),
        ] {
            let err = StemcellManifest::parse(text, "stemcell.MF").expect_err(needle);
            assert!(err.message.contains(needle), "{needle}: {}", err.message);
        }
        let huge = format!(
            "name: x\nversion: 1\npad: '{}'\n",
            "a".repeat(MAX_MANIFEST_BYTES)
        );
        assert!(StemcellManifest::parse(&huge, "x").is_err());
    }

    #[test]
    fn references_and_digests() {
        assert!(validate_image_reference("ghcr.io/a/b:1").is_ok());
        for bad in ["", "/x", ":x", "@x", "a/../b", "a b"] {
            assert!(validate_image_reference(bad).is_err(), "{bad}");
        }
        let hex = "0123456789abcdef".repeat(4);
        assert_eq!(normalise_digest(&hex).ok(), Some(format!("sha256:{hex}")));
        assert!(normalise_digest("sha256:XYZ").is_err());
        assert!(normalise_digest(&format!("sha256:{}", hex.to_uppercase())).is_err());
    }

    #[test]
    fn manifest_beside_image() {
        assert_eq!(
            manifest_path_for(Path::new("/tmp/sc/image")),
            PathBuf::from("/tmp/sc/stemcell.MF")
        );
    }
}
