//! `ferry-bench report` and `ferry-bench describe`: the performance report
//! of issue #9 (`bench/REPORT.md`, written by `scripts/bench`).
//!
//! `describe` appends one `{"run": {...}}` line to the run's JSON-lines file:
//! date, git commit, the command line and the machine (CPUs, memory, kernel,
//! the data dir's filesystem, rustc, nats-server). The benchmarks append
//! their figures ([`Figure`]), and `scripts/bench` one `{"step": name,
//! "seconds": s, "status": exit}` line per step. `report` renders that file
//! alone into one Markdown table, so a report can be rendered again from a
//! kept file, and [`render`] is a pure function (unit-tested below).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use serde_json::{json, Map, Value};

use crate::catalogue::{self, GROUPS};
use crate::figures::{Figure, JsonOut};

/// `ferry-bench report`.
#[derive(Debug, Args, Clone)]
pub(crate) struct ReportArgs {
    /// The run's JSON-lines file (figures, steps and the run's description).
    #[arg(long)]
    input: PathBuf,
    /// The Markdown file to write (replaced).
    #[arg(long)]
    output: PathBuf,
}

/// `ferry-bench describe`.
#[derive(Debug, Args, Clone)]
pub(crate) struct DescribeArgs {
    /// The JSON-lines file to append the run's description to.
    #[arg(long)]
    json_out: PathBuf,
    /// The directory the benchmarks keep their data in (its filesystem is reported).
    #[arg(long)]
    data_dir: PathBuf,
    /// The command line that started the run, as the report shows it.
    #[arg(long, default_value = "scripts/bench")]
    command: String,
}

/// Runs `ferry-bench report`.
pub(crate) fn report_main(args: ReportArgs) -> ExitCode {
    let text = match std::fs::read_to_string(&args.input) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ferry-bench report: reading {}: {e}", args.input.display());
            return ExitCode::FAILURE;
        }
    };
    let input = parse(&text);
    for w in &input.warnings {
        eprintln!("ferry-bench report: {w}");
    }
    let markdown = render(&input);
    if let Err(e) = std::fs::write(&args.output, markdown) {
        eprintln!("ferry-bench report: writing {}: {e}", args.output.display());
        return ExitCode::FAILURE;
    }
    let t = tally(&rows(&input));
    println!(
        "ferry-bench report: wrote {} ({} figures; goals: {} met, {} not met, {} not judged, {} not measured)",
        args.output.display(),
        input.figures.len(),
        t.met,
        t.not_met,
        t.not_judged,
        t.not_measured
    );
    ExitCode::SUCCESS
}

/// Runs `ferry-bench describe`.
pub(crate) fn describe_main(args: DescribeArgs) -> ExitCode {
    let run = describe(&args.command, &args.data_dir);
    match JsonOut::new(Some(args.json_out.clone())).write_value(&json!({ "run": run })) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-bench describe: writing {}: {e}", args.json_out.display());
            ExitCode::FAILURE
        }
    }
}

// ------------------------------------------------------------ the input

/// One step of `scripts/bench` (a benchmark or the build) and how it ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Step {
    /// `build`, `log bench`, `ferry-bench produce`, `ferry-bench e2e`.
    pub(crate) name: String,
    /// Wall time.
    pub(crate) seconds: f64,
    /// Exit status (0: success).
    pub(crate) status: i64,
}

/// A run's JSON-lines file, read.
#[derive(Debug, Default)]
pub(crate) struct Input {
    /// The `run` object `describe` wrote.
    pub(crate) run: Option<Map<String, Value>>,
    /// Steps, in order.
    pub(crate) steps: Vec<Step>,
    /// Figures, in order of first appearance (a figure written again
    /// replaces the earlier one).
    pub(crate) figures: Vec<Figure>,
    /// Lines that could not be read.
    pub(crate) warnings: Vec<String>,
}

