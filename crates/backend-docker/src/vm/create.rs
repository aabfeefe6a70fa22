//! `create_vm`: networks, ephemeral volume, per-VM disks directory, disks from
//! `disk_cids`, the container (created, not started), its other networks, the agent
//! settings file, then start. Any failure removes everything created so far and
//! reports the failure together with any failure of that cleanup.

use std::collections::HashMap;

use bollard::models::{NetworkConnectRequest, VolumeCreateRequest};
use bollard::query_parameters::{CreateContainerOptions, LogsOptions};
use cpi_core::{AgentSettings, CallContext, CreateVm, CreatedVm, VmCid};
use futures_util::StreamExt;

use crate::capabilities::{self, Privilege};
use crate::client::Client;
use crate::disk::mounts::StateLayout;
use crate::error::{DockerError, Result};
use crate::network::{self, NetworkPlan, PlanOptions};
use crate::vm::prelude::{self, Init, PreludeInput};
use crate::vm::spec::{self, SpecInput};
use crate::vm::{lifecycle, probe};
use crate::{agent_env, disk, labels, stemcell, DockerCpi, Mounter};

/// What this call has created, to undo on failure.
#[derive(Debug, Default)]
struct Undo {
    networks: Vec<String>,
    volume: Option<String>,
    vm_dir: bool,
    disks: Vec<String>,
    container: Option<String>,
}

impl Undo {
    async fn run(
        self,
        client: &Client,
        ctx: &CallContext,
        mounter: Mounter,
        layout: &StateLayout,
        image: &str,
        vm: &str,
    ) -> Vec<DockerError> {
        let mut errors = Vec::new();
        if let Some(c) = &self.container {
            if let Err(e) = lifecycle::remove_container(client, c, 0).await {
                errors.push(e);
            }
        }
        for d in &self.disks {
            if let Err(e) = disk::unmount(client, ctx, mounter, layout, image, vm, d).await {
                errors.push(e);
            }
        }
        if self.vm_dir {
            let r = match mounter {
                Mounter::Local => disk::local::remove_vm(layout, vm),
                Mounter::Helper => disk::remote::remove_vm(client, ctx, layout, image, vm).await,
            };
            if let Err(e) = r {
                errors.push(e);
            }
        }
        if let Some(v) = &self.volume {
            if let Err(e) = lifecycle::remove_volume(client, v).await {
                errors.push(e);
            }
        }
        errors.extend(network::remove_unused(client, &self.networks).await);
        errors
    }
}

/// `create_vm`.
pub async fn create_vm(cpi: &DockerCpi, ctx: &CallContext, req: CreateVm) -> Result<CreatedVm> {
    let client = cpi.client().await?;
    let config = cpi.config();
    let vm_cid = format!("c-{}", uuid::Uuid::new_v4());
    // Three independent lookups at once (each its own connection to the daemon):
    // `join!`, not `try_join!`, so a failed lookup never cuts the removal of an
    // earlier attempt short.
    let (facts, earlier, image) = tokio::join!(
        cpi.facts(),
        crate::vm::orphans::remove_earlier_attempts(
            cpi,
            client,
            ctx,
            req.agent_id.as_str(),
            &vm_cid
        ),
        stemcell::inspect(client, &req.stemcell),
    );
    let facts = facts?.clone();
    earlier?;
    let image = image?;
    let os = match &image.os {
        Some(os) => Some(os.clone()),
        None => match probe::probe_os(client, ctx, req.stemcell.as_str()).await {
            Ok(os) => os,
            Err(e) => {
                tracing::warn!(stemcell = %req.stemcell, error = %e, "could not read the stemcell's /etc/os-release");
                None
            }
        },
    };
    let (init, why) = spec::choose_init(
        req.cloud_properties.systemd_override(),
        config.start_containers_with_systemd,
        os.as_deref(),
    );
    tracing::info!(vm_cid = %vm_cid, init = init.label(), reason = %why, "chose the VM's init");

    // Held from listing the networks until the missing ones exist (see `hostlock`).
    let net_lock = crate::hostlock::acquire(
        crate::hostlock::Scope::Networks,
        &client.endpoint,
        std::time::Duration::from_secs(config.timeout_seconds),
    )
    .await?;
    let existing = network::list(client).await?;
    let plan = network::plan(
        &req.networks,
        &existing,
        &PlanOptions {
            create_networks: config.create_networks,
            default_network: config.default_network.clone(),
        },
    )?;
    for w in &plan.warnings {
        tracing::warn!(vm_cid = %vm_cid, "{w}");
    }
    let mounter = cpi.mounter(client);
    let layout = cpi.layout(mounter)?;
    let helper_image = config
        .helper_image
        .clone()
        .unwrap_or_else(|| image.id.clone());

    let mut undo = Undo::default();
    let result = create_steps(
        cpi,
        client,
        ctx,
        &req,
        &vm_cid,
        init,
        &facts,
        &plan,
        mounter,
        &layout,
        &helper_image,
        net_lock,
        &mut undo,
    )
    .await;
    match result {
        Ok(created) => Ok(created),
        Err(e) => {
            tracing::warn!(vm_cid = %vm_cid, error = %e, "create_vm failed; removing what was created");
            let cleanup = undo
                .run(client, ctx, mounter, &layout, &helper_image, &vm_cid)
                .await;
            Err(e.with_cleanup(cleanup))
        }
    }
}

