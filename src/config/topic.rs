//! Managed topics as configured (config file or admin API): routing fields, pool, autoscaler.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum RouteField {
    Key,
    Header(String),
    Json(String),
}

impl TryFrom<String> for RouteField {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s == "key" {
            Ok(RouteField::Key)
        } else if let Some(h) = s.strip_prefix("header:") {
            if h.is_empty() {
                return Err("`header:` needs a header name, e.g. \"header:user\"".into());
            }
            Ok(RouteField::Header(h.to_string()))
        } else if let Some(p) = s.strip_prefix("json:") {
            if !p.starts_with('/') {
                return Err(format!(
                    "`{s}`: a JSON pointer starts with '/', e.g. \"json:/user/id\""
                ));
            }
            Ok(RouteField::Json(p.to_string()))
        } else {
            Err(format!(
                "unknown routing field `{s}`; use \"key\", \"header:NAME\" or \"json:/pointer\""
            ))
        }
    }
}

impl From<RouteField> for String {
    fn from(f: RouteField) -> String {
        match f {
            RouteField::Key => "key".into(),
            RouteField::Header(h) => format!("header:{h}"),
            RouteField::Json(p) => format!("json:{p}"),
        }
    }
}

/// A managed topic as configured (file or admin API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    pub name: String,
    #[serde(default = "default_route_by")]
    pub route_by: Vec<RouteField>,
    #[serde(default = "default_initial_shards")]
    pub initial_shards: u32,
    /// Partitions of the upstream topic; active shards use a subset, so a split or merge never
    /// changes the partition count clients see.
    #[serde(default = "default_pool")]
    pub pool: i32,
    /// When every pool partition is in use (active or still draining behind a gate), a split
    /// adds partitions (CreatePartitions) up to this many and nudges clients to refresh
    /// metadata; 0 keeps the pool fixed (the split is refused instead).
    #[serde(default)]
    pub max_pool: i32,
    /// Replication factor when shardgate creates the upstream topic (-1: broker default).
    #[serde(default = "default_replication")]
    pub replication_factor: i16,
    #[serde(default)]
    pub autoscale: AutoscaleConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoscaleConfig {
    pub enabled: bool,
    /// Split a shard whose rate stays above either threshold for `sustain_secs`.
    pub split_records_per_sec: f64,
    pub split_bytes_per_sec: f64,
    /// Also split a shard whose consumer lag (end offset minus a live group's committed
    /// offset) rose at every sample for `sustain_secs` and exceeds this many records; 0 turns
    /// the lag trigger off. Merging needs both shards' lag below `merge_fraction` of it.
    pub split_lag_records: u64,
    /// Merge two adjacent shards when both stay below this fraction of the split thresholds
    /// for `cold_secs` (at most 0.25, so a merged shard is not immediately hot).
    pub merge_fraction: f64,
    pub sustain_secs: u64,
    pub cold_secs: u64,
    pub split_cooldown_secs: u64,
    pub merge_cooldown_secs: u64,
    pub min_shards: u32,
    /// 0: the pool size.
    pub max_shards: u32,
    /// A shard where one key carries at least this share of the load is not split blindly:
    /// the key is isolated in a range of its own.
    pub hot_key_fraction: f64,
    pub sample_interval_ms: u64,
    /// A gate is retired once every group seen on the topic passed it and it is at least this
    /// old; until then a group that appears later and reads from before the seal still gets
    /// per-key order.
    pub gate_retention_secs: u64,
    /// A group held this long at a gate by its commits is judged by its fetch positions too
    /// (for groups that do not commit); 0: commits only.
    pub gate_fallback_secs: u64,
    /// How often the leader checks that active shards spread over the upstream brokers and
    /// moves one partition's leadership when they do not; 0: never.
    pub balance_interval_secs: u64,
}

