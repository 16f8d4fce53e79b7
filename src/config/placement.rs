//! The `[placement]` section: whether the leader instance moves replicas of managed topics'
//! pool partitions between brokers (AlterPartitionReassignments) when leadership moves
//! cannot spread the active shards' load, and how hard. Global, not per topic: the
//! replication throttle and the move budget are the cluster's.

use serde::Deserialize;

type Invalid = (&'static str, String, String);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementConfig {
    /// Move replicas between brokers; false: leadership moves only.
    #[serde(default = "default_reassign")]
    pub reassign: bool,
    /// Act when the busiest broker's active-shard load exceeds the mean over brokers by this
    /// factor.
    #[serde(default = "default_imbalance_ratio")]
    pub imbalance_ratio: f64,
    /// ... continuously for this long.
    #[serde(default = "default_imbalance_secs")]
    pub imbalance_secs: u64,
    /// `leader/follower.replication.throttled.rate` while a partition holding data moves.
    #[serde(default = "default_throttle")]
    pub throttle_bytes_per_sec: u64,
    /// Reassignments shardgate runs at once, all topics together.
    #[serde(default = "default_max_moves")]
    pub max_concurrent_moves: usize,
    /// A move still running after this long (and after three times its bytes at the
    /// throttle) is cancelled.
    #[serde(default = "default_move_timeout")]
    pub move_timeout_secs: u64,
    /// An idle partition holding more than this moves with the throttle too.
    #[serde(default = "default_idle_move_max_bytes")]
    pub idle_move_max_bytes: i64,
    /// A split waits at most this long for an idle partition to reach the least-loaded
    /// broker before it takes the best one it has; 0: never waits.
    #[serde(default = "default_split_wait")]
    pub split_wait_secs: u64,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            reassign: default_reassign(),
            imbalance_ratio: default_imbalance_ratio(),
            imbalance_secs: default_imbalance_secs(),
            throttle_bytes_per_sec: default_throttle(),
            max_concurrent_moves: default_max_moves(),
            move_timeout_secs: default_move_timeout(),
            idle_move_max_bytes: default_idle_move_max_bytes(),
            split_wait_secs: default_split_wait(),
        }
    }
}

fn default_reassign() -> bool {
    true
}
fn default_imbalance_ratio() -> f64 {
    1.25
}
fn default_imbalance_secs() -> u64 {
    30
}
fn default_throttle() -> u64 {
    10 * 1024 * 1024
}
fn default_max_moves() -> usize {
    1
}
fn default_move_timeout() -> u64 {
    3600
}
fn default_idle_move_max_bytes() -> i64 {
    1024 * 1024
}
fn default_split_wait() -> u64 {
    30
}

impl PlacementConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        let bad = |f: &'static str, p: String, fix: &str| Err((f, p, fix.to_string()));
        if !(self.imbalance_ratio > 1.0 && self.imbalance_ratio <= 10.0) {
            return bad(
                "imbalance_ratio",
                format!("{} is not in (1, 10]", self.imbalance_ratio),
                "use a value above 1, e.g. 1.25: the busiest broker may carry 25 % more than the mean",
            );
        }
        if self.imbalance_secs == 0 {
            return bad(
                "imbalance_secs",
                "is 0".into(),
                "use at least 1 (seconds an imbalance must last before replicas move)",
            );
        }
        if self.throttle_bytes_per_sec < 65_536 {
            return bad(
                "throttle_bytes_per_sec",
                format!("{} is below 65536", self.throttle_bytes_per_sec),
                "use at least 65536; a slower copy may never catch up with the partition's writes",
            );
        }
        if !(1..=8).contains(&self.max_concurrent_moves) {
            return bad(
                "max_concurrent_moves",
                format!("{} is not in 1..=8", self.max_concurrent_moves),
                "use 1 (the default) to 8",
            );
        }
        if self.move_timeout_secs < 60 {
            return bad(
                "move_timeout_secs",
                format!("{} is below 60", self.move_timeout_secs),
                "use at least 60; even an empty partition's move takes seconds",
            );
        }
        if self.idle_move_max_bytes < 0 {
            return bad(
                "idle_move_max_bytes",
                format!("{} is negative", self.idle_move_max_bytes),
                "use 0 or more bytes",
            );
        }
        if self.split_wait_secs > 300 {
            return bad(
                "split_wait_secs",
                format!("{} is above 300", self.split_wait_secs),
                "use at most 300 (a hot shard waits this long for its split); 0 never waits",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> PlacementConfig {
        toml::from_str(s).unwrap()
    }

    #[test]
    fn defaults_are_valid_and_each_bad_key_is_named() {
        assert!(PlacementConfig::default().validate().is_ok());
        assert!(parse("").reassign);
        for (toml, key) in [
            ("imbalance_ratio = 1.0", "imbalance_ratio"),
            ("imbalance_secs = 0", "imbalance_secs"),
            ("throttle_bytes_per_sec = 1000", "throttle_bytes_per_sec"),
            ("max_concurrent_moves = 0", "max_concurrent_moves"),
            ("move_timeout_secs = 5", "move_timeout_secs"),
            ("idle_move_max_bytes = -1", "idle_move_max_bytes"),
            ("split_wait_secs = 900", "split_wait_secs"),
        ] {
            assert_eq!(parse(toml).validate().unwrap_err().0, key, "{toml}");
        }
        assert!(toml::from_str::<PlacementConfig>("throttle = 5").is_err());
    }
}
