//! Reading the comments of one chain's rules from nf_tables over netlink.
//!
//! On a host whose `iptables` is the nf_tables variant (Debian 11+, Ubuntu 20.10+
//! Noble included), the rules `iptables` adds live in nf_tables. Asking the kernel for
//! one chain's rules is a netlink dump answered in microseconds; `iptables-save` is a
//! process that lists every table (~10 ms here, more with Docker's rules and many
//! bridges). [`rules::ensure`](super::rules::ensure) uses this to see that a bridge's
//! rules are all there, which they are on every `create_vm` but a bridge's first; when
//! anything is missing, or the dump cannot be read, it falls back to `iptables-save`
//! under the host lock, as before.
//!
//! A comment (`-m comment --comment C`) reaches nf_tables in one of two forms,
//! depending on the iptables version: an `xt` compatibility match named `comment`
//! whose info is the 256-byte `xt_comment_info` (iptables 1.8.9, Debian 12), or the
//! rule's user data, a type-length-value list where type 0 is the comment (the
//! form `nft` itself uses). Both are read.
//!
//! Hand-written on the netlink crates the interface code already uses: the crates
//! that speak nf_tables (`rustables`, `nftnl`) need libclang or libnftnl to build, for
//! one read-only dump.

use std::collections::BTreeSet;
use std::io;
use std::path::Path;

use netlink_packet_core::{
    DefaultNla, Emitable, NetlinkBuffer, NlasIterator, NLA_TYPE_MASK, NLMSG_DONE, NLMSG_ERROR,
    NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

/// `NFNL_SUBSYS_NFTABLES`, the high byte of every nf_tables message type.
const SUBSYS_NFTABLES: u16 = 10;
/// `NFT_MSG_GETRULE` (the answers are `NFT_MSG_NEWRULE`).
const MSG_GETRULE: u16 = 7;
const MSG_NEWRULE: u16 = 6;
/// `NFPROTO_IPV4` and `NFPROTO_IPV6`: the `ip` and `ip6` families iptables uses.
const FAMILY_IPV4: u8 = 2;
const FAMILY_IPV6: u8 = 10;
/// Attributes of a rule (`NFTA_RULE_*`).
const RULE_TABLE: u16 = 1;
const RULE_CHAIN: u16 = 2;
const RULE_EXPRESSIONS: u16 = 4;
const RULE_USERDATA: u16 = 7;
/// `NFTA_LIST_ELEM`, one expression of a rule.
const LIST_ELEM: u16 = 1;
/// Attributes of an expression (`NFTA_EXPR_*`) and of the `match` one
/// (`NFTA_MATCH_*`).
const EXPR_NAME: u16 = 1;
const EXPR_DATA: u16 = 2;
const MATCH_NAME: u16 = 1;
const MATCH_INFO: u16 = 3;
/// `NFTNL_UDATA_RULE_COMMENT`, the comment's type in a rule's user data.
const UDATA_COMMENT: u8 = 0;

/// Whether the `iptables` tool at `tool` is the nf_tables variant (a link, through
/// the alternatives system, to `xtables-nft-multi` or `iptables-nft`).
pub fn is_nf_tables_tool(tool: &Path) -> bool {
    std::fs::canonicalize(tool).is_ok_and(|real| {
        real.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.contains("nft"))
    })
}

/// The comments of the rules in `table`'s `chain` of the `ip` (or, with `ipv6`, the
/// `ip6`) family. A table or chain that does not exist has none.
pub fn chain_comments(ipv6: bool, table: &str, chain: &str) -> io::Result<BTreeSet<String>> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let family = if ipv6 { FAMILY_IPV6 } else { FAMILY_IPV4 };
    socket.send(&dump_request(family, table, chain), 0)?;
    let mut comments = BTreeSet::new();
    loop {
        let mut reply: Vec<u8> = Vec::with_capacity(64 * 1024);
        socket.recv(&mut reply, 0)?;
        if reply.is_empty() {
            return Err(io::Error::other("an empty netlink reply to a rule dump"));
        }
        if read_replies(&reply, table, chain, &mut comments)? {
            return Ok(comments);
        }
    }
}

/// One `NFT_MSG_GETRULE` dump request, filtered by table and chain.
fn dump_request(family: u8, table: &str, chain: &str) -> Vec<u8> {
    let nul_terminated = |s: &str| {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    };
    let attributes = [
        DefaultNla::new(RULE_TABLE, nul_terminated(table)),
        DefaultNla::new(RULE_CHAIN, nul_terminated(chain)),
    ];
    // `nfgenmsg`: family, version 0, resource id 0 (big-endian).
    let mut payload = vec![family, 0, 0, 0];
    let start = payload.len();
    payload.resize(start + attributes.as_slice().buffer_len(), 0);
    attributes.as_slice().emit(&mut payload[start..]);

    let header_len = 16;
    let mut bytes = vec![0u8; header_len + payload.len()];
    bytes[header_len..].copy_from_slice(&payload);
    let mut message = NetlinkBuffer::new(&mut bytes[..]);
    // The length fits: two names of at most a few dozen bytes.
    message.set_length(u32::try_from(header_len + payload.len()).unwrap_or(u32::MAX));
    message.set_message_type((SUBSYS_NFTABLES << 8) | MSG_GETRULE);
    message.set_flags(NLM_F_REQUEST | NLM_F_DUMP);
    message.set_sequence_number(1);
    bytes
}

