//! Networking and init choices against a real containerd: several networks, a
//! dynamic network with its assigned address reported back, published ports, and the
//! init picked from the stemcell's operating system or the VM's cloud properties.

mod common;

use common::{import_stemcell, in_vm, ping_from, run_ok, TestEnv};
use cpi_core::{AgentId, Cpi, CreateVm, Networks, VmCloudProperties};
use serde_json::json;

const MANUAL: &str = "10.231.20.0/24";
const SECOND: &str = "10.231.21.0/24";
const DYNAMIC: &str = "10.231.22.0/24";

fn init_log(env: &TestEnv, cid: &str) -> String {
    let pid = env.running_pid(cid);
    let log = in_vm(pid, cpi_tests::stemcell::STAND_IN_INIT_LOG);
    for _ in 0..100 {
        if let Ok(text) = std::fs::read_to_string(&log) {
            if !text.is_empty() {
                return text;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("no init log in VM {cid}; console:\n{}", env.console(cid));
}

#[tokio::test(flavor = "multi_thread")]
async fn several_networks_dynamic_addresses_ports_and_systemd() {
    let env = TestEnv::new("networks", &[MANUAL, SECOND, DYNAMIC]);
    let cpi = &env.cpi;
    let ctx = &env.ctx;
    // A Noble stemcell: systemd as PID 1 (the test stemcell's stand-in /sbin/init).
    let noble = import_stemcell(&env, "ubuntu-noble").await;

    let networks = Networks::parse(&json!({
        "a-manual": {"type": "manual", "ip": "10.231.20.10", "netmask": "255.255.255.0",
                     "gateway": "10.231.20.1", "dns": ["10.231.20.2"]},
        "b-second": {"type": "manual", "ip": "10.231.21.10", "netmask": "255.255.255.0",
                     "gateway": "10.231.21.1",
                     "routes": [{"destination": "192.168.77.0", "netmask": "255.255.255.0", "gateway": "10.231.21.1"}]},
        "c-dynamic": {"type": "dynamic", "default": ["dns", "gateway"], "dns": ["10.231.22.1"],
                      "cloud_properties": {"subnet": DYNAMIC}},
    }))
    .expect("networks");
    let created = cpi
        .create_vm(
            ctx,
            CreateVm {
                agent_id: AgentId::new("agent-net").expect("id"),
                stemcell: noble.clone(),
                cloud_properties: VmCloudProperties::parse(
                    &json!({"ports": ["16868/tcp"], "pids": 2048}),
                )
                .expect("props"),
                networks,
                disk_cids: vec![],
                env: json!({}),
            },
        )
        .await
        .expect("create_vm");
    let vm = created.cid.clone();
    let wire = created.networks.to_wire();
    let dynamic_ip = wire["c-dynamic"]["ip"]
        .as_str()
        .expect("dynamic ip reported")
        .to_owned();
    assert!(dynamic_ip.starts_with("10.231.22."), "{wire}");
    assert_eq!(wire["c-dynamic"]["netmask"], "255.255.255.0");
    assert_eq!(wire["c-dynamic"]["gateway"], "10.231.22.1");

    // One interface per network, in name order; the default route via the dynamic
    // network (the default gateway), static routes where asked.
    let ns = vm.as_str();
    let addrs = run_ok(
        "ip",
        &["netns", "exec", ns, "ip", "-o", "-4", "addr", "show"],
    );
    assert!(
        addrs.contains("eth0") && addrs.contains("10.231.20.10/24"),
        "{addrs}"
    );
    assert!(
        addrs.contains("eth1") && addrs.contains("10.231.21.10/24"),
        "{addrs}"
    );
    assert!(
        addrs.contains("eth2") && addrs.contains(&format!("{dynamic_ip}/24")),
        "{addrs}"
    );
    // `lo` is up with 127.0.0.1 (brought up in-process when the namespace is made).
    assert!(
        addrs.contains(": lo") && addrs.contains("127.0.0.1/8"),
        "{addrs}"
    );
    let routes = run_ok("ip", &["netns", "exec", ns, "ip", "route"]);
    assert!(
        routes.contains("default via 10.231.22.1 dev eth2"),
        "{routes}"
    );
    assert!(
        routes.contains("192.168.77.0/24 via 10.231.21.1 dev eth1"),
        "{routes}"
    );
    for gw in ["10.231.20.1", "10.231.21.1", "10.231.22.1"] {
        ping_from(ns, gw);
    }
    // Outbound NAT and FORWARD are the bridges' rules, one set per subnet (not per
    // VM); the published port is in the host's NAT table.
    for subnet in [MANUAL, SECOND, DYNAMIC] {
        let bridge = common::bridge_name(subnet);
        let rules = cpi_tests::daemons::cpi_bridge_rules(&bridge);
        for (table, role, needle) in [
            ("filter", "in", format!("-A FORWARD -i {bridge} ")),
            ("filter", "out", format!("-A FORWARD -o {bridge} ")),
            ("nat", "masq", format!("-A POSTROUTING -s {subnet} ")),
        ] {
            let found: Vec<_> = rules
                .iter()
                .filter(|(_, t, r)| {
                    *t == table
                        && r.starts_with(&needle)
                        && r.contains(&format!("\"bcpi:{bridge}:{role}\""))
                })
                .collect();
            assert_eq!(found.len(), 1, "{table} {role} rule of {bridge}: {rules:?}");
        }
    }
    let postrouting = run_ok("iptables", &["-t", "nat", "-S", "POSTROUTING"]);
    assert!(
        !postrouting.contains(ns),
        "per-VM masquerade rules for {ns}:\n{postrouting}"
    );
    let nat = run_ok("iptables", &["-t", "nat", "-S"]);
    assert!(nat.contains("16868"), "no port mapping for 16868:\n{nat}");
    // The agent sees the assigned address; DNS from the default network.
    let pid = env.running_pid(ns);
    let settings: serde_json::Value = serde_json::from_slice(
        &std::fs::read(in_vm(pid, "/var/vcap/bosh/warden-cpi-agent-env.json")).expect("settings"),
    )
    .expect("json");
    assert_eq!(settings["networks"]["c-dynamic"]["ip"], dynamic_ip);
    let resolv = std::fs::read_to_string(in_vm(pid, "/etc/resolv.conf")).expect("resolv");
    assert!(resolv.contains("nameserver 10.231.22.1"), "{resolv}");
    // systemd-style init, told it runs in a container; pids limit applied.
    let log = init_log(&env, ns);
    assert!(log.contains("started /sbin/init"), "{log}");
    assert!(log.contains(" settings present "), "{log}");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    assert!(String::from_utf8_lossy(&environ).contains("container=containerd"));
    let labels = env.ctr(&["containers", "info", ns]);
    assert!(
        labels.contains("\"io.bosh.cpi.init\": \"systemd\""),
        "{labels}"
    );

    // The same stemcell, forced to runit by the VM's cloud properties.
    let forced = cpi
        .create_vm(
            ctx,
            CreateVm {
                agent_id: AgentId::new("agent-runit").expect("id"),
                stemcell: noble.clone(),
                cloud_properties: VmCloudProperties::parse(
                    &json!({"force_start_without_systemd": true}),
                )
                .expect("props"),
                networks: Networks::parse(&json!({"a": {"type": "manual", "ip": "10.231.20.11",
                    "netmask": "255.255.255.0", "gateway": "10.231.20.1"}}))
                .expect("networks"),
                disk_cids: vec![],
                env: json!({}),
            },
        )
        .await
        .expect("create_vm forced runit")
        .cid;
    assert!(init_log(&env, forced.as_str()).contains("started /usr/sbin/runsvdir-start"));
    // Same bridge for the same subnet; VMs reach each other.
    ping_from(forced.as_str(), "10.231.20.10");
    // A manual IPv4 interface is made by the CPI over netlink: its host end on the
    // subnet's bridge with hairpin mode on, a MAC derived from the address, the
    // bridge with the fixed MAC the CPI gave it.
    let host_ifs = env.native_host_ifnames(forced.as_str());
    assert_eq!(host_ifs.len(), 1, "{host_ifs:?}");
    let host_if = &host_ifs[0];
    let bridge = common::bridge_name(MANUAL);
    let ports = run_ok("ip", &["-o", "link", "show", "master", &bridge]);
    assert!(ports.contains(&format!("{host_if}@")), "{ports}");
    assert_eq!(
        std::fs::read_to_string(format!("/sys/class/net/{host_if}/brport/hairpin_mode"))
            .expect("hairpin_mode")
            .trim(),
        "1"
    );
    let eth0 = run_ok(
        "ip",
        &[
            "netns",
            "exec",
            forced.as_str(),
            "ip",
            "-o",
            "link",
            "show",
            "eth0",
        ],
    );
    assert!(eth0.contains("link/ether 0a:58:0a:e7:14:0b"), "{eth0}");
    assert!(eth0.contains(",UP"), "{eth0}");
    // The bridge keeps the MAC it was made with (`0a:59` and a hash of its name)
    // rather than its lowest port's, which would change as VMs come and go.
    let br = run_ok("ip", &["-o", "link", "show", &bridge]);
    assert!(br.contains("link/ether 0a:59:"), "{br}");

    // Across bridges, through the host's FORWARD chain (whose policy dockerd sets
    // to DROP): a VM only on the second subnet answers one only on the first.
    // (With the bridges' rules left out, even the ping within one bridge above
    // fails on this machine: br_netfilter sends bridged traffic through FORWARD.)
    let second = cpi
        .create_vm(
            ctx,
            CreateVm {
                agent_id: AgentId::new("agent-second").expect("id"),
                stemcell: noble.clone(),
                cloud_properties: VmCloudProperties::parse(&json!({"ports": ["17868:7868/tcp"]}))
                    .expect("props"),
                networks: Networks::parse(&json!({"b": {"type": "manual", "ip": "10.231.21.11",
                    "netmask": "255.255.255.0", "gateway": "10.231.21.1"}}))
                .expect("networks"),
                disk_cids: vec![],
                env: json!({}),
            },
        )
        .await
        .expect("create_vm on the second subnet")
        .cid;
    ping_from(forced.as_str(), "10.231.21.11");
    // A port published on a manual IPv4 network: `portmap` chained after the
    // interface the CPI made, given its address.
    let nat = run_ok("iptables", &["-t", "nat", "-S"]);
    assert!(
        nat.lines()
            .any(|l| l.contains("--dport 17868") && l.contains("10.231.21.11:7868")),
        "no port mapping 17868 -> 10.231.21.11:7868:\n{nat}"
    );

    let mut host_ends = env.native_host_ifnames(forced.as_str());
    host_ends.extend(env.native_host_ifnames(second.as_str()));
    assert_eq!(host_ends.len(), 2, "{host_ends:?}");

    cpi.delete_vm(ctx, &vm).await.expect("delete_vm");
    cpi.delete_vm(ctx, &forced).await.expect("delete_vm");
    cpi.delete_vm(ctx, &second).await.expect("delete_vm");
    let nat = run_ok("iptables", &["-t", "nat", "-S"]);
    assert!(!nat.contains(ns), "NAT rules left for {ns}:\n{nat}");
    assert!(!nat.contains("17868"), "port mapping left:\n{nat}");
    // The host ends went with the VMs (the kernel destroys them with the
    // namespaces, just after).
    for subnet in [MANUAL, SECOND] {
        let left = common::bridge_ports_after_settling(&common::bridge_name(subnet));
        assert!(left.is_empty(), "{left:?}");
    }
    for host_if in &host_ends {
        assert!(
            !std::path::Path::new("/sys/class/net")
                .join(host_if)
                .exists(),
            "{host_if} is still on the host"
        );
    }
    cpi.delete_stemcell(ctx, &noble)
        .await
        .expect("delete_stemcell");
    env.assert_clean(&[vm.to_string(), forced.to_string(), second.to_string()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_vm_finishes_a_teardown_interrupted_halfway() {
    let env = TestEnv::new("crash", &["10.231.23.0/24"]);
    let cpi = &env.cpi;
    let stemcell = import_stemcell(&env, "ubuntu-jammy").await;
    let vm = cpi
        .create_vm(
            &env.ctx,
            CreateVm {
                agent_id: AgentId::new("agent-crash").expect("id"),
                stemcell: stemcell.clone(),
                cloud_properties: VmCloudProperties::default(),
                networks: Networks::parse(&json!({"n": {"type": "dynamic", "cloud_properties": {"subnet": "10.231.23.0/24"}}}))
                    .expect("networks"),
                disk_cids: vec![],
                env: json!({}),
            },
        )
        .await
        .expect("create_vm")
        .cid;
    // Simulate a CPI that died after removing the container but before the network,
    // snapshot and directories: only containerd's records are gone.
    env.ctr(&["tasks", "kill", "-s", "KILL", vm.as_str()]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    env.ctr(&["tasks", "rm", vm.as_str()]);
    env.ctr(&["containers", "rm", vm.as_str()]);
    assert!(!cpi.has_vm(&env.ctx, &vm).await.expect("has_vm"));
    assert!(common::run("ip", &["netns", "list"]).contains(vm.as_str()));
    cpi.delete_vm(&env.ctx, &vm)
        .await
        .expect("delete_vm after a crash");
    cpi.delete_stemcell(&env.ctx, &stemcell)
        .await
        .expect("delete_stemcell");
    env.assert_clean(&[vm.to_string()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn reboot_vm_restores_what_a_host_reboot_loses() {
    const SUBNET: &str = "10.231.24.0/24";
    let env = TestEnv::new("hostreboot", &[SUBNET, "10.231.25.0/24"]);
    let cpi = &env.cpi;
    let ctx = &env.ctx;
    let stemcell = import_stemcell(&env, "ubuntu-jammy").await;
    let created = cpi
        .create_vm(
            ctx,
            CreateVm {
                agent_id: AgentId::new("agent-reboot").expect("id"),
                stemcell: stemcell.clone(),
                cloud_properties: VmCloudProperties::default(),
                networks: Networks::parse(&json!({
                    "m": {"type": "manual", "ip": "10.231.24.10", "netmask": "255.255.255.0", "gateway": "10.231.24.1"},
                    "z": {"type": "dynamic", "default": ["gateway"], "cloud_properties": {"subnet": "10.231.25.0/24"}}}))
                .expect("networks"),
                disk_cids: vec![],
                env: json!({}),
            },
        )
        .await
        .expect("create_vm");
    let vm = created.cid.clone();
    let dynamic_ip = created.networks.to_wire()["z"]["ip"]
        .as_str()
        .expect("ip")
        .to_owned();
    let disk = cpi
        .create_disk(
            ctx,
            cpi_core::CreateDisk {
                size_mib: 10,
                cloud_properties: Default::default(),
                vm: None,
            },
        )
        .await
        .expect("disk");
    let hint = cpi.attach_disk(ctx, &vm, &disk).await.expect("attach");
    let pid = env.running_pid(vm.as_str());
    std::fs::write(in_vm(pid, &format!("{}/kept", hint.0)), "kept").expect("write");

    // What a host reboot takes away while containerd keeps the container record: the
    // task, the network namespace, the disk mounts.
    env.ctr(&["tasks", "kill", "-s", "KILL", vm.as_str()]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    env.ctr(&["tasks", "rm", vm.as_str()]);
    run_ok("ip", &["netns", "delete", vm.as_str()]);
    let vm_dir = env.state_dir.join("vms").join(vm.as_str());
    let disk_mount = vm_dir.join("disks").join(disk.as_str());
    run_ok("umount", &[&disk_mount.display().to_string()]);
    run_ok("umount", &[&vm_dir.join("disks").display().to_string()]);

    cpi.reboot_vm(ctx, &vm)
        .await
        .expect("reboot_vm after a host reboot");
    let pid = env.running_pid(vm.as_str());
    assert_eq!(
        std::fs::read_to_string(in_vm(pid, &format!("{}/kept", hint.0))).expect("disk is back"),
        "kept"
    );
    let addrs = run_ok(
        "ip",
        &[
            "netns",
            "exec",
            vm.as_str(),
            "ip",
            "-o",
            "-4",
            "addr",
            "show",
        ],
    );
    assert!(addrs.contains("10.231.24.10/24"), "{addrs}");
    assert!(
        addrs.contains(&format!("{dynamic_ip}/24")),
        "dynamic address changed: {addrs}"
    );
    ping_from(vm.as_str(), "10.231.25.1");
    // A disk attached after the restore still appears live.
    cpi.detach_disk(ctx, &vm, &disk).await.expect("detach");
    cpi.attach_disk(ctx, &vm, &disk)
        .await
        .expect("attach again");
    assert!(common::vm_mount_points(pid).contains(&hint.0));

    cpi.delete_vm(ctx, &vm).await.expect("delete_vm");
    let nat = run_ok("iptables", &["-t", "nat", "-S"]);
    assert!(
        !nat.contains(vm.as_str()),
        "NAT rules left for {vm}:\n{nat}"
    );
    cpi.delete_disk(ctx, &disk).await.expect("delete_disk");
    cpi.delete_stemcell(ctx, &stemcell)
        .await
        .expect("delete_stemcell");
    env.assert_clean(&[vm.to_string()]);
}
