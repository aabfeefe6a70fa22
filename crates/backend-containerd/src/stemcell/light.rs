//! Light stemcells (`docker-light`): an OCI image in a registry, named by the
//! manifest's `cloud_properties.image_reference` and `digest`, pulled with oci-client
//! into containerd's content store and unpacked like a full stemcell.
//!
//! Verification (contract §7): with `require_image_verification` (the default) the
//! manifest must give a digest; the image is pulled *by that digest*, the fetched
//! manifest's sha256 must equal it, every blob is checked against its descriptor
//! (by oci-client while downloading and by containerd when committing), and each
//! unpacked layer's diff id against the image config. A mismatch aborts the import and
//! the lease is deleted synchronously, so nothing of the image stays. The stemcell cid
//! is the immutable `registry/repository@sha256:<digest>`.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use containerd_client::services::v1::GetImageRequest;
use cpi_core::{CallContext, CpiError, CpiResult, StemcellCid, StemcellManifest};
use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::Value;

use crate::client::Daemon;
use crate::error::{ContainerdError, Result};
use crate::labels;
use crate::stemcell::content::{self, Commit};
use crate::stemcell::oci::{self, Blob, Layer};
use crate::stemcell::{create_image, image_labels};
use crate::ContainerdCpi;

/// Manifest media types we accept from a registry.
const ACCEPTED: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// How long a light import's lease lives if the CPI dies.
const LEASE_EXPIRY_SECS: u64 = 6 * 3600;

/// The platform-specific manifest of an index: linux/amd64 (the stemcells we run).
pub fn select_platform(index: &Value) -> Option<String> {
    index.get("manifests")?.as_array()?.iter().find_map(|m| {
        let p = m.get("platform")?;
        (p.get("os")?.as_str()? == "linux" && p.get("architecture")?.as_str()? == "amd64")
            .then(|| m.get("digest")?.as_str().map(str::to_owned))
            .flatten()
    })
}

/// Whether a manifest document is an index (a list of platform manifests).
pub fn is_index(doc: &Value) -> bool {
    let media = doc.get("mediaType").and_then(Value::as_str).unwrap_or("");
    media == OCI_IMAGE_INDEX_MEDIA_TYPE
        || media == IMAGE_MANIFEST_LIST_MEDIA_TYPE
        || (media.is_empty() && doc.get("manifests").is_some())
}

/// The stemcell cid of an image: `registry/repository@digest`.
pub fn light_cid(reference: &Reference, digest: &str) -> String {
    format!(
        "{}/{}@{digest}",
        reference.registry(),
        reference.repository()
    )
}

