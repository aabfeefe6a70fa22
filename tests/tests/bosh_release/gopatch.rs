//! A go-patch interpreter (the ops-file language of `bosh int` / `bosh create-env`),
//! enough for bosh-deployment's ops files: `replace` and `remove`; `key`, `key?`,
//! `N`, `-`, `field=value`, `field=value?`; once a `?` is seen the rest of the path is
//! optional. Also `((variable))` discovery and interpolation.

use std::collections::{BTreeMap, BTreeSet};

use serde_yaml_ng::Value as Yaml;

use crate::release::yaml_str;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Token {
    /// `key` or `key?`
    Key(String, bool),
    /// `N`
    Index(usize),
    /// `-`
    Append,
    /// `field=value` or `field=value?`
    Match(String, String, bool),
}

pub(crate) fn parse_path(path: &str) -> Result<Vec<Token>, String> {
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| format!("path {path:?} must start with /"))?;
    rest.split('/')
        .map(|raw| {
            let (body, optional) = match raw.strip_suffix('?') {
                Some(b) => (b, true),
                None => (raw, false),
            };
            if body.is_empty() {
                return Err(format!("empty segment in {path:?}"));
            }
            Ok(if body == "-" {
                Token::Append
            } else if let Ok(i) = body.parse::<usize>() {
                Token::Index(i)
            } else if let Some((k, v)) = body.split_once('=') {
                Token::Match(k.to_owned(), v.to_owned(), optional)
            } else {
                Token::Key(body.to_owned(), optional)
            })
        })
        .collect()
}

pub(crate) fn key(s: &str) -> Yaml {
    Yaml::String(s.to_owned())
}

pub(crate) fn matches(item: &Yaml, field: &str, value: &str) -> bool {
    item.get(field).and_then(Yaml::as_str) == Some(value)
}

/// Applies one `replace` (`value: Some`) or `remove` (`None`) operation. Once an
/// optional token (`?`) is seen, the rest of the path is optional too (go-patch).
pub(crate) fn apply_at(
    node: &mut Yaml,
    tokens: &[Token],
    value: Option<&Yaml>,
    mut optional: bool,
    path: &str,
) -> Result<(), String> {
    let (token, rest) = tokens.split_first().ok_or("empty path")?;
    if let Token::Key(_, true) | Token::Match(_, _, true) = token {
        optional = true;
    }
    let last = rest.is_empty();
    let missing = |what: &str| format!("{path}: {what} not found");
    match token {
        Token::Key(k, _) => {
            let map = node
                .as_mapping_mut()
                .ok_or_else(|| format!("{path}: '{k}' is looked up in a non-map"))?;
            if last {
                match value {
                    Some(v) => {
                        if !map.contains_key(key(k)) && !optional {
                            return Err(missing(&format!("key '{k}'")));
                        }
                        map.insert(key(k), v.clone());
                    }
                    None => {
                        if map.remove(key(k)).is_none() && !optional {
                            return Err(missing(&format!("key '{k}'")));
                        }
                    }
                }
                return Ok(());
            }
            if !map.contains_key(key(k)) {
                if !optional || value.is_none() {
                    return Err(missing(&format!("key '{k}'")));
                }
                let fresh = match rest[0] {
                    Token::Key(..) => Yaml::Mapping(Default::default()),
                    _ => Yaml::Sequence(Vec::new()),
                };
                map.insert(key(k), fresh);
            }
            let child = map.get_mut(key(k)).ok_or_else(|| missing(k))?;
            apply_at(child, rest, value, optional, path)
        }
        Token::Index(i) => {
            let seq = node
                .as_sequence_mut()
                .ok_or_else(|| format!("{path}: index {i} into a non-list"))?;
            if *i >= seq.len() {
                return Err(missing(&format!("index {i}")));
            }
            if last {
                match value {
                    Some(v) => seq[*i] = v.clone(),
                    None => {
                        seq.remove(*i);
                    }
                }
                return Ok(());
            }
            apply_at(&mut seq[*i], rest, value, optional, path)
        }
        Token::Append => {
            let seq = node
                .as_sequence_mut()
                .ok_or_else(|| format!("{path}: '-' on a non-list"))?;
            match (last, value) {
                (true, Some(v)) => {
                    seq.push(v.clone());
                    Ok(())
                }
                _ => Err(format!("{path}: '-' is only valid at the end of a replace")),
            }
        }
        Token::Match(field, want, _) => {
            let seq = node
                .as_sequence_mut()
                .ok_or_else(|| format!("{path}: {field}={want} in a non-list"))?;
            let found = seq.iter().position(|item| matches(item, field, want));
            match (found, last, value) {
                (Some(i), true, Some(v)) => {
                    seq[i] = v.clone();
                    Ok(())
                }
                (Some(i), true, None) => {
                    seq.remove(i);
                    Ok(())
                }
                (Some(i), false, _) => apply_at(&mut seq[i], rest, value, optional, path),
                (None, _, None) if optional => Ok(()),
                (None, _, Some(v)) if optional => {
                    if last {
                        seq.push(v.clone());
                        Ok(())
                    } else {
                        let mut fresh = serde_yaml_ng::Mapping::new();
                        fresh.insert(key(field), key(want));
                        seq.push(Yaml::Mapping(fresh));
                        let end = seq.len() - 1;
                        apply_at(&mut seq[end], rest, value, optional, path)
                    }
                }
                (None, _, _) => Err(missing(&format!("element {field}={want}"))),
            }
        }
    }
}

