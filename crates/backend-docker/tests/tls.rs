//! tcp + mutual TLS for real: a TLS-terminating proxy (requiring a client
//! certificate from the test CA) in front of the local daemon's unix socket, and the
//! backend connecting with the PEM material from its config. Over tcp the daemon
//! counts as remote, so this is also the remote-daemon path: `Privileged` first, the
//! capability probe when the runtime refuses, and live attach through helpers.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use backend_docker::config::TlsConfig;
use backend_docker::{DockerConfig, DockerCpi};
use cpi_core::{
    AgentId, AgentOptions, CallContext, Cpi, CreateDisk, CreateStemcell, CreateVm, ErrorKind,
    Networks, VmCid, VmCloudProperties,
};
use cpi_tests::daemons::{require_docker, DOCKER_SOCKET};
use cpi_tests::stemcell::TestStemcell;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use tokio_rustls::rustls;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (Debian package openssl) is needed for this test");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, signed by `ca`.
fn make_pki(dir: &Path, ca: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={ca}"),
            "-keyout",
            &format!("{ca}-key.pem"),
            "-out",
            &format!("{ca}.pem"),
        ],
    );
    for (name, ext) in [
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{ca}-{name}-key.pem"),
                "-out",
                &format!("{ca}-{name}.csr"),
            ],
        );
        std::fs::write(dir.join(format!("{name}.ext")), ext).expect("ext");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{ca}-{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}-key.pem"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{ca}-{name}.pem"),
            ],
        );
    }
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).expect(name)
}

/// Serves TLS (client certificate required) on 127.0.0.1:<port>, forwarding to the
/// daemon's unix socket. Returns the port.
async fn tls_proxy(dir: &Path) -> u16 {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("ca.pem")).expect("ca") {
        roots.add(c.expect("ca cert")).expect("add");
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .expect("verifier");
    let certs: Vec<_> = CertificateDer::pem_file_iter(dir.join("ca-server.pem"))
        .expect("server cert")
        .map(|c| c.expect("cert"))
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("ca-server-key.pem")).expect("server key");
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut unix) = tokio::net::UnixStream::connect(DOCKER_SOCKET).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut unix).await;
            });
        }
    });
    port
}

fn backend(port: u16, dir: &Path, client_prefix: &str, base: &DockerConfig) -> DockerCpi {
    DockerCpi::new(
        DockerConfig {
            host: format!("tcp://127.0.0.1:{port}"),
            tls: Some(TlsConfig {
                ca: read(dir, "ca.pem"),
                certificate: read(dir, &format!("{client_prefix}-client.pem")),
                private_key: read(dir, &format!("{client_prefix}-client-key.pem")),
            }),
            timeout_seconds: 20,
            ..base.clone()
        },
        AgentOptions {
            mbus: "https://mbus:pw@0.0.0.0:6868".into(),
            ntp: vec![],
        },
    )
    .expect("backend")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_with_mutual_tls_is_a_remote_daemon() {
    let h = common::Harness::new("dtls", backend_docker::config::AttachMode::Auto);
    require_docker();
    let dir = tempfile::tempdir().expect("tempdir");
    make_pki(dir.path(), "ca");
    make_pki(dir.path(), "rogue");
    let port = tls_proxy(dir.path()).await;
    let ctx = &h.ctx;
    let vm = VmCid::new("c-00000000-0000-0000-0000-0000000000ff").expect("cid");

    let cpi = backend(port, dir.path(), "ca", h.cpi.config());
    assert!(!cpi.has_vm(ctx, &vm).await.expect("has_vm over mutual TLS"));
    let client = cpi.client().await.expect("client");
    assert!(!client.unix);
    assert!(
        client.api_version() >= (1, 41),
        "negotiated {:?}",
        client.api_version()
    );
    assert_eq!(cpi.mounter(client), backend_docker::Mounter::Helper);

    // A client certificate from another CA is refused; the error names the endpoint.
    let rogue = backend(port, dir.path(), "rogue", h.cpi.config());
    let err = rogue
        .has_vm(&CallContext::default(), &vm)
        .await
        .expect_err("untrusted client");
    assert_eq!(err.kind, ErrorKind::CloudError);
    assert!(
        err.message.contains(&format!("tcp://127.0.0.1:{port}")),
        "{}",
        err.message
    );

    // The whole remote path: import over TLS, create (Privileged is refused by this
    // runtime, so the capability probe runs), attach live through a helper.
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
        .expect("create_stemcell over TLS");
    let created = cpi
        .create_vm(
            ctx,
            CreateVm {
                agent_id: AgentId::new("agent-t").expect("agent"),
                stemcell: sc.clone(),
                cloud_properties: VmCloudProperties::default(),
                networks: Networks::parse(&json!({"d": {"type": "dynamic"}})).expect("nets"),
                disk_cids: vec![],
                env: json!({}),
            },
        )
        .await
        .expect("create_vm on a remote daemon with a constrained runtime");
    let v = created.cid;
    assert_eq!(
        common::inspect(v.as_str(), "{{.HostConfig.Privileged}}"),
        "false"
    );
    assert_eq!(
        common::inspect(
            v.as_str(),
            "{{index .Config.Labels \"bosh-container-cpi.privilege\"}}"
        ),
        "capabilities"
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
        .expect("create_disk");
    let before = common::pid1(v.as_str());
    cpi.attach_disk(ctx, &v, &disk)
        .await
        .expect("attach_disk through a helper");
    assert_eq!(common::pid1(v.as_str()), before);
    common::exec(v.as_str(), &format!("touch /warden-cpi-dev/{disk}/remote"));
    assert_eq!(
        cpi.get_disks(ctx, &v).await.expect("get_disks"),
        vec![disk.clone()]
    );
    cpi.delete_vm(ctx, &v).await.expect("delete_vm");
    cpi.delete_disk(ctx, &disk).await.expect("delete_disk");
    cpi.delete_stemcell(ctx, &sc)
        .await
        .expect("delete_stemcell");
    h.assert_clean();
}