/// Reads a JSON-lines file; bad lines become warnings, not errors.
pub(crate) fn parse(text: &str) -> Input {
    let mut input = Input::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                input.warnings.push(format!("line {}: not JSON ({e})", n + 1));
                continue;
            }
        };
        if let Some(run) = v.get("run").and_then(Value::as_object) {
            input.run = Some(run.clone());
        } else if let Some(name) = v.get("step").and_then(Value::as_str) {
            input.steps.push(Step {
                name: name.to_owned(),
                seconds: v.get("seconds").and_then(Value::as_f64).unwrap_or(f64::NAN),
                status: v.get("status").and_then(Value::as_i64).unwrap_or(-1),
            });
        } else if v.get("figure").is_some() {
            match Figure::from_json(&v) {
                Ok(f) => match input.figures.iter_mut().find(|g| g.figure == f.figure) {
                    Some(earlier) => *earlier = f,
                    None => input.figures.push(f),
                },
                Err(e) => input.warnings.push(format!("line {}: {e}", n + 1)),
            }
        } else {
            input.warnings.push(format!("line {}: neither a figure, a step nor a run", n + 1));
        }
    }
    input
}

// ------------------------------------------------------------- the rows

/// How a figure stands against its goal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Measured, goal met.
    Met,
    /// Measured, goal missed.
    NotMet,
    /// Measured, but not under the goal's conditions (or the benchmark did not judge it).
    NotJudged,
    /// The goal's figure is missing from the run.
    NotMeasured,
    /// A figure for information: no goal.
    NoGoal,
}

impl Verdict {
    fn cell(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::NotMet => "**not met**",
            Verdict::NotJudged => "not judged",
            Verdict::NotMeasured => "not measured",
            Verdict::NoGoal => "—",
        }
    }
}

/// One row of the table, its cells already formatted.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row {
    /// The group (issue) it is shown in; 0 for figures of no known issue.
    pub(crate) issue: u8,
    /// The figure's id.
    pub(crate) id: String,
    /// The first cell: what was measured.
    pub(crate) label: String,
    /// Ferry's figure with its unit.
    pub(crate) ferry: String,
    /// What the baseline is, and its figure.
    pub(crate) baseline: String,
    /// Ferry over baseline.
    pub(crate) ratio: String,
    /// The goal.
    pub(crate) goal: String,
    /// Met or not.
    pub(crate) verdict: Verdict,
    /// Shown under the table.
    pub(crate) note: String,
    /// The benchmark that measured it (or should have).
    pub(crate) source: String,
}

/// The table's rows: each group's catalogue figures in order (a missing
/// figure with a goal as "not measured"), then figures the catalogue does
/// not know, in input order; figures of no known group come last.
pub(crate) fn rows(input: &Input) -> Vec<Row> {
    let mut out = Vec::new();
    let mut issues: Vec<u8> = GROUPS.iter().map(|(i, _)| *i).collect();
    issues.push(0);
    for issue in issues {
        let in_group = |f: &&Figure| {
            if issue == 0 {
                !GROUPS.iter().any(|(i, _)| *i == f.issue)
            } else {
                f.issue == issue
            }
        };
        for e in catalogue::FIGURES.iter().filter(|e| e.issue == issue) {
            match input.figures.iter().find(|f| f.figure == e.id) {
                Some(f) => out.push(measured_row(f, issue)),
                None if e.goal.is_some() => out.push(missing_row(e, input)),
                None => {}
            }
        }
        for f in input.figures.iter().filter(in_group).filter(|f| catalogue::entry(&f.figure).is_none()) {
            out.push(measured_row(f, issue));
        }
        // (A catalogue figure shows in its catalogue group, whatever issue its line names.)
    }
    out
}

fn measured_row(f: &Figure, issue: u8) -> Row {
    let goal = catalogue::entry(&f.figure).and_then(|e| e.goal.map(str::to_owned)).or_else(|| f.goal.clone());
    let verdict = match (&goal, f.met) {
        (None, _) => Verdict::NoGoal,
        (Some(_), Some(true)) => Verdict::Met,
        (Some(_), Some(false)) => Verdict::NotMet,
        (Some(_), None) => Verdict::NotJudged,
    };
    let baseline = match f.baseline {
        Some(b) => format!("{}: {}", f.baseline_label, with_unit(b, &f.baseline_unit)),
        None if !f.baseline_label.is_empty() => f.baseline_label.clone(),
        None => "—".to_owned(),
    };
    Row {
        issue,
        id: f.figure.clone(),
        label: f.label.clone(),
        ferry: with_unit(f.value, &f.unit),
        baseline,
        ratio: f.ratio.map_or("—".to_owned(), |r| format!("{}×", number(r))),
        goal: goal.unwrap_or_else(|| "—".to_owned()),
        verdict,
        note: f.note.clone(),
        source: f.source.clone(),
    }
}

