//! Smoke runs of the load generator (`ferry-bench produce --quick` and
//! `ferry-bench e2e --quick`) against the debug sidecar: every figure line
//! must be printed with a positive figure, baseline and ratio. Timings are
//! never asserted.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Mutex;

/// One smoke run at a time: each starts its own servers and loads, and
/// both sharing the cores would only make each slower.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

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

/// Runs `ferry-bench {command} --quick` against the debug sidecar.
fn quick_run(command: &str) -> Output {
    let sidecar = debug_sidecar();
    assert!(
        sidecar.is_file(),
        "{} is missing: build it with `cargo build -p ferry-sidecar` (`cargo test --workspace` does)",
        sidecar.display()
    );
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    Command::new(env!("CARGO_BIN_EXE_ferry-bench"))
        .args([command, "--quick", "--sidecar-bin"])
        .arg(&sidecar)
        .output()
        .expect("running ferry-bench")
}

#[test]
fn the_quick_bench_prints_every_figure_with_a_positive_number() {
    let out = quick_run("produce");
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

/// Every number among the words of `text` (`(1000`, `2.37x,` and `0.655`
/// count; `p50`, `ack=local` and `e2e3/e2e4)` do not).
fn numbers(text: &str) -> Vec<f64> {
    text.split_whitespace()
        .filter_map(|w| w.trim_matches(['(', ')', ',', ';']).trim_end_matches('x').parse::<f64>().ok())
        .collect()
}

/// The measured part of a segment: after its last `: ` (what precedes it
/// describes the set-up, whose numbers are settings).
fn measured(segment: &str) -> &str {
    segment.rsplit_once(": ").map_or(segment, |(_, m)| m)
}

#[test]
fn the_quick_end_to_end_bench_prints_every_figure_with_positive_numbers() {
    let out = quick_run("e2e");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ferry-bench e2e failed ({}):\n{stdout}\n{stderr}", out.status);
    for fig in 1..=5 {
        let prefix = format!("e2e{fig} ");
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{stdout}\n{stderr}"));
        let (_, rest) = line.split_once(": ").unwrap_or_else(|| panic!("no figure in {line:?}"));
        let parts: Vec<&str> = rest.split(" | ").collect();
        let part = |name: &str| {
            parts.iter().find(|p| p.starts_with(name)).unwrap_or_else(|| panic!("no {name:?} part in {line:?}"))
        };
        for (what, segment) in [("figure", parts[0]), ("baseline", part("baseline ")), ("ratio", part("ratio "))] {
            let values = numbers(measured(segment));
            assert!(!values.is_empty(), "no number in the {what} of {line:?}");
            assert!(values.iter().all(|v| *v > 0.0), "a number in the {what} is not positive: {line}");
        }
    }
}
