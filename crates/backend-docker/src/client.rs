//! The connection to the Docker daemon: unix socket or tcp (with mutual TLS), with
//! the API version negotiated, and the few facts about the daemon's host that VM
//! specs depend on.
//!
//! Connections are made lazily by the first call that needs the daemon (`info`
//! never does), once per process.

use std::path::{Path, PathBuf};

use bollard::{ClientVersion, Docker, API_DEFAULT_VERSION};
use tempfile::TempDir;

use crate::config::DockerConfig;
use crate::error::{DockerError, Result};

/// Where the daemon is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket path.
    Unix(PathBuf),
    /// `host:port` over TLS.
    Tls(String),
    /// `host:port` over plain HTTP (no `tls` in the config).
    Http(String),
}

impl Endpoint {
    /// Parses `host` from the config.
    pub fn parse(host: &str) -> Result<Endpoint> {
        let host = host.trim();
        if let Some(path) = host.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(DockerError::Config(format!(
                    "host {host:?} names no socket path; use unix:///var/run/docker.sock"
                )));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if host.starts_with('/') {
            return Ok(Endpoint::Unix(PathBuf::from(host)));
        }
        for (scheme, tls) in [
            ("tcp://", None),
            ("https://", Some(true)),
            ("http://", Some(false)),
        ] {
            if let Some(addr) = host.strip_prefix(scheme) {
                let addr = addr.trim_end_matches('/');
                if addr.is_empty() || !addr.contains(':') {
                    return Err(DockerError::Config(format!(
                        "host {host:?} needs a port, e.g. tcp://10.0.0.5:2376"
                    )));
                }
                return Ok(match tls {
                    Some(false) => Endpoint::Http(addr.to_owned()),
                    _ => Endpoint::Tls(addr.to_owned()),
                });
            }
        }
        Err(DockerError::Config(format!(
            "host {host:?} is not understood; use unix:///path/to/docker.sock or tcp://host:port"
        )))
    }
}

/// A parsed API version preference such as `"1.44"`.
pub fn parse_api_version(v: &str) -> Result<ClientVersion> {
    let v = v.trim().trim_start_matches('v');
    let (major, minor) = v
        .split_once('.')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .ok_or_else(|| {
            DockerError::Config(format!(
                "api_version {v:?} is not of the form 1.41 (or leave it out to negotiate)"
            ))
        })?;
    Ok(ClientVersion {
        major_version: major,
        minor_version: minor,
    })
}

/// A connected client.
pub struct Client {
    /// The bollard handle.
    pub docker: Docker,
    /// The endpoint as configured, for messages.
    pub endpoint: String,
    /// Whether the daemon is reached over a unix socket (so it runs on this kernel).
    pub unix: bool,
    /// Keeps the TLS material bollard reads from files alive as long as the client.
    _tls_dir: Option<TempDir>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.endpoint)
            .field("api_version", &self.docker.client_version())
            .finish()
    }
}