/// The diff ids of an image config.
pub fn diff_ids(config: &Value) -> Vec<String> {
    config
        .pointer("/rootfs/diff_ids")
        .and_then(Value::as_array)
        .map(|ids| {
            ids.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn registry_error(what: &str, reference: &str, e: impl std::fmt::Display) -> ContainerdError {
    ContainerdError::Refused(format!(
        "light stemcell: {what} {reference}: {e}. Check that the registry is reachable from \
         the CPI, that the image exists, and containerd.insecure_registries / \
         containerd.registry_auth for it"
    ))
}

impl ContainerdCpi {
    pub(crate) async fn import_light(
        &self,
        ctx: &CallContext,
        manifest: &StemcellManifest,
    ) -> CpiResult<StemcellCid> {
        let image = manifest.light_image()?;
        if self.config.require_image_verification && image.digest.is_none() {
            return Err(CpiError::bad_argument(format!(
                "light stemcell {} {}: stemcell.MF gives no cloud_properties.digest, and \
                 containerd.require_image_verification is on; add the image's digest to \
                 the stemcell, or turn verification off in the CPI config",
                manifest.name, manifest.version
            )));
        }
        let reference = Reference::from_str(&image.reference).map_err(|e| {
            CpiError::bad_argument(format!(
                "light stemcell image_reference {:?} is not an image reference: {e}",
                image.reference
            ))
        })?;
        let pull_ref = match &image.digest {
            Some(digest) => Reference::with_digest(
                reference.registry().to_owned(),
                reference.repository().to_owned(),
                digest.clone(),
            ),
            None => reference.clone(),
        };
        // The registry client's TLS uses ring, the provider bollard's TLS uses too (one
        // provider compiled in: no aws-lc start-up code in every CPI process); an
        // Err means one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(self.config.insecure_registries.clone()),
            connect_timeout: Some(Duration::from_secs(self.config.timeout_seconds)),
            read_timeout: Some(Duration::from_secs(self.config.timeout_seconds)),
            ..Default::default()
        });
        let auth = match self
            .config
            .registry_auth
            .get(reference.registry())
            .or_else(|| self.config.registry_auth.get(reference.resolve_registry()))
        {
            Some(a) => RegistryAuth::Basic(a.username.clone(), a.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        let whole = pull_ref.whole();

        // The top-level manifest (or index), verified against the pinned digest.
        let (top_bytes, _) = client
            .pull_manifest_raw(&pull_ref, &auth, ACCEPTED)
            .await
            .map_err(|e| registry_error("fetching the manifest of", &whole, e))?;
        let top_digest = oci::sha256_digest(&top_bytes);
        if let Some(want) = &image.digest {
            if &top_digest != want {
                return Err(ContainerdError::Refused(format!(
                    "light stemcell {whole}: the registry served a manifest with digest \
                     {top_digest}, not the {want} the stemcell names; refusing it"
                ))
                .into());
            }
        }
        let cid = light_cid(&reference, &top_digest);
        let d = self.daemon().await?;
        if image_exists(d, &cid).await? {
            tracing::info!(stemcell_cid = %cid, "light stemcell already imported");
            return StemcellCid::new(cid);
        }
        tracing::info!(stemcell_cid = %cid, "importing light stemcell");
        let lease = content::create_lease(d, &self.config.labels, LEASE_EXPIRY_SECS).await?;
        let imported = self
            .import_light_into(
                d, &lease, &client, &auth, &reference, &top_bytes, &cid, manifest, ctx,
            )
            .await;
        match imported {
            Ok(()) => {
                if let Err(e) = content::delete_lease(d, &lease, false).await {
                    tracing::warn!(lease = %lease, "could not delete the import lease (it expires by itself): {e}");
                }
                Ok(StemcellCid::new(cid)?)
            }
            Err(e) => {
                // Everything written so far is only held by the lease: a synchronous
                // delete removes it (a mismatched image leaves nothing behind).
                let mut cleanup = Vec::new();
                if let Err(c) = content::delete_lease(d, &lease, true).await {
                    cleanup.push(c.to_string());
                }
                Err(e.with_cleanup(cleanup).into())
            }
        }
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "one private step of create_stemcell, called once"
    )]
    async fn import_light_into(
        &self,
        d: &Daemon,
        lease: &str,
        client: &Client,
        auth: &RegistryAuth,
        reference: &Reference,
        top_bytes: &[u8],
        cid: &str,
        manifest: &StemcellManifest,
        ctx: &CallContext,
    ) -> Result<()> {
        let parse = |bytes: &[u8], what: &str| -> Result<Value> {
            serde_json::from_slice(bytes)
                .map_err(|e| registry_error(&format!("parsing the {what} of"), cid, e))
        };
        let repo_at = |digest: &str| {
            Reference::with_digest(
                reference.registry().to_owned(),
                reference.repository().to_owned(),
                digest.to_owned(),
            )
        };
        let top = parse(top_bytes, "manifest")?;
        let (manifest_bytes, doc) = if is_index(&top) {
            let digest = select_platform(&top).ok_or_else(|| {
                registry_error("finding a linux/amd64 image in", cid, "the index has none")
            })?;
            let (bytes, _) = client
                .pull_manifest_raw(&repo_at(&digest), auth, ACCEPTED)
                .await
                .map_err(|e| registry_error("fetching the platform manifest of", cid, e))?;
            if oci::sha256_digest(&bytes) != digest {
                return Err(registry_error(
                    "verifying the platform manifest of",
                    cid,
                    format!("its digest is not {digest}"),
                ));
            }
            let doc = parse(&bytes, "platform manifest")?;
            (bytes.to_vec(), doc)
        } else {
            (top_bytes.to_vec(), top)
        };
        let manifest_media = doc
            .get("mediaType")
            .and_then(Value::as_str)
            .unwrap_or(OCI_IMAGE_MEDIA_TYPE)
            .to_owned();
        let parsed: oci_client::manifest::OciImageManifest = serde_json::from_value(doc)
            .map_err(|e| registry_error("reading the image manifest of", cid, e))?;

        // The config: its diff ids decide the snapshot chain.
        let mut config_bytes = Vec::new();
        client
            .pull_blob(
                &repo_at(&parsed.config.digest),
                &parsed.config,
                &mut config_bytes,
            )
            .await
            .map_err(|e| registry_error("fetching the image config of", cid, e))?;
        let config_doc = parse(&config_bytes, "image config")?;
        let ids = diff_ids(&config_doc);
        if ids.len() != parsed.layers.len() || ids.is_empty() {
            return Err(registry_error(
                "reading",
                cid,
                format!(
                    "{} layers but {} diff ids in the image config",
                    parsed.layers.len(),
                    ids.len()
                ),
            ));
        }
        let chain = oci::chain_ids(&ids);
        let top_chain = chain.last().cloned().unwrap_or_default();
        let snapshotter = &self.config.snapshotter;

        // Layers, streamed from the registry into the content store.
        let mut layers = Vec::with_capacity(parsed.layers.len());
        for (desc, diff_id) in parsed.layers.iter().zip(&ids) {
            let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
            let stream = client
                .pull_blob_stream(&repo_at(&desc.digest), desc)
                .await
                .map_err(|e| registry_error("fetching layer", &desc.digest, e))?;
            let commit = Commit {
                digest: Some(desc.digest.clone()),
                size: desc.size,
                labels: HashMap::from([(labels::GC_UNCOMPRESSED.to_owned(), diff_id.clone())]),
            };
            let digest = desc.digest.clone();
            let finish = async move {
                let mut stream = stream;
                while let Some(chunk) = stream.next().await {
                    let chunk =
                        chunk.map_err(|e| registry_error("downloading layer", &digest, e))?;
                    if tx.send(chunk.to_vec()).await.is_err() {
                        break;
                    }
                }
                drop(tx);
                Ok((commit, ()))
            };
            let (stored, ()) =
                content::write_streamed(d, lease, desc.digest.clone(), rx, finish).await?;
            layers.push(Layer {
                blob: Blob {
                    media_type: desc.media_type.clone(),
                    digest: stored.digest,
                    size: stored.size,
                },
                diff_id: diff_id.clone(),
            });
        }
        let unpacked = content::unpack(d, lease, snapshotter, &layers, &self.config.labels).await?;
        if unpacked != top_chain {
            return Err(ContainerdError::Refused(format!(
                "light stemcell {cid}: unpacked chain {unpacked}, expected {top_chain}"
            )));
        }

        // Config and manifest, byte for byte as the registry served them.
        let config = content::write_blob(
            d,
            lease,
            &parsed.config.media_type,
            config_bytes,
            oci::config_gc_labels(snapshotter, &top_chain),
        )
        .await?;
        let manifest_blob = content::write_blob(
            d,
            lease,
            &manifest_media,
            manifest_bytes,
            oci::manifest_gc_labels(&config.digest, &layers),
        )
        .await?;
        let mut image_labels = image_labels(
            manifest,
            "light",
            &top_chain,
            snapshotter,
            ctx.director_uuid.as_deref(),
            &self.config.labels,
        );
        image_labels.insert("io.bosh.stemcell.image-reference".into(), reference.whole());
        create_image(d, cid, &manifest_blob, image_labels).await
    }
}

async fn image_exists(d: &Daemon, name: &str) -> Result<bool> {
    match d
        .call(
            format!("Images.Get {name}"),
            d.images().get(d.req(GetImageRequest {
                name: name.to_owned(),
            })),
        )
        .await
    {
        Ok(resp) => Ok(resp.image.is_some()),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn picks_linux_amd64_from_an_index() {
        let index = json!({"mediaType": OCI_IMAGE_INDEX_MEDIA_TYPE, "manifests": [
            {"digest": "sha256:arm", "platform": {"os": "linux", "architecture": "arm64"}},
            {"digest": "sha256:amd", "platform": {"os": "linux", "architecture": "amd64"}}]});
        assert!(is_index(&index));
        assert_eq!(select_platform(&index).as_deref(), Some("sha256:amd"));
        assert!(!is_index(
            &json!({"mediaType": OCI_IMAGE_MEDIA_TYPE, "layers": []})
        ));
        assert_eq!(select_platform(&json!({"manifests": []})), None);
    }

    #[test]
    fn cid_is_the_immutable_reference() {
        let r = Reference::from_str("127.0.0.1:5000/cpi-test/busybox:1").expect("ref");
        assert_eq!(
            light_cid(&r, "sha256:abc"),
            "127.0.0.1:5000/cpi-test/busybox@sha256:abc"
        );
        let r = Reference::from_str("busybox").expect("ref");
        assert_eq!(
            light_cid(&r, "sha256:abc"),
            "docker.io/library/busybox@sha256:abc"
        );
    }

    #[test]
    fn diff_ids_of_a_config() {
        let c = json!({"rootfs": {"type": "layers", "diff_ids": ["sha256:a", "sha256:b"]}});
        assert_eq!(
            diff_ids(&c),
            vec!["sha256:a".to_owned(), "sha256:b".to_owned()]
        );
        assert!(diff_ids(&json!({})).is_empty());
    }
}