pub(crate) fn apply_ops(doc: &mut Yaml, ops: &Yaml, file: &str) -> Result<(), String> {
    let list = ops
        .as_sequence()
        .ok_or_else(|| format!("{file}: an ops file is a list of operations"))?;
    for op in list {
        let kind = yaml_str(op, "type").ok_or_else(|| format!("{file}: op without type"))?;
        let path = yaml_str(op, "path").ok_or_else(|| format!("{file}: op without path"))?;
        let tokens = parse_path(path)?;
        match kind {
            "replace" => {
                let value = op
                    .get("value")
                    .ok_or_else(|| format!("{file}: replace {path} has no value"))?;
                apply_at(doc, &tokens, Some(value), false, path)
            }
            "remove" => apply_at(doc, &tokens, None, false, path),
            other => Err(format!("{file}: unknown op type {other}")),
        }
        .map_err(|e| format!("{file}: {e}"))?;
    }
    Ok(())
}

/// `((name))` variables used anywhere in `v`.
pub(crate) fn variables(v: &Yaml, out: &mut BTreeSet<String>) {
    match v {
        Yaml::String(s) => {
            let mut rest = s.as_str();
            while let Some(start) = rest.find("((") {
                let Some(len) = rest[start..].find("))") else {
                    break;
                };
                out.insert(rest[start + 2..start + len].to_owned());
                rest = &rest[start + len + 2..];
            }
        }
        Yaml::Sequence(s) => s.iter().for_each(|i| variables(i, out)),
        Yaml::Mapping(m) => m.iter().for_each(|(k, v)| {
            variables(k, out);
            variables(v, out);
        }),
        Yaml::Tagged(t) => variables(&t.value, out),
        _ => {}
    }
}

/// Replaces `((name))` by `vars[name]` (a whole-string variable takes the value's
/// type, as `bosh int` does).
pub(crate) fn interpolate(v: &Yaml, vars: &BTreeMap<&str, Yaml>) -> Yaml {
    match v {
        Yaml::String(s) => {
            if let Some(name) = s.strip_prefix("((").and_then(|r| r.strip_suffix("))")) {
                if let Some(val) = vars.get(name) {
                    return val.clone();
                }
            }
            let mut text = s.clone();
            for (name, val) in vars {
                if let Some(sv) = val.as_str() {
                    text = text.replace(&format!("(({name}))"), sv);
                }
            }
            Yaml::String(text)
        }
        Yaml::Sequence(s) => Yaml::Sequence(s.iter().map(|i| interpolate(i, vars)).collect()),
        Yaml::Mapping(m) => Yaml::Mapping(
            m.iter()
                .map(|(k, v)| (k.clone(), interpolate(v, vars)))
                .collect(),
        ),
        other => other.clone(),
    }
}
