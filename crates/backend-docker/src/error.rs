//! The Docker backend's errors, and their one mapping onto the director's error kinds.
//!
//! Every variant carries what an operator needs to act: the daemon endpoint, the
//! container, volume or path involved, and (in the message) what to check.

use std::path::PathBuf;

use cpi_core::{CpiError, ErrorKind};

/// Shorthand for results of this backend.
pub type Result<T, E = DockerError> = std::result::Result<T, E>;

/// Everything that can go wrong in the Docker backend.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The config cannot work (bad host URL, TLS material, ...).
    #[error("Docker backend config: {0}")]
    Config(String),

    /// No connection to the daemon.
    #[error(
        "cannot reach the Docker daemon at {endpoint}: {}. Check that dockerd runs \
         and that `host` (and `tls` for tcp hosts) in the CPI config point at it",
        cpi_core::error::error_chain(source)
    )]
    Connect {
        /// The daemon endpoint.
        endpoint: String,
        /// What bollard said.
        #[source]
        source: bollard::errors::Error,
    },

    /// A daemon request failed.
    #[error("Docker daemon at {endpoint}: {what}: {}", api_message(source))]
    Api {
        /// The daemon endpoint.
        endpoint: String,
        /// What we were doing, naming the object.
        what: String,
        /// What bollard said.
        #[source]
        source: bollard::errors::Error,
    },

    /// A host-side operation failed (local attach mode, state directory).
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What we were doing.
        what: String,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A helper container did not succeed.
    #[error("helper container ({purpose}) on {endpoint} exited with {exit_code}: {output}")]
    Helper {
        /// The daemon endpoint.
        endpoint: String,
        /// What the helper was for.
        purpose: String,
        /// Its exit code.
        exit_code: i64,
        /// Its output (stdout and stderr), trimmed.
        output: String,
    },

    /// The VM does not exist (or is not ours).
    #[error("VM '{0}' not found")]
    VmNotFound(String),

    /// The disk does not exist (or is not ours).
    #[error("Disk '{0}' not found")]
    DiskNotFound(String),

    /// `detach_disk` of a disk that is not attached to that VM.
    #[error("Disk '{disk}' is not attached to VM '{vm}'")]
    DiskNotAttached {
        /// The VM.
        vm: String,
        /// The disk.
        disk: String,
    },

    /// A network a VM needs does not exist and may not be created.
    #[error("{0}")]
    NetworkNotFound(String),

    /// The request cannot be satisfied as given (bad argument values).
    #[error("{0}")]
    Invalid(String),

    /// Something exists but is in a state that forbids the operation.
    #[error("{0}")]
    Conflict(String),

    /// A failure, and the failure of cleaning up after it.
    #[error(
        "{failure}; cleaning up after the failure also failed: {}",
        join(cleanup)
    )]
    WithCleanup {
        /// The original failure.
        failure: Box<DockerError>,
        /// What went wrong while undoing.
        cleanup: Vec<DockerError>,
    },
}

