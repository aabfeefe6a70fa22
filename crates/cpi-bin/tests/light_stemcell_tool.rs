//! `cpi light-stemcell` through the real binary, without a registry: command-line
//! errors (exit 64, nothing written), offline builds with `--digest`, the tarball's
//! content parsed back with the parser `create_stemcell` uses, and what happens when
//! the registry cannot be reached (a `--digest` stands in, with a warning; without
//! one, exit 1). Against a real registry and both backends: `tests/tests/
//! light_stemcell_tool.rs` in the workspace's test crate.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use cpi_core::StemcellManifest;

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "exit {:?}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `cpi light-stemcell ARGS` in `dir`.
fn light(dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_cpi"))
        .arg("light-stemcell")
        .args(args)
        .current_dir(dir)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .output()
        .expect("run cpi light-stemcell");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn digest(c: char) -> String {
    format!("sha256:{}", c.to_string().repeat(64))
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The tarball's entries: name → content, in order.
fn entries(path: &Path) -> Vec<(String, Vec<u8>)> {
    let file = std::fs::File::open(path).expect("open tarball");
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    archive
        .entries()
        .expect("a tar")
        .map(|e| {
            let mut e = e.expect("entry");
            let name = e.path().expect("path").display().to_string();
            let mut content = Vec::new();
            e.read_to_end(&mut content).expect("read entry");
            (name, content)
        })
        .collect()
}

/// Checks the tarball holds exactly `stemcell.MF` and an empty `image`, and returns
/// the manifest as `create_stemcell` parses it, plus its raw YAML.
fn manifest_of(path: &Path) -> (StemcellManifest, serde_yaml_ng::Value) {
    let entries = entries(path);
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["stemcell.MF", "image"], "{}", path.display());
    assert!(entries[1].1.is_empty(), "the image file must be empty");
    let text = String::from_utf8(entries[0].1.clone()).expect("utf-8 manifest");
    let manifest = StemcellManifest::parse(&text, "stemcell.MF").expect("manifest parses");
    let raw = serde_yaml_ng::from_str(&text).expect("yaml");
    (manifest, raw)
}

#[test]
fn bad_command_lines_exit_64_and_write_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = digest('a');
    for (args, needle) in [
        (&[][..], "no image given"),
        (
            &["reg/ubuntu-noble:1", "--digest", "sha256:short"],
            "sha256:<64",
        ),
        (
            &["reg/ubuntu-noble:latest", "--offline", "--digest", &d],
            "--version",
        ),
        (
            &["reg/ubuntu-noble", "--offline", "--digest", &d],
            "--version",
        ),
        (
            &["reg/ubuntu-noble:1", "--offline"],
            "--offline needs the digest",
        ),
        (
            &[
                "reg/ubuntu-noble:1",
                "--name",
                "a/b",
                "--offline",
                "--digest",
                &d,
            ],
            "--name",
        ),
        (
            &["reg/ubuntu-noble:1", "--username", "u"],
            "--password-file",
        ),
        (&["reg/ubuntu-noble:1", "--frobnicate"], "unknown option"),
        (
            &["/abs/ubuntu-noble:1", "--offline", "--digest", &d],
            "must not start",
        ),
        (
            &["UPPER/Case:1", "--offline", "--digest", &d],
            "not an image reference",
        ),
    ] {
        let run = light(dir.path(), args);
        assert_eq!(run.code, Some(64), "{args:?}\n{}", run.describe());
        assert!(
            run.stderr.contains(needle),
            "{args:?}: want {needle:?}\n{}",
            run.describe()
        );
        assert!(
            run.stderr.contains("usage: cpi light-stemcell IMAGE"),
            "{}",
            run.describe()
        );
        assert!(run.stdout.is_empty(), "{}", run.describe());
    }
    // The digest in the reference and --digest must agree.
    let run = light(
        dir.path(),
        &[
            &format!("reg/ubuntu-noble:1@{}", digest('b')),
            "--digest",
            &d,
            "--offline",
        ],
    );
    assert_eq!(run.code, Some(64), "{}", run.describe());
    assert!(run.stderr.contains("disagree"), "{}", run.describe());
    assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));
}

#[test]
fn offline_with_a_digest_writes_what_create_stemcell_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = digest('c');
    let image = "127.0.0.1:5000/bosh/ubuntu-noble:1.5";
    let run = light(dir.path(), &[image, "--digest", &d, "--offline"]);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    // stdout: the path and nothing else; the default name is in the cwd.
    assert_eq!(run.stdout, "light-bosh-docker-ubuntu-noble-1.5.tgz\n");
    assert!(
        run.stderr.contains("NOT checked against the registry"),
        "{}",
        run.describe()
    );
    assert_eq!(
        listing(dir.path()),
        ["light-bosh-docker-ubuntu-noble-1.5.tgz"]
    );
    let path = dir.path().join(run.stdout.trim_end());
    let (m, raw) = manifest_of(&path);
    assert_eq!(m.name, "bosh-docker-ubuntu-noble");
    assert_eq!(m.version, "1.5");
    assert_eq!(m.operating_system, "ubuntu-noble");
    assert_eq!(m.api_version, Some(3));
    assert!(m.is_light());
    assert!(m.wants_systemd(), "Noble boots systemd");
    let li = m.light_image().expect("light image");
    assert_eq!(li.reference, image);
    assert_eq!(li.digest.as_deref(), Some(d.as_str()));
    assert_eq!(raw["bosh_protocol"].as_str(), Some("1"));

    // `sha1` is the sha1 of the (empty) image, as sha1sum computes it.
    let unpacked = dir.path().join("unpacked");
    std::fs::create_dir(&unpacked).expect("mkdir");
    std::fs::write(unpacked.join("image"), b"").expect("write image");
    let sum = Command::new("sha1sum")
        .arg(unpacked.join("image"))
        .output()
        .expect("sha1sum");
    let sum = String::from_utf8_lossy(&sum.stdout);
    assert_eq!(raw["sha1"].as_str(), sum.split_whitespace().next());

    // Same input, same bytes.
    let again = light(
        dir.path(),
        &[image, "--digest", &d, "--offline", "-o", "again.tgz"],
    );
    assert_eq!(again.code, Some(0), "{}", again.describe());
    assert_eq!(
        std::fs::read(&path).expect("read"),
        std::fs::read(dir.path().join("again.tgz")).expect("read again")
    );
}

