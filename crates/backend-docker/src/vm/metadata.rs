//! Metadata: a container's labels cannot change after creation, and renaming the
//! container would break `VM cid = container name`. `set_vm_metadata` therefore
//! (re)creates a *metadata holder* beside the VM: a never-started container named
//! `<vm_cid>.<deployment>.<job>.<index>`, labelled `bosh.<key>=<value>` for every
//! metadata key and with the whole metadata as JSON. `docker ps -a` shows the VM and
//! its holder side by side; `docker ps -a --filter label=bosh.deployment=cf` lists a
//! deployment. The holder uses the VM's image (already present), no network and no
//! resources, and is removed with the VM.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::CreateContainerOptions;
use cpi_core::{CallContext, Metadata, VmCid};
use serde_json::Value;

use crate::client::Client;
use crate::disk::mounts::StateLayout;
use crate::error::{DockerError, Result};
use crate::vm::lifecycle::{list_by_label, remove_container, require};
use crate::{labels, DockerCpi, Mounter};

/// The names of a VM's metadata holders, recorded in its state directory
/// (`<state_dir>/vms/<vm>/metadata-holders`, a JSON array) with the local mounter,
/// so that `set_vm_metadata` and `delete_vm` find the holders by name instead of a
/// label query, which dockerd answers by walking every container it has.
///
/// `create_vm` creates it empty; a holder's name is added before the holder is
/// created and removed after the holder is, so the record always names at least
/// the holders that exist, also after a kill. A VM without the record (made by an
/// earlier version, or with the helper) is served by the label query.
#[derive(Debug, Clone)]
pub struct HolderRecord {
    path: PathBuf,
}

impl HolderRecord {
    /// The record of VM `vm`, with the local mounter.
    pub fn of(mounter: Mounter, layout: &StateLayout, vm: &str) -> Option<HolderRecord> {
        (mounter == Mounter::Local).then(|| HolderRecord {
            path: layout.vm_dir(vm).join("metadata-holders"),
        })
    }

    /// The recorded names; `None` when the VM has no record.
    pub fn read(&self) -> Result<Option<Vec<String>>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                DockerError::Conflict(format!(
                    "{} is not a list of metadata holders: {e}",
                    self.path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DockerError::io("reading", &self.path, e)),
        }
    }

    /// Replaces the record (atomically).
    pub fn write(&self, names: &[String]) -> Result<()> {
        let io = |e: std::io::Error| DockerError::io("writing", &self.path, e);
        let dir = self.path.parent().unwrap_or(std::path::Path::new("/"));
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
        let json = serde_json::to_vec(names)
            .map_err(|e| DockerError::Invalid(format!("serialising holder names: {e}")))?;
        tmp.write_all(&json).map_err(io)?;
        tmp.persist(&self.path).map_err(|e| io(e.error))?;
        Ok(())
    }
}

/// Removes the metadata holder `name` of VM `vm`, after checking by an inspect
/// that it is one (a recorded name is only a name); a missing one is success.
pub async fn remove_holder(client: &Client, name: &str, vm: &str) -> Result<()> {
    let found = match client.docker.inspect_container(name, None).await {
        Ok(c) => c,
        Err(e) => {
            let err = DockerError::api(&client.endpoint, format!("inspecting container {name}"), e);
            return if err.is_not_found() { Ok(()) } else { Err(err) };
        }
    };
    let labels = found.config.and_then(|c| c.labels);
    let holder = labels::is_ours(labels.as_ref(), labels::KIND_VM_METADATA)
        && labels
            .as_ref()
            .and_then(|l| l.get(labels::VM_CID))
            .is_some_and(|v| v == vm);
    if !holder {
        tracing::warn!(container = %name, vm_cid = %vm, "a recorded metadata holder name belongs to another container; leaving it");
        return Ok(());
    }
    remove_container(client, name, 0).await
}

