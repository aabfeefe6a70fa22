//! The labels this backend puts on containerd objects, and containerd's own
//! garbage-collection labels.
//!
//! Labels are how the CPI stays stateless between calls: a VM's stemcell, snapshot
//! and init, and a stemcell's name, version, operating system and unpacked chain id
//! are all read back from containerd rather than from memory.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

/// Marks everything this backend creates.
pub const MANAGED_BY: &str = "io.bosh.cpi.managed-by";
/// The value of [`MANAGED_BY`].
pub const MANAGED_BY_VALUE: &str = "bosh-container-cpi";
/// The agent id of a VM.
pub const AGENT_ID: &str = "io.bosh.cpi.agent-id";
/// The director that created a VM or stemcell (`context.director_uuid`).
pub const DIRECTOR_UUID: &str = "io.bosh.cpi.director-uuid";
/// The stemcell cid a VM was created from.
pub const STEMCELL: &str = "io.bosh.cpi.stemcell";
/// The snapshot key of a VM's root filesystem.
pub const SNAPSHOT: &str = "io.bosh.cpi.snapshot";
/// The init a VM runs: `systemd` or `runit`.
pub const INIT: &str = "io.bosh.cpi.init";
/// Prefix of the labels `set_vm_metadata` writes.
pub const METADATA_PREFIX: &str = "io.bosh.cpi.metadata.";
/// Stemcell name (from `stemcell.MF`).
pub const STEMCELL_NAME: &str = "io.bosh.stemcell.name";
/// Stemcell version.
pub const STEMCELL_VERSION: &str = "io.bosh.stemcell.version";
/// Stemcell operating system (decides the init).
pub const STEMCELL_OS: &str = "io.bosh.stemcell.os";
/// `full` or `light`.
pub const STEMCELL_KIND: &str = "io.bosh.stemcell.kind";
/// The chain id of the stemcell's unpacked top layer: the parent snapshot of VMs.
pub const CHAIN_ID: &str = "io.bosh.cpi.chain-id";
/// The snapshotter the stemcell was unpacked into.
pub const SNAPSHOTTER: &str = "io.bosh.cpi.snapshotter";

/// containerd: the uncompressed digest (diff id) of a layer blob.
pub const GC_UNCOMPRESSED: &str = "containerd.io/uncompressed";
/// containerd: a lease or object expires (is collected) after this RFC 3339 time.
pub const GC_EXPIRE: &str = "containerd.io/gc.expire";
/// containerd: prefix of a content-to-content reference (`...content.config`).
pub const GC_REF_CONTENT: &str = "containerd.io/gc.ref.content";

/// containerd refuses a label whose key and value together exceed this.
pub const MAX_LABEL_BYTES: usize = 4096;

/// The label of a content blob that keeps snapshot `chain_id` of `snapshotter` alive.
pub fn gc_ref_snapshot(snapshotter: &str) -> String {
    format!("containerd.io/gc.ref.snapshot.{snapshotter}")
}

/// The labels every object we create carries: ours and the configured extras.
pub fn base(extra: &BTreeMap<String, String>) -> HashMap<String, String> {
    let mut out: HashMap<String, String> =
        extra.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    out.insert(MANAGED_BY.into(), MANAGED_BY_VALUE.into());
    out
}

/// The labels for the metadata of `set_vm_metadata`: one per key, values as text,
/// trimmed to what containerd accepts.
pub fn metadata_labels(metadata: &serde_json::Map<String, Value>) -> HashMap<String, String> {
    metadata
        .iter()
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| {
            let key = format!("{METADATA_PREFIX}{k}");
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            let room = MAX_LABEL_BYTES.saturating_sub(key.len());
            (key, truncate_utf8(&text, room).to_owned())
        })
        .filter(|(k, _)| k.len() < MAX_LABEL_BYTES)
        .collect()
}

/// Replaces the metadata labels in `labels` by those of `metadata`, keeping the rest.
pub fn replace_metadata(
    labels: &HashMap<String, String>,
    metadata: &serde_json::Map<String, Value>,
) -> HashMap<String, String> {
    let mut out: HashMap<String, String> = labels
        .iter()
        .filter(|(k, _)| !k.starts_with(METADATA_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.extend(metadata_labels(metadata));
    out
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// RFC 3339 UTC time `secs` seconds from now (for [`GC_EXPIRE`]).
pub fn expire_in(secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(now + secs)
}

/// Formats seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(epoch_secs: u64) -> String {
    let days = epoch_secs / 86_400;
    let rem = epoch_secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm), valid for the epoch onwards.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn base_labels_mark_ours_and_keep_extras() {
        let extra = BTreeMap::from([("test.run".to_owned(), "r1".to_owned())]);
        let labels = base(&extra);
        assert_eq!(labels[MANAGED_BY], MANAGED_BY_VALUE);
        assert_eq!(labels["test.run"], "r1");
    }

    #[test]
    fn metadata_becomes_labels_and_replaces_old_metadata() {
        let old = HashMap::from([
            (format!("{METADATA_PREFIX}job"), "old".to_owned()),
            (AGENT_ID.to_owned(), "agent-1".to_owned()),
        ]);
        let meta = json!({"director": "d", "index": 0, "name": "zk/0", "": "x"});
        let new = replace_metadata(&old, meta.as_object().expect("obj"));
        assert_eq!(new[AGENT_ID], "agent-1");
        assert_eq!(new[&format!("{METADATA_PREFIX}director")], "d");
        assert_eq!(new[&format!("{METADATA_PREFIX}index")], "0");
        assert!(!new.contains_key(&format!("{METADATA_PREFIX}job")));
        assert!(!new.contains_key(METADATA_PREFIX));
    }

    #[test]
    fn long_values_are_trimmed_on_a_char_boundary() {
        let meta = json!({"k": "é".repeat(5000)});
        let labels = metadata_labels(meta.as_object().expect("obj"));
        let (k, v) = labels.iter().next().expect("one");
        assert!(k.len() + v.len() <= MAX_LABEL_BYTES);
    }

    #[test]
    fn rfc3339_formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_704_067_200), "2024-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_709_210_096), "2024-02-29T12:34:56Z");
        assert_eq!(
            gc_ref_snapshot("overlayfs"),
            "containerd.io/gc.ref.snapshot.overlayfs"
        );
    }
}