fn join(errors: &[DockerError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The daemon's own message for server errors (bollard wraps it in "Docker responded
/// with status code ..."), bollard's text otherwise.
fn api_message(err: &bollard::errors::Error) -> String {
    match err {
        bollard::errors::Error::DockerResponseServerError {
            status_code,
            message,
        } => format!("{message} (HTTP {status_code})"),
        other => cpi_core::error::error_chain(other),
    }
}

impl DockerError {
    /// A failed daemon request.
    pub fn api(endpoint: &str, what: impl Into<String>, source: bollard::errors::Error) -> Self {
        DockerError::Api {
            endpoint: endpoint.to_owned(),
            what: what.into(),
            source,
        }
    }

    /// A failed host-side operation.
    pub fn io(what: impl Into<String>, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DockerError::Io {
            what: what.into(),
            path: path.into(),
            source,
        }
    }

    /// The HTTP status the daemon answered, if this is a daemon error.
    pub fn status(&self) -> Option<u16> {
        match self {
            DockerError::Api {
                source: bollard::errors::Error::DockerResponseServerError { status_code, .. },
                ..
            } => Some(*status_code),
            _ => None,
        }
    }

    /// The daemon's message, if this is a daemon error.
    pub fn daemon_message(&self) -> Option<&str> {
        match self {
            DockerError::Api {
                source: bollard::errors::Error::DockerResponseServerError { message, .. },
                ..
            } => Some(message),
            DockerError::Api {
                source: bollard::errors::Error::DockerStreamError { error },
                ..
            } => Some(error),
            _ => None,
        }
    }

    /// Whether the object named does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            DockerError::VmNotFound(_) | DockerError::DiskNotFound(_)
        ) || self.status() == Some(404)
    }

    /// Whether the daemon refused the API version the request was made with ("client
    /// version 1.52 is too new. Maximum supported API version is 1.41", "... is too
    /// old. Minimum supported ..."). The daemon checks the version before it routes
    /// the request, so a refused request did nothing.
    pub fn is_api_version_refused(&self) -> bool {
        self.status() == Some(400)
            && self.daemon_message().is_some_and(|m| {
                m.contains("client version") && (m.contains("too new") || m.contains("too old"))
            })
    }

    /// Whether the daemon refused because of a conflict (name in use, object in use).
    pub fn is_conflict(&self) -> bool {
        self.status() == Some(409)
    }

    /// Whether retrying the same call may succeed: the daemon was unreachable, timed
    /// out, or answered with a server-side failure that is not about our request.
    pub fn is_transient(&self) -> bool {
        match self {
            DockerError::Connect { .. } => true,
            DockerError::Api { source, .. } => match source {
                bollard::errors::Error::RequestTimeoutError
                | bollard::errors::Error::HyperResponseError { .. }
                | bollard::errors::Error::HyperLegacyError { .. }
                | bollard::errors::Error::IOError { .. }
                | bollard::errors::Error::SocketNotFoundError(_) => true,
                bollard::errors::Error::DockerResponseServerError {
                    status_code,
                    message,
                } => {
                    *status_code == 503
                        || (*status_code == 500 && {
                            let m = message.to_ascii_lowercase();
                            m.contains("timeout")
                                || m.contains("temporarily")
                                || m.contains("connection reset")
                                || m.contains("try again")
                        })
                }
                _ => false,
            },
            DockerError::WithCleanup { failure, .. } => failure.is_transient(),
            _ => false,
        }
    }

    /// Combines a failure with the errors of cleaning up after it.
    pub fn with_cleanup(self, cleanup: Vec<DockerError>) -> DockerError {
        if cleanup.is_empty() {
            self
        } else {
            DockerError::WithCleanup {
                failure: Box::new(self),
                cleanup,
            }
        }
    }

    /// The error kind the director should see for this failure outside `create_vm`.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DockerError::VmNotFound(_) => ErrorKind::VmNotFound,
            DockerError::DiskNotFound(_) => ErrorKind::DiskNotFound,
            DockerError::DiskNotAttached { .. } => ErrorKind::DiskNotAttached,
            DockerError::NetworkNotFound(_) => ErrorKind::NetworkNotFound,
            DockerError::Invalid(_) => ErrorKind::CpiError,
            DockerError::WithCleanup { failure, .. } => failure.kind(),
            _ => ErrorKind::CloudError,
        }
    }

    /// The error `create_vm` answers: `VMCreationFailed` (retryable when transient),
    /// except for bad arguments and missing networks, which keep their own kinds.
    pub fn into_vm_creation_error(self) -> CpiError {
        match self.kind() {
            ErrorKind::CpiError | ErrorKind::NetworkNotFound => self.into(),
            _ => {
                let retry = self.is_transient();
                CpiError::vm_creation_failed(self.to_string(), retry)
            }
        }
    }
}

