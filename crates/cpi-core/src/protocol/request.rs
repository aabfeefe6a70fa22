//! Parsing a request from stdin.

use serde_json::{Map, Value};

use crate::cpi::CallContext;
use crate::error::{CpiError, ErrorKind};
use crate::network::json_kind;

/// The highest CPI API version we speak (`info` advertises it).
pub const MAX_API_VERSION: u32 = 2;

/// The largest request we read. A director's requests are a few KiB; `env` with
/// certificates stays well under 1 MiB.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

/// A request as read from stdin, before its arguments are typed.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The method name.
    pub method: String,
    /// The positional arguments.
    pub arguments: Vec<Value>,
    /// The `context` object (empty when absent).
    pub context: Map<String, Value>,
    /// The requested API version (1 when absent).
    pub api_version: u32,
}

impl Request {
    /// Parses and checks the envelope. Messages follow the Go CPI library's, which
    /// operators already know.
    pub fn parse(input: &[u8]) -> Result<Request, CpiError> {
        if input.len() > MAX_REQUEST_BYTES {
            return Err(CpiError::bad_argument(format!(
                "Request is {} bytes; at most {MAX_REQUEST_BYTES} are accepted",
                input.len()
            )));
        }
        if input.iter().all(u8::is_ascii_whitespace) {
            return Err(CpiError::bad_argument(
                "Must provide valid JSON payload: the request on stdin was empty",
            ));
        }
        let value: Value = serde_json::from_slice(input)
            .map_err(|e| CpiError::bad_argument(format!("Must provide valid JSON payload: {e}")))?;
        let Value::Object(mut obj) = value else {
            return Err(CpiError::bad_argument(format!(
                "Must provide valid JSON payload: expected an object, got {}",
                json_kind(&value)
            )));
        };
        let method = match obj.remove("method") {
            Some(Value::String(m)) if !m.is_empty() => m,
            None | Some(Value::Null) => {
                return Err(CpiError::bad_argument("Must provide 'method' key"))
            }
            Some(other) => {
                return Err(CpiError::bad_argument(format!(
                    "'method' must be a non-empty string, got {}",
                    short(&other)
                )))
            }
        };
        let arguments = match obj.remove("arguments") {
            Some(Value::Array(a)) => a,
            None | Some(Value::Null) => {
                return Err(CpiError::bad_argument("Must provide 'arguments' key"))
            }
            Some(other) => {
                return Err(CpiError::bad_argument(format!(
                    "'arguments' must be a list, got {}",
                    json_kind(&other)
                )))
            }
        };
        let context = match obj.remove("context") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(c)) => c,
            Some(other) => {
                return Err(CpiError::bad_argument(format!(
                    "'context' must be an object, got {}",
                    json_kind(&other)
                )))
            }
        };
        let api_version = match obj.remove("api_version") {
            None | Some(Value::Null) => 1,
            Some(v) => match v.as_u64() {
                Some(n) if n <= u64::from(u32::MAX) => n as u32,
                _ => {
                    return Err(CpiError::bad_argument(format!(
                        "'api_version' must be a whole number, got {}",
                        short(&v)
                    )))
                }
            },
        };
        if api_version > MAX_API_VERSION {
            return Err(CpiError::new(
                ErrorKind::NotImplemented,
                format!(
                    "Must call implemented method: CPI API version requested is '{api_version}', max supported is '{MAX_API_VERSION}'"
                ),
            ));
        }
        Ok(Request {
            method,
            arguments,
            context,
            api_version,
        })
    }

    /// The typed context handed to the backend.
    pub fn context(&self) -> CallContext {
        let mut overrides = self.context.clone();
        let director_uuid = take_string(&mut overrides, "director_uuid");
        let request_id = take_string(&mut overrides, "request_id");
        let stemcell_api_version = overrides
            .remove("vm")
            .and_then(|vm| vm.get("stemcell")?.get("api_version")?.as_u64());
        CallContext {
            director_uuid,
            request_id,
            api_version: self.api_version,
            stemcell_api_version,
            overrides,
        }
    }
}

fn take_string(map: &mut Map<String, Value>, key: &str) -> Option<String> {
    match map.remove(key) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    }
}

/// A value shortened for an error message, so huge input is not echoed back.
pub(crate) fn short(v: &Value) -> String {
    let text = v.to_string();
    if text.len() > 80 {
        let cut = (0..=80)
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        format!("{}...", &text[..cut])
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_director_request() {
        let r = Request::parse(br#"{"method":"has_vm","arguments":["c-1"],"context":{"director_uuid":"d","request_id":"cpi-1","vm":{"stemcell":{"api_version":3}},"host":"tcp://x:2376"},"api_version":2}"#).expect("parse");
        assert_eq!(r.method, "has_vm");
        let ctx = r.context();
        assert_eq!(ctx.director_uuid.as_deref(), Some("d"));
        assert_eq!(ctx.request_id.as_deref(), Some("cpi-1"));
        assert_eq!(ctx.stemcell_api_version, Some(3));
        assert_eq!(ctx.api_version, 2);
        assert_eq!(
            ctx.overrides.get("host").and_then(Value::as_str),
            Some("tcp://x:2376")
        );
        assert!(!ctx.overrides.contains_key("director_uuid"));
    }

    #[test]
    fn api_version_defaults_to_one() {
        let r = Request::parse(br#"{"method":"info","arguments":[]}"#).expect("parse");
        assert_eq!(r.api_version, 1);
    }

    #[test]
    fn envelope_errors() {
        for (input, kind, needle) in [
            (&b""[..], ErrorKind::CpiError, "empty"),
            (b"  \n", ErrorKind::CpiError, "empty"),
            (
                b"{\"method\":",
                ErrorKind::CpiError,
                "Must provide valid JSON payload",
            ),
            (b"[1,2]", ErrorKind::CpiError, "expected an object"),
            (b"\"info\"", ErrorKind::CpiError, "expected an object"),
            (
                b"{\"arguments\":[]}",
                ErrorKind::CpiError,
                "Must provide 'method' key",
            ),
            (
                b"{\"method\":\"info\"}",
                ErrorKind::CpiError,
                "Must provide 'arguments' key",
            ),
            (
                b"{\"method\":5,\"arguments\":[]}",
                ErrorKind::CpiError,
                "'method' must be",
            ),
            (
                b"{\"method\":\"info\",\"arguments\":{}}",
                ErrorKind::CpiError,
                "'arguments' must be a list",
            ),
            (
                b"{\"method\":\"info\",\"arguments\":[],\"context\":[]}",
                ErrorKind::CpiError,
                "'context'",
            ),
            (
                b"{\"method\":\"info\",\"arguments\":[],\"api_version\":\"2\"}",
                ErrorKind::CpiError,
                "api_version",
            ),
            (
                b"{\"method\":\"info\",\"arguments\":[],\"api_version\":3}",
                ErrorKind::NotImplemented,
                "max supported is '2'",
            ),
        ] {
            let err = Request::parse(input).expect_err(needle);
            assert_eq!(err.kind, kind, "{needle}");
            assert!(err.message.contains(needle), "{needle}: {}", err.message);
        }
    }

    #[test]
    fn huge_input_is_refused_without_parsing() {
        let input = vec![b' '; MAX_REQUEST_BYTES + 1];
        let err = Request::parse(&input).expect_err("huge");
        assert!(err.message.contains("at most"));
    }
}
