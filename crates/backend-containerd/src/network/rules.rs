//! The host's firewall rules for the CPI's bridges: made once per bridge, not per VM.
//!
//! A VM's traffic must pass the host's FORWARD chain (Docker sets its policy to
//! DROP) and leave the host masqueraded. The CNI `bridge` plugin's `ipMasq` and the
//! `firewall` plugin did that with per-VM rules and chains, about fifteen `iptables`
//! processes on every `create_vm` and again on every `delete_vm`, contending for the
//! xtables lock when the director creates VMs in parallel. The same effect for every
//! VM of a bridge takes three rules, like the ones Docker keeps for `docker0`:
//!
//! - `filter FORWARD -i BRIDGE -j ACCEPT`: everything a VM sends (to the outside, to
//!   VMs on other bridges, and between VMs of the bridge when `br_netfilter` makes
//!   bridged traffic pass FORWARD);
//! - `filter FORWARD -o BRIDGE -m conntrack --ctstate RELATED,ESTABLISHED,DNAT -j
//!   ACCEPT`: replies, and connections to published ports (`portmap`'s DNAT);
//! - `nat POSTROUTING -s SUBNET ! -d MULTICAST ! -o BRIDGE -j MASQUERADE`, for
//!   networks with a gateway: outbound NAT, as `ipMasq` did.
//!
//! Each rule carries the comment `bcpi:<bridge>:<role>`, by which it is found. A
//! `create_vm` looks for them once (over nf_tables netlink, [`super::nft`], where
//! `iptables` is the nf_tables variant; else `iptables-save`) and adds what is
//! missing under a host lock; on a host that has them, that is all. The rules stay
//! with the bridge (which outlives its VMs on purpose); `remove_idle_cpi_bridges` in
//! `scripts/lib.sh` removes both. VMs recorded with the old per-VM plugins keep them:
//! their DEL replays what their ADD ran.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::{ContainerdError, Result};
use crate::hostlock::{self, Scope};

use super::nft;

/// How long a `create_vm` waits for another process adding bridge rules.
const LOCK_WAIT: Duration = Duration::from_secs(60);

/// The rules one bridge needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeRules {
    /// The bridge (`bcpi…`).
    pub bridge: String,
    /// The BOSH subnet on it.
    pub subnet: IpNet,
    /// Whether outbound traffic is masqueraded (networks with a gateway).
    pub masquerade: bool,
}

/// One rule: where it goes and its match, in `iptables` argument form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `filter` or `nat`.
    pub table: &'static str,
    /// `FORWARD` or `POSTROUTING`.
    pub chain: &'static str,
    /// Inserted first in the chain (FORWARD: ahead of a DROP rule) or appended.
    pub insert: bool,
    /// The rule's comment, which identifies it.
    pub comment: String,
    /// The rule's match and target, comment included.
    pub spec: Vec<String>,
}

impl Rule {
    /// The `iptables` arguments that add this rule (first in its chain or appended,
    /// as it says) or, with `delete`, remove it.
    pub fn iptables_args(&self, delete: bool) -> Vec<String> {
        let mut args: Vec<String> = vec!["-w".into(), "-t".into(), self.table.into()];
        if delete {
            args.extend(["-D".into(), self.chain.into()]);
        } else if self.insert {
            args.extend(["-I".into(), self.chain.into(), "1".into()]);
        } else {
            args.extend(["-A".into(), self.chain.into()]);
        }
        args.extend(self.spec.iter().cloned());
        args
    }
}

impl BridgeRules {
    /// Whether the subnet is IPv6 (`ip6tables`) or IPv4 (`iptables`).
    pub fn is_ipv6(&self) -> bool {
        self.subnet.addr().is_ipv6()
    }

