//! Smoke runs of the load generator (`ferry-bench produce --quick` and
//! `ferry-bench e2e --quick`) against the debug sidecar: every figure line
//! must be printed with a positive figure, baseline and ratio, and every
//! figure the performance report judges (`scripts/bench`, issue #9) must be
//! in the `--json-out` file, well formed. Timings are never asserted.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Mutex;

use serde_json::Value;

/// The report's list of figures, shared with `ferry-bench`.
#[allow(dead_code)]
#[path = "../src/bin/ferry-bench/catalogue.rs"]
mod catalogue;

use catalogue::Source;

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

/// Runs `ferry-bench {command} --quick --json-out FILE` against the debug
/// sidecar; returns its output and the JSON lines it wrote.
fn quick_run(command: &str) -> (Output, String) {
    let sidecar = debug_sidecar();
    assert!(
        sidecar.is_file(),
        "{} is missing: build it with `cargo build -p ferry-sidecar` (`cargo test --workspace` does)",
        sidecar.display()
    );
    let dir = tempfile::tempdir().expect("a temp dir");
    let json = dir.path().join("figures.jsonl");
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-bench"))
        .args([command, "--quick", "--sidecar-bin"])
        .arg(&sidecar)
        .arg("--json-out")
        .arg(&json)
        .output()
        .expect("running ferry-bench");
    (out, std::fs::read_to_string(&json).unwrap_or_default())
}

/// Every figure the report judges for `source` is in `json` once, with the
/// fields the report reads: a positive value and unit, a positive
/// baseline and ratio when there is a baseline, the catalogue's goal and
/// a verdict (`met` true or false; `null` only where a quick run is not
/// under the goal's conditions), marked as a quick run.
fn check_json(source: Source, json: &str, output: &str) {
    let figures: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}\n{output}")))
        .collect();
    for f in &figures {
        let id = f["figure"].as_str().unwrap_or_else(|| panic!("no figure id in {f}"));
        assert!(catalogue::entry(id).is_some(), "{id} is not in the report's catalogue: {f}");
        assert_eq!(f["source"].as_str(), Some(source.name()), "{f}");
        assert_eq!(f["quick"].as_bool(), Some(true), "{f}");
    }
    for e in catalogue::required(source) {
        let found: Vec<&Value> = figures.iter().filter(|f| f["figure"] == e.id).collect();
        assert_eq!(found.len(), 1, "figure {} written {} times in:\n{json}\n{output}", e.id, found.len());
        let f = found[0];
        let value = f["value"].as_f64().unwrap_or_else(|| panic!("{}: no numeric value: {f}", e.id));
        assert!(value > 0.0, "{}: value not positive: {f}", e.id);
        assert!(!f["unit"].as_str().unwrap_or_default().is_empty(), "{}: no unit: {f}", e.id);
        assert!(!f["label"].as_str().unwrap_or_default().is_empty(), "{}: no label: {f}", e.id);
        if !f["baseline"].is_null() {
            assert!(f["baseline"].as_f64().is_some_and(|b| b > 0.0), "{}: baseline not positive: {f}", e.id);
            assert!(f["ratio"].as_f64().is_some_and(|r| r > 0.0), "{}: ratio not positive: {f}", e.id);
            assert!(!f["baseline_label"].as_str().unwrap_or_default().is_empty(), "{}: baseline unnamed: {f}", e.id);
        }
        assert_eq!(f["goal"].as_str(), e.goal, "{}: goal wording differs from the catalogue's", e.id);
        assert!(f["met"].is_boolean(), "{}: not judged in a quick run: {f}", e.id);
    }
}

#[test]
fn the_quick_bench_prints_every_figure_with_a_positive_number() {
    let (out, json) = quick_run("produce");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ferry-bench failed ({}):\n{stdout}\n{stderr}", out.status);
    check_json(Source::Produce, &json, &format!("{stdout}\n{stderr}"));
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
    let (out, json) = quick_run("e2e");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ferry-bench e2e failed ({}):\n{stdout}\n{stderr}", out.status);
    check_json(Source::E2e, &json, &format!("{stdout}\n{stderr}"));
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