#[allow(
    clippy::too_many_arguments,
    reason = "one call's state, threaded through its steps"
)]
async fn create_steps(
    cpi: &DockerCpi,
    client: &Client,
    ctx: &CallContext,
    req: &CreateVm,
    vm_cid: &str,
    init: Init,
    facts: &crate::client::DaemonFacts,
    plan: &NetworkPlan,
    mounter: Mounter,
    layout: &StateLayout,
    helper_image: &str,
    net_lock: crate::hostlock::HostLock,
    undo: &mut Undo,
) -> Result<CreatedVm> {
    let config = cpi.config();
    network::ensure(client, ctx, plan, &mut undo.networks).await?;
    drop(net_lock);

    // The ephemeral disk.
    let eph = spec::ephemeral_volume(vm_cid);
    let mut l = labels::base(labels::KIND_EPHEMERAL, ctx);
    l.insert(labels::VM_CID.to_owned(), vm_cid.to_owned());
    // With the director uuid, how a retried create_vm finds this attempt (`orphans`).
    l.insert(labels::AGENT_ID.to_owned(), req.agent_id.to_string());
    if let Some(size) = req.cloud_properties.ephemeral_disk_mib {
        l.insert(labels::SIZE_MIB.to_owned(), size.to_string());
    }
    client
        .docker
        .create_volume(VolumeCreateRequest {
            name: Some(eph.clone()),
            driver: Some("local".into()),
            labels: Some(l),
            ..Default::default()
        })
        .await
        .map_err(client.err(format!("creating the ephemeral volume {eph}")))?;
    undo.volume = Some(eph);

    // The per-VM disks directory, and the disks the director named.
    undo.vm_dir = true;
    if mounter == Mounter::Local {
        disk::local::prepare_vm(layout, vm_cid)?;
    }
    let vm = VmCid::new(vm_cid).map_err(|e| DockerError::Invalid(e.message))?;
    let mut settings =
        AgentSettings::for_vm(&req.agent_id, &vm, cpi.agent(), &req.networks, &req.env);
    for d in &req.disk_cids {
        if !cpi_core::ids::is_simple_name(d.as_str()) {
            continue;
        }
        if disk::attach_for_new_vm(
            client,
            ctx,
            mounter,
            layout,
            helper_image,
            vm_cid,
            d.as_str(),
        )
        .await?
        {
            undo.disks.push(d.to_string());
            settings.attach_persistent(d);
        }
    }

    let copy = disk::settings_copy(mounter, layout, vm_cid);
    if let Some(copy) = &copy {
        // The VM's settings file: a host file the container binds (no archive
        // request to write it, now or when disks come and go).
        copy.create_bound()?;
    }
    if let Some(record) = crate::vm::metadata::HolderRecord::of(mounter, layout, vm_cid) {
        record.write(&[])?;
    }
    let mut privilege = probe::initial_privilege(cpi, client, ctx, helper_image).await?;
    let mut probed = false;
    let mut shared_fixed = false;
    loop {
        if privilege.lacks_required() {
            tracing::warn!(vm_cid = %vm_cid, "the container runtime lacks CAP_SYS_ADMIN: the agent cannot set the hostname or mount disks");
        }
        create_container(
            cpi,
            client,
            ctx,
            req,
            vm_cid,
            init,
            facts,
            plan,
            layout,
            copy.as_ref(),
            &mut privilege,
            undo,
        )
        .await?;
        for ep in plan.endpoints.iter().skip(1) {
            client
                .docker
                .connect_network(
                    &ep.docker_network,
                    NetworkConnectRequest {
                        container: vm_cid.to_owned(),
                        endpoint_config: Some(ep.settings(vm_cid)),
                    },
                )
                .await
                .map_err(client.err(format!(
                    "connecting container {vm_cid} to network '{}' (network '{}')",
                    ep.docker_network, ep.bosh_name
                )))?;
        }
        agent_env::write_via(client, copy.as_ref(), vm_cid, &settings).await?;
        match start(client, vm_cid).await {
            Ok(()) => break,
            Err(e) => {
                let msg = e.to_string();
                if capabilities::is_caps_failure(&msg) && !probed && config.privileged != Some(true)
                {
                    tracing::warn!(vm_cid = %vm_cid, "the runtime cannot grant the capabilities asked; probing its bounding set");
                    probed = true;
                    lifecycle::remove_container(client, vm_cid, 0).await?;
                    undo.container = None;
                    privilege = probe::probe_privilege(client, ctx, helper_image).await?;
                    continue;
                }
                if disk::remote::is_not_shared_error(&e)
                    && mounter == Mounter::Helper
                    && !shared_fixed
                {
                    shared_fixed = true;
                    disk::remote::share_state_dir(client, ctx, layout, helper_image).await?;
                    lifecycle::remove_container(client, vm_cid, 0).await?;
                    undo.container = None;
                    continue;
                }
                return Err(e);
            }
        }
    }

    // What Docker assigned (dynamic networks), and an early check that the VM runs.
    let inspected = client
        .docker
        .inspect_container(vm_cid, None)
        .await
        .map_err(client.err(format!("inspecting container {vm_cid}")))?;
    let running = inspected
        .state
        .as_ref()
        .and_then(|s| s.running)
        .unwrap_or(false);
    if !running {
        let logs = last_logs(client, vm_cid).await;
        return Err(DockerError::Conflict(format!(
            "container {vm_cid} stopped right after starting (exit code {}); its output: {logs}",
            inspected.state.and_then(|s| s.exit_code).unwrap_or(-1)
        )));
    }
    let endpoints: HashMap<String, bollard::models::EndpointSettings> = inspected
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default();
    let mut networks = req.networks.clone();
    for ep in plan.endpoints.iter().filter(|e| e.dynamic) {
        let Some(actual) = endpoints.get(&ep.docker_network) else {
            continue;
        };
        let assigned = actual
            .ip_address
            .as_deref()
            .filter(|s| !s.is_empty())
            .zip(actual.ip_prefix_len)
            .and_then(|(ip, len)| format!("{ip}/{len}").parse().ok())
            .or_else(|| {
                actual
                    .global_ipv6_address
                    .as_deref()
                    .filter(|s| !s.is_empty())
                    .zip(actual.global_ipv6_prefix_len)
                    .and_then(|(ip, len)| format!("{ip}/{len}").parse().ok())
            });
        let gateway = actual
            .gateway
            .as_deref()
            .filter(|s| !s.is_empty())
            .and_then(|g| g.parse().ok());
        if let (Some(addr), Some(net)) = (assigned, networks.0.get_mut(&ep.bosh_name)) {
            net.set_assigned(addr, gateway);
        }
    }
    if plan.endpoints.iter().any(|e| e.dynamic) {
        // The prelude is waiting for this (see `PreludeInput::wait_for_final_settings`).
        let mut final_settings =
            AgentSettings::for_vm(&req.agent_id, &vm, cpi.agent(), &networks, &req.env);
        for d in settings.persistent_disks() {
            if let Ok(d) = cpi_core::DiskCid::new(d) {
                final_settings.attach_persistent(&d);
            }
        }
        agent_env::write_via(client, copy.as_ref(), vm_cid, &final_settings).await?;
        agent_env::mark_final(client, vm_cid).await?;
    }
    tracing::info!(vm_cid = %vm_cid, "VM created and started");
    Ok(CreatedVm { cid: vm, networks })
}

