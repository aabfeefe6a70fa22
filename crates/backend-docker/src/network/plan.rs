//! Where each BOSH network goes, decided without IO from the list of Docker networks.

use std::net::IpAddr;

use bollard::models::{EndpointIpamConfig, EndpointSettings};
use cpi_core::{Network, NetworkType, Networks};
use ipnet::IpNet;

use crate::error::{DockerError, Result};
use crate::labels;

/// What we need to know of an existing Docker network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerNetwork {
    /// Its name.
    pub name: String,
    /// Its id.
    pub id: String,
    /// Its driver (`bridge`, `macvlan`, ...).
    pub driver: String,
    /// Its IPAM subnets.
    pub subnets: Vec<IpNet>,
    /// Its IPAM gateways.
    pub gateways: Vec<IpAddr>,
    /// Whether we created it.
    pub ours: bool,
}

impl DockerNetwork {
    pub(crate) fn from_api(n: bollard::models::Network) -> Option<DockerNetwork> {
        let configs = n.ipam.and_then(|i| i.config).unwrap_or_default();
        Some(DockerNetwork {
            ours: labels::is_ours(n.labels.as_ref(), labels::KIND_NETWORK),
            name: n.name?,
            id: n.id.unwrap_or_default(),
            driver: n.driver.unwrap_or_default(),
            subnets: configs
                .iter()
                .filter_map(|c| c.subnet.as_deref()?.parse().ok())
                .collect(),
            gateways: configs
                .iter()
                .filter_map(|c| c.gateway.as_deref()?.parse().ok())
                .collect(),
        })
    }

    /// Docker's default bridge cannot give containers static addresses.
    fn is_default_bridge(&self) -> bool {
        self.name == "bridge" || self.name == "host" || self.name == "none"
    }
}

/// A Docker network to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkToCreate {
    /// Its name.
    pub name: String,
    /// Its driver.
    pub driver: String,
    /// The subnet (manual networks).
    pub subnet: Option<IpNet>,
    /// The gateway (manual networks with one).
    pub gateway: Option<IpAddr>,
    /// Whether it gets IPv6.
    pub enable_ipv6: bool,
}

/// How one BOSH network reaches the VM.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// The BOSH network's name.
    pub bosh_name: String,
    /// The Docker network's name.
    pub docker_network: String,
    /// The network to create first, when it does not exist yet.
    pub create: Option<NetworkToCreate>,
    /// The static address (manual networks).
    pub ip: Option<IpAddr>,
    /// Whether Docker assigns the address.
    pub dynamic: bool,
}

impl Endpoint {
    /// The endpoint settings for create or connect.
    pub fn settings(&self, vm_cid: &str) -> EndpointSettings {
        let ipam = self.ip.map(|ip| EndpointIpamConfig {
            ipv4_address: ip.is_ipv4().then(|| ip.to_string()),
            ipv6_address: ip.is_ipv6().then(|| ip.to_string()),
            ..Default::default()
        });
        EndpointSettings {
            ipam_config: ipam,
            // Docker refuses aliases on its default bridge.
            aliases: (self.docker_network != "bridge").then(|| vec![vm_cid.to_owned()]),
            ..Default::default()
        }
    }
}

/// The result of planning: endpoints in order (the first is the one the container
/// is created with, and the default-gateway network), and warnings for the log.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NetworkPlan {
    /// Endpoints, default gateway first.
    pub endpoints: Vec<Endpoint>,
    /// Things the operator should know (ignored vip networks, gateway mismatches).
    pub warnings: Vec<String>,
}

/// Settings of the planner from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanOptions {
    /// Create missing networks.
    pub create_networks: bool,
    /// The Docker network of unnamed dynamic networks.
    pub default_network: String,
}

/// The name we give a network created for a subnet: `bosh-10.245.0.0-16`.
pub fn name_for_subnet(subnet: IpNet) -> String {
    format!(
        "bosh-{}-{}",
        subnet.network().to_string().replace(':', "_"),
        subnet.prefix_len()
    )
}

