//! Knowing a config struct's keys without a list to keep in sync.
//!
//! The backend crates own their config structs and may add settings at any time.
//! Context overrides, the Go config's case-insensitive keys and the "known keys here"
//! hints all need the field names, so we ask serde for them: a derived `Deserialize`
//! hands its field list to `Deserializer::deserialize_struct`, and [`struct_fields`]
//! captures it there.

use std::fmt;

use serde::de::{self, DeserializeOwned, Visitor};
use serde::forward_to_deserialize_any;

/// The JSON keys a derived `Deserialize` struct accepts (empty for anything that is
/// not a struct).
pub fn struct_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut fields = None;
    // The grabber always fails after recording the list; the error carries nothing.
    let _ = T::deserialize(FieldGrabber(&mut fields));
    fields.unwrap_or(&[])
}

/// The field of `T` that `key` names, ignoring ASCII case (exact match first), as
/// Go's `encoding/json` matches keys.
pub fn match_field<T: DeserializeOwned>(key: &str) -> Option<&'static str> {
    let fields = struct_fields::<T>();
    fields
        .iter()
        .find(|f| **f == key)
        .or_else(|| fields.iter().find(|f| f.eq_ignore_ascii_case(key)))
        .copied()
}

struct FieldGrabber<'a>(&'a mut Option<&'static [&'static str]>);

#[derive(Debug)]
struct Stop;

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field list captured")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: fmt::Display>(_msg: T) -> Self {
        Stop
    }
}

impl<'de> de::Deserializer<'de> for FieldGrabber<'_> {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Stop> {
        *self.0 = Some(fields);
        Err(Stop)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

/// Renders a `serde_ignored` path as `a.b.c`, leaving out the `?` segments it adds for
/// `Option`s and newtypes.
pub fn ignored_path(path: &serde_ignored::Path<'_>) -> String {
    let mut parts = Vec::new();
    let mut cur = path;
    loop {
        match cur {
            serde_ignored::Path::Root => break,
            serde_ignored::Path::Seq { parent, index } => {
                parts.push(index.to_string());
                cur = parent;
            }
            serde_ignored::Path::Map { parent, key } => {
                parts.push(key.clone());
                cur = parent;
            }
            serde_ignored::Path::Some { parent }
            | serde_ignored::Path::NewtypeStruct { parent }
            | serde_ignored::Path::NewtypeVariant { parent } => cur = parent,
        }
    }
    parts.reverse();
    parts.join(".")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    #[allow(dead_code, reason = "only the field list is read")]
    struct Sample {
        host: String,
        api_version: Option<String>,
    }

    #[test]
    fn captures_derived_fields() {
        assert_eq!(struct_fields::<Sample>(), &["host", "api_version"]);
        assert_eq!(struct_fields::<String>(), &[] as &[&str]);
        let docker = struct_fields::<backend_docker::DockerConfig>();
        assert!(
            docker.contains(&"host") && docker.contains(&"tls"),
            "{docker:?}"
        );
    }

    #[test]
    fn matches_case_insensitively_preferring_exact() {
        assert_eq!(match_field::<Sample>("Host"), Some("host"));
        assert_eq!(match_field::<Sample>("API_VERSION"), Some("api_version"));
        assert_eq!(match_field::<Sample>("hosts"), None);
    }

    #[test]
    fn ignored_paths_read_like_keys() {
        #[derive(Deserialize)]
        #[allow(dead_code, reason = "only the ignored keys are read")]
        struct Outer {
            inner: Option<Inner>,
        }
        #[derive(Deserialize)]
        #[allow(dead_code, reason = "only the ignored keys are read")]
        struct Inner {
            a: u8,
        }
        let mut seen = Vec::new();
        let value = serde_json::json!({"inner": {"a": 1, "b": 2}, "c": 3});
        let _: Outer = serde_ignored::deserialize(&value, |p| seen.push(ignored_path(&p)))
            .expect("deserialize");
        seen.sort();
        assert_eq!(seen, vec!["c".to_owned(), "inner.b".to_owned()]);
    }
}
