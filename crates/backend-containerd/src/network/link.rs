//! Interfaces the CPI makes itself over rtnetlink, without a plugin process: what
//! the CNI `bridge` plugin with `static` IPAM does for a manual IPv4 network, and
//! bringing `lo` up in a new namespace (what the `loopback` plugin does).
//!
//! A VM's interface is one veth pair: the host end (`bv` + 12 hex digits of the
//! VM and interface, recorded before it is made) enslaved to the subnet's bridge,
//! the VM end created directly in the VM's network namespace with its address,
//! its routes and a MAC derived from its address. The derived MAC means a VM that
//! gets the address of a deleted one (as BOSH does on every recreate) answers at
//! the same link address, so no neighbour keeps a stale entry for it.
//!
//! Removing the host end removes the pair, so DEL is one request, and nothing is
//! left when the namespace went first. Destroying the namespace destroys the pair
//! too, without the wait an explicit removal has (see `del_all`).

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use ipnet::Ipv4Net;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVeth, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// A VM interface made over netlink: everything its ADD and DEL need, recorded
/// before ADD runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NativeLink {
    /// The subnet's bridge on the host.
    pub bridge: String,
    /// The host end of the veth pair.
    pub host_ifname: String,
    /// The VM's address with the subnet's prefix.
    pub address: Ipv4Net,
    /// The subnet's gateway, which the bridge holds (the host routes for the VMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// Routes in the VM: destination and next hop (the default route included).
    #[serde(default)]
    pub routes: Vec<NativeRoute>,
}

/// A route in the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NativeRoute {
    /// The destination network.
    pub dst: Ipv4Net,
    /// The next hop.
    pub gw: Ipv4Addr,
}

/// The host end's name for the VM's interface `ifname`: `bv` and 12 hex digits of
/// a hash (14 characters; the kernel allows 15).
pub fn host_ifname(vm_cid: &str, ifname: &str) -> String {
    let hash = Sha256::digest(format!("{vm_cid}/{ifname}").as_bytes());
    let hex: String = hash.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("bv{hex}")
}

/// The VM interface's MAC: locally administered unicast `0a:58` and the IPv4
/// address, so an address always answers at the same link address.
pub fn vm_mac(address: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = address.octets();
    [0x0a, 0x58, a, b, c, d]
}

/// The bridge's MAC, set when the CPI makes the bridge: a bridge without a MAC of
/// its own takes the lowest of its ports', which changes as VMs come and go, and
/// every VM's neighbour entry for the gateway goes stale each time.
pub fn bridge_mac(bridge: &str) -> [u8; 6] {
    let hash = Sha256::digest(bridge.as_bytes());
    [0x0a, 0x59, hash[0], hash[1], hash[2], hash[3]]
}

fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl NativeLink {
    /// The CNI-shaped result of a successful ADD (CNI 1.0.0), which the record keeps
    /// and chained plugins (`portmap`) get as `prevResult`.
    pub fn result(&self, ifname: &str, netns: &Path) -> Value {
        let mut ip = json!({"interface": 2, "address": self.address.to_string()});
        if let Some(gw) = self.gateway {
            ip["gateway"] = json!(gw.to_string());
        }
        json!({
            "cniVersion": super::cni::CNI_VERSION,
            "interfaces": [
                {"name": self.bridge, "mac": mac_string(&bridge_mac(&self.bridge))},
                {"name": self.host_ifname},
                {"name": ifname, "mac": mac_string(&vm_mac(self.address.addr())),
                 "sandbox": netns.display().to_string()},
            ],
            "ips": [ip],
            "routes": self.routes.iter()
                .map(|r| json!({"dst": r.dst.to_string(), "gw": r.gw.to_string()}))
                .collect::<Vec<_>>(),
            "dns": {},
        })
    }
}

/// One rtnetlink socket, bound in the network namespace of the thread that opened
/// it (it stays there when the thread moves).
struct Netlink {
    socket: Socket,
    sequence: u32,
}

fn errno_is(e: &io::Error, errno: rustix::io::Errno) -> bool {
    e.raw_os_error() == Some(errno.raw_os_error())
}