fn bad(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("a bad nf_tables reply: {what}"),
    )
}

/// Reads the messages of one datagram of a dump into `comments`; true once the dump
/// is done.
fn read_replies(
    mut bytes: &[u8],
    table: &str,
    chain: &str,
    comments: &mut BTreeSet<String>,
) -> io::Result<bool> {
    while !bytes.is_empty() {
        let message = NetlinkBuffer::new_checked(bytes).map_err(bad)?;
        let length = message.length() as usize;
        let payload = message.payload();
        match message.message_type() {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = payload
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .map(i32::from_ne_bytes)
                    .ok_or_else(|| bad("a short error message"))?;
                return match code {
                    0 => Ok(true),
                    // No such table or chain: no rules.
                    c if -c == rustix::io::Errno::NOENT.raw_os_error() => Ok(true),
                    c => Err(io::Error::from_raw_os_error(-c)),
                };
            }
            t if t == (SUBSYS_NFTABLES << 8) | MSG_NEWRULE => {
                // Past `nfgenmsg`, the rule's attributes.
                let attributes = payload.get(4..).ok_or_else(|| bad("a short rule"))?;
                read_rule(attributes, table, chain, comments)?;
            }
            _ => {}
        }
        let aligned = (length + 3) & !3;
        bytes = bytes.get(aligned..).unwrap_or_default();
    }
    Ok(false)
}

/// The comments of one rule, when it is in `table`'s `chain` (kernels before 4.x
/// ignore the dump's filter).
fn read_rule(
    attributes: &[u8],
    table: &str,
    chain: &str,
    comments: &mut BTreeSet<String>,
) -> io::Result<()> {
    let mut in_chain = (false, false);
    let mut found = Vec::new();
    for nla in NlasIterator::new(attributes) {
        let nla = nla.map_err(bad)?;
        match nla.kind() & NLA_TYPE_MASK {
            RULE_TABLE => in_chain.0 = c_string(nla.value()) == table,
            RULE_CHAIN => in_chain.1 = c_string(nla.value()) == chain,
            RULE_USERDATA => found.extend(userdata_comment(nla.value())),
            RULE_EXPRESSIONS => {
                for expression in NlasIterator::new(nla.value()) {
                    let expression = expression.map_err(bad)?;
                    if expression.kind() & NLA_TYPE_MASK == LIST_ELEM {
                        found.extend(match_comment(expression.value())?);
                    }
                }
            }
            _ => {}
        }
    }
    if in_chain == (true, true) {
        comments.extend(found);
    }
    Ok(())
}

/// The comment of an `xt` compatibility match named `comment`, if `expression` is one.
fn match_comment(expression: &[u8]) -> io::Result<Option<String>> {
    let mut is_match = false;
    let mut data = None;
    for nla in NlasIterator::new(expression) {
        let nla = nla.map_err(bad)?;
        match nla.kind() & NLA_TYPE_MASK {
            EXPR_NAME => is_match = c_string(nla.value()) == "match",
            EXPR_DATA => data = Some(nla.value().to_vec()),
            _ => {}
        }
    }
    let Some(data) = data.filter(|_| is_match) else {
        return Ok(None);
    };
    let mut is_comment = false;
    let mut info = None;
    for nla in NlasIterator::new(&data) {
        let nla = nla.map_err(bad)?;
        match nla.kind() & NLA_TYPE_MASK {
            MATCH_NAME => is_comment = c_string(nla.value()) == "comment",
            MATCH_INFO => info = Some(c_string(nla.value()).to_owned()),
            _ => {}
        }
    }
    Ok(info.filter(|_| is_comment))
}

/// The comment in a rule's user data (type-length-value entries of one byte each).
fn userdata_comment(mut data: &[u8]) -> Option<String> {
    while let [kind, len, rest @ ..] = data {
        let value = rest.get(..usize::from(*len))?;
        if *kind == UDATA_COMMENT {
            return Some(c_string(value).to_owned());
        }
        data = &rest[usize::from(*len)..];
    }
    None
}

