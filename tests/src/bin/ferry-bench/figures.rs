//! Figures in machine-readable form: one JSON object per line, appended to
//! the file of `--json-out` as each figure is known, and read back by
//! `ferry-bench report`. The log bench (`log/benches/log.rs`) writes the
//! same shape:
//!
//! ```text
//! {"figure": "produce.single", "issue": 4, "source": "ferry-bench produce",
//!  "label": "...", "value": 28100.0, "unit": "msg/s",
//!  "baseline": 6600.0, "baseline_label": "raw 1024 B write+fdatasync", "baseline_unit": "/s",
//!  "ratio": 4.26, "goal": "≥ 50 000 msg/s", "met": false, "note": "...", "quick": false}
//! ```
//!
//! `baseline`, `ratio`, `goal` and `met` may be `null`: no baseline, no
//! goal, or measured but not judged (not under the goal's conditions).

use std::io::Write;
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::catalogue::{self, Source};

/// One figure of one run, with its same-run baseline.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Figure {
    /// Stable id (see [`catalogue::FIGURES`]).
    pub(crate) figure: String,
    /// The issue whose group it is shown in (0: none known).
    pub(crate) issue: u8,
    /// The benchmark that measured it.
    pub(crate) source: String,
    /// What was measured, and how.
    pub(crate) label: String,
    /// Ferry's figure.
    pub(crate) value: f64,
    /// Its unit.
    pub(crate) unit: String,
    /// The baseline's value, measured in the same run.
    pub(crate) baseline: Option<f64>,
    /// What the baseline is.
    pub(crate) baseline_label: String,
    /// The baseline's unit.
    pub(crate) baseline_unit: String,
    /// Ferry's figure over the baseline's.
    pub(crate) ratio: Option<f64>,
    /// The goal it is judged by.
    pub(crate) goal: Option<String>,
    /// Whether this run met the goal; `None`: not judged.
    pub(crate) met: Option<bool>,
    /// Detail worth keeping (other percentiles, counts, conditions).
    pub(crate) note: String,
    /// Measured by a `--quick` (smoke) run.
    pub(crate) quick: bool,
}

impl Figure {
    /// A figure of `source` with the catalogue's issue, label and goal
    /// (`id` must be in [`catalogue::FIGURES`]).
    pub(crate) fn new(id: &str, source: Source, value: f64, unit: &str) -> Figure {
        let e = catalogue::entry(id).unwrap_or_else(|| panic!("figure {id:?} is not in the report's catalogue"));
        debug_assert_eq!(e.source, source, "figure {id} is measured by {:?}", e.source);
        Figure {
            figure: id.to_owned(),
            issue: e.issue,
            source: source.name().to_owned(),
            label: e.label.to_owned(),
            value,
            unit: unit.to_owned(),
            baseline: None,
            baseline_label: String::new(),
            baseline_unit: String::new(),
            ratio: None,
            goal: e.goal.map(str::to_owned),
            met: None,
            note: String::new(),
            quick: false,
        }
    }

    /// With a more precise label than the catalogue's.
    pub(crate) fn label(mut self, label: impl Into<String>) -> Figure {
        self.label = label.into();
        self
    }

    /// With a baseline; the ratio is `value / baseline`.
    pub(crate) fn baseline(mut self, label: impl Into<String>, value: f64, unit: &str) -> Figure {
        self.baseline_label = label.into();
        self.baseline = Some(value);
        self.baseline_unit = unit.to_owned();
        self.ratio = Some(self.value / value.max(1e-12));
        self
    }

    /// Judged against the goal.
    pub(crate) fn met(mut self, met: bool) -> Figure {
        self.met = Some(met);
        self
    }

    /// Judged against the goal if measured under its conditions (`under`),
    /// else left not judged.
    pub(crate) fn judged(mut self, under: bool, met: bool) -> Figure {
        self.met = under.then_some(met);
        self
    }

    /// With a note.
    pub(crate) fn note(mut self, note: impl Into<String>) -> Figure {
        self.note = note.into();
        self
    }

    /// Marked as measured by a smoke run, or not.
    pub(crate) fn quick(mut self, quick: bool) -> Figure {
        self.quick = quick;
        self
    }

    /// The JSON object (non-finite numbers become `null`).
    pub(crate) fn to_json(&self) -> Value {
        let num = |v: f64| if v.is_finite() { json!(v) } else { Value::Null };
        json!({
            "figure": self.figure,
            "issue": self.issue,
            "source": self.source,
            "label": self.label,
            "value": num(self.value),
            "unit": self.unit,
            "baseline": self.baseline.map_or(Value::Null, num),
            "baseline_label": self.baseline_label,
            "baseline_unit": self.baseline_unit,
            "ratio": self.ratio.map_or(Value::Null, num),
            "goal": self.goal,
            "met": self.met,
            "note": self.note,
            "quick": self.quick,
        })
    }

    /// Reads a figure back; `figure` and a numeric `value` are required,
    /// the rest defaults (issue and goal from the catalogue).
    pub(crate) fn from_json(v: &Value) -> Result<Figure, String> {
        let id = v.get("figure").and_then(Value::as_str).ok_or("no \"figure\" string")?;
        let value = v.get("value").and_then(Value::as_f64).ok_or_else(|| format!("{id}: no numeric \"value\""))?;
        let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
        let known = catalogue::entry(id);
        let issue = v
            .get("issue")
            .and_then(Value::as_u64)
            .and_then(|i| u8::try_from(i).ok())
            .or(known.map(|e| e.issue))
            .unwrap_or(0);
        let goal =
            v.get("goal").and_then(Value::as_str).map(str::to_owned).or(known.and_then(|e| e.goal.map(str::to_owned)));
        Ok(Figure {
            figure: id.to_owned(),
            issue,
            source: text("source"),
            label: v.get("label").and_then(Value::as_str).or(known.map(|e| e.label)).unwrap_or(id).to_owned(),
            value,
            unit: text("unit"),
            baseline: v.get("baseline").and_then(Value::as_f64),
            baseline_label: text("baseline_label"),
            baseline_unit: text("baseline_unit"),
            ratio: v.get("ratio").and_then(Value::as_f64),
            goal,
            met: v.get("met").and_then(Value::as_bool),
            note: text("note"),
            quick: v.get("quick").and_then(Value::as_bool).unwrap_or(false),
        })
    }
}

/// Where figures go: the file of `--json-out`, appended to, if given.
#[derive(Debug, Clone, Default)]
pub(crate) struct JsonOut {
    path: Option<PathBuf>,
}

impl JsonOut {
    /// Appends to `path` (created if missing); nowhere with `None`.
    pub(crate) fn new(path: Option<PathBuf>) -> JsonOut {
        JsonOut { path }
    }

    /// Appends one JSON line (right away, so that a later failure keeps
    /// the figures measured before it).
    pub(crate) fn write(&self, f: &Figure) -> std::io::Result<()> {
        self.write_value(&f.to_json())
    }

    /// Appends any JSON object as one line.
    pub(crate) fn write_value(&self, v: &Value) -> std::io::Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        let mut line = v.to_string();
        line.push('\n');
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        f.write_all(line.as_bytes())
    }
}
