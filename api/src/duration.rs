//! A duration written as a string (`"30s"`, `"2m"`, `"1h30m"`, `"500ms"`),
//! as Kubernetes users write them.

use std::fmt;
use std::time::Duration as StdDuration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration in resource specs, serialized in humantime form (`"30s"`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub StdDuration);

/// What the CRDs' schema lets through for a duration: numbers of at most
/// 12 digits, a fraction of at most 2 digits (none on `ns`), at most
/// [`MAX_LENGTH`] characters in all. Every such string parses: a string the
/// schema takes and the operator cannot read would fail the decoding of the
/// whole list it comes in, so the operator's watch of that kind, not just
/// the one resource. humantime refuses a number that overflows `u64`
/// (`99999999999999999999s`) and a fraction it cannot make whole
/// nanoseconds of (`1.5ns`), or for `h` and `d` whole seconds of
/// (`1.001h`); 12 digits and 32 characters add up to 2·10¹² days at most,
/// far from overflowing. How long is sane is [`MAX`], checked with the
/// rest of a spec.
pub const PATTERN: &str = "^(([0-9]{1,12}(\\.[0-9]{1,2})?(us|ms|s|m|h|d)|[0-9]{1,12}ns) ?)+$";
/// Longest duration string the CRDs take.
pub const MAX_LENGTH: u32 = 32;
/// Longest duration a spec may hold: 100 years (of 365.25 days). JetStream
/// takes durations in signed 64-bit nanoseconds (about 292 years).
pub const MAX: Duration = Duration::from_secs(100 * 31_557_600);

impl Duration {
    /// `secs` seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Duration(StdDuration::from_secs(secs))
    }

    /// `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Duration(StdDuration::from_millis(ms))
    }

    /// The std duration.
    pub const fn get(self) -> StdDuration {
        self.0
    }
}

