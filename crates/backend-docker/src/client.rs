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
    /// Whether the API version came from [`REMEMBERED_VERSION_FILE`] rather than
    /// from asking the daemon.
    pub remembered: bool,
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
    ///
    /// Over a unix socket the version `/_ping` answered is remembered in the state
    /// directory for [`Client::connect_remembered`].
    pub async fn connect(config: &DockerConfig) -> Result<Client> {
        let endpoint = Endpoint::parse(&config.host)?;
        let preferred = preferred_version(config)?;
        let timeout = config.timeout_seconds.max(1);
        let host_text = config.host.clone();
        let connect_err = |source| DockerError::Connect {
            endpoint: host_text.clone(),
            source,
        };
        let (docker, tls_dir) = match &endpoint {
            Endpoint::Unix(path) => {
                // The version from `/_ping` when the daemon says it (every supported
                // Engine does); bollard's `/version` negotiation otherwise. The
                // socket's identity is taken before the ping: a daemon restarting in
                // between is then remembered under the old socket, which no later
                // call matches.
                let identity = SocketIdentity::of(path);
                if let Some(server) = ping_api_version(path, timeout).await {
                    if let Some(identity) = identity {
                        remember_version(&config.state_dir, path, identity, server);
                    }
                    return Self::on_socket(config, path, server, false);
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
        // bollard's `/version` goes out unversioned (see [`versioned`]), so the
        // negotiation works whatever version the client starts with.
        let docker =
            versioned(
                docker
                    .negotiate_version()
                    .await
                    .map_err(|source| DockerError::Connect {
                        endpoint: endpoint.clone(),
                        source,
                    })?,
            );
        tracing::debug!(endpoint = %endpoint, api_version = %docker.client_version(), "connected to Docker");
        Ok(Client {
            docker,
            endpoint,
            unix,
            remembered: false,
            _tls_dir: tls_dir,
        })
    }

    /// Connects with the API version the daemon's last `/_ping` answered, remembered
    /// in the state directory, when the daemon is behind the same unix socket as then
    /// (the socket file's device, inode and change time are unchanged: a daemon makes
    /// its socket anew each time it starts). That saves the ping's round trip, about
    /// 0.3 ms, on the director's most frequent calls. Anything else connects as
    /// [`Client::connect`] does.
    ///
    /// A socket that outlives its daemon (systemd socket activation) can keep its
    /// identity across an Engine upgrade: a daemon that refuses the remembered
    /// version says so before it acts on the request (see
    /// [`DockerError::is_api_version_refused`]), and the caller asks again on a client
    /// from [`Client::connect`].
    pub async fn connect_remembered(config: &DockerConfig) -> Result<Client> {
        if let Endpoint::Unix(path) = Endpoint::parse(&config.host)? {
            if let Some(server) = remembered_version(&config.state_dir, &path) {
                return Self::on_socket(config, &path, server, true);
            }
        }
        Self::connect(config).await
    }

    /// A client on the unix socket at `path` whose daemon speaks API `server`: the
    /// lower of that and the configured version, in every request's path.
    fn on_socket(
        config: &DockerConfig,
        path: &Path,
        server: ClientVersion,
        remembered: bool,
    ) -> Result<Client> {
        let version = lower_version(server, preferred_version(config)?);
        let docker = versioned(
            Docker::connect_with_unix(
                &path.to_string_lossy(),
                config.timeout_seconds.max(1),
                &version,
            )
            .map_err(|source| DockerError::Connect {
                endpoint: config.host.clone(),
                source,
            })?,
        );
        tracing::debug!(endpoint = %config.host, api_version = %docker.client_version(), remembered, "connected to Docker");
        Ok(Client {
            docker,
            endpoint: config.host.clone(),
            unix: true,
            remembered,
            _tls_dir: None,
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

/// Makes every request carry the client's API version in its path
/// (`/v1.41/containers/…/json`), so the daemon interprets it at the version that
/// was negotiated or configured. bollard (0.21) builds the versioned URL and then
/// joins the request's absolute path onto it, which replaces the version: its
/// requests go out unversioned, and a daemon answers those at its own newest API
/// version, whatever `api_version` says. A path that already names a version is
/// left alone, should bollard start sending one.
fn versioned(docker: Docker) -> Docker {
    let v = docker.client_version();
    let prefix = format!("/v{}.{}", v.major_version, v.minor_version);
    docker.with_request_modifier(move |mut request| {
        if let Some(uri) = with_version_prefix(request.uri(), &prefix) {
            *request.uri_mut() = uri;
        }
        request
    })
}

/// `uri` with `prefix` (`/v1.41`) before its path, unless its path already starts
/// with a version; `None` when nothing changes.
fn with_version_prefix(uri: &http::Uri, prefix: &str) -> Option<http::Uri> {
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
    let first = uri.path().trim_start_matches('/').split('/').next()?;
    if first.starts_with('v') && parse_api_version(first).is_ok() {
        return None;
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(format!("{prefix}{path_and_query}").parse().ok()?);
    http::Uri::from_parts(parts).ok()
}

/// The API version `api_version` in the config asks for, or bollard's newest.
pub(crate) fn preferred_version(config: &DockerConfig) -> Result<ClientVersion> {
    match config
        .api_version
        .as_deref()
        .filter(|v| !v.trim().is_empty())
    {
        Some(v) => parse_api_version(v),
        None => Ok(*API_DEFAULT_VERSION),
    }
}

/// The file in the state directory that remembers the API version of the daemon
/// behind a unix socket.
pub const REMEMBERED_VERSION_FILE: &str = "docker-api-version.json";

/// Which socket file a daemon listens on: a daemon that starts makes its socket
/// anew, with a new inode and change time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SocketIdentity {
    /// Device of the socket file.
    pub dev: u64,
    /// Its inode.
    pub ino: u64,
    /// Its change time, seconds.
    pub ctime: i64,
    /// Its change time, nanoseconds.
    pub ctime_nsec: i64,
}

impl SocketIdentity {
    /// The identity of the socket at `path`; `None` if it is not a socket.
    pub fn of(path: &Path) -> Option<SocketIdentity> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let m = std::fs::metadata(path).ok()?;
        m.file_type().is_socket().then(|| SocketIdentity {
            dev: m.dev(),
            ino: m.ino(),
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
        })
    }
}

/// What [`REMEMBERED_VERSION_FILE`] holds.
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct RememberedVersion {
    socket: PathBuf,
    identity: SocketIdentity,
    api_version: String,
}

/// The daemon's API version remembered for the socket at `socket`, if the socket
/// is the one it was remembered for.
fn remembered_version(state_dir: &Path, socket: &Path) -> Option<ClientVersion> {
    let bytes = std::fs::read(state_dir.join(REMEMBERED_VERSION_FILE)).ok()?;
    let r: RememberedVersion = serde_json::from_slice(&bytes).ok()?;
    if r.socket != socket || Some(r.identity) != SocketIdentity::of(socket) {
        return None;
    }
    parse_api_version(&r.api_version).ok()
}

/// Remembers `version` for the socket at `socket` (see
/// [`Client::connect_remembered`]). Best effort: only into a state directory that
/// exists (a lookup makes none), only when it changed, and a failure costs the
/// next call a ping, nothing more. The file is replaced by a rename, so a reader
/// sees the old content or the new.
fn remember_version(
    state_dir: &Path,
    socket: &Path,
    identity: SocketIdentity,
    version: ClientVersion,
) {
    let record = RememberedVersion {
        socket: socket.to_path_buf(),
        identity,
        api_version: format!("{}.{}", version.major_version, version.minor_version),
    };
    let file = state_dir.join(REMEMBERED_VERSION_FILE);
    let Ok(text) = serde_json::to_vec(&record) else {
        return;
    };
    if std::fs::read(&file).ok().as_deref() == Some(&text[..]) || !state_dir.is_dir() {
        return;
    }
    let temp = state_dir.join(format!(".{REMEMBERED_VERSION_FILE}.{}", std::process::id()));
    let written = std::fs::write(&temp, &text).and_then(|()| std::fs::rename(&temp, &file));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        tracing::debug!(path = %file.display(), error = %e, "could not remember the daemon's API version");
    }
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
    fn a_remembered_version_is_for_its_socket_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("docker.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        let identity = SocketIdentity::of(&socket).expect("a socket");
        let v = parse_api_version("1.41").expect("v");
        // A missing state directory: nothing written, nothing made.
        let missing = dir.path().join("state");
        remember_version(&missing, &socket, identity, v);
        assert!(!missing.exists());
        assert_eq!(remembered_version(&missing, &socket), None);

        std::fs::create_dir(&missing).expect("mkdir");
        remember_version(&missing, &socket, identity, v);
        assert_eq!(remembered_version(&missing, &socket), Some(v));
        // No temporary file is left beside it.
        let names: Vec<_> = std::fs::read_dir(&missing)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [REMEMBERED_VERSION_FILE]);
        // Another socket path, or the same path made anew: not used.
        assert_eq!(
            remembered_version(&missing, &dir.path().join("other.sock")),
            None
        );
        drop(_listener);
        std::fs::remove_file(&socket).expect("rm");
        // File times tick coarsely (a few ms); a daemon takes far longer to restart.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let _again = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        assert_ne!(SocketIdentity::of(&socket), Some(identity));
        assert_eq!(remembered_version(&missing, &socket), None);
        // Not a socket at all.
        assert_eq!(SocketIdentity::of(dir.path()), None);
    }

    #[test]
    fn requests_carry_the_api_version_in_their_path() {
        let prefixed = |uri: &str| {
            let uri: http::Uri = uri.parse().expect("uri");
            with_version_prefix(&uri, "/v1.41").map(|u| u.to_string())
        };
        assert_eq!(
            prefixed("unix://2f7661722f72756e/containers/c-1/json").as_deref(),
            Some("unix://2f7661722f72756e/v1.41/containers/c-1/json")
        );
        assert_eq!(
            prefixed("https://10.0.0.5:2376/images/create?fromSrc=-&repo=x").as_deref(),
            Some("https://10.0.0.5:2376/v1.41/images/create?fromSrc=-&repo=x")
        );
        // Already versioned: unchanged.
        assert_eq!(prefixed("http://h:2375/v1.44/containers/json"), None);
        // A first segment that only looks like a version is not one.
        assert_eq!(
            prefixed("http://h:2375/volumes/v1.x").as_deref(),
            Some("http://h:2375/v1.41/volumes/v1.x")
        );
        assert_eq!(
            prefixed("http://h:2375/v1/x").as_deref(),
            Some("http://h:2375/v1.41/v1/x")
        );
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
