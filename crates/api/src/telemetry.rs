//! Firecracker's logger and metrics configuration (`PUT /logger`,
//! `PUT /metrics`, the `logger` and `metrics` sections of a config file) and
//! the [`Telemetry`] hook through which the VMM side applies them.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A log level as Firecracker spells it (case-insensitive on input;
/// `Warn` is accepted for `Warning`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warning,
    /// And information (Firecracker's default).
    Info,
    /// And debugging messages.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The `log` crate's filter for this level.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Off => log::LevelFilter::Off,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warning => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }

    fn name(self) -> &'static str {
        match self {
            LogLevel::Off => "Off",
            LogLevel::Error => "Error",
            LogLevel::Warning => "Warning",
            LogLevel::Info => "Info",
            LogLevel::Debug => "Debug",
            LogLevel::Trace => "Trace",
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for LogLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "off" => LogLevel::Off,
            "error" => LogLevel::Error,
            "warning" | "warn" => LogLevel::Warning,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => {
                return Err(format!(
                    "Invalid log level {s:?}: expected Off, Error, Warning, Info, Debug or Trace"
                ))
            }
        })
    }
}

impl Serialize for LogLevel {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `PUT /logger`: every field is optional; the ones given change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// A file (appended) or named pipe for the log lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// The level (Firecracker's default: Info).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Write the level in each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Write the source file and line in each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only log messages from modules whose path starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

impl LoggerConfig {
    /// `self` with the fields `update` gives replaced (Firecracker applies a
    /// new `PUT /logger` over the previous configuration).
    pub fn merged(&self, update: &LoggerConfig) -> LoggerConfig {
        LoggerConfig {
            log_path: update.log_path.clone().or_else(|| self.log_path.clone()),
            level: update.level.or(self.level),
            show_level: update.show_level.or(self.show_level),
            show_log_origin: update.show_log_origin.or(self.show_log_origin),
            module: update.module.clone().or_else(|| self.module.clone()),
        }
    }
}

/// `PUT /metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A file (appended) or named pipe for the JSON lines.
    pub metrics_path: String,
    /// Add the instance id as a top-level `id` field to each line.
    #[serde(default)]
    pub emit_id: bool,
    /// Extra key-value pairs emitted under a top-level `properties` field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<BTreeMap<String, String>>,
}

/// The VMM side of the logger and metrics: opens the files and flushes.
/// Errors become the `fault_message` of a 400.
pub trait Telemetry: Send + Sync {
    /// Applies a logger configuration (already merged with the previous one).
    fn configure_logger(&self, config: &LoggerConfig) -> Result<(), String>;
    /// Starts the metrics system.
    fn configure_metrics(&self, config: &MetricsConfig) -> Result<(), String>;
    /// Writes one metrics line now.
    fn flush_metrics(&self) -> Result<(), String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_case_insensitively() {
        for (text, level) in [
            ("Warning", LogLevel::Warning),
            ("warn", LogLevel::Warning),
            ("OFF", LogLevel::Off),
            ("trace", LogLevel::Trace),
        ] {
            assert_eq!(text.parse::<LogLevel>().unwrap(), level);
        }
        assert!("loud".parse::<LogLevel>().unwrap_err().contains("loud"));
        let c: LoggerConfig = serde_json::from_str(r#"{"level":"dEbUg"}"#).unwrap();
        assert_eq!(c.level, Some(LogLevel::Debug));
        assert_eq!(serde_json::to_string(&c).unwrap(), r#"{"level":"Debug"}"#);
        assert_eq!(LogLevel::Warning.filter(), log::LevelFilter::Warn);
    }

    #[test]
    fn logger_updates_merge() {
        let a = LoggerConfig {
            log_path: Some("/a".into()),
            level: Some(LogLevel::Info),
            show_level: Some(true),
            ..Default::default()
        };
        let b = LoggerConfig {
            level: Some(LogLevel::Error),
            show_log_origin: Some(true),
            ..Default::default()
        };
        let m = a.merged(&b);
        assert_eq!(m.log_path.as_deref(), Some("/a"));
        assert_eq!(m.level, Some(LogLevel::Error));
        assert_eq!((m.show_level, m.show_log_origin), (Some(true), Some(true)));
    }
}