impl Client {
    /// Connects and negotiates the API version: over a unix socket from the
    /// `Api-Version` header of `GET /_ping` (a fraction of a millisecond), otherwise
    /// with bollard's `GET /version` (4–7 ms on Engine 20.10: the daemon collects its
    /// components' versions, containerd's and runc's included). Either way the version
    /// used is the lower of the daemon's and `api_version` from the config.
    pub async fn connect(config: &DockerConfig) -> Result<Client> {
        let endpoint = Endpoint::parse(&config.host)?;
        let preferred = match config
            .api_version
            .as_deref()
            .filter(|v| !v.trim().is_empty())
        {
            Some(v) => parse_api_version(v)?,
            None => *API_DEFAULT_VERSION,
        };
        let timeout = config.timeout_seconds.max(1);
        let host_text = config.host.clone();
        let connect_err = |source| DockerError::Connect {
            endpoint: host_text.clone(),
            source,
        };
        let (docker, tls_dir) = match &endpoint {
            Endpoint::Unix(path) => {
                // The version from `/_ping` when the daemon says it (every supported
                // Engine does); bollard's `/version` negotiation otherwise.
                if let Some(server) = ping_api_version(path, timeout).await {
                    let version = lower_version(server, preferred);
                    let docker =
                        Docker::connect_with_unix(&path.to_string_lossy(), timeout, &version)
                            .map_err(connect_err)?;
                    tracing::debug!(endpoint = %host_text, api_version = %docker.client_version(), "connected to Docker (API version from /_ping)");
                    return Ok(Client {
                        docker,
                        endpoint: host_text,
                        unix: true,
                        _tls_dir: None,
                    });
                }
                (
                    Docker::connect_with_unix(&path.to_string_lossy(), timeout, &preferred)
                        .map_err(connect_err)?,
                    None,
                )
            }
            Endpoint::Http(addr) => {
                tracing::warn!(endpoint = %host_text, "connecting to Docker over plain HTTP: configure `tls` to protect the daemon");
                (
                    Docker::connect_with_http(addr, timeout, &preferred).map_err(connect_err)?,
                    None,
                )
            }
            Endpoint::Tls(addr) => {
                let Some(tls) = &config.tls else {
                    tracing::warn!(endpoint = %host_text, "tcp host without `tls`: connecting over plain HTTP; configure `tls` (ca, certificate, private_key) to protect the daemon");
                    return Self::finish(
                        Docker::connect_with_http(addr, timeout, &preferred)
                            .map_err(connect_err)?,
                        host_text,
                        false,
                        None,
                    )
                    .await;
                };
                let dir = write_tls_material(tls)?;
                // bollard builds its rustls config with the process-wide provider.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let docker = Docker::connect_with_ssl(
                    addr,
                    &dir.path().join("key.pem"),
                    &dir.path().join("cert.pem"),
                    &dir.path().join("ca.pem"),
                    timeout,
                    &preferred,
                )
                .map_err(connect_err)?;
                (docker, Some(dir))
            }
        };
        let unix = matches!(endpoint, Endpoint::Unix(_));
        Self::finish(docker, host_text, unix, tls_dir).await
    }

    async fn finish(
        docker: Docker,
        endpoint: String,
        unix: bool,
        tls_dir: Option<TempDir>,
    ) -> Result<Client> {
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|source| DockerError::Connect {
                endpoint: endpoint.clone(),
                source,
            })?;
        tracing::debug!(endpoint = %endpoint, api_version = %docker.client_version(), "connected to Docker");
        Ok(Client {
            docker,
            endpoint,
            unix,
            _tls_dir: tls_dir,
        })
    }

    /// Wraps a bollard error with the endpoint and what we were doing.
    pub fn err(
        &self,
        what: impl Into<String>,
    ) -> impl FnOnce(bollard::errors::Error) -> DockerError + '_ {
        let what = what.into();
        move |source| DockerError::api(&self.endpoint, what, source)
    }

    /// The negotiated API version as `(major, minor)`.
    pub fn api_version(&self) -> (usize, usize) {
        let v = self.docker.client_version();
        (v.major_version, v.minor_version)
    }
}

/// `GET /_ping` on the unix socket at `path`, and the daemon's API version from the
/// `Api-Version` response header; `None` when anything goes wrong (the caller then
/// negotiates with `GET /version`, which reports the failure properly).
async fn ping_api_version(path: &Path, timeout_secs: u64) -> Option<ClientVersion> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(path).await.ok()?;
        stream
            .write_all(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        // The head is a few hundred bytes; the body is "OK".
        let mut head = Vec::with_capacity(1024);
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        api_version_of_ping(&String::from_utf8_lossy(&head))
    };
    tokio::time::timeout(std::time::Duration::from_secs(timeout_secs), exchange)
        .await
        .ok()
        .flatten()
}

/// The `Api-Version` header of a successful `/_ping` response head.
fn api_version_of_ping(head: &str) -> Option<ClientVersion> {
    let mut lines = head.split("\r\n");
    let status = lines.next()?;
    if status.split(' ').nth(1) != Some("200") {
        return None;
    }
    lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("api-version"))
        .and_then(|(_, value)| parse_api_version(value).ok())
}

/// The lower of two API versions.
fn lower_version(a: ClientVersion, b: ClientVersion) -> ClientVersion {
    if (a.major_version, a.minor_version) <= (b.major_version, b.minor_version) {
        a
    } else {
        b
    }
}

/// Writes the PEM material into a fresh private (0700) directory: bollard's TLS
/// connector reads files. The directory disappears with the client.
fn write_tls_material(tls: &crate::config::TlsConfig) -> Result<TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("bosh-container-cpi-tls-")
        .tempdir()
        .map_err(|e| {
            DockerError::io(
                "creating a private directory for the TLS material",
                std::env::temp_dir(),
                e,
            )
        })?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
        .map_err(|e| DockerError::io("restricting", dir.path(), e))?;
    for (name, pem, what) in [
        ("ca.pem", &tls.ca, "tls.ca"),
        ("cert.pem", &tls.certificate, "tls.certificate"),
        ("key.pem", &tls.private_key, "tls.private_key"),
    ] {
        if !pem.contains("-----BEGIN") {
            return Err(DockerError::Config(format!(
                "{what} is not PEM text (expected a -----BEGIN ...----- block)"
            )));
        }
        write_private(&dir.path().join(name), pem.as_bytes())?;
    }
    Ok(dir)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| DockerError::io("writing TLS material to", path, e))?;
    f.write_all(bytes)
        .map_err(|e| DockerError::io("writing TLS material to", path, e))
}

