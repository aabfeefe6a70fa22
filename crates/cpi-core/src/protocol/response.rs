//! The response written to stdout.

use serde::Serialize;
use serde_json::Value;

use crate::error::{CpiError, WireError};

/// One response. `log` is filled in by the binary just before writing.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// The result, `null` on error.
    pub result: Value,
    /// The error, if any.
    pub error: Option<CpiError>,
    /// The call's log lines.
    pub log: String,
}

#[derive(Serialize)]
struct Wire<'a> {
    result: &'a Value,
    error: Option<WireError<'a>>,
    log: &'a str,
}

impl Response {
    /// A successful response.
    pub fn ok(result: Value) -> Response {
        Response {
            result,
            error: None,
            log: String::new(),
        }
    }

    /// An error response.
    pub fn error(err: &CpiError) -> Response {
        Response {
            result: Value::Null,
            error: Some(err.clone()),
            log: String::new(),
        }
    }

    /// The JSON line for stdout: always `result`, `error` and a string `log`.
    pub fn to_json(&self) -> Vec<u8> {
        let wire = Wire {
            result: &self.result,
            error: self.error.as_ref().map(CpiError::to_wire),
            log: &self.log,
        };
        // Serialising `Value`s and strings cannot fail.
        serde_json::to_vec(&wire).unwrap_or_else(|_| {
            br#"{"result":null,"error":{"type":"Bosh::Clouds::CpiError","message":"response could not be serialised","ok_to_retry":false},"log":""}"#.to_vec()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_match_the_go_library() {
        assert_eq!(
            String::from_utf8(Response::ok(Value::String("x".into())).to_json()).expect("utf8"),
            r#"{"result":"x","error":null,"log":""}"#
        );
        assert_eq!(
            String::from_utf8(Response::error(&CpiError::cloud("boom")).to_json()).expect("utf8"),
            r#"{"result":null,"error":{"type":"Bosh::Clouds::CloudError","message":"boom","ok_to_retry":false},"log":""}"#
        );
    }
}
