//! Asks the image's registry for its digest: a HEAD of the manifest with the media
//! types the containerd backend accepts (OCI and Docker v2 manifests and indexes), so
//! the digest is the one both backends pull by and verify (an index's digest for a
//! multi-platform image). oci-client falls back to a GET and the body's digest when
//! the registry sends no `Docker-Content-Digest`.
//!
//! The answer is classified: the registry could not be reached at all (then a
//! `--digest` may stand in), the registry says the image does not exist, or some
//! other refusal (credentials, a server error). Credentials go to oci-client only;
//! none of our messages contains them.

use std::str::FromStr;
use std::time::Duration;

use cpi_core::stemcell::normalise_digest;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::Digest;

/// Manifest media types asked for (the containerd backend's list).
const ACCEPTED: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// How long to wait for a connection and for an answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// How to reach the registry.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Speak plain HTTP to the image's registry.
    pub plain_http: bool,
    /// User name and password, when the registry needs them.
    pub credentials: Option<(String, String)>,
}

/// Why no digest came from the registry.
#[derive(Debug)]
pub enum LookupError {
    /// No connection (refused, no route, DNS, TLS handshake, timeout).
    Unreachable(String),
    /// The registry answered that the repository or the manifest does not exist.
    NotFound(String),
    /// The registry answered, but not with a manifest (credentials, server error).
    Refused(String),
}

impl LookupError {
    /// The explanation.
    pub fn message(&self) -> &str {
        match self {
            LookupError::Unreachable(m) | LookupError::NotFound(m) | LookupError::Refused(m) => m,
        }
    }
}

/// Whether a registry host is on this machine (`localhost`, `127.0.0.0/8`, `::1`):
/// spoken to over plain HTTP, as Docker does.
pub fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => registry.split(':').next().unwrap_or(registry),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The sha256 digest of bytes, `sha256:<hex>`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", sha2::Sha256::digest(bytes))
}

/// Fetches the top-level manifest of `reference` and returns its digest.
pub async fn manifest_digest(reference: &str, access: &Access) -> Result<String, LookupError> {
    let parsed = Reference::from_str(reference).map_err(|e| {
        LookupError::Refused(format!("{reference:?} is not an image reference: {e}"))
    })?;
    let registry = parsed.resolve_registry().to_owned();
    let plain = access.plain_http || is_loopback(&registry);
    // The registry client's TLS uses ring, the provider bollard's TLS uses too (one
    // provider compiled in: no aws-lc start-up code in every CPI process).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::new(ClientConfig {
        protocol: if plain {
            ClientProtocol::HttpsExcept(vec![registry.clone(), parsed.registry().to_owned()])
        } else {
            ClientProtocol::Https
        },
        connect_timeout: Some(CONNECT_TIMEOUT),
        read_timeout: Some(READ_TIMEOUT),
        ..Default::default()
    });
    let auth = match &access.credentials {
        Some((user, password)) => RegistryAuth::Basic(user.clone(), password.clone()),
        None => RegistryAuth::Anonymous,
    };
    let scheme = if plain { "http" } else { "https" };
    let endpoint = format!("{scheme}://{registry}");
    let fail = |e| classify(e, &endpoint, &parsed.whole(), access.credentials.is_some());
    // HEAD first: Docker Hub does not count it against the pull rate limit. Its
    // Docker-Content-Digest is the registry's word; both backends check the bytes
    // against it when they pull.
    let said = client
        .fetch_manifest_digest(&parsed, &auth)
        .await
        .map_err(fail)?;
    if normalise_digest(&said).is_ok_and(|d| d == said) {
        return Ok(said);
    }
    // Another algorithm in the header: GET the bytes and take their sha256, which is
    // what the backends pull by.
    let (bytes, _) = client
        .pull_manifest_raw(&parsed, &auth, ACCEPTED)
        .await
        .map_err(fail)?;
    Ok(sha256(&bytes))
}

fn classify(
    e: OciDistributionError,
    endpoint: &str,
    whole: &str,
    with_credentials: bool,
) -> LookupError {
    let text = e.to_string();
    match &e {
        OciDistributionError::RequestError(re)
            if re.is_connect() || re.is_timeout() || re.is_request() =>
        {
            LookupError::Unreachable(format!(
                "cannot reach {endpoint}: {}",
                cpi_core::error::error_chain(re)
            ))
        }
        OciDistributionError::ImageManifestNotFoundError(_) => {
            LookupError::NotFound(format!("{endpoint} has no image {whole}: {text}"))
        }
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|err| {
                matches!(
                    err.code,
                    OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown
                )
            }) =>
        {
            LookupError::NotFound(format!("{endpoint} has no image {whole}: {text}"))
        }
        OciDistributionError::ServerError { code: 404, .. } => {
            LookupError::NotFound(format!("{endpoint} has no image {whole}: {text}"))
        }
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => LookupError::Refused(format!(
            "{endpoint} refused access to {whole} ({text}): {}",
            if with_credentials {
                "check --username and the password in --password-file"
            } else {
                "give --username and --password-file"
            }
        )),
        _ => LookupError::Refused(format!("asking {endpoint} for {whole}: {text}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries() {
        for r in [
            "127.0.0.1:5000",
            "localhost",
            "localhost:5000",
            "127.1.2.3",
            "[::1]:5000",
        ] {
            assert!(is_loopback(r), "{r}");
        }
        for r in ["ghcr.io", "10.0.0.1:5000", "docker.io", "localhost.example"] {
            assert!(!is_loopback(r), "{r}");
        }
    }

    #[test]
    fn sha256_of_bytes() {
        assert_eq!(
            sha256(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn registry_answers_are_classified() {
        let not_found = [
            OciDistributionError::ImageManifestNotFoundError("x".into()),
            OciDistributionError::ServerError {
                code: 404,
                url: "u".into(),
                message: "m".into(),
            },
        ];
        for e in not_found {
            let c = classify(e, "http://r", "r/x:1", false);
            assert!(matches!(c, LookupError::NotFound(_)), "{c:?}");
            assert!(c.message().contains("has no image r/x:1"), "{c:?}");
        }
        let denied = || OciDistributionError::UnauthorizedError { url: "u".into() };
        let c = classify(denied(), "http://r", "r/x:1", false);
        assert!(matches!(c, LookupError::Refused(_)), "{c:?}");
        assert!(c.message().contains("give --username"), "{c:?}");
        let c = classify(denied(), "http://r", "r/x:1", true);
        assert!(c.message().contains("check --username"), "{c:?}");
        let c = classify(
            OciDistributionError::ServerError {
                code: 500,
                url: "u".into(),
                message: "boom".into(),
            },
            "http://r",
            "r/x:1",
            false,
        );
        assert!(matches!(c, LookupError::Refused(_)), "{c:?}");
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable() {
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        let err = manifest_digest("127.0.0.1:1/x/ubuntu-noble:1", &Access::default())
            .await
            .expect_err("nothing listens on port 1");
        assert!(matches!(err, LookupError::Unreachable(_)), "{err:?}");
        assert!(err.message().contains("127.0.0.1:1"), "{err:?}");
    }
}