/// Decides where each BOSH network goes (pure).
pub fn plan(
    networks: &Networks,
    existing: &[DockerNetwork],
    opts: &PlanOptions,
) -> Result<NetworkPlan> {
    if networks.is_empty() {
        return Err(DockerError::Invalid(
            "create_vm needs at least one network".into(),
        ));
    }
    let mut out = NetworkPlan::default();
    let first = networks.default_gateway().map(|n| n.name.clone());
    let mut ordered: Vec<&Network> = networks.iter().collect();
    ordered.sort_by_key(|n| Some(&n.name) != first.as_ref());
    for net in ordered {
        if net.kind == NetworkType::Vip {
            out.warnings.push(format!(
                "network '{}' is a vip network: Docker has no floating addresses, ignored",
                net.name
            ));
            continue;
        }
        let ep = plan_one(net, existing, opts, &mut out.warnings)?;
        if let Some(other) = out
            .endpoints
            .iter()
            .find(|e| e.docker_network == ep.docker_network)
        {
            return Err(DockerError::Invalid(format!(
                "networks '{}' and '{}' both map to Docker network '{}'; a container joins a Docker network once: give them different cloud_properties.name",
                other.bosh_name, net.name, ep.docker_network
            )));
        }
        out.endpoints.push(ep);
    }
    if out.endpoints.is_empty() {
        return Err(DockerError::Invalid(
            "create_vm needs at least one manual or dynamic network".into(),
        ));
    }
    Ok(out)
}

