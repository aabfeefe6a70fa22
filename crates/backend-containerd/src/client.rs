//! The connection to containerd: a gRPC channel over its unix socket, the namespace
//! header on every request, timeouts, and errors that name the socket.
//!
//! containerd scopes every object by the `containerd-namespace` request header, and
//! ties objects being built (content, snapshots) to a lease with `containerd-lease`.
//! Both are set here and nowhere else, so no request can leave our namespace.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::{
    containers_client::ContainersClient, content_client::ContentClient, diff_client::DiffClient,
    images_client::ImagesClient, leases_client::LeasesClient,
    snapshots::snapshots_client::SnapshotsClient, tasks_client::TasksClient,
    version_client::VersionClient,
};
use containerd_client::tonic::metadata::AsciiMetadataValue;
use containerd_client::tonic::transport::{Channel, Endpoint};
use containerd_client::tonic::{self, Request, Response, Status};

use crate::error::{ContainerdError, Result};

/// The header that scopes a request to a namespace.
const NAMESPACE_HEADER: &str = "containerd-namespace";
/// The header that adds what a request creates to a lease.
const LEASE_HEADER: &str = "containerd-lease";

/// Checks a containerd namespace name (containerd's `identifiers.Validate`): letters
/// and digits, separated by single `.`, `_` or `-`, at most 76 characters.
pub fn validate_identifier(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 76
        && name
            .split(['.', '_', '-'])
            .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric()));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{name}' is not a valid containerd identifier (letters and digits separated by \
             single '.', '_' or '-', at most 76 characters)"
        ))
    }
}

/// A connected client, scoped to one namespace.
#[derive(Debug, Clone)]
pub struct Daemon {
    channel: Channel,
    socket: PathBuf,
    namespace: AsciiMetadataValue,
    timeout: Duration,
    long_timeout: Duration,
}

impl Daemon {
    /// Connects to the socket (a missing socket or a refused connection is reported
    /// here with what to check). No request is made, so a trivial call costs one
    /// round trip rather than two; [`Daemon::version`] asks when wanted (`cpi
    /// doctor`). A daemon that accepts but does not answer is reported by the first
    /// call, which names the request and the socket.
    pub async fn connect(
        socket: &Path,
        namespace: &str,
        timeout: Duration,
        long_timeout: Duration,
    ) -> Result<Daemon> {
        let connect_err = |message: String| ContainerdError::Connect {
            socket: socket.to_path_buf(),
            message,
        };
        if !socket.exists() {
            return Err(connect_err("the socket does not exist".into()));
        }
        let path = socket.to_path_buf();
        // The URI is required by tonic but unused: the connector dials the socket.
        let endpoint = Endpoint::try_from("http://containerd.invalid")
            .map_err(|e| connect_err(e.to_string()))?
            .connect_timeout(timeout);
        let connecting = endpoint.connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }));
        let channel = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| connect_err(format!("no connection within {}s", timeout.as_secs())))?
            .map_err(|e| connect_err(cpi_core::error::error_chain(&e)))?;
        let namespace = namespace
            .parse::<AsciiMetadataValue>()
            .map_err(|_| ContainerdError::BadArgument(format!("namespace {namespace:?}")))?;
        let daemon = Daemon {
            channel,
            socket: socket.to_path_buf(),
            namespace,
            timeout,
            long_timeout,
        };
        tracing::debug!(socket = %socket.display(), "connected to containerd");
        Ok(daemon)
    }

    /// containerd's version, from its version service.
    pub async fn version(&self) -> Result<String> {
        let reply = self
            .call(
                "Version.Version",
                VersionClient::new(self.channel.clone()).version(()),
            )
            .await
            .map_err(|e| match e {
                ContainerdError::Grpc { status, .. } => ContainerdError::Connect {
                    socket: self.socket.clone(),
                    message: status.message().to_owned(),
                },
                other => other,
            })?;
        Ok(reply.version)
    }

    /// The socket we are connected to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A request in our namespace.
    pub fn req<T>(&self, message: T) -> Request<T> {
        let mut req = Request::new(message);
        req.metadata_mut()
            .insert(NAMESPACE_HEADER, self.namespace.clone());
        req
    }

    /// A request in our namespace whose new objects join `lease`.
    pub fn req_leased<T>(&self, message: T, lease: &str) -> Request<T> {
        let mut req = self.req(message);
        if let Ok(value) = lease.parse::<AsciiMetadataValue>() {
            req.metadata_mut().insert(LEASE_HEADER, value);
        }
        req
    }

    /// Awaits a unary call with the normal timeout, mapping failures to errors that
    /// name the request and the socket.
    pub async fn call<T, F>(&self, what: impl Into<String>, call: F) -> Result<T>
    where
        F: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        self.call_within(self.timeout, what, call).await
    }

    /// Like [`Daemon::call`], with the long timeout (imports, unpacking).
    pub async fn call_long<T, F>(&self, what: impl Into<String>, call: F) -> Result<T>
    where
        F: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        self.call_within(self.long_timeout, what, call).await
    }

    async fn call_within<T, F>(
        &self,
        limit: Duration,
        what: impl Into<String>,
        call: F,
    ) -> Result<T>
    where
        F: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        match tokio::time::timeout(limit, call).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(self.status_error(what.into(), status)),
            Err(_) => Err(ContainerdError::Timeout {
                socket: self.socket.clone(),
                what: what.into(),
                after: limit,
            }),
        }
    }

    /// Turns a status into our error; transport failures name the socket.
    pub fn status_error(&self, what: String, status: Status) -> ContainerdError {
        if status.code() == tonic::Code::Unavailable || status.code() == tonic::Code::Unknown {
            if let Some(source) = std::error::Error::source(&status) {
                return ContainerdError::Connect {
                    socket: self.socket.clone(),
                    message: format!("{what}: {}", cpi_core::error::error_chain(source)),
                };
            }
        }
        ContainerdError::grpc(what, status)
    }

    /// The long timeout.
    pub fn long_timeout(&self) -> Duration {
        self.long_timeout
    }

    /// Containers service.
    pub fn containers(&self) -> ContainersClient<Channel> {
        ContainersClient::new(self.channel.clone())
    }
    /// Content service. Messages may be as large as the chunks we stream.
    pub fn content(&self) -> ContentClient<Channel> {
        ContentClient::new(self.channel.clone()).max_decoding_message_size(64 << 20)
    }
    /// Diff service.
    pub fn diff(&self) -> DiffClient<Channel> {
        DiffClient::new(self.channel.clone())
    }
    /// Images service.
    pub fn images(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone())
    }
    /// Leases service.
    pub fn leases(&self) -> LeasesClient<Channel> {
        LeasesClient::new(self.channel.clone())
    }
    /// Snapshots service.
    pub fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }
    /// Tasks service.
    pub fn tasks(&self) -> TasksClient<Channel> {
        TasksClient::new(self.channel.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        for ok in ["bosh", "bosh-ci", "a.b_c-1", "x"] {
            assert!(validate_identifier(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "a--b", "a/b", "a b", &"a".repeat(77)] {
            assert!(validate_identifier(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_missing_socket_is_reported_with_what_to_check() {
        let err = Daemon::connect(
            Path::new("/nonexistent/containerd.sock"),
            "bosh",
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .await
        .expect_err("no socket");
        let text = err.to_string();
        assert!(text.contains("/nonexistent/containerd.sock"), "{text}");
        assert!(text.contains("does not exist"), "{text}");
        assert!(err.is_transient());
    }
}
