//! Stemcells as Docker images.
//!
//! A full stemcell's `image` (a gzip tar of the root filesystem) is streamed from disk
//! into `POST /images/create?fromSrc=-` as it is (Docker gunzips): no copy, no buffer
//! of the whole file. The image is tagged `bosh-stemcell:<uuid>` (the cid) and
//! labelled with the stemcell's name, version and operating system, so `create_vm`
//! picks the init system from it.
//!
//! A light stemcell names an image in a registry; we pull it by digest and answer the
//! immutable `repo@sha256:…` as the cid ([`light`]).

pub mod light;

use std::collections::HashMap;

use bollard::query_parameters::{CreateImageOptions, RemoveImageOptions};
use cpi_core::stemcell::{manifest_path_for, DOCKER_LIGHT};
use cpi_core::{CallContext, CreateStemcell, StemcellCid, StemcellManifest};
use futures_util::StreamExt;
use serde_json::Value;

use crate::client::Client;
use crate::config::DockerConfig;
use crate::error::{DockerError, Result};
use crate::labels;

/// The repository full stemcells are imported into.
pub const REPOSITORY: &str = "bosh-stemcell";

/// What we know about a stemcell image when creating a VM from it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StemcellImage {
    /// The image id (`sha256:…`).
    pub id: String,
    /// The operating system from our label, if the image has it.
    pub os: Option<String>,
}

/// Docker's platform string for a stemcell architecture (`x86_64` → `linux/amd64`).
pub fn platform_for(architecture: &str) -> Option<String> {
    let arch = match architecture.trim().to_ascii_lowercase().as_str() {
        "" => return None,
        "x86_64" | "amd64" => "amd64",
        "aarch64" | "arm64" => "arm64",
        "ppc64le" => "ppc64le",
        "s390x" => "s390x",
        other => return Some(format!("linux/{other}")),
    };
    Some(format!("linux/{arch}"))
}

/// The `LABEL` changes of an import (pure).
pub fn import_changes(manifest: Option<&StemcellManifest>, ctx: &CallContext) -> Vec<String> {
    let mut base: Vec<(String, String)> = labels::base(labels::KIND_STEMCELL, ctx)
        .into_iter()
        .collect();
    base.sort();
    let mut changes: Vec<String> = base
        .iter()
        .map(|(k, v)| labels::dockerfile_label(k, v))
        .collect();
    if let Some(m) = manifest {
        changes.push(labels::dockerfile_label(labels::STEMCELL_NAME, &m.name));
        changes.push(labels::dockerfile_label(
            labels::STEMCELL_VERSION,
            &m.version,
        ));
        let os = m.os();
        if !os.is_empty() {
            changes.push(labels::dockerfile_label(labels::STEMCELL_OS, &os));
        }
    }
    changes
}

/// Imports a stemcell.
pub async fn create(
    client: &Client,
    config: &DockerConfig,
    ctx: &CallContext,
    req: &CreateStemcell,
) -> Result<StemcellCid> {
    let manifest_path = manifest_path_for(&req.image_path);
    let manifest = match tokio::fs::read_to_string(&manifest_path).await {
        Ok(text) => Some(
            StemcellManifest::parse(&text, &manifest_path.display().to_string())
                .map_err(|e| DockerError::Invalid(e.message))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(path = %manifest_path.display(), "no stemcell.MF beside the image: importing without name, version and operating system");
            None
        }
        Err(e) => {
            return Err(DockerError::io(
                "reading the stemcell manifest",
                manifest_path,
                e,
            ))
        }
    };
    let light = manifest.as_ref().is_some_and(StemcellManifest::is_light)
        || req.cloud_properties.contains_key("image_reference")
            && req
                .cloud_properties
                .get("stemcell_formats")
                .is_none_or(|f| f.to_string().contains(DOCKER_LIGHT));
    if light {
        let manifest = match manifest {
            Some(m) => m,
            None => StemcellManifest {
                name: String::new(),
                version: String::new(),
                operating_system: String::new(),
                api_version: None,
                stemcell_formats: vec![DOCKER_LIGHT.into()],
                cloud_properties: req.cloud_properties.clone(),
            },
        };
        return light::create_light(client, config, &manifest).await;
    }
    create_full(client, ctx, req, manifest.as_ref()).await
}