impl From<DockerError> for CpiError {
    fn from(err: DockerError) -> CpiError {
        let retry = err.is_transient();
        CpiError::new(err.kind(), err.to_string()).retryable(retry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(status: u16, message: &str) -> DockerError {
        DockerError::api(
            "unix:///var/run/docker.sock",
            "inspecting container c-1",
            bollard::errors::Error::DockerResponseServerError {
                status_code: status,
                message: message.into(),
            },
        )
    }

    #[test]
    fn a_refused_api_version_is_recognised() {
        for refused in [
            "client version 1.99 is too new. Maximum supported API version is 1.41",
            "client version 1.10 is too old. Minimum supported API version is 1.12, please upgrade your client to a newer version",
        ] {
            assert!(server(400, refused).is_api_version_refused(), "{refused}");
            assert!(!server(500, refused).is_api_version_refused(), "{refused}");
        }
        assert!(!server(400, "invalid reference format").is_api_version_refused());
        assert!(!server(404, "No such container: c-1").is_api_version_refused());
        assert!(!DockerError::VmNotFound("c-1".into()).is_api_version_refused());
    }

    #[test]
    fn causes_are_part_of_the_message() {
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "Permission denied");
        let err = DockerError::api(
            "unix:///var/run/docker.sock",
            "creating container x",
            bollard::errors::Error::IOError { err: io },
        );
        let text = err.to_string();
        assert!(text.contains("Permission denied"), "{text}");
        assert_eq!(text.matches("Permission denied").count(), 1, "{text}");
    }

    #[test]
    fn not_found_and_kinds() {
        assert!(server(404, "No such container: c-1").is_not_found());
        assert!(!server(500, "boom").is_not_found());
        assert!(DockerError::VmNotFound("c-1".into()).is_not_found());
        let cpi: CpiError = DockerError::VmNotFound("c-1".into()).into();
        assert_eq!(cpi.kind, ErrorKind::VmNotFound);
        let cpi: CpiError = DockerError::DiskNotAttached {
            vm: "c-1".into(),
            disk: "vol-1".into(),
        }
        .into();
        assert_eq!(cpi.kind, ErrorKind::DiskNotAttached);
        assert_eq!(cpi.message, "Disk 'vol-1' is not attached to VM 'c-1'");
    }

    #[test]
    fn messages_name_endpoint_and_object() {
        let msg = server(500, "driver failed").to_string();
        assert!(msg.contains("unix:///var/run/docker.sock"), "{msg}");
        assert!(msg.contains("inspecting container c-1"), "{msg}");
        assert!(msg.contains("driver failed (HTTP 500)"), "{msg}");
    }

    #[test]
    fn transient_failures_make_vm_creation_retryable() {
        let err = DockerError::api(
            "unix:///x",
            "creating container",
            bollard::errors::Error::RequestTimeoutError,
        );
        let cpi = err.into_vm_creation_error();
        assert_eq!(cpi.kind, ErrorKind::VmCreationFailed);
        assert!(cpi.ok_to_retry);
        let cpi = server(400, "invalid CapAdd").into_vm_creation_error();
        assert_eq!(cpi.kind, ErrorKind::VmCreationFailed);
        assert!(!cpi.ok_to_retry);
        let cpi = DockerError::NetworkNotFound("no network x".into()).into_vm_creation_error();
        assert_eq!(cpi.kind, ErrorKind::NetworkNotFound);
        let cpi = DockerError::Invalid("bad ip".into()).into_vm_creation_error();
        assert_eq!(cpi.kind, ErrorKind::CpiError);
    }

    #[test]
    fn cleanup_failures_are_reported_with_the_failure() {
        let err = server(500, "start failed").with_cleanup(vec![server(409, "in use")]);
        let msg = err.to_string();
        assert!(msg.contains("start failed"), "{msg}");
        assert!(
            msg.contains("cleaning up after the failure also failed"),
            "{msg}"
        );
        assert!(msg.contains("in use"), "{msg}");
        assert_eq!(err.kind(), ErrorKind::CloudError);
        assert!(matches!(
            server(1, "x").with_cleanup(vec![]),
            DockerError::Api { .. }
        ));
    }
}
