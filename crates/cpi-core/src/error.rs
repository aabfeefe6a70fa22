//! The errors of the CPI, one kind per error type the BOSH director knows.
//!
//! This module and [`crate::protocol`] are the only places that know the
//! `Bosh::Clouds::*` strings.

use std::fmt;

use serde::Serialize;

/// The error types the director understands (`KNOWN_RPC_ERRORS` in the director).
/// Anything else would become an unknown error there, so the set is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A malformed request or an internal failure of the CPI.
    CpiError,
    /// The method does not exist, or this CPI does not implement it.
    NotImplemented,
    /// The method exists but cannot be done here; the director has a fallback
    /// (for example copying data to a new disk instead of `resize_disk`).
    NotSupported,
    /// A failure of the infrastructure (the daemon, the host, the config).
    CloudError,
    /// The VM cid names no VM.
    VmNotFound,
    /// A network named in the request does not exist.
    NetworkNotFound,
    /// There is no room for the disk.
    NoDiskSpace,
    /// `detach_disk` of a disk that is not attached to that VM.
    DiskNotAttached,
    /// The disk cid names no disk.
    DiskNotFound,
    /// `create_vm` failed; with `ok_to_retry` the director tries again.
    VmCreationFailed,
}

impl ErrorKind {
    /// Every kind, for exhaustive tests.
    pub const ALL: [ErrorKind; 10] = [
        ErrorKind::CpiError,
        ErrorKind::NotImplemented,
        ErrorKind::NotSupported,
        ErrorKind::CloudError,
        ErrorKind::VmNotFound,
        ErrorKind::NetworkNotFound,
        ErrorKind::NoDiskSpace,
        ErrorKind::DiskNotAttached,
        ErrorKind::DiskNotFound,
        ErrorKind::VmCreationFailed,
    ];

    /// The type string the director expects in `error.type`.
    pub fn wire_name(self) -> &'static str {
        match self {
            ErrorKind::CpiError => "Bosh::Clouds::CpiError",
            ErrorKind::NotImplemented => "Bosh::Clouds::NotImplemented",
            ErrorKind::NotSupported => "Bosh::Clouds::NotSupported",
            ErrorKind::CloudError => "Bosh::Clouds::CloudError",
            ErrorKind::VmNotFound => "Bosh::Clouds::VMNotFound",
            ErrorKind::NetworkNotFound => "Bosh::Clouds::NetworkNotFound",
            ErrorKind::NoDiskSpace => "Bosh::Clouds::NoDiskSpace",
            ErrorKind::DiskNotAttached => "Bosh::Clouds::DiskNotAttached",
            ErrorKind::DiskNotFound => "Bosh::Clouds::DiskNotFound",
            ErrorKind::VmCreationFailed => "Bosh::Clouds::VMCreationFailed",
        }
    }

    /// The inverse of [`ErrorKind::wire_name`].
    pub fn from_wire_name(name: &str) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.wire_name() == name)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.wire_name())
    }
}

/// An error answered to the director: a kind, a message for the operator and whether
/// retrying the same call may succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct CpiError {
    /// Which director error type this is.
    pub kind: ErrorKind,
    /// What went wrong and, where we know it, what to do about it.
    pub message: String,
    /// Whether the director may retry the call.
    pub ok_to_retry: bool,
}

/// Shorthand for results of CPI operations.
pub type CpiResult<T> = Result<T, CpiError>;

impl CpiError {
    /// An error of `kind` that is not worth retrying.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        CpiError {
            kind,
            message: clamp_message(message.into()),
            ok_to_retry: false,
        }
    }

    /// Marks the error as retryable (or not).
    #[must_use]
    pub fn retryable(mut self, ok_to_retry: bool) -> Self {
        self.ok_to_retry = ok_to_retry;
        self
    }

    /// A malformed request: wrong argument count or types, bad JSON.
    pub fn bad_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::CpiError, message)
    }

    /// A generic infrastructure failure.
    pub fn cloud(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::CloudError, message)
    }

    /// A method this CPI does not implement.
    pub fn not_implemented(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotImplemented, message)
    }

    /// A method that cannot be done on this backend.
    pub fn not_supported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotSupported, message)
    }

    /// The named VM does not exist.
    pub fn vm_not_found(cid: impl fmt::Display) -> Self {
        Self::new(ErrorKind::VmNotFound, format!("VM '{cid}' not found"))
    }

    /// The named disk does not exist.
    pub fn disk_not_found(cid: impl fmt::Display) -> Self {
        Self::new(ErrorKind::DiskNotFound, format!("Disk '{cid}' not found"))
    }

    /// The disk is not attached to the VM.
    pub fn disk_not_attached(vm: impl fmt::Display, disk: impl fmt::Display) -> Self {
        Self::new(
            ErrorKind::DiskNotAttached,
            format!("Disk '{disk}' is not attached to VM '{vm}'"),
        )
    }

    /// A network named in the request does not exist.
    pub fn network_not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NetworkNotFound, message)
    }

    /// `create_vm` failed; `ok_to_retry` only for transient failures.
    pub fn vm_creation_failed(message: impl Into<String>, ok_to_retry: bool) -> Self {
        Self::new(ErrorKind::VmCreationFailed, message).retryable(ok_to_retry)
    }

    /// Prefixes the message with what we were doing, keeping kind and retry flag.
    #[must_use]
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = clamp_message(format!("{what}: {}", self.message));
        self
    }

    /// The JSON body of `error` in a response.
    pub fn to_wire(&self) -> WireError<'_> {
        WireError {
            kind: self.kind.wire_name(),
            message: &self.message,
            ok_to_retry: self.ok_to_retry,
        }
    }
}

