//! Link order of the release `cpi` (docs/performance.md, "Link order").
//!
//! Every CPI call is a fresh process, and most of a trivial call's peak RSS and page
//! faults are pages of the binary's code: the kernel maps code around each fault, so
//! what a call pays for is how many pages the code it runs is spread over.
//! `link-order.txt` lists the functions the profiled calls ran (written by
//! `scripts/link-order.sh`); with `CPI_LINK_ORDER=1`, the linker places them first and
//! side by side. `build_release_cpi` sets it; other builds link as usual. It needs
//! LLD (`--symbol-ordering-file`), the toolchain's default linker on
//! x86_64-unknown-linux-gnu. Names missing from the binary are skipped, so a stale
//! list costs locality, never correctness; `build_release_cpi` reports how many
//! were placed.

#[allow(
    clippy::print_stdout,
    reason = "cargo reads a build script's instructions from its stdout"
)]
fn main() {
    println!("cargo:rerun-if-changed=link-order.txt");
    println!("cargo:rerun-if-env-changed=CPI_LINK_ORDER");
    if std::env::var_os("CPI_LINK_ORDER").is_some_and(|v| v == "1") {
        let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".to_owned());
        println!("cargo:rustc-link-arg-bin=cpi=-Wl,--symbol-ordering-file={dir}/link-order.txt");
        println!("cargo:rustc-link-arg-bin=cpi=-Wl,--no-warn-symbol-ordering");
    }
}
