//! containerd's content store, leases and unpacking, as the stemcell import uses them.
//!
//! A stemcell's `image` is streamed into the content store, which computes the
//! blob's digest (sha256 of the bytes as stored) as it writes them. Its diff id
//! (sha256 of the uncompressed tar) is what containerd answers when it applies the
//! layer: the CPI neither hashes nor decompresses a compressed image itself, which
//! would double the work on the host's CPUs. Everything is written under a lease, so
//! an import that dies halfway leaves nothing the garbage collector will not remove.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    AbortRequest, AddResourceRequest, ApplyRequest, CreateRequest as CreateLeaseRequest,
    DeleteRequest as DeleteLeaseRequest, InfoRequest, Resource, UpdateRequest, WriteAction,
    WriteContentRequest,
};
use prost_types::FieldMask;
use sha2::{Digest as _, Sha256};

use crate::client::Daemon;
use crate::error::{ContainerdError, Result};
use crate::labels;
use crate::stemcell::oci::{Blob, Layer, LAYER_GZIP, LAYER_TAR};

/// Size of the chunks streamed to containerd.
const CHUNK: usize = 1 << 20;

/// Creates a lease that expires by itself after `expire_secs` (so a crashed import
/// is collected) and returns its id.
pub async fn create_lease(
    d: &Daemon,
    extra: &std::collections::BTreeMap<String, String>,
    expire_secs: u64,
) -> Result<String> {
    let id = format!("bosh-cpi-{}", uuid::Uuid::new_v4());
    let mut lease_labels = labels::base(extra);
    lease_labels.insert(labels::GC_EXPIRE.into(), labels::expire_in(expire_secs));
    // Who took it: a later call removes it once this process is gone (a crash).
    if let Some(me) = crate::orphans::this_process() {
        lease_labels.insert(crate::orphans::OWNER_PROCESS.into(), me);
    }
    d.call(
        format!("Leases.Create {id}"),
        d.leases().create(d.req(CreateLeaseRequest {
            id: id.clone(),
            labels: lease_labels,
        })),
    )
    .await?;
    Ok(id)
}

