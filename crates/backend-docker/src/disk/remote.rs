//! Attach mode `helper`: the daemon's host is out of reach (a remote daemon, or a CPI
//! in another mount namespace), so a short-lived helper container does the mounting
//! on it. The helper runs the VM's own stemcell image with `CAP_SYS_ADMIN`, the state
//! directory bound `rshared` at [`STATE`] and the disk volume at [`DISK`]; a bind
//! mount it makes under [`STATE`] propagates to the host's state directory and from
//! there into the VM, and outlives the helper.

use std::path::Path;

use cpi_core::CallContext;

use crate::client::Client;
use crate::disk::mounts::{self, MountEntry, StateLayout};
use crate::error::{DockerError, Result};
use crate::helper::{self, sh_quote, HelperSpec};

/// Where a helper sees the state directory.
pub const STATE: &str = "/cpi-state";
/// Where a helper sees the disk volume.
pub const DISK: &str = "/cpi-disk";

const ALREADY: &str = "BOSH_CPI_ALREADY_ATTACHED";
const NOT_ATTACHED: &str = "BOSH_CPI_NOT_ATTACHED";

fn inner(vm: &str, disk: Option<&str>) -> String {
    match disk {
        Some(d) => format!("{STATE}/vms/{vm}/disks/{d}"),
        None => format!("{STATE}/vms/{vm}"),
    }
}

fn regex_escape(s: &str) -> String {
    s.replace('.', "\\.")
}

/// The attach script: refuses nothing itself, but reports an existing attachment of
/// the disk (anywhere) instead of mounting it twice.
pub fn attach_script(vm: &str, disk: &str) -> String {
    let target = sh_quote(&inner(vm, Some(disk)));
    let pattern = sh_quote(&format!(
        " {STATE}/vms/[^/ ]+/disks/{} ",
        regex_escape(disk)
    ));
    format!(
        "set -e\n\
         if grep -E {pattern} /proc/self/mountinfo; then echo {ALREADY}; exit 0; fi\n\
         mkdir -p {target}\n\
         mount --bind {DISK} {target}\n\
         grep -q \" \"{target}\" \" /proc/self/mountinfo\n"
    )
}

/// The detach script.
pub fn detach_script(vm: &str, disk: &str) -> String {
    let target = sh_quote(&inner(vm, Some(disk)));
    format!(
        "if ! grep -q \" \"{target}\" \" /proc/self/mountinfo; then echo {NOT_ATTACHED}; exit 0; fi\n\
         umount {target} 2>/dev/null || umount -l {target}\n\
         rmdir {target} 2>/dev/null || true\n"
    )
}

/// The script removing a VM's directory after unmounting everything below it.
pub fn remove_vm_script(vm: &str) -> String {
    let dir = sh_quote(&inner(vm, None));
    format!(
        "D={dir}\n\
         [ -d \"$D\" ] || exit 0\n\
         grep -o \" $D/[^ ]* \" /proc/self/mountinfo | sort -r | while read -r m; do umount \"$m\" 2>/dev/null || umount -l \"$m\"; done\n\
         if grep -q \" $D/\" /proc/self/mountinfo; then echo \"still mounted below $D\" >&2; exit 1; fi\n\
         rm -rf \"$D\"\n"
    )
}

/// The script making the state directory a shared mount in the mount namespace of
/// the container runtime. The helper shares the host's PID namespace, so its parent
/// is the runtime's shim; it enters the shim's mount namespace with whichever
/// `nsenter` it finds (the image's, busybox's, or the host's through `chroot`).
pub fn share_state_script(root: &Path) -> String {
    let root = sh_quote(&root.display().to_string());
    let inner = format!(
        "mkdir -p {root} && {{ grep -q \" \"{root}\" \" /proc/self/mountinfo || mount --bind {root} {root}; }} && mount --make-rshared {root}"
    );
    let inner = sh_quote(&inner);
    format!(
        "if command -v nsenter >/dev/null 2>&1; then exec nsenter -t \"$PPID\" -m -- /bin/sh -c {inner}; fi\n\
         if [ -x /bin/busybox ] && /bin/busybox nsenter --help >/dev/null 2>&1; then exec /bin/busybox nsenter -t \"$PPID\" -m -- /bin/sh -c {inner}; fi\n\
         C=chroot; command -v chroot >/dev/null 2>&1 || C='/bin/busybox chroot'\n\
         exec $C /host nsenter -t \"$PPID\" -m -- /bin/sh -c {inner}\n"
    )
}

fn state_bind(layout: &StateLayout) -> String {
    format!("{}:{STATE}:rshared", layout.root().display())
}

fn spec(purpose: String, image: &str, script: String, binds: Vec<String>) -> HelperSpec {
    HelperSpec {
        purpose,
        image: image.to_owned(),
        script,
        binds,
        cap_add: vec!["SYS_ADMIN".into()],
        pid_host: false,
    }
}

/// Whether a daemon error says the state directory is not on a shared mount.
pub fn is_not_shared_error(err: &DockerError) -> bool {
    err.to_string().contains("not a shared")
}

