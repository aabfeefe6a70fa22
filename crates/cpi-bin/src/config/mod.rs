//! The CPI's configuration: one JSON file, in our format or the Go Docker CPI's, plus
//! the director's cpi-config overrides from the request context.
//!
//! Our format (every key is documented in `docs/configuration.md`):
//!
//! ```json
//! {"backend": "docker",
//!  "agent": {"mbus": "https://mbus:PASSWORD@0.0.0.0:6868", "ntp": []},
//!  "docker": {"host": "unix:///var/run/docker.sock"},
//!  "containerd": {"socket": "/run/containerd/containerd.sock"},
//!  "fake": {"state_file": "/tmp/cpi-fake-state.json"}}
//! ```
//!
//! A file with a top-level `Actions` key is the Go Docker CPI's `cpi.json` and is
//! translated by [`go`] into that shape first. Either way every section present is
//! parsed into its typed struct (the backends own theirs and deny unknown fields; ours
//! report unknown keys through `serde_ignored`), then the selected backend is checked
//! for what its struct cannot express (a tcp host needs TLS, the agent needs an mbus).
//!
//! Every failure is a `CloudError` (never `NotImplemented`: the bosh CLI would take that
//! as "API v1" and hide the problem) whose message names the file, the key as the
//! operator wrote it, and what to do.

mod check;
pub mod fields;
pub mod go;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use backend_containerd::ContainerdConfig;
use backend_docker::DockerConfig;
use cpi_core::{AgentOptions, CpiError};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use check::{check_agent, check_containerd, check_docker};
use fields::struct_fields;

/// The largest config file we read. TLS material makes real ones a few KiB.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// Which backend runs the VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// `backend_docker::DockerCpi`.
    Docker,
    /// `backend_containerd::ContainerdCpi`.
    Containerd,
    /// `cpi_core::fake::FakeCpi`, with its state in a file.
    Fake,
}

impl BackendKind {
    /// The name, which is also the key of the backend's section.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Docker => "docker",
            BackendKind::Containerd => "containerd",
            BackendKind::Fake => "fake",
        }
    }

    fn fields(self) -> &'static [&'static str] {
        match self {
            BackendKind::Docker => struct_fields::<DockerConfig>(),
            BackendKind::Containerd => struct_fields::<ContainerdConfig>(),
            BackendKind::Fake => struct_fields::<FakeSection>(),
        }
    }
}

/// Which shape the file had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Ours (`backend` + sections).
    Ours,
    /// The Go Docker CPI's `cpi.json` (`Actions` + flags).
    GoDocker,
}

/// The fake backend's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeConfig {
    /// The JSON file holding the fake's world between processes (absolute: a relative
    /// path in the file is taken relative to the config file's directory).
    pub state_file: PathBuf,
}

/// The selected backend's settings, after context overrides.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendConfig {
    /// Docker.
    Docker(Box<DockerConfig>),
    /// containerd.
    Containerd(Box<ContainerdConfig>),
    /// The in-memory fake.
    Fake(FakeConfig),
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FakeSection {
    state_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct AgentSection {
    mbus: Option<String>,
    ntp: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct FileShape {
    backend: Option<BackendKind>,
    #[serde(default)]
    agent: AgentSection,
    #[allow(
        dead_code,
        reason = "parsed to validate every section; the selected one is read again with overrides"
    )]
    docker: Option<DockerConfig>,
    #[allow(
        dead_code,
        reason = "parsed to validate every section; the selected one is read again with overrides"
    )]
    containerd: Option<ContainerdConfig>,
    #[allow(
        dead_code,
        reason = "parsed to validate every section; the selected one is read again with overrides"
    )]
    fake: Option<FakeSection>,
}

/// What is wrong with a config, before it is phrased for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// A key's value is wrong; `key` is our dotted path (`docker.tls.ca`), or empty for
    /// the file as a whole; `what` reads after the key (`"is empty; set it to ..."`).
    Value {
        /// The key.
        key: String,
        /// What is wrong and the fix.
        what: String,
    },
    /// Keys nobody reads.
    Unknown(Vec<UnknownKey>),
}

