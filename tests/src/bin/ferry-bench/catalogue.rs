//! The figures of the performance report (`bench/REPORT.md`, issue #9):
//! their ids, the issue each belongs to, which benchmark measures it and
//! the goal it is judged by. The goals are DESIGN.md §5's "Current
//! performance goals", which supersede figures in older issues.
//!
//! One list for the writers (`ferry-bench produce`/`e2e`; the log bench,
//! `log/benches/log.rs`, writes the same ids by hand), the renderer
//! (`ferry-bench report`) and the smoke test (`tests/bench_smoke.rs`
//! includes this file), so a figure cannot be renamed in one place only.
//! No dependencies: the smoke test compiles this file on its own.

/// Which benchmark measures a figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// `cargo bench -p ferry-log --bench log` (with `FERRY_BENCH_JSON`).
    LogBench,
    /// `ferry-bench produce`.
    Produce,
    /// `ferry-bench e2e`.
    E2e,
}

impl Source {
    /// The name figures carry in their `source` field.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Source::LogBench => "log bench",
            Source::Produce => "ferry-bench produce",
            Source::E2e => "ferry-bench e2e",
        }
    }
}

/// One figure the report knows.
#[derive(Debug)]
pub(crate) struct Entry {
    /// Stable id (the `figure` field of a JSON line).
    pub(crate) id: &'static str,
    /// The issue whose group the figure is shown in.
    pub(crate) issue: u8,
    /// Who measures it.
    pub(crate) source: Source,
    /// Short description, for a row whose figure is missing.
    pub(crate) label: &'static str,
    /// The goal, worded as the report shows it; `None`: a figure for
    /// information, shown when measured, never "not measured".
    pub(crate) goal: Option<&'static str>,
}

/// The report's groups, in order: issue number and heading.
pub(crate) const GROUPS: &[(u8, &str)] = &[
    (3, "#3 — the log (`ferry-log`)"),
    (4, "#4 — produce path (`ferry-bench produce`)"),
    (5, "#5 — end to end, nats backend (`ferry-bench e2e`)"),
    (6, "#6 — embedded broker (`ferry-bench e2e`)"),
];