/// Deletes a lease; with `sync` the garbage collector runs before this returns, so
/// whatever only the lease held is gone. A missing lease is success.
pub async fn delete_lease(d: &Daemon, id: &str, sync: bool) -> Result<()> {
    match d
        .call(
            format!("Leases.Delete {id}"),
            d.leases().delete(d.req(DeleteLeaseRequest {
                id: id.to_owned(),
                sync,
            })),
        )
        .await
    {
        Err(e) if e.is_not_found() => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Adds existing content to a lease (content that was already in the store when we
/// tried to write it is not added by the write).
async fn lease_content(d: &Daemon, lease: &str, digest: &str) -> Result<()> {
    d.call(
        format!("Leases.AddResource {lease} {digest}"),
        d.leases().add_resource(d.req(AddResourceRequest {
            id: lease.to_owned(),
            resource: Some(Resource {
                id: digest.to_owned(),
                r#type: "content".into(),
            }),
        })),
    )
    .await
    .map(|_| ())
}

/// Sets `labels` on existing content (merging with its other labels).
pub async fn label_content(d: &Daemon, digest: &str, new: &HashMap<String, String>) -> Result<()> {
    if new.is_empty() {
        return Ok(());
    }
    let paths = new.keys().map(|k| format!("labels.{k}")).collect();
    d.call(
        format!("Content.Update {digest}"),
        d.content().update(d.req(UpdateRequest {
            info: Some(containerd_client::services::v1::Info {
                digest: digest.to_owned(),
                labels: new.clone(),
                ..Default::default()
            }),
            update_mask: Some(FieldMask { paths }),
        })),
    )
    .await
    .map(|_| ())
}

/// The labels of content `digest`; `None` when it is not in the store.
async fn content_labels(d: &Daemon, digest: &str) -> Result<Option<HashMap<String, String>>> {
    match d
        .call(
            format!("Content.Info {digest}"),
            d.content().info(d.req(InfoRequest {
                digest: digest.to_owned(),
            })),
        )
        .await
    {
        Ok(r) => Ok(Some(r.info.map(|i| i.labels).unwrap_or_default())),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// After a commit answered AlreadyExists: make sure the blob is there, held by our
/// lease, and labelled.
async fn adopt_existing(
    d: &Daemon,
    lease: &str,
    digest: &str,
    blob_labels: &HashMap<String, String>,
) -> Result<()> {
    lease_content(d, lease, digest).await?;
    label_content(d, digest, blob_labels).await
}

/// Writes a small blob in one message and returns its descriptor.
pub async fn write_blob(
    d: &Daemon,
    lease: &str,
    media_type: &str,
    bytes: Vec<u8>,
    blob_labels: HashMap<String, String>,
) -> Result<Blob> {
    let digest = crate::stemcell::oci::sha256_digest(&bytes);
    let size = bytes.len() as i64;
    let reference = format!("bosh-cpi-{}", uuid::Uuid::new_v4());
    let message = WriteContentRequest {
        action: WriteAction::Commit as i32,
        r#ref: reference.clone(),
        total: size,
        expected: digest.clone(),
        offset: 0,
        data: bytes,
        labels: blob_labels.clone(),
    };
    let stream = futures_util::stream::iter(vec![message]);
    let result = async {
        let mut responses = d
            .call(
                format!("Content.Write {digest}"),
                d.content().write(d.req_leased(stream, lease)),
            )
            .await?;
        while responses
            .message()
            .await
            .map_err(|s| d.status_error(format!("Content.Write {digest}"), s))?
            .is_some()
        {}
        Ok::<(), ContainerdError>(())
    }
    .await;
    match result {
        Ok(()) => {}
        Err(e) if e.is_already_exists() => adopt_existing(d, lease, &digest, &blob_labels).await?,
        Err(e) => {
            abort(d, &reference).await;
            return Err(e);
        }
    }
    Ok(Blob {
        media_type: media_type.to_owned(),
        digest,
        size,
    })
}

async fn abort(d: &Daemon, reference: &str) {
    let _ = d
        .call(
            format!("Content.Abort {reference}"),
            d.content().abort(d.req(AbortRequest {
                r#ref: reference.to_owned(),
            })),
        )
        .await;
}

/// A file as streamed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamedFile {
    /// `sha256:` of the bytes, for an uncompressed file only: a plain tar is its own
    /// diff id, which labels the blob as it is committed. A gzip file's digest is
    /// the one containerd computes as it stores the bytes (see [`write_streamed`]).
    pub plain_digest: Option<String>,
    /// Bytes read.
    pub size: u64,
}

impl StreamedFile {
    /// Whether it was gzip-compressed (the only kind not hashed).
    pub fn gzip(&self) -> bool {
        self.plain_digest.is_none()
    }
}

/// Reads `reader` to the end in chunks, handing each to `sink`. Gzip is recognised
/// by its magic bytes; anything else is hashed on the way.
pub fn stream_file(
    mut reader: impl Read,
    mut sink: impl FnMut(Vec<u8>) -> std::io::Result<()>,
) -> std::io::Result<StreamedFile> {
    let mut hasher: Option<Sha256> = None;
    let mut size = 0u64;
    let mut gzip = None;
    loop {
        let mut buf = vec![0u8; CHUNK];
        let mut filled = 0;
        // Fill whole chunks (fewer, larger messages).
        while filled < CHUNK {
            let n = reader.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        buf.truncate(filled);
        // containerd hashes what it stores: hashing a gzip file here too would only
        // compete with it for the host's CPUs.
        if !*gzip.get_or_insert_with(|| buf.starts_with(&[0x1f, 0x8b])) {
            hasher.get_or_insert_with(Sha256::new).update(&buf);
        }
        size += filled as u64;
        sink(buf)?;
    }
    Ok(StreamedFile {
        plain_digest: (!gzip.unwrap_or(false))
            .then(|| format!("sha256:{:x}", hasher.unwrap_or_default().finalize())),
        size,
    })
}

/// What the final message of a streamed write commits: containerd checks the size,
/// and the digest when one is given, against what it received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// `sha256:<hex>` the content must have (a registry descriptor's), or `None` to
    /// take the digest containerd computes as it stores the bytes.
    pub digest: Option<String>,
    /// Its size in bytes.
    pub size: i64,
    /// Labels of the blob.
    pub labels: HashMap<String, String>,
}

/// A blob written by [`write_streamed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its digest.
    pub digest: String,
    /// Its size in bytes.
    pub size: i64,
}

/// Streams `chunks` into the content store under `lease`. `finish` runs alongside
/// and, once the producer of `chunks` is done, tells what to commit (the file
/// reader's size, or a registry descriptor's digest and size). Content that is
/// already in the store is adopted (leased and labelled) instead.
///
/// containerd answers every message of the stream with the offset it has stored
/// and the digest of the bytes so far; with no digest to expect, the digest is the
/// one it answered once it had all the bytes.
pub async fn write_streamed<T>(
    d: &Daemon,
    lease: &str,
    what: String,
    mut chunks: tokio::sync::mpsc::Receiver<Vec<u8>>,
    finish: impl std::future::Future<Output = Result<(Commit, T)>>,
) -> Result<(Stored, T)> {
    let reference = format!("bosh-cpi-{}", uuid::Uuid::new_v4());
    let (req_tx, req_rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(4);

    let producer_ref = reference.clone();
    let producer = async move {
        let forward = async {
            let mut offset = 0i64;
            while let Some(chunk) = chunks.recv().await {
                let len = chunk.len() as i64;
                let msg = WriteContentRequest {
                    action: WriteAction::Write as i32,
                    r#ref: producer_ref.clone(),
                    offset,
                    data: chunk,
                    ..Default::default()
                };
                if req_tx.send(msg).await.is_err() {
                    // containerd hung up; the consumer reports why.
                    while chunks.recv().await.is_some() {}
                    break;
                }
                offset += len;
            }
        };
        let ((), finished) = tokio::join!(forward, finish);
        let (commit, extra) = finished?;
        let msg = WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref: producer_ref.clone(),
            total: commit.size,
            expected: commit.digest.clone().unwrap_or_default(),
            offset: commit.size,
            labels: commit.labels.clone(),
            ..Default::default()
        };
        let _ = req_tx.send(msg).await;
        drop(req_tx);
        Ok::<_, ContainerdError>((commit, extra))
    };

    let stream =
        futures_util::stream::unfold(
            req_rx,
            |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
        );
    // The offset and digest of containerd's latest answer.
    let mut answered: Option<(i64, String)> = None;
    let consumer = async {
        let call = async {
            let mut responses = d
                .content()
                .write(d.req_leased(stream, lease))
                .await?
                .into_inner();
            while let Some(r) = responses.message().await? {
                answered = Some((r.offset, r.digest));
            }
            Ok::<_, containerd_client::tonic::Status>(())
        };
        match tokio::time::timeout(d.long_timeout(), call).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(status)) => Err(d.status_error(format!("Content.Write {what}"), status)),
            Err(_) => Err(ContainerdError::Timeout {
                socket: d.socket().to_path_buf(),
                what: format!("Content.Write {what}"),
                after: d.long_timeout(),
            }),
        }
    };
    let (produced, consumed) = tokio::join!(producer, consumer);
    // The digest of all the bytes: the expected one, else containerd's answer once
    // it had stored them all.
    let digest_of = |commit: &Commit| {
        commit.digest.clone().or_else(|| {
            answered
                .as_ref()
                .filter(|(offset, digest)| *offset == commit.size && !digest.is_empty())
                .map(|(_, digest)| digest.clone())
        })
    };
    match (produced, consumed) {
        (Ok((commit, extra)), Ok(())) => match digest_of(&commit) {
            Some(digest) => Ok((
                Stored {
                    digest,
                    size: commit.size,
                },
                extra,
            )),
            None => Err(ContainerdError::Refused(format!(
                "Content.Write {what}: containerd committed the blob but answered no digest for its {} bytes",
                commit.size
            ))),
        },
        (Ok((commit, extra)), Err(e)) if e.is_already_exists() => {
            abort(d, &reference).await;
            let Some(digest) = digest_of(&commit) else {
                return Err(e);
            };
            adopt_existing(d, lease, &digest, &commit.labels).await?;
            Ok((
                Stored {
                    digest,
                    size: commit.size,
                },
                extra,
            ))
        }
        (Err(e), _) | (Ok(_), Err(e)) => {
            abort(d, &reference).await;
            Err(e)
        }
    }
}

/// A layer blob in the content store, and its diff id when that is known without
/// unpacking it (an uncompressed tar is its own diff id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLayer {
    /// The blob's descriptor.
    pub blob: Blob,
    /// Its diff id, when known.
    pub diff_id: Option<String>,
}