/// A key nobody reads, with the keys that are valid beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKey {
    /// The dotted path of the key.
    pub key: String,
    /// The keys its object accepts.
    pub known: Vec<String>,
}

fn invalid(key: impl Into<String>, what: impl Into<String>) -> Invalid {
    Invalid::Value {
        key: key.into(),
        what: what.into(),
    }
}

/// The config file as read: its path and its JSON, before interpretation. The binary
/// collects secrets from `value` even when the file turns out to be invalid.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its content.
    pub value: Value,
}

impl ConfigFile {
    /// Reads and parses the file (at most [`MAX_CONFIG_BYTES`]).
    pub fn read(path: &Path) -> Result<ConfigFile, CpiError> {
        let fail =
            |what: String| CpiError::cloud(format!("config file {}: {what}", path.display()));
        let file = std::fs::File::open(path).map_err(|e| {
            fail(format!(
                "cannot be read: {e}; pass the CPI's config file as `cpi -configPath FILE` \
                 (see docs/configuration.md)"
            ))
        })?;
        if file.metadata().is_ok_and(|m| m.is_dir()) {
            return Err(fail(
                "is a directory; pass the config file itself with -configPath".into(),
            ));
        }
        let mut bytes = Vec::new();
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| fail(format!("cannot be read: {e}")))?;
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            return Err(fail(format!(
                "is larger than {MAX_CONFIG_BYTES} bytes; is -configPath pointing at the right file?"
            )));
        }
        let value = serde_json::from_slice(&bytes)
            .map_err(|e| fail(format!("is not valid JSON: {e}; fix the syntax")))?;
        Ok(ConfigFile {
            path: path.to_owned(),
            value,
        })
    }
}

/// Phrases [`Invalid`] for one file.
struct Describe<'a> {
    path: &'a Path,
    format: Format,
    names: &'a BTreeMap<String, String>,
}

impl Describe<'_> {
    fn file(&self) -> String {
        match self.format {
            Format::Ours => format!("config file {}", self.path.display()),
            Format::GoDocker => format!(
                "config file {} (the Go Docker CPI's cpi.json format)",
                self.path.display()
            ),
        }
    }

    /// Our dotted key path as the operator wrote it (the Go spelling for Go files).
    fn show(&self, key: &str) -> String {
        let best = self
            .names
            .iter()
            .filter(|(ours, _)| {
                key == ours.as_str()
                    || (key.starts_with(ours.as_str()) && key[ours.len()..].starts_with('.'))
            })
            .max_by_key(|(ours, _)| ours.len());
        match best {
            Some((ours, theirs)) => format!("{theirs}{}", &key[ours.len()..]),
            None => key.to_owned(),
        }
    }

    fn error(&self, problem: Invalid) -> CpiError {
        CpiError::cloud(match problem {
            Invalid::Value { key, what } if key.is_empty() => format!("{}: {what}", self.file()),
            Invalid::Value { key, what } => {
                format!("{}: key '{}' {what}", self.file(), self.show(&key))
            }
            Invalid::Unknown(keys) => {
                let list: Vec<String> = keys
                    .iter()
                    .map(|k| {
                        if k.known.is_empty() {
                            format!("'{}'", self.show(&k.key))
                        } else {
                            format!(
                                "'{}' (valid keys there: {})",
                                self.show(&k.key),
                                k.known.join(", ")
                            )
                        }
                    })
                    .collect();
                let (noun, them) = if keys.len() == 1 {
                    ("unknown key", "it")
                } else {
                    ("unknown keys", "them")
                };
                format!(
                    "{}: {noun} {}; remove {them} or correct the spelling (see docs/configuration.md)",
                    self.file(),
                    list.join(", ")
                )
            }
        })
    }
}

fn join_key(prefix: &str, rest: &str) -> String {
    match (prefix.is_empty(), rest.is_empty()) {
        (true, _) => rest.to_owned(),
        (false, true) => prefix.to_owned(),
        (false, false) => format!("{prefix}.{rest}"),
    }
}