fn missing_row(e: &catalogue::Entry, input: &Input) -> Row {
    let source = e.source.name();
    let why = match input.steps.iter().rev().find(|s| s.name == source) {
        Some(s) if s.status != 0 => format!("{source} exited with status {}", s.status),
        Some(_) => format!("{source} ran but wrote no such figure"),
        None => format!("{source} did not run"),
    };
    Row {
        issue: e.issue,
        id: e.id.to_owned(),
        label: e.label.to_owned(),
        ferry: "not measured".to_owned(),
        baseline: "—".to_owned(),
        ratio: "—".to_owned(),
        goal: e.goal.unwrap_or("—").to_owned(),
        verdict: Verdict::NotMeasured,
        note: why,
        source: source.to_owned(),
    }
}

/// Counts of the goal rows.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    /// Goals met.
    pub(crate) met: usize,
    /// Goals missed.
    pub(crate) not_met: usize,
    /// Measured but not judged.
    pub(crate) not_judged: usize,
    /// Missing.
    pub(crate) not_measured: usize,
}

/// Counts the verdicts of `rows`.
pub(crate) fn tally(rows: &[Row]) -> Tally {
    let mut t = Tally::default();
    for r in rows {
        match r.verdict {
            Verdict::Met => t.met += 1,
            Verdict::NotMet => t.not_met += 1,
            Verdict::NotJudged => t.not_judged += 1,
            Verdict::NotMeasured => t.not_measured += 1,
            Verdict::NoGoal => {}
        }
    }
    t
}

