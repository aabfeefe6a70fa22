//! The OCI image a full stemcell becomes, built without IO: its config, manifest,
//! chain ids and the labels that make containerd's garbage collector keep (and later
//! remove) content and snapshots together.

use std::collections::HashMap;

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, Digest, ImageConfigurationBuilder,
    ImageManifestBuilder, MediaType, Os, RootFsBuilder,
};
use sha2::{Digest as _, Sha256};

use cpi_core::StemcellManifest;

use crate::error::{ContainerdError, Result};
use crate::labels;

/// A gzip-compressed layer.
pub const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// An uncompressed layer.
pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// An image config.
pub const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// An image manifest.
pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A blob's descriptor, in the terms containerd's API uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// Media type.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: i64,
}

impl Blob {
    /// The descriptor containerd's gRPC API takes.
    pub fn to_containerd(&self) -> containerd_client::types::Descriptor {
        containerd_client::types::Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
            annotations: HashMap::new(),
        }
    }

    fn to_oci(&self) -> Result<Descriptor> {
        let digest: Digest = self.digest.parse().map_err(|e| oci_error("digest", &e))?;
        DescriptorBuilder::default()
            .media_type(MediaType::from(self.media_type.as_str()))
            .digest(digest)
            .size(u64::try_from(self.size).unwrap_or(0))
            .build()
            .map_err(|e| oci_error("descriptor", &e))
    }
}

/// A layer: its blob and the digest of its uncompressed tar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The (possibly compressed) blob.
    pub blob: Blob,
    /// `sha256:<hex>` of the uncompressed tar: the diff id.
    pub diff_id: String,
}

fn oci_error(what: &str, e: &dyn std::fmt::Display) -> ContainerdError {
    ContainerdError::Refused(format!("building the stemcell's OCI {what}: {e}"))
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// The chain ids of a stack of layers (OCI image spec): the first is the first diff
/// id, each next is `sha256(previous + " " + diff_id)`. The last names the snapshot
/// holding the whole root filesystem.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff in diff_ids {
        let next = match out.last() {
            None => diff.clone(),
            Some(prev) => sha256_digest(format!("{prev} {diff}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// The image config of a full stemcell: one layer, the stemcell's identity as labels.
pub fn image_config(diff_ids: &[String], manifest: &StemcellManifest) -> Result<Vec<u8>> {
    let arch = match manifest
        .cloud_properties
        .get("architecture")
        .and_then(|v| v.as_str())
    {
        Some("arm64" | "aarch64") => Arch::ARM64,
        _ => Arch::Amd64,
    };
    let config = ConfigBuilder::default()
        .labels(HashMap::from([
            (labels::STEMCELL_NAME.to_owned(), manifest.name.clone()),
            (
                labels::STEMCELL_VERSION.to_owned(),
                manifest.version.clone(),
            ),
            (labels::STEMCELL_OS.to_owned(), manifest.os()),
        ]))
        .build()
        .map_err(|e| oci_error("config", &e))?;
    let image = ImageConfigurationBuilder::default()
        .architecture(arch)
        .os(Os::Linux)
        .config(config)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(diff_ids.to_vec())
                .build()
                .map_err(|e| oci_error("rootfs", &e))?,
        )
        .build()
        .map_err(|e| oci_error("config", &e))?;
    serde_json::to_vec(&image).map_err(|e| oci_error("config", &e))
}

/// The image manifest naming `config` and `layers`.
pub fn image_manifest(config: &Blob, layers: &[Layer]) -> Result<Vec<u8>> {
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config.to_oci()?)
        .layers(
            layers
                .iter()
                .map(|l| l.blob.to_oci())
                .collect::<Result<Vec<_>>>()?,
        )
        .build()
        .map_err(|e| oci_error("manifest", &e))?;
    serde_json::to_vec(&manifest).map_err(|e| oci_error("manifest", &e))
}

/// Labels of the manifest blob: it references its config and layers, so they live
/// as long as it does.
pub fn manifest_gc_labels(config_digest: &str, layers: &[Layer]) -> HashMap<String, String> {
    let mut out = HashMap::from([(
        format!("{}.config", labels::GC_REF_CONTENT),
        config_digest.to_owned(),
    )]);
    for (i, l) in layers.iter().enumerate() {
        out.insert(
            format!("{}.l.{i}", labels::GC_REF_CONTENT),
            l.blob.digest.clone(),
        );
    }
    out
}

/// Labels of the config blob: it keeps the unpacked snapshot chain alive (the way
/// containerd's own unpacker does it).
pub fn config_gc_labels(snapshotter: &str, top_chain_id: &str) -> HashMap<String, String> {
    HashMap::from([(
        labels::gc_ref_snapshot(snapshotter),
        top_chain_id.to_owned(),
    )])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> StemcellManifest {
        StemcellManifest::parse(
            "name: bosh-warden-boshlite-ubuntu-noble\nversion: '1.5'\noperating_system: ubuntu-noble\n",
            "stemcell.MF",
        )
        .expect("manifest")
    }

    fn layer() -> Layer {
        Layer {
            blob: Blob {
                media_type: LAYER_GZIP.into(),
                digest: format!("sha256:{}", "a".repeat(64)),
                size: 1234,
            },
            diff_id: format!("sha256:{}", "b".repeat(64)),
        }
    }

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let ids = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(ids[0], a);
        assert_eq!(ids[1], sha256_digest(format!("{a} {b}").as_bytes()));
        assert!(chain_ids(&[]).is_empty());
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn config_lists_the_diff_ids_and_the_stemcell_identity() {
        let l = layer();
        let bytes = image_config(std::slice::from_ref(&l.diff_id), &manifest()).expect("config");
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(v["rootfs"]["type"], "layers");
        assert_eq!(v["rootfs"]["diff_ids"][0], serde_json::json!(l.diff_id));
        assert_eq!(v["architecture"], "amd64");
        assert_eq!(v["os"], "linux");
        assert_eq!(v["config"]["Labels"][labels::STEMCELL_OS], "ubuntu-noble");
        assert_eq!(v["config"]["Labels"][labels::STEMCELL_VERSION], "1.5");
    }

    #[test]
    fn manifest_references_config_and_layers() {
        let l = layer();
        let config = Blob {
            media_type: CONFIG.into(),
            digest: format!("sha256:{}", "c".repeat(64)),
            size: 10,
        };
        let bytes = image_manifest(&config, std::slice::from_ref(&l)).expect("manifest");
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(v["schemaVersion"], 2);
        assert_eq!(v["mediaType"], MANIFEST);
        assert_eq!(v["config"]["digest"], serde_json::json!(config.digest));
        assert_eq!(v["layers"][0]["mediaType"], LAYER_GZIP);
        assert_eq!(v["layers"][0]["size"], 1234);
        let gc = manifest_gc_labels(&config.digest, std::slice::from_ref(&l));
        assert_eq!(gc["containerd.io/gc.ref.content.config"], config.digest);
        assert_eq!(gc["containerd.io/gc.ref.content.l.0"], l.blob.digest);
        let gc = config_gc_labels("overlayfs", "sha256:x");
        assert_eq!(gc["containerd.io/gc.ref.snapshot.overlayfs"], "sha256:x");
    }
}
