//! Unique names for the resources a test run creates.
//!
//! Every name starts with [`run_id`], so leftovers of a run are easy to find
//! (`docker ps -a --filter name=t1a2b3c4d`) and parallel runs never collide.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The id of this test process: `t` followed by 8 lowercase hex digits, e.g. `t1a2b3c4d`.
///
/// The same value for the whole process, different for every process.
pub fn run_id() -> &'static str {
    static RUN_ID: OnceLock<String> = OnceLock::new();
    RUN_ID.get_or_init(|| {
        let hex = uuid::Uuid::new_v4().simple().to_string();
        format!("t{}", &hex[..8])
    })
}

/// A name unique within this process and across runs: `<run_id>-<label>-<n>`.
///
/// `label` should consist of characters valid in Docker and containerd names
/// (`[a-z0-9_.-]`); it is used as is.
pub fn unique_name(label: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{label}-{n}", run_id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_id_is_stable_and_well_formed() {
        let id = run_id();
        assert_eq!(id, run_id());
        assert_eq!(id.len(), 9);
        assert!(id.starts_with('t'));
        assert!(id[1..]
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }

    #[test]
    fn unique_names_differ() {
        let a = unique_name("vm");
        let b = unique_name("vm");
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("{}-vm-", run_id())));
    }
}