/// Deserialises `value` into `T`, naming the failing key (under `prefix`) and
/// recording keys nobody read in `ignored`.
fn typed<T: DeserializeOwned>(
    value: &Value,
    prefix: &str,
    ignored: &mut Vec<String>,
) -> Result<T, Invalid> {
    let mut record = |path: serde_ignored::Path<'_>| {
        ignored.push(join_key(prefix, &fields::ignored_path(&path)))
    };
    let de = serde_ignored::Deserializer::new(value, &mut record);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { "" } else { path.as_str() };
        let message = e.inner().to_string();
        let what = if message.starts_with("unknown field") {
            format!("is not a setting here ({message}); remove it or correct the spelling")
        } else {
            format!("is invalid: {message}")
        };
        invalid(join_key(prefix, path), what)
    })
}

/// The keys valid beside an unknown key of our own structs.
fn known_beside(key: &str) -> Vec<String> {
    let parent = key.rsplit_once('.').map_or("", |(p, _)| p);
    let fields = match parent {
        "" => struct_fields::<FileShape>(),
        "agent" => struct_fields::<AgentSection>(),
        "fake" => struct_fields::<FakeSection>(),
        _ => &[],
    };
    fields.iter().map(|f| (*f).to_owned()).collect()
}

/// A loaded, validated config.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    /// Our format or the Go CPI's.
    pub format: Format,
    /// The selected backend.
    pub backend: BackendKind,
    /// What every VM's agent is told (mbus, NTP).
    pub agent: AgentOptions,
    /// The selected backend's section in our spelling, before context overrides.
    section: Map<String, Value>,
    /// Our key paths → the file's spelling (Go files only).
    names: BTreeMap<String, String>,
}

impl Config {
    /// Interprets and validates a config file.
    pub fn from_file(file: &ConfigFile) -> Result<Config, CpiError> {
        let no_names = BTreeMap::new();
        let plain = Describe {
            path: &file.path,
            format: Format::Ours,
            names: &no_names,
        };
        let Some(obj) = file.value.as_object() else {
            return Err(plain.error(invalid(
                "",
                "must hold a JSON object such as {\"backend\": \"docker\", \"agent\": {\"mbus\": \"...\"}} \
                 (see docs/configuration.md)",
            )));
        };
        let (format, value, names) = if go::is_go_format(obj) {
            let translated = go::translate(obj).map_err(|p| {
                Describe {
                    format: Format::GoDocker,
                    ..plain
                }
                .error(p)
            })?;
            (Format::GoDocker, translated.value, translated.names)
        } else {
            (Format::Ours, file.value.clone(), BTreeMap::new())
        };
        let describe = Describe {
            path: &file.path,
            format,
            names: &names,
        };

        let mut ignored = Vec::new();
        let shape: FileShape = typed(&value, "", &mut ignored).map_err(|p| describe.error(p))?;
        if !ignored.is_empty() {
            return Err(describe.error(Invalid::Unknown(
                ignored
                    .into_iter()
                    .map(|key| UnknownKey {
                        known: known_beside(&key),
                        key,
                    })
                    .collect(),
            )));
        }
        let backend = shape.backend.ok_or_else(|| {
            describe.error(invalid(
                "backend",
                "is missing; set it to \"docker\", \"containerd\" or \"fake\"",
            ))
        })?;
        check_agent(backend, &shape.agent).map_err(|p| describe.error(p))?;
        let section = match value.get(backend.name()) {
            Some(Value::Object(m)) => m.clone(),
            _ => Map::new(),
        };
        let config = Config {
            path: file.path.clone(),
            format,
            backend,
            agent: AgentOptions {
                mbus: shape.agent.mbus.unwrap_or_default(),
                ntp: shape.agent.ntp,
            },
            section,
            names,
        };
        // Check the selected backend's settings as the file gives them, so that a bad
        // file is reported as such whatever the director's context holds.
        config.backend_config(&Map::new())?;
        Ok(config)
    }