/// The longest message an error carries. Messages quote what was wrong (a value, a
/// daemon's answer, a parser's complaint), and some quote the input whole (serde's
/// "invalid type: string ..."); a multi-MiB request must not come back as a multi-MiB
/// error, nor fill the director's task log.
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// Cuts `message` to [`MAX_MESSAGE_BYTES`] on a character boundary, saying so.
fn clamp_message(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let total = message.len();
        let keep = MAX_MESSAGE_BYTES - 64;
        let cut = (0..=keep)
            .rev()
            .find(|i| message.is_char_boundary(*i))
            .unwrap_or(0);
        message.truncate(cut);
        message.push_str(&format!("... ({} more bytes cut)", total - cut));
    }
    message
}

/// An error followed by its causes on one line (`client error (Connect): Permission
/// denied (os error 13)`): HTTP and gRPC clients often say nothing useful without
/// them. A cause whose text is already part of the line is not repeated.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !more.is_empty() && !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// The `error` object of a response, as the director's schema requires it.
#[derive(Debug, Serialize)]
pub struct WireError<'a> {
    /// `Bosh::Clouds::*`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Human-readable message.
    pub message: &'a str,
    /// Whether the director may retry.
    pub ok_to_retry: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);
    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn chains_name_each_new_cause_once() {
        let err = Layer(
            "client error (Connect)",
            Some(Box::new(Layer(
                "Permission denied",
                Some(Box::new(Layer("Permission denied", None))),
            ))),
        );
        assert_eq!(
            error_chain(&err),
            "client error (Connect): Permission denied"
        );
        assert_eq!(error_chain(&Layer("alone", None)), "alone");
    }

    #[test]
    fn long_messages_are_clamped_on_a_char_boundary() {
        let huge = "é".repeat(1 << 20);
        let e = CpiError::bad_argument(format!("invalid type: string {huge:?}"));
        assert!(e.message.len() <= MAX_MESSAGE_BYTES, "{}", e.message.len());
        assert!(
            e.message.ends_with("more bytes cut)"),
            "{}",
            &e.message[e.message.len() - 40..]
        );
        let e = CpiError::cloud("short").context(&huge);
        assert!(e.message.len() <= MAX_MESSAGE_BYTES);
        assert_eq!(CpiError::cloud("short").message, "short");
    }

    #[test]
    fn wire_names_round_trip_and_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for kind in ErrorKind::ALL {
            assert!(kind.wire_name().starts_with("Bosh::Clouds::"));
            assert_eq!(ErrorKind::from_wire_name(kind.wire_name()), Some(kind));
            assert!(seen.insert(kind.wire_name()));
        }
        assert_eq!(
            ErrorKind::VmNotFound.wire_name(),
            "Bosh::Clouds::VMNotFound"
        );
        assert_eq!(
            ErrorKind::VmCreationFailed.wire_name(),
            "Bosh::Clouds::VMCreationFailed"
        );
    }

    #[test]
    fn wire_shape() {
        let err = CpiError::vm_creation_failed("daemon busy", true);
        let json = serde_json::to_value(err.to_wire()).expect("serialise");
        assert_eq!(
            json,
            serde_json::json!({"type":"Bosh::Clouds::VMCreationFailed","message":"daemon busy","ok_to_retry":true})
        );
    }

    #[test]
    fn context_keeps_kind_and_retry() {
        let err = CpiError::cloud("boom")
            .retryable(true)
            .context("creating volume");
        assert_eq!(err.kind, ErrorKind::CloudError);
        assert!(err.ok_to_retry);
        assert_eq!(err.message, "creating volume: boom");
    }
}
