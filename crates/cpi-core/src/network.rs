//! The `networks` argument of `create_vm`, parsed into typed values.
//!
//! The director sends a map of network name to spec. We parse what we act on (type,
//! addresses, DNS, routes) into typed values, keep the rest (`cloud_properties`, keys
//! we do not know) as JSON, and keep the original object so the v2 result can echo it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{Map, Value};

use crate::error::{CpiError, CpiResult};

/// The kind of a BOSH network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkType {
    /// The director chose the IP; the CPI must give the VM exactly that address.
    Manual,
    /// The infrastructure chooses the IP; the CPI reports it back (v2 result).
    Dynamic,
    /// A floating/public address attached to a VM.
    Vip,
}

impl NetworkType {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkType::Manual => "manual",
            NetworkType::Dynamic => "dynamic",
            NetworkType::Vip => "vip",
        }
    }
}

/// One static route of a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The destination network.
    pub destination: IpNet,
    /// The next hop.
    pub gateway: IpAddr,
}

/// One network of a VM, as the director described it.
#[derive(Debug, Clone, PartialEq)]
pub struct Network {
    /// The network's name in the deployment (the key of the map).
    pub name: String,
    /// manual, dynamic or vip.
    pub kind: NetworkType,
    /// The address with its subnet (manual and vip networks; dynamic ones once assigned).
    pub address: Option<IpNet>,
    /// The gateway, if the director sent one.
    pub gateway: Option<IpAddr>,
    /// Nameservers for this network.
    pub dns: Vec<IpAddr>,
    /// What this network is the default for (`dns`, `gateway`, `addressable`).
    pub default: Vec<String>,
    /// Static routes.
    pub routes: Vec<Route>,
    /// A DNS alias of the VM on this network (`alias`), if any.
    pub alias: Option<String>,
    /// A MAC address requested by the director, if any.
    pub mac: Option<String>,
    /// The network's `cloud_properties`, kept as JSON (each backend reads its own keys).
    pub cloud_properties: Map<String, Value>,
    raw: Map<String, Value>,
}

impl Network {
    /// The address alone.
    pub fn ip(&self) -> Option<IpAddr> {
        self.address.map(|a| a.addr())
    }

    /// The subnet the address lives in.
    pub fn subnet(&self) -> Option<IpNet> {
        self.address.map(|a| a.trunc())
    }

    /// True when this network is the default for `what` (`"dns"`, `"gateway"`).
    pub fn is_default_for(&self, what: &str) -> bool {
        self.default.iter().any(|d| d == what)
    }

    /// A string cloud property, looked up case-insensitively (Go's JSON decoding
    /// matched keys that way, and existing manifests rely on it).
    pub fn cloud_property_str(&self, key: &str) -> Option<&str> {
        crate::cloud_properties::get_ci(&self.cloud_properties, key).and_then(Value::as_str)
    }

    /// A boolean cloud property, looked up case-insensitively.
    pub fn cloud_property_bool(&self, key: &str) -> Option<bool> {
        crate::cloud_properties::get_ci(&self.cloud_properties, key).and_then(Value::as_bool)
    }

    /// Records the address the infrastructure assigned (dynamic networks).
    pub fn set_assigned(&mut self, address: IpNet, gateway: Option<IpAddr>) {
        self.address = Some(address);
        if gateway.is_some() {
            self.gateway = gateway;
        }
    }

    /// The network as JSON for the v2 `create_vm` result: the object the director sent,
    /// with the address, netmask and gateway we actually gave the VM.
    pub fn to_wire(&self) -> Value {
        let mut out = self.raw.clone();
        if let Some(addr) = self.address {
            out.insert("ip".into(), Value::String(addr.addr().to_string()));
            out.insert("netmask".into(), Value::String(addr.netmask().to_string()));
        }
        if let Some(gw) = self.gateway {
            out.insert("gateway".into(), Value::String(gw.to_string()));
        }
        out.entry("routes").or_insert(Value::Null);
        Value::Object(out)
    }

