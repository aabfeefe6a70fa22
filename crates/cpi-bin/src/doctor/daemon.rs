//! The daemon checks: reachable, its version, its storage, and the time to create and
//! delete a throwaway container. They go through the backends' own connection code
//! (`backend_docker::doctor`, `backend_containerd::doctor`), so the doctor reaches
//! the daemon exactly as CPI calls do.

use std::path::PathBuf;

use backend_containerd::ContainerdConfig;
use backend_docker::DockerConfig;

use super::mounts::OverlayPlace;
use super::report::{Finding, Status};

/// What the daemon checks found, plus what the host checks need from the daemon.
#[derive(Debug, Default)]
pub struct DaemonFindings {
    /// The findings, in order.
    pub findings: Vec<Finding>,
    /// Where the daemon stacks overlay layers, for the overlay check.
    pub places: Vec<OverlayPlace>,
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Docker: `GET /version` after negotiation, `GET /info`, a throwaway container.
pub async fn docker(config: &DockerConfig) -> DaemonFindings {
    let mut out = DaemonFindings::default();
    let (client, report) = match backend_docker::doctor::probe(config).await {
        Ok(found) => found,
        Err(e) => {
            out.findings.push(
                Finding::new("daemon", Status::Blocker, e.to_string())
                    .fix("start dockerd, or correct docker.host (check with `docker -H HOST version`)")
                    .detail("host", config.host.clone()),
            );
            out.findings.push(
                Finding::new(
                    "container",
                    Status::Warn,
                    "not measured: the daemon is not reachable",
                )
                .fix("fix the daemon finding first"),
            );
            return out;
        }
    };
    let facts = &report.facts;
    out.findings.push(
        Finding::new(
            "daemon",
            Status::Ok,
            format!(
                "Docker {} at {}; API {} negotiated (daemon API {}, minimum {}); storage driver {}, data root {}, cgroup v{}",
                report.server_version,
                report.endpoint,
                report.negotiated_api_version,
                report.server_api_version,
                report.min_api_version,
                facts.storage_driver,
                facts.root_dir,
                facts.cgroup_version
            ),
        )
        .detail("host", report.endpoint.clone())
        .detail("version", report.server_version.clone())
        .detail("api_version", report.negotiated_api_version.clone())
        .detail("server_api_version", report.server_api_version.clone())
        .detail("storage_driver", facts.storage_driver.clone())
        .detail("data_root", facts.root_dir.clone())
        .detail("cgroup_version", facts.cgroup_version),
    );
    if client.unix && !facts.root_dir.is_empty() {
        out.places.push(OverlayPlace {
            what: "docker data root",
            path: PathBuf::from(&facts.root_dir),
            uses_overlay: facts.storage_driver.starts_with("overlay"),
        });
    }
    out.findings.push(match backend_docker::doctor::time_throwaway_container(&client).await {
        Ok(Some((image, took))) => Finding::new(
            "container",
            Status::Ok,
            format!("created and removed a throwaway container (never started) in {} ms", millis(took)),
        )
        .detail("image", image)
        .detail("milliseconds", millis(took)),
        Ok(None) => Finding::new("container", Status::Ok, "not measured: the daemon has no image to create a container from (nothing is pulled)")
            .fix("upload a stemcell, then run the doctor again to measure"),
        Err(e) => Finding::new("container", Status::Blocker, format!("creating and removing a throwaway container failed: {e}"))
            .fix("look at the daemon's log; the CPI creates VMs the same way"),
    });
    out
}

/// containerd: the version service, the snapshotter, a throwaway container record.
pub async fn containerd(config: &ContainerdConfig) -> DaemonFindings {
    let mut out = DaemonFindings::default();
    let socket = config.socket.display().to_string();
    let conn = match backend_containerd::doctor::Connection::connect(config).await {
        Ok(c) => c,
        Err(e) => {
            out.findings.push(
                Finding::new("daemon", Status::Blocker, e.to_string())
                    .fix(format!("start containerd, or correct containerd.socket (check with `ctr --address {socket} version`)"))
                    .detail("socket", socket),
            );
            out.findings.push(
                Finding::new(
                    "container",
                    Status::Warn,
                    "not measured: containerd is not reachable",
                )
                .fix("fix the daemon finding first"),
            );
            return out;
        }
    };
    out.findings.push(
        Finding::new(
            "daemon",
            Status::Ok,
            format!(
                "containerd {} at {socket} (version service); namespace {}",
                conn.version(),
                config.namespace
            ),
        )
        .detail("socket", socket.clone())
        .detail("version", conn.version().to_owned())
        .detail("namespace", config.namespace.clone()),
    );
    out.findings.push(match conn.snapshotter_loaded().await {
        Ok(()) => Finding::new("snapshotter", Status::Ok, format!("containerd's {} snapshotter is loaded", config.snapshotter)),
        Err(why) => Finding::new("snapshotter", Status::Blocker, format!("containerd's {} snapshotter is not usable: {why}", config.snapshotter))
            .fix("put /var/lib/containerd on a real volume (not overlay or tmpfs) and restart containerd, or set containerd.snapshotter to \"native\""),
    }
    .detail("snapshotter", config.snapshotter.clone()));
    // containerd does not report its root over the API; this is its default.
    out.places.push(OverlayPlace {
        what: "containerd root",
        path: PathBuf::from("/var/lib/containerd"),
        uses_overlay: config.snapshotter == "overlayfs",
    });
    out.findings
        .push(match conn.time_throwaway_container().await {
            Ok(took) => Finding::new(
                "container",
                Status::Ok,
                format!(
                "created and deleted a throwaway container record (no snapshot, no task) in {} ms",
                millis(took)
            ),
            )
            .detail("milliseconds", millis(took)),
            Err(e) => Finding::new(
                "container",
                Status::Blocker,
                format!("creating and deleting a throwaway container failed: {e}"),
            )
            .fix("look at containerd's log; the CPI creates VMs the same way"),
        });
    out
}
