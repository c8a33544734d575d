//! Smoke run of the load generator (`ferry-bench produce --quick`) against
//! the debug sidecar: every figure line must be printed with a positive
//! figure and a positive ratio. Timings are never asserted.

use std::path::PathBuf;
use std::process::Command;

/// `target/debug/ferry-sidecar`, beside the directory holding this test
/// executable (`target/debug/deps`).
fn debug_sidecar() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target/debug");
    dir.join("ferry-sidecar")
}

/// The first number among the words of `text` (`1.25x,` counts as 1.25).
fn first_number(text: &str) -> Option<f64> {
    text.split_whitespace().filter_map(|w| w.trim_end_matches([',', ';', 'x', ')']).parse::<f64>().ok()).next()
}

#[test]
fn the_quick_bench_prints_every_figure_with_a_positive_number() {
    let sidecar = debug_sidecar();
    assert!(
        sidecar.is_file(),
        "{} is missing: build it with `cargo build -p ferry-sidecar` (`cargo test --workspace` does)",
        sidecar.display()
    );
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-bench"))
        .args(["produce", "--quick", "--sidecar-bin"])
        .arg(&sidecar)
        .output()
        .expect("running ferry-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ferry-bench failed ({}):\n{stdout}\n{stderr}", out.status);
    for fig in 1..=5 {
        let prefix = format!("fig{fig} ");
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{stdout}\n{stderr}"));
        let (_, rest) = line.split_once(": ").unwrap_or_else(|| panic!("no figure in {line:?}"));
        let value = first_number(rest).unwrap_or_else(|| panic!("no number in {line:?}"));
        assert!(value > 0.0, "figure {fig} is not positive: {line}");
        let (_, after) = line.split_once("| baseline ").unwrap_or_else(|| panic!("no baseline in {line:?}"));
        let baseline = first_number(after).unwrap_or_else(|| panic!("no baseline number in {line:?}"));
        assert!(baseline > 0.0, "figure {fig}'s baseline is not positive: {line}");
        let (_, after) = line.split_once("| ratio ").unwrap_or_else(|| panic!("no ratio in {line:?}"));
        let ratio = first_number(after).unwrap_or_else(|| panic!("no ratio number in {line:?}"));
        assert!(ratio > 0.0, "figure {fig}'s ratio is not positive: {line}");
    }
}
