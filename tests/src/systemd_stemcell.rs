//! A real systemd stemcell for tests: Debian 12 (bookworm) built with `debootstrap`.
//!
//! [`base_rootfs`] runs `debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,iproute2`
//! once and caches the root filesystem as a gzip tarball under [`CACHE_DIR`], keyed by
//! suite, variant and package list, so later runs take seconds.
//! [`SystemdStemcellBuilder`] streams that tarball into a warden-style full stemcell
//! (`image` + `stemcell.MF`) and adds what a BOSH stemcell has that the CPI relies on:
//! the `/var/vcap` layout, `/warden-cpi-dev`, the stemcell version, and
//! [`AGENT_UNIT`], a tiny systemd unit standing in for the bosh-agent. The unit logs
//! its start to [`AGENT_LOG`], reads the settings the CPI wrote
//! ([`SETTINGS_FILE`]) and records their `agent_id` there, then idles.
//!
//! The stemcell's operating system defaults to `ubuntu-noble`, which makes the CPI
//! boot `/sbin/init` (systemd); any other name needs `force_start_with_systemd`.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use sha1::{Digest, Sha1};
use tar::EntryType;

use crate::stemcell::{
    base_header, rel, UnpackedStemcell, IMAGE_FILE, MANIFEST_FILE, STEMCELL_VERSION_FILE,
    VCAP_DIRECTORIES,
};

/// The Debian suite debootstrap installs.
pub const SUITE: &str = "bookworm";
/// debootstrap's variant.
pub const VARIANT: &str = "minbase";
/// Packages added to the minimal base.
pub const PACKAGES: &[&str] = &["systemd", "systemd-sysv", "dbus", "iproute2"];
/// Where the debootstrapped root filesystem is cached between runs.
pub const CACHE_DIR: &str = "/var/cache/cpi-test";
/// The mirror used when none is found in the apt sources.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// Default stemcell name.
pub const DEFAULT_NAME: &str = "bosh-warden-boshlite-ubuntu-noble-cpi-tests-debian-bookworm";
/// Default operating system: Noble, so the CPI picks systemd by itself.
pub const DEFAULT_OS: &str = "ubuntu-noble";
/// The systemd unit standing in for the bosh-agent. Its name contains `bosh-agent`,
/// which the CPI's prelude keeps when it prunes the stemcell's `*.wants` links.
pub const AGENT_UNIT: &str = "bosh-agent.service";
/// The stand-in agent's script inside the VM.
pub const AGENT_SCRIPT: &str = "/var/vcap/bosh/bin/stand-in-agent";
/// The stand-in agent's log inside the VM: `started pid <pid> at <date>`, then
/// `settings agent_id=<id>` (or `settings missing`).
pub const AGENT_LOG: &str = "/var/vcap/bosh/log/stand-in-agent.log";
/// The settings file the CPI writes (contract, "inside the VM").
pub const SETTINGS_FILE: &str = "/var/vcap/bosh/warden-cpi-agent-env.json";

/// The stand-in agent: logs its start, reads the settings, idles.
const AGENT_SCRIPT_TEXT: &str = r#"#!/bin/sh
# Stand-in for the bosh-agent in the cpi-tests systemd stemcell.
log=/var/vcap/bosh/log/stand-in-agent.log
echo "started pid $$ at $(date -u +%FT%TZ)" >> "$log"
settings=/var/vcap/bosh/warden-cpi-agent-env.json
if [ -r "$settings" ]; then
  id=$(tr -d '\n' < "$settings" | sed -n 's/.*"agent_id"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p')
  echo "settings agent_id=$id" >> "$log"
else
  echo "settings missing" >> "$log"
fi
exec sleep infinity
"#;

/// The stand-in agent's unit.
const AGENT_UNIT_TEXT: &str = "[Unit]\n\
Description=Stand-in for the bosh-agent (cpi-tests systemd stemcell)\n\
After=local-fs.target\n\
\n\
[Service]\n\
Type=simple\n\
ExecStart=/var/vcap/bosh/bin/stand-in-agent\n\
\n\
[Install]\n\
WantedBy=multi-user.target\n";

/// The Debian mirror: the first `http(s)` URI in `/etc/apt/sources.list` or
/// `/etc/apt/sources.list.d/*` (one-line or deb822 form) that is not a security
/// archive, else [`DEFAULT_MIRROR`].
pub fn mirror() -> String {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        if let Some(m) = mirror_in(&text) {
            return m;
        }
    }
    DEFAULT_MIRROR.to_owned()
}

/// The first usable mirror URI in a sources file's text.
fn mirror_in(text: &str) -> Option<String> {
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let candidates: Vec<&str> = match words.first() {
            Some(&"deb") => words
                .iter()
                .skip(1)
                .filter(|w| !w.starts_with('['))
                .take(1)
                .copied()
                .collect(),
            Some(&"URIs:") => words[1..].to_vec(),
            _ => Vec::new(),
        };
        if let Some(uri) = candidates.into_iter().find(|u| {
            (u.starts_with("http://") || u.starts_with("https://")) && !u.contains("security")
        }) {
            return Some(uri.trim_end_matches('/').to_owned());
        }
    }
    None
}