/// Streams the file at `path` into the content store as a layer blob.
pub async fn write_layer_file(d: &Daemon, lease: &str, path: &Path) -> Result<StoredLayer> {
    let (chunk_tx, chunk_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let file_path: PathBuf = path.to_path_buf();
    let reader = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&file_path)
            .map_err(|e| ContainerdError::io("opening the stemcell image", &file_path, e))?;
        stream_file(std::io::BufReader::new(file), |chunk| {
            chunk_tx
                .blocking_send(chunk)
                .map_err(|_| std::io::Error::other("the upload to containerd stopped"))
        })
        .map_err(|e| ContainerdError::io("reading the stemcell image", &file_path, e))
    });
    let finish = async {
        let file = reader
            .await
            .map_err(|e| ContainerdError::Refused(format!("reading the stemcell image: {e}")))??;
        // A plain tar is its own diff id; a compressed blob gets its diff id label
        // once containerd has applied it.
        let blob_labels = match &file.plain_digest {
            Some(digest) => HashMap::from([(labels::GC_UNCOMPRESSED.to_owned(), digest.clone())]),
            None => HashMap::new(),
        };
        let commit = Commit {
            digest: file.plain_digest.clone(),
            size: file.size as i64,
            labels: blob_labels,
        };
        Ok((commit, file.gzip()))
    };
    let (stored, gzip) =
        write_streamed(d, lease, path.display().to_string(), chunk_rx, finish).await?;
    Ok(StoredLayer {
        diff_id: (!gzip).then(|| stored.digest.clone()),
        blob: Blob {
            media_type: if gzip { LAYER_GZIP } else { LAYER_TAR }.into(),
            digest: stored.digest,
            size: stored.size,
        },
    })
}

