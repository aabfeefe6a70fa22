//! The kernel operations that give a VM on a manual network its interface, exactly as
//! `create_vm` and `delete_vm` issue them, with nothing of the CPI's own around them
//! (no record, reservation, lock, rule check or CNI result).
//!
//! For the benchmark's raw floor (`tests/src/bench/containerd.rs`): on containerd the
//! CPI makes a VM's network itself, where Docker's floor gets it from the daemon, so
//! the containerd floor issues these operations too. Not part of the supported API.

use std::io;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::link::{self, NativeLink, NativeRoute};

/// Makes network namespace `name` (at `/var/run/netns/<name>`, `lo` up) with interface
/// `eth0` at `address`, a veth whose host end is on `bridge` (made, up and holding the
/// gateway's address if it is not), and the default route through `gateway`.
pub fn make(name: &str, bridge: &str, address: Ipv4Net, gateway: Ipv4Addr) -> io::Result<()> {
    super::add_netns(name).map_err(io::Error::other)?;
    let native = NativeLink {
        bridge: bridge.to_owned(),
        host_ifname: link::host_ifname(name, "eth0"),
        address,
        gateway: Some(gateway),
        routes: vec![NativeRoute {
            dst: Ipv4Net::default(),
            gw: gateway,
        }],
    };
    link::add(&super::cni::netns_path(name), "eth0", &native)
}

/// Removes network namespace `name` as `delete_vm` does (a lazy unmount and the
/// file; the kernel destroys its interfaces). A namespace that is not there is
/// success.
pub fn remove(name: &str) -> io::Result<()> {
    super::delete_netns(name).map_err(io::Error::other)
}
