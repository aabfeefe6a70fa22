//! bosh-deployment's `bosh.yml` with ops files applied, and the checks of a
//! manifest's CPI wiring against the release.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use serde_yaml_ng::Value as Yaml;

use crate::gopatch::{apply_ops, interpolate, key, matches, variables};
use crate::release::{
    job_names, job_spec, read_yaml, release_dir, render, yaml_str, JobSpec, Rendered,
};
use crate::{RELEASE_NAME, TEST_PEM_CA, TEST_PEM_CERT, TEST_PEM_KEY};

pub(crate) fn to_json(v: &Yaml) -> Value {
    serde_json::to_value(v).expect("YAML as JSON")
}

/// Every property path set under `prefix` must be declared in `spec`, lie below a
/// declared property (a hash-valued one such as a certificate), or be a parent of
/// declared ones (e.g. `agent.blobstore: null`).
pub(crate) fn undeclared_properties(
    spec: &JobSpec,
    prefix: &str,
    value: &Value,
    out: &mut Vec<String>,
) {
    let declared = |p: &str| spec.properties.contains_key(p);
    let below_declared = |p: &str| {
        spec.properties
            .keys()
            .any(|d| p.starts_with(&format!("{d}.")))
    };
    let parent_of_declared = |p: &str| {
        spec.properties
            .keys()
            .any(|d| d.starts_with(&format!("{p}.")))
    };
    if declared(prefix) || below_declared(prefix) {
        return;
    }
    match value {
        Value::Object(map) if parent_of_declared(prefix) => {
            for (k, v) in map {
                undeclared_properties(spec, &format!("{prefix}.{k}"), v, out);
            }
        }
        Value::Null if parent_of_declared(prefix) => {}
        _ => out.push(prefix.to_owned()),
    }
}

pub(crate) fn ops_dir() -> PathBuf {
    release_dir().join("ops")
}

