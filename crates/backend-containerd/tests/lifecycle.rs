//! The containerd backend against a real containerd, used as a library: the whole VM
//! and disk lifecycle with proofs that attach and detach are live, error paths, and a
//! leftovers check. These tests fail (never skip) when containerd is not running.

mod common;

use std::time::Duration;

use common::{
    assert_kind, import_stemcell, in_vm, ping_from, run_ok, start_time, vm_mount_points, TestEnv,
};
use cpi_core::{
    AgentId, AgentSettings, Cpi, CreateDisk, CreateVm, DiskCid, ErrorKind, Networks, StemcellCid,
    VmCid, VmCloudProperties,
};
use serde_json::{json, Value};

const SUBNET: &str = "10.231.7.0/24";

fn manual_network(ip: &str) -> Networks {
    Networks::parse(
        &json!({"default": {"type": "manual", "ip": ip, "netmask": "255.255.255.0",
        "gateway": "10.231.7.1", "dns": ["10.231.7.2"], "default": ["dns", "gateway"]}}),
    )
    .expect("networks")
}

fn create_vm_req(
    stemcell: &StemcellCid,
    agent: &str,
    networks: Networks,
    props: Value,
) -> CreateVm {
    CreateVm {
        agent_id: AgentId::new(agent).expect("agent id"),
        stemcell: stemcell.clone(),
        cloud_properties: VmCloudProperties::parse(&props).expect("props"),
        networks,
        disk_cids: vec![],
        env: json!({"bosh": {"password": "secret-password", "blobstores": [{"provider": "local"}]}}),
    }
}