impl Netlink {
    fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            socket,
            sequence: 0,
        })
    }

    /// Sends one request and returns the first reply.
    fn exchange(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<NetlinkPayload<RouteNetlinkMessage>> {
        self.sequence += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.sequence;
        let mut request = NetlinkMessage::new(header, NetlinkPayload::from(message));
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        loop {
            let mut reply: Vec<u8> = Vec::with_capacity(32 * 1024);
            self.socket.recv(&mut reply, 0)?;
            let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply)
                .map_err(|e| io::Error::other(format!("a bad netlink reply: {e}")))?;
            // Replies to an earlier request (there are none with one request at a
            // time, but a stray one must not be taken for this one's answer).
            if answer.header.sequence_number == self.sequence {
                return Ok(answer.payload);
            }
        }
    }

    /// Sends a request that changes something and waits for its acknowledgement.
    fn change(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        match self.exchange(message, NLM_F_ACK | flags)? {
            // An acknowledgement is an error message without an error code.
            NetlinkPayload::Error(e) => match e.code {
                None => Ok(()),
                Some(_) => Err(e.to_io()),
            },
            other => Err(io::Error::other(format!(
                "an unexpected netlink reply {other:?}"
            ))),
        }
    }

    /// The index and flags of the link named `name`, if there is one.
    fn link(&mut self, name: &str) -> io::Result<Option<(u32, LinkFlags)>> {
        let mut query = LinkMessage::default();
        query
            .attributes
            .push(LinkAttribute::IfName(name.to_owned()));
        match self.exchange(RouteNetlinkMessage::GetLink(query), 0)? {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                Ok(Some((link.header.index, link.header.flags)))
            }
            NetlinkPayload::Error(e) => match e.code {
                None => Err(io::Error::other(format!("no answer for link {name}"))),
                Some(_) => {
                    let e = e.to_io();
                    if errno_is(&e, rustix::io::Errno::NODEV) {
                        Ok(None)
                    } else {
                        Err(e)
                    }
                }
            },
            other => Err(io::Error::other(format!(
                "an unexpected netlink reply to the query for link {name}: {other:?}"
            ))),
        }
    }

    fn set_up(&mut self, index: u32) -> io::Result<()> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.flags = LinkFlags::Up;
        link.header.change_mask = LinkFlags::Up;
        self.change(RouteNetlinkMessage::SetLink(link), 0)
    }

    fn delete_link(&mut self, index: u32) -> io::Result<()> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        match self.change(RouteNetlinkMessage::DelLink(link), 0) {
            Err(e) if errno_is(&e, rustix::io::Errno::NODEV) => Ok(()),
            other => other,
        }
    }

    /// Adds `address` to link `index`; an address it already has is success.
    fn add_address(&mut self, index: u32, address: Ipv4Net) -> io::Result<()> {
        let mut message = AddressMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.prefix_len = address.prefix_len();
        message.header.index = index;
        let ip = IpAddr::V4(address.addr());
        message.attributes.push(AddressAttribute::Local(ip));
        message.attributes.push(AddressAttribute::Address(ip));
        if address.prefix_len() < 31 {
            message
                .attributes
                .push(AddressAttribute::Broadcast(address.broadcast()));
        }
        match self.change(
            RouteNetlinkMessage::NewAddress(message),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Err(e) if errno_is(&e, rustix::io::Errno::EXIST) => Ok(()),
            other => other,
        }
    }

    /// Adds a route through `oif`; a route that is already there is success.
    fn add_route(&mut self, oif: u32, route: &NativeRoute) -> io::Result<()> {
        let mut message = RouteMessage::default();
        message.header.address_family = AddressFamily::Inet;
        message.header.destination_prefix_length = route.dst.prefix_len();
        message.header.table = RouteHeader::RT_TABLE_MAIN;
        message.header.protocol = RouteProtocol::Boot;
        message.header.scope = RouteScope::Universe;
        message.header.kind = RouteType::Unicast;
        if route.dst.prefix_len() > 0 {
            message
                .attributes
                .push(RouteAttribute::Destination(RouteAddress::Inet(
                    route.dst.network(),
                )));
        }
        message
            .attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(route.gw)));
        message.attributes.push(RouteAttribute::Oif(oif));
        match self.change(
            RouteNetlinkMessage::NewRoute(message),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Err(e) if errno_is(&e, rustix::io::Errno::EXIST) => Ok(()),
            other => other,
        }
    }
}