/// The cache file of the debootstrapped root filesystem for [`SUITE`],
/// [`VARIANT`] and [`PACKAGES`].
pub fn cache_path() -> PathBuf {
    PathBuf::from(CACHE_DIR).join(format!(
        "debootstrap-{SUITE}-{VARIANT}-{}.tar.gz",
        PACKAGES.join("+")
    ))
}

/// The debootstrapped root filesystem as a gzip tarball, built on first use
/// (a few minutes; needs root, `debootstrap` and the mirror) and cached.
///
/// # Panics
/// When debootstrap or tar fails (with its output and how to fix it).
pub fn base_rootfs() -> PathBuf {
    // Tests in one binary run as threads: one debootstrap at a time (a second
    // process racing this one only repeats the work; the rename is atomic).
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = BUILD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let cache = cache_path();
    if cache.is_file() {
        return cache;
    }
    std::fs::create_dir_all(CACHE_DIR).unwrap_or_else(|e| panic!("cannot create {CACHE_DIR}: {e}"));
    let work = tempfile::Builder::new()
        .prefix("debootstrap-")
        .tempdir_in(CACHE_DIR)
        .unwrap_or_else(|e| panic!("cannot create a work dir in {CACHE_DIR}: {e}"));
    let root = work.path().join("rootfs");
    let mirror = mirror();
    let out = Command::new("debootstrap")
        .arg(format!("--variant={VARIANT}"))
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg(SUITE)
        .arg(&root)
        .arg(&mirror)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run debootstrap ({e}); install it with \
                 `source scripts/lib.sh && ensure_packages`"
            )
        });
    assert!(
        out.status.success(),
        "debootstrap {SUITE} from {mirror} failed ({}):\n{}\n{}\n(debootstrap log: {})",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(root.join("debootstrap/debootstrap.log")).unwrap_or_default()
    );
    // apt's package lists and downloaded .debs are not part of a stemcell.
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        clear_files(&root.join(dir));
    }
    let partial = work.path().join("rootfs.tar.gz");
    let out = Command::new("tar")
        .arg("--numeric-owner")
        .arg("-C")
        .arg(&root)
        .arg("-czf")
        .arg(&partial)
        .arg(".")
        .output()
        .unwrap_or_else(|e| panic!("cannot run tar: {e}"));
    assert!(
        out.status.success(),
        "tar of {} failed: {}",
        root.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&partial, &cache)
        .unwrap_or_else(|e| panic!("cannot move the rootfs into {}: {e}", cache.display()));
    cache
}