/// Waits until the stand-in init has logged `n` starts.
fn wait_for_init_starts(pid: u32, n: usize) -> String {
    let log = in_vm(pid, cpi_tests::stemcell::STAND_IN_INIT_LOG);
    for _ in 0..100 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().count() >= n {
            return text;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the VM's init did not log {n} starts in {}", log.display());
}

fn settings_in_vm(pid: u32) -> AgentSettings {
    let bytes =
        std::fs::read(in_vm(pid, "/var/vcap/bosh/warden-cpi-agent-env.json")).expect("settings");
    AgentSettings::from_json(&bytes).expect("settings json")
}

#[tokio::test(flavor = "multi_thread")]
async fn full_lifecycle_with_live_attach_and_reboot() {
    let env = TestEnv::new("lifecycle", &[SUBNET]);
    let cpi = &env.cpi;
    let ctx = &env.ctx;

    let image = common::build_stemcell_image(&env, "ubuntu-jammy");
    let stemcell = common::import_stemcell_image(&env, &image).await;
    let images = env.ctr(&["images", "ls"]);
    assert!(images.contains(stemcell.as_str()), "{images}");
    // The root filesystem's snapshot is named by the diff id containerd computed
    // while applying the image (the CPI does not decompress it): the sha256 of the
    // uncompressed tar. containerd records it on the blob, and a second import of
    // the same image finds it there and reuses the snapshot.
    let diff_id = {
        use sha2::Digest as _;
        let mut tar = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::MultiGzDecoder::new(std::fs::File::open(&image).expect("image")),
            &mut tar,
        )
        .expect("gunzip the image");
        format!("sha256:{:x}", sha2::Sha256::digest(&tar))
    };
    let chain_label = format!("io.bosh.cpi.chain-id={diff_id}");
    let images = env.ctr(&["images", "ls"]);
    assert!(images.contains(&chain_label), "{images}");
    let content = env.ctr(&["content", "ls"]);
    assert!(
        content.contains(&format!("containerd.io/uncompressed={diff_id}")),
        "{content}"
    );
    // The blob is the image file as it is, under the digest containerd computed
    // while storing it (the CPI does not hash a compressed image).
    let blob = {
        use sha2::Digest as _;
        format!(
            "sha256:{:x}",
            sha2::Sha256::digest(std::fs::read(&image).expect("image"))
        )
    };
    assert!(
        content
            .lines()
            .any(|l| l.starts_with(&blob) && l.contains(&diff_id)),
        "no blob {blob} labelled with {diff_id}: {content}"
    );
    // (Another director's, or the retry of the first would adopt the first.)
    let other = cpi_core::CallContext {
        director_uuid: Some("director-other".into()),
        ..ctx.clone()
    };
    let again = cpi
        .create_stemcell(
            &other,
            cpi_core::CreateStemcell {
                image_path: image.clone(),
                cloud_properties: Default::default(),
            },
        )
        .await
        .expect("create_stemcell again");
    assert_ne!(again, stemcell);
    let images = env.ctr(&["images", "ls"]);
    assert_eq!(
        images.matches(&chain_label).count(),
        2,
        "both stemcells on one snapshot: {images}"
    );
    cpi.delete_stemcell(&other, &again)
        .await
        .expect("delete_stemcell");
    // The same root filesystem as an uncompressed tar: the CPI hashes it (it is its
    // own diff id, which labels the blob), and it lands on the same snapshot.
    let plain_dir = env.scratch.path().join("plain-stemcell");
    std::fs::create_dir_all(&plain_dir).expect("mkdir");
    let manifest = image.with_file_name("stemcell.MF");
    std::fs::copy(&manifest, plain_dir.join("stemcell.MF")).expect("manifest");
    let plain = plain_dir.join("image");
    std::io::copy(
        &mut flate2::read::MultiGzDecoder::new(std::fs::File::open(&image).expect("image")),
        &mut std::fs::File::create(&plain).expect("plain tar"),
    )
    .expect("gunzip the image");
    let from_plain = cpi
        .create_stemcell(
            &other,
            cpi_core::CreateStemcell {
                image_path: plain.clone(),
                cloud_properties: Default::default(),
            },
        )
        .await
        .expect("create_stemcell of a plain tar");
    let content = env.ctr(&["content", "ls"]);
    assert!(
        content
            .lines()
            .any(|l| l.starts_with(&diff_id) && l.contains(&format!("uncompressed={diff_id}"))),
        "no blob {diff_id} labelled as its own diff id: {content}"
    );
    let images = env.ctr(&["images", "ls"]);
    assert_eq!(images.matches(&chain_label).count(), 2, "{images}");
    cpi.delete_stemcell(&other, &from_plain)
        .await
        .expect("delete_stemcell");

    // create_vm: running, with its files in place before init started.
    let created = cpi
        .create_vm(
            ctx,
            create_vm_req(
                &stemcell,
                "agent-a",
                manual_network("10.231.7.10"),
                json!({"ram": 512, "cpu": 1}),
            ),
        )
        .await
        .expect("create_vm");
    let vm_a = created.cid.clone();
    assert_eq!(created.networks.to_wire()["default"]["ip"], "10.231.7.10");
    assert!(cpi.has_vm(ctx, &vm_a).await.expect("has_vm"));
    let pid = env.running_pid(vm_a.as_str());
    let init_log = wait_for_init_starts(pid, 1);
    assert!(
        init_log.contains("started /usr/sbin/runsvdir-start"),
        "{init_log}"
    );
    assert!(init_log.contains(" settings present "), "{init_log}");
    // The snapshot has no lease: the container record holds it. A collection
    // (run synchronously by removing a lease) leaves it, and the VM, alone.
    let lease = env
        .ctr(&["leases", "create"])
        .split_whitespace()
        .next()
        .expect("lease id")
        .to_owned();
    env.ctr(&["leases", "delete", "--sync", &lease]);
    let snapshots = env.ctr(&["snapshots", "ls"]);
    assert!(snapshots.contains(vm_a.as_str()), "{snapshots}");
    assert!(
        env.ctr(&["leases", "ls"]).lines().count() <= 1,
        "a lease is left"
    );
    let settings = settings_in_vm(pid);
    assert_eq!(settings.agent_id, "agent-a");
    assert_eq!(settings.vm.name, vm_a.as_str());
    assert_eq!(settings.env["bosh"]["password"], "secret-password");
    let mode = std::fs::metadata(in_vm(pid, "/var/vcap/bosh/warden-cpi-agent-env.json"))
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .expect("meta");
    assert_eq!(mode, 0o600);
    let resolv = in_vm(pid, "/etc/resolv.conf");
    assert!(std::fs::symlink_metadata(&resolv)
        .expect("resolv")
        .file_type()
        .is_file());
    assert!(std::fs::read_to_string(&resolv)
        .expect("resolv")
        .contains("nameserver 10.231.7.2"));
    assert_eq!(
        std::fs::read_to_string(in_vm(pid, "/etc/hostname"))
            .expect("hostname")
            .trim(),
        vm_a.as_str()
    );
    // No runtime bind mounts over the files the VM owns.
    let mounts = vm_mount_points(pid);
    for owned in ["/etc/resolv.conf", "/etc/hosts", "/etc/hostname"] {
        assert!(
            !mounts.iter().any(|m| m == owned),
            "{owned} is a mount point: {mounts:?}"
        );
    }
    assert!(mounts.iter().any(|m| m == "/var/vcap/data"), "{mounts:?}");
    assert!(mounts.iter().any(|m| m == "/warden-cpi-dev"), "{mounts:?}");

    // The VM's interface has its BOSH address and reaches its gateway (the host).
    let addr = run_ok(
        "ip",
        &[
            "netns",
            "exec",
            vm_a.as_str(),
            "ip",
            "-o",
            "-4",
            "addr",
            "show",
            "dev",
            "eth0",
        ],
    );
    assert!(addr.contains("10.231.7.10/24"), "{addr}");
    let route = run_ok(
        "ip",
        &[
            "netns",
            "exec",
            vm_a.as_str(),
            "ip",
            "route",
            "show",
            "default",
        ],
    );
    assert!(route.contains("via 10.231.7.1"), "{route}");
    ping_from(vm_a.as_str(), "10.231.7.1");

    // Capabilities: the host's bounding set, CAP_SYS_RESOURCE absent on this host.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let host = std::fs::read_to_string("/proc/self/status").expect("status");
    let cap_bnd = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("CapBnd:"))
            .map(str::to_owned)
    };
    assert_eq!(cap_bnd(&status), cap_bnd(&host));

    // set_vm_metadata: container labels.
    let metadata =
        json!({"director": "d", "deployment": "dep", "job": "zk", "index": "0", "name": "zk/0"});
    cpi.set_vm_metadata(ctx, &vm_a, metadata.as_object().expect("obj"))
        .await
        .expect("metadata");
    let info = env.ctr(&["containers", "info", vm_a.as_str()]);
    assert!(info.contains("io.bosh.cpi.metadata.deployment"), "{info}");

    // Ephemeral data and a root filesystem change, to survive attach and reboot.
    std::fs::write(in_vm(pid, "/var/vcap/data/ephemeral-marker"), "eph").expect("write");
    std::fs::write(in_vm(pid, "/root/rootfs-marker"), "root").expect("write");

    // A disk, attached live: same PID 1, same start time.
    let disk = cpi
        .create_disk(
            ctx,
            CreateDisk {
                size_mib: 1024,
                cloud_properties: Default::default(),
                vm: Some(vm_a.clone()),
            },
        )
        .await
        .expect("create_disk");
    assert!(cpi.has_disk(ctx, &disk).await.expect("has_disk"));
    cpi.set_disk_metadata(
        ctx,
        &disk,
        json!({"deployment": "dep"}).as_object().expect("obj"),
    )
    .await
    .expect("disk metadata");
    let started_before = start_time(pid);
    let hint = cpi.attach_disk(ctx, &vm_a, &disk).await.expect("attach");
    assert_eq!(hint.0, format!("/warden-cpi-dev/{disk}"));
    assert_eq!(
        env.running_pid(vm_a.as_str()),
        pid,
        "attach restarted the VM"
    );
    assert_eq!(start_time(pid), started_before, "attach restarted PID 1");
    assert!(
        vm_mount_points(pid).contains(&hint.0),
        "disk not mounted live in the VM"
    );
    std::fs::write(in_vm(pid, &format!("{}/data.txt", hint.0)), "persistent")
        .expect("write to disk");
    assert_eq!(
        settings_in_vm(pid).persistent_disks(),
        vec![disk.to_string()]
    );
    assert_eq!(
        cpi.get_disks(ctx, &vm_a).await.expect("get_disks"),
        vec![disk.clone()]
    );
    assert_eq!(
        std::fs::read_to_string(in_vm(pid, "/var/vcap/data/ephemeral-marker")).expect("eph"),
        "eph"
    );
    // Attaching again is harmless.
    assert_eq!(
        cpi.attach_disk(ctx, &vm_a, &disk)
            .await
            .expect("attach again"),
        hint
    );
    let refused = cpi
        .delete_disk(ctx, &disk)
        .await
        .expect_err("delete attached disk");
    assert!(refused.message.contains("attached"), "{}", refused.message);

    // reboot_vm: a new PID 1 on the same root filesystem, data and disk.
    cpi.reboot_vm(ctx, &vm_a).await.expect("reboot");
    let pid2 = env.running_pid(vm_a.as_str());
    assert_ne!(pid2, pid);
    let log = wait_for_init_starts(pid2, 2);
    assert_eq!(log.lines().count(), 2, "{log}");
    assert_eq!(
        std::fs::read_to_string(in_vm(pid2, "/root/rootfs-marker")).expect("rootfs"),
        "root"
    );
    assert_eq!(
        std::fs::read_to_string(in_vm(pid2, "/var/vcap/data/ephemeral-marker")).expect("eph"),
        "eph"
    );
    assert_eq!(
        std::fs::read_to_string(in_vm(pid2, &format!("{}/data.txt", hint.0)))
            .expect("disk after reboot"),
        "persistent"
    );
    assert!(vm_mount_points(pid2).contains(&hint.0));

    // detach, live.
    let started = start_time(pid2);
    cpi.detach_disk(ctx, &vm_a, &disk).await.expect("detach");
    assert_eq!(start_time(pid2), started, "detach restarted PID 1");
    assert!(
        !vm_mount_points(pid2).contains(&hint.0),
        "disk still mounted in the VM"
    );
    assert!(settings_in_vm(pid2).persistent_disks().is_empty());
    assert!(cpi
        .get_disks(ctx, &vm_a)
        .await
        .expect("get_disks")
        .is_empty());
    assert_kind(
        cpi.detach_disk(ctx, &vm_a, &disk).await,
        ErrorKind::DiskNotAttached,
    );

    // The disk's data moves to a second VM.
    let vm_b = cpi
        .create_vm(
            ctx,
            create_vm_req(
                &stemcell,
                "agent-b",
                manual_network("10.231.7.11"),
                json!({}),
            ),
        )
        .await
        .expect("create second VM")
        .cid;
    let pid_b = env.running_pid(vm_b.as_str());
    cpi.attach_disk(ctx, &vm_b, &disk)
        .await
        .expect("attach to second VM");
    assert_eq!(
        std::fs::read_to_string(in_vm(pid_b, &format!("{}/data.txt", hint.0)))
            .expect("data on second VM"),
        "persistent"
    );
    // The first VM does not see it.
    assert!(!vm_mount_points(pid2).contains(&hint.0));
    let refused = cpi
        .attach_disk(ctx, &vm_a, &disk)
        .await
        .expect_err("attached elsewhere");
    assert!(
        refused.message.contains(vm_b.as_str()),
        "{}",
        refused.message
    );

    // delete_vm with the disk attached: the VM goes, the disk's data stays.
    cpi.delete_vm(ctx, &vm_b)
        .await
        .expect("delete_vm with disk");
    assert!(!cpi.has_vm(ctx, &vm_b).await.expect("has_vm"));
    assert!(cpi.has_disk(ctx, &disk).await.expect("has_disk"));
    cpi.attach_disk(ctx, &vm_a, &disk).await.expect("re-attach");
    assert_eq!(
        std::fs::read_to_string(in_vm(pid2, &format!("{}/data.txt", hint.0)))
            .expect("data after VM delete"),
        "persistent"
    );
    cpi.detach_disk(ctx, &vm_a, &disk).await.expect("detach");

    cpi.delete_vm(ctx, &vm_a).await.expect("delete_vm");
    cpi.delete_vm(ctx, &vm_a)
        .await
        .expect("delete_vm is idempotent");
    assert!(!cpi.has_vm(ctx, &vm_a).await.expect("has_vm"));
    cpi.delete_disk(ctx, &disk).await.expect("delete_disk");
    cpi.delete_disk(ctx, &disk)
        .await
        .expect("delete_disk is idempotent");
    assert!(!cpi.has_disk(ctx, &disk).await.expect("has_disk"));
    cpi.delete_stemcell(ctx, &stemcell)
        .await
        .expect("delete_stemcell");
    cpi.delete_stemcell(ctx, &stemcell)
        .await
        .expect("delete_stemcell is idempotent");

    env.assert_clean(&[vm_a.to_string(), vm_b.to_string()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn error_paths_use_the_directors_error_kinds() {
    let env = TestEnv::new("errors", &["10.231.8.0/24"]);
    let cpi = &env.cpi;
    let ctx = &env.ctx;
    let missing_vm = VmCid::new("vm-00000000-0000-0000-0000-000000000000").expect("cid");
    let missing_disk = DiskCid::new("disk-00000000-0000-0000-0000-000000000000").expect("cid");

    assert!(!cpi.has_vm(ctx, &missing_vm).await.expect("has_vm"));
    assert!(!cpi
        .has_vm(ctx, &VmCid::new("not.ours..x").expect("cid"))
        .await
        .expect("has_vm"));
    assert!(!cpi.has_disk(ctx, &missing_disk).await.expect("has_disk"));
    assert_kind(cpi.reboot_vm(ctx, &missing_vm).await, ErrorKind::VmNotFound);
    assert_kind(
        cpi.set_vm_metadata(ctx, &missing_vm, &Default::default())
            .await,
        ErrorKind::VmNotFound,
    );
    assert_kind(cpi.get_disks(ctx, &missing_vm).await, ErrorKind::VmNotFound);
    assert_kind(
        cpi.attach_disk(ctx, &missing_vm, &missing_disk).await,
        ErrorKind::VmNotFound,
    );
    assert_kind(
        cpi.detach_disk(ctx, &missing_vm, &missing_disk).await,
        ErrorKind::VmNotFound,
    );
    assert_kind(
        cpi.set_disk_metadata(ctx, &missing_disk, &Default::default())
            .await,
        ErrorKind::DiskNotFound,
    );
    cpi.delete_vm(ctx, &missing_vm)
        .await
        .expect("deleting a missing VM is success");
    cpi.delete_disk(ctx, &missing_disk)
        .await
        .expect("deleting a missing disk is success");
    cpi.delete_stemcell(ctx, &StemcellCid::new("stemcell-missing").expect("cid"))
        .await
        .expect("deleting a missing stemcell is success");
    assert_kind(
        cpi.resize_disk(ctx, &missing_disk, 2048).await,
        ErrorKind::NotSupported,
    );
    assert_kind(
        cpi.snapshot_disk(ctx, &missing_disk, &Default::default())
            .await,
        ErrorKind::NotImplemented,
    );

    // An unknown stemcell: VMCreationFailed, not retryable.
    let networks = Networks::parse(&json!({"n": {"type": "manual", "ip": "10.231.8.10", "netmask": "24", "gateway": "10.231.8.1"}}))
        .expect("networks");
    let err = assert_kind(
        cpi.create_vm(
            ctx,
            create_vm_req(
                &StemcellCid::new("stemcell-missing").expect("cid"),
                "a",
                networks.clone(),
                json!({}),
            ),
        )
        .await,
        ErrorKind::VmCreationFailed,
    );
    assert!(!err.ok_to_retry);
    assert!(err.message.contains("stemcell-missing"), "{}", err.message);

    // With a real stemcell and VM: a missing disk, a disk not attached.
    let stemcell = import_stemcell(&env, "ubuntu-jammy").await;
    let vm = cpi
        .create_vm(
            ctx,
            create_vm_req(&stemcell, "a", networks.clone(), json!({})),
        )
        .await
        .expect("create_vm")
        .cid;
    assert_kind(
        cpi.attach_disk(ctx, &vm, &missing_disk).await,
        ErrorKind::DiskNotFound,
    );
    assert_kind(
        cpi.detach_disk(ctx, &vm, &missing_disk).await,
        ErrorKind::DiskNotFound,
    );
    let disk = cpi
        .create_disk(
            ctx,
            CreateDisk {
                size_mib: 10,
                cloud_properties: Default::default(),
                vm: None,
            },
        )
        .await
        .expect("disk");
    assert_kind(
        cpi.detach_disk(ctx, &vm, &disk).await,
        ErrorKind::DiskNotAttached,
    );
    // The same manual IP twice is refused; nothing of the second VM stays.
    let vms_before = std::fs::read_dir(env.state_dir.join("vms"))
        .expect("vms")
        .count();
    let err = assert_kind(
        cpi.create_vm(
            ctx,
            create_vm_req(&stemcell, "dup", networks.clone(), json!({})),
        )
        .await,
        ErrorKind::VmCreationFailed,
    );
    assert!(
        err.message.contains("10.231.8.10") && err.message.contains(vm.as_str()),
        "{}",
        err.message
    );
    assert!(!err.message.contains("cleaning up"), "{}", err.message);
    assert_eq!(
        std::fs::read_dir(env.state_dir.join("vms"))
            .expect("vms")
            .count(),
        vms_before
    );
    // Bad cloud properties are refused before anything is made.
    let vms_before = std::fs::read_dir(env.state_dir.join("vms"))
        .expect("vms")
        .count();
    let bad_ports = create_vm_req(
        &stemcell,
        "b",
        networks.clone(),
        json!({"ports": ["nope/tcp"]}),
    );
    assert_kind(cpi.create_vm(ctx, bad_ports).await, ErrorKind::CpiError);
    assert_eq!(
        std::fs::read_dir(env.state_dir.join("vms"))
            .expect("vms")
            .count(),
        vms_before
    );

    cpi.delete_vm(ctx, &vm).await.expect("delete_vm");
    cpi.delete_disk(ctx, &disk).await.expect("delete_disk");
    cpi.delete_stemcell(ctx, &stemcell)
        .await
        .expect("delete_stemcell");
    env.assert_clean(&[vm.to_string()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_create_vm_removes_everything_it_made() {
    // Plugins that do not exist: a dynamic network's step fails after the namespace
    // and the VM directory were made.
    let run = cpi_tests::names::run_id();
    let cfg = backend_containerd::ContainerdConfig {
        namespace: format!("cpitest-{run}-failing"),
        state_dir: format!("/var/lib/bosh-container-cpi-test/{run}-failing").into(),
        cni_bin_dir: "/nonexistent/cni".into(),
        ..Default::default()
    };
    let env = TestEnv::with_config("failing", cfg, &["10.231.9.0/24", "10.231.10.0/24"]);
    let stemcell = import_stemcell(&env, "ubuntu-jammy").await;
    let networks = Networks::parse(
        &json!({"n": {"type": "dynamic", "cloud_properties": {"subnet": "10.231.10.0/24"}}}),
    )
    .expect("networks");
    let cid = failed_create(
        &env,
        &stemcell,
        "a",
        networks,
        "containernetworking-plugins",
    )
    .await;

    // A manual IPv4 network needs no plugin: the CPI makes its interface. A route
    // through a next hop outside the subnet is refused by the kernel after the veth
    // pair exists; the cleanup removes it with the rest.
    let networks = Networks::parse(&json!({"n": {"type": "manual", "ip": "10.231.9.10",
        "netmask": "24", "gateway": "10.231.9.1",
        "routes": [{"destination": "192.168.0.0", "netmask": "255.255.0.0", "gateway": "172.31.255.1"}]}}))
    .expect("networks");
    let native = failed_create(
        &env,
        &stemcell,
        "b",
        networks,
        "adding route 192.168.0.0/16 via 172.31.255.1 on eth0",
    )
    .await;
    env.cpi
        .delete_stemcell(&env.ctx, &stemcell)
        .await
        .expect("delete_stemcell");
    // No interface is left on either bridge (`assert_clean` lists their ports).
    env.assert_clean(&[cid, native]);
}

/// Runs a `create_vm` that must fail with `VMCreationFailed` and a message
/// containing `needle`, and checks what it left: no VM directory, no network
/// namespace, and a clean cleanup. Returns the VM cid the message names.
async fn failed_create(
    env: &TestEnv,
    stemcell: &StemcellCid,
    agent: &str,
    networks: Networks,
    needle: &str,
) -> String {
    let err = assert_kind(
        env.cpi
            .create_vm(
                &env.ctx,
                create_vm_req(stemcell, agent, networks, json!({})),
            )
            .await,
        ErrorKind::VmCreationFailed,
    );
    assert!(err.message.contains(needle), "{}", err.message);
    assert!(
        !err.message.contains("cleaning up"),
        "cleanup failed: {}",
        err.message
    );
    let listed = std::fs::read_dir(env.state_dir.join("vms"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(listed, 0, "a VM directory was left");
    let cid = err
        .message
        .split_whitespace()
        .find(|w| w.starts_with("vm-"))
        .map(|w| w.trim_end_matches(':').to_owned())
        .expect("the message names the VM");
    let netns = common::run("ip", &["netns", "list"]);
    assert!(!netns.contains(&cid), "{netns}");
    cid
}

/// The director retries a `create_vm` that never answered with the same agent id: the
/// retry removes the earlier attempt, found by name in the state directory's index
/// (`agents/<key>/<cid>`), also when the earlier attempt was made before the index
/// existed (an upgraded CPI) and its owner record lists no addresses.
#[tokio::test(flavor = "multi_thread")]
async fn a_retried_create_vm_replaces_its_earlier_attempt() {
    const RETRY_SUBNET: &str = "10.231.27.0/24";
    let env = TestEnv::new("retry", &[RETRY_SUBNET]);
    let (cpi, ctx) = (&env.cpi, &env.ctx);
    let stemcell = import_stemcell(&env, "ubuntu-jammy").await;
    let networks = Networks::parse(
        &json!({"default": {"type": "manual", "ip": "10.231.27.10", "netmask": "255.255.255.0",
        "gateway": "10.231.27.1", "default": ["dns", "gateway"]}}),
    )
    .expect("networks");
    let create = || {
        cpi.create_vm(
            ctx,
            create_vm_req(&stemcell, "retried", networks.clone(), json!({})),
        )
    };
    let index = env.state_dir.join("agents");
    let entries = || -> Vec<String> {
        common::files_below(&index)
            .into_iter()
            .filter(|p| p.file_name().is_some_and(|n| n != ".indexed"))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect()
    };
    let reservation = env.state_dir.join("cni/reservations/10.231.27.10");

    let first = create().await.expect("create_vm").cid;
    assert_eq!(entries(), vec![first.to_string()]);
    let second = create().await.expect("the retry").cid;
    assert_ne!(first, second);
    assert!(
        !cpi.has_vm(ctx, &first).await.expect("has_vm"),
        "the earlier attempt stays"
    );
    assert!(cpi.has_vm(ctx, &second).await.expect("has_vm"));
    assert_eq!(entries(), vec![second.to_string()]);
    assert_eq!(
        std::fs::read_to_string(&reservation).expect("reservation"),
        second.as_str()
    );

    // As an older CPI left it: no index, and an owner record without addresses.
    std::fs::remove_dir_all(&index).expect("rm index");
    let owner_path = env
        .state_dir
        .join("vms")
        .join(second.as_str())
        .join("owner.json");
    let mut owner: Value =
        serde_json::from_slice(&std::fs::read(&owner_path).expect("owner")).expect("owner json");
    assert_eq!(owner["addresses"], json!(["10.231.27.10"]));
    owner.as_object_mut().expect("object").remove("addresses");
    std::fs::write(&owner_path, serde_json::to_vec(&owner).expect("json")).expect("write owner");

    let third = create().await.expect("the retry after an upgrade").cid;
    assert!(
        !cpi.has_vm(ctx, &second).await.expect("has_vm"),
        "the earlier attempt stays"
    );
    assert!(
        index.join(".indexed").is_file(),
        "the index is not marked complete"
    );
    assert_eq!(entries(), vec![third.to_string()]);
    assert_eq!(
        std::fs::read_to_string(&reservation).expect("reservation"),
        third.as_str()
    );

    cpi.delete_vm(ctx, &third).await.expect("delete_vm");
    assert!(entries().is_empty());
    assert!(!reservation.exists());
    cpi.delete_stemcell(ctx, &stemcell)
        .await
        .expect("delete_stemcell");
    env.assert_clean(&[first.to_string(), second.to_string(), third.to_string()]);
}

/// Attach finds where a disk is mounted from the disk's record (written before the
/// bind), not by looking into every VM. A disk an older CPI mounted without writing
/// the record (an attach killed in between) is still found: the first attach over
/// such a state directory records every mounted disk's VM, once.
#[tokio::test(flavor = "multi_thread")]
async fn attach_goes_by_the_disk_record_also_over_an_older_state_directory() {
    const ATTACH_SUBNET: &str = "10.231.28.0/24";
    let env = TestEnv::new("attach-record", &[ATTACH_SUBNET]);
    let (cpi, ctx) = (&env.cpi, &env.ctx);
    let stemcell = import_stemcell(&env, "ubuntu-jammy").await;
    let vm = |agent: &'static str, host: u8| {
        let networks = Networks::parse(&json!({"default": {"type": "manual",
            "ip": format!("10.231.28.{host}"), "netmask": "255.255.255.0",
            "gateway": "10.231.28.1", "default": ["dns", "gateway"]}}))
        .expect("networks");
        cpi.create_vm(ctx, create_vm_req(&stemcell, agent, networks, json!({})))
    };
    let vm_a = vm("attach-a", 10).await.expect("create_vm a").cid;
    let vm_b = vm("attach-b", 11).await.expect("create_vm b").cid;
    let disk = cpi
        .create_disk(
            ctx,
            CreateDisk {
                size_mib: 64,
                cloud_properties: Default::default(),
                vm: None,
            },
        )
        .await
        .expect("create_disk");
    let record_path = env
        .state_dir
        .join("disks")
        .join(disk.as_str())
        .join("disk.json");
    let record = || -> Value {
        serde_json::from_slice(&std::fs::read(&record_path).expect("disk.json")).expect("json")
    };
    let set_attached_to = |value: Value| {
        let mut r = record();
        r["attached_to"] = value;
        std::fs::write(&record_path, serde_json::to_vec(&r).expect("json")).expect("write");
    };
    let mark = env.state_dir.join(".disk-attachments-recorded");
    let target = env
        .state_dir
        .join("vms")
        .join(vm_a.as_str())
        .join("disks")
        .join(disk.as_str());

    cpi.attach_disk(ctx, &vm_a, &disk).await.expect("attach");
    assert_eq!(record()["attached_to"], json!(vm_a.as_str()));
    assert!(mark.is_file(), "the first attach leaves the mark");

    // As an older CPI killed between its bind and its record left it.
    set_attached_to(Value::Null);
    std::fs::remove_file(&mark).expect("rm mark");
    let refused = assert_kind(
        cpi.attach_disk(ctx, &vm_b, &disk).await,
        ErrorKind::CloudError,
    );
    assert!(
        refused.message.contains(vm_a.as_str()),
        "{}",
        refused.message
    );
    assert_eq!(
        record()["attached_to"],
        json!(vm_a.as_str()),
        "the record was not mended"
    );
    assert!(mark.is_file());

    // The VM asking is looked at as well: no second bind on the same mount point.
    set_attached_to(Value::Null);
    cpi.attach_disk(ctx, &vm_a, &disk)
        .await
        .expect("attach again");
    assert_eq!(record()["attached_to"], json!(vm_a.as_str()));
    let stacked = std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter(|l| l.split_whitespace().nth(4) == Some(target.to_str().expect("utf-8")))
        .count();
    assert_eq!(stacked, 1, "mounts at {}", target.display());

    cpi.detach_disk(ctx, &vm_a, &disk).await.expect("detach");
    cpi.attach_disk(ctx, &vm_b, &disk)
        .await
        .expect("attach to b");
    assert_eq!(record()["attached_to"], json!(vm_b.as_str()));
    cpi.detach_disk(ctx, &vm_b, &disk)
        .await
        .expect("detach from b");
    for v in [&vm_a, &vm_b] {
        cpi.delete_vm(ctx, v).await.expect("delete_vm");
    }
    cpi.delete_disk(ctx, &disk).await.expect("delete_disk");
    cpi.delete_stemcell(ctx, &stemcell)
        .await
        .expect("delete_stemcell");
    env.assert_clean(&[vm_a.to_string(), vm_b.to_string()]);
}

/// `create_vm` records the VM's init. `delete_vm` stops a VM by that record without
/// looking the task up first, also when the task has stopped already, and by asking
/// containerd when the record is missing (a VM an older CPI made).
#[tokio::test(flavor = "multi_thread")]
async fn delete_vm_stops_a_vm_by_its_init_record_or_by_asking_containerd() {
    const STOP_SUBNET: &str = "10.231.29.0/24";
    let env = TestEnv::new("stop", &[STOP_SUBNET]);
    let (cpi, ctx) = (&env.cpi, &env.ctx);
    let stemcell = import_stemcell(&env, "ubuntu-jammy").await;
    let network = |host: u8| {
        Networks::parse(&json!({"default": {"type": "manual",
            "ip": format!("10.231.29.{host}"), "netmask": "255.255.255.0",
            "gateway": "10.231.29.1", "default": ["dns", "gateway"]}}))
        .expect("networks")
    };
    let mut made = Vec::new();
    let create = |host: u8| {
        let req = create_vm_req(&stemcell, &format!("stop-{host}"), network(host), json!({}));
        async move { cpi.create_vm(ctx, req).await.expect("create_vm").cid }
    };
    let init_record = |vm: &VmCid| env.state_dir.join("vms").join(vm.as_str()).join("init");

    // Recorded, running.
    let recorded = create(10).await;
    made.push(recorded.to_string());
    assert_eq!(
        std::fs::read_to_string(init_record(&recorded)).expect("init record"),
        "runit"
    );
    env.running_pid(recorded.as_str());
    cpi.delete_vm(ctx, &recorded).await.expect("delete_vm");
    assert!(!cpi.has_vm(ctx, &recorded).await.expect("has_vm"));

    // Recorded, its task stopped already (the init killed from outside).
    let stopped = create(11).await;
    made.push(stopped.to_string());
    env.running_pid(stopped.as_str());
    env.ctr(&["tasks", "kill", "--signal", "SIGKILL", stopped.as_str()]);
    let mut status = String::new();
    for _ in 0..100 {
        status = env.task(stopped.as_str()).map(|t| t.1).unwrap_or_default();
        if status == "STOPPED" {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(status, "STOPPED", "the killed init's task");
    cpi.delete_vm(ctx, &stopped)
        .await
        .expect("delete_vm of a stopped VM");
    assert!(!cpi.has_vm(ctx, &stopped).await.expect("has_vm"));
    cpi.delete_vm(ctx, &stopped)
        .await
        .expect("delete_vm again: nothing left is success");

    // Without the record, as an older CPI made it.
    let unrecorded = create(12).await;
    made.push(unrecorded.to_string());
    std::fs::remove_file(init_record(&unrecorded)).expect("rm init record");
    env.running_pid(unrecorded.as_str());
    cpi.delete_vm(ctx, &unrecorded).await.expect("delete_vm");
    assert!(!cpi.has_vm(ctx, &unrecorded).await.expect("has_vm"));

    cpi.delete_stemcell(ctx, &stemcell)
        .await
        .expect("delete_stemcell");
    env.assert_clean(&made);
}
