//! BOSH networks onto Docker networks.
//!
//! A manual network puts the VM at its static IP on a Docker network: the one named by
//! `cloud_properties.name`, else an existing one with the same subnet, else one we
//! create from the subnet (labelled as ours). Dynamic networks join the named (or the
//! configured default) network and Docker assigns the address, which `create_vm`
//! reports. [`plan()`] decides all that from the list of Docker networks, without IO;
//! [`ensure`] creates what the plan says is missing.

pub mod plan;

use std::collections::HashMap;

use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest};
use bollard::query_parameters::ListNetworksOptions;
use cpi_core::CallContext;

use crate::client::Client;
use crate::error::{DockerError, Result};
use crate::labels;

pub use plan::{
    name_for_subnet, plan, DockerNetwork, Endpoint, NetworkPlan, NetworkToCreate, PlanOptions,
};
/// The network creation request (pure).
pub fn create_request(spec: &NetworkToCreate, ctx: &CallContext) -> NetworkCreateRequest {
    let mut labels = labels::base(labels::KIND_NETWORK, ctx);
    if let Some(subnet) = spec.subnet {
        labels.insert(labels::SUBNET.to_owned(), subnet.to_string());
    }
    NetworkCreateRequest {
        name: spec.name.clone(),
        driver: Some(spec.driver.clone()),
        enable_ipv6: spec.enable_ipv6.then_some(true),
        ipam: spec.subnet.map(|subnet| Ipam {
            driver: Some("default".into()),
            config: Some(vec![IpamConfig {
                subnet: Some(subnet.to_string()),
                gateway: spec.gateway.map(|g| g.to_string()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        labels: Some(labels),
        ..Default::default()
    }
}

/// Lists the daemon's networks.
pub async fn list(client: &Client) -> Result<Vec<DockerNetwork>> {
    let nets = client
        .docker
        .list_networks(None::<ListNetworksOptions>)
        .await
        .map_err(client.err("listing networks"))?;
    Ok(nets
        .into_iter()
        .filter_map(DockerNetwork::from_api)
        .collect())
}

/// Creates the networks the plan needs, recording the ids of the networks this call
/// created in `created` (so a failed `create_vm` can remove them again).
pub async fn ensure(
    client: &Client,
    ctx: &CallContext,
    plan: &NetworkPlan,
    created: &mut Vec<String>,
) -> Result<()> {
    for ep in &plan.endpoints {
        let Some(spec) = &ep.create else { continue };
        tracing::info!(network = %spec.name, subnet = ?spec.subnet.map(|s| s.to_string()), "creating Docker network");
        match client
            .docker
            .create_network(create_request(spec, ctx))
            .await
        {
            Ok(resp) => {
                if let Some(id) = converge_duplicates(client, &spec.name, &resp.id).await? {
                    created.push(id);
                }
            }
            Err(e) => {
                let err = DockerError::api(
                    &client.endpoint,
                    format!(
                        "creating network '{}' for network '{}'",
                        spec.name, ep.bosh_name
                    ),
                    e,
                );
                // Another create_vm may have created it a moment ago.
                let now = list(client).await?;
                let same = now.iter().find(|n| {
                    n.name == spec.name && spec.subnet.is_none_or(|s| n.subnets.contains(&s))
                });
                if same.is_none() {
                    return Err(err);
                }
            }
        }
    }
    Ok(())
}

/// API versions before 1.44 let two concurrent creates make two networks of one name.
/// Everybody keeps the one with the smallest id; returns our id if ours survived.
async fn converge_duplicates(client: &Client, name: &str, our_id: &str) -> Result<Option<String>> {
    let mut same: Vec<DockerNetwork> = list(client)
        .await?
        .into_iter()
        .filter(|n| n.name == name)
        .collect();
    if same.len() <= 1 {
        return Ok(Some(our_id.to_owned()));
    }
    same.sort_by(|a, b| a.id.cmp(&b.id));
    if same[0].id == our_id {
        return Ok(Some(our_id.to_owned()));
    }
    tracing::info!(network = %name, "another process created the same network concurrently; using theirs");
    if let Err(e) = client.docker.remove_network(our_id).await {
        tracing::warn!(network = %name, error = %e, "could not remove our duplicate network");
    }
    Ok(None)
}

/// Removes networks by id if no container uses them (cleanup after a failed
/// `create_vm`). Errors are returned, not raised, for the cleanup report.
pub async fn remove_unused(client: &Client, ids: &[String]) -> Vec<DockerError> {
    let mut errors = Vec::new();
    for id in ids {
        match client.docker.inspect_network(id, None).await {
            Ok(n) if n.containers.as_ref().is_none_or(HashMap::is_empty) => {
                if let Err(e) = client.docker.remove_network(id).await {
                    let err =
                        DockerError::api(&client.endpoint, format!("removing network {id}"), e);
                    if !err.is_not_found() && !err.is_conflict() {
                        errors.push(err);
                    }
                }
            }
            _ => {}
        }
    }
    errors
}