#[test]
fn flags_override_what_the_reference_says() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = digest('d');
    let out = dir.path().join("sub").join("my.tgz");
    std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
    let image = format!("ghcr.io/cloudfoundry/ubuntu-noble-stemcell@{d}");
    let run = light(
        dir.path(),
        &[
            &image,
            "--offline",
            "--name=custom",
            "--version",
            "7.01",
            "--os",
            "ubuntu-jammy",
            "--api-version",
            "2",
            "--output",
            &out.display().to_string(),
        ],
    );
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert_eq!(PathBuf::from(run.stdout.trim_end()), out);
    let (m, _) = manifest_of(&out);
    assert_eq!(
        (
            m.name.as_str(),
            m.version.as_str(),
            m.operating_system.as_str()
        ),
        ("custom", "7.01", "ubuntu-jammy")
    );
    assert_eq!(m.api_version, Some(2));
    assert!(!m.wants_systemd(), "Jammy boots runit");
    let li = m.light_image().expect("light image");
    assert_eq!(li.reference, image);
    assert_eq!(
        li.digest.as_deref(),
        Some(d.as_str()),
        "digest from the reference"
    );

    // The OS (and so the name) from a `-stemcell` repository.
    let run = light(
        dir.path(),
        &[
            "ghcr.io/cloudfoundry/ubuntu-noble-stemcell:1.165",
            "--digest",
            &d,
            "--offline",
        ],
    );
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert_eq!(run.stdout, "light-bosh-docker-ubuntu-noble-1.165.tgz\n");
    assert!(!run.stderr.contains("warning"), "{}", run.describe());

    // No ubuntu-<codename> in the name: the repository's name, with a warning.
    let run = light(dir.path(), &["reg/busybox:1", "--digest", &d, "--offline"]);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert_eq!(run.stdout, "light-bosh-docker-busybox-1.tgz\n");
    assert!(
        run.stderr.contains("warning: no ubuntu-<codename>"),
        "{}",
        run.describe()
    );
    assert!(run.stderr.contains("--os"), "{}", run.describe());
}

#[test]
fn an_unreachable_registry_needs_a_digest_and_never_sees_the_password_printed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = "light-stemcell-password-never-printed";
    std::fs::write(dir.path().join("pw"), format!("{secret}\n")).expect("write pw");
    // Nothing listens on port 1: the connection is refused at once.
    let image = "127.0.0.1:1/bosh/ubuntu-jammy:2";
    let creds = ["--username", "ci", "--password-file", "pw"];

    let mut args = vec![image];
    args.extend(creds);
    let run = light(dir.path(), &args);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    assert!(
        run.stderr.contains("--digest"),
        "names the way out\n{}",
        run.describe()
    );
    assert!(run.stderr.contains("127.0.0.1:1"), "{}", run.describe());
    assert!(run.stdout.is_empty(), "{}", run.describe());
    assert!(!run.stderr.contains(secret) && !run.stdout.contains(secret));
    assert_eq!(listing(dir.path()), ["pw"], "nothing written");

    let d = digest('e');
    let mut args = vec![image, "--digest", &d];
    args.extend(creds);
    let run = light(dir.path(), &args);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert!(
        run.stderr.contains("warning: could not check the digest"),
        "{}",
        run.describe()
    );
    assert!(!run.stderr.contains(secret) && !run.stdout.contains(secret));
    let (m, _) = manifest_of(&dir.path().join(run.stdout.trim_end()));
    assert_eq!(m.light_image().expect("light").digest, Some(d));
    assert_eq!(m.operating_system, "ubuntu-jammy");

    // A missing password file is a failure that names it.
    let run = light(
        dir.path(),
        &[image, "--username", "ci", "--password-file", "missing-pw"],
    );
    assert_eq!(run.code, Some(1), "{}", run.describe());
    assert!(run.stderr.contains("missing-pw"), "{}", run.describe());
}

#[test]
fn a_missing_output_directory_fails_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = light(
        dir.path(),
        &[
            "reg/ubuntu-noble:1",
            "--offline",
            "--digest",
            &digest('f'),
            "-o",
            "no/such/dir/x.tgz",
        ],
    );
    assert_eq!(run.code, Some(1), "{}", run.describe());
    assert!(run.stderr.contains("no/such/dir"), "{}", run.describe());
    assert!(
        run.stderr.contains("no tarball was written"),
        "{}",
        run.describe()
    );
    assert!(listing(dir.path()).is_empty());
}

#[test]
fn help_documents_the_subcommand() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = light(dir.path(), &["--help"]);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    for needle in [
        "cpi light-stemcell IMAGE",
        "--digest",
        "--offline",
        "--password-file",
        "bosh-docker-<operating system>",
        "docs/light-stemcells.md",
    ] {
        assert!(run.stdout.contains(needle), "{needle}\n{}", run.describe());
    }
}
