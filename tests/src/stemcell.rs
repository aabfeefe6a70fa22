//! Small warden-style BOSH stemcells for tests, built entirely in Rust.
//!
//! A full stemcell is what the director hands the CPI: a directory with the
//! `image` (a gzip-compressed tar of the root filesystem) and `stemcell.MF`
//! side by side ([`StemcellBuilder::build_unpacked`]), or the downloadable
//! `.tgz` holding both ([`StemcellBuilder::build_tarball`]).
//!
//! The root filesystem is tiny: a static busybox (Debian's `busybox-static`,
//! `/bin/busybox`) with symlinks for the applets a VM needs, the `/var/vcap`
//! layout, `/warden-cpi-dev`, a few files in `/etc`, and stand-in inits at
//! `/usr/sbin/runsvdir-start` (runit stemcells) and `/sbin/init` (systemd
//! stemcells) that log their start to [`STAND_IN_INIT_LOG`], idle, and exit 0
//! on SIGTERM or SIGINT. [`StemcellBuilder::padding_bytes`] adds incompressible
//! data to make large stemcells for benchmarks.
//!
//! A light stemcell ([`TestStemcell::light`]) only has a `stemcell.MF` naming
//! an OCI image, and an empty `image`.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::Compression;
use sha1::{Digest, Sha1};
use tar::{EntryType, Header};

/// Default stemcell name.
pub const DEFAULT_NAME: &str = "bosh-warden-boshlite-ubuntu-jammy-go_agent";
/// Default stemcell version.
pub const DEFAULT_VERSION: &str = "0.0.1";
/// Default operating system (runit init); `ubuntu-noble` is the systemd case.
pub const DEFAULT_OS: &str = "ubuntu-jammy";
/// Where the static busybox is taken from (Debian package `busybox-static`).
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";
/// Name of the image file in an unpacked stemcell and in a stemcell tarball.
pub const IMAGE_FILE: &str = "image";
/// Name of the manifest file in an unpacked stemcell and in a stemcell tarball.
pub const MANIFEST_FILE: &str = "stemcell.MF";
/// The runit-style init of pre-Noble warden stemcells (a stand-in script here).
pub const RUNSVDIR_START: &str = "/usr/sbin/runsvdir-start";
/// The systemd-style init of Noble stemcells (a stand-in script here).
pub const SBIN_INIT: &str = "/sbin/init";
/// Each start of a stand-in init appends a line here (inside the VM):
/// `started <init path> pid <pid> settings <present|missing> at <date>`, where
/// `settings` says whether the agent's settings file was there when init started.
pub const STAND_IN_INIT_LOG: &str = "/var/vcap/data/sys/stand-in-init.log";
/// The padding file inside the image (only present when padding was asked for).
pub const PADDING_FILE: &str = "/var/vcap/padding/padding.bin";
/// Where the stemcell's version is recorded inside the image (as on real stemcells).
pub const STEMCELL_VERSION_FILE: &str = "/var/vcap/bosh/etc/stemcell_version";

/// Busybox applets linked into `/bin` of the test root filesystem.
pub const APPLETS: &[&str] = &[
    "sh", "mount", "umount", "sleep", "cat", "ls", "mkdir", "ln", "rm", "sed", "env", "echo",
    "test", "[", "true", "false", "ps", "stat", "grep", "touch", "chmod", "id", "hostname",
    "readlink", "kill", "wc", "head", "tail", "date", "printf", "cp", "mv", "sync", "ip",
    "nslookup",
];

