//! Parsing `/proc/<pid>/mountinfo` text (pure; callers read the file).
//!
//! Both backends decide attach state and mount propagation from the mount table,
//! and `cpi doctor` reports it, so they share this one parser.

use std::path::PathBuf;

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// The mount's id.
    pub id: u64,
    /// The root of the mount within its filesystem (a bind mount's source subtree).
    pub root: String,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Optional fields: `shared:N`, `master:N`, `propagate_from:N`, `unbindable`.
    pub optional: Vec<String>,
    /// Filesystem type (`ext4`, `overlay`, `cgroup2`).
    pub fs_type: String,
    /// Mount source (`/dev/vda`, `overlay`).
    pub source: String,
    /// Superblock options.
    pub super_options: String,
}

impl MountInfo {
    /// Whether mounts below it propagate to its peers (`shared:N`).
    pub fn is_shared(&self) -> bool {
        self.optional.iter().any(|o| o.starts_with("shared:"))
    }

    /// Whether it receives propagation from a master (`master:N`).
    pub fn is_slave(&self) -> bool {
        self.optional.iter().any(|o| o.starts_with("master:"))
    }

    /// `shared`, `slave`, `shared+slave` or `private`, as findmnt says it.
    pub fn propagation(&self) -> &'static str {
        match (self.is_shared(), self.is_slave()) {
            (true, true) => "shared+slave",
            (true, false) => "shared",
            (false, true) => "slave",
            (false, false) => "private",
        }
    }
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountInfo> {
    let (left, right) = line.split_once(" - ")?;
    let fields: Vec<&str> = left.split(' ').collect();
    if fields.len() < 6 {
        return None;
    }
    let mut right = right.split(' ');
    Some(MountInfo {
        id: fields[0].parse().ok()?,
        root: unescape(fields[3]),
        mount_point: PathBuf::from(unescape(fields[4])),
        optional: fields[6..].iter().map(|s| (*s).to_owned()).collect(),
        fs_type: right.next()?.to_owned(),
        source: unescape(right.next().unwrap_or_default()),
        super_options: right.next().unwrap_or_default().to_owned(),
    })
}

/// Undoes the kernel's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Some(v) = field
                .get(i + 1..i + 4)
                .filter(|s| s.bytes().all(|b| (b'0'..=b'7').contains(&b)))
                .and_then(|s| u8::from_str_radix(s, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
        49 22 254:0 /var/lib/docker/volumes/v/_data /var/lib/cpi/vms/c-1/disks/v rw shared:1 master:7 - ext4 /dev/vda rw,discard\n\
        50 22 0:44 / /tmp/with\\040space rw - tmpfs tmpfs rw\n\
        garbage line\n";

    #[test]
    fn parses_fields_escapes_and_propagation() {
        let t = parse_mountinfo(TABLE);
        assert_eq!(t.len(), 3, "the malformed line is skipped");
        assert_eq!(t[0].propagation(), "shared");
        assert_eq!(t[1].id, 49);
        assert_eq!(t[1].root, "/var/lib/docker/volumes/v/_data");
        assert_eq!(t[1].propagation(), "shared+slave");
        assert_eq!(t[1].source, "/dev/vda");
        assert_eq!(t[1].super_options, "rw,discard");
        assert_eq!(t[2].mount_point, PathBuf::from("/tmp/with space"));
        assert_eq!(t[2].propagation(), "private");
        assert_eq!(t[2].fs_type, "tmpfs");
    }

    #[test]
    fn bad_escapes_are_kept_verbatim() {
        assert_eq!(unescape("a\\99b"), "a\\99b");
        assert_eq!(unescape("end\\04"), "end\\04");
        assert_eq!(unescape("a\\"), "a\\");
        assert_eq!(unescape("\\134x"), "\\x");
    }
}
