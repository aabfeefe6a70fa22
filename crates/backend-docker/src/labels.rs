//! The labels that mark what this CPI created on the daemon, and what they record.
//!
//! Every container, volume, network and image we create carries [`OWNER`] and
//! [`KIND`]; objects created on behalf of a director also carry [`DIRECTOR`], so an
//! operator (or a test run, which uses its own director uuid) finds its leftovers
//! with `docker ps -a --filter label=bosh-container-cpi.director-uuid=<uuid>`.

use std::collections::HashMap;

use cpi_core::CallContext;

/// Present (value `true`) on everything this CPI creates.
pub const OWNER: &str = "bosh-container-cpi.owner";
/// What the object is: one of the `KIND_*` values.
pub const KIND: &str = "bosh-container-cpi.kind";
/// The director uuid from the request context.
pub const DIRECTOR: &str = "bosh-container-cpi.director-uuid";
/// The agent id of a VM.
pub const AGENT_ID: &str = "bosh-container-cpi.agent-id";
/// The VM a volume or metadata holder belongs to.
pub const VM_CID: &str = "bosh-container-cpi.vm-cid";
/// The disk a metadata holder belongs to.
pub const DISK_CID: &str = "bosh-container-cpi.disk-cid";
/// The size requested for a disk or ephemeral volume, MiB.
pub const SIZE_MIB: &str = "bosh-container-cpi.size-mib";
/// The stemcell (image reference) a VM was created from.
pub const STEMCELL: &str = "bosh-container-cpi.stemcell";
/// `systemd` or `runit`: the init a VM runs.
pub const INIT: &str = "bosh-container-cpi.init";
/// How the VM got its privileges: `privileged` or `capabilities`.
pub const PRIVILEGE: &str = "bosh-container-cpi.privilege";
/// A stemcell image's name.
pub const STEMCELL_NAME: &str = "bosh-container-cpi.stemcell.name";
/// A stemcell image's version.
pub const STEMCELL_VERSION: &str = "bosh-container-cpi.stemcell.version";
/// A stemcell image's operating system.
pub const STEMCELL_OS: &str = "bosh-container-cpi.stemcell.os";
/// The subnet a network was created for.
pub const SUBNET: &str = "bosh-container-cpi.subnet";
/// The metadata of a metadata holder, as JSON.
pub const METADATA: &str = "bosh-container-cpi.metadata";

/// Kind of a VM container.
pub const KIND_VM: &str = "vm";
/// Kind of a VM's ephemeral volume.
pub const KIND_EPHEMERAL: &str = "ephemeral";
/// Kind of a persistent disk volume.
pub const KIND_DISK: &str = "disk";
/// Kind of a stemcell image.
pub const KIND_STEMCELL: &str = "stemcell";
/// Kind of a network we created.
pub const KIND_NETWORK: &str = "network";
/// Kind of a short-lived helper container.
pub const KIND_HELPER: &str = "helper";
/// Kind of a VM's metadata holder (a never-started container).
pub const KIND_VM_METADATA: &str = "vm-metadata";
/// Kind of a disk's metadata holder (a volume that holds no data).
pub const KIND_DISK_METADATA: &str = "disk-metadata";

/// The labels every object of `kind` gets: owner, kind and, when known, the director.
pub fn base(kind: &str, ctx: &CallContext) -> HashMap<String, String> {
    let mut labels = HashMap::new();
    labels.insert(OWNER.to_owned(), "true".to_owned());
    labels.insert(KIND.to_owned(), kind.to_owned());
    if let Some(uuid) = ctx.director_uuid.as_deref().filter(|u| !u.is_empty()) {
        labels.insert(DIRECTOR.to_owned(), uuid.to_owned());
    }
    labels
}

/// Whether a label set marks an object of ours, of `kind`.
pub fn is_ours(labels: Option<&HashMap<String, String>>, kind: &str) -> bool {
    labels.is_some_and(|l| {
        l.get(OWNER).map(String::as_str) == Some("true")
            && l.get(KIND).map(String::as_str) == Some(kind)
    })
}

/// The `label=` filter for objects of ours, of `kind`.
pub fn filter(kind: &str) -> Vec<String> {
    vec![format!("{OWNER}=true"), format!("{KIND}={kind}")]
}

/// A Dockerfile `LABEL` instruction for `docker import`'s `changes`, with the value
/// quoted so spaces and quotes survive.
pub fn dockerfile_label(key: &str, value: &str) -> String {
    let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
    format!("LABEL {key}=\"{escaped}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_labels_mark_owner_kind_and_director() {
        let ctx = CallContext {
            director_uuid: Some("dir-1".into()),
            ..Default::default()
        };
        let l = base(KIND_VM, &ctx);
        assert_eq!(l[OWNER], "true");
        assert_eq!(l[KIND], "vm");
        assert_eq!(l[DIRECTOR], "dir-1");
        assert!(is_ours(Some(&l), KIND_VM));
        assert!(!is_ours(Some(&l), KIND_DISK));
        assert!(!is_ours(None, KIND_VM));
        let l = base(KIND_DISK, &CallContext::default());
        assert!(!l.contains_key(DIRECTOR));
    }

    #[test]
    fn dockerfile_labels_are_quoted() {
        assert_eq!(
            dockerfile_label(STEMCELL_NAME, r#"a "b" \c"#),
            r#"LABEL bosh-container-cpi.stemcell.name="a \"b\" \\c""#
        );
    }
}