/// The diff id an earlier unpack recorded on blob `digest` (its
/// `containerd.io/uncompressed` label), if any.
async fn recorded_diff_id(d: &Daemon, digest: &str) -> Result<Option<String>> {
    Ok(content_labels(d, digest)
        .await?
        .and_then(|mut labels| labels.remove(labels::GC_UNCOMPRESSED))
        .filter(|v| v.starts_with("sha256:")))
}

/// Unpacks one stored base layer into a committed snapshot named by its chain id
/// (its diff id) and returns the layer with its diff id. With the diff id known
/// (uncompressed, or recorded by an earlier import of the same blob) this is
/// [`unpack`], which skips a snapshot that exists; otherwise the layer is applied
/// and containerd's answer names the snapshot, and is recorded on the blob.
pub async fn unpack_stored(
    d: &Daemon,
    lease: &str,
    snapshotter: &str,
    stored: &StoredLayer,
    extra: &std::collections::BTreeMap<String, String>,
) -> Result<Layer> {
    let known = match &stored.diff_id {
        Some(id) => Some(id.clone()),
        None => recorded_diff_id(d, &stored.blob.digest).await?,
    };
    if let Some(diff_id) = known {
        let layer = Layer {
            blob: stored.blob.clone(),
            diff_id,
        };
        unpack(d, lease, snapshotter, std::slice::from_ref(&layer), extra).await?;
        return Ok(layer);
    }
    let (diff_id, _) =
        apply_and_commit(d, lease, snapshotter, &stored.blob, "", None, extra).await?;
    label_content(
        d,
        &stored.blob.digest,
        &HashMap::from([(labels::GC_UNCOMPRESSED.to_owned(), diff_id.clone())]),
    )
    .await?;
    Ok(Layer {
        blob: stored.blob.clone(),
        diff_id,
    })
}