/// A number to three significant digits or so, thousands grouped.
pub(crate) fn number(v: f64) -> String {
    if !v.is_finite() {
        return "?".to_owned();
    }
    let a = v.abs();
    if a >= 1000.0 {
        let digits = format!("{:.0}", a);
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(c);
        }
        format!("{}{grouped}", if v < 0.0 { "-" } else { "" })
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 || a == 0.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn with_unit(v: f64, unit: &str) -> String {
    if unit.is_empty() {
        number(v)
    } else {
        format!("{} {unit}", number(v))
    }
}

/// Text safe in a table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

// ----------------------------------------------------------- rendering

const HOW_TO_READ: &str = "\
Each row is one figure of this run. **Ferry** is Ferry's figure; **baseline** is the same work done \
without Ferry on the same machine in the same run — raw `write`+`fdatasync` on the same disk for the log \
and the produce path, raw async-nats against the same nats-server for the forwarder and the end-to-end \
path, the nats backend for the embedded broker — measured interleaved with Ferry's figure or right \
before/after it, so that drift of the shared VM hits both. **ratio** is Ferry ÷ baseline: higher is \
better for throughput, lower is better for latency and time. The goals are DESIGN.md §5's \"current \
performance goals\" (they supersede older issues' figures), plus issue #4's p99 at 5 000 msg/s, which §5 \
does not restate; each benchmark judges its own figure, on this run alone. **not met** is a goal this run \
missed; **not judged** is a figure measured, but not under its goal's conditions (e.g. a smaller log than \
the goal's); **not measured** is a goal whose figure the run did not produce (the note says why). MB and \
MB/s are 10^6 bytes, MiB 2^20 (the RSS goals' \"MB\" are read as MiB). A figure close to its goal can \
land on either side from one run to the next on a shared 2-core VM; per-phase detail (CPU per process, \
counts, drains) is in the benchmarks' text output beside the JSON-lines file. The **vCPU stalls** row \
is the machine's, not Ferry's: on some VMs a disk flush stops the other vCPU for milliseconds, and every \
latency tail of the run (Ferry's and the same-schedule raw baselines') carries those stalls.";

/// The report's Markdown.
pub(crate) fn render(input: &Input) -> String {
    let rows = rows(input);
    let t = tally(&rows);
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "# Ferry performance report\n");
    let _ = writeln!(
        w,
        "<!-- Generated by scripts/bench (ferry-bench report) from the run's JSON lines; do not edit by hand. -->\n"
    );
    if input.figures.iter().any(|f| f.quick) {
        let _ = writeln!(
            w,
            "> **Quick (smoke) run:** short phases and small sizes. These figures check that the benchmarks \
             run; they are not the project's figures.\n"
        );
    }
    render_run(w, input);
    let _ = writeln!(
        w,
        "**Goals in this run:** {} met, {} not met, {} not judged, {} not measured (of {}).\n",
        t.met,
        t.not_met,
        t.not_judged,
        t.not_measured,
        t.met + t.not_met + t.not_judged + t.not_measured
    );
    let _ = writeln!(w, "## How to read this\n\n{HOW_TO_READ}\n");
    let _ = writeln!(w, "## Figures\n");
    let _ = writeln!(w, "| figure | Ferry | baseline (same run) | ratio | goal | met? |");
    let _ = writeln!(w, "|---|---|---|---|---|---|");
    let mut shown = None;
    for r in &rows {
        if shown != Some(r.issue) {
            shown = Some(r.issue);
            let heading = GROUPS.iter().find(|(i, _)| *i == r.issue).map_or("other figures", |(_, h)| h);
            let _ = writeln!(w, "| **{}** | | | | | |", cell(heading));
        }
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} |",
            cell(&r.label),
            cell(&r.ferry),
            cell(&r.baseline),
            cell(&r.ratio),
            cell(&r.goal),
            r.verdict.cell()
        );
    }
    let notes: Vec<&Row> = rows.iter().filter(|r| !r.note.is_empty()).collect();
    if !notes.is_empty() {
        let _ = writeln!(w, "\n## Notes\n");
        for r in notes {
            let _ = writeln!(w, "- **{}** (`{}`, {}): {}", r.label, r.id, r.source, r.note.replace('\n', " "));
        }
    }
    if !input.warnings.is_empty() {
        let _ = writeln!(w, "\n## Lines of the input that were left out\n");
        for warning in &input.warnings {
            let _ = writeln!(w, "- {warning}");
        }
    }
    md
}

fn render_run(w: &mut String, input: &Input) {
    let empty = Map::new();
    let run = input.run.as_ref().unwrap_or(&empty);
    let s = |k: &str| run.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
    let _ = writeln!(w, "| run | |");
    let _ = writeln!(w, "|---|---|");
    if input.run.is_none() {
        let _ = writeln!(w, "| machine | not recorded (no `run` line: `ferry-bench describe` did not run) |");
    } else {
        let dirty = run.get("dirty_files").and_then(Value::as_u64).unwrap_or(0);
        let commit = if dirty > 0 {
            format!("`{}`, with uncommitted changes in {dirty} tracked file(s)", s("commit"))
        } else {
            format!("`{}`", s("commit"))
        };
        let cpus = run.get("cpus").and_then(Value::as_u64).map_or("?".to_owned(), |n| n.to_string());
        let rows = [
            ("date", s("date")),
            ("git commit", commit),
            ("command", format!("`{}`", s("command"))),
            ("machine", format!("{cpus} CPUs ({}), {} memory, Linux {}", s("cpu_model"), s("memory"), s("kernel"))),
            ("load average before the run (1, 5, 15 min)", s("load")),
            ("vCPU stalls (a thread spinning on the clock)", s("stalls")),
            ("data dir", format!("`{}` on {}", s("data_dir"), s("filesystem"))),
            ("toolchain", format!("{}; {}", s("rustc"), s("nats_server"))),
        ];
        for (k, v) in rows {
            let _ = writeln!(w, "| {k} | {} |", cell(&v));
        }
    }
    if !input.steps.is_empty() {
        let steps: Vec<String> = input
            .steps
            .iter()
            .map(|st| {
                let status = if st.status == 0 { String::new() } else { format!(", **exit {}**", st.status) };
                format!("{} {:.0} s{status}", st.name, st.seconds)
            })
            .collect();
        let _ = writeln!(w, "| steps | {} |", cell(&steps.join("; ")));
    }
    let _ = writeln!(w);
}