impl fmt::Debug for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Prints in the units the schema takes (`d h m s ms us ns`, largest first,
/// no spaces: `"7d"`, `"1m30s"`, `"1d2h"`, `"0s"`), so a duration Ferry
/// writes back (a default, a resolved config) is one the CRDs accept.
/// humantime's own printer says `1day`, `2months`, `1year`, which they refuse.
impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        let nanos = self.0.subsec_nanos() as u64;
        if secs == 0 && nanos == 0 {
            return f.write_str("0s");
        }
        let parts = [
            (secs / 86_400, "d"),
            (secs % 86_400 / 3_600, "h"),
            (secs % 3_600 / 60, "m"),
            (secs % 60, "s"),
            (nanos / 1_000_000, "ms"),
            (nanos / 1_000 % 1_000, "us"),
            (nanos % 1_000, "ns"),
        ];
        for (n, unit) in parts {
            if n > 0 {
                write!(f, "{n}{unit}")?;
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s.trim())
            .map(Duration)
            .map_err(|e| format!("invalid duration {s:?} ({e}); write e.g. \"500ms\", \"30s\", \"2m\", \"1h\""))
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": PATTERN,
            "maxLength": MAX_LENGTH,
            "description": "A duration such as \"500ms\", \"30s\", \"2m\" or \"1h30m\"."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print_in_humantime_form() {
        let d: Duration = "1m30s".parse().unwrap();
        assert_eq!(d.get(), StdDuration::from_secs(90));
        assert_eq!(d.to_string(), "1m30s");
        assert_eq!(serde_json::to_string(&Duration::from_millis(500)).unwrap(), "\"500ms\"");
        let back: Duration = serde_json::from_str("\"2m\"").unwrap();
        assert_eq!(back, Duration::from_secs(120));
        assert!("soon".parse::<Duration>().is_err());
        assert!(serde_json::from_str::<Duration>("30").is_err());
    }

    /// What Ferry prints is what the schema takes and reads back the same,
    /// from nanoseconds to [`MAX`] (humantime's printer said `1day`).
    #[test]
    fn every_printed_duration_is_taken_by_the_schema_and_reads_back() {
        let pattern = regex::Regex::new(PATTERN).unwrap();
        let cases = [
            (StdDuration::ZERO, "0s"),
            (StdDuration::from_nanos(1), "1ns"),
            (StdDuration::from_millis(1500), "1s500ms"),
            (StdDuration::from_secs(86_400), "1d"),
            (StdDuration::from_secs(7 * 86_400), "7d"),
            (StdDuration::from_secs(30 * 86_400 + 3_661), "30d1h1m1s"),
            (StdDuration::from_secs(365 * 86_400), "365d"),
        ];
        for (d, text) in cases {
            assert_eq!(Duration(d).to_string(), text);
        }
        let longest = MAX.get() - StdDuration::from_nanos(1);
        let mut all: Vec<StdDuration> = cases.iter().map(|(d, _)| *d).collect();
        all.extend([MAX.get(), longest, StdDuration::new(86_399, 999_999_999)]);
        for d in all {
            let text = Duration(d).to_string();
            assert!(schema_takes(&pattern, &text), "{text} ({d:?}) must be taken by the schema");
            assert_eq!(text.parse::<Duration>().unwrap().get(), d, "{text}");
            assert_eq!(
                serde_json::from_value::<Duration>(serde_json::to_value(Duration(d)).unwrap()).unwrap().get(),
                d
            );
        }
    }

    fn schema_takes(pattern: &regex::Regex, s: &str) -> bool {
        pattern.is_match(s) && s.chars().count() <= MAX_LENGTH as usize
    }

    /// Strings humantime cannot read (an overflow, a fraction below its
    /// precision) are ones the CRD refuses, so none reaches the operator.
    #[test]
    fn the_schema_refuses_durations_that_would_not_parse() {
        let pattern = regex::Regex::new(PATTERN).unwrap();
        for s in ["99999999999999999999s", "999999999999999d", "1.5ns", "1.001h", "0.0001d", "1.25ns"] {
            assert!(s.parse::<Duration>().is_err(), "{s} does not parse");
            assert!(!schema_takes(&pattern, s), "{s} must be refused by the schema");
        }
        let long = "1s".repeat(17);
        assert!(pattern.is_match(&long) && !schema_takes(&pattern, &long), "34 characters is too long");
        for s in ["500ms", "30s", "2m", "1h30m", "1h 30m", "1.5s", "2.75d", "0.25h", "999999999999ns", "1m 30s"] {
            assert!(schema_takes(&pattern, s), "{s} is taken");
            assert!(s.parse::<Duration>().is_ok(), "{s} parses");
        }
        let schema = serde_json::to_value(schemars::schema_for!(Duration)).unwrap();
        assert_eq!((schema["pattern"].as_str(), schema["maxLength"].as_u64()), (Some(PATTERN), Some(32)));
    }

    /// Every string the schema takes parses: the largest numbers in every
    /// unit, and many more drawn from the pattern's grammar.
    #[test]
    fn every_duration_the_schema_takes_parses() {
        let pattern = regex::Regex::new(PATTERN).unwrap();
        let units = ["ns", "us", "ms", "s", "m", "h", "d"];
        for unit in units {
            let one =
                if unit == "ns" { format!("{}{unit}", "9".repeat(12)) } else { format!("{}.99{unit}", "9".repeat(12)) };
            let mut s = String::new();
            while s.len() + one.len() <= MAX_LENGTH as usize {
                s.push_str(&one);
            }
            assert!(schema_takes(&pattern, &s), "{s}");
            assert!(s.parse::<Duration>().is_ok(), "{s}");
        }
        // A small LCG: no extra dependency, the same strings every run.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % n
        };
        // Nines more often than not: the largest numbers are the risk.
        let digit = |r: u64| char::from(b'0' + r.min(9) as u8);
        let mut checked = 0;
        for _ in 0..20_000 {
            let mut s = String::new();
            for _ in 0..=next(4) {
                for _ in 0..=next(12) {
                    s.push(digit(next(16)));
                }
                let unit = units[next(units.len() as u64) as usize];
                if unit != "ns" && next(2) == 0 {
                    s.push('.');
                    for _ in 0..=next(2) {
                        s.push(digit(next(16)));
                    }
                }
                s.push_str(unit);
                if next(3) == 0 {
                    s.push(' ');
                }
            }
            assert!(pattern.is_match(&s), "the generator follows the pattern: {s:?}");
            if schema_takes(&pattern, &s) {
                assert!(s.parse::<Duration>().is_ok(), "{s:?} is taken by the schema and must parse");
                checked += 1;
            }
        }
        assert!(checked > 10_000, "{checked}");
    }
}