/// Removes the regular files directly inside `dir` (keeps subdirectories such as `partial/`).
fn clear_files(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_file()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Builds the systemd stemcell; see the [module documentation](self).
#[derive(Debug, Clone)]
pub struct SystemdStemcellBuilder {
    name: String,
    version: String,
    os: String,
}

impl Default for SystemdStemcellBuilder {
    fn default() -> Self {
        SystemdStemcellBuilder {
            name: DEFAULT_NAME.to_owned(),
            version: "0.0.1".to_owned(),
            os: DEFAULT_OS.to_owned(),
        }
    }
}

impl SystemdStemcellBuilder {
    /// A builder with the defaults ([`DEFAULT_NAME`], version `0.0.1`, [`DEFAULT_OS`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the stemcell version.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Sets the operating system written in the manifest.
    pub fn os(mut self, os: impl Into<String>) -> Self {
        self.os = os.into();
        self
    }

    /// Paths (relative, without `./`) this builder writes itself; the base's
    /// entries at these paths are dropped.
    fn own_files(&self) -> Vec<String> {
        vec![
            rel(AGENT_SCRIPT).to_owned(),
            format!("etc/systemd/system/{AGENT_UNIT}"),
            format!("etc/systemd/system/multi-user.target.wants/{AGENT_UNIT}"),
            rel(STEMCELL_VERSION_FILE).to_owned(),
            "etc/hostname".to_owned(),
        ]
    }

    /// Writes the image (gzip tar of the root filesystem) from the base tarball
    /// `base` to `out`; returns `out`.
    ///
    /// # Errors
    /// When `base` cannot be read or `out` cannot be written.
    pub fn write_image<W: Write>(&self, base: &Path, out: W) -> io::Result<W> {
        let gz = GzEncoder::new(out, Compression::new(1));
        let mut builder = tar::Builder::new(gz);
        builder.follow_symlinks(false);
        let own = self.own_files();
        let vcap: Vec<&str> = VCAP_DIRECTORIES.iter().map(|(d, _)| *d).collect();
        let mut archive = tar::Archive::new(BufReader::with_capacity(
            1 << 20,
            GzDecoder::new(File::open(base)?),
        ));
        for entry in archive.entries()? {
            let mut entry = entry?;
            let path = entry.path()?.to_string_lossy().into_owned();
            let path = path
                .trim_start_matches("./")
                .trim_end_matches('/')
                .to_owned();
            if path.is_empty() || path == "." {
                continue;
            }
            // The runtime provides /dev, /proc and /sys; their contents in the
            // debootstrap tree are device nodes and mount points only.
            let under_runtime_fs = ["dev/", "proc/", "sys/"]
                .iter()
                .any(|p| path.starts_with(p));
            if under_runtime_fs || own.contains(&path) || vcap.contains(&path.as_str()) {
                continue;
            }
            let mut header = entry.header().clone();
            match header.entry_type() {
                EntryType::Symlink | EntryType::Link => {
                    let target = entry
                        .link_name()?
                        .map(|t| t.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let target = if header.entry_type() == EntryType::Link {
                        target.trim_start_matches("./").to_owned()
                    } else {
                        target
                    };
                    builder.append_link(&mut header, &path, &target)?;
                }
                _ => builder.append_data(&mut header, &path, &mut entry)?,
            }
        }
        for (dir, mode) in VCAP_DIRECTORIES {
            let mut h = base_header(EntryType::Directory, *mode, 0);
            builder.append_data(&mut h, dir, io::empty())?;
        }
        let mut add = |path: &str, mode: u32, data: &[u8]| -> io::Result<()> {
            let mut h = base_header(EntryType::Regular, mode, data.len() as u64);
            builder.append_data(&mut h, path, data)
        };
        add(rel(AGENT_SCRIPT), 0o755, AGENT_SCRIPT_TEXT.as_bytes())?;
        add(
            &format!("etc/systemd/system/{AGENT_UNIT}"),
            0o644,
            AGENT_UNIT_TEXT.as_bytes(),
        )?;
        add(
            rel(STEMCELL_VERSION_FILE),
            0o644,
            format!("{}\n", self.version).as_bytes(),
        )?;
        add("etc/hostname", 0o644, b"localhost\n")?;
        let mut h = base_header(EntryType::Symlink, 0o777, 0);
        builder.append_link(
            &mut h,
            format!("etc/systemd/system/multi-user.target.wants/{AGENT_UNIT}"),
            format!("/etc/systemd/system/{AGENT_UNIT}"),
        )?;
        builder.into_inner()?.finish()
    }

    /// Writes `image` and `stemcell.MF` into `dir` (created if missing), building
    /// or reusing the cached base ([`base_rootfs`]).
    ///
    /// # Panics
    /// On any I/O error (with the path in the message), or when the base cannot be built.
    pub fn build_unpacked(&self, dir: impl AsRef<Path>) -> UnpackedStemcell {
        let base = base_rootfs();
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let image_path = dir.join(IMAGE_FILE);
        let file = File::create(&image_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", image_path.display()));
        let hashing = HashingWriter {
            inner: BufWriter::with_capacity(1 << 20, file),
            hasher: Sha1::new(),
        };
        let hashing = self.write_image(&base, hashing).unwrap_or_else(|e| {
            panic!(
                "cannot write {} from {}: {e}",
                image_path.display(),
                base.display()
            )
        });
        let sha1: String = hashing
            .hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        hashing
            .inner
            .into_inner()
            .map_err(io::IntoInnerError::into_error)
            .and_then(|f| f.sync_all())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", image_path.display()));
        let q = |s: &str| serde_json::Value::from(s).to_string();
        let manifest = format!(
            "---\nname: {}\nversion: {}\napi_version: 3\nbosh_protocol: 1\nsha1: {}\n\
             operating_system: {}\nstemcell_formats:\n- \"warden-tar\"\n- \"general-tar\"\n\
             cloud_properties:\n  infrastructure: \"warden\"\n  architecture: \"x86_64\"\n",
            q(&self.name),
            q(&self.version),
            q(&sha1),
            q(&self.os)
        );
        let manifest_path = dir.join(MANIFEST_FILE);
        std::fs::write(&manifest_path, manifest)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", manifest_path.display()));
        UnpackedStemcell {
            dir: dir.to_path_buf(),
            image_path,
            manifest_path,
            sha1,
        }
    }
}

/// Writes through to `inner` and hashes what passes.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha1,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_from_one_line_and_deb822_sources() {
        assert_eq!(
            mirror_in("# c\ndeb [arch=amd64] http://ftp.example/debian/ bookworm main\n"),
            Some("http://ftp.example/debian".to_owned())
        );
        assert_eq!(
            mirror_in(
                "Types: deb\nURIs: http://deb.debian.org/debian-security\n\n\
                 Types: deb\nURIs: http://mirror.example/debian\n"
            ),
            Some("http://mirror.example/debian".to_owned())
        );
        assert_eq!(mirror_in("deb cdrom:/x bookworm main\n"), None);
    }

    #[test]
    fn cache_key_names_suite_variant_and_packages() {
        let p = cache_path();
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        assert_eq!(
            name.as_deref(),
            Some("debootstrap-bookworm-minbase-systemd+systemd-sysv+dbus+iproute2.tar.gz")
        );
    }
}
