//! The release directory, BOSH-style rendering through `release/test/render.rb`, and
//! running the `cpi` binary with what was rendered.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use cpi_tests::{cpi_bin, workspace_root, CpiRunner};
use serde_json::{json, Value};
use serde_yaml_ng::Value as Yaml;

pub(crate) fn release_dir() -> PathBuf {
    workspace_root().join("release")
}

pub(crate) fn read_yaml(path: &Path) -> Yaml {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml_ng::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
}

pub(crate) fn yaml_str<'a>(v: &'a Yaml, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Yaml::as_str)
}

/// A job's spec: its name, templates (source -> destination), packages and
/// declared property names.
pub(crate) struct JobSpec {
    pub(crate) name: String,
    pub(crate) templates: BTreeMap<String, String>,
    pub(crate) packages: Vec<String>,
    pub(crate) properties: BTreeMap<String, Yaml>,
}

pub(crate) fn job_spec(job: &str) -> JobSpec {
    let spec = read_yaml(&release_dir().join("jobs").join(job).join("spec"));
    let name = yaml_str(&spec, "name").unwrap_or_default().to_owned();
    let templates = spec
        .get("templates")
        .and_then(Yaml::as_mapping)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let packages = spec
        .get("packages")
        .and_then(Yaml::as_sequence)
        .map(|s| {
            s.iter()
                .filter_map(|p| p.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let properties = spec
        .get("properties")
        .and_then(Yaml::as_mapping)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.clone())))
                .collect()
        })
        .unwrap_or_default();
    JobSpec {
        name,
        templates,
        packages,
        properties,
    }
}

pub(crate) fn job_names() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(release_dir().join("jobs"))
        .expect("release/jobs")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

pub(crate) fn require_ruby() {
    let ok = Command::new("ruby")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "ruby is needed to render the BOSH job templates: `apt-get install ruby` (scripts/lib.sh \
         ensure_packages installs it; `bash scripts/test.sh` runs everything)"
    );
}

/// The rendered job directory (as `/var/vcap/jobs/<job>`), in a temp dir.
pub(crate) struct Rendered {
    dir: tempfile::TempDir,
    job: String,
}

impl Rendered {
    pub(crate) fn job_dir(&self) -> PathBuf {
        self.dir.path().join("jobs").join(&self.job)
    }

    pub(crate) fn file(&self, rel: &str) -> String {
        let path = self.job_dir().join(rel);
        fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("rendered {} is missing: {e}", path.display()))
    }

    pub(crate) fn config_path(&self) -> PathBuf {
        self.job_dir().join("config/cpi.json")
    }

    pub(crate) fn config(&self) -> Value {
        let text = self.file("config/cpi.json");
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("rendered config/cpi.json is not JSON: {e}\n{text}"))
    }

    /// Lays out the package the way BOSH installs it (`<packages>/container_cpi/bin/cpi`,
    /// here a link to the binary under test) and returns a launcher that runs the
    /// rendered `bin/cpi` with `BOSH_PACKAGES_DIR` and `BOSH_JOBS_DIR` set, as
    /// `bosh create-env` does.
    pub(crate) fn launcher(&self) -> PathBuf {
        let packages = self.dir.path().join("packages");
        let bin_dir = packages.join("container_cpi/bin");
        fs::create_dir_all(&bin_dir).expect("package dir");
        let link = bin_dir.join("cpi");
        if !link.exists() {
            std::os::unix::fs::symlink(cpi_bin(), &link).expect("link the cpi binary");
        }
        let launcher = self.dir.path().join("launch-cpi.sh");
        let script = format!(
            "#!/bin/sh\nBOSH_PACKAGES_DIR='{}' BOSH_JOBS_DIR='{}' exec /bin/bash '{}'\n",
            packages.display(),
            self.dir.path().join("jobs").display(),
            self.job_dir().join("bin/cpi").display()
        );
        fs::write(&launcher, script).expect("write launcher");
        let mut perms = fs::metadata(&launcher).expect("launcher").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        fs::set_permissions(&launcher, perms).expect("chmod launcher");
        launcher
    }
}

/// Renders every template of `job` with `properties` (as a manifest gives them);
/// the error is the harness's stderr.
pub(crate) fn try_render(job: &str, properties: &Value) -> Result<Rendered, String> {
    require_ruby();
    let dir = tempfile::tempdir().expect("tempdir");
    let props = dir.path().join("properties.json");
    fs::write(&props, properties.to_string()).expect("write properties");
    let out = dir.path().join("jobs").join(job);
    let output = Command::new("ruby")
        .arg(release_dir().join("test/render.rb"))
        .arg(release_dir().join("jobs").join(job))
        .arg(&props)
        .arg(&out)
        .output()
        .expect("run ruby");
    if output.status.success() {
        Ok(Rendered {
            dir,
            job: job.to_owned(),
        })
    } else {
        Err(format!(
            "exit {:?}: {}{}",
            output.status.code(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

pub(crate) fn render(job: &str, properties: &Value) -> Rendered {
    try_render(job, properties)
        .unwrap_or_else(|e| panic!("rendering job {job} with {properties} failed: {e}"))
}

/// `info` through the rendered wrapper and directly with the rendered config; both
/// must succeed. Returns the wrapper's response log.
pub(crate) fn assert_info_ok(rendered: &Rendered) -> String {
    let direct = CpiRunner::new(rendered.config_path()).call("info", json!([]));
    direct.assert_well_formed();
    assert!(
        direct.error.is_none(),
        "info with the rendered config failed:\n{}\nconfig:\n{}",
        direct.describe(),
        rendered.file("config/cpi.json")
    );
    assert_eq!(
        direct.result["api_version"],
        json!(2),
        "{}",
        direct.describe()
    );

    let wrapper = CpiRunner {
        bin: rendered.launcher(),
        config: rendered.config_path(),
    };
    let via_wrapper = wrapper.call("info", json!([]));
    via_wrapper.assert_well_formed();
    assert!(
        via_wrapper.error.is_none() && via_wrapper.exit_code == 0,
        "info through the rendered bin/cpi failed:\n{}\nbin/cpi:\n{}",
        via_wrapper.describe(),
        rendered.file("bin/cpi")
    );
    assert_eq!(via_wrapper.result, direct.result);
    via_wrapper.log
}

/// `info` with the rendered config must fail with a `CloudError` mentioning `needle`.
pub(crate) fn assert_info_refuses(rendered: &Rendered, needle: &str) {
    let resp = CpiRunner::new(rendered.config_path()).call("info", json!([]));
    resp.assert_well_formed();
    let err = resp.expect_error("Bosh::Clouds::CloudError");
    assert!(
        err.message.contains(needle),
        "the CPI refused the config, but not because of '{needle}': {}",
        err.message
    );
}

pub(crate) fn doctor_findings(config: &Path) -> BTreeMap<String, Value> {
    let output = Command::new(cpi_bin())
        .args(["doctor", "--json", "-configPath"])
        .arg(config)
        .output()
        .expect("run cpi doctor");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "cpi doctor --json printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter_map(|f| Some((f["id"].as_str()?.to_owned(), f.clone())))
        .collect()
}
