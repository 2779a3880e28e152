//! Human-readable durations in config files: `30s`, `15m`, `1h 30m`, `250ms`.

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A duration from the config, with the text it was written as (for messages: `25h` is
/// echoed as `25h`, never as humantime's `1day 1h`). Compared by value only, so `60s` and
/// `1m` are the same setting.
#[derive(Clone)]
pub struct HumanDuration {
    value: Duration,
    /// As written in the config; `None` for a default.
    text: Option<Arc<str>>,
}

impl HumanDuration {
    pub const fn from_secs(secs: u64) -> Self {
        Self::new(Duration::from_secs(secs))
    }
    pub const fn from_millis(ms: u64) -> Self {
        Self::new(Duration::from_millis(ms))
    }
    pub const fn new(value: Duration) -> Self {
        Self { value, text: None }
    }
    pub const fn get(&self) -> Duration {
        self.value
    }
}

impl PartialEq for HumanDuration {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl Eq for HumanDuration {}

impl PartialOrd for HumanDuration {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for HumanDuration {
    fn cmp(&self, other: &Self) -> Ordering {
        self.value.cmp(&other.value)
    }
}

impl fmt::Debug for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The text as written; a default (never written) as humantime formats it.
impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.text {
            Some(text) => f.write_str(text),
            None => write!(f, "{}", humantime::format_duration(self.value)),
        }
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let written = text.trim();
        humantime::parse_duration(written)
            .map(|value| HumanDuration {
                value,
                text: Some(Arc::from(written)),
            })
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration `{text}`: {e} (use e.g. `30s`, `15m`, `1h`)"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> HumanDuration {
        serde_yaml::from_str(text).unwrap()
    }

    #[test]
    fn a_duration_shows_as_written_and_compares_by_value() {
        assert_eq!(parse("25h").to_string(), "25h");
        assert_eq!(parse(" 1h 30m ").to_string(), "1h 30m");
        assert_eq!(parse("60s"), parse("1m"));
        assert!(parse("90m") > parse("1h"));
        // A default was never written: humantime's text.
        assert_eq!(HumanDuration::from_secs(90).to_string(), "1m 30s");
    }
}