/// Directories of the root filesystem, with their modes, parents first.
const DIRECTORIES: &[(&str, u32)] = &[
    ("bin", 0o755),
    ("sbin", 0o755),
    ("etc", 0o755),
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("root", 0o700),
    ("home", 0o755),
    ("home/vcap", 0o755),
    ("usr", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
    ("usr/lib", 0o755),
    ("usr/lib/modules", 0o755),
    ("var", 0o755),
    ("var/log", 0o755),
];

/// The `/var/vcap` tree every BOSH stemcell has (and `/warden-cpi-dev`), with modes,
/// parents first.
pub(crate) const VCAP_DIRECTORIES: &[(&str, u32)] = &[
    ("var/vcap", 0o755),
    ("var/vcap/bosh", 0o755),
    ("var/vcap/bosh/bin", 0o755),
    ("var/vcap/bosh/etc", 0o755),
    ("var/vcap/bosh/log", 0o755),
    ("var/vcap/data", 0o755),
    ("var/vcap/data/sys", 0o755),
    ("var/vcap/store", 0o755),
    ("var/vcap/jobs", 0o755),
    ("var/vcap/packages", 0o755),
    ("var/vcap/sys", 0o755),
    ("var/vcap/sys/log", 0o755),
    ("var/vcap/sys/run", 0o755),
    ("warden-cpi-dev", 0o755),
];

/// Modification time of every entry (2024-01-01T00:00:00Z), so images are reproducible.
pub(crate) const MTIME: u64 = 1_704_067_200;

/// The stand-in init script: `/usr/sbin/runsvdir-start` and `/sbin/init`.
const STAND_IN_INIT: &str = r#"#!/bin/sh
# Stand-in init of the cpi-tests stemcell (in place of runit or systemd):
# records its start, then idles until SIGTERM or SIGINT, and exits 0.
trap 'exit 0' TERM INT
mkdir -p /var/vcap/data/sys
settings=missing
[ -s /var/vcap/bosh/warden-cpi-agent-env.json ] && settings=present
echo "started $0 pid $$ settings $settings at $(date)" >> /var/vcap/data/sys/stand-in-init.log
while true; do
  sleep 1 &
  wait $!
done
"#;

/// Entry point of the builders: [`TestStemcell::builder`] for full (warden-tar)
/// stemcells, [`TestStemcell::light`] for light (docker-light) ones.
#[derive(Debug, Clone, Copy)]
pub struct TestStemcell;

impl TestStemcell {
    /// A builder for a full stemcell with the defaults ([`DEFAULT_NAME`],
    /// [`DEFAULT_VERSION`], [`DEFAULT_OS`], no padding).
    pub fn builder() -> StemcellBuilder {
        StemcellBuilder::default()
    }

    /// A builder for a light stemcell whose image is `image_reference`
    /// (e.g. `127.0.0.1:5000/cpi-test/busybox:1`).
    pub fn light(image_reference: impl Into<String>) -> LightStemcellBuilder {
        LightStemcellBuilder {
            name: DEFAULT_NAME.to_string(),
            version: DEFAULT_VERSION.to_string(),
            os: DEFAULT_OS.to_string(),
            image_reference: image_reference.into(),
            digest: None,
        }
    }
}

/// A stemcell as the director hands it to the CPI: `image` and `stemcell.MF` in one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackedStemcell {
    /// The directory holding both files.
    pub dir: PathBuf,
    /// `<dir>/image`: the `image_path` argument of `create_stemcell`.
    pub image_path: PathBuf,
    /// `<dir>/stemcell.MF`.
    pub manifest_path: PathBuf,
    /// SHA-1 (lowercase hex) of `image`, as written in the manifest.
    pub sha1: String,
}

/// Builds a full warden-style stemcell; see the [module documentation](self).
#[derive(Debug, Clone)]
pub struct StemcellBuilder {
    name: String,
    version: String,
    os: String,
    padding_bytes: u64,
    padding_seed: u64,
    busybox: PathBuf,
    compression_level: u32,
}

impl Default for StemcellBuilder {
    fn default() -> Self {
        StemcellBuilder {
            name: DEFAULT_NAME.to_string(),
            version: DEFAULT_VERSION.to_string(),
            os: DEFAULT_OS.to_string(),
            padding_bytes: 0,
            padding_seed: 0x9e37_79b9_7f4a_7c15,
            busybox: PathBuf::from(DEFAULT_BUSYBOX),
            compression_level: 1,
        }
    }
}