// --------------------------------------------------------- the machine

/// The run's description: date, commit, command line, machine.
pub(crate) fn describe(command: &str, data_dir: &Path) -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new("."));
    let git = |args: &[&str]| run_cmd(Command::new("git").arg("-C").arg(root).args(args));
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).map_or(0, |s| s.lines().count());
    let commit = git(&["rev-parse", "--short", "HEAD"]).and_then(|s| s.lines().next().map(str::to_owned));
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("?".to_owned(), |(_, m)| m.trim().to_owned());
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    json!({
        "date": utc_now(),
        "commit": commit.unwrap_or_else(|| "?".to_owned()),
        "dirty_files": dirty,
        "command": command,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu_model": model,
        "memory": mem_kb.map_or("?".to_owned(), |kb| format!("{:.1} GiB", kb / (1u64 << 20) as f64)),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").map_or("?".to_owned(), |s| s.trim().to_owned()),
        "load": std::fs::read_to_string("/proc/loadavg")
            .map_or("?".to_owned(), |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")),
        "data_dir": data_dir.display().to_string(),
        "stalls": stalls(data_dir),
        "filesystem": filesystem(data_dir),
        "rustc": first_line(Command::new(rustc).arg("--version")).unwrap_or_else(|| "rustc ?".to_owned()),
        "nats_server": first_line(Command::new(ferry_e2e::nats_server_binary()).arg("--version"))
            .unwrap_or_else(|| "nats-server ?".to_owned()),
    })
}

/// What [`sys::stall_probe`] saw, 1 s alone and 1 s beside an fdatasync loop.
fn stalls(data_dir: &Path) -> String {
    let probe =
        std::fs::create_dir_all(data_dir).and_then(|()| crate::sys::stall_probe(data_dir, Duration::from_secs(1)));
    match probe {
        Ok((idle, syncing)) => {
            format!("alone: {idle}; while another thread runs 1 KiB write+fdatasync in the data dir: {syncing}")
        }
        Err(e) => format!("not measured: {e}"),
    }
}

