//! The backend's error type and its one mapping onto the director's error kinds.
//!
//! Every variant carries what an operator needs to act: the socket, the path, the
//! container id, the command. [`ContainerdError::is_not_found`] tells idempotent
//! operations (`delete_vm`, `delete_stemcell`, ...) that there was nothing to do.

use std::path::PathBuf;
use std::time::Duration;

use containerd_client::tonic::{self, Code};
use cpi_core::{CpiError, ErrorKind};

/// Shorthand for results of backend steps.
pub type Result<T, E = ContainerdError> = std::result::Result<T, E>;

/// What can go wrong in the containerd backend.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    /// The socket could not be connected to.
    #[error(
        "cannot connect to containerd at {socket}: {message}. Check that containerd is running \
         (`ctr --address {socket} version`), that `containerd.socket` in the CPI config names its \
         gRPC socket, and that the CPI runs as root"
    )]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The transport error, flattened.
        message: String,
    },

    /// A request did not finish in time.
    #[error(
        "containerd at {socket} did not finish {what} within {}s; check the daemon's log \
         (journalctl -u containerd, or its log file) and its load",
        .after.as_secs()
    )]
    Timeout {
        /// The socket path.
        socket: PathBuf,
        /// The request, e.g. `Tasks.Create vm-1234`.
        what: String,
        /// How long we waited.
        after: Duration,
    },

    /// containerd answered a request with an error.
    #[error("containerd {what} failed: {}: {}", code_name(.status.code()), .status.message())]
    Grpc {
        /// The request, e.g. `Snapshots.Prepare vm-1234`.
        what: String,
        /// The gRPC status.
        status: Box<tonic::Status>,
    },

    /// A host filesystem operation failed.
    #[error("{what} {}: {source}", .path.display())]
    Io {
        /// What we were doing, e.g. `writing`.
        what: String,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },

    /// A host command (`ip`, a CNI plugin, ...) failed.
    #[error("{command} failed: {message}")]
    Command {
        /// The command line, without secrets.
        command: String,
        /// Exit status and the tail of its error output.
        message: String,
    },

    /// A CNI plugin reported an error.
    #[error("CNI plugin {plugin} {command} for interface {ifname} failed: {message}")]
    Cni {
        /// The plugin type (`bridge`, `host-local`, ...).
        plugin: String,
        /// ADD, DEL or CHECK.
        command: &'static str,
        /// The interface in the VM.
        ifname: String,
        /// The plugin's error (`msg` and `details`) or how it failed to run.
        message: String,
    },

    /// Making or removing a VM interface over netlink failed.
    #[error("{action} network interface {ifname} of VM {vm}: {source}")]
    Link {
        /// `making` or `removing`.
        action: &'static str,
        /// The interface in the VM.
        ifname: String,
        /// The VM (its network namespace).
        vm: String,
        /// What the kernel answered, with the step that failed.
        source: std::io::Error,
    },

    /// The VM does not exist.
    #[error("VM '{0}' not found")]
    VmNotFound(String),

    /// The disk does not exist.
    #[error("Disk '{0}' not found")]
    DiskNotFound(String),

    /// The disk is not attached to that VM.
    #[error("Disk '{disk}' is not attached to VM '{vm}'")]
    DiskNotAttached {
        /// The VM cid.
        vm: String,
        /// The disk cid.
        disk: String,
    },

    /// The stemcell does not exist.
    #[error(
        "stemcell '{0}' not found in containerd; upload it again (bosh upload-stemcell --fix)"
    )]
    StemcellNotFound(String),

    /// A request argument was unusable (a bad cid, a bad network cloud property).
    #[error("{0}")]
    BadArgument(String),

    /// The operation cannot be done on this backend.
    #[error("{0}")]
    NotSupported(String),

    /// Something about the state we found is inconsistent or refused.
    #[error("{0}")]
    Refused(String),

    /// An operation failed and cleaning up after it failed too: both are reported.
    #[error("{error}; cleaning up after it also failed: {}", .cleanup.join("; "))]
    CleanupFailed {
        /// The original failure.
        error: Box<ContainerdError>,
        /// Every cleanup step that failed.
        cleanup: Vec<String>,
    },
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

impl ContainerdError {
    /// A gRPC failure of `what`.
    pub fn grpc(what: impl Into<String>, status: tonic::Status) -> Self {
        ContainerdError::Grpc {
            what: what.into(),
            status: Box::new(status),
        }
    }

    /// An IO failure while doing `what` on `path`.
    pub fn io(what: impl Into<String>, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ContainerdError::Io {
            what: what.into(),
            path: path.into(),
            source,
        }
    }

    /// The gRPC code, when containerd answered with an error.
    pub fn code(&self) -> Option<Code> {
        match self {
            ContainerdError::Grpc { status, .. } => Some(status.code()),
            ContainerdError::CleanupFailed { error, .. } => error.code(),
            _ => None,
        }
    }

