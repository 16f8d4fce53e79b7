//! Autoscaler decisions: rates (records/s, bytes/s) and lag per shard as fast and slow moving
//! averages; split, isolate a hot key, or merge when a threshold held long enough. Every
//! decision carries its reason.

use super::*;

#[derive(Default)]
pub(super) struct ShardStats {
    last_offset: Option<(Instant, i64)>,
    /// Records/s, fast and slow moving averages.
    fast: f64,
    slow: f64,
    last_size: Option<(Instant, i64)>,
    /// Stored bytes/s, fast and slow moving averages.
    bytes_fast: f64,
    bytes_slow: f64,
    /// Largest lag of a live group; since when it rose at every sample.
    lag: i64,
    /// Lag per live group (the 20 most behind), for the per-group lag gauge.
    group_lags: Vec<(String, i64)>,
    lag_rising_since: Option<Instant>,
    hot_since: Option<Instant>,
    cold_since: Option<Instant>,
}

fn ema(old: f64, sample: f64, weight: f64) -> f64 {
    if old == 0.0 {
        sample
    } else {
        weight * sample + (1.0 - weight) * old
    }
}

pub struct Decision {
    pub reason: &'static str,
    pub detail: String,
}

impl Controller {
    /// One autoscaler step for `topic`: sample end offsets, update the moving averages, and
    /// split or merge when a threshold held long enough.
    pub async fn evaluate(&self, topic: &str) -> Result<Option<Decision>, ControlError> {
        let (config, map) = self.current(topic)?;
        let a = config.autoscale.clone();
        let active: Vec<_> = map.active().into_iter().cloned().collect();
        let parts: Vec<i32> = active.iter().map(|s| s.partition).collect();
        let ends = self.end_offsets(topic, &parts).await?;
        // Bytes and lag are best effort: without them the records rate still decides.
        let sizes = sampler::log_sizes(&self.pool, topic, &parts)
            .await
            .inspect_err(|e| {
                tracing::debug!(topic, error = %e, "log sizes not sampled");
                metrics::counter!("shardgate_autoscaler_sample_errors_total", "measure" => "bytes")
                    .increment(1);
            })
            .ok();
        let committed = if a.split_lag_records > 0 {
            sampler::group_offsets(&self.pool, topic, &parts)
                .await
                .inspect_err(|e| {
                    tracing::debug!(topic, error = %e, "group lag not sampled");
                    metrics::counter!("shardgate_autoscaler_sample_errors_total", "measure" => "lag").increment(1);
                })
                .ok()
        } else {
            None
        };
        let now = Instant::now();
        let split_rec = a.split_records_per_sec;
        let merge_rec = split_rec * a.merge_fraction;
        let split_bytes = a.split_bytes_per_sec;
        let merge_bytes = split_bytes * a.merge_fraction;
        let lag_limit = a.split_lag_records as i64;
        let sustain = Duration::from_secs(a.sustain_secs);
        // (shard, reason, the measure's value, threshold, how long it held)
        let mut hot: Option<(u32, &'static str, f64, f64, Duration)> = None;
        let mut cold: Vec<u32> = Vec::new();
        {
            let mut stats = self.stats.lock().expect("stats");
            for s in &active {
                let st = stats.entry((topic.to_string(), s.partition)).or_default();
                let end = ends.get(&s.partition).copied().unwrap_or(0);
                if let Some((t0, o0)) = st.last_offset {
                    let dt = now.duration_since(t0).as_secs_f64().max(0.001);
                    let rate = (end - o0).max(0) as f64 / dt;
                    st.fast = ema(st.fast, rate, 0.6);
                    st.slow = ema(st.slow, rate, 0.1);
                }
                st.last_offset = Some((now, end));
                if let Some(size) = sizes.as_ref().and_then(|m| m.get(&s.partition)) {
                    if let Some((t0, b0)) = st.last_size
                        && *size >= b0
                    {
                        // A shrinking log (retention deleted a segment) says nothing about
                        // the rate: that sample is skipped.
                        let dt = now.duration_since(t0).as_secs_f64().max(0.001);
                        let rate = (*size - b0) as f64 / dt;
                        st.bytes_fast = ema(st.bytes_fast, rate, 0.6);
                        st.bytes_slow = ema(st.bytes_slow, rate, 0.1);
                    }
                    st.last_size = Some((now, *size));
                }
                if let Some(c) = &committed {
                    let mut lags: Vec<(String, i64)> = c
                        .get(&s.partition)
                        .map(|groups| {
                            groups
                                .iter()
                                .map(|(g, o)| (g.to_string(), (end - o).max(0)))
                                .collect()
                        })
                        .unwrap_or_default();
                    lags.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                    lags.truncate(20);
                    let lag = lags.first().map_or(0, |(_, l)| *l);
                    st.group_lags = lags;
                    if lag > st.lag && lag > 0 {
                        st.lag_rising_since.get_or_insert(now);
                    } else {
                        st.lag_rising_since = None;
                    }
                    st.lag = lag;
                }
                let over = if st.fast > split_rec {
                    Some(("records_rate", st.fast, split_rec))
                } else if st.bytes_fast > split_bytes {
                    Some(("bytes_rate", st.bytes_fast, split_bytes))
                } else {
                    None
                };
                if let Some((reason, value, limit)) = over {
                    let since = *st.hot_since.get_or_insert(now);
                    let held = now.duration_since(since);
                    if held >= sustain && hot.is_none_or(|h| value / limit > h.2 / h.3) {
                        hot = Some((s.id, reason, value, limit, held));
                    }
                } else {
                    st.hot_since = None;
                }
                // Lag alone is a poor trigger (a split parallelises only new records), so it
                // counts only while it keeps growing, and only if nothing hotter is found.
                if lag_limit > 0
                    && st.lag > lag_limit
                    && let Some(since) = st.lag_rising_since
                    && now.duration_since(since) >= sustain
                    && hot.is_none()
                {
                    hot = Some((
                        s.id,
                        "consumer_lag",
                        st.lag as f64,
                        lag_limit as f64,
                        now.duration_since(since),
                    ));
                }
                let lag_quiet = lag_limit == 0
                    || (st.lag_rising_since.is_none()
                        && (st.lag as f64) < lag_limit as f64 * a.merge_fraction);
                if st.slow < merge_rec
                    && st.fast < merge_rec
                    && st.bytes_slow < merge_bytes
                    && st.bytes_fast < merge_bytes
                    && lag_quiet
                {
                    let since = *st.cold_since.get_or_insert(now);
                    if now.duration_since(since) >= Duration::from_secs(a.cold_secs) {
                        cold.push(s.id);
                    }
                } else {
                    st.cold_since = None;
                }
            }
        }
        if !a.enabled {
            return Ok(None);
        }
        // A hot shard the autoscaler may not split: operators see why (alert
        // ShardgateSplitBlocked) instead of a shard that silently stays hot.
        let at_max = (active.len() as u32) >= config.max_shards();
        let no_pool = map.idle_partitions().is_empty() && config.max_pool <= map.pool;
        let blocked = match (&hot, at_max, no_pool) {
            (Some(_), true, _) => Some("max_shards"),
            (Some(_), false, true) => Some("pool_exhausted"),
            _ => None,
        };
        for reason in ["max_shards", "pool_exhausted"] {
            let value = if blocked == Some(reason) { 1.0 } else { 0.0 };
            metrics::gauge!("shardgate_split_blocked", "topic" => topic.to_string(), "reason" => reason)
                .set(value);
        }
        {
            let mut logged = self.split_blocked.lock().expect("split_blocked");
            let before = logged.get(topic).copied();
            if before != blocked {
                match (blocked, &hot) {
                    (Some(reason), Some((id, measure, value, limit, _))) => {
                        tracing::warn!(
                            topic,
                            shard = id,
                            reason,
                            measure,
                            value,
                            limit,
                            max_shards = config.max_shards(),
                            pool = map.pool,
                            max_pool = config.max_pool,
                            "split needed but blocked"
                        );
                        logged.insert(topic.to_string(), reason);
                    }
                    _ => {
                        tracing::info!(topic, was = before, "split no longer blocked");
                        logged.remove(topic);
                    }
                }
            }
        }
        let last_change = self.cooldown.lock().expect("cooldown").get(topic).copied();
        let since_change = last_change
            .map(|t| now.duration_since(t))
            .unwrap_or(Duration::MAX);
        if let Some((id, measure, value, limit, held)) = hot
            && since_change >= Duration::from_secs(a.split_cooldown_secs)
            && !at_max
            && !no_pool
        {
            let s = map.shard(id)?.clone();
            let samples = self.shards.samples_in(topic, s.start, s.end);
            let (at, reason) = match hottest(&samples) {
                Some((h, share)) if share >= a.hot_key_fraction && samples.len() >= 20 => {
                    // Isolate the hot key: split right at it (or just after it when it is the
                    // shard's first hash), so other keys stop sharing its partition.
                    let h = h as u128;
                    let at = if h > s.start { h } else { h + 1 };
                    if at >= s.end {
                        tracing::warn!(
                            topic,
                            shard = id,
                            share,
                            "one key carries the shard and cannot be isolated further"
                        );
                        metrics::counter!("shardgate_hot_keys_reported_total", "topic" => topic.to_string()).increment(1);
                        return Ok(None);
                    }
                    (Some(at), "hot_key")
                }
                _ => (None, measure),
            };
            if at.is_none()
                && let Some(wait) = self.split_waits(&config, &map, id).await
            {
                return Ok(wait);
            }
            self.stats
                .lock()
                .expect("stats")
                .retain(|(t, _), _| t != topic);
            self.split(topic, id, at, reason).await?;
            return Ok(Some(Decision {
                reason,
                detail: format!(
                    "shard {id}: {measure} {value:.0} > {limit:.0} for {:.1} s (sustain {} s)",
                    held.as_secs_f64(),
                    a.sustain_secs
                ),
            }));
        }
        if since_change >= Duration::from_secs(a.merge_cooldown_secs)
            && (active.len() as u32) > a.min_shards
        {
            for w in active.windows(2) {
                if cold.contains(&w[0].id) && cold.contains(&w[1].id) && w[0].end == w[1].start {
                    match self.merge(topic, w[0].id, w[1].id, "cold").await {
                        Ok(_) => {
                            self.stats
                                .lock()
                                .expect("stats")
                                .retain(|(t, _), _| t != topic);
                            return Ok(Some(Decision {
                                reason: "cold",
                                detail: format!(
                                    "shards {} and {} below {merge_rec:.0} records/s and {merge_bytes:.0} bytes/s without growing lag for {} s",
                                    w[0].id, w[1].id, a.cold_secs
                                ),
                            }));
                        }
                        Err(ControlError::Map(MapError::PartitionBusy(_))) => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(None)
    }
}

/// A shard's load as the autoscaler last sampled it (leader only), for the shard page.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShardLoad {
    pub records_per_sec: f64,
    pub bytes_per_sec: f64,
    /// Largest lag of a live group (records), 0 when none is read.
    pub lag: i64,
    /// Lag per live group, most behind first (at most 20).
    pub groups: Vec<(String, i64)>,
}

impl Controller {
    /// Partitions of `topic` whose shard is above a split threshold (leader only).
    pub(super) fn hot_partitions(&self, topic: &str) -> Vec<i32> {
        self.stats
            .lock()
            .expect("stats")
            .iter()
            .filter(|((t, _), st)| t == topic && st.hot_since.is_some())
            .map(|((_, p), _)| *p)
            .collect()
    }

    /// Per partition of `topic`: its shard's load, from the autoscaler's samples (empty on an
    /// instance that does not lead, or before the first sample).
    pub fn loads(&self, topic: &str) -> HashMap<i32, ShardLoad> {
        self.stats
            .lock()
            .expect("stats")
            .iter()
            .filter(|((t, _), _)| t == topic)
            .map(|((_, p), st)| {
                (
                    *p,
                    ShardLoad {
                        records_per_sec: st.fast,
                        bytes_per_sec: st.bytes_fast,
                        lag: st.lag,
                        groups: st.group_lags.clone(),
                    },
                )
            })
            .collect()
    }
}
