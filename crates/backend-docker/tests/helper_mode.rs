//! Live attach through helper containers (`attach_mode: helper`, what a remote
//! daemon needs), forced on the local daemon. The state directory starts out as a
//! plain directory: the backend must make it a shared mount through a helper too.

mod common;

use backend_docker::config::AttachMode;
use common::{exec, pid1, test_subnet, Harness};
use cpi_core::{
    AgentId, Cpi, CreateDisk, CreateStemcell, CreateVm, ErrorKind, Networks, VmCloudProperties,
};
use cpi_tests::stemcell::TestStemcell;
use serde_json::json;

#[tokio::test]
async fn live_attach_through_helper_containers() {
    let h = Harness::new("dhelp", AttachMode::Helper);
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
    let (ip, gw, subnet) = test_subnet(&h.director);
    let networks = |ip: &str| {
        Networks::parse(&json!({"n": {"type": "manual", "ip": ip, "netmask": "255.255.255.0", "gateway": gw, "dns": ["8.8.8.8"]}}))
            .expect("networks")
    };
    let create = |ip: String| CreateVm {
        // One agent id per VM, as the director mints them: a create_vm with an
        // agent id already in use is taken as the retry of a lost create_vm.
        agent_id: AgentId::new(format!("agent-h-{}", ip.replace('.', "-"))).expect("agent"),
        stemcell: sc.clone(),
        cloud_properties: VmCloudProperties::default(),
        networks: networks(&ip),
        disk_cids: vec![],
        env: json!({}),
    };
    let vm1 = cpi
        .create_vm(ctx, create(ip.clone()))
        .await
        .expect("create_vm")
        .cid;
    let vm2 = cpi
        .create_vm(ctx, create(common::last_octet(&ip, 11)))
        .await
        .expect("create_vm")
        .cid;
    let disk = cpi
        .create_disk(
            ctx,
            CreateDisk {
                size_mib: 100,
                cloud_properties: Default::default(),
                vm: None,
            },
        )
        .await
        .expect("create_disk");

    exec(vm1.as_str(), "echo before > /var/vcap/data/f");
    let before = pid1(vm1.as_str());
    let hint = cpi
        .attach_disk(ctx, &vm1, &disk)
        .await
        .expect("attach_disk");
    assert_eq!(hint.0, format!("/warden-cpi-dev/{disk}"));
    assert_eq!(pid1(vm1.as_str()), before, "no restart");
    assert_eq!(exec(vm1.as_str(), "cat /var/vcap/data/f"), "before");
    exec(
        vm1.as_str(),
        &format!("echo helper-data > /warden-cpi-dev/{disk}/x"),
    );
    assert_eq!(
        cpi.get_disks(ctx, &vm1).await.expect("get_disks"),
        vec![disk.clone()]
    );
    assert_eq!(
        exec(vm2.as_str(), "ls /warden-cpi-dev | wc -l"),
        "0",
        "the other VM sees nothing"
    );
    let err = cpi.delete_disk(ctx, &disk).await.expect_err("attached");
    assert!(err.message.contains("detach"), "{}", err.message);
    let err = cpi
        .attach_disk(ctx, &vm2, &disk)
        .await
        .expect_err("attached elsewhere");
    assert!(err.message.contains("attached to VM"), "{}", err.message);

    cpi.detach_disk(ctx, &vm1, &disk)
        .await
        .expect("detach_disk");
    assert_eq!(pid1(vm1.as_str()), before);
    let err = cpi
        .detach_disk(ctx, &vm1, &disk)
        .await
        .expect_err("not attached");
    assert_eq!(err.kind, ErrorKind::DiskNotAttached);
    cpi.attach_disk(ctx, &vm2, &disk)
        .await
        .expect("attach to vm2");
    assert_eq!(
        exec(vm2.as_str(), &format!("cat /warden-cpi-dev/{disk}/x")),
        "helper-data"
    );

    // delete_vm unmounts through a helper too; the disk survives.
    cpi.delete_vm(ctx, &vm2).await.expect("delete_vm");
    cpi.delete_vm(ctx, &vm1).await.expect("delete_vm");
    assert!(cpi.has_disk(ctx, &disk).await.expect("has_disk"));
    cpi.delete_disk(ctx, &disk).await.expect("delete_disk");
    cpi.delete_stemcell(ctx, &sc)
        .await
        .expect("delete_stemcell");
    let _ = cpi_tests::daemons::docker(&[
        "network",
        "rm",
        &format!("bosh-{}", subnet.replace('/', "-")),
    ]);
    h.assert_clean();
}