/// Whether snapshot `key` exists.
pub async fn snapshot_exists(d: &Daemon, snapshotter: &str, key: &str) -> Result<bool> {
    match d
        .call(
            format!("Snapshots.Stat {key}"),
            d.snapshots().stat(d.req(StatSnapshotRequest {
                snapshotter: snapshotter.to_owned(),
                key: key.to_owned(),
            })),
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Unpacks `layers` into committed snapshots named by their chain ids (skipping those
/// that exist), each on the previous one: Prepare, Diff.Apply, Commit. Returns the
/// top chain id.
pub async fn unpack(
    d: &Daemon,
    lease: &str,
    snapshotter: &str,
    layers: &[Layer],
    extra: &std::collections::BTreeMap<String, String>,
) -> Result<String> {
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
    let chain = crate::stemcell::oci::chain_ids(&diff_ids);
    let mut parent = String::new();
    for (layer, chain_id) in layers.iter().zip(&chain) {
        if !snapshot_exists(d, snapshotter, chain_id).await? {
            apply_and_commit(
                d,
                lease,
                snapshotter,
                &layer.blob,
                &parent,
                Some(&layer.diff_id),
                extra,
            )
            .await?;
        }
        parent = chain_id.clone();
    }
    chain
        .last()
        .cloned()
        .ok_or_else(|| ContainerdError::Refused("the stemcell image has no layers".into()))
}

/// Applies `blob` onto a snapshot prepared on `parent` (`""` for a base layer) and
/// commits it under its chain id. Returns the diff id containerd computed and the
/// chain id. A diff id other than `expected` is a corrupt image; a commit that
/// finds the chain id taken (another import made it first) is as good as ours.
async fn apply_and_commit(
    d: &Daemon,
    lease: &str,
    snapshotter: &str,
    blob: &Blob,
    parent: &str,
    expected: Option<&str>,
    extra: &std::collections::BTreeMap<String, String>,
) -> Result<(String, String)> {
    let key = format!("extract-{} {}", uuid::Uuid::new_v4().simple(), blob.digest);
    let prepared = d
        .call(
            format!("Snapshots.Prepare {key}"),
            d.snapshots().prepare(d.req_leased(
                PrepareSnapshotRequest {
                    snapshotter: snapshotter.to_owned(),
                    key: key.clone(),
                    parent: parent.to_owned(),
                    labels: labels::base(extra),
                },
                lease,
            )),
        )
        .await?;
    let mut named = None;
    let applied = async {
        let applied = d
            .call_long(
                format!("Diff.Apply {} onto {key}", blob.digest),
                d.diff().apply(d.req_leased(
                    ApplyRequest {
                        diff: Some(blob.to_containerd()),
                        mounts: prepared.mounts.clone(),
                        ..Default::default()
                    },
                    lease,
                )),
            )
            .await?;
        let got = applied.applied.map(|a| a.digest).unwrap_or_default();
        if !got.starts_with("sha256:") {
            return Err(ContainerdError::Refused(format!(
                "unpacking layer {}: containerd answered no diff id",
                blob.digest
            )));
        }
        if let Some(expected) = expected.filter(|e| *e != got) {
            return Err(ContainerdError::Refused(format!(
                "unpacking layer {}: containerd computed diff id {got}, expected {expected}; \
                 the stemcell image is corrupt",
                blob.digest
            )));
        }
        let chain_id = if parent.is_empty() {
            got.clone()
        } else {
            crate::stemcell::oci::sha256_digest(format!("{parent} {got}").as_bytes())
        };
        named = Some((got, chain_id.clone()));
        d.call(
            format!("Snapshots.Commit {chain_id}"),
            d.snapshots().commit(d.req_leased(
                CommitSnapshotRequest {
                    snapshotter: snapshotter.to_owned(),
                    name: chain_id,
                    key: key.clone(),
                    labels: labels::base(extra),
                },
                lease,
            )),
        )
        .await
        .map(|_| ())
    }
    .await;
    if let Err(e) = applied {
        // Drop the half-made snapshot; with AlreadyExists another import committed
        // the same chain id first, which is as good.
        let _ = d
            .call(
                format!("Snapshots.Remove {key}"),
                d.snapshots().remove(d.req(RemoveSnapshotRequest {
                    snapshotter: snapshotter.to_owned(),
                    key: key.clone(),
                })),
            )
            .await;
        if !e.is_already_exists() {
            return Err(e);
        }
    }
    named.ok_or_else(|| {
        ContainerdError::Refused(format!(
            "unpacking layer {}: nothing was applied",
            blob.digest
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).expect("gzip");
        enc.finish().expect("gzip")
    }

    #[test]
    fn a_gzip_stream_is_passed_on_whole_and_not_hashed() {
        let plain = vec![7u8; 3 * CHUNK + 17];
        let packed = gzip(&plain);
        let mut seen = Vec::new();
        let d = stream_file(&packed[..], |c| {
            seen.extend_from_slice(&c);
            Ok(())
        })
        .expect("stream");
        assert!(d.gzip());
        assert_eq!(seen, packed);
        assert_eq!(d.size, packed.len() as u64);
        assert_eq!(d.plain_digest, None);
    }

    #[test]
    fn a_plain_tar_is_hashed() {
        let plain = vec![3u8; 2 * CHUNK + 5];
        let d = stream_file(&plain[..], |_| Ok(())).expect("stream");
        assert!(!d.gzip());
        assert_eq!(
            d.plain_digest.as_deref(),
            Some(crate::stemcell::oci::sha256_digest(&plain).as_str())
        );
        let d = stream_file(&b""[..], |_| Ok(())).expect("stream");
        assert!(!d.gzip());
        assert_eq!(d.size, 0);
        assert_eq!(
            d.plain_digest.as_deref(),
            Some(crate::stemcell::oci::sha256_digest(b"").as_str())
        );
    }

    #[test]
    fn a_stopped_sink_stops_the_read() {
        let data = vec![1u8; 2 * CHUNK];
        let err = stream_file(&data[..], |_| Err(std::io::Error::other("stop"))).expect_err("stop");
        assert_eq!(err.to_string(), "stop");
    }
}
