//! Light stemcells against the local registry (127.0.0.1:5000, started by
//! `scripts/lib.sh start_registry`): pull by digest, verification, mismatch, and a
//! VM booted from the pulled image (its init found from the image's os-release).

mod common;

use backend_docker::config::AttachMode;
use backend_docker::{DockerConfig, DockerCpi};
use common::{inspect, Harness};
use cpi_core::{AgentId, Cpi, CreateStemcell, CreateVm, Networks, VmCloudProperties};
use cpi_tests::daemons::{docker, require_registry, LOCAL_REGISTRY};
use cpi_tests::stemcell::TestStemcell;
use serde_json::json;

fn light(h: &Harness, name: &str, reference: &str, digest: Option<String>) -> CreateStemcell {
    let unpacked = TestStemcell::light(reference)
        .os("ubuntu-noble")
        .digest(digest)
        .build_unpacked(h.work.path().join(name));
    CreateStemcell {
        image_path: unpacked.image_path,
        cloud_properties: Default::default(),
    }
}

#[tokio::test]
async fn light_stemcells_pull_by_digest_and_verify() {
    let h = Harness::new("dlight", AttachMode::Local);
    require_registry();
    let ctx = &h.ctx;
    let cpi = &h.cpi;

    // Push a stemcell root file system (Noble: systemd) to the registry.
    let full = TestStemcell::builder()
        .os("ubuntu-noble")
        .build_unpacked(h.work.path().join("full"));
    let repo = format!("{LOCAL_REGISTRY}/{}/stemcell", h.director);
    let tagged = format!("{repo}:1");
    docker(&["import", &full.image_path.display().to_string(), &tagged]).expect_success();
    docker(&["push", &tagged]).expect_success();
    let repo_digest = inspect(&tagged, "{{index .RepoDigests 0}}");
    let digest = repo_digest.split('@').nth(1).expect("digest").to_owned();
    docker(&["rmi", &tagged]).expect_success();

    // Pull by digest: the cid is the immutable reference.
    let cid = cpi
        .create_stemcell(ctx, light(&h, "good", &tagged, Some(digest.clone())))
        .await
        .expect("create_stemcell");
    assert_eq!(cid.as_str(), format!("{repo}@{digest}"));

    // A VM from it: no labels on a pulled image, so the init comes from os-release.
    let created = cpi
        .create_vm(
            ctx,
            CreateVm {
                agent_id: AgentId::new("agent-l").expect("agent"),
                stemcell: cid.clone(),
                cloud_properties: VmCloudProperties::default(),
                networks: Networks::parse(&json!({"d": {"type": "dynamic"}})).expect("nets"),
                disk_cids: vec![],
                env: json!({}),
            },
        )
        .await
        .expect("create_vm");
    let vm = created.cid;
    assert_eq!(
        inspect(
            vm.as_str(),
            "{{index .Config.Labels \"bosh-container-cpi.init\"}}"
        ),
        "systemd"
    );
    assert_eq!(inspect(vm.as_str(), "{{.Config.StopSignal}}"), "SIGRTMIN+3");
    // The prelude waits for the final settings (dynamic network) before it execs the
    // init; wait for that before reading what the init wrote.
    common::pid1(vm.as_str());
    let init_log = common::exec(vm.as_str(), "cat /var/vcap/data/sys/stand-in-init.log");
    assert!(init_log.contains("/sbin/init"), "{init_log}");
    cpi.delete_vm(ctx, &vm).await.expect("delete_vm");
    cpi.delete_stemcell(ctx, &cid)
        .await
        .expect("delete_stemcell");
    cpi.delete_stemcell(ctx, &cid)
        .await
        .expect("delete_stemcell is idempotent");

    // No digest while verification is required: refused before pulling.
    let err = cpi
        .create_stemcell(ctx, light(&h, "nodigest", &tagged, None))
        .await
        .expect_err("no digest");
    assert!(
        err.message.contains("require_image_verification"),
        "{}",
        err.message
    );

    // A digest the registry does not have: refused, nothing left.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let err = cpi
        .create_stemcell(ctx, light(&h, "wrong", &tagged, Some(wrong)))
        .await
        .expect_err("wrong digest");
    assert!(err.message.contains(&repo), "{}", err.message);
    let left = docker(&["images", "-q", &repo]).expect_success();
    assert!(left.is_empty(), "nothing pulled stays: {left}");

    // Light stemcells can be refused by config.
    let strict = DockerCpi::new(
        DockerConfig {
            light_stemcell: backend_docker::config::LightStemcellConfig {
                disabled: true,
                ..Default::default()
            },
            ..h.cpi.config().clone()
        },
        h.cpi.agent().clone(),
    )
    .expect("backend");
    assert!(!strict
        .stemcell_formats()
        .contains(&"docker-light".to_owned()));
    let err = strict
        .create_stemcell(ctx, light(&h, "disabled", &tagged, Some(digest)))
        .await
        .expect_err("disabled");
    assert!(
        err.message.contains("light_stemcell.disabled"),
        "{}",
        err.message
    );

    h.assert_clean();
}
