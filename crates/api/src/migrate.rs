//! `PUT /migrate`: live migration to another Kiln process (a Kiln
//! extension; Firecracker has no such endpoint). See docs/migration.md.

use serde::{Deserialize, Serialize};

/// Default downtime target, milliseconds.
pub const DEFAULT_DOWNTIME_MS: u64 = 100;
/// Default cap on pre-copy rounds.
pub const DEFAULT_MAX_ROUNDS: u32 = 30;

/// Body of `PUT /migrate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateParams {
    /// Where `kiln migrate receive` listens: `tcp:HOST:PORT` or `unix:PATH`.
    pub destination: String,
    /// Pre-copy stops once the remaining dirty pages can be sent within
    /// this many milliseconds.
    #[serde(default = "default_downtime")]
    pub downtime_ms: u64,
    /// Pre-copy stops after this many rounds at most (at least 1).
    #[serde(default = "default_rounds")]
    pub max_rounds: u32,
}

fn default_downtime() -> u64 {
    DEFAULT_DOWNTIME_MS
}

fn default_rounds() -> u32 {
    DEFAULT_MAX_ROUNDS
}

/// Answer of a successful `PUT /migrate` (200): the VM runs at the
/// destination, and this VMM exits once the answer is sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// Pre-copy rounds (round 0, every non-zero page, included).
    pub rounds: u32,
    /// Guest memory sent, bytes.
    pub bytes_sent: u64,
    /// Guest memory sent while the VM was paused, bytes.
    pub final_bytes: u64,
    /// From the request to the destination's confirmation, milliseconds.
    pub total_ms: f64,
    /// From pausing the VM here to the destination running it,
    /// milliseconds.
    pub downtime_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_defaults_and_refusals() {
        let p: MigrateParams = serde_json::from_str(r#"{"destination":"unix:/m"}"#).unwrap();
        assert_eq!((p.downtime_ms, p.max_rounds), (100, 30));
        let p: MigrateParams =
            serde_json::from_str(r#"{"destination":"tcp:h:1","downtime_ms":5,"max_rounds":2}"#)
                .unwrap();
        assert_eq!((p.downtime_ms, p.max_rounds), (5, 2));
        assert!(serde_json::from_str::<MigrateParams>(r#"{"downtime_ms":5}"#).is_err());
        assert!(serde_json::from_str::<MigrateParams>(r#"{"destination":"x","speed":1}"#).is_err());
    }
}