/// The image of a full stemcell must be a regular file (checked on the opened
/// file, so symlinks are followed): a device such as `/dev/zero` would stream into
/// the daemon for ever, a directory fails with a confusing read error.
fn check_regular_file(meta: &std::fs::Metadata, path: &std::path::Path) -> Result<()> {
    if meta.is_file() {
        return Ok(());
    }
    let what = if meta.is_dir() {
        "a directory"
    } else {
        "a device, socket or pipe"
    };
    Err(DockerError::io(
        "checking the stemcell image",
        path,
        std::io::Error::other(format!(
            "it is {what}, not a regular file; pass the 'image' file of an unpacked stemcell"
        )),
    ))
}

async fn create_full(
    client: &Client,
    ctx: &CallContext,
    req: &CreateStemcell,
    manifest: Option<&StemcellManifest>,
) -> Result<StemcellCid> {
    let tag = uuid::Uuid::new_v4().to_string();
    let cid = format!("{REPOSITORY}:{tag}");
    let architecture = req
        .cloud_properties
        .get("architecture")
        .and_then(Value::as_str)
        .or_else(|| {
            manifest
                .and_then(|m| m.cloud_properties.get("architecture"))
                .and_then(Value::as_str)
        })
        .unwrap_or_default();
    let file = tokio::fs::File::open(&req.image_path)
        .await
        .map_err(|e| DockerError::io("opening the stemcell image", &req.image_path, e))?;
    let meta = file
        .metadata()
        .await
        .map_err(|e| DockerError::io("reading the stemcell image", &req.image_path, e))?;
    check_regular_file(&meta, &req.image_path)?;
    let fingerprint = crate::vm::orphans::image_fingerprint(&req.image_path)
        .map_err(|e| DockerError::io("reading the stemcell image", &req.image_path, e))?;
    if let Some(m) = manifest {
        if let Some(cid) =
            crate::vm::orphans::existing_stemcell(client, ctx, m, &fingerprint).await?
        {
            tracing::info!(cid = %cid, "this stemcell was imported already (by a call whose answer was lost)");
            return StemcellCid::new(cid).map_err(|e| DockerError::Invalid(e.message));
        }
    }
    let size = meta.len();
    tracing::info!(image = %req.image_path.display(), bytes = size, cid = %cid, "importing stemcell");
    // 256 KiB reads: big enough to keep the socket busy, small enough not to matter.
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
    let options = CreateImageOptions {
        from_src: Some("-".into()),
        repo: Some(REPOSITORY.into()),
        tag: Some(tag),
        changes: {
            let mut changes = import_changes(manifest, ctx);
            changes.push(labels::dockerfile_label(
                crate::vm::orphans::IMAGE_FINGERPRINT,
                &fingerprint,
            ));
            changes
        },
        platform: platform_for(architecture).unwrap_or_default(),
        ..Default::default()
    };
    let mut progress =
        client
            .docker
            .create_image(Some(options), Some(bollard::body_try_stream(stream)), None);
    while let Some(item) = progress.next().await {
        item.map_err(client.err(format!(
            "importing stemcell image {} as {cid}",
            req.image_path.display()
        )))?;
    }
    // Make sure the tag is there (an import that failed quietly leaves nothing).
    client
        .docker
        .inspect_image(&cid)
        .await
        .map_err(client.err(format!("inspecting the imported stemcell {cid}")))?;
    StemcellCid::new(cid).map_err(|e| DockerError::Invalid(e.message))
}

/// Imports and pulls are single long requests: they get at least an hour rather than
/// the per-request `timeout_seconds`.
pub(crate) fn long_running(client: &Client) -> bollard::Docker {
    let timeout = client
        .docker
        .timeout()
        .max(std::time::Duration::from_secs(3600));
    client.docker.clone().with_timeout(timeout)
}

pub(crate) async fn remove_image(client: &Client, reference: &str) -> Result<()> {
    match client
        .docker
        .remove_image(
            reference,
            Some(RemoveImageOptions {
                noprune: false,
                ..Default::default()
            }),
            None,
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => {
            let err = DockerError::api(&client.endpoint, format!("removing image {reference}"), e);
            if err.is_not_found() {
                Ok(())
            } else {
                Err(err)
            }
        }
    }
}