/// Runs a helper that needs the state directory bound `rshared`; when the daemon says
/// the directory is not on a shared mount, makes it one first and retries once.
async fn run_on_state(
    client: &Client,
    ctx: &CallContext,
    layout: &StateLayout,
    spec: HelperSpec,
) -> Result<helper::HelperOutput> {
    match helper::run(client, ctx, &spec).await {
        Err(e) if is_not_shared_error(&e) => {
            share_state_dir(client, ctx, layout, &spec.image).await?;
            helper::run(client, ctx, &spec).await
        }
        other => other,
    }
}

/// Makes the state directory a shared mount on the daemon's host.
pub async fn share_state_dir(
    client: &Client,
    ctx: &CallContext,
    layout: &StateLayout,
    image: &str,
) -> Result<()> {
    tracing::info!(state_dir = %layout.root().display(), "making the state directory a shared mount on the daemon's host");
    let spec = HelperSpec {
        purpose: format!("making {} a shared mount", layout.root().display()),
        image: image.to_owned(),
        script: share_state_script(layout.root()),
        binds: vec!["/:/host:ro".into()],
        cap_add: vec!["SYS_ADMIN".into(), "SYS_CHROOT".into(), "SYS_PTRACE".into()],
        pid_host: true,
    };
    helper::run(client, ctx, &spec).await.map(|_| ())
}

/// What the attach helper found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachOutcome {
    /// Mounted now.
    Mounted,
    /// Already mounted, for these VMs.
    AlreadyAttached(Vec<String>),
}

/// Mounts the disk volume for the VM.
pub async fn attach(
    client: &Client,
    ctx: &CallContext,
    layout: &StateLayout,
    image: &str,
    vm: &str,
    disk: &str,
) -> Result<AttachOutcome> {
    let out = run_on_state(
        client,
        ctx,
        layout,
        spec(
            format!("attaching disk {disk} to VM {vm}"),
            image,
            attach_script(vm, disk),
            vec![state_bind(layout), format!("{disk}:{DISK}")],
        ),
    )
    .await?;
    if out.stdout.contains(ALREADY) {
        let table = mounts::rebase(
            mounts::parse_mountinfo(&out.stdout),
            Path::new(STATE),
            layout,
        );
        return Ok(AttachOutcome::AlreadyAttached(mounts::vms_with_disk(
            &table, layout, disk,
        )));
    }
    Ok(AttachOutcome::Mounted)
}

/// Unmounts the disk from the VM. `false` when it was not mounted there.
pub async fn detach(
    client: &Client,
    ctx: &CallContext,
    layout: &StateLayout,
    image: &str,
    vm: &str,
    disk: &str,
) -> Result<bool> {
    let out = run_on_state(
        client,
        ctx,
        layout,
        spec(
            format!("detaching disk {disk} from VM {vm}"),
            image,
            detach_script(vm, disk),
            vec![state_bind(layout)],
        ),
    )
    .await?;
    Ok(!out.stdout.contains(NOT_ATTACHED))
}

/// The host's mounts under the state directory.
pub async fn mount_table(
    client: &Client,
    ctx: &CallContext,
    layout: &StateLayout,
    image: &str,
) -> Result<Vec<MountEntry>> {
    let out = run_on_state(
        client,
        ctx,
        layout,
        spec(
            "reading the mount table".into(),
            image,
            "cat /proc/self/mountinfo".into(),
            vec![state_bind(layout)],
        ),
    )
    .await?;
    Ok(mounts::rebase(
        mounts::parse_mountinfo(&out.stdout),
        Path::new(STATE),
        layout,
    ))
}

/// Unmounts everything of the VM and removes its directory.
pub async fn remove_vm(
    client: &Client,
    ctx: &CallContext,
    layout: &StateLayout,
    image: &str,
    vm: &str,
) -> Result<()> {
    run_on_state(
        client,
        ctx,
        layout,
        spec(
            format!("removing the directory of VM {vm}"),
            image,
            remove_vm_script(vm),
            vec![state_bind(layout)],
        ),
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh_ok(script: &str) {
        let out = std::process::Command::new("sh")
            .args(["-n", "-c", script])
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{script}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn scripts_are_valid_sh_and_name_the_right_paths() {
        let a = attach_script("c-1", "vol-1.x");
        assert!(
            a.contains("mount --bind /cpi-disk /cpi-state/vms/c-1/disks/vol-1.x"),
            "{a}"
        );
        assert!(a.contains("disks/vol-1\\.x "), "{a}");
        sh_ok(&a);
        let d = detach_script("c-1", "vol-1");
        assert!(d.contains("umount /cpi-state/vms/c-1/disks/vol-1"));
        sh_ok(&d);
        let r = remove_vm_script("c-1");
        assert!(r.contains("D=/cpi-state/vms/c-1"));
        assert!(!r.contains("rm -rf /cpi-state\n"));
        sh_ok(&r);
        let s = share_state_script(Path::new("/srv/state"));
        assert!(s.contains("mount --make-rshared /srv/state"));
        sh_ok(&s);
    }

    #[test]
    fn recognises_the_daemons_propagation_error() {
        let err = DockerError::api(
            "unix:///x",
            "creating helper",
            bollard::errors::Error::DockerResponseServerError {
                status_code: 500,
                message: "path /srv/state is mounted on /srv/state but it is not a shared mount"
                    .into(),
            },
        );
        assert!(is_not_shared_error(&err));
    }
}
