//! `cpi-measure`: the benchmark's measuring parent. Runs one program with the
//! director's environment, waits for it, and appends its wall time, peak RSS and CPU
//! time to stderr (`cpi-measure <timeout_secs> <program> [args…]`). A binary of its
//! own because a child's peak RSS never reads below its parent's RSS at the spawn;
//! see [`cpi_tests::measure_parent`].

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    cpi_tests::measure_parent::measuring_parent(&args)
}