/// The ids or names of VM `vm`'s metadata holders: from its record when it has one,
/// else by a label query.
pub async fn holders(
    client: &Client,
    record: Option<&HolderRecord>,
    vm: &str,
) -> Result<Vec<String>> {
    if let Some(names) = match record {
        Some(r) => r.read()?,
        None => None,
    } {
        return Ok(names);
    }
    list_by_label(client, labels::KIND_VM_METADATA, labels::VM_CID, vm).await
}

/// Labels `bosh.<key>=<value>` for string-like metadata values (pure).
pub fn metadata_labels(metadata: &Metadata) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for (k, v) in metadata {
        let value = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        out.insert(format!("bosh.{k}"), value);
    }
    out.insert(
        labels::METADATA.to_owned(),
        Value::Object(metadata.clone()).to_string(),
    );
    out
}

fn name_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(60)
        .collect()
}

/// The holder's name: `<vm>.<deployment>.<job>.<index>` with what the metadata has.
pub fn holder_name(vm: &str, metadata: &Metadata) -> String {
    let get = |k: &str| {
        metadata.get(k).map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    };
    let parts: Vec<String> = [
        get("deployment"),
        get("job")
            .or_else(|| get("instance_group"))
            .or_else(|| get("name")),
        get("index"),
    ]
    .into_iter()
    .flatten()
    .filter(|s| !s.is_empty())
    .map(|s| name_part(&s))
    .collect();
    if parts.is_empty() {
        format!("{vm}.metadata")
    } else {
        format!("{vm}.{}", parts.join("."))
    }
}

/// `set_vm_metadata`: replaces the VM's metadata holder.
pub async fn set_vm_metadata(
    cpi: &DockerCpi,
    ctx: &CallContext,
    vm: &VmCid,
    metadata: &Metadata,
) -> Result<()> {
    let client = cpi.client().await?;
    let info = require(client, vm.as_str()).await?;
    let mounter = cpi.mounter(client);
    let record = HolderRecord::of(mounter, &cpi.layout(mounter)?, vm.as_str())
        .filter(|r| r.path.parent().is_some_and(std::path::Path::is_dir));
    let name = holder_name(vm.as_str(), metadata);
    let old = holders(client, record.as_ref(), vm.as_str()).await?;
    if let Some(r) = &record {
        let mut names = old.clone();
        names.retain(|n| n != &name);
        names.push(name.clone());
        r.write(&names)?;
    }
    for id in &old {
        remove_holder(client, id, vm.as_str()).await?;
    }
    let mut labels = labels::base(labels::KIND_VM_METADATA, ctx);
    labels.extend(metadata_labels(metadata));
    labels.insert(labels::VM_CID.to_owned(), vm.to_string());
    client
        .docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.clone()),
                ..Default::default()
            }),
            ContainerCreateBody {
                image: Some(info.image.clone()),
                entrypoint: Some(vec!["/bin/true".into()]),
                cmd: Some(vec![]),
                labels: Some(labels),
                network_disabled: Some(true),
                host_config: Some(HostConfig {
                    network_mode: Some("none".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .map_err(client.err(format!("creating the metadata holder {name} of VM {vm}")))?;
    if let Some(r) = &record {
        r.write(std::slice::from_ref(&name))?;
    }
    tracing::info!(vm_cid = %vm, holder = %name, "recorded VM metadata");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn metadata_becomes_labels_and_a_readable_name() {
        let md = json!({"director":"d","deployment":"cf","instance_group":"router","job":"router","id":"abc","name":"router/abc","index":"0","created_at":"2026-01-01T00:00:00Z"});
        let md = md.as_object().expect("obj").clone();
        let l = metadata_labels(&md);
        assert_eq!(l["bosh.deployment"], "cf");
        assert_eq!(l["bosh.index"], "0");
        assert!(l[labels::METADATA].contains("router/abc"));
        assert_eq!(holder_name("c-1", &md), "c-1.cf.router.0");
        let odd = json!({"deployment":"a b/c","index":3})
            .as_object()
            .expect("obj")
            .clone();
        assert_eq!(holder_name("c-1", &odd), "c-1.a-b-c.3");
        assert_eq!(holder_name("c-1", &Metadata::new()), "c-1.metadata");
    }
}