impl StemcellBuilder {
    /// Sets the stemcell name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the stemcell version.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Sets the operating system (`ubuntu-jammy`, or `ubuntu-noble` for systemd).
    pub fn os(mut self, os: impl Into<String>) -> Self {
        self.os = os.into();
        self
    }

    /// Adds a file of `bytes` incompressible pseudo-random bytes at
    /// [`PADDING_FILE`], to make large stemcells (0, the default, adds nothing).
    pub fn padding_bytes(mut self, bytes: u64) -> Self {
        self.padding_bytes = bytes;
        self
    }

    /// Seed of the padding's pseudo-random bytes (same seed, same bytes).
    pub fn padding_seed(mut self, seed: u64) -> Self {
        self.padding_seed = seed;
        self
    }

    /// Takes busybox from `path` instead of [`DEFAULT_BUSYBOX`].
    pub fn busybox(mut self, path: impl Into<PathBuf>) -> Self {
        self.busybox = path.into();
        self
    }

    /// Gzip level of the image, 0 (stored) to 9 (default 1: fast).
    pub fn compression_level(mut self, level: u32) -> Self {
        self.compression_level = level.min(9);
        self
    }

    /// Writes the image (a gzip-compressed tar of the root filesystem) to `out`;
    /// returns `out`.
    ///
    /// # Errors
    /// When busybox cannot be read or `out` cannot be written.
    pub fn write_image<W: Write>(&self, out: W) -> io::Result<W> {
        let gz = GzEncoder::new(out, Compression::new(self.compression_level));
        let mut tar = tar::Builder::new(gz);
        append_dir(&mut tar, ".", 0o755)?;
        for (dir, mode) in DIRECTORIES.iter().chain(VCAP_DIRECTORIES) {
            append_dir(&mut tar, dir, *mode)?;
        }

        let mut busybox = File::open(&self.busybox).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot open {} (install Debian's busybox-static: `source scripts/lib.sh && ensure_packages`): {e}",
                    self.busybox.display()
                ),
            )
        })?;
        let size = busybox.metadata()?.len();
        let mut header = file_header(0o755, size);
        tar.append_data(&mut header, "bin/busybox", &mut busybox)?;
        for applet in APPLETS.iter().filter(|a| **a != "busybox") {
            append_symlink(&mut tar, &format!("bin/{applet}"), "busybox")?;
        }

        append_file(&mut tar, RUNSVDIR_START, 0o755, STAND_IN_INIT.as_bytes())?;
        append_file(&mut tar, SBIN_INIT, 0o755, STAND_IN_INIT.as_bytes())?;

        append_file(
            &mut tar,
            "/etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nvcap:x:1000:1000:BOSH System User:/home/vcap:/bin/sh\n",
        )?;
        append_file(&mut tar, "/etc/group", 0o644, b"root:x:0:\nvcap:x:1000:\n")?;
        append_file(
            &mut tar,
            "/etc/hosts",
            0o644,
            b"127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
        )?;
        append_file(&mut tar, "/etc/hostname", 0o644, b"localhost\n")?;
        append_file(
            &mut tar,
            "/etc/resolv.conf",
            0o644,
            b"# cpi-tests stemcell default: the CPI writes the networks' dns here\n",
        )?;
        append_file(
            &mut tar,
            "/etc/os-release",
            0o644,
            os_release(&self.os).as_bytes(),
        )?;
        append_file(
            &mut tar,
            STEMCELL_VERSION_FILE,
            0o644,
            format!("{}\n", self.version).as_bytes(),
        )?;

        if self.padding_bytes > 0 {
            append_dir(&mut tar, "var/vcap/padding", 0o755)?;
            let mut header = file_header(0o644, self.padding_bytes);
            let mut reader = XorShiftReader::new(self.padding_seed, self.padding_bytes);
            tar.append_data(&mut header, rel(PADDING_FILE), &mut reader)?;
        }

        let gz = tar.into_inner()?;
        gz.finish()
    }

    /// Writes `image` and `stemcell.MF` into `dir` (created if missing).
    ///
    /// # Panics
    /// On any I/O error (with the path in the message).
    pub fn build_unpacked(&self, dir: impl AsRef<Path>) -> UnpackedStemcell {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let image_path = dir.join(IMAGE_FILE);
        let file = File::create(&image_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", image_path.display()));
        let hashing = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
        let hashing = self
            .write_image(hashing)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", image_path.display()));
        let (buffered, sha1) = hashing.finish();
        buffered
            .into_inner()
            .map_err(io::IntoInnerError::into_error)
            .and_then(|f| f.sync_all())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", image_path.display()));

        let manifest = render_manifest(
            &self.name,
            &self.version,
            &self.os,
            &["warden-tar", "general-tar"],
            &[("infrastructure", "warden"), ("architecture", "x86_64")],
            &sha1,
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

    /// Writes a stemcell tarball (`.tgz` holding `stemcell.MF` and `image`, as
    /// a downloaded stemcell) to `path`; returns `path`.
    ///
    /// # Panics
    /// On any I/O error (with the path in the message).
    pub fn build_tarball(&self, path: impl AsRef<Path>) -> PathBuf {
        let path = path.as_ref();
        let work = temp_dir_beside(path);
        let unpacked = self.build_unpacked(work.path());
        pack_tarball(&unpacked, path);
        path.to_path_buf()
    }
}

/// Builds a light (docker-light) stemcell; see [`TestStemcell::light`].
#[derive(Debug, Clone)]
pub struct LightStemcellBuilder {
    name: String,
    version: String,
    os: String,
    image_reference: String,
    digest: Option<String>,
}

impl LightStemcellBuilder {
    /// Sets the stemcell name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the stemcell version.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Sets the operating system.
    pub fn os(mut self, os: impl Into<String>) -> Self {
        self.os = os.into();
        self
    }

    /// Sets `cloud_properties.digest` (`sha256:<hex>`); `None` (the default) leaves it out.
    pub fn digest(mut self, digest: Option<String>) -> Self {
        self.digest = digest;
        self
    }

    /// The manifest (`stemcell.MF`) text.
    pub fn manifest(&self) -> String {
        let mut props = vec![("image_reference", self.image_reference.as_str())];
        if let Some(d) = &self.digest {
            props.push(("digest", d.as_str()));
        }
        render_manifest(
            &self.name,
            &self.version,
            &self.os,
            &["docker-light"],
            &props,
            &hex(&Sha1::digest(b"")),
        )
    }

    /// Writes an empty `image` and `stemcell.MF` into `dir` (created if missing).
    ///
    /// # Panics
    /// On any I/O error (with the path in the message).
    pub fn build_unpacked(&self, dir: impl AsRef<Path>) -> UnpackedStemcell {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let image_path = dir.join(IMAGE_FILE);
        std::fs::write(&image_path, b"")
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", image_path.display()));
        let manifest_path = dir.join(MANIFEST_FILE);
        std::fs::write(&manifest_path, self.manifest())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", manifest_path.display()));
        UnpackedStemcell {
            dir: dir.to_path_buf(),
            image_path,
            manifest_path,
            sha1: hex(&Sha1::digest(b"")),
        }
    }

    /// Writes a light stemcell tarball (`stemcell.MF` and an empty `image`) to `path`; returns `path`.
    ///
    /// # Panics
    /// On any I/O error (with the path in the message).
    pub fn build_tarball(&self, path: impl AsRef<Path>) -> PathBuf {
        let path = path.as_ref();
        let work = temp_dir_beside(path);
        let unpacked = self.build_unpacked(work.path());
        pack_tarball(&unpacked, path);
        path.to_path_buf()
    }
}

fn temp_dir_beside(path: &Path) -> tempfile::TempDir {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    tempfile::Builder::new()
        .prefix(".stemcell-build-")
        .tempdir_in(parent)
        .unwrap_or_else(|e| {
            panic!(
                "cannot create a temporary directory in {}: {e}",
                parent.display()
            )
        })
}

fn pack_tarball(unpacked: &UnpackedStemcell, path: &Path) {
    let result = (|| -> io::Result<()> {
        let file = BufWriter::with_capacity(1 << 20, File::create(path)?);
        // The image is already compressed: stored (level 0) gzip blocks keep the
        // outer gzip valid without spending time compressing it again.
        let mut tar = tar::Builder::new(GzEncoder::new(file, Compression::none()));
        for (name, src) in [
            (MANIFEST_FILE, &unpacked.manifest_path),
            (IMAGE_FILE, &unpacked.image_path),
        ] {
            let mut f = File::open(src)?;
            let mut header = file_header(0o644, f.metadata()?.len());
            tar.append_data(&mut header, name, &mut f)?;
        }
        let gz = tar.into_inner()?;
        let file = gz.finish()?;
        file.into_inner()
            .map_err(io::IntoInnerError::into_error)?
            .sync_all()
    })();
    result.unwrap_or_else(|e| panic!("cannot write stemcell tarball {}: {e}", path.display()));
}

/// YAML of a `stemcell.MF`. Strings are written as JSON strings, which are valid
/// YAML double-quoted scalars.
fn render_manifest(
    name: &str,
    version: &str,
    os: &str,
    formats: &[&str],
    cloud_properties: &[(&str, &str)],
    sha1: &str,
) -> String {
    let q = |s: &str| serde_json::Value::from(s).to_string();
    let mut out = String::from("---\n");
    out.push_str(&format!("name: {}\n", q(name)));
    out.push_str(&format!("version: {}\n", q(version)));
    out.push_str("api_version: 3\n");
    out.push_str("bosh_protocol: 1\n");
    out.push_str(&format!("sha1: {}\n", q(sha1)));
    out.push_str(&format!("operating_system: {}\n", q(os)));
    out.push_str("stemcell_formats:\n");
    for f in formats {
        out.push_str(&format!("- {}\n", q(f)));
    }
    out.push_str("cloud_properties:\n");
    for (k, v) in cloud_properties {
        out.push_str(&format!("  {k}: {}\n", q(v)));
    }
    out
}

/// `/etc/os-release` for an operating system name like `ubuntu-jammy`.
fn os_release(os: &str) -> String {
    let (id, codename) = os.split_once('-').unwrap_or((os, ""));
    let version_id = match codename {
        "bionic" => "18.04",
        "focal" => "20.04",
        "jammy" => "22.04",
        "noble" => "24.04",
        _ => "",
    };
    let name = match id {
        "ubuntu" => "Ubuntu",
        other => other,
    };
    format!(
        "NAME=\"{name}\"\nID={id}\nVERSION_ID=\"{version_id}\"\nVERSION_CODENAME={codename}\n\
         PRETTY_NAME=\"cpi-tests stemcell ({os})\"\n"
    )
}

/// Archive path (relative) of an absolute path inside the root filesystem.
pub(crate) fn rel(path: &str) -> &str {
    path.trim_start_matches('/')
}

pub(crate) fn base_header(entry_type: EntryType, mode: u32, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(entry_type);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    // Names are optional; numeric ids are what matters. Ignore a failure to set them.
    let _ = h.set_username("root");
    let _ = h.set_groupname("root");
    h
}

fn file_header(mode: u32, size: u64) -> Header {
    base_header(EntryType::Regular, mode, size)
}

fn append_dir<W: Write>(tar: &mut tar::Builder<W>, path: &str, mode: u32) -> io::Result<()> {
    let mut h = base_header(EntryType::Directory, mode, 0);
    tar.append_data(&mut h, rel(path), io::empty())
}

fn append_file<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    mode: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut h = file_header(mode, data.len() as u64);
    tar.append_data(&mut h, rel(path), data)
}

fn append_symlink<W: Write>(tar: &mut tar::Builder<W>, path: &str, target: &str) -> io::Result<()> {
    let mut h = base_header(EntryType::Symlink, 0o777, 0);
    tar.append_link(&mut h, rel(path), target)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A writer computing the SHA-1 of what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha1,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha1::new(),
        }
    }

    fn finish(self) -> (W, String) {
        (self.inner, hex(&self.hasher.finalize()))
    }
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

