//! Light stemcells: an image in a registry, pulled by digest; the cid is the
//! immutable `repo@sha256:…`.

use bollard::auth::DockerCredentials;
use bollard::query_parameters::CreateImageOptions;
use cpi_core::stemcell::{normalise_digest, LightImage};
use cpi_core::{StemcellCid, StemcellManifest};
use futures_util::StreamExt;

use super::{long_running, remove_image};
use crate::client::Client;
use crate::config::DockerConfig;
use crate::error::{DockerError, Result};

/// An image reference split into repository, tag and digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `registry/path` without tag or digest.
    pub repository: String,
    /// The tag, if any.
    pub tag: Option<String>,
    /// The digest, if any.
    pub digest: Option<String>,
}

impl Reference {
    /// Splits `reference`.
    pub fn parse(reference: &str) -> Reference {
        let (rest, digest) = match reference.split_once('@') {
            Some((r, d)) => (r, Some(d.to_owned())),
            None => (reference, None),
        };
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (repository, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (
                rest[..last_slash + i].to_owned(),
                Some(rest[last_slash + i + 1..].to_owned()),
            ),
            None => (rest.to_owned(), None),
        };
        Reference {
            repository,
            tag,
            digest,
        }
    }

    /// The registry host the repository lives on (`docker.io` when none is named).
    pub fn registry(&self) -> String {
        match self.repository.split_once('/') {
            Some((first, _))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                first.to_owned()
            }
            _ => "docker.io".to_owned(),
        }
    }
}

/// What to pull for a light stemcell and what its cid will be (pure): with a digest,
/// `repo@digest` for both; without, the tag (only when verification is off).
pub fn light_pull_plan(
    image: &LightImage,
    require_verification: bool,
) -> Result<(String, Option<String>)> {
    let r = Reference::parse(&image.reference);
    let digest = match (&image.digest, &r.digest) {
        (Some(d), Some(rd)) if normalise_digest(rd).ok().as_ref() != Some(d) => {
            return Err(DockerError::Invalid(format!(
                "light stemcell: image_reference {} carries digest {rd} but cloud_properties.digest is {d}",
                image.reference
            )))
        }
        (Some(d), _) => Some(d.clone()),
        (None, Some(rd)) => Some(normalise_digest(rd).map_err(|e| DockerError::Invalid(e.message))?),
        (None, None) => None,
    };
    match digest {
        Some(d) => {
            let pinned = format!("{}@{d}", r.repository);
            Ok((pinned, Some(d)))
        }
        None if require_verification => Err(DockerError::Invalid(format!(
            "light stemcell {} has no digest, and light_stemcell.require_image_verification is on: add cloud_properties.digest (sha256:...) to its stemcell.MF, or turn verification off",
            image.reference
        ))),
        None => Ok((
            format!("{}:{}", r.repository, r.tag.as_deref().unwrap_or("latest")),
            None,
        )),
    }
}

fn credentials(config: &DockerConfig, registry: &str) -> Option<DockerCredentials> {
    let auth = &config.light_stemcell.registry_auth;
    let found = auth.get(registry).or_else(|| {
        (registry == "docker.io")
            .then(|| {
                auth.get("index.docker.io")
                    .or_else(|| auth.get("https://index.docker.io/v1/"))
            })
            .flatten()
    })?;
    Some(DockerCredentials {
        username: Some(found.username.clone()),
        password: Some(found.password.clone()),
        serveraddress: Some(registry.to_owned()),
        ..Default::default()
    })
}

pub(super) async fn create_light(
    client: &Client,
    config: &DockerConfig,
    manifest: &StemcellManifest,
) -> Result<StemcellCid> {
    if config.light_stemcell.disabled {
        return Err(DockerError::Invalid(
            "light stemcells are disabled by light_stemcell.disabled in the CPI config; upload a full stemcell".into(),
        ));
    }
    let image = manifest
        .light_image()
        .map_err(|e| DockerError::Invalid(e.message))?;
    let (pull, digest) = light_pull_plan(&image, config.light_stemcell.require_image_verification)?;
    let reference = Reference::parse(&image.reference);
    let creds = credentials(config, &reference.registry());
    tracing::info!(image = %pull, authenticated = creds.is_some(), "pulling light stemcell");
    let mut progress = long_running(client).create_image(
        Some(CreateImageOptions {
            from_image: Some(pull.clone()),
            ..Default::default()
        }),
        None,
        creds,
    );
    while let Some(item) = progress.next().await {
        item.map_err(client.err(format!(
            "pulling light stemcell image {pull} (check the reference, the registry and light_stemcell.registry_auth)"
        )))?;
    }
    let inspected = client
        .docker
        .inspect_image(&pull)
        .await
        .map_err(client.err(format!("inspecting pulled image {pull}")))?;
    let repo_digests = inspected.repo_digests.unwrap_or_default();
    let cid = match &digest {
        Some(d) => {
            if !repo_digests.iter().any(|rd| rd.ends_with(&format!("@{d}"))) {
                let removed = remove_image(client, &pull).await;
                let err = DockerError::Conflict(format!(
                    "light stemcell {}: the pulled image's digests ({}) do not include {d}; the image was removed",
                    image.reference,
                    repo_digests.join(", ")
                ));
                return Err(match removed {
                    Ok(()) => err,
                    Err(e) => err.with_cleanup(vec![e]),
                });
            }
            pull
        }
        None => {
            let wanted = reference.repository.clone();
            match repo_digests
                .iter()
                .find(|rd| rd.split('@').next() == Some(wanted.as_str()))
                .or_else(|| repo_digests.first())
            {
                Some(rd) => rd.clone(),
                None => inspected.id.unwrap_or(pull),
            }
        }
    };
    StemcellCid::new(cid).map_err(|e| DockerError::Invalid(e.message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = Reference::parse("127.0.0.1:5000/cpi-test/busybox:1");
        assert_eq!(r.repository, "127.0.0.1:5000/cpi-test/busybox");
        assert_eq!(r.tag.as_deref(), Some("1"));
        assert_eq!(r.registry(), "127.0.0.1:5000");
        let r = Reference::parse("ubuntu@sha256:abc");
        assert_eq!(r.repository, "ubuntu");
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some("sha256:abc"));
        assert_eq!(r.registry(), "docker.io");
        let r = Reference::parse("localhost/x:2@sha256:abc");
        assert_eq!(r.repository, "localhost/x");
        assert_eq!(r.registry(), "localhost");
    }

    #[test]
    fn light_pulls_by_digest_and_demands_one() {
        let d = format!("sha256:{}", "b".repeat(64));
        let image = LightImage {
            reference: "127.0.0.1:5000/sc:1".into(),
            digest: Some(d.clone()),
        };
        assert_eq!(
            light_pull_plan(&image, true).expect("plan"),
            (format!("127.0.0.1:5000/sc@{d}"), Some(d.clone()))
        );
        let undigested = LightImage {
            reference: "127.0.0.1:5000/sc:1".into(),
            digest: None,
        };
        let err = light_pull_plan(&undigested, true).expect_err("verification");
        assert!(
            err.to_string().contains("require_image_verification"),
            "{err}"
        );
        assert_eq!(
            light_pull_plan(&undigested, false).expect("plan"),
            ("127.0.0.1:5000/sc:1".to_owned(), None)
        );
        let conflicting = LightImage {
            reference: format!("127.0.0.1:5000/sc@sha256:{}", "c".repeat(64)),
            digest: Some(d),
        };
        assert!(light_pull_plan(&conflicting, true).is_err());
    }
}
