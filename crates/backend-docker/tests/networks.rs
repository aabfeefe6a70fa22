//! Several networks on one VM: a named existing Docker network, one the CPI creates
//! from the subnet, and an IPv6 one; the default route follows `default: [gateway]`.

mod common;

use backend_docker::config::AttachMode;
use common::{exec, test_subnet, Harness};
use cpi_core::{AgentId, Cpi, CreateStemcell, CreateVm, Networks, VmCloudProperties};
use cpi_tests::daemons::docker;
use cpi_tests::stemcell::TestStemcell;
use serde_json::json;

#[tokio::test]
async fn several_networks_with_static_addresses_and_ipv6() {
    let h = Harness::new("dnets", AttachMode::Local);
    let ctx = &h.ctx;
    let cpi = &h.cpi;
    let unpacked = TestStemcell::builder().build_unpacked(h.work.path().join("stemcell"));
    let sc = cpi
        .create_stemcell(
            ctx,
            CreateStemcell {
                image_path: unpacked.image_path,
                cloud_properties: Default::default(),
            },
        )
        .await
        .expect("create_stemcell");

    let (ip_a, gw_a, subnet_a) = test_subnet(&format!("{}-a", h.director));
    let (ip_b, gw_b, _) = test_subnet(&format!("{}-b", h.director));
    let named = format!("{}-a", h.director);
    docker(&[
        "network",
        "create",
        "--subnet",
        &subnet_a,
        "--gateway",
        &gw_a,
        "--label",
        &format!("bosh-container-cpi.director-uuid={}", h.director),
        &named,
    ])
    .expect_success();
    let hash = h
        .director
        .bytes()
        .fold(17u32, |a, b| a.wrapping_mul(31).wrapping_add(u32::from(b)));
    let v6_prefix = format!("fd00:{:x}", 0x100 + hash % 0xef00);
    let networks = Networks::parse(&json!({
        "a": {"type": "manual", "ip": ip_a, "netmask": "255.255.255.0", "gateway": gw_a, "cloud_properties": {"name": named}},
        "b": {"type": "manual", "ip": ip_b, "netmask": "255.255.255.0", "gateway": gw_b, "dns": ["9.9.9.9"], "default": ["dns", "gateway"]},
        "v6": {"type": "manual", "ip": format!("{v6_prefix}::10"), "netmask": "ffff:ffff:ffff:ffff::", "gateway": format!("{v6_prefix}::1"), "cloud_properties": {"enable_ipv6": true}}
    }))
    .expect("networks");
    let created = cpi
        .create_vm(
            ctx,
            CreateVm {
                agent_id: AgentId::new("agent-n").expect("agent"),
                stemcell: sc.clone(),
                cloud_properties: VmCloudProperties::default(),
                networks,
                disk_cids: vec![],
                env: json!({}),
            },
        )
        .await
        .expect("create_vm");
    let vm = created.cid.clone();
    let addrs = exec(vm.as_str(), "ip addr");
    for ip in [&ip_a, &ip_b, &format!("{v6_prefix}::10")] {
        assert!(addrs.contains(&format!(" {ip}/")), "{ip} in {addrs}");
    }
    let route = exec(vm.as_str(), "ip route | grep ^default");
    assert!(route.contains(&format!("via {gw_b} ")), "{route}");
    assert_eq!(
        exec(vm.as_str(), "cat /etc/resolv.conf"),
        "nameserver 9.9.9.9"
    );
    let wire = created.networks.to_wire();
    assert_eq!(wire["a"]["ip"], ip_a.as_str());
    assert_eq!(wire["v6"]["ip"], format!("{v6_prefix}::10"));

    cpi.delete_vm(ctx, &vm).await.expect("delete_vm");
    cpi.delete_stemcell(ctx, &sc)
        .await
        .expect("delete_stemcell");
    let filter = format!("label=bosh-container-cpi.director-uuid={}", h.director);
    for n in docker(&["network", "ls", "-q", "--filter", &filter])
        .stdout
        .lines()
    {
        docker(&["network", "rm", n]).expect_success();
    }
    h.assert_clean();
}
