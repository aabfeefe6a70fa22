//! `link-order.txt`, the list `build.rs` hands the linker for the release build
//! (docs/performance.md, "Link order"): one symbol name per line, as
//! `scripts/link-order.sh` writes it. A hand edit, a merge conflict or a truncated file
//! would not fail the link (LLD skips names it does not know), so this checks the form.

use std::collections::HashSet;

fn list() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/link-order.txt");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

#[test]
fn one_symbol_name_per_line_without_repeats() {
    let text = list();
    assert!(text.ends_with('\n'), "the list must end with a newline");
    let mut seen = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        assert!(
            !line.is_empty() && !line.chars().any(char::is_whitespace),
            "line {}: {line:?} is not a symbol name",
            n + 1
        );
        assert!(
            !line.starts_with("<<<<<<<") && !line.starts_with(">>>>>>>"),
            "line {}: a merge conflict marker",
            n + 1
        );
        assert!(seen.insert(line), "line {}: {line} is listed twice", n + 1);
    }
    assert!(
        seen.len() >= 500,
        "only {} names: the list looks truncated",
        seen.len()
    );
}

#[test]
fn lists_this_binary_s_entry_point_among_the_trivial_calls() {
    // The script lists the trivial calls' functions first; the CPI's own `main` runs
    // in every call, so it must be among them, as a Rust symbol of the `cpi` crate.
    let text = list();
    let at = text
        .lines()
        .position(|l| l.starts_with("_ZN3cpi4main17h"))
        .expect("cpi::main is not in the list: was it written from another binary?");
    let trivial_share = text.lines().count() / 2;
    assert!(
        at < trivial_share,
        "cpi::main is at line {}, after the first half of the list",
        at + 1
    );
}
