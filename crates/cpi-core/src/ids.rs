//! Newtypes for the cloud ids that cross the wire.
//!
//! The director treats every cid as an opaque string. We keep them opaque too, but
//! refuse the shapes that can never be one of ours and that would be dangerous if a
//! backend used the cid in a path or a daemon object name (empty, `..`, slashes at the
//! start, control characters, absurd lengths). Backends add their own, stricter checks.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::CpiError;

/// The longest cid we accept. Docker names, containerd ids and file names all fit.
pub const MAX_CID_LEN: usize = 255;

macro_rules! cid_newtype {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps a string after checking that it is a plausible cid.
            pub fn new(value: impl Into<String>) -> Result<Self, CpiError> {
                let value = value.into();
                validate_cid(&value, $what)?;
                Ok(Self(value))
            }

            /// The cid as the director knows it.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

cid_newtype!(
    /// The cloud id of a VM (a container).
    VmCid,
    "VM cid"
);
cid_newtype!(
    /// The cloud id of a persistent disk.
    DiskCid,
    "disk cid"
);
cid_newtype!(
    /// The cloud id of an imported stemcell (an image).
    StemcellCid,
    "stemcell cid"
);
cid_newtype!(
    /// The cloud id of a disk snapshot.
    SnapshotCid,
    "snapshot cid"
);
cid_newtype!(
    /// The id the director gave the agent that will run in a VM.
    AgentId,
    "agent id"
);

fn validate_cid(value: &str, what: &str) -> Result<(), CpiError> {
    if value.is_empty() {
        return Err(CpiError::bad_argument(format!("{what} must not be empty")));
    }
    if value.len() > MAX_CID_LEN {
        return Err(CpiError::bad_argument(format!(
            "{what} is {} bytes long; at most {MAX_CID_LEN} are allowed",
            value.len()
        )));
    }
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(CpiError::bad_argument(format!(
            "{what} {value:?} contains whitespace or control characters"
        )));
    }
    if value == "." || value == ".." || value.split('/').any(|part| part == "..") {
        return Err(CpiError::bad_argument(format!(
            "{what} {value:?} contains a '..' path component"
        )));
    }
    if value.starts_with('/') || value.starts_with('-') {
        return Err(CpiError::bad_argument(format!(
            "{what} {value:?} must not start with '/' or '-'"
        )));
    }
    Ok(())
}

/// True when `value` is made only of `[A-Za-z0-9_.-]` and starts with an alphanumeric
/// character: the shape of every cid this project mints, and safe as a file name or a
/// daemon object name. Backends use it for cids that name files.
pub fn is_simple_name(value: &str) -> bool {
    let mut chars = value.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && value.len() <= MAX_CID_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_cids() {
        assert!(VmCid::new("c-c1fa0a9f-1f0d-4d86-5253-db14e6566d63").is_ok());
        assert!(StemcellCid::new("bosh.io/stemcells:img-b1ce7369").is_ok());
        assert!(StemcellCid::new("127.0.0.1:5000/stemcell@sha256:abcd").is_ok());
    }

    #[test]
    fn refuses_dangerous_cids() {
        for bad in ["", "..", "a/../b", "/etc/passwd", "-rf", "a b", "a\nb"] {
            let err = VmCid::new(bad).expect_err(bad);
            assert_eq!(err.kind, crate::ErrorKind::CpiError, "{bad}");
        }
        assert!(DiskCid::new("x".repeat(MAX_CID_LEN + 1)).is_err());
    }

    #[test]
    fn simple_names() {
        assert!(is_simple_name("vol-1234.ab_c"));
        assert!(!is_simple_name("-vol"));
        assert!(!is_simple_name("a/b"));
        assert!(!is_simple_name(""));
    }
}