    /// The rules of this bridge.
    pub fn rules(&self) -> Vec<Rule> {
        let comment = |role: &str| format!("bcpi:{}:{role}", self.bridge);
        let spec = |args: &[&str], comment: &str| -> Vec<String> {
            let mut v: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
            v.splice(
                v.len() - 2..v.len() - 2,
                ["-m", "comment", "--comment", comment].map(str::to_owned),
            );
            v
        };
        let br = self.bridge.as_str();
        let mut out = Vec::new();
        let c = comment("in");
        out.push(Rule {
            table: "filter",
            chain: "FORWARD",
            insert: true,
            spec: spec(&["-i", br, "-j", "ACCEPT"], &c),
            comment: c,
        });
        let c = comment("out");
        out.push(Rule {
            table: "filter",
            chain: "FORWARD",
            insert: true,
            spec: spec(
                &[
                    "-o",
                    br,
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "RELATED,ESTABLISHED,DNAT",
                    "-j",
                    "ACCEPT",
                ],
                &c,
            ),
            comment: c,
        });
        if self.masquerade {
            let subnet = self.subnet.trunc().to_string();
            let multicast = if self.is_ipv6() {
                "ff00::/8"
            } else {
                "224.0.0.0/4"
            };
            let c = comment("masq");
            out.push(Rule {
                table: "nat",
                chain: "POSTROUTING",
                insert: false,
                spec: spec(
                    &[
                        "-s",
                        &subnet,
                        "!",
                        "-d",
                        multicast,
                        "!",
                        "-o",
                        br,
                        "-j",
                        "MASQUERADE",
                    ],
                    &c,
                ),
                comment: c,
            });
        }
        out
    }
}

/// The rules of `wanted` that `listing` (the output of `iptables-save`) lacks. A
/// rule is present when its table's chain has a rule with its comment.
pub fn missing<'a>(listing: &str, wanted: &'a [Rule]) -> Vec<&'a Rule> {
    let mut table = "";
    let mut present: Vec<(&str, &str, &str)> = Vec::new();
    for line in listing.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim();
            continue;
        }
        let Some(rest) = line.strip_prefix("-A ") else {
            continue;
        };
        let Some((chain, _)) = rest.split_once(' ') else {
            continue;
        };
        let mut words = rest.split_whitespace();
        while let Some(w) = words.next() {
            if w == "--comment" {
                if let Some(c) = words.next() {
                    present.push((table, chain, c.trim_matches('"')));
                }
            }
        }
    }
    absent(wanted, &present)
}

/// The rules of `wanted` without a `(table, chain, comment)` in `present`.
fn absent<'a>(wanted: &'a [Rule], present: &[(&str, &str, &str)]) -> Vec<&'a Rule> {
    wanted
        .iter()
        .filter(|r| !present.contains(&(r.table, r.chain, r.comment.as_str())))
        .collect()
}

