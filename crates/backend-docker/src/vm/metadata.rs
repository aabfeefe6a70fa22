//! Metadata: a container's labels cannot change after creation, and renaming the
//! container would break `VM cid = container name`. `set_vm_metadata` therefore
//! (re)creates a *metadata holder* beside the VM: a never-started container named
//! `<vm_cid>.<deployment>.<job>.<index>`, labelled `bosh.<key>=<value>` for every
//! metadata key and with the whole metadata as JSON. `docker ps -a` shows the VM and
//! its holder side by side; `docker ps -a --filter label=bosh.deployment=cf` lists a
//! deployment. The holder uses the VM's image (already present), no network and no
//! resources, and is removed with the VM.

use std::collections::HashMap;

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::CreateContainerOptions;
use cpi_core::{CallContext, Metadata, VmCid};
use serde_json::Value;

use crate::error::Result;
use crate::vm::lifecycle::{list_by_label, remove_container, require};
use crate::{labels, DockerCpi};

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
    for id in list_by_label(
        client,
        labels::KIND_VM_METADATA,
        labels::VM_CID,
        vm.as_str(),
    )
    .await?
    {
        remove_container(client, &id, 0).await?;
    }
    let mut labels = labels::base(labels::KIND_VM_METADATA, ctx);
    labels.extend(metadata_labels(metadata));
    labels.insert(labels::VM_CID.to_owned(), vm.to_string());
    let name = holder_name(vm.as_str(), metadata);
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
