//! `cpi-bench`: the benchmark command (not a test). Measures the `cpi` binary's calls
//! as whole processes beside the raw floor of the same daemon operations, prints one
//! table and writes a JSON document. Run it with `bash scripts/bench.sh`; what it
//! measures is in `docs/performance.md` and in the `bench` modules.
//!
//! The modules live in `src/bench/` (pulled in by path, so the test kit's library stays
//! as it is and only this binary carries them).

#[path = "../bench/mod.rs"]
mod bench;

fn main() -> std::process::ExitCode {
    bench::main()
}