    fn parse(name: &str, value: &Value) -> CpiResult<Network> {
        let bad = |what: String| CpiError::bad_argument(format!("network '{name}': {what}"));
        let raw = value
            .as_object()
            .ok_or_else(|| bad(format!("must be an object, got {}", json_kind(value))))?
            .clone();
        let kind = match opt_str(&raw, "type").map_err(&bad)? {
            None | Some("manual") | Some("") => NetworkType::Manual,
            Some("dynamic") => NetworkType::Dynamic,
            Some("vip") => NetworkType::Vip,
            Some(other) => {
                return Err(bad(format!(
                    "unknown type '{other}' (expected manual, dynamic or vip)"
                )))
            }
        };
        let ip = opt_str(&raw, "ip")
            .map_err(&bad)?
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<IpAddr>()
                    .map_err(|_| bad(format!("ip '{s}' is not an IP address")))
            })
            .transpose()?;
        let netmask = opt_str(&raw, "netmask")
            .map_err(&bad)?
            .filter(|s| !s.is_empty());
        let gateway = opt_str(&raw, "gateway")
            .map_err(&bad)?
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<IpAddr>()
                    .map_err(|_| bad(format!("gateway '{s}' is not an IP address")))
            })
            .transpose()?;

        let address = match (kind, ip, netmask) {
            (NetworkType::Dynamic, _, _) => None,
            (_, None, _) => return Err(bad(format!("a {} network needs an 'ip'", kind.as_str()))),
            (NetworkType::Vip, Some(ip), None) => Some(IpNet::from(ip)),
            (NetworkType::Manual, Some(_), None) => {
                return Err(bad("a manual network needs a 'netmask'".into()))
            }
            (_, Some(ip), Some(mask)) => Some(
                IpNet::new(ip, parse_netmask(mask, ip).map_err(&bad)?)
                    .map_err(|e| bad(format!("netmask '{mask}': {e}")))?,
            ),
        };

        if let (Some(addr), Some(gw)) = (address, gateway) {
            if kind == NetworkType::Manual {
                if addr.addr().is_ipv4() != gw.is_ipv4() {
                    return Err(bad(format!(
                        "gateway {gw} and ip {} are of different IP families",
                        addr.addr()
                    )));
                }
                if !addr.contains(&gw) {
                    return Err(bad(format!(
                        "gateway {gw} is outside the subnet {} of ip {}",
                        addr.trunc(),
                        addr.addr()
                    )));
                }
                if gw == addr.addr() {
                    return Err(bad(format!("ip {gw} is the gateway's address")));
                }
            }
        }
        if let Some(addr) = address {
            if kind == NetworkType::Manual
                && addr.prefix_len() + 2 <= addr.max_prefix_len()
                && addr.addr().is_ipv4()
                && (addr.addr() == addr.network() || addr.addr() == addr.broadcast())
            {
                return Err(bad(format!(
                    "ip {} is the network or broadcast address of {}",
                    addr.addr(),
                    addr.trunc()
                )));
            }
        }

        let dns = match raw.get("dns") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .and_then(|s| s.parse::<IpAddr>().ok())
                        .ok_or_else(|| bad(format!("dns entry {v} is not an IP address")))
                })
                .collect::<CpiResult<_>>()?,
            Some(other) => {
                return Err(bad(format!("dns must be a list, got {}", json_kind(other))))
            }
        };
        let default = string_list(&raw, "default").map_err(&bad)?;
        let routes = parse_routes(raw.get("routes")).map_err(&bad)?;
        let alias = opt_str(&raw, "alias").map_err(&bad)?.map(str::to_owned);
        let mac = opt_str(&raw, "mac")
            .map_err(&bad)?
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        let cloud_properties = match raw.get("cloud_properties") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(other) => {
                return Err(bad(format!(
                    "cloud_properties must be an object, got {}",
                    json_kind(other)
                )))
            }
        };
        Ok(Network {
            name: name.to_owned(),
            kind,
            address,
            gateway,
            dns,
            default,
            routes,
            alias,
            mac,
            cloud_properties,
            raw,
        })
    }
}

/// All networks of a VM, by name.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Networks(pub BTreeMap<String, Network>);

impl Networks {
    /// Parses the `networks` argument of `create_vm`.
    pub fn parse(value: &Value) -> CpiResult<Networks> {
        let map = value.as_object().ok_or_else(|| {
            CpiError::bad_argument(format!(
                "networks must be an object of name to network, got {}",
                json_kind(value)
            ))
        })?;
        let mut out = BTreeMap::new();
        for (name, spec) in map {
            if name.is_empty() {
                return Err(CpiError::bad_argument("a network has an empty name"));
            }
            out.insert(name.clone(), Network::parse(name, spec)?);
        }
        Ok(Networks(out))
    }

