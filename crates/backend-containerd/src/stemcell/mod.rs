//! Stemcells as containerd images.
//!
//! A full stemcell's `image` (a gzip tar of the root filesystem) becomes an OCI image
//! with one layer: the blob is streamed into the content store, an image config and a
//! manifest are written beside it, the layer is unpacked into the snapshotter (one
//! committed snapshot named by its chain id), and an image record named by the
//! stemcell cid ties it together, labelled with the stemcell's name, version and
//! operating system. Garbage-collection labels chain image → manifest → config and
//! layer → snapshot, so `delete_stemcell` only removes the image record and lets
//! containerd's collector remove the rest (synchronously).
//!
//! - [`oci`]: the pure builders (config, manifest, chain ids, GC labels).
//! - [`content`]: content store, leases and unpacking.
//! - [`light`]: light stemcells pulled from a registry.

pub mod content;
pub mod light;
pub mod oci;

use std::collections::HashMap;

use containerd_client::services::v1::{
    CreateImageRequest, DeleteImageRequest, GetImageRequest, Image,
};
use cpi_core::stemcell::manifest_path_for;
use cpi_core::{CallContext, CpiError, CpiResult, CreateStemcell, StemcellCid, StemcellManifest};

use crate::client::Daemon;
use crate::error::{ContainerdError, Result};
use crate::labels;
use crate::ContainerdCpi;

/// How long an import's lease lives if the CPI dies before deleting it.
const LEASE_EXPIRY_SECS: u64 = 6 * 3600;

/// What a VM needs to know about its stemcell, read back from the image's labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StemcellInfo {
    /// The operating system (decides the init).
    pub os: String,
    /// The snapshot a VM's root filesystem is prepared on.
    pub chain_id: String,
    /// The snapshotter it was unpacked into.
    pub snapshotter: String,
}

/// The labels of a stemcell's image record.
pub fn image_labels(
    manifest: &StemcellManifest,
    kind: &str,
    chain_id: &str,
    snapshotter: &str,
    director_uuid: Option<&str>,
    extra: &std::collections::BTreeMap<String, String>,
) -> HashMap<String, String> {
    let mut out = labels::base(extra);
    out.insert(labels::STEMCELL_NAME.into(), manifest.name.clone());
    out.insert(labels::STEMCELL_VERSION.into(), manifest.version.clone());
    out.insert(labels::STEMCELL_OS.into(), manifest.os());
    out.insert(labels::STEMCELL_KIND.into(), kind.into());
    out.insert(labels::CHAIN_ID.into(), chain_id.into());
    out.insert(labels::SNAPSHOTTER.into(), snapshotter.into());
    if let Some(uuid) = director_uuid {
        out.insert(labels::DIRECTOR_UUID.into(), uuid.into());
    }
    out
}

/// Reads a stemcell's facts from its image record.
pub async fn stemcell_info(d: &Daemon, cid: &str) -> Result<StemcellInfo> {
    let image = match d
        .call(
            format!("Images.Get {cid}"),
            d.images().get(d.req(GetImageRequest {
                name: cid.to_owned(),
            })),
        )
        .await
    {
        Ok(resp) => resp.image,
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(e),
    };
    let image = image.ok_or_else(|| ContainerdError::StemcellNotFound(cid.to_owned()))?;
    let get = |k: &str| image.labels.get(k).cloned().unwrap_or_default();
    let chain_id = get(labels::CHAIN_ID);
    if chain_id.is_empty() {
        return Err(ContainerdError::Refused(format!(
            "image '{cid}' has no {} label: it was not imported by this CPI; upload the \
             stemcell again",
            labels::CHAIN_ID
        )));
    }
    Ok(StemcellInfo {
        os: get(labels::STEMCELL_OS),
        chain_id,
        snapshotter: get(labels::SNAPSHOTTER),
    })
}

