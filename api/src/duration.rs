//! A duration written as a string (`"30s"`, `"2m"`, `"1h30m"`, `"500ms"`),
//! as Kubernetes users write them.

use std::fmt;
use std::time::Duration as StdDuration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration in resource specs, serialized in humantime form (`"30s"`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub StdDuration);

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

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
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
            "pattern": "^([0-9]+(\\.[0-9]+)?(ns|us|ms|s|m|h|d) ?)+$",
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
        assert_eq!(d.to_string(), "1m 30s");
        assert_eq!(serde_json::to_string(&Duration::from_millis(500)).unwrap(), "\"500ms\"");
        let back: Duration = serde_json::from_str("\"2m\"").unwrap();
        assert_eq!(back, Duration::from_secs(120));
        assert!("soon".parse::<Duration>().is_err());
        assert!(serde_json::from_str::<Duration>("30").is_err());
    }
}