    /// Iterates over the networks in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Network> {
        self.0.values()
    }

    /// Iterates mutably (to record assigned addresses).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Network> {
        self.0.values_mut()
    }

    /// Number of networks.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The network whose `default` includes `gateway`, else the only one, else the first.
    pub fn default_gateway(&self) -> Option<&Network> {
        self.iter()
            .find(|n| n.is_default_for("gateway"))
            .or_else(|| self.iter().find(|n| n.kind != NetworkType::Vip))
    }

    /// Nameservers for the VM: those of the network that is the default for `dns`,
    /// else of the first network that has any. Duplicates removed, order kept.
    pub fn nameservers(&self) -> Vec<IpAddr> {
        let chosen = self
            .iter()
            .find(|n| n.is_default_for("dns") && !n.dns.is_empty())
            .or_else(|| self.iter().find(|n| !n.dns.is_empty()));
        let mut out: Vec<IpAddr> = Vec::new();
        for ip in chosen.map(|n| n.dns.as_slice()).unwrap_or_default() {
            if !out.contains(ip) {
                out.push(*ip);
            }
        }
        out
    }

    /// The v2 `create_vm` result's networks object.
    pub fn to_wire(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v.to_wire()))
                .collect(),
        )
    }
}

/// Parses a netmask given as a dotted quad, an IPv6 mask, or a prefix length
/// (`24` or `/24`), for an address of the family of `ip`.
pub fn parse_netmask(mask: &str, ip: IpAddr) -> Result<u8, String> {
    let trimmed = mask.trim_start_matches('/');
    if let Ok(prefix) = trimmed.parse::<u8>() {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        return if prefix <= max {
            Ok(prefix)
        } else {
            Err(format!("netmask '/{prefix}' is longer than {max} bits"))
        };
    }
    let parsed: IpAddr = mask
        .parse()
        .map_err(|_| format!("netmask '{mask}' is neither an address mask nor a prefix length"))?;
    if parsed.is_ipv4() != ip.is_ipv4() {
        return Err(format!(
            "netmask '{mask}' and ip {ip} are of different IP families"
        ));
    }
    ipnet::ip_mask_to_prefix(parsed)
        .map_err(|_| format!("netmask '{mask}' is not a contiguous mask"))
}

fn parse_routes(value: Option<&Value>) -> Result<Vec<Route>, String> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => return Err(format!("routes must be a list, got {}", json_kind(other))),
    };
    items
        .iter()
        .map(|item| {
            let obj = item
                .as_object()
                .ok_or_else(|| format!("route {item} must be an object"))?;
            let field = |k: &str| {
                crate::cloud_properties::get_ci(obj, k)
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("route {item} lacks '{k}'"))
            };
            let dest: IpAddr = field("destination")?
                .parse()
                .map_err(|_| format!("route {item}: destination is not an IP address"))?;
            let prefix = parse_netmask(field("netmask")?, dest)?;
            let gateway: IpAddr = field("gateway")?
                .parse()
                .map_err(|_| format!("route {item}: gateway is not an IP address"))?;
            Ok(Route {
                destination: IpNet::new(dest, prefix).map_err(|e| e.to_string())?.trunc(),
                gateway,
            })
        })
        .collect()
}

fn opt_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("{key} must be a string, got {}", json_kind(other))),
    }
}

fn string_list(obj: &Map<String, Value>, key: &str) -> Result<Vec<String>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("{key} entries must be strings, got {v}"))
            })
            .collect(),
        Some(other) => Err(format!("{key} must be a list, got {}", json_kind(other))),
    }
}

