//! Writes the light stemcell tarball: a gzip tar holding `stemcell.MF` and an empty
//! `image`, as the bosh CLI and the director unpack it.
//!
//! The file appears whole or not at all: it is written to a temporary file in the
//! target directory, synced, and renamed over the target. The bytes depend only on
//! the manifest (fixed mode, owner and times), so the same image and flags give the
//! same tarball and the same sha1.

use std::fs::Permissions;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result};
use flate2::write::GzEncoder;
use flate2::{Compression, GzBuilder};

/// Builds the gzip tar in memory (it is a few hundred bytes).
pub fn tarball_bytes(manifest: &str) -> Result<Vec<u8>> {
    let gz: GzEncoder<Vec<u8>> = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::best());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    for (name, content) in [("stemcell.MF", manifest.as_bytes()), ("image", &[][..])] {
        let mut header = tar::Header::new_ustar();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, name, content)
            .with_context(|| format!("adding {name} to the tarball"))?;
    }
    let gz = tar.into_inner().context("finishing the tar stream")?;
    gz.finish().context("finishing the gzip stream")
}

/// Writes `bytes` to `path` atomically (temporary file in the same directory, then
/// rename), mode 0644 (a stemcell holds no secret).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if path.is_dir() {
        anyhow::bail!(
            "{} is a directory: give --output a file name",
            path.display()
        );
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(".light-stemcell-")
        .suffix(".tmp")
        .permissions(Permissions::from_mode(0o644))
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    // On failure the temporary file is removed when `tmp` drops.
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("renaming the tarball to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn entries(bytes: &[u8]) -> Vec<(String, Vec<u8>, u32)> {
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
        archive
            .entries()
            .expect("entries")
            .map(|e| {
                let mut e = e.expect("entry");
                let name = e.path().expect("path").display().to_string();
                let mode = e.header().mode().expect("mode");
                let mut content = Vec::new();
                e.read_to_end(&mut content).expect("read");
                (name, content, mode)
            })
            .collect()
    }

    #[test]
    fn holds_the_manifest_and_an_empty_image_and_is_reproducible() {
        let bytes = tarball_bytes("name: x\nversion: '1'\n").expect("tarball");
        assert_eq!(
            entries(&bytes),
            vec![
                (
                    "stemcell.MF".to_owned(),
                    b"name: x\nversion: '1'\n".to_vec(),
                    0o644
                ),
                ("image".to_owned(), Vec::new(), 0o644),
            ]
        );
        assert_eq!(
            bytes,
            tarball_bytes("name: x\nversion: '1'\n").expect("again")
        );
    }

    #[test]
    fn writes_atomically_and_replaces() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.tgz");
        write_atomically(&path, b"first").expect("write");
        write_atomically(&path, b"second").expect("replace");
        assert_eq!(std::fs::read(&path).expect("read"), b"second");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        // 0644 less the umask: readable by its owner, writable by no one else.
        assert_eq!(mode & 0o733, 0o600, "{mode:o}");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.tgz")]);
        let err = write_atomically(dir.path(), b"x").expect_err("a directory");
        assert!(err.to_string().contains("is a directory"), "{err}");
        let err =
            write_atomically(&dir.path().join("no/such/dir/x.tgz"), b"x").expect_err("missing dir");
        assert!(format!("{err:#}").contains("no/such/dir"), "{err:#}");
    }
}