/// Where the system binary `name` (`iptables`, `iptables-save`, ...) is installed.
pub(crate) fn sbin(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

async fn run(name: &str, args: &[String]) -> Result<String> {
    let command = format!("{name} {}", args.join(" "));
    let bin = sbin(name).ok_or_else(|| ContainerdError::Command {
        command: command.clone(),
        message: format!("{name} not found (install iptables)"),
    })?;
    let out = tokio::process::Command::new(&bin)
        .args(args)
        .output()
        .await
        .map_err(|e| ContainerdError::Command {
            command: command.clone(),
            message: format!("cannot run it: {e}"),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(ContainerdError::Command {
            command,
            message: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

/// Whether nf_tables has all of `wanted`, asked off the runtime's thread (the caller
/// runs beside containerd requests on the same thread).
async fn nft_all_present(ipv6: bool, wanted: &[Rule]) -> std::io::Result<bool> {
    let wanted = wanted.to_vec();
    tokio::task::spawn_blocking(move || nft_missing(ipv6, &wanted).map(|m| m.is_empty()))
        .await
        .map_err(std::io::Error::other)?
}

/// The rules of `wanted` missing from nf_tables: one netlink dump per chain.
fn nft_missing(ipv6: bool, wanted: &[Rule]) -> std::io::Result<Vec<&Rule>> {
    let mut chains: Vec<(&str, &str)> = wanted.iter().map(|r| (r.table, r.chain)).collect();
    chains.sort_unstable();
    chains.dedup();
    let mut found: Vec<(&str, &str, String)> = Vec::new();
    for (table, chain) in chains {
        for comment in nft::chain_comments(ipv6, table, chain)? {
            found.push((table, chain, comment));
        }
    }
    let present: Vec<(&str, &str, &str)> = found
        .iter()
        .map(|(t, c, comment)| (*t, *c, comment.as_str()))
        .collect();
    Ok(absent(wanted, &present))
}

/// Makes sure the host has the rules of every bridge in `bridges`: one look per
/// address family (over nf_tables netlink where `iptables` is the nf_tables
/// variant, else an `iptables-save`), and additions (under the host's lock, listed
/// again inside it with `iptables-save`) only for what is missing.
pub async fn ensure(state_dir: &Path, bridges: &[&BridgeRules]) -> Result<()> {
    for ipv6 in [false, true] {
        let wanted: Vec<Rule> = bridges
            .iter()
            .filter(|b| b.is_ipv6() == ipv6)
            .flat_map(|b| b.rules())
            .collect();
        if wanted.is_empty() {
            continue;
        }
        let (save, tool) = if ipv6 {
            ("ip6tables-save", "ip6tables")
        } else {
            ("iptables-save", "iptables")
        };
        let present = match sbin(tool) {
            // On nf_tables hosts a netlink dump of the rules' chains answers without
            // a process; anything it cannot tell goes to `iptables-save` below.
            Some(path) if nft::is_nf_tables_tool(&path) => {
                match nft_all_present(ipv6, &wanted).await {
                    Ok(present) => present,
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot read the rules over nf_tables netlink; listing them with {save}");
                        false
                    }
                }
            }
            _ => missing(&run(save, &[]).await?, &wanted).is_empty(),
        };
        if present {
            continue;
        }
        let _lock = hostlock::acquire(state_dir, Scope::BridgeRules, LOCK_WAIT).await?;
        let listing = run(save, &[]).await?;
        for rule in missing(&listing, &wanted) {
            run(tool, &rule.iptables_args(false)).await?;
            tracing::info!(comment = %rule.comment, "added a host rule for a CPI bridge");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(masq: bool) -> BridgeRules {
        BridgeRules {
            bridge: "bcpi0123456789".into(),
            subnet: "10.231.20.7/24".parse().expect("net"),
            masquerade: masq,
        }
    }

    #[test]
    fn three_rules_with_masquerade_two_without() {
        let r = rules(true).rules();
        assert_eq!(r.len(), 3);
        assert_eq!(
            r[0].spec.join(" "),
            "-i bcpi0123456789 -m comment --comment bcpi:bcpi0123456789:in -j ACCEPT"
        );
        assert_eq!(
            r[1].spec.join(" "),
            "-o bcpi0123456789 -m conntrack --ctstate RELATED,ESTABLISHED,DNAT \
             -m comment --comment bcpi:bcpi0123456789:out -j ACCEPT"
        );
        assert_eq!(
            r[2].spec.join(" "),
            "-s 10.231.20.0/24 ! -d 224.0.0.0/4 ! -o bcpi0123456789 \
             -m comment --comment bcpi:bcpi0123456789:masq -j MASQUERADE"
        );
        assert_eq!(
            (r[2].table, r[2].chain, r[2].insert),
            ("nat", "POSTROUTING", false)
        );
        assert!(r[0].insert && r[1].insert);
        assert_eq!(rules(false).rules().len(), 2);
        assert_eq!(
            r[0].iptables_args(false).join(" "),
            "-w -t filter -I FORWARD 1 -i bcpi0123456789 -m comment --comment \
             bcpi:bcpi0123456789:in -j ACCEPT"
        );
        assert!(r[2]
            .iptables_args(false)
            .join(" ")
            .starts_with("-w -t nat -A POSTROUTING -s 10.231.20.0/24 "));
        assert!(r[2]
            .iptables_args(true)
            .join(" ")
            .starts_with("-w -t nat -D POSTROUTING -s 10.231.20.0/24 "));
        let v6 = BridgeRules {
            subnet: "fd00:1::/64".parse().expect("net"),
            ..rules(true)
        };
        assert!(v6.is_ipv6());
        assert!(v6.rules()[2].spec.contains(&"ff00::/8".to_owned()));
    }

    #[test]
    fn finds_what_a_listing_lacks_by_table_chain_and_comment() {
        let wanted = rules(true).rules();
        let none = "*filter\n:FORWARD DROP [0:0]\n-A FORWARD -j DOCKER-USER\nCOMMIT\n";
        assert_eq!(missing(none, &wanted).len(), 3);
        let listing = "# Generated by iptables-nft-save\n*filter\n:FORWARD DROP [0:0]\n\
            -A FORWARD -o bcpi0123456789 -m conntrack --ctstate RELATED,ESTABLISHED,DNAT -m comment --comment bcpi:bcpi0123456789:out -j ACCEPT\n\
            -A FORWARD -i bcpi0123456789 -m comment --comment bcpi:bcpi0123456789:in -j ACCEPT\n\
            -A FORWARD -j DOCKER-USER\nCOMMIT\n*nat\n\
            -A POSTROUTING -s 10.231.20.0/24 ! -d 224.0.0.0/4 ! -o bcpi0123456789 -m comment --comment bcpi:bcpi0123456789:masq -j MASQUERADE\nCOMMIT\n";
        assert!(missing(listing, &wanted).is_empty());
        // The same comment in another table or chain does not count, nor does a
        // comment that only starts like it.
        let elsewhere =
            "*nat\n-A FORWARD -i x -m comment --comment bcpi:bcpi0123456789:in -j ACCEPT\n\
            *filter\n-A INPUT -m comment --comment bcpi:bcpi0123456789:out -j ACCEPT\n\
            -A FORWARD -m comment --comment \"bcpi:bcpi0123456789:in2\" -j ACCEPT\n";
        assert_eq!(missing(elsewhere, &wanted).len(), 3);
        // Quoted comments (as iptables prints some) are matched.
        let quoted =
            "*filter\n-A FORWARD -i b -m comment --comment \"bcpi:bcpi0123456789:in\" -j ACCEPT\n";
        let left = missing(quoted, &wanted);
        assert_eq!(left.len(), 2);
        assert!(left.iter().all(|r| !r.comment.ends_with(":in")));
    }

    /// Deletes the rules it was given when dropped, so a failed assertion leaves
    /// nothing on the host.
    struct Added(Vec<BridgeRules>);

    impl Drop for Added {
        fn drop(&mut self) {
            for b in &self.0 {
                let tool = if b.is_ipv6() { "ip6tables" } else { "iptables" };
                for r in b.rules() {
                    let _ = std::process::Command::new(sbin(tool).unwrap_or_default())
                        .args(r.iptables_args(true))
                        .output();
                }
            }
        }
    }

    /// Against this host's kernel: what `ensure` adds with `iptables`, the netlink
    /// dump sees, in both families, and what is deleted it no longer sees; the
    /// `iptables-save` listing agrees.
    #[tokio::test]
    async fn the_netlink_dump_sees_what_iptables_adds_and_deletes() {
        assert!(
            rustix::process::geteuid().is_root(),
            "run the tests as root: this one adds host firewall rules"
        );
        let iptables = sbin("iptables").expect("iptables is installed (apt-get install iptables)");
        assert!(
            nft::is_nf_tables_tool(&iptables),
            "this host's iptables is not the nf_tables variant; \
             update-alternatives --set iptables /usr/sbin/iptables-nft"
        );
        let tag = std::process::id() & 0xff_ffff;
        let bridges = vec![
            BridgeRules {
                bridge: format!("bcpinft{tag:06x}"),
                subnet: format!("10.252.{}.0/24", tag % 250).parse().expect("net"),
                masquerade: true,
            },
            BridgeRules {
                bridge: format!("bcpinf6{tag:06x}"),
                subnet: format!("fd00:bc:{tag:x}::/64").parse().expect("net"),
                masquerade: true,
            },
        ];
        let state = tempfile::tempdir().expect("tempdir");
        for b in &bridges {
            let wanted = b.rules();
            let left = nft_missing(b.is_ipv6(), &wanted).expect("dump");
            assert_eq!(left.len(), 3, "{} has no rules yet", b.bridge);
        }
        let added = Added(bridges.clone());
        ensure(state.path(), &added.0.iter().collect::<Vec<_>>())
            .await
            .expect("rules added");
        for b in &bridges {
            let wanted = b.rules();
            let left = nft_missing(b.is_ipv6(), &wanted).expect("dump");
            assert!(left.is_empty(), "netlink misses {left:?}");
            let save = if b.is_ipv6() {
                "ip6tables-save"
            } else {
                "iptables-save"
            };
            let listing = run(save, &[]).await.expect("listing");
            assert!(missing(&listing, &wanted).is_empty());
        }
        drop(added);
        for b in &bridges {
            let wanted = b.rules();
            let left = nft_missing(b.is_ipv6(), &wanted).expect("dump");
            assert_eq!(left.len(), 3, "{}'s rules were deleted", b.bridge);
        }
    }
}