/// Removes a stemcell image; a missing one is success. Refuses (with the names of the
/// containers) while VMs still use it.
pub async fn delete(client: &Client, cid: &StemcellCid) -> Result<()> {
    match remove_image(client, cid.as_str()).await {
        Err(e) if e.is_conflict() => Err(DockerError::Conflict(format!(
            "stemcell {cid} is still used by VMs (delete them first): {}",
            e.daemon_message().unwrap_or_default()
        ))),
        other => other,
    }
}

/// Looks a stemcell image up for `create_vm`.
pub async fn inspect(client: &Client, cid: &StemcellCid) -> Result<StemcellImage> {
    let image = client
        .docker
        .inspect_image(cid.as_str())
        .await
        .map_err(|e| {
            let err = DockerError::api(&client.endpoint, format!("inspecting stemcell image {cid}"), e);
            if err.is_not_found() {
                DockerError::Conflict(format!(
                    "stemcell {cid} does not exist on the Docker daemon at {} (was it deleted, or uploaded through another daemon?)",
                    client.endpoint
                ))
            } else {
                err
            }
        })?;
    let labels: HashMap<String, String> = image.config.and_then(|c| c.labels).unwrap_or_default();
    Ok(StemcellImage {
        id: image.id.unwrap_or_else(|| cid.to_string()),
        os: labels
            .get(labels::STEMCELL_OS)
            .cloned()
            .filter(|s| !s.is_empty()),
    })
}

/// The operating system named by an `/etc/os-release` text: `ubuntu-noble`.
pub fn os_from_os_release(text: &str) -> Option<String> {
    let field = |key: &str| {
        text.lines().find_map(|l| {
            l.strip_prefix(key)
                .and_then(|v| v.strip_prefix('='))
                .map(|v| v.trim().trim_matches('"').to_owned())
        })
    };
    let id = field("ID")?;
    match field("VERSION_CODENAME").or_else(|| field("UBUNTU_CODENAME")) {
        Some(codename) if !codename.is_empty() => Some(format!("{id}-{codename}")),
        _ => Some(id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stemcell_image_must_be_a_regular_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("image");
        std::fs::write(&file, b"x").expect("write");
        let meta = |p: &std::path::Path| std::fs::metadata(p).expect("stat");
        assert!(check_regular_file(&meta(&file), &file).is_ok());
        for bad in [dir.path(), std::path::Path::new("/dev/zero")] {
            let e = check_regular_file(&meta(bad), bad).expect_err("not a regular file");
            assert!(e.to_string().contains("not a regular file"), "{e}");
            assert!(e.to_string().contains(&bad.display().to_string()), "{e}");
        }
    }

    #[test]
    fn platforms() {
        assert_eq!(platform_for("x86_64").as_deref(), Some("linux/amd64"));
        assert_eq!(platform_for("aarch64").as_deref(), Some("linux/arm64"));
        assert_eq!(platform_for(""), None);
    }

    #[test]
    fn import_labels_record_the_manifest() {
        let m = StemcellManifest::parse(
            "name: bosh-warden-boshlite-ubuntu-noble\nversion: '1.5'\noperating_system: ubuntu-noble\n",
            "x",
        )
        .expect("manifest");
        let ctx = CallContext {
            director_uuid: Some("d-1".into()),
            ..Default::default()
        };
        let changes = import_changes(Some(&m), &ctx);
        assert!(
            changes.contains(&r#"LABEL bosh-container-cpi.stemcell.os="ubuntu-noble""#.to_owned()),
            "{changes:?}"
        );
        assert!(changes.contains(&r#"LABEL bosh-container-cpi.stemcell.version="1.5""#.to_owned()));
        assert!(changes.contains(&r#"LABEL bosh-container-cpi.director-uuid="d-1""#.to_owned()));
        assert!(changes.contains(&r#"LABEL bosh-container-cpi.owner="true""#.to_owned()));
    }

    #[test]
    fn os_release() {
        assert_eq!(
            os_from_os_release("NAME=\"Ubuntu\"\nID=ubuntu\nVERSION_CODENAME=noble\n").as_deref(),
            Some("ubuntu-noble")
        );
        assert_eq!(os_from_os_release("ID=alpine\n").as_deref(), Some("alpine"));
        assert_eq!(os_from_os_release("nothing"), None);
    }
}
