//! Light stemcells against a real containerd and the local registry at
//! 127.0.0.1:5000 (`scripts/lib.sh start_registry`): the test pushes its own image
//! (the test stemcell's root filesystem as one layer), imports it by digest, boots a
//! VM from it, and checks that unverifiable or mismatched images leave nothing.

mod common;

use std::io::Read;
use std::str::FromStr;

use backend_containerd::ContainerdConfig;
use common::{assert_kind, in_vm, TestEnv};
use cpi_core::{AgentId, Cpi, CreateStemcell, CreateVm, ErrorKind, Networks, VmCloudProperties};
use cpi_tests::daemons::{require_registry, LOCAL_REGISTRY};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::json;
use sha2::Digest;

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", sha2::Sha256::digest(bytes))
}

/// Pushes the test stemcell's root filesystem as a one-layer OCI image; returns the
/// reference pushed and the manifest digest.
///
/// The layer carries `tag` as its stemcell version, so every test pushes blobs of its
/// own: Debian's registry (distribution 2.8) can fail concurrent pushes of one blob
/// ("provided digest did not match uploaded content", "blob unknown to registry").
async fn push_test_image(tag: &str) -> (String, String) {
    let layer = cpi_tests::TestStemcell::builder()
        .version(tag)
        .write_image(Vec::new())
        .expect("image");
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(&layer[..])
        .read_to_end(&mut plain)
        .expect("gunzip");
    let config = json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha256(&plain)]}, "config": {}});
    let reference = format!("{LOCAL_REGISTRY}/cpi-test/containerd-light:{tag}");
    // The registry client is built without a crypto provider of its own (as the
    // backend's is); ring is the one compiled in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(vec![LOCAL_REGISTRY.to_owned()]),
        ..Default::default()
    });
    let image = Reference::from_str(&reference).expect("reference");
    client
        .push(
            &image,
            &[ImageLayer::new(
                layer,
                "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                None,
            )],
            Config::new(
                serde_json::to_vec(&config).expect("json"),
                "application/vnd.oci.image.config.v1+json".into(),
                None,
            ),
            &RegistryAuth::Anonymous,
            None,
        )
        .await
        .expect("push to the local registry");
    let (bytes, _) = client
        .pull_manifest_raw(
            &image,
            &RegistryAuth::Anonymous,
            &["application/vnd.oci.image.manifest.v1+json"],
        )
        .await
        .expect("manifest");
    (reference, sha256(&bytes))
}

fn config(name: &str, verify: bool) -> ContainerdConfig {
    let run = cpi_tests::names::run_id();
    ContainerdConfig {
        namespace: format!("cpitest-{run}-{name}"),
        state_dir: format!("/var/lib/bosh-container-cpi-test/{run}-{name}").into(),
        stop_grace_seconds: 3,
        insecure_registries: vec![LOCAL_REGISTRY.to_owned()],
        require_image_verification: verify,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn light_stemcell_pulled_by_digest_boots_a_vm() {
    require_registry();
    let env = TestEnv::with_config("light", config("light", true), &["10.231.30.0/24"]);
    let tag = cpi_tests::names::run_id();
    let (reference, digest) = push_test_image(tag).await;
    let dir = env.scratch.path().join("light");
    let sc = cpi_tests::TestStemcell::light(&reference)
        .digest(Some(digest.clone()))
        .build_unpacked(&dir);
    let cid = env
        .cpi
        .create_stemcell(
            &env.ctx,
            CreateStemcell {
                image_path: sc.image_path.clone(),
                cloud_properties: Default::default(),
            },
        )
        .await
        .expect("create_stemcell (light)");
    assert_eq!(
        cid.as_str(),
        format!("{LOCAL_REGISTRY}/cpi-test/containerd-light@{digest}")
    );
    // Importing it again answers the same cid.
    let again = env
        .cpi
        .create_stemcell(
            &env.ctx,
            CreateStemcell {
                image_path: sc.image_path,
                cloud_properties: Default::default(),
            },
        )
        .await
        .expect("create_stemcell again");
    assert_eq!(again, cid);

    let vm = env
        .cpi
        .create_vm(
            &env.ctx,
            CreateVm {
                agent_id: AgentId::new("agent-light").expect("id"),
                stemcell: cid.clone(),
                cloud_properties: VmCloudProperties::default(),
                networks: Networks::parse(&json!({"n": {"type": "manual", "ip": "10.231.30.10",
                    "netmask": "255.255.255.0", "gateway": "10.231.30.1"}}))
                .expect("networks"),
                disk_cids: vec![],
                env: json!({}),
            },
        )
        .await
        .expect("create_vm from a light stemcell")
        .cid;
    let pid = env.running_pid(vm.as_str());
    let settings = in_vm(pid, "/var/vcap/bosh/warden-cpi-agent-env.json");
    assert!(settings.is_file(), "no agent settings in the VM");
    env.cpi.delete_vm(&env.ctx, &vm).await.expect("delete_vm");
    env.cpi
        .delete_stemcell(&env.ctx, &cid)
        .await
        .expect("delete_stemcell");
    env.assert_clean(&[vm.to_string()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn unverifiable_or_wrong_digests_are_refused_and_leave_nothing() {
    require_registry();
    let env = TestEnv::with_config("lightbad", config("lightbad", true), &[]);
    let tag = format!("{}-bad", cpi_tests::names::run_id());
    let (reference, _digest) = push_test_image(&tag).await;

    // No digest while verification is required: a request error.
    let dir = env.scratch.path().join("nodigest");
    let sc = cpi_tests::TestStemcell::light(&reference)
        .digest(None)
        .build_unpacked(&dir);
    let err = assert_kind(
        env.cpi
            .create_stemcell(
                &env.ctx,
                CreateStemcell {
                    image_path: sc.image_path,
                    cloud_properties: Default::default(),
                },
            )
            .await,
        ErrorKind::CpiError,
    );
    assert!(
        err.message.contains("require_image_verification"),
        "{}",
        err.message
    );

    // A digest the registry does not have for that repository.
    let wrong = sha256(b"not the image");
    let dir = env.scratch.path().join("wrong");
    let sc = cpi_tests::TestStemcell::light(&reference)
        .digest(Some(wrong))
        .build_unpacked(&dir);
    let err = env
        .cpi
        .create_stemcell(
            &env.ctx,
            CreateStemcell {
                image_path: sc.image_path,
                cloud_properties: Default::default(),
            },
        )
        .await
        .expect_err("wrong digest");
    assert_eq!(err.kind, ErrorKind::CloudError, "{}", err.message);
    env.assert_clean(&[]);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_verification_a_tag_is_pulled_and_pinned() {
    require_registry();
    let env = TestEnv::with_config("lighttag", config("lighttag", false), &[]);
    let tag = format!("{}-tag", cpi_tests::names::run_id());
    let (reference, digest) = push_test_image(&tag).await;
    let dir = env.scratch.path().join("tag");
    let sc = cpi_tests::TestStemcell::light(&reference)
        .digest(None)
        .build_unpacked(&dir);
    let cid = env
        .cpi
        .create_stemcell(
            &env.ctx,
            CreateStemcell {
                image_path: sc.image_path,
                cloud_properties: Default::default(),
            },
        )
        .await
        .expect("create_stemcell by tag");
    assert!(cid.as_str().ends_with(&format!("@{digest}")), "{cid}");
    env.cpi
        .delete_stemcell(&env.ctx, &cid)
        .await
        .expect("delete_stemcell");
    env.assert_clean(&[]);
}