/// A command's standard output, if it succeeded.
fn run_cmd(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok().filter(|o| o.status.success())?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The first line of a command's standard output, if it succeeded.
fn first_line(cmd: &mut Command) -> Option<String> {
    run_cmd(cmd).and_then(|t| t.lines().next().map(str::to_owned))
}

/// `ext4 (/dev/vda, mounted on /)`, from `df -PT`.
fn filesystem(dir: &Path) -> String {
    let out = run_cmd(Command::new("df").arg("-PT").arg(dir));
    let line = out.as_deref().and_then(|o| o.lines().nth(1)).unwrap_or_default();
    let f: Vec<&str> = line.split_whitespace().collect();
    match (f.first(), f.get(1), f.last()) {
        (Some(dev), Some(kind), Some(mount)) if f.len() >= 7 => format!("{kind} ({dev}, mounted on {mount})"),
        _ => "? (df -PT gave no answer)".to_owned(),
    }
}

/// Now, as `2026-04-14 09:30 UTC`.
fn utc_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

/// Year, month, day of a day count since 1970-01-01 (proleptic Gregorian;
/// H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: &str = r#"{"run": {"date": "2026-04-14 09:30 UTC", "commit": "abc1234", "dirty_files": 2, "command": "scripts/bench", "cpus": 2, "cpu_model": "AMD EPYC", "memory": "23.5 GiB", "kernel": "6.18.44", "load": "0.46 0.93 1.41", "data_dir": "/w/target/bench/tmp", "filesystem": "ext4 (/dev/vda, mounted on /)", "rustc": "rustc 1.95.0", "nats_server": "nats-server: v2.12.8"}}"#;

    fn fig(id: &str, value: f64, baseline: f64, met: Option<bool>) -> String {
        let mut v = Figure::new(id, catalogue::entry(id).expect("known").source, value, "ms")
            .baseline("raw p99", baseline, "ms")
            .note(format!("note of {id}"));
        v.met = met;
        v.to_json().to_string()
    }

    fn step(name: &str, status: i64) -> String {
        format!(r#"{{"step": "{name}", "seconds": 12.4, "status": {status}}}"#)
    }

    fn input(lines: &[String]) -> Input {
        parse(&lines.join("\n"))
    }

    fn row<'a>(rows: &'a [Row], id: &str) -> &'a Row {
        rows.iter().find(|r| r.id == id).unwrap_or_else(|| panic!("no row {id} in {rows:#?}"))
    }

    #[test]
    fn a_figure_survives_its_json_line() {
        let f = Figure::new("produce.single", catalogue::Source::Produce, 28_134.5, "msg/s")
            .baseline("raw 1024 B write+fdatasync", 6600.0, "/s")
            .met(false)
            .note("p50 2.1 ms")
            .quick(true);
        let back = Figure::from_json(&serde_json::from_str(&f.to_json().to_string()).unwrap()).unwrap();
        assert_eq!(back, f);
        assert_eq!(back.goal.as_deref(), Some("≥ 50 000 msg/s"));
        assert!((back.ratio.unwrap() - 28_134.5 / 6600.0).abs() < 1e-9);
    }

    #[test]
    fn parse_sorts_lines_into_run_steps_and_figures_and_keeps_the_last_of_a_figure() {
        let i = input(&[
            RUN.to_owned(),
            step("log bench", 0),
            fig("log.single_appender_p99", 0.3, 0.2, Some(true)),
            "not json".to_owned(),
            r#"{"something": 1}"#.to_owned(),
            r#"{"figure": "x"}"#.to_owned(),
            fig("log.single_appender_p99", 0.25, 0.2, Some(true)),
            String::new(),
        ]);
        assert_eq!(i.run.as_ref().and_then(|r| r.get("commit")).and_then(Value::as_str), Some("abc1234"));
        assert_eq!(i.steps, vec![Step { name: "log bench".into(), seconds: 12.4, status: 0 }]);
        assert_eq!(i.figures.len(), 1);
        assert_eq!(i.figures[0].value, 0.25);
        assert_eq!(i.warnings.len(), 3, "{:?}", i.warnings);
        assert!(i.warnings[0].starts_with("line 4: not JSON"), "{:?}", i.warnings);
    }

    #[test]
    fn rows_judge_each_goal_and_report_missing_ones_as_not_measured() {
        let i = input(&[
            step("log bench", 0),
            step("ferry-bench produce", 0),
            step("ferry-bench e2e", 1),
            fig("log.single_appender_p99", 0.24, 0.2, Some(true)),
            fig("log.concurrent_256", 300.0, 700.0, Some(false)),
            fig("log.reopen_1gib", 40.0, 20.0, None),
            fig("log.batch_1000", 900.0, 1200.0, None),
            fig("produce.single", 28_000.0, 6600.0, Some(false)),
            r#"{"figure": "custom.thing", "issue": 9, "value": 3, "unit": "x"}"#.to_owned(),
        ]);
        let rows = rows(&i);
        let r = row(&rows, "log.single_appender_p99");
        assert_eq!(
            (r.ferry.as_str(), r.baseline.as_str(), r.ratio.as_str(), r.verdict),
            ("0.240 ms", "raw p99: 0.200 ms", "1.20×", Verdict::Met)
        );
        assert_eq!(r.goal, "p99 ≤ 1.5× raw write+fdatasync p99");
        assert_eq!(row(&rows, "log.concurrent_256").verdict, Verdict::NotMet);
        assert_eq!(row(&rows, "log.reopen_1gib").verdict, Verdict::NotJudged);
        let info = row(&rows, "log.batch_1000");
        assert_eq!((info.verdict, info.goal.as_str()), (Verdict::NoGoal, "—"));
        // Information figures that were not measured are left out; goals are not.
        assert!(!rows.iter().any(|r| r.id == "log.read_all_cold"));
        let fwd = row(&rows, "produce.forwarder");
        assert_eq!((fwd.verdict, fwd.ferry.as_str()), (Verdict::NotMeasured, "not measured"));
        assert_eq!(fwd.note, "ferry-bench produce ran but wrote no such figure");
        assert_eq!(row(&rows, "e2e.latency_p50").note, "ferry-bench e2e exited with status 1");
        // Unknown figures come last, in a group of their own.
        assert_eq!(rows.last().map(|r| (r.id.as_str(), r.issue)), Some(("custom.thing", 0)));
        // Every goal of the catalogue has a row.
        for e in catalogue::FIGURES.iter().filter(|e| e.goal.is_some()) {
            row(&rows, e.id);
        }
        let t = tally(&rows);
        assert_eq!((t.met, t.not_met, t.not_judged), (1, 2, 1));
        assert_eq!(t.not_measured, catalogue::FIGURES.iter().filter(|e| e.goal.is_some()).count() - 4);
    }

    #[test]
    fn the_report_has_the_run_the_groups_in_order_and_one_line_per_row() {
        let i = input(&[
            RUN.to_owned(),
            step("build", 0),
            fig("e2e.latency_p99", 3.8, 0.57, Some(true)),
            fig("log.single_appender_p99", 0.24, 0.2, Some(true)),
        ]);
        let md = render(&i);
        assert!(md.starts_with("# Ferry performance report\n"), "{md}");
        assert!(md.contains("| git commit | `abc1234`, with uncommitted changes in 2 tracked file(s) |"), "{md}");
        assert!(md.contains("| machine | 2 CPUs (AMD EPYC), 23.5 GiB memory, Linux 6.18.44 |"), "{md}");
        assert!(md.contains("| data dir | `/w/target/bench/tmp` on ext4 (/dev/vda, mounted on /) |"), "{md}");
        assert!(md.contains("| load average before the run (1, 5, 15 min) | 0.46 0.93 1.41 |"), "{md}");
        assert!(md.contains("| steps | build 12 s |"), "{md}");
        assert!(md.contains("| figure | Ferry | baseline (same run) | ratio | goal | met? |"), "{md}");
        assert!(
            md.contains(
                "| single appender, 1 KiB records, `FsyncMode::Always`: append p99 | 0.240 ms | raw p99: 0.200 ms \
                 | 1.20× | p99 ≤ 1.5× raw write+fdatasync p99 | met |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| sustained throughput to the app | not measured | — | — | ≥ 0.5× raw publish → pull → ack | not measured |"),
            "{md}"
        );
        let at = |s: &str| md.find(s).unwrap_or_else(|| panic!("no {s:?} in {md}"));
        assert!(at("| **#3 — the log") < at("| **#4 — produce"));
        assert!(at("| **#4 — produce") < at("| **#5 — end to end"));
        assert!(at("| **#5 — end to end") < at("| **#6 — embedded"));
        assert!(md.contains("- **single appender, 1 KiB records, `FsyncMode::Always`: append p99** (`log.single_appender_p99`, log bench): note of log.single_appender_p99"), "{md}");
        assert!(!md.contains("Quick (smoke) run"), "{md}");
        assert!(md.contains("**Goals in this run:** 2 met, 0 not met, 0 not judged,"), "{md}");
    }

    #[test]
    fn a_quick_run_says_so_and_a_run_without_description_says_that() {
        let f = Figure::new("produce.rss_idle", catalogue::Source::Produce, 10.5, "MiB").met(true).quick(true);
        let md = render(&input(&[f.to_json().to_string()]));
        assert!(md.contains("**Quick (smoke) run:**"), "{md}");
        assert!(md.contains("| machine | not recorded"), "{md}");
        assert!(md.contains("| sidecar RSS idle (VmRSS) | 10.5 MiB | — | — | ≤ 15 MiB idle | met |"), "{md}");
    }

    #[test]
    fn cells_escape_pipes_and_numbers_keep_three_digits() {
        assert_eq!(cell("a | b\nc"), "a \\| b c");
        assert_eq!(number(28_134.6), "28,135");
        assert_eq!(number(1_234_567.0), "1,234,567");
        assert_eq!(number(340.2), "340");
        assert_eq!(number(61.04), "61.0");
        assert_eq!(number(1.184), "1.18");
        assert_eq!(number(0.2471), "0.247");
        assert_eq!(number(0.0), "0.00");
        assert_eq!(number(f64::NAN), "?");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