fn plan_one(
    net: &Network,
    existing: &[DockerNetwork],
    opts: &PlanOptions,
    warnings: &mut Vec<String>,
) -> Result<Endpoint> {
    let named = net.cloud_property_str("name").filter(|s| !s.is_empty());
    let driver = net
        .cloud_property_str("driver")
        .filter(|s| !s.is_empty())
        .unwrap_or("bridge")
        .to_owned();
    let ipv6 = net.cloud_property_bool("enable_ipv6").unwrap_or(false)
        || net.ip().is_some_and(|ip| ip.is_ipv6());
    let find = |name: &str| existing.iter().find(|n| n.name == name);

    if net.kind == NetworkType::Dynamic {
        let name = named.unwrap_or(opts.default_network.as_str()).to_owned();
        let create = match find(&name) {
            Some(_) => None,
            None if opts.create_networks && named.is_some() => Some(NetworkToCreate {
                name: name.clone(),
                driver,
                subnet: None,
                gateway: None,
                enable_ipv6: ipv6,
            }),
            None => {
                return Err(DockerError::NetworkNotFound(format!(
                    "network '{}': Docker network '{name}' does not exist{}",
                    net.name,
                    if opts.create_networks {
                        ""
                    } else {
                        " (create_networks is off: create it with `docker network create`)"
                    }
                )))
            }
        };
        return Ok(Endpoint {
            bosh_name: net.name.clone(),
            docker_network: name,
            create,
            ip: None,
            dynamic: true,
        });
    }

    // Manual: parsing guaranteed an address with its subnet.
    let (Some(address), Some(ip)) = (net.address, net.ip()) else {
        return Err(DockerError::Invalid(format!(
            "network '{}' is manual but has no ip",
            net.name
        )));
    };
    let subnet = address.trunc();
    let docker = match named {
        Some(name) => find(name),
        None => existing
            .iter()
            .find(|n| n.subnets.contains(&subnet))
            .or_else(|| {
                existing
                    .iter()
                    .find(|n| n.subnets.iter().any(|s| s.contains(&ip)) && !n.is_default_bridge())
            }),
    };
    match docker {
        Some(d) => {
            if d.is_default_bridge() {
                return Err(DockerError::Invalid(format!(
                    "network '{}': Docker's '{}' network cannot give a container the static ip {ip}; name a user-defined network in cloud_properties.name",
                    net.name, d.name
                )));
            }
            if !d.subnets.is_empty() && !d.subnets.iter().any(|s| s.contains(&ip)) {
                return Err(DockerError::Invalid(format!(
                    "network '{}': ip {ip} is outside the subnets ({}) of Docker network '{}'; fix the ip or the network's range",
                    net.name,
                    d.subnets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                    d.name
                )));
            }
            if !d.subnets.is_empty() && !d.subnets.contains(&subnet) {
                warnings.push(format!(
                    "network '{}': subnet {subnet} differs from Docker network '{}' ({})",
                    net.name,
                    d.name,
                    d.subnets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                ));
            }
            if let Some(gw) = net.gateway {
                if !d.gateways.is_empty() && !d.gateways.contains(&gw) {
                    warnings.push(format!(
                        "network '{}': gateway {gw} differs from Docker network '{}' gateway ({}); the VM uses Docker's",
                        net.name,
                        d.name,
                        d.gateways.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                    ));
                }
            }
            Ok(Endpoint {
                bosh_name: net.name.clone(),
                docker_network: d.name.clone(),
                create: None,
                ip: Some(ip),
                dynamic: false,
            })
        }
        None if opts.create_networks => {
            let name = named.map(str::to_owned).unwrap_or_else(|| name_for_subnet(subnet));
            if let Some(clash) = existing.iter().find(|n| {
                n.subnets
                    .iter()
                    .any(|s| s.contains(&subnet.network()) || subnet.contains(&s.network()))
            }) {
                return Err(DockerError::Invalid(format!(
                    "network '{}': cannot create Docker network '{name}' for subnet {subnet}: it overlaps Docker network '{}' ({}); name that network in cloud_properties.name or change the subnet",
                    net.name,
                    clash.name,
                    clash.subnets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                )));
            }
            Ok(Endpoint {
                bosh_name: net.name.clone(),
                docker_network: name.clone(),
                create: Some(NetworkToCreate {
                    name,
                    driver,
                    subnet: Some(subnet),
                    gateway: net.gateway,
                    enable_ipv6: ipv6,
                }),
                ip: Some(ip),
                dynamic: false,
            })
        }
        None => Err(DockerError::NetworkNotFound(match named {
            Some(name) => format!(
                "network '{}': Docker network '{name}' does not exist (create_networks is off: create it with `docker network create --subnet {subnet} {name}`)",
                net.name
            ),
            None => format!(
                "network '{}': no Docker network has subnet {subnet} (create_networks is off: create one, or name one in cloud_properties.name)",
                net.name
            ),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn opts() -> PlanOptions {
        PlanOptions {
            create_networks: true,
            default_network: "bridge".into(),
        }
    }

    fn docker(name: &str, subnet: Option<&str>, gw: Option<&str>) -> DockerNetwork {
        DockerNetwork {
            name: name.into(),
            id: format!("id-{name}"),
            driver: "bridge".into(),
            subnets: subnet
                .map(|s| s.parse().expect("net"))
                .into_iter()
                .collect(),
            gateways: gw.map(|g| g.parse().expect("ip")).into_iter().collect(),
            ours: false,
        }
    }

    fn manual(ip: &str, mask: &str, gw: &str, cp: serde_json::Value) -> serde_json::Value {
        json!({"type":"manual","ip":ip,"netmask":mask,"gateway":gw,"dns":["8.8.8.8"],"default":["dns","gateway"],"cloud_properties":cp})
    }

    #[test]
    fn named_existing_network_with_static_ip() {
        let nets = Networks::parse(&json!({"default": manual("10.245.0.10","255.255.0.0","10.245.0.1", json!({"name":"dcpi-peer-net"}))})).expect("nets");
        let existing = [
            docker("bridge", Some("172.17.0.0/16"), None),
            docker("dcpi-peer-net", Some("10.245.0.0/16"), Some("10.245.0.1")),
        ];
        let p = plan(&nets, &existing, &opts()).expect("plan");
        assert_eq!(p.endpoints.len(), 1);
        let ep = &p.endpoints[0];
        assert_eq!(ep.docker_network, "dcpi-peer-net");
        assert_eq!(ep.create, None);
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        let s = ep.settings("c-1");
        assert_eq!(
            s.ipam_config.and_then(|i| i.ipv4_address).as_deref(),
            Some("10.245.0.10")
        );
    }

    #[test]
    fn unnamed_manual_network_reuses_same_subnet_or_creates_one() {
        let nets = Networks::parse(
            &json!({"n": manual("10.9.0.10","255.255.255.0","10.9.0.1", json!({}))}),
        )
        .expect("nets");
        let p = plan(
            &nets,
            &[docker("whatever", Some("10.9.0.0/24"), None)],
            &opts(),
        )
        .expect("plan");
        assert_eq!(p.endpoints[0].docker_network, "whatever");
        let p = plan(
            &nets,
            &[docker("bridge", Some("172.17.0.0/16"), None)],
            &opts(),
        )
        .expect("plan");
        let create = p.endpoints[0].create.clone().expect("create");
        assert_eq!(create.name, "bosh-10.9.0.0-24");
        assert_eq!(create.subnet, Some("10.9.0.0/24".parse().expect("net")));
        assert_eq!(create.gateway, Some("10.9.0.1".parse().expect("ip")));
        let req = super::super::create_request(&create, &cpi_core::CallContext::default());
        assert!(labels::is_ours(req.labels.as_ref(), labels::KIND_NETWORK));
        assert_eq!(
            req.ipam.and_then(|i| i.config).expect("cfg")[0]
                .subnet
                .as_deref(),
            Some("10.9.0.0/24")
        );
    }

    #[test]
    fn clear_errors() {
        let outside = Networks::parse(
            &json!({"n": manual("10.1.0.10","255.255.255.0","10.1.0.1", json!({"name":"net"}))}),
        )
        .expect("nets");
        let err = plan(
            &outside,
            &[docker("net", Some("10.2.0.0/24"), None)],
            &opts(),
        )
        .expect_err("outside");
        assert!(err.to_string().contains("outside the subnets"), "{err}");
        assert_eq!(err.kind(), cpi_core::ErrorKind::CpiError);

        let no_create = PlanOptions {
            create_networks: false,
            ..opts()
        };
        let err = plan(&outside, &[], &no_create).expect_err("missing");
        assert_eq!(err.kind(), cpi_core::ErrorKind::NetworkNotFound);
        assert!(err.to_string().contains("'net' does not exist"), "{err}");

        let on_bridge = Networks::parse(&json!({"n": manual("172.17.0.10","255.255.0.0","172.17.0.1", json!({"name":"bridge"}))})).expect("nets");
        let err = plan(
            &on_bridge,
            &[docker("bridge", Some("172.17.0.0/16"), None)],
            &opts(),
        )
        .expect_err("bridge");
        assert!(
            err.to_string()
                .contains("cannot give a container the static ip"),
            "{err}"
        );

        let overlap = Networks::parse(
            &json!({"n": manual("10.3.1.10","255.255.255.0","10.3.1.1", json!({}))}),
        )
        .expect("nets");
        let err = plan(
            &overlap,
            &[docker("big", Some("10.3.0.0/16"), None)],
            &opts(),
        );
        // An existing network containing the ip is used (with a warning), not a clash.
        let p = err.expect("contained");
        assert_eq!(p.endpoints[0].docker_network, "big");
        assert_eq!(p.warnings.len(), 1);

        let clash =
            Networks::parse(&json!({"n": manual("10.4.0.10","255.255.0.0","10.4.0.1", json!({}))}))
                .expect("nets");
        let err = plan(
            &clash,
            &[docker("small", Some("10.4.5.0/24"), None)],
            &opts(),
        )
        .expect_err("clash");
        assert!(err.to_string().contains("overlaps"), "{err}");

        let err = plan(&Networks::default(), &[], &opts()).expect_err("none");
        assert!(err.to_string().contains("at least one network"), "{err}");
    }

    #[test]
    fn several_networks_default_gateway_first_and_dynamic() {
        let nets = Networks::parse(&json!({
            "a": {"type":"manual","ip":"10.5.0.10","netmask":"255.255.255.0","gateway":"10.5.0.1","cloud_properties":{"name":"na"}},
            "b": {"type":"dynamic","default":["dns","gateway"],"cloud_properties":{"name":"nb"}},
            "v": {"type":"vip","ip":"1.2.3.4"}
        })).expect("nets");
        let p = plan(&nets, &[docker("na", Some("10.5.0.0/24"), None)], &opts()).expect("plan");
        let names: Vec<_> = p
            .endpoints
            .iter()
            .map(|e| e.docker_network.as_str())
            .collect();
        assert_eq!(names, vec!["nb", "na"]);
        assert!(p.endpoints[0].dynamic);
        assert!(p.endpoints[0].create.is_some());
        assert_eq!(p.warnings.len(), 1);

        let unnamed_dynamic = Networks::parse(&json!({"d": {"type":"dynamic"}})).expect("nets");
        let p = plan(
            &unnamed_dynamic,
            &[docker("bridge", Some("172.17.0.0/16"), None)],
            &opts(),
        )
        .expect("plan");
        assert_eq!(p.endpoints[0].docker_network, "bridge");
        assert!(p.endpoints[0].settings("c").ipam_config.is_none());

        let twice = Networks::parse(&json!({
            "a": {"type":"dynamic","cloud_properties":{"name":"same"}},
            "b": {"type":"dynamic","cloud_properties":{"name":"same"}}
        }))
        .expect("nets");
        let err = plan(&twice, &[docker("same", None, None)], &opts()).expect_err("twice");
        assert!(err.to_string().contains("both map"), "{err}");
    }

    #[test]
    fn ipv6_networks() {
        let nets = Networks::parse(&json!({"v6": {"type":"manual","ip":"fd00:1::10","netmask":"64","gateway":"fd00:1::1","cloud_properties":{}}})).expect("nets");
        let p = plan(&nets, &[], &opts()).expect("plan");
        let create = p.endpoints[0].create.clone().expect("create");
        assert!(create.enable_ipv6);
        assert_eq!(create.name, "bosh-fd00_1__-64");
        let s = p.endpoints[0].settings("c");
        assert_eq!(
            s.ipam_config.and_then(|i| i.ipv6_address).as_deref(),
            Some("fd00:1::10")
        );
    }
}