impl Default for AutoscaleConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            split_records_per_sec: 5_000.0,
            split_bytes_per_sec: 5.0 * 1024.0 * 1024.0,
            split_lag_records: 50_000,
            merge_fraction: 0.2,
            sustain_secs: 8,
            cold_secs: 60,
            split_cooldown_secs: 10,
            merge_cooldown_secs: 120,
            min_shards: 1,
            max_shards: 0,
            hot_key_fraction: 0.25,
            sample_interval_ms: 2_000,
            gate_retention_secs: 3_600,
            gate_fallback_secs: 30,
            balance_interval_secs: 30,
        }
    }
}

fn default_route_by() -> Vec<RouteField> {
    vec![RouteField::Key]
}
fn default_initial_shards() -> u32 {
    4
}
fn default_pool() -> i32 {
    32
}
fn default_replication() -> i16 {
    -1
}

type Invalid = (&'static str, String, String);

impl TopicConfig {
    /// Checks the values; `Err((field, problem, fix))`.
    pub fn validate(&self) -> Result<(), Invalid> {
        let bad = |f: &'static str, p: String, fix: &str| Err((f, p, fix.to_string()));
        if self.name.is_empty()
            || self.name.len() > 249
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return bad(
                "name",
                format!("\"{}\" is not a valid Kafka topic name", self.name),
                "use letters, digits, '.', '_' and '-' (at most 249)",
            );
        }
        if self.route_by.is_empty() {
            return bad(
                "route_by",
                "is empty".into(),
                "list at least one field, e.g. [\"key\"]",
            );
        }
        if self.pool < 1 || self.pool > 10_000 {
            return bad(
                "pool",
                format!("{} is out of range", self.pool),
                "use 1..10000 (default 32)",
            );
        }
        if self.initial_shards == 0 || self.initial_shards as i64 > self.pool as i64 {
            return bad(
                "initial_shards",
                format!(
                    "{} is not within 1..=pool ({})",
                    self.initial_shards, self.pool
                ),
                "use at least 1 and at most the pool size",
            );
        }
        if self.max_pool != 0 && (self.max_pool < self.pool || self.max_pool > 10_000) {
            return bad(
                "max_pool",
                format!(
                    "{} is below pool ({}) or above 10000",
                    self.max_pool, self.pool
                ),
                "use 0 (fixed pool) or a value in pool..=10000",
            );
        }
        let a = &self.autoscale;
        if a.max_shards != 0 && a.max_shards as i64 > self.pool.max(self.max_pool) as i64 {
            return bad(
                "autoscale.max_shards",
                format!(
                    "{} exceeds the largest pool ({})",
                    a.max_shards,
                    self.pool.max(self.max_pool)
                ),
                "raise pool (or max_pool) or lower max_shards",
            );
        }
        if a.min_shards == 0 || (a.max_shards != 0 && a.min_shards > a.max_shards) {
            return bad(
                "autoscale.min_shards",
                format!("{} is out of range", a.min_shards),
                "use at least 1 and at most max_shards",
            );
        }
        if !(a.merge_fraction > 0.0 && a.merge_fraction <= 0.25) {
            return bad(
                "autoscale.merge_fraction",
                format!("{} is out of range", a.merge_fraction),
                "use a value in (0, 0.25]",
            );
        }
        if !(a.split_records_per_sec > 0.0 && a.split_bytes_per_sec > 0.0) {
            return bad(
                "autoscale.split_records_per_sec",
                "thresholds must be positive".into(),
                "set both split thresholds above 0",
            );
        }
        if !(a.hot_key_fraction > 0.0 && a.hot_key_fraction <= 1.0) {
            return bad(
                "autoscale.hot_key_fraction",
                format!("{} is out of range", a.hot_key_fraction),
                "use a value in (0, 1]",
            );
        }
        if a.sample_interval_ms < 100 {
            return bad(
                "autoscale.sample_interval_ms",
                format!("{} is too small", a.sample_interval_ms),
                "use at least 100",
            );
        }
        Ok(())
    }

    pub fn max_shards(&self) -> u32 {
        if self.autoscale.max_shards == 0 {
            self.pool.max(self.max_pool) as u32
        } else {
            self.autoscale.max_shards
        }
    }
}