    fn describe(&self) -> Describe<'_> {
        Describe {
            path: &self.path,
            format: self.format,
            names: &self.names,
        }
    }

    /// The selected backend's settings with the request context's overrides applied.
    ///
    /// The director merges the properties of a cpi-config entry into the context; each
    /// top-level context key that names a setting of the selected backend's section
    /// (matched ignoring ASCII case: `host`, `Host`, `tls`, `api_version`, ...)
    /// replaces that setting (`null` restores the default). Other context keys are
    /// logged and ignored: the director may send keys that are not ours.
    pub fn backend_config(
        &self,
        overrides: &Map<String, Value>,
    ) -> Result<BackendConfig, CpiError> {
        let fields = self.backend.fields();
        let mut section = self.section.clone();
        let mut overridden: BTreeMap<&'static str, String> = BTreeMap::new();
        for (key, value) in overrides {
            let field = fields
                .iter()
                .find(|f| **f == key.as_str())
                .or_else(|| fields.iter().find(|f| f.eq_ignore_ascii_case(key)));
            match field {
                Some(field) => {
                    section.retain(|k, _| !k.eq_ignore_ascii_case(field));
                    // `null` means "not set": the backend's default applies.
                    if !value.is_null() {
                        section.insert((*field).to_owned(), value.clone());
                    }
                    overridden.insert(field, key.clone());
                    tracing::info!(
                        key = %key,
                        setting = %format!("{}.{field}", self.backend.name()),
                        "the request context (director cpi-config) overrides a config file setting"
                    );
                }
                None => tracing::warn!(
                    key = %key,
                    backend = self.backend.name(),
                    "request context key is not a setting of this backend; ignored"
                ),
            }
        }
        let prefix = self.backend.name();
        let value = Value::Object(section);
        let mut ignored = Vec::new();
        let result = match self.backend {
            BackendKind::Docker => typed::<DockerConfig>(&value, prefix, &mut ignored)
                .and_then(|mut c| check_docker(&mut c).map(|()| c))
                .map(|c| BackendConfig::Docker(Box::new(c))),
            BackendKind::Containerd => typed::<ContainerdConfig>(&value, prefix, &mut ignored)
                .and_then(|c| check_containerd(&c).map(|()| c))
                .map(|c| BackendConfig::Containerd(Box::new(c))),
            BackendKind::Fake => typed::<FakeSection>(&value, prefix, &mut ignored)
                .and_then(|s| self.fake_config(s))
                .map(BackendConfig::Fake),
        };
        result.map_err(|problem| self.phrase(problem, &overridden))
    }

    /// Phrases a problem, blaming the request context when the key came from there.
    fn phrase(&self, problem: Invalid, overridden: &BTreeMap<&'static str, String>) -> CpiError {
        let describe = self.describe();
        if let Invalid::Value { key, what } = &problem {
            let field = key
                .strip_prefix(self.backend.name())
                .and_then(|rest| rest.strip_prefix('.'))
                .map(|rest| rest.split('.').next().unwrap_or(rest));
            if let Some(context_key) = field.and_then(|f| overridden.get(f)) {
                return CpiError::cloud(format!(
                    "request context key '{context_key}' (a director cpi-config property) overrides \
                     key '{}' of {}, and its value {what}; fix the director's cpi-config",
                    describe.show(key),
                    describe.file()
                ));
            }
        }
        let err = describe.error(problem);
        if overridden.is_empty() {
            return err;
        }
        let keys: Vec<&str> = overridden.values().map(String::as_str).collect();
        CpiError::cloud(format!(
            "{} (with the request context's cpi-config overrides of: {})",
            err.message,
            keys.join(", ")
        ))
    }

    fn fake_config(&self, section: FakeSection) -> Result<FakeConfig, Invalid> {
        let state_file = section.state_file.filter(|p| !p.as_os_str().is_empty());
        let Some(state_file) = state_file else {
            return Err(invalid(
                "fake.state_file",
                "is missing; set it to a writable file such as /tmp/cpi-fake-state.json",
            ));
        };
        let state_file = if state_file.is_absolute() {
            state_file
        } else {
            self.path
                .parent()
                .unwrap_or_else(|| Path::new("."))
                .join(state_file)
        };
        Ok(FakeConfig { state_file })
    }
}

#[cfg(test)]
mod tests;
