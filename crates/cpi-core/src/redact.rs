//! Keeping secrets out of logs and responses.
//!
//! Two layers: [`Secrets`] collects every secret *value* found in the request and the
//! config (by key name, and passwords inside URLs) and scrubs them from any text; and
//! [`scrub_patterns`] removes secret *shapes* (URL user-info, PEM private keys) that we
//! did not see coming. The binary runs every log line and the final response through
//! both.

use std::borrow::Cow;

use serde_json::Value;

/// What replaces a secret.
pub const REDACTED: &str = "<redacted>";

/// Key names whose string values are secrets. Matched case-insensitively as
/// substrings of the key, so `private_key`, `secret_access_key`, `blobstore_password`
/// and `Password` all count. `auth` covers `registry_auth` and `Authorization`: a
/// credential slot holds secrets whatever shape an operator pastes into it (a token
/// string where an object belongs would otherwise be quoted back by the parser's
/// "invalid type" error).
const SECRET_KEY_PARTS: [&str; 10] = [
    "auth",
    "password",
    "passwd",
    "secret",
    "private_key",
    "privatekey",
    "token",
    "credential",
    "access_key",
    "cert",
];

/// Whether a JSON key names a secret.
pub fn is_secret_key(key: &str) -> bool {
    let lower = key.to_ascii_lowercase();
    SECRET_KEY_PARTS.iter().any(|p| lower.contains(p))
        || lower == "mbus"
        || lower == "key"
        || lower == "tls"
}

/// A set of secret strings to scrub from text.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    values: Vec<String>,
}

impl Secrets {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one secret. Very short values are ignored: scrubbing `"a"` would destroy
    /// every message and protect nothing.
    pub fn add(&mut self, secret: &str) {
        if secret.len() >= 4 && !self.values.iter().any(|v| v == secret) {
            self.values.push(secret.to_owned());
            // Longest first, so a secret containing another is replaced whole.
            self.values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        }
        if let Some(pw) = url_password(secret) {
            if pw.len() >= 4 && !self.values.iter().any(|v| v == pw) {
                self.values.push(pw.to_owned());
                self.values.sort_by_key(|v| std::cmp::Reverse(v.len()));
            }
        }
    }

    /// Walks a JSON document and adds every value under a secret-named key (whole
    /// subtrees: every string below `bosh.mbus.cert` is secret), and the password of
    /// every URL anywhere.
    pub fn collect(&mut self, value: &Value) {
        self.walk(value, false);
    }

    fn walk(&mut self, value: &Value, secret: bool) {
        match value {
            Value::String(s) => {
                if secret {
                    self.add(s);
                } else if let Some(pw) = url_password(s) {
                    self.add(pw);
                }
            }
            Value::Array(items) => items.iter().for_each(|v| self.walk(v, secret)),
            Value::Object(map) => {
                for (k, v) in map {
                    self.walk(v, secret || is_secret_key(k));
                }
            }
            Value::Number(_) | Value::Bool(_) | Value::Null => {}
        }
    }

    /// Replaces every known secret in `text`, then the secret shapes.
    pub fn scrub<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out: Cow<'a, str> = Cow::Borrowed(text);
        for s in &self.values {
            if out.contains(s.as_str()) {
                out = Cow::Owned(out.replace(s.as_str(), REDACTED));
            }
        }
        match scrub_patterns(&out) {
            Cow::Borrowed(_) => out,
            Cow::Owned(o) => Cow::Owned(o),
        }
    }

    /// Number of secrets known.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True when none are known.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// The password of `scheme://user:password@host`, if `text` is such a URL.
fn url_password(text: &str) -> Option<&str> {
    let rest = &text[text.find("://")? + 3..];
    let at = rest.find('@')?;
    let userinfo = &rest[..at];
    if userinfo.contains('/') {
        return None;
    }
    let colon = userinfo.find(':')?;
    Some(&userinfo[colon + 1..])
}

/// Removes secret shapes from text: the user-info of URLs
/// (`nats://user:pw@host` → `nats://<redacted>@host`) and PEM private-key blocks.
pub fn scrub_patterns(text: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(text);
    if out.contains("PRIVATE KEY-----") {
        out = Cow::Owned(scrub_pem(&out));
    }
    if out.contains("://") && out.contains('@') {
        out = Cow::Owned(scrub_userinfo(&out));
    }
    out
}