/// Creates the image record (or accepts an identical existing one).
pub async fn create_image(
    d: &Daemon,
    name: &str,
    target: &oci::Blob,
    image_labels: HashMap<String, String>,
) -> Result<()> {
    let image = Image {
        name: name.to_owned(),
        labels: image_labels,
        target: Some(target.to_containerd()),
        created_at: None,
        updated_at: None,
    };
    match d
        .call(
            format!("Images.Create {name}"),
            d.images().create(d.req(CreateImageRequest {
                image: Some(image),
                source_date_epoch: None,
            })),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.is_already_exists() => Ok(()),
        Err(e) => Err(e),
    }
}

/// The image of a full stemcell must be a regular file (symlinks followed): a
/// directory would fail late, after a lease is taken, and a device such as
/// `/dev/zero` would stream into the content store for ever.
fn check_image_file(path: &std::path::Path) -> CpiResult<()> {
    let meta = std::fs::metadata(path).map_err(|e| {
        CpiError::bad_argument(format!(
            "cannot read the stemcell image {}: {e}; pass the 'image' file of an unpacked stemcell",
            path.display()
        ))
    })?;
    if meta.is_file() {
        return Ok(());
    }
    let what = if meta.is_dir() {
        "a directory"
    } else {
        "a device, socket or pipe"
    };
    Err(CpiError::bad_argument(format!(
        "the stemcell image {} is {what}, not a regular file; pass the 'image' file of an unpacked stemcell",
        path.display()
    )))
}

impl ContainerdCpi {
    pub(crate) async fn do_create_stemcell(
        &self,
        ctx: &CallContext,
        req: CreateStemcell,
    ) -> CpiResult<StemcellCid> {
        let manifest_path = manifest_path_for(&req.image_path);
        let text = tokio::fs::read_to_string(&manifest_path)
            .await
            .map_err(|e| {
                CpiError::bad_argument(format!(
                    "cannot read the stemcell manifest {}: {e} (it must sit beside the image file)",
                    manifest_path.display()
                ))
            })?;
        let manifest = StemcellManifest::parse(&text, &manifest_path.display().to_string())?;
        if manifest.is_light() {
            return self.import_light(ctx, &manifest).await;
        }
        check_image_file(&req.image_path)?;
        let d = self.daemon().await?;
        // An import killed halfway left a lease (and what it held); one that finished
        // but never answered left the image, which is the answer to this retry.
        crate::orphans::remove_dead_leases(d).await?;
        let fingerprint = crate::orphans::image_fingerprint(&req.image_path)
            .map_err(|e| ContainerdError::io("reading the stemcell image", &req.image_path, e))?;
        if let Some(cid) = crate::orphans::existing_stemcell(
            d,
            ctx,
            &manifest.name,
            &manifest.version,
            &fingerprint,
        )
        .await?
        {
            tracing::info!(stemcell_cid = %cid, "this stemcell was imported already (by a call whose answer was lost)");
            return StemcellCid::new(cid);
        }
        let cid = format!("stemcell-{}", uuid::Uuid::new_v4());
        tracing::info!(stemcell_cid = %cid, name = %manifest.name, version = %manifest.version,
            os = %manifest.os(), "importing full stemcell");
        let lease = content::create_lease(d, &self.config.labels, LEASE_EXPIRY_SECS).await?;
        let imported = self
            .import_full(d, &lease, &cid, &manifest, &req, ctx)
            .await;
        match imported {
            Ok(()) => {
                // The image now references everything; the lease can go.
                if let Err(e) = content::delete_lease(d, &lease, false).await {
                    tracing::warn!(lease = %lease, "could not delete the import lease (it expires by itself): {e}");
                }
                Ok(StemcellCid::new(cid)?)
            }
            Err(e) => {
                let mut cleanup = Vec::new();
                if let Err(c) = content::delete_lease(d, &lease, true).await {
                    cleanup.push(c.to_string());
                }
                Err(e.with_cleanup(cleanup).into())
            }
        }
    }

