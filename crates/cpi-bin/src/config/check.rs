//! The rules a typed config cannot express: a tcp Docker host needs TLS, the real
//! backends need an agent mbus, paths must be absolute. Each failure names our key
//! path and says what to do; [`super::Describe`] turns it into the file's spelling.

use backend_containerd::ContainerdConfig;
use backend_docker::DockerConfig;

use super::{invalid, AgentSection, BackendKind, Invalid};

pub(super) fn check_agent(backend: BackendKind, agent: &AgentSection) -> Result<(), Invalid> {
    let needs_mbus = backend != BackendKind::Fake;
    match agent.mbus.as_deref() {
        None | Some("") if needs_mbus => Err(invalid(
            "agent.mbus",
            format!(
                "is missing: the {} backend tells every VM's agent where to listen; set it to the \
                 agent's mbus URL with its user and password (the director manifest's mbus URL, \
                 like https://mbus:PASSWORD@0.0.0.0:6868)",
                backend.name()
            ),
        )),
        Some(mbus) if !mbus.is_empty() && !mbus.contains("://") => Err(invalid(
            "agent.mbus",
            "is not a URL; set it to the agent's mbus URL with its user and password (like \
             https://mbus:PASSWORD@0.0.0.0:6868; the value is not shown: it holds a password)",
        )),
        _ => Ok(()),
    }
}

pub(super) fn check_docker(c: &mut DockerConfig) -> Result<(), Invalid> {
    if c.api_version.as_deref() == Some("") {
        c.api_version = None;
    }
    if c.host.is_empty() {
        return Err(invalid(
            "docker.host",
            "is empty; set it to unix:///var/run/docker.sock, or to tcp://HOST:2376 together with docker.tls",
        ));
    }
    match c.host.split_once("://") {
        Some(("unix", path)) if path.starts_with('/') => {}
        Some(("unix", _)) => {
            return Err(invalid(
                "docker.host",
                format!(
                    "is '{}': a unix:// host needs an absolute socket path, as in unix:///var/run/docker.sock",
                    c.host
                ),
            ))
        }
        Some(("tcp", addr)) if !addr.is_empty() => {
            if c.tls.is_none() {
                return Err(invalid(
                    "docker.tls",
                    format!(
                        "is missing: docker.host '{}' is a tcp:// address, which needs mutual TLS; \
                         add \"tls\": {{\"ca\": PEM, \"certificate\": PEM, \"private_key\": PEM}}, \
                         or use a unix:// socket",
                        c.host
                    ),
                ));
            }
        }
        _ => {
            return Err(invalid(
                "docker.host",
                format!(
                    "is '{}'; it must be unix:///PATH (a local socket) or tcp://HOST:PORT (a remote daemon, with docker.tls)",
                    c.host
                ),
            ))
        }
    }
    if let Some(tls) = &c.tls {
        for (key, text) in [
            ("ca", &tls.ca),
            ("certificate", &tls.certificate),
            ("private_key", &tls.private_key),
        ] {
            if text.trim().is_empty() {
                return Err(invalid(
                    format!("docker.tls.{key}"),
                    "is empty; set it to the PEM text (-----BEGIN ...)",
                ));
            }
        }
    }
    if let Some(v) = &c.api_version {
        let ok = v.split_once('.').is_some_and(|(major, minor)| {
            !major.is_empty()
                && !minor.is_empty()
                && major.chars().all(|ch| ch.is_ascii_digit())
                && minor.chars().all(|ch| ch.is_ascii_digit())
        });
        if !ok {
            return Err(invalid(
                "docker.api_version",
                format!(
                    "is '{v}', which is not a Docker API version such as \"1.44\"; fix it, or remove it \
                     to negotiate with the daemon"
                ),
            ));
        }
    }
    Ok(())
}

pub(super) fn check_containerd(c: &ContainerdConfig) -> Result<(), Invalid> {
    if !c.socket.is_absolute() {
        return Err(invalid(
            "containerd.socket",
            format!(
                "is '{}'; set it to the absolute path of containerd's socket, such as /run/containerd/containerd.sock",
                c.socket.display()
            ),
        ));
    }
    if c.namespace.trim().is_empty() {
        return Err(invalid(
            "containerd.namespace",
            "is empty; set it to the containerd namespace for BOSH VMs, such as \"bosh\"",
        ));
    }
    Ok(())
}
