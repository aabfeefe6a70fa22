//! The raw floor: the same daemon operations a CPI call needs, issued directly by this
//! process over the daemon's own API (bollard for Docker, containerd's gRPC for
//! containerd), with no process start-up, no config, no CPI logic.
//!
//! Each backend implements [`Floor`]; the rows ([`super::suite`]) call the CPI
//! and the floor alternately in the same run. A floor's VM is a copy of a VM the CPI
//! made ([`Floor::learn`]): the same image and the same container configuration or
//! runtime spec, with its own name, directories and (Docker) address, so both sides
//! ask the daemon for the same kind of container.

use std::path::Path;
use std::time::Duration;

/// What a floor failure says.
pub type FloorResult<T> = Result<T, String>;

/// The host part of a floor VM's address in the run's subnet: the first of 200..=254
/// (the CPI's VMs use 10..=199) that `taken` says no live floor VM holds, so a
/// deleted VM's address is reused.
pub fn free_floor_host(taken: impl Fn(u8) -> bool) -> FloorResult<u8> {
    (200..=254u8)
        .find(|h| !taken(*h))
        .ok_or_else(|| "no free floor address left in the run's subnet".to_owned())
}

/// The floor operations of one backend. Timed methods return the time of the daemon
/// work only (set-up that the CPI call does not do is outside it).
pub trait Floor {
    /// The daemon's version, for the header.
    fn version(&self) -> String;

    /// One lookup of `vm` over a fresh connection (what a trivial call needs of the
    /// daemon).
    fn round_trip(&mut self, vm: &str) -> FloorResult<Duration>;

    /// What `has_disk` needs of the daemon to find `disk`, over a fresh connection
    /// (zero where the backend keeps its disks' records on the host).
    fn disk_round_trip(&mut self, disk: &str) -> FloorResult<Duration>;

    /// Learns the VM template from `vm`, a running VM the CPI created.
    fn learn(&mut self, vm: &str) -> FloorResult<()>;

    /// Creates and starts a VM like the template.
    fn create_vm(&mut self) -> FloorResult<(String, Duration)>;

    /// Whether the VMs created next get their network. Only floors that make the
    /// network themselves can leave it out (containerd, where the CPI makes it: this
    /// shows what the floor read before it made it too); they answer `true`. Where the
    /// daemon makes it inside its own create (Docker) this does nothing and answers
    /// `false`.
    fn set_network(&mut self, _on: bool) -> bool {
        false
    }

    /// Stops and removes a floor VM and what was made for it.
    fn delete_vm(&mut self, vm: &str) -> FloorResult<Duration>;

    /// Creates and starts `n` VMs like the template at once (every VM's requests in
    /// flight together, as a director's concurrent `create_vm` calls are); the wall
    /// time of the whole batch.
    fn create_vms(&mut self, n: usize) -> FloorResult<(Vec<String>, Duration)>;

    /// Deletes floor VMs at once; the wall time of the whole batch.
    fn delete_vms(&mut self, vms: &[String]) -> FloorResult<Duration>;

    /// Waits (not timed) until PID 1 of `vm`, a floor VM or a CPI VM, catches
    /// SIGTERM: both sides delete a VM right after creating it, and an init still
    /// starting ignores SIGTERM (see [`super::host::wait_until_catches_sigterm`]).
    fn wait_init(&mut self, vm: &str) -> FloorResult<()>;

    /// Makes a disk for the attach floor (not timed).
    fn create_disk(&mut self) -> FloorResult<String>;

    /// The minimal live attach of `disk` to the running floor VM `vm`.
    fn attach(&mut self, vm: &str, disk: &str) -> FloorResult<Duration>;

    /// The minimal live detach.
    fn detach(&mut self, vm: &str, disk: &str) -> FloorResult<Duration>;

    /// Imports the stemcell `image` file as directly as the daemon allows; returns
    /// what [`Floor::remove_import`] needs.
    fn import(&mut self, image: &Path) -> FloorResult<(String, Duration)>;

    /// Removes what an import made (not timed).
    fn remove_import(&mut self, id: &str) -> FloorResult<()>;

    /// Removes everything this floor still has; returns what failed.
    fn teardown(&mut self) -> Vec<String>;

    /// What the floor of `row` does, in a sentence (for the JSON and the docs).
    fn describe(&self, row: &str) -> &'static str;
}

/// A 1 KiB stand-in for the agent settings file the attach floors write.
pub fn settings_stand_in(disk: &str, attached: bool) -> Vec<u8> {
    let mut text = format!(
        "{{\"agent_id\":\"cpi-bench-floor\",\"disks\":{{\"persistent\":{{{}}}}},\"padding\":\"",
        if attached {
            format!("\"{disk}\":\"/warden-cpi-dev/{disk}\"")
        } else {
            String::new()
        }
    );
    while text.len() < 1024 - 2 {
        text.push('x');
    }
    text.push_str("\"}");
    text.into_bytes()
}

/// The path of the settings file inside a VM.
pub const SETTINGS_IN_VM: &str = "var/vcap/bosh/warden-cpi-agent-env.json";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_stand_in_is_one_kib_of_json() {
        for attached in [true, false] {
            let bytes = settings_stand_in("vol-1", attached);
            assert_eq!(bytes.len(), 1024);
            let v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
            assert_eq!(v["disks"]["persistent"].get("vol-1").is_some(), attached);
        }
    }

    #[test]
    fn floor_hosts_are_the_first_free_of_200_to_254() {
        assert_eq!(free_floor_host(|_| false), Ok(200));
        assert_eq!(free_floor_host(|h| h == 200 || h == 201), Ok(202));
        assert!(free_floor_host(|_| true).is_err());
    }
}