/// `len` pseudo-random bytes from a seeded xorshift64* generator, produced on
/// demand (never held in memory). The byte stream depends only on the seed,
/// not on how it is read.
struct XorShiftReader {
    state: u64,
    remaining: u64,
    carry: [u8; 8],
    carry_len: usize,
}

impl XorShiftReader {
    fn new(seed: u64, len: u64) -> Self {
        XorShiftReader {
            // xorshift must not start at 0.
            state: if seed == 0 {
                0x2545_f491_4f6c_dd1d
            } else {
                seed
            },
            remaining: len,
            carry: [0; 8],
            carry_len: 0,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes()
    }
}

impl Read for XorShiftReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let buf = &mut buf[..n];
        let mut filled = 0;
        while filled < n && self.carry_len > 0 {
            buf[filled] = self.carry[8 - self.carry_len];
            self.carry_len -= 1;
            filled += 1;
        }
        let mut chunks = buf[filled..].chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_word());
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            self.carry = self.next_word();
            let k = tail.len();
            tail.copy_from_slice(&self.carry[..k]);
            self.carry_len = 8 - k;
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;
    use std::collections::BTreeMap;

    /// Path (without leading `./`) → (entry type, mode, size, link target) of every entry.
    fn list_image(path: &Path) -> BTreeMap<String, (EntryType, u32, u64, Option<String>)> {
        let file = File::open(path).expect("open image");
        let mut archive = tar::Archive::new(GzDecoder::new(file));
        let mut entries = BTreeMap::new();
        for entry in archive.entries().expect("entries") {
            let entry = entry.expect("entry");
            let h = entry.header();
            let name = entry.path().expect("path").to_string_lossy().into_owned();
            let link = entry
                .link_name()
                .expect("link name")
                .map(|l| l.to_string_lossy().into_owned());
            entries.insert(
                name.trim_start_matches("./")
                    .trim_end_matches('/')
                    .to_string(),
                (
                    h.entry_type(),
                    h.mode().expect("mode"),
                    h.size().expect("size"),
                    link,
                ),
            );
        }
        entries
    }

    fn sha1_file(path: &Path) -> String {
        let mut hasher = Sha1::new();
        let mut f = File::open(path).expect("open");
        io::copy(&mut f, &mut hasher).expect("hash");
        hex(&hasher.finalize())
    }

    #[test]
    fn manifest_parses_back_with_the_right_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sc = TestStemcell::builder()
            .os("ubuntu-noble")
            .version("1.2")
            .name("bosh-warden-boshlite-ubuntu-noble")
            .build_unpacked(dir.path().join("sc"));
        assert_eq!(sc.image_path, dir.path().join("sc/image"));
        assert_eq!(sc.manifest_path, dir.path().join("sc/stemcell.MF"));
        let text = std::fs::read_to_string(&sc.manifest_path).expect("read manifest");
        let mf: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("manifest is YAML");
        assert_eq!(
            mf["name"].as_str(),
            Some("bosh-warden-boshlite-ubuntu-noble")
        );
        assert_eq!(mf["version"].as_str(), Some("1.2"));
        assert_eq!(mf["api_version"].as_u64(), Some(3));
        assert_eq!(mf["bosh_protocol"].as_u64(), Some(1));
        assert_eq!(mf["operating_system"].as_str(), Some("ubuntu-noble"));
        let formats: Vec<&str> = mf["stemcell_formats"]
            .as_sequence()
            .expect("formats")
            .iter()
            .filter_map(|f| f.as_str())
            .collect();
        assert_eq!(formats, ["warden-tar", "general-tar"]);
        assert_eq!(
            mf["cloud_properties"]["infrastructure"].as_str(),
            Some("warden")
        );
        assert_eq!(
            mf["cloud_properties"]["architecture"].as_str(),
            Some("x86_64")
        );
        assert_eq!(mf["sha1"].as_str(), Some(sc.sha1.as_str()));
        assert_eq!(sc.sha1, sha1_file(&sc.image_path));
    }

    #[test]
    fn default_manifest_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sc = TestStemcell::builder().build_unpacked(dir.path());
        let mf: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(&sc.manifest_path).expect("read"))
                .expect("yaml");
        assert_eq!(mf["name"].as_str(), Some(DEFAULT_NAME));
        assert_eq!(mf["version"].as_str(), Some(DEFAULT_VERSION));
        assert_eq!(mf["operating_system"].as_str(), Some(DEFAULT_OS));
    }

    #[test]
    fn image_holds_a_bootable_warden_layout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sc = TestStemcell::builder().build_unpacked(dir.path());
        let entries = list_image(&sc.image_path);

        let (ty, mode, size, _) = &entries["usr/sbin/runsvdir-start"];
        assert_eq!(*ty, EntryType::Regular);
        assert_eq!(mode & 0o111, 0o111, "runsvdir-start must be executable");
        assert!(*size > 0);
        let (ty, mode, _, _) = &entries["sbin/init"];
        assert_eq!(*ty, EntryType::Regular);
        assert_eq!(mode & 0o111, 0o111);

        let busybox_len = std::fs::metadata(DEFAULT_BUSYBOX).expect("busybox").len();
        let (ty, mode, size, _) = &entries["bin/busybox"];
        assert_eq!(
            (*ty, mode & 0o111, *size),
            (EntryType::Regular, 0o111, busybox_len)
        );
        for applet in APPLETS {
            let (ty, _, _, link) = &entries[&format!("bin/{applet}")];
            assert_eq!(*ty, EntryType::Symlink, "{applet}");
            assert_eq!(link.as_deref(), Some("busybox"), "{applet}");
        }

        for d in [
            "var/vcap/bosh",
            "var/vcap/bosh/bin",
            "var/vcap/data",
            "var/vcap/store",
            "var/vcap/jobs",
            "var/vcap/sys",
            "warden-cpi-dev",
            "proc",
            "sys",
            "dev",
            "run",
            "root",
            "usr/lib/modules",
        ] {
            assert_eq!(entries[d].0, EntryType::Directory, "{d}");
        }
        assert_eq!(entries["tmp"].1, 0o1777);
        for f in [
            "etc/passwd",
            "etc/group",
            "etc/hosts",
            "etc/hostname",
            "etc/resolv.conf",
        ] {
            assert_eq!(entries[f].0, EntryType::Regular, "{f}");
        }
        assert!(!entries.contains_key("var/vcap/padding/padding.bin"));
        // Every entry is relative.
        assert!(entries.keys().all(|k| !k.starts_with('/')));
    }

    #[test]
    fn image_is_reproducible() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = TestStemcell::builder().build_unpacked(dir.path().join("a"));
        let b = TestStemcell::builder().build_unpacked(dir.path().join("b"));
        assert_eq!(a.sha1, b.sha1);
        let c = TestStemcell::builder()
            .version("2")
            .build_unpacked(dir.path().join("c"));
        assert_ne!(a.sha1, c.sha1, "the version is recorded in the image");
    }

    #[test]
    fn padding_size_is_honoured_and_incompressible() {
        let dir = tempfile::tempdir().expect("tempdir");
        let padding = 3 * 1024 * 1024 + 5;
        let plain = TestStemcell::builder().build_unpacked(dir.path().join("plain"));
        let padded = TestStemcell::builder()
            .padding_bytes(padding)
            .build_unpacked(dir.path().join("padded"));
        let entries = list_image(&padded.image_path);
        let (ty, _, size, _) = &entries["var/vcap/padding/padding.bin"];
        assert_eq!(*ty, EntryType::Regular);
        assert_eq!(*size, padding);
        let plain_len = std::fs::metadata(&plain.image_path).expect("len").len();
        let padded_len = std::fs::metadata(&padded.image_path).expect("len").len();
        assert!(
            padded_len >= plain_len + padding,
            "padding must not compress: {padded_len} < {plain_len} + {padding}"
        );
    }

    #[test]
    fn xorshift_stream_does_not_depend_on_read_sizes() {
        let mut whole = Vec::new();
        XorShiftReader::new(7, 1000)
            .read_to_end(&mut whole)
            .expect("read");
        assert_eq!(whole.len(), 1000);
        let mut pieces = Vec::new();
        let mut r = XorShiftReader::new(7, 1000);
        let mut buf = [0u8; 13];
        loop {
            let n = r.read(&mut buf[..(pieces.len() % 13) + 1]).expect("read");
            if n == 0 {
                break;
            }
            pieces.extend_from_slice(&buf[..n]);
        }
        assert_eq!(whole, pieces);
        let mut other = Vec::new();
        XorShiftReader::new(8, 1000)
            .read_to_end(&mut other)
            .expect("read");
        assert_ne!(whole, other);
    }

    #[test]
    fn tarball_holds_manifest_and_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tgz = TestStemcell::builder()
            .version("3.4")
            .build_tarball(dir.path().join("stemcell.tgz"));
        let mut archive = tar::Archive::new(GzDecoder::new(File::open(&tgz).expect("open")));
        let mut names = Vec::new();
        let mut manifest = String::new();
        let mut image = Vec::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let name = entry.path().expect("path").to_string_lossy().into_owned();
            match name.as_str() {
                "stemcell.MF" => {
                    entry.read_to_string(&mut manifest).expect("read");
                }
                "image" => {
                    entry.read_to_end(&mut image).expect("read");
                }
                _ => {}
            }
            names.push(name);
        }
        assert_eq!(names, ["stemcell.MF", "image"]);
        let mf: serde_yaml_ng::Value = serde_yaml_ng::from_str(&manifest).expect("yaml");
        assert_eq!(mf["version"].as_str(), Some("3.4"));
        assert_eq!(
            mf["sha1"].as_str(),
            Some(hex(&Sha1::digest(&image)).as_str())
        );
        // Only the tarball is left beside it.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("stemcell.tgz")]);
    }

    #[test]
    fn light_stemcell_manifest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sc = TestStemcell::light("127.0.0.1:5000/cpi-test/busybox:1")
            .digest(Some(format!("sha256:{}", "ab".repeat(32))))
            .version("9")
            .build_unpacked(dir.path());
        assert_eq!(std::fs::metadata(&sc.image_path).expect("image").len(), 0);
        let mf: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(&sc.manifest_path).expect("read"))
                .expect("yaml");
        let formats: Vec<&str> = mf["stemcell_formats"]
            .as_sequence()
            .expect("formats")
            .iter()
            .filter_map(|f| f.as_str())
            .collect();
        assert_eq!(formats, ["docker-light"]);
        assert_eq!(
            mf["cloud_properties"]["image_reference"].as_str(),
            Some("127.0.0.1:5000/cpi-test/busybox:1")
        );
        let digest = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            mf["cloud_properties"]["digest"].as_str(),
            Some(digest.as_str())
        );
        assert_eq!(mf["version"].as_str(), Some("9"));

        let no_digest = TestStemcell::light("busybox:1").manifest();
        let mf: serde_yaml_ng::Value = serde_yaml_ng::from_str(&no_digest).expect("yaml");
        assert!(mf["cloud_properties"].get("digest").is_none());

        let tgz = TestStemcell::light("busybox:1").build_tarball(dir.path().join("light.tgz"));
        let mut archive = tar::Archive::new(GzDecoder::new(File::open(&tgz).expect("open")));
        let sizes: Vec<(String, u64)> = archive
            .entries()
            .expect("entries")
            .map(|e| {
                let e = e.expect("entry");
                (
                    e.path().expect("path").to_string_lossy().into_owned(),
                    e.header().size().expect("size"),
                )
            })
            .collect();
        assert_eq!(sizes[1], ("image".to_string(), 0));
        assert_eq!(sizes[0].0, "stemcell.MF");
    }
}