/// Names the step that failed in an error.
fn step<T>(what: impl FnOnce() -> String, r: io::Result<T>) -> io::Result<T> {
    r.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", what())))
}

/// Brings `lo` up in the calling thread's network namespace: `IFF_UP` on interface
/// index 1, which `lo` always has in a new namespace.
pub fn loopback_up() -> io::Result<()> {
    const LOOPBACK_INDEX: u32 = 1;
    step(
        || "bringing lo up".into(),
        Netlink::open()?.set_up(LOOPBACK_INDEX),
    )
}

/// The bridge `name`, made (with its fixed MAC) when missing, up, and holding
/// `gateway` when there is one. Concurrent calls for one bridge all succeed.
fn ensure_bridge(host: &mut Netlink, name: &str, gateway: Option<Ipv4Net>) -> io::Result<u32> {
    let (index, flags) = match host.link(name)? {
        Some(found) => found,
        None => {
            let mut link = LinkMessage::default();
            link.attributes.push(LinkAttribute::IfName(name.to_owned()));
            link.attributes
                .push(LinkAttribute::Address(bridge_mac(name).to_vec()));
            link.attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                    InfoKind::Bridge,
                )]));
            match host.change(
                RouteNetlinkMessage::NewLink(link),
                NLM_F_CREATE | NLM_F_EXCL,
            ) {
                Err(e) if errno_is(&e, rustix::io::Errno::EXIST) => {}
                other => step(|| format!("creating bridge {name}"), other)?,
            }
            host.link(name)?.ok_or_else(|| {
                io::Error::other(format!("bridge {name} is gone right after it was made"))
            })?
        }
    };
    if !flags.contains(LinkFlags::Up) {
        step(|| format!("bringing bridge {name} up"), host.set_up(index))?;
    }
    if let Some(gateway) = gateway {
        step(
            || format!("adding gateway {gateway} to bridge {name}"),
            host.add_address(index, gateway),
        )?;
    }
    Ok(index)
}

/// Turns IPv4 forwarding on in the host's namespace, as the bridge plugin does for a
/// bridge that is a gateway: without it VMs reach the host and nothing beyond.
fn enable_ipv4_forwarding() -> io::Result<()> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(PATH)?.trim() == "1" {
        return Ok(());
    }
    step(
        || format!("turning IPv4 forwarding on ({PATH})"),
        std::fs::write(PATH, "1"),
    )
}

/// Makes the VM's interface `ifname` in the network namespace at `netns` (see the
/// module's documentation). Retrying after a failure, or after a crash halfway,
/// starts again from a new veth pair.
pub fn add(netns: &Path, ifname: &str, link: &NativeLink) -> io::Result<()> {
    // The namespace is entered on a thread of its own, which ends with the work.
    std::thread::scope(|s| {
        s.spawn(|| add_on_this_thread(netns, ifname, link))
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the netlink thread panicked")))
    })
}

