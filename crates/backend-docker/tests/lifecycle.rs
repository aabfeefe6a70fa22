//! The Docker backend against a real daemon, called as a library: the full
//! lifecycle with live disk attach, and the error paths. Fails (never skips) when
//! Docker is not running.

mod common;

use backend_docker::config::AttachMode;
use common::{exec, inspect, pid1, test_subnet, try_exec, Harness};
use cpi_core::{
    AgentId, Cpi, CreateDisk, CreateStemcell, CreateVm, CreatedVm, DiskCid, ErrorKind, Networks,
    StemcellCid, VmCid, VmCloudProperties,
};
use cpi_tests::stemcell::TestStemcell;
use serde_json::{json, Value};

async fn stemcell(h: &Harness) -> StemcellCid {
    let unpacked = TestStemcell::builder().build_unpacked(h.work.path().join("stemcell"));
    h.cpi
        .create_stemcell(
            &h.ctx,
            CreateStemcell {
                image_path: unpacked.image_path,
                cloud_properties: json!({"infrastructure": "warden", "architecture": "x86_64"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            },
        )
        .await
        .expect("create_stemcell")
}

fn manual_network(ip: &str, gw: &str) -> Networks {
    Networks::parse(
        &json!({"default": {"type": "manual", "ip": ip, "netmask": "255.255.255.0",
        "gateway": gw, "dns": ["10.245.0.2", "8.8.8.8"], "default": ["dns", "gateway"],
        "cloud_properties": {}}}),
    )
    .expect("networks")
}

async fn vm(
    h: &Harness,
    sc: &StemcellCid,
    networks: Networks,
    props: Value,
    disks: Vec<DiskCid>,
) -> CreatedVm {
    h.cpi
        .create_vm(
            &h.ctx,
            CreateVm {
                agent_id: AgentId::new(format!("agent-{}", uuid::Uuid::new_v4())).expect("agent"),
                stemcell: sc.clone(),
                cloud_properties: VmCloudProperties::parse(&props).expect("props"),
                networks,
                disk_cids: disks,
                env: json!({"bosh": {"password": "secret-password", "group": "g"}}),
            },
        )
        .await
        .expect("create_vm")
}

fn settings(vm: &VmCid) -> Value {
    serde_json::from_str(&exec(
        vm.as_str(),
        "cat /var/vcap/bosh/warden-cpi-agent-env.json",
    ))
    .expect("settings json")
}

#[tokio::test]
async fn full_lifecycle_with_live_attach() {
    let h = Harness::new("dlife", AttachMode::Local);
    let ctx = &h.ctx;
    let cpi = &h.cpi;

    // Stemcell: imported, labelled with its operating system.
    let sc = stemcell(&h).await;
    assert!(sc.as_str().starts_with("bosh-stemcell:"), "{sc}");
    assert_eq!(
        inspect(
            sc.as_str(),
            "{{index .Config.Labels \"bosh-container-cpi.stemcell.os\"}}"
        ),
        "ubuntu-jammy"
    );

    // A VM on a manual network the CPI creates from the subnet.
    let (ip, gw, subnet) = test_subnet(&h.director);
    let created = vm(
        &h,
        &sc,
        manual_network(&ip, &gw),
        json!({"cpu": 1, "ram": 256, "ports": ["6868/tcp"]}),
        vec![],
    )
    .await;
    let vm1 = created.cid.clone();
    assert!(vm1.as_str().starts_with("c-"));
    assert_eq!(created.networks.to_wire()["default"]["ip"], ip.as_str());
    assert!(cpi.has_vm(ctx, &vm1).await.expect("has_vm"));
    assert_eq!(inspect(vm1.as_str(), "{{.State.Running}}"), "true");
    assert_eq!(
        inspect(
            vm1.as_str(),
            "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}}"
        ),
        "1000000000 268435456"
    );
    assert_eq!(
        inspect(&format!("bosh-{}", subnet.replace('/', "-")), "{{.Name}}"),
        format!("bosh-{}", subnet.replace('/', "-"))
    );

    // Privileges: this host cannot grant CAP_SYS_RESOURCE, so the VM runs with every
    // other capability instead of failing like `--privileged`.
    let host_bnd = std::fs::read_to_string("/proc/self/status")
        .expect("status")
        .lines()
        .find(|l| l.starts_with("CapBnd:"))
        .expect("CapBnd")
        .to_owned();
    let vm_bnd = exec(vm1.as_str(), "grep CapBnd: /proc/1/status");
    let hex =
        |l: &str| u64::from_str_radix(l.split_whitespace().last().unwrap_or("0"), 16).expect("hex");
    let (vm_caps, host_caps) = (hex(&vm_bnd), hex(&host_bnd));
    // Docker 20.10 knows capabilities 0..=37 (CAP_AUDIT_READ); `ALL` is those.
    let known = (1u64 << 38) - 1;
    assert_eq!(
        vm_caps,
        host_caps & known,
        "VM caps {vm_caps:#x} = host caps {host_caps:#x} the daemon knows"
    );
    assert_eq!(inspect(vm1.as_str(), "{{.HostConfig.Privileged}}"), "false");
    assert!(
        exec(vm1.as_str(), "grep ' /sys ' /proc/self/mountinfo").contains(" rw"),
        "/sys is writable"
    );

    // The VM owns /etc: no Docker bind mounts left; nameservers from the network.
    let etc_mounts = exec(
        vm1.as_str(),
        "grep -c -E ' /etc/(resolv.conf|hosts|hostname) ' /proc/self/mountinfo || true",
    );
    assert_eq!(etc_mounts, "0");
    assert_eq!(
        exec(vm1.as_str(), "cat /etc/resolv.conf"),
        "nameserver 10.245.0.2\nnameserver 8.8.8.8"
    );
    assert!(exec(vm1.as_str(), "cat /etc/hosts").contains(&format!("{ip} {vm1}")));

    // The settings file was there before init started, private, with the env.
    let s = settings(&vm1);
    assert_eq!(s["vm"]["name"], vm1.as_str());
    assert_eq!(s["env"]["bosh"]["password"], "secret-password");
    assert_eq!(s["networks"]["default"]["ip"], ip.as_str());
    assert_eq!(
        exec(
            vm1.as_str(),
            "stat -c %a /var/vcap/bosh/warden-cpi-agent-env.json"
        ),
        "600"
    );
    assert!(
        exec(vm1.as_str(), "cat /var/vcap/data/sys/stand-in-init.log").contains("runsvdir-start")
    );
    // With local attach the file is a host file bound read-only (no archive request
    // writes it): the VM cannot change it, and the host file is what it reads.
    let bound = h
        .state_dir
        .join("vms")
        .join(vm1.as_str())
        .join("agent-env.json");
    assert_eq!(
        exec(
            vm1.as_str(),
            "grep -c ' /var/vcap/bosh/warden-cpi-agent-env.json ro' /proc/self/mountinfo"
        ),
        "1"
    );
    assert!(exec(
        vm1.as_str(),
        "echo x > /var/vcap/bosh/warden-cpi-agent-env.json 2>&1 || echo refused"
    )
    .contains("refused"));
    assert_eq!(
        serde_json::from_slice::<Value>(&std::fs::read(&bound).expect("host file")).expect("json"),
        s
    );

    // A disk, attached live.
    let disk = cpi
        .create_disk(
            ctx,
            CreateDisk {
                size_mib: 1024,
                cloud_properties: Default::default(),
                vm: Some(vm1.clone()),
            },
        )
        .await
        .expect("create_disk");
    assert!(cpi.has_disk(ctx, &disk).await.expect("has_disk"));
    exec(vm1.as_str(), "echo before > /var/vcap/data/before-attach");
    let before = pid1(vm1.as_str());
    let hint = cpi
        .attach_disk(ctx, &vm1, &disk)
        .await
        .expect("attach_disk");
    assert_eq!(hint.0, format!("/warden-cpi-dev/{disk}"));
    assert_eq!(
        pid1(vm1.as_str()),
        before,
        "PID 1 and its start time unchanged"
    );
    assert_eq!(
        exec(vm1.as_str(), "cat /var/vcap/data/before-attach"),
        "before"
    );
    assert!(exec(vm1.as_str(), "cat /proc/self/mountinfo")
        .contains(&format!(" /warden-cpi-dev/{disk} ")));
    assert_eq!(
        settings(&vm1)["disks"]["persistent"][disk.as_str()],
        format!("/warden-cpi-dev/{disk}")
    );
    // The host keeps a copy of what it wrote (attach and detach read it instead of
    // the VM's file), outside the VM.
    let vm_dir = h.state_dir.join("vms").join(vm1.as_str());
    let host_copy = || -> Value {
        serde_json::from_slice(&std::fs::read(vm_dir.join("settings.json")).expect("host copy"))
            .expect("host copy json")
    };
    assert_eq!(host_copy(), settings(&vm1));
    assert_eq!(
        exec(vm1.as_str(), "ls /warden-cpi-dev"),
        disk.as_str(),
        "nothing but the disk is visible in the VM"
    );
    assert_eq!(
        cpi.get_disks(ctx, &vm1).await.expect("get_disks"),
        vec![disk.clone()]
    );
    // Attaching again is idempotent.
    assert_eq!(
        cpi.attach_disk(ctx, &vm1, &disk).await.expect("again").0,
        hint.0
    );
    exec(
        vm1.as_str(),
        &format!("echo payload > /warden-cpi-dev/{disk}/data"),
    );

    // A second VM: sees none of the first VM's disks; cannot take an attached disk.
    let created2 = vm(
        &h,
        &sc,
        Networks::parse(&json!({"d": {"type": "dynamic", "dns": ["8.8.4.4"]}})).expect("nets"),
        json!({}),
        vec![],
    )
    .await;
    let vm2 = created2.cid.clone();
    let dyn_ip = created2.networks.to_wire()["d"]["ip"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(
        dyn_ip,
        inspect(
            vm2.as_str(),
            "{{.NetworkSettings.Networks.bridge.IPAddress}}"
        ),
        "dynamic address reported"
    );
    assert_eq!(exec(vm2.as_str(), "ls /warden-cpi-dev | wc -l"), "0");
    let err = cpi
        .attach_disk(ctx, &vm2, &disk)
        .await
        .expect_err("attached elsewhere");
    assert!(err.message.contains("attached to VM"), "{}", err.message);
    let err = cpi
        .delete_disk(ctx, &disk)
        .await
        .expect_err("delete while attached");
    assert!(err.message.contains("detach"), "{}", err.message);

    // A settings write that never finished (a CPI killed after marking it pending)
    // leaves the copy untrusted: the detach reads the VM's own file, so the ghost
    // disk in this copy must not reach the VM.
    let mut stale = host_copy();
    stale["disks"]["persistent"]["ghost"] = json!("/warden-cpi-dev/ghost");
    std::fs::write(
        vm_dir.join("settings.json"),
        serde_json::to_vec(&stale).expect("json"),
    )
    .expect("stale copy");
    std::fs::write(vm_dir.join("settings.pending"), b"").expect("pending mark");

    // Detach live; detach again is DiskNotAttached.
    cpi.detach_disk(ctx, &vm1, &disk)
        .await
        .expect("detach_disk");
    assert_eq!(pid1(vm1.as_str()), before);
    assert!(!exec(vm1.as_str(), "cat /proc/self/mountinfo").contains("/warden-cpi-dev/"));
    assert_eq!(settings(&vm1)["disks"]["persistent"], json!({}));
    assert_eq!(host_copy(), settings(&vm1), "the copy is trusted again");
    assert!(!vm_dir.join("settings.pending").exists());
    assert!(cpi
        .get_disks(ctx, &vm1)
        .await
        .expect("get_disks")
        .is_empty());
    let err = cpi
        .detach_disk(ctx, &vm1, &disk)
        .await
        .expect_err("not attached");
    assert_eq!(err.kind, ErrorKind::DiskNotAttached);

    // Re-attach to the second VM: the data is there.
    let before2 = pid1(vm2.as_str());
    cpi.attach_disk(ctx, &vm2, &disk)
        .await
        .expect("attach to vm2");
    assert_eq!(
        exec(vm2.as_str(), &format!("cat /warden-cpi-dev/{disk}/data")),
        "payload"
    );
    assert_eq!(pid1(vm2.as_str()), before2);

    // Reboot for real: new PID 1 start, data and disk kept.
    exec(vm2.as_str(), "echo eph > /var/vcap/data/eph-file");
    cpi.reboot_vm(ctx, &vm2).await.expect("reboot_vm");
    assert_ne!(pid1(vm2.as_str()).1, before2.1, "restarted for real");
    assert_eq!(exec(vm2.as_str(), "cat /var/vcap/data/eph-file"), "eph");
    assert_eq!(
        exec(vm2.as_str(), &format!("cat /warden-cpi-dev/{disk}/data")),
        "payload"
    );
    assert_eq!(
        exec(
            vm2.as_str(),
            "grep -c started /var/vcap/data/sys/stand-in-init.log"
        ),
        "2"
    );
    assert_eq!(
        cpi.get_disks(ctx, &vm2).await.expect("get_disks"),
        vec![disk.clone()]
    );

    // Metadata, visible to an operator.
    let md = json!({"director": "d", "deployment": "dep", "job": "router", "instance_group": "router", "index": "0", "id": "abc", "name": "router/abc", "created_at": "now"});
    cpi.set_vm_metadata(ctx, &vm2, md.as_object().expect("md"))
        .await
        .expect("set_vm_metadata");
    cpi.set_vm_metadata(ctx, &vm2, md.as_object().expect("md"))
        .await
        .expect("set_vm_metadata again");
    let holder = format!("{vm2}.dep.router.0");
    assert_eq!(
        inspect(&holder, "{{index .Config.Labels \"bosh.deployment\"}}"),
        "dep"
    );
    // New metadata replaces the holder; the VM's record names the one holder there
    // is, which is how delete_vm finds it without a label query.
    let md2 = json!({"deployment": "dep", "job": "router", "index": "1"});
    cpi.set_vm_metadata(ctx, &vm2, md2.as_object().expect("md"))
        .await
        .expect("set_vm_metadata with new metadata");
    let holder2 = format!("{vm2}.dep.router.1");
    let holders_of = |vm: &str| {
        let out = std::process::Command::new("docker")
            .args(["ps", "-a", "--format", "{{.Names}}", "--filter"])
            .arg(format!("label=bosh-container-cpi.vm-cid={vm}"))
            .output()
            .expect("docker ps");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(holders_of(vm2.as_str()), holder2);
    let record = h
        .state_dir
        .join("vms")
        .join(vm2.as_str())
        .join("metadata-holders");
    assert_eq!(
        serde_json::from_slice::<Vec<String>>(&std::fs::read(&record).expect("record"))
            .expect("json"),
        vec![holder2.clone()]
    );
    cpi.set_disk_metadata(ctx, &disk, md.as_object().expect("md"))
        .await
        .expect("set_disk_metadata");

    // delete_vm with the disk still attached: the disk and its data survive.
    cpi.delete_vm(ctx, &vm2).await.expect("delete_vm");
    assert_eq!(holders_of(vm2.as_str()), "", "the holder goes with the VM");
    cpi.delete_vm(ctx, &vm2)
        .await
        .expect("delete_vm is idempotent");
    assert!(!cpi.has_vm(ctx, &vm2).await.expect("has_vm"));
    assert!(cpi.has_disk(ctx, &disk).await.expect("has_disk"));
    let mountpoint = inspect(disk.as_str(), "{{.Mountpoint}}");
    assert_eq!(
        std::fs::read_to_string(format!("{mountpoint}/data"))
            .expect("data")
            .trim(),
        "payload"
    );

    // Attach at create (disk_cids), then clean up everything.
    let created3 = vm(
        &h,
        &sc,
        manual_network(&common::last_octet(&ip, 12), &gw),
        json!({}),
        vec![disk.clone()],
    )
    .await;
    let vm3 = created3.cid;
    assert_eq!(
        exec(vm3.as_str(), &format!("cat /warden-cpi-dev/{disk}/data")),
        "payload"
    );
    assert_eq!(
        settings(&vm3)["disks"]["persistent"][disk.as_str()],
        format!("/warden-cpi-dev/{disk}")
    );
    cpi.delete_vm(ctx, &vm3).await.expect("delete vm3");
    cpi.delete_vm(ctx, &vm1).await.expect("delete vm1");
    cpi.delete_disk(ctx, &disk).await.expect("delete_disk");
    cpi.delete_disk(ctx, &disk)
        .await
        .expect("delete_disk is idempotent");
    assert!(!cpi.has_disk(ctx, &disk).await.expect("has_disk"));
    cpi.delete_stemcell(ctx, &sc)
        .await
        .expect("delete_stemcell");
    cpi.delete_stemcell(ctx, &sc)
        .await
        .expect("delete_stemcell is idempotent");

    // The network we created is ours to remove (the CPI keeps it for later VMs).
    let _ = cpi_tests::daemons::docker(&[
        "network",
        "rm",
        &format!("bosh-{}", subnet.replace('/', "-")),
    ]);
    h.assert_clean();
}

#[tokio::test]
async fn error_paths() {
    let h = Harness::new("derr", AttachMode::Local);
    let ctx = &h.ctx;
    let cpi = &h.cpi;
    let unknown_vm = VmCid::new("c-00000000-0000-0000-0000-000000000000").expect("cid");
    let unknown_disk = DiskCid::new("vol-00000000-0000-0000-0000-000000000000").expect("cid");

    assert!(!cpi.has_vm(ctx, &unknown_vm).await.expect("has_vm"));
    cpi.delete_vm(ctx, &unknown_vm)
        .await
        .expect("delete_vm of a missing VM");
    assert!(!cpi.has_disk(ctx, &unknown_disk).await.expect("has_disk"));
    cpi.delete_disk(ctx, &unknown_disk)
        .await
        .expect("delete_disk of a missing disk");
    cpi.delete_stemcell(
        ctx,
        &StemcellCid::new("bosh-stemcell:missing").expect("cid"),
    )
    .await
    .expect("delete_stemcell");

    let err = cpi
        .attach_disk(ctx, &unknown_vm, &unknown_disk)
        .await
        .expect_err("attach");
    assert_eq!(err.kind, ErrorKind::VmNotFound);
    let err = cpi.reboot_vm(ctx, &unknown_vm).await.expect_err("reboot");
    assert_eq!(err.kind, ErrorKind::VmNotFound);
    let err = cpi
        .get_disks(ctx, &unknown_vm)
        .await
        .expect_err("get_disks");
    assert_eq!(err.kind, ErrorKind::VmNotFound);
    let err = cpi
        .set_disk_metadata(ctx, &unknown_disk, &Default::default())
        .await
        .expect_err("md");
    assert_eq!(err.kind, ErrorKind::DiskNotFound);

    // A VM for the disk errors, and create_vm failures.
    let sc = stemcell(&h).await;
    let (ip, gw, _) = test_subnet(&h.director);
    let v = vm(&h, &sc, manual_network(&ip, &gw), json!({}), vec![])
        .await
        .cid;
    let err = cpi
        .attach_disk(ctx, &v, &unknown_disk)
        .await
        .expect_err("unknown disk");
    assert_eq!(err.kind, ErrorKind::DiskNotFound);
    let err = cpi
        .detach_disk(ctx, &v, &unknown_disk)
        .await
        .expect_err("unknown disk");
    assert_eq!(err.kind, ErrorKind::DiskNotFound);

    // A network that names a missing Docker network, with creation off, is
    // NetworkNotFound; an IP outside a named network's subnet is a clear error; a
    // missing stemcell fails without leaving anything.
    let bad = |ip: &str, name: &str| {
        Networks::parse(&json!({"n": {"type": "manual", "ip": ip, "netmask": "255.255.255.0", "gateway": "10.99.1.1", "cloud_properties": {"name": name}}})).expect("nets")
    };
    let req = |networks: Networks, stemcell: StemcellCid| CreateVm {
        agent_id: AgentId::new("agent-x").expect("agent"),
        stemcell,
        cloud_properties: VmCloudProperties::default(),
        networks,
        disk_cids: vec![],
        env: json!({}),
    };
    let net_name = format!("{}-net", h.director);
    cpi_tests::daemons::docker(&[
        "network",
        "create",
        "--subnet",
        "10.99.2.0/24",
        "--label",
        &format!("bosh-container-cpi.director-uuid={}", h.director),
        &net_name,
    ])
    .expect_success();
    let err = cpi
        .create_vm(ctx, req(bad("10.99.1.5", &net_name), sc.clone()))
        .await
        .expect_err("outside");
    assert!(
        err.message.contains("outside the subnets"),
        "{}",
        err.message
    );
    let strict = without_network_creation(&h);
    let err = strict
        .create_vm(ctx, req(bad("10.99.1.5", "no-such-network"), sc.clone()))
        .await
        .expect_err("missing");
    assert_eq!(err.kind, ErrorKind::NetworkNotFound, "{}", err.message);
    let err = cpi
        .create_vm(
            ctx,
            req(
                manual_network(&ip, &gw),
                StemcellCid::new("bosh-stemcell:missing").expect("cid"),
            ),
        )
        .await
        .expect_err("missing stemcell");
    assert_eq!(err.kind, ErrorKind::VmCreationFailed);
    assert!(!err.ok_to_retry);

    // A failure after the container exists (the init is missing) removes it all.
    let before = h.leftovers().len();
    let err = cpi
        .create_vm(ctx, CreateVm {
            cloud_properties: VmCloudProperties::parse(&json!({"Devices": [{"PathOnHost": "/dev/nonexistent-device", "PathInContainer": "/dev/x", "CgroupPermissions": "rwm"}]})).expect("props"),
            ..req(manual_network(&common::last_octet(&ip, 11), &gw), sc.clone())
        })
        .await
        .expect_err("cannot start");
    assert_eq!(err.kind, ErrorKind::VmCreationFailed, "{}", err.message);
    assert_eq!(
        h.leftovers().len(),
        before,
        "failed create_vm left nothing: {:?}",
        h.leftovers()
    );

    cpi.delete_vm(ctx, &v).await.expect("delete_vm");
    cpi.delete_stemcell(ctx, &sc)
        .await
        .expect("delete_stemcell");
    cpi_tests::daemons::docker(&["network", "rm", &net_name]).expect_success();
    for n in cpi_tests::daemons::docker(&[
        "network",
        "ls",
        "-q",
        "--filter",
        &format!("label=bosh-container-cpi.director-uuid={}", h.director),
    ])
    .stdout
    .lines()
    {
        let _ = cpi_tests::daemons::docker(&["network", "rm", n]);
    }
    h.assert_clean();
    let _ = try_exec;
}

/// The same backend with `create_networks: false`.
fn without_network_creation(h: &Harness) -> backend_docker::DockerCpi {
    backend_docker::DockerCpi::new(
        backend_docker::DockerConfig {
            create_networks: false,
            ..h.cpi.config().clone()
        },
        h.cpi.agent().clone(),
    )
    .expect("backend")
}

#[tokio::test]
async fn connects_negotiates_and_picks_local_attach_beside_the_daemon() {
    let h = Harness::new("dauto", AttachMode::Auto);
    // The Go CPI's default api_version is only a preference: negotiated down.
    let cpi = backend_docker::DockerCpi::new(
        backend_docker::DockerConfig {
            api_version: Some("1.44".into()),
            ..h.cpi.config().clone()
        },
        h.cpi.agent().clone(),
    )
    .expect("backend");
    let client = cpi.client().await.expect("connect");
    let server = cpi_tests::daemons::docker(&["version", "--format", "{{.Server.APIVersion}}"])
        .expect_success();
    let (major, minor) = client.api_version();
    let server: Vec<usize> = server
        .split('.')
        .map(|p| p.parse().expect("version"))
        .collect();
    assert!(
        (major, minor) <= (server[0], server[1]) && (major, minor) <= (1, 44),
        "{major}.{minor}"
    );
    assert_eq!(cpi.mounter(client), backend_docker::Mounter::Local);
    assert!(cpi
        .has_vm(&h.ctx, &VmCid::new("c-none").expect("cid"))
        .await
        .is_ok());
}

/// A new backend on the harness's config: a process of its own, as far as the
/// connection is concerned.
fn fresh_backend(h: &Harness) -> backend_docker::DockerCpi {
    backend_docker::DockerCpi::new(h.cpi.config().clone(), h.cpi.agent().clone()).expect("backend")
}

/// The lookup client's API version and whether it was remembered.
async fn lookup_version(cpi: &backend_docker::DockerCpi) -> ((usize, usize), bool) {
    cpi.lookup(|c| async move { Ok((c.api_version(), c.remembered)) })
        .await
        .expect("lookup")
}

#[tokio::test]
async fn lookups_use_the_remembered_api_version_and_recover_when_it_is_refused() {
    use backend_docker::client::REMEMBERED_VERSION_FILE;
    let h = Harness::new("dremember", AttachMode::Auto);
    std::fs::create_dir_all(&h.state_dir).expect("state dir");
    let file = h.state_dir.join(REMEMBERED_VERSION_FILE);
    let server = cpi_tests::daemons::docker(&["version", "--format", "{{.Server.APIVersion}}"])
        .expect_success();
    let server = server.trim().to_owned();
    let record = |file: &std::path::Path| -> Value {
        serde_json::from_slice(&std::fs::read(file).expect("remembered file")).expect("json")
    };
    let rewrite = |field: &str, value: Value| {
        let mut r = record(&file);
        r[field] = value;
        std::fs::write(&file, serde_json::to_vec(&r).expect("json")).expect("write");
    };
    let none = VmCid::new("c-none").expect("cid");

    // Nothing remembered: the lookup asks the daemon, and remembers its answer.
    let (_, remembered) = lookup_version(&fresh_backend(&h)).await;
    assert!(!remembered);
    assert_eq!(record(&file)["api_version"], json!(server), "{file:?}");

    // Remembered for this socket: used without asking. A version one below the
    // daemon's shows it is the remembered one that is used.
    let (major, minor) = server.split_once('.').expect("version");
    let lower = format!("{major}.{}", minor.parse::<usize>().expect("minor") - 1);
    rewrite("api_version", json!(lower));
    let cpi = fresh_backend(&h);
    let (version, remembered) = lookup_version(&cpi).await;
    assert!(remembered);
    assert_eq!(format!("{}.{}", version.0, version.1), lower);
    assert!(!cpi.has_vm(&h.ctx, &none).await.expect("has_vm"));

    // Refused (the daemon was downgraded or upgraded behind the same socket): the
    // lookups still answer, and the daemon's version is remembered again.
    let no_disk = DiskCid::new("d-none").expect("cid");
    for refused in ["1.99", "1.1"] {
        for call in ["has_vm", "has_disk", "get_disks"] {
            rewrite("api_version", json!(refused));
            let cpi = fresh_backend(&h);
            let (answer, expected) = match call {
                "has_vm" => (
                    format!("{:?}", cpi.has_vm(&h.ctx, &none).await),
                    "Ok(false)",
                ),
                "has_disk" => (
                    format!("{:?}", cpi.has_disk(&h.ctx, &no_disk).await),
                    "Ok(false)",
                ),
                _ => (
                    format!(
                        "{:?}",
                        cpi.get_disks(&h.ctx, &none).await.map_err(|e| e.kind)
                    ),
                    "Err(VmNotFound)",
                ),
            };
            assert_eq!(answer, expected, "{call} with {refused} remembered");
            assert_eq!(
                record(&file)["api_version"],
                json!(server),
                "{call} after {refused}"
            );
        }
    }

    // Another socket (the daemon restarted and made its socket anew): not used.
    rewrite(
        "identity",
        json!({"dev": 0, "ino": 0, "ctime": 0, "ctime_nsec": 0}),
    );
    let (_, remembered) = lookup_version(&fresh_backend(&h)).await;
    assert!(!remembered);
    assert_eq!(
        record(&file)["identity"]["dev"].as_u64().map(|d| d > 0),
        Some(true)
    );
    // Garbage: ignored, and replaced.
    std::fs::write(&file, b"{not json").expect("write");
    let (_, remembered) = lookup_version(&fresh_backend(&h)).await;
    assert!(!remembered);
    assert_eq!(record(&file)["api_version"], json!(server));
    h.assert_clean();
}