/// A short name for the JSON type of `v`, for error messages.
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixture_networks() -> Value {
        json!({"default":{"type":"manual","ip":"10.245.0.10","netmask":"255.255.0.0","gateway":"10.245.0.1","dns":["10.245.0.2"],"default":["dns","gateway"],"cloud_properties":{"name":"dcpi-peer-net"}}})
    }

    #[test]
    fn parses_the_fixture_network() {
        let nets = Networks::parse(&fixture_networks()).expect("parse");
        let net = nets.0.get("default").expect("default");
        assert_eq!(net.kind, NetworkType::Manual);
        assert_eq!(net.address, Some("10.245.0.10/16".parse().expect("net")));
        assert_eq!(net.subnet(), Some("10.245.0.0/16".parse().expect("net")));
        assert_eq!(net.gateway, Some("10.245.0.1".parse().expect("ip")));
        assert_eq!(net.cloud_property_str("NAME"), Some("dcpi-peer-net"));
        assert_eq!(
            nets.nameservers(),
            vec!["10.245.0.2".parse::<IpAddr>().expect("ip")]
        );
        assert_eq!(
            nets.default_gateway().map(|n| n.name.as_str()),
            Some("default")
        );
    }

    #[test]
    fn wire_echo_matches_go_cpi_shape() {
        let nets = Networks::parse(&fixture_networks()).expect("parse");
        let expected = json!({"default":{"type":"manual","ip":"10.245.0.10","netmask":"255.255.0.0","gateway":"10.245.0.1","dns":["10.245.0.2"],"default":["dns","gateway"],"routes":null,"cloud_properties":{"name":"dcpi-peer-net"}}});
        assert_eq!(nets.to_wire(), expected);
    }

    #[test]
    fn dynamic_network_reports_assigned_address() {
        let mut nets =
            Networks::parse(&json!({"d":{"type":"dynamic","dns":["8.8.8.8"]}})).expect("parse");
        let net = nets.0.get_mut("d").expect("d");
        assert_eq!(net.address, None);
        net.set_assigned(
            "172.18.0.5/16".parse().expect("net"),
            Some("172.18.0.1".parse().expect("ip")),
        );
        let wire = nets.to_wire();
        assert_eq!(wire["d"]["ip"], "172.18.0.5");
        assert_eq!(wire["d"]["netmask"], "255.255.0.0");
        assert_eq!(wire["d"]["gateway"], "172.18.0.1");
    }

    #[test]
    fn netmask_forms() {
        let v4: IpAddr = "10.0.0.1".parse().expect("ip");
        let v6: IpAddr = "fd00::1".parse().expect("ip");
        assert_eq!(parse_netmask("255.255.255.0", v4), Ok(24));
        assert_eq!(parse_netmask("24", v4), Ok(24));
        assert_eq!(parse_netmask("/24", v4), Ok(24));
        assert_eq!(parse_netmask("ffff:ffff:ffff:ffff::", v6), Ok(64));
        assert_eq!(parse_netmask("64", v6), Ok(64));
        assert!(parse_netmask("255.0.255.0", v4).is_err());
        assert!(parse_netmask("33", v4).is_err());
        assert!(parse_netmask("ffff::", v4).is_err());
        assert!(parse_netmask("banana", v4).is_err());
    }

    #[test]
    fn refuses_bad_networks_with_clear_messages() {
        let cases = [
            (
                json!({"n":{"type":"manual","netmask":"255.255.255.0"}}),
                "needs an 'ip'",
            ),
            (
                json!({"n":{"type":"manual","ip":"10.0.0.5"}}),
                "needs a 'netmask'",
            ),
            (
                json!({"n":{"type":"manual","ip":"10.0.0.5","netmask":"255.0.255.0"}}),
                "contiguous",
            ),
            (
                json!({"n":{"type":"manual","ip":"10.0.0.5","netmask":"255.255.255.0","gateway":"10.0.1.1"}}),
                "outside the subnet",
            ),
            (
                json!({"n":{"type":"manual","ip":"10.0.0.0","netmask":"255.255.255.0"}}),
                "network or broadcast",
            ),
            (
                json!({"n":{"type":"manual","ip":"nope","netmask":"255.255.255.0"}}),
                "not an IP",
            ),
            (json!({"n":{"type":"carrier-pigeon"}}), "unknown type"),
            (
                json!({"n":{"type":"manual","ip":"10.0.0.5","netmask":"24","dns":["x"]}}),
                "dns entry",
            ),
            (json!({"n":"manual"}), "must be an object"),
            (json!(["n"]), "must be an object of name"),
        ];
        for (input, needle) in cases {
            let err = Networks::parse(&input).expect_err(needle);
            assert_eq!(err.kind, crate::ErrorKind::CpiError);
            assert!(err.message.contains(needle), "{needle}: {}", err.message);
        }
    }

    #[test]
    fn ipv6_and_routes() {
        let nets = Networks::parse(&json!({"v6":{"type":"manual","ip":"fd00::10","netmask":"ffff:ffff:ffff:ffff::","gateway":"fd00::1",
            "routes":[{"destination":"192.168.0.0","netmask":"255.255.0.0","gateway":"fd00::1"}]}}))
        .expect("parse");
        let net = nets.0.get("v6").expect("v6");
        assert_eq!(net.subnet(), Some("fd00::/64".parse().expect("net")));
        assert_eq!(net.routes.len(), 1);
        assert_eq!(
            net.routes[0].destination,
            "192.168.0.0/16".parse::<IpNet>().expect("net")
        );
    }
}