fn add_on_this_thread(netns: &Path, ifname: &str, link: &NativeLink) -> io::Result<()> {
    let ns = step(
        || format!("opening network namespace {}", netns.display()),
        File::open(netns),
    )?;
    let mut host = Netlink::open()?;
    let gateway = link
        .gateway
        .map(|gw| Ipv4Net::new(gw, link.address.prefix_len()))
        .transpose()
        .map_err(io::Error::other)?;
    if gateway.is_some() {
        enable_ipv4_forwarding()?;
    }
    let bridge = ensure_bridge(&mut host, &link.bridge, gateway)?;
    let host_if = &link.host_ifname;
    if let Some((index, _)) = host.link(host_if)? {
        step(
            || format!("removing {host_if} left by an earlier attempt"),
            host.delete_link(index),
        )?;
    }

    let mut peer = LinkMessage::default();
    peer.attributes
        .push(LinkAttribute::IfName(ifname.to_owned()));
    peer.attributes
        .push(LinkAttribute::Address(vm_mac(link.address.addr()).to_vec()));
    peer.attributes
        .push(LinkAttribute::NetNsFd(ns.as_fd().as_raw_fd()));
    let mut veth = LinkMessage::default();
    veth.header.flags = LinkFlags::Up;
    veth.header.change_mask = LinkFlags::Up;
    veth.attributes.push(LinkAttribute::IfName(host_if.clone()));
    veth.attributes.push(LinkAttribute::Controller(bridge));
    veth.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
    ]));
    step(
        || {
            format!(
                "creating veth {host_if} on bridge {} for {ifname}",
                link.bridge
            )
        },
        host.change(
            RouteNetlinkMessage::NewLink(veth),
            NLM_F_CREATE | NLM_F_EXCL,
        ),
    )?;
    // Hairpin mode, as the bridge plugin sets it: a VM reaching its own published
    // port through the host gets the traffic back on the port it came from.
    let (host_index, _) = host
        .link(host_if)?
        .ok_or_else(|| io::Error::other(format!("{host_if} is gone right after it was made")))?;
    let mut port = LinkMessage::default();
    port.header.index = host_index;
    port.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::PortKind(InfoPortKind::Bridge),
        LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::HairpinMode(
            true,
        )])),
    ]));
    step(
        || format!("turning hairpin mode on for {host_if}"),
        host.change(RouteNetlinkMessage::NewLink(port), 0),
    )?;

    step(
        || format!("entering network namespace {}", netns.display()),
        rustix::thread::move_into_link_name_space(
            ns.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .map_err(io::Error::from),
    )?;
    let mut vm = Netlink::open()?;
    let (index, _) = vm.link(ifname)?.ok_or_else(|| {
        io::Error::other(format!(
            "{ifname} is not in the VM's namespace after it was made"
        ))
    })?;
    step(
        || format!("adding {} to {ifname}", link.address),
        vm.add_address(index, link.address),
    )?;
    step(|| format!("bringing {ifname} up"), vm.set_up(index))?;
    for route in &link.routes {
        step(
            || format!("adding route {} via {} on {ifname}", route.dst, route.gw),
            vm.add_route(index, route),
        )?;
    }
    Ok(())
}

/// Removes the VM's interface: the host end, which takes the VM end with it. An
/// interface that is not there (the namespace went first) is success.
pub fn remove(link: &NativeLink) -> io::Result<()> {
    let mut host = Netlink::open()?;
    match host.link(&link.host_ifname)? {
        Some((index, _)) => step(
            || format!("removing {}", link.host_ifname),
            host.delete_link(index),
        ),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_macs_are_stable_and_fit_the_kernel() {
        let a = host_ifname("vm-1", "eth0");
        assert_eq!(a, host_ifname("vm-1", "eth0"));
        assert_ne!(a, host_ifname("vm-1", "eth1"));
        assert_ne!(a, host_ifname("vm-2", "eth0"));
        assert!(a.len() <= 15 && a.starts_with("bv"), "{a}");
        assert_eq!(
            vm_mac("10.245.0.12".parse().expect("ip")),
            [0x0a, 0x58, 10, 245, 0, 12]
        );
        let m = bridge_mac("bcpi0123456789");
        // Unicast (bit 0 clear) and locally administered (bit 1 set).
        assert_eq!(m[0] & 0b11, 0b10);
        assert_eq!(m, bridge_mac("bcpi0123456789"));
    }

    #[test]
    fn the_result_has_the_cni_shape_chained_plugins_read() {
        let link = NativeLink {
            bridge: "bcpi0123456789".into(),
            host_ifname: "bv000000000000".into(),
            address: "10.245.0.12/16".parse().expect("net"),
            gateway: Some("10.245.0.1".parse().expect("ip")),
            routes: vec![NativeRoute {
                dst: "0.0.0.0/0".parse().expect("net"),
                gw: "10.245.0.1".parse().expect("ip"),
            }],
        };
        let r = link.result("eth0", Path::new("/var/run/netns/vm-1"));
        let ips = super::super::cni::result_ips(&r);
        assert_eq!(ips.len(), 1);
        assert_eq!(ips[0].address.to_string(), "10.245.0.12/16");
        assert_eq!(ips[0].gateway, Some("10.245.0.1".parse().expect("ip")));
        assert_eq!(r["interfaces"][2]["sandbox"], "/var/run/netns/vm-1");
        assert_eq!(r["interfaces"][2]["mac"], "0a:58:0a:f5:00:0c");
        assert_eq!(r["ips"][0]["interface"], 2);
        assert_eq!(
            r["routes"],
            json!([{"dst": "0.0.0.0/0", "gw": "10.245.0.1"}])
        );
    }
}