    /// True when the object did not exist: containerd's `NotFound`, a missing file,
    /// or one of our own not-found kinds.
    pub fn is_not_found(&self) -> bool {
        match self {
            ContainerdError::Grpc { status, .. } => status.code() == Code::NotFound,
            ContainerdError::Io { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            ContainerdError::VmNotFound(_)
            | ContainerdError::DiskNotFound(_)
            | ContainerdError::StemcellNotFound(_) => true,
            _ => false,
        }
    }

    /// True when containerd said the object exists already.
    pub fn is_already_exists(&self) -> bool {
        self.code() == Some(Code::AlreadyExists)
    }

    /// True for failures that may pass when the call is repeated (daemon not up yet,
    /// overloaded, a request timed out).
    pub fn is_transient(&self) -> bool {
        match self {
            ContainerdError::Connect { .. } | ContainerdError::Timeout { .. } => true,
            ContainerdError::Grpc { status, .. } => matches!(
                status.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted
            ),
            _ => false,
        }
    }

    /// Attaches the failures of a cleanup to this error (no-op when there are none).
    #[must_use]
    pub fn with_cleanup(self, cleanup: Vec<String>) -> Self {
        if cleanup.is_empty() {
            self
        } else {
            ContainerdError::CleanupFailed {
                error: Box::new(self),
                cleanup,
            }
        }
    }

    /// The director's error kind for this failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ContainerdError::VmNotFound(_) => ErrorKind::VmNotFound,
            ContainerdError::DiskNotFound(_) => ErrorKind::DiskNotFound,
            ContainerdError::DiskNotAttached { .. } => ErrorKind::DiskNotAttached,
            ContainerdError::BadArgument(_) => ErrorKind::CpiError,
            ContainerdError::NotSupported(_) => ErrorKind::NotSupported,
            ContainerdError::CleanupFailed { error, .. } => error.kind(),
            _ => ErrorKind::CloudError,
        }
    }
}

impl From<ContainerdError> for CpiError {
    fn from(err: ContainerdError) -> CpiError {
        let retry = err.is_transient();
        CpiError::new(err.kind(), err.to_string()).retryable(retry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_is_recognised_everywhere() {
        assert!(
            ContainerdError::grpc("Containers.Get x", tonic::Status::not_found("nope"))
                .is_not_found()
        );
        assert!(!ContainerdError::grpc("x", tonic::Status::internal("boom")).is_not_found());
        assert!(ContainerdError::io(
            "reading",
            "/nope",
            std::io::Error::from(std::io::ErrorKind::NotFound)
        )
        .is_not_found());
        assert!(ContainerdError::VmNotFound("vm-1".into()).is_not_found());
    }

    #[test]
    fn maps_onto_director_kinds() {
        let cases: Vec<(ContainerdError, ErrorKind)> = vec![
            (
                ContainerdError::VmNotFound("v".into()),
                ErrorKind::VmNotFound,
            ),
            (
                ContainerdError::DiskNotFound("d".into()),
                ErrorKind::DiskNotFound,
            ),
            (
                ContainerdError::DiskNotAttached {
                    vm: "v".into(),
                    disk: "d".into(),
                },
                ErrorKind::DiskNotAttached,
            ),
            (
                ContainerdError::NotSupported("x".into()),
                ErrorKind::NotSupported,
            ),
            (
                ContainerdError::BadArgument("x".into()),
                ErrorKind::CpiError,
            ),
            (
                ContainerdError::grpc("x", tonic::Status::internal("boom")),
                ErrorKind::CloudError,
            ),
        ];
        for (err, kind) in cases {
            assert_eq!(CpiError::from(err).kind, kind);
        }
    }

    #[test]
    fn connection_failures_name_the_socket_and_are_retryable() {
        let err = CpiError::from(ContainerdError::Connect {
            socket: "/run/containerd/containerd.sock".into(),
            message: "No such file or directory".into(),
        });
        assert_eq!(err.kind, ErrorKind::CloudError);
        assert!(err.ok_to_retry);
        assert!(err.message.contains("/run/containerd/containerd.sock"));
        assert!(err.message.contains("ctr --address"));
    }

    #[test]
    fn cleanup_failures_are_reported_with_the_cause() {
        let err = ContainerdError::Refused("task failed to start".into())
            .with_cleanup(vec!["removing snapshot vm-1: busy".into()]);
        let text = err.to_string();
        assert!(text.contains("task failed to start"), "{text}");
        assert!(text.contains("removing snapshot vm-1: busy"), "{text}");
        let same = ContainerdError::Refused("x".into()).with_cleanup(vec![]);
        assert!(matches!(same, ContainerdError::Refused(_)));
    }
}
