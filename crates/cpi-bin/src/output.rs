//! The one place that writes to stdout.
//!
//! stdout carries the response line and nothing else (or the text of `--help` and
//! `--version`). The workspace denies `print!`/`println!`; we write through
//! `std::io::Write` instead, which also lets a closed stdout become an exit status
//! rather than a panic.

use std::io::Write;
use std::process::ExitCode;

/// Writes `bytes` to stdout and flushes. Success means the caller got everything.
pub fn write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()
}

/// Writes `bytes` and turns the outcome into the exit status: 0 when written, 1 when
/// not (the only case where the CPI exits non-zero).
pub fn finish(bytes: &[u8]) -> ExitCode {
    match write_stdout(bytes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // stdout is gone; stderr is the last place to say why.
            let _ = writeln!(
                std::io::stderr(),
                "cpi: cannot write the response to stdout: {e}"
            );
            ExitCode::FAILURE
        }
    }
}