async fn start(client: &Client, vm_cid: &str) -> Result<()> {
    client
        .docker
        .start_container(vm_cid, None)
        .await
        .map_err(client.err(format!("starting container {vm_cid}")))
}

#[allow(
    clippy::too_many_arguments,
    reason = "one call's state, threaded through its steps"
)]
async fn create_container(
    cpi: &DockerCpi,
    client: &Client,
    ctx: &CallContext,
    req: &CreateVm,
    vm_cid: &str,
    init: Init,
    facts: &crate::client::DaemonFacts,
    plan: &NetworkPlan,
    layout: &StateLayout,
    copy: Option<&agent_env::HostCopy>,
    privilege: &mut Privilege,
    undo: &mut Undo,
) -> Result<()> {
    let settings_file = copy.map(agent_env::HostCopy::bound);
    let first = plan.endpoints.first();
    let default_gateway = if plan.endpoints.len() > 1 {
        first
            .and_then(|ep| req.networks.0.get(&ep.bosh_name))
            .and_then(|n| n.gateway)
    } else {
        None
    };
    let prelude = prelude::script(&PreludeInput {
        init,
        nameservers: req.networks.nameservers(),
        hostname: vm_cid.to_owned(),
        address: plan.endpoints.iter().find_map(|e| e.ip),
        default_gateway,
        remount_rw: matches!(privilege, Privilege::Capabilities { .. }),
        cgroup_v1: facts.cgroup_version == 1,
        wait_for_final_settings: plan.endpoints.iter().any(|e| e.dynamic),
    });
    for _ in 0..8 {
        let built = spec::build(&SpecInput {
            vm_cid,
            agent_id: req.agent_id.as_str(),
            stemcell: req.stemcell.as_str(),
            props: &req.cloud_properties,
            init,
            privilege,
            cgroup_version: facts.cgroup_version,
            config: cpi.config(),
            layout,
            first_network: first.map(|ep| (ep.docker_network.clone(), ep.settings(vm_cid))),
            settings_file: settings_file.as_deref(),
            prelude: prelude.clone(),
            // A bind of a missing source would create it on the host: skip it where
            // we can see that the host has no modules directory.
            host_modules: cpi.config().mount_host_modules
                && (!client.unix || std::path::Path::new("/lib/modules").is_dir()),
            ctx,
        })?;
        for w in &built.warnings {
            tracing::warn!(vm_cid = %vm_cid, "{w}");
        }
        match client
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(vm_cid.to_owned()),
                    ..Default::default()
                }),
                built.body,
            )
            .await
        {
            Ok(_) => {
                undo.container = Some(vm_cid.to_owned());
                return Ok(());
            }
            Err(e) => {
                let err = DockerError::api(
                    &client.endpoint,
                    format!("creating container {vm_cid} from stemcell {}", req.stemcell),
                    e,
                );
                // Older daemons do not know the newest capabilities: `ALL` does not
                // include them there, so there is nothing to drop.
                if let Some(cap) = err
                    .daemon_message()
                    .and_then(capabilities::unknown_capability)
                {
                    if privilege.forget(&cap) {
                        tracing::debug!(capability = %cap, "daemon does not know this capability; not dropping it");
                        continue;
                    }
                }
                return Err(err);
            }
        }
    }
    Err(DockerError::Conflict(format!(
        "creating container {vm_cid}: the daemon kept refusing the capability list"
    )))
}

async fn last_logs(client: &Client, name: &str) -> String {
    let mut logs = client.docker.logs(
        name,
        Some(LogsOptions {
            stdout: true,
            stderr: true,
            tail: "20".into(),
            ..Default::default()
        }),
    );
    let mut out = String::new();
    while let Some(Ok(item)) = logs.next().await {
        out.push_str(&String::from_utf8_lossy(&item.into_bytes()));
    }
    out.trim().to_owned()
}