/// The text of a NUL-terminated (or NUL-padded) attribute; empty when not UTF-8.
fn c_string(value: &[u8]) -> &str {
    let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
    std::str::from_utf8(&value[..end]).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let n = DefaultNla::new(kind, value.to_vec());
        let mut v = vec![0; n.buffer_len()];
        n.emit(&mut v);
        v
    }

    fn nested(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        nla(kind | netlink_packet_core::NLA_F_NESTED, &parts.concat())
    }

    fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0u8; 16 + payload.len()];
        bytes[16..].copy_from_slice(payload);
        let mut m = NetlinkBuffer::new(&mut bytes[..]);
        m.set_length(u32::try_from(16 + payload.len()).expect("len"));
        m.set_message_type(kind);
        while bytes.len() % 4 != 0 {
            bytes.push(0);
        }
        bytes
    }

    /// A rule as iptables 1.8.9 sends it: the comment as an `xt` match.
    fn compat_rule(table: &str, chain: &str, comment: &str) -> Vec<u8> {
        let mut info = comment.as_bytes().to_vec();
        info.resize(256, 0);
        let expression = nested(
            LIST_ELEM,
            &[
                nla(EXPR_NAME, b"match\0"),
                nested(
                    EXPR_DATA,
                    &[
                        nla(MATCH_NAME, b"comment\0"),
                        nla(2, &0u32.to_be_bytes()),
                        nla(MATCH_INFO, &info),
                    ],
                ),
            ],
        );
        let mut payload = vec![FAMILY_IPV4, 0, 0, 0];
        payload.extend(nla(RULE_TABLE, format!("{table}\0").as_bytes()));
        payload.extend(nla(RULE_CHAIN, format!("{chain}\0").as_bytes()));
        payload.extend(nested(RULE_EXPRESSIONS, &[expression]));
        message((SUBSYS_NFTABLES << 8) | MSG_NEWRULE, &payload)
    }

    /// A rule as `nft` writes it: the comment in the user data.
    fn userdata_rule(table: &str, chain: &str, comment: &str) -> Vec<u8> {
        let mut udata = vec![7, 2, 0xaa, 0xbb, UDATA_COMMENT];
        udata.push(u8::try_from(comment.len() + 1).expect("short"));
        udata.extend(comment.as_bytes());
        udata.push(0);
        let mut payload = vec![FAMILY_IPV4, 0, 0, 0];
        payload.extend(nla(RULE_TABLE, format!("{table}\0").as_bytes()));
        payload.extend(nla(RULE_CHAIN, format!("{chain}\0").as_bytes()));
        payload.extend(nla(RULE_USERDATA, &udata));
        message((SUBSYS_NFTABLES << 8) | MSG_NEWRULE, &payload)
    }

    #[test]
    fn both_comment_forms_are_read_and_other_chains_ignored() {
        let mut datagram = compat_rule("filter", "FORWARD", "bcpi:b1:in");
        datagram.extend(userdata_rule("filter", "FORWARD", "bcpi:b1:out"));
        datagram.extend(compat_rule("filter", "INPUT", "bcpi:b1:elsewhere"));
        let mut comments = BTreeSet::new();
        let done = read_replies(&datagram, "filter", "FORWARD", &mut comments).expect("parsed");
        assert!(!done, "no DONE message yet");
        assert_eq!(
            comments.into_iter().collect::<Vec<_>>(),
            ["bcpi:b1:in", "bcpi:b1:out"]
        );
    }

    #[test]
    fn done_and_missing_chain_end_the_dump_and_other_errors_fail() {
        let mut comments = BTreeSet::new();
        let done = message(NLMSG_DONE, &0i32.to_ne_bytes());
        assert!(read_replies(&done, "filter", "FORWARD", &mut comments).expect("done"));
        let enoent = message(NLMSG_ERROR, &(-2i32).to_ne_bytes());
        assert!(read_replies(&enoent, "nat", "POSTROUTING", &mut comments).expect("none"));
        let eperm = message(NLMSG_ERROR, &(-1i32).to_ne_bytes());
        let e = read_replies(&eperm, "nat", "POSTROUTING", &mut comments).expect_err("EPERM");
        assert_eq!(e.raw_os_error(), Some(1));
        assert!(comments.is_empty());
    }

    #[test]
    fn truncated_replies_are_errors_not_panics() {
        let rule = compat_rule("filter", "FORWARD", "bcpi:b1:in");
        for cut in [3, 17, 24, rule.len() - 5] {
            let mut comments = BTreeSet::new();
            // Whatever the cut, an answer (possibly an error), never a panic.
            let _ = read_replies(&rule[..cut], "filter", "FORWARD", &mut comments);
        }
        let mut comments = BTreeSet::new();
        assert!(read_replies(&rule[..3], "filter", "FORWARD", &mut comments).is_err());
    }

    #[test]
    fn the_request_filters_by_table_and_chain() {
        let bytes = dump_request(FAMILY_IPV6, "nat", "POSTROUTING");
        let m = NetlinkBuffer::new_checked(&bytes[..]).expect("message");
        assert_eq!(m.length() as usize, bytes.len());
        assert_eq!(m.message_type(), 0x0a07);
        assert_eq!(m.flags(), NLM_F_REQUEST | NLM_F_DUMP);
        let payload = m.payload();
        assert_eq!(payload[..4], [FAMILY_IPV6, 0, 0, 0]);
        let names: Vec<(u16, String)> = NlasIterator::new(&payload[4..])
            .map(|n| {
                let n = n.expect("nla");
                (n.kind(), c_string(n.value()).to_owned())
            })
            .collect();
        assert_eq!(
            names,
            [
                (RULE_TABLE, "nat".to_owned()),
                (RULE_CHAIN, "POSTROUTING".to_owned())
            ]
        );
    }
}