    async fn import_full(
        &self,
        d: &Daemon,
        lease: &str,
        cid: &str,
        manifest: &StemcellManifest,
        req: &CreateStemcell,
        ctx: &CallContext,
    ) -> Result<()> {
        let started = std::time::Instant::now();
        let stored = content::write_layer_file(d, lease, &req.image_path).await?;
        tracing::info!(digest = %stored.blob.digest, bytes = stored.blob.size,
            secs = started.elapsed().as_secs_f32(), "stemcell image stored");
        let snapshotter = &self.config.snapshotter;
        let layer =
            content::unpack_stored(d, lease, snapshotter, &stored, &self.config.labels).await?;
        // A single base layer: its chain id is its diff id.
        let chain_id = layer.diff_id.clone();
        let layers = vec![layer];
        tracing::info!(chain_id = %chain_id, secs = started.elapsed().as_secs_f32(), "stemcell unpacked");
        let config = content::write_blob(
            d,
            lease,
            oci::CONFIG,
            oci::image_config(&[layers[0].diff_id.clone()], manifest)?,
            oci::config_gc_labels(snapshotter, &chain_id),
        )
        .await?;
        let manifest_blob = content::write_blob(
            d,
            lease,
            oci::MANIFEST,
            oci::image_manifest(&config, &layers)?,
            oci::manifest_gc_labels(&config.digest, &layers),
        )
        .await?;
        let mut record_labels = image_labels(
            manifest,
            "full",
            &chain_id,
            snapshotter,
            ctx.director_uuid.as_deref(),
            &self.config.labels,
        );
        // How a retry of a create_stemcell whose answer was lost finds this image.
        if let Ok(fingerprint) = crate::orphans::image_fingerprint(&req.image_path) {
            record_labels.insert(crate::orphans::IMAGE_FINGERPRINT.into(), fingerprint);
        }
        create_image(d, cid, &manifest_blob, record_labels).await
    }

    pub(crate) async fn do_delete_stemcell(&self, cid: &StemcellCid) -> CpiResult<()> {
        let d = self.daemon().await?;
        // sync: containerd's collector runs before the answer, removing the manifest,
        // config, layer and the unpacked snapshot unless a VM still builds on it.
        match d
            .call(
                format!("Images.Delete {cid}"),
                d.images().delete(d.req(DeleteImageRequest {
                    name: cid.to_string(),
                    sync: true,
                    target: None,
                })),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => {
                tracing::info!(stemcell_cid = %cid, "stemcell already gone");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
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
        assert!(check_image_file(&file).is_ok());
        let link = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &link).expect("symlink");
        for bad in [
            dir.path(),
            link.as_path(),
            std::path::Path::new("/dev/zero"),
        ] {
            let e = check_image_file(bad).expect_err("not a regular file");
            assert_eq!(e.kind, cpi_core::ErrorKind::CpiError);
            assert!(e.message.contains("not a regular file"), "{}", e.message);
        }
        let e = check_image_file(&dir.path().join("missing")).expect_err("missing");
        assert!(e.message.contains("missing"), "{}", e.message);
    }

    #[test]
    fn image_labels_carry_identity_and_unpack_facts() {
        let m = StemcellManifest::parse(
            "name: bosh-warden-boshlite-ubuntu-jammy-go_agent\nversion: 1.2\n",
            "stemcell.MF",
        )
        .expect("manifest");
        let l = image_labels(
            &m,
            "full",
            "sha256:abc",
            "overlayfs",
            Some("dir-1"),
            &Default::default(),
        );
        assert_eq!(l[labels::STEMCELL_OS], "ubuntu-jammy");
        assert_eq!(l[labels::STEMCELL_VERSION], "1.2");
        assert_eq!(l[labels::CHAIN_ID], "sha256:abc");
        assert_eq!(l[labels::SNAPSHOTTER], "overlayfs");
        assert_eq!(l[labels::DIRECTOR_UUID], "dir-1");
        assert_eq!(l[labels::MANAGED_BY], labels::MANAGED_BY_VALUE);
    }
}