/// Every figure, in the report's order.
pub(crate) const FIGURES: &[Entry] = &[
    Entry {
        id: "log.single_appender_p99",
        issue: 3,
        source: Source::LogBench,
        label: "single appender, 1 KiB records, `FsyncMode::Always`: append p99",
        goal: Some("p99 ≤ 1.5× raw write+fdatasync p99"),
    },
    Entry {
        id: "log.concurrent_256",
        issue: 3,
        source: Source::LogBench,
        label: "256 concurrent appenders, 1 KiB records, `FsyncMode::Always`: payload MB/s",
        goal: Some("≥ 0.5× raw 256 KiB write+fdatasync bandwidth"),
    },
    Entry {
        id: "log.reopen_1gib",
        issue: 3,
        source: Source::LogBench,
        label: "reopen (`Log::open`) of a 1 GiB log, page cache evicted",
        goal: Some("reopen of a 1 GiB log ≤ 1 s"),
    },
    Entry {
        id: "log.batch_1000",
        issue: 3,
        source: Source::LogBench,
        label: "batch append of 1000 × 1 KiB, `FsyncMode::Always`: payload MB/s",
        goal: None,
    },
    Entry {
        id: "log.read_all_cold",
        issue: 3,
        source: Source::LogBench,
        label: "sequential read of the whole log (cold page cache)",
        goal: None,
    },
    Entry {
        id: "log.read_all_warm",
        issue: 3,
        source: Source::LogBench,
        label: "sequential read of the whole log (warm page cache)",
        goal: None,
    },
    Entry {
        id: "produce.single",
        issue: 4,
        source: Source::Produce,
        label: "single-message produce, `ack=local` (fsynced), closed loop",
        goal: Some("≥ 50 000 msg/s"),
    },
    Entry {
        id: "produce.batch",
        issue: 4,
        source: Source::Produce,
        label: "NDJSON batch produce, `ack=local` (fsynced): payload MB/s",
        goal: Some("≥ 0.6× raw disk bandwidth (256 KiB write+fdatasync)"),
    },
    Entry {
        id: "produce.fixed_rate_p99",
        issue: 4,
        source: Source::Produce,
        label: "single produce at a fixed 5 000 msg/s (open loop): p99",
        goal: Some("p99 ≤ 2 ms at 5 000 msg/s, every request answered (issue #4)"),
    },
    Entry {
        id: "produce.forwarder",
        issue: 4,
        source: Source::Produce,
        label: "forwarder, outbox → JetStream",
        goal: Some(
            "≥ 0.9× raw pipelined JetStream publish with Msg-Id and the same window, medians of 5 interleaved runs",
        ),
    },
    Entry {
        id: "produce.rss_idle",
        issue: 4,
        source: Source::Produce,
        label: "sidecar RSS idle (VmRSS)",
        goal: Some("≤ 15 MiB idle"),
    },
    Entry {
        id: "produce.rss_loaded",
        issue: 4,
        source: Source::Produce,
        label: "sidecar peak RSS under produce load (VmHWM)",
        goal: Some("≤ 64 MiB under load"),
    },
    Entry {
        id: "e2e.latency_p50",
        issue: 5,
        source: Source::E2e,
        label: "produce → JetStream → push → 200 at 1 000 msg/s: p50",
        goal: Some("p50 ≤ 1 ms at 1 000 msg/s"),
    },
    Entry {
        id: "e2e.latency_p99",
        issue: 5,
        source: Source::E2e,
        label: "produce → JetStream → push → 200 at 1 000 msg/s: p99",
        goal: Some("p99 ≤ 5 ms at 1 000 msg/s"),
    },
    Entry {
        id: "e2e.sustained",
        issue: 5,
        source: Source::E2e,
        label: "sustained throughput to the app",
        goal: Some("≥ 0.5× raw publish → pull → ack"),
    },
    Entry {
        id: "e2e.durable",
        issue: 5,
        source: Source::E2e,
        label: "durable throughput: messages acknowledged after Ferry's fsync",
        goal: Some("≥ 20× JetStream's own `sync_interval: always` rate"),
    },
    Entry {
        id: "e2e.rss_loaded",
        issue: 5,
        source: Source::E2e,
        label: "sidecar peak RSS under end-to-end load (VmHWM)",
        goal: Some("≤ 64 MiB under load"),
    },
    Entry {
        id: "embedded.sustained",
        issue: 6,
        source: Source::E2e,
        label: "sustained throughput to the app, embedded broker",
        goal: Some("≥ 1× the nats backend"),
    },
    Entry {
        id: "embedded.latency_p50",
        issue: 6,
        source: Source::E2e,
        label: "produce → embedded broker → push → 200 at 1 000 msg/s: p50",
        goal: Some("p50 ≤ 1 ms at 1 000 msg/s"),
    },
    Entry {
        id: "embedded.latency_p99",
        issue: 6,
        source: Source::E2e,
        label: "produce → embedded broker → push → 200 at 1 000 msg/s: p99",
        goal: Some("p99 ≤ 5 ms at 1 000 msg/s"),
    },
    Entry {
        id: "embedded.rss_loaded",
        issue: 6,
        source: Source::E2e,
        label: "sidecar peak RSS under end-to-end load, embedded broker (VmHWM)",
        goal: Some("≤ 64 MiB under load"),
    },
];

/// The entry of `id`.
pub(crate) fn entry(id: &str) -> Option<&'static Entry> {
    FIGURES.iter().find(|e| e.id == id)
}

/// The figures `source` must write for the report: those with a goal.
/// (Used by `tests/bench_smoke.rs`, which includes this file.)
#[allow(dead_code)]
pub(crate) fn required(source: Source) -> impl Iterator<Item = &'static Entry> {
    FIGURES.iter().filter(move |e| e.source == source && e.goal.is_some())
}
