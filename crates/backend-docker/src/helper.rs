//! Short-lived helper containers: small shell scripts run on the daemon's host, for
//! what the Docker API cannot do itself (mounting a disk into a running VM when the
//! daemon is remote, probing the runtime's capability bounding set, reading the
//! operating system of an image).
//!
//! A helper is created, started, waited for, read and removed within one call; it
//! carries the owner labels so an interrupted call leaves something findable.

use std::collections::HashMap;

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, LogsOptions, RemoveContainerOptions, WaitContainerOptions,
};
use cpi_core::CallContext;
use futures_util::StreamExt;

use crate::client::Client;
use crate::error::{DockerError, Result};
use crate::labels;

/// What a helper needs.
#[derive(Debug, Clone, Default)]
pub struct HelperSpec {
    /// What it is for, in messages (`attaching vol-1 to c-1`).
    pub purpose: String,
    /// The image to run (must have `/bin/sh`).
    pub image: String,
    /// The `/bin/sh -c` script.
    pub script: String,
    /// Docker `Binds`.
    pub binds: Vec<String>,
    /// Capabilities to add.
    pub cap_add: Vec<String>,
    /// Share the host's PID namespace.
    pub pid_host: bool,
}

impl HelperSpec {
    /// The container body (pure).
    pub fn body(&self, ctx: &CallContext) -> ContainerCreateBody {
        let labels: HashMap<String, String> = labels::base(labels::KIND_HELPER, ctx);
        ContainerCreateBody {
            image: Some(self.image.clone()),
            entrypoint: Some(vec!["/bin/sh".into()]),
            cmd: Some(vec!["-c".into(), self.script.clone()]),
            user: Some("0".into()),
            working_dir: Some("/".into()),
            labels: Some(labels),
            network_disabled: Some(true),
            host_config: Some(HostConfig {
                binds: (!self.binds.is_empty()).then(|| self.binds.clone()),
                cap_add: (!self.cap_add.is_empty()).then(|| self.cap_add.clone()),
                security_opt: Some(vec!["apparmor=unconfined".into(), "label=disable".into()]),
                pid_mode: self.pid_host.then(|| "host".to_owned()),
                network_mode: Some("none".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// The output of a helper that exited 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperOutput {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs a helper to completion and removes it. A non-zero exit is an error carrying
/// the helper's output.
pub async fn run(client: &Client, ctx: &CallContext, spec: &HelperSpec) -> Result<HelperOutput> {
    let name = format!("bosh-cpi-helper-{}", uuid::Uuid::new_v4());
    tracing::debug!(helper = %name, purpose = %spec.purpose, image = %spec.image, "running helper container");
    client
        .docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.clone()),
                ..Default::default()
            }),
            spec.body(ctx),
        )
        .await
        .map_err(client.err(format!(
            "creating helper container {name} ({}) from image {}",
            spec.purpose, spec.image
        )))?;
    let result = run_created(client, &name, spec).await;
    let removed = client
        .docker
        .remove_container(
            &name,
            Some(RemoveContainerOptions {
                force: true,
                v: true,
                ..Default::default()
            }),
        )
        .await
        .map_err(client.err(format!("removing helper container {name}")));
    match (result, removed) {
        (Ok(out), Ok(())) => Ok(out),
        (Ok(out), Err(e)) => {
            tracing::warn!(helper = %name, error = %e, "could not remove helper container");
            Ok(out)
        }
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(cleanup)) => Err(e.with_cleanup(vec![cleanup])),
    }
}

async fn run_created(client: &Client, name: &str, spec: &HelperSpec) -> Result<HelperOutput> {
    client
        .docker
        .start_container(name, None)
        .await
        .map_err(client.err(format!(
            "starting helper container {name} ({})",
            spec.purpose
        )))?;
    let mut wait = client.docker.wait_container(
        name,
        Some(WaitContainerOptions {
            condition: "not-running".into(),
        }),
    );
    let mut exit_code = 0i64;
    while let Some(item) = wait.next().await {
        match item {
            Ok(r) => exit_code = r.status_code,
            Err(bollard::errors::Error::DockerContainerWaitError { code, .. }) => exit_code = code,
            Err(e) => {
                return Err(DockerError::api(
                    &client.endpoint,
                    format!("waiting for helper container {name} ({})", spec.purpose),
                    e,
                ))
            }
        }
    }
    let mut logs = client.docker.logs(
        name,
        Some(LogsOptions {
            stdout: true,
            stderr: true,
            tail: "all".into(),
            ..Default::default()
        }),
    );
    let (mut stdout, mut stderr) = (String::new(), String::new());
    while let Some(item) = logs.next().await {
        match item {
            Ok(bollard::container::LogOutput::StdErr { message }) => {
                stderr.push_str(&String::from_utf8_lossy(&message));
            }
            Ok(other) => stdout.push_str(&String::from_utf8_lossy(&other.into_bytes())),
            Err(e) => {
                return Err(DockerError::api(
                    &client.endpoint,
                    format!("reading the output of helper container {name}"),
                    e,
                ))
            }
        }
    }
    if exit_code != 0 {
        let mut output = format!("{}\n{}", stdout.trim(), stderr.trim())
            .trim()
            .to_owned();
        if output.len() > 2000 {
            output.truncate(2000);
            output.push_str("...");
        }
        return Err(DockerError::Helper {
            endpoint: client.endpoint.clone(),
            purpose: spec.purpose.clone(),
            exit_code,
            output,
        });
    }
    Ok(HelperOutput { stdout, stderr })
}

/// Quotes a string for `/bin/sh` (single quotes, with embedded quotes escaped).
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("/srv/state/vms/c-1"), "/srv/state/vms/c-1");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("$(reboot)"), "'$(reboot)'");
    }

    #[test]
    fn helper_body_is_confined_to_what_it_needs() {
        let spec = HelperSpec {
            purpose: "test".into(),
            image: "img".into(),
            script: "true".into(),
            binds: vec!["/srv:/cpi-state:rshared".into()],
            cap_add: vec!["SYS_ADMIN".into()],
            pid_host: false,
        };
        let body = spec.body(&CallContext::default());
        let host = body.host_config.expect("host");
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        assert_eq!(host.privileged, None);
        assert_eq!(host.pid_mode, None);
        assert_eq!(host.cap_add, Some(vec!["SYS_ADMIN".to_owned()]));
        assert_eq!(body.cmd, Some(vec!["-c".to_owned(), "true".to_owned()]));
        assert!(labels::is_ours(body.labels.as_ref(), labels::KIND_HELPER));
    }
}