fn scrub_pem(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN") {
        let header_end = rest[start..]
            .find("-----\n")
            .or_else(|| rest[start + 10..].find("-----").map(|i| i + 10));
        let is_key = rest[start..]
            .lines()
            .next()
            .is_some_and(|l| l.contains("PRIVATE KEY"));
        if !is_key || header_end.is_none() {
            out.push_str(&rest[..start + 10]);
            rest = &rest[start + 10..];
            continue;
        }
        out.push_str(&rest[..start]);
        out.push_str(REDACTED);
        match rest[start..].find("PRIVATE KEY-----").and_then(|first| {
            let after = start + first + 16;
            rest[after..]
                .find("PRIVATE KEY-----")
                .map(|second| after + second + 16)
        }) {
            Some(end) => rest = &rest[end..],
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

fn scrub_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        rest = &rest[i + 3..];
        let end = rest
            .find(|c: char| {
                c.is_whitespace() || matches!(c, '/' | '"' | '\'' | '\\' | ',' | '}' | ']')
            })
            .unwrap_or(rest.len());
        let authority = &rest[..end];
        if let Some(at) = authority.rfind('@') {
            out.push_str(REDACTED);
            rest = &rest[at..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_slots_are_secret_whatever_their_shape() {
        for key in ["registry_auth", "auth", "Authorization", "tls", "TLS"] {
            assert!(is_secret_key(key), "{key}");
        }
        let mut secrets = Secrets::new();
        secrets.collect(&serde_json::json!({
            "registry_auth": "pasted-token-value",
            "tls": "pasted-key-material",
            "labels": {"x": "not-a-secret"},
        }));
        let text =
            "invalid type: string \"pasted-token-value\", and pasted-key-material, not-a-secret";
        let clean = secrets.scrub(text);
        assert!(!clean.contains("pasted-token-value"), "{clean}");
        assert!(!clean.contains("pasted-key-material"), "{clean}");
        assert!(clean.contains("not-a-secret"), "{clean}");
    }
    use serde_json::json;

    #[test]
    fn collects_secrets_from_a_director_env() {
        let env = json!({"bosh": {"password": "crypt-pw-123", "mbus": {"cert": {"ca": "CA-PEM", "private_key": "KEY-PEM-XYZ", "certificate": "CERT-PEM"}, "urls": ["https://mbus:mbus-pw-456@10.0.0.1:6868"]},
            "blobstores": [{"provider": "dav", "options": {"endpoint": "http://10.0.0.6:25250", "user": "agent", "password": "blob-pw-789", "secret_access_key": "s3-secret"}}],
            "group": "visible-group"}});
        let mut s = Secrets::new();
        s.collect(&env);
        let text = format!("{env}");
        let scrubbed = s.scrub(&text);
        for secret in [
            "crypt-pw-123",
            "KEY-PEM-XYZ",
            "CA-PEM",
            "CERT-PEM",
            "mbus-pw-456",
            "blob-pw-789",
            "s3-secret",
        ] {
            assert!(!scrubbed.contains(secret), "{secret} leaked: {scrubbed}");
        }
        assert!(scrubbed.contains("visible-group"));
        assert!(scrubbed.contains("10.0.0.6"));
    }

    #[test]
    fn scrubs_url_userinfo_and_pem_blocks_it_did_not_know() {
        let text = "connecting to nats://nats:hunter2@10.0.0.1:4222 with -----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY----- done";
        let out = scrub_patterns(text);
        assert!(!out.contains("hunter2"), "{out}");
        assert!(!out.contains("MIIE"), "{out}");
        assert!(out.contains("nats://<redacted>@10.0.0.1:4222"), "{out}");
        assert!(out.ends_with(" done"), "{out}");
    }

    #[test]
    fn leaves_ordinary_text_alone() {
        let text = "created container c-1 on unix:///var/run/docker.sock";
        assert!(matches!(scrub_patterns(text), Cow::Borrowed(_)));
        let s = Secrets::new();
        assert_eq!(s.scrub(text), text);
    }

    #[test]
    fn short_values_are_not_scrubbed() {
        let mut s = Secrets::new();
        s.add("ab");
        assert!(s.is_empty());
    }

    #[test]
    fn secret_key_names() {
        for k in [
            "password",
            "Password",
            "private_key",
            "PrivateKey",
            "secret_access_key",
            "token",
            "mbus",
            "Mbus",
            "credentials_json",
        ] {
            assert!(is_secret_key(k), "{k}");
        }
        for k in ["host", "name", "endpoint", "user"] {
            assert!(!is_secret_key(k), "{k}");
        }
    }
}