/// Facts about the daemon's host that VM specs depend on, from `GET /info`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DaemonFacts {
    /// 1 or 2.
    pub cgroup_version: u8,
    /// Whether AppArmor is enabled on the daemon's host.
    pub apparmor: bool,
    /// The daemon's architecture (`x86_64`, `aarch64`).
    pub architecture: String,
    /// The storage driver (`overlay2`).
    pub storage_driver: String,
    /// The daemon's data root (`/var/lib/docker`).
    pub root_dir: String,
}

impl DaemonFacts {
    /// Reads the facts from `GET /info`.
    pub async fn probe(client: &Client) -> Result<DaemonFacts> {
        let info = client
            .docker
            .info()
            .await
            .map_err(client.err("reading daemon info (GET /info)"))?;
        let cgroup_version = match info.cgroup_version.map(|v| v.to_string()) {
            Some(v) if v.contains('2') => 2,
            _ => 1,
        };
        let apparmor = info
            .security_options
            .unwrap_or_default()
            .iter()
            .any(|o| o.contains("apparmor"));
        Ok(DaemonFacts {
            cgroup_version,
            apparmor,
            architecture: info.architecture.unwrap_or_default(),
            storage_driver: info.driver.unwrap_or_default(),
            root_dir: info.docker_root_dir.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts() {
        assert_eq!(
            Endpoint::parse("unix:///var/run/docker.sock").ok(),
            Some(Endpoint::Unix("/var/run/docker.sock".into()))
        );
        assert_eq!(
            Endpoint::parse("/run/docker.sock").ok(),
            Some(Endpoint::Unix("/run/docker.sock".into()))
        );
        assert_eq!(
            Endpoint::parse("tcp://10.0.0.5:2376").ok(),
            Some(Endpoint::Tls("10.0.0.5:2376".into()))
        );
        assert_eq!(
            Endpoint::parse("http://10.0.0.5:2375/").ok(),
            Some(Endpoint::Http("10.0.0.5:2375".into()))
        );
        for bad in [
            "unix://",
            "tcp://nohost",
            "ssh://me@box",
            "npipe:////./pipe/docker",
        ] {
            let err = Endpoint::parse(bad).expect_err(bad).to_string();
            assert!(err.contains("host"), "{err}");
        }
    }

    #[test]
    fn parses_api_versions() {
        let v = parse_api_version("1.44").expect("v");
        assert_eq!((v.major_version, v.minor_version), (1, 44));
        assert!(parse_api_version("latest").is_err());
    }

    #[test]
    fn api_version_from_a_ping() {
        let head = "HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nDocker-Experimental: false\r\nOstype: linux\r\n\r\nOK";
        let v = api_version_of_ping(head).expect("version");
        assert_eq!((v.major_version, v.minor_version), (1, 41));
        let lower = "HTTP/1.0 200 OK\r\napi-version:1.24\r\n\r\n";
        assert_eq!(
            api_version_of_ping(lower).map(|v| v.minor_version),
            Some(24)
        );
        assert!(api_version_of_ping(
            "HTTP/1.1 500 Internal Server Error\r\nApi-Version: 1.41\r\n\r\n"
        )
        .is_none());
        assert!(
            api_version_of_ping("HTTP/1.1 200 OK\r\nServer: x\r\n\r\nApi-Version: 1.41").is_none()
        );
        assert!(api_version_of_ping("").is_none());
        let pinned = parse_api_version("1.40").expect("v");
        let server = parse_api_version("1.41").expect("v");
        assert_eq!(lower_version(server, pinned), pinned);
        assert_eq!(lower_version(pinned, server), pinned);
    }

    #[test]
    fn tls_material_is_private_and_checked() {
        use std::os::unix::fs::PermissionsExt;
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let dir = write_tls_material(&crate::config::TlsConfig {
            ca: pem.into(),
            certificate: pem.into(),
            private_key: "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n".into(),
        })
        .expect("written");
        let mode = std::fs::metadata(dir.path().join("key.pem"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = write_tls_material(&crate::config::TlsConfig {
            ca: "nope".into(),
            certificate: pem.into(),
            private_key: pem.into(),
        })
        .expect_err("not pem");
        assert!(err.to_string().contains("tls.ca"), "{err}");
    }
}