/// `BOSH_DEPLOYMENT_DIR`: a checkout of cloudfoundry/bosh-deployment. When set, the
/// ops files are applied to its real `bosh.yml` (and the compat test starts from its
/// real `docker/cpi.yml`) instead of the fixtures that stand for them.
pub(crate) fn bosh_deployment_dir() -> Option<PathBuf> {
    std::env::var_os("BOSH_DEPLOYMENT_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}

pub(crate) fn skeleton() -> Yaml {
    match bosh_deployment_dir() {
        Some(dir) => read_yaml(&dir.join("bosh.yml")),
        None => read_yaml(&release_dir().join("test/fixtures/bosh-deployment-skeleton.yml")),
    }
}

/// The variables an operator passes to `bosh create-env` with our ops files, plus
/// those bosh.yml itself uses; each ops file may use only these (and
/// docs/bosh-release.md lists them).
pub(crate) fn sample_vars(docker_host: &str) -> BTreeMap<&'static str, Yaml> {
    let tls: Yaml = serde_yaml_ng::to_value(json!({
        "ca": TEST_PEM_CA, "certificate": TEST_PEM_CERT, "private_key": TEST_PEM_KEY,
    }))
    .expect("tls yaml");
    BTreeMap::from([
        (
            "container_cpi_release_tarball",
            key("/tmp/bosh-container-cpi.tgz"),
        ),
        ("docker_host", key(docker_host)),
        ("docker_tls", tls),
        ("network", key("bosh-test-net")),
        ("internal_ip", key("10.245.0.11")),
        ("internal_cidr", key("10.245.0.0/16")),
        ("internal_gw", key("10.245.0.1")),
        ("director_name", key("bosh-test")),
        ("mbus_bootstrap_password", key("mbus-secret-0451")),
    ])
}

/// Applies `ops` files in order to the bosh.yml skeleton and interpolates the
/// sample variables.
pub(crate) fn manifest_with(ops: &[&Path], docker_host: &str) -> Yaml {
    let mut doc = skeleton();
    let vars = sample_vars(docker_host);
    for path in ops {
        let file = path.display().to_string();
        let ops = read_yaml(path);
        let mut used = BTreeSet::new();
        variables(&ops, &mut used);
        for v in &used {
            assert!(
                vars.contains_key(v.as_str()),
                "{file} uses the unknown variable (({v}))"
            );
        }
        apply_ops(&mut doc, &ops, &file)
            .unwrap_or_else(|e| panic!("applying to bosh-deployment's bosh.yml shape: {e}"));
    }
    interpolate(&doc, &vars)
}

pub(crate) fn bosh_group(manifest: &Yaml) -> &Yaml {
    manifest["instance_groups"]
        .as_sequence()
        .and_then(|s| s.iter().find(|g| matches(g, "name", "bosh")))
        .expect("instance group bosh")
}

/// Checks the manifest's CPI wiring against the release and renders the CPI job
/// with the properties the director and create-env would give it; returns the two
/// rendered jobs (director's, create-env's).
pub(crate) fn check_cpi_wiring(manifest: &Yaml, file: &str) -> (Rendered, Rendered) {
    let releases = manifest["releases"].as_sequence().expect("releases");
    let ours = releases
        .iter()
        .find(|r| matches(r, "name", RELEASE_NAME))
        .unwrap_or_else(|| panic!("{file}: no release {RELEASE_NAME}"));
    assert!(
        yaml_str(ours, "url").is_some_and(|u| u.starts_with("file://"))
            && yaml_str(ours, "version").is_some(),
        "{file}: release entry {ours:?}"
    );
    let release_names: BTreeSet<&str> = releases
        .iter()
        .filter_map(|r| yaml_str(r, "name"))
        .collect();

    let group = bosh_group(manifest);
    let jobs = group["jobs"].as_sequence().expect("jobs");
    for job in jobs {
        let release = yaml_str(job, "release").unwrap_or_default();
        assert!(
            release_names.contains(release),
            "{file}: job {job:?} names a missing release"
        );
    }
    let cpi_job = group["properties"]["director"]["cpi_job"]
        .as_str()
        .unwrap_or_else(|| panic!("{file}: director.cpi_job is not set"));
    let job_entry = jobs
        .iter()
        .find(|j| matches(j, "name", cpi_job))
        .unwrap_or_else(|| {
            panic!("{file}: director.cpi_job {cpi_job} is not a job of the bosh group")
        });
    assert_eq!(yaml_str(job_entry, "release"), Some(RELEASE_NAME), "{file}");
    assert!(
        job_names().iter().any(|j| j == cpi_job),
        "{file}: {cpi_job} is not a job of the release"
    );
    let template = &manifest["cloud_provider"]["template"];
    assert_eq!(
        yaml_str(template, "name"),
        Some(cpi_job),
        "{file}: cloud_provider.template"
    );
    assert_eq!(yaml_str(template, "release"), Some(RELEASE_NAME), "{file}");

    let spec = job_spec(cpi_job);
    // Job-level properties replace the instance group's (BOSH v2 manifests).
    let director_props = match job_entry.get("properties") {
        Some(p) => to_json(p),
        None => to_json(&group["properties"]),
    };
    let create_env_props = to_json(&manifest["cloud_provider"]["properties"]);
    for (where_, props) in [
        ("director", &director_props),
        ("create-env", &create_env_props),
    ] {
        let section = props
            .get(cpi_job)
            .unwrap_or_else(|| panic!("{file}: no {cpi_job} properties for the {where_}'s CPI"));
        let mut bad = Vec::new();
        undeclared_properties(&spec, cpi_job, section, &mut bad);
        assert!(
            bad.is_empty(),
            "{file}: {where_} sets properties {cpi_job} does not declare: {bad:?}"
        );
    }
    (
        render(cpi_job, &director_props),
        render(cpi_job, &create_env_props),
    )
}
