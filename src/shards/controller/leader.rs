//! The leader's loop: finish interrupted seals, retire gates every group passed, follow
//! replica moves, place (leaderships, then replicas), run the autoscaler, export map gauges.

use super::*;

impl Controller {
    /// Periodic work of the leader: finish interrupted seals, drop gates every group passed,
    /// sample rates and decide splits and merges.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut last_sample: HashMap<String, Instant> = HashMap::new();
        let mut last_balance: HashMap<String, Instant> = HashMap::new();
        let mut last_check = Instant::now();
        let mut last_follow = Instant::now();
        loop {
            tick.tick().await;
            if self.is_leader() && last_check.elapsed() >= Duration::from_secs(5) {
                last_check = Instant::now();
                self.republish().await;
            }
            if self.is_leader() && last_follow.elapsed() >= Duration::from_secs(1) {
                last_follow = Instant::now();
                self.follow_moves().await;
            }
            for m in self.shards.all() {
                let topic = m.config.name.clone();
                export_map_metrics(&self.shards, &self.groups, &topic);
                if !self.is_leader() {
                    continue;
                }
                if m.map.sealing().next().is_some() {
                    let _op = self.ops.lock().await;
                    if let Ok((config, map)) = self.current(&topic)
                        && let Err(e) = self.seal(&config, map).await
                    {
                        tracing::warn!(topic, error = %e, "seal pending");
                    }
                }
                if let Err(e) = self.retire_gates(&topic).await {
                    tracing::warn!(topic, error = %e, "gate cleanup failed");
                }
                let balance = m.config.autoscale.balance_interval_secs;
                if balance > 0
                    && last_balance
                        .get(&topic)
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(balance))
                {
                    last_balance.insert(topic.clone(), Instant::now());
                    match self.placement_tick(&topic).await {
                        Ok(Some(detail)) => {
                            tracing::info!(topic, reason = "balance", %detail, "placement acted")
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!(topic, error = %e, "placement failed"),
                    }
                }
                let every = Duration::from_millis(m.config.autoscale.sample_interval_ms);
                if last_sample.get(&topic).is_none_or(|t| t.elapsed() >= every) {
                    last_sample.insert(topic.clone(), Instant::now());
                    match self.evaluate(&topic).await {
                        Ok(Some(d)) => {
                            tracing::info!(topic, reason = d.reason, detail = %d.detail, "autoscaler acted")
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!(topic, error = %e, "autoscaler sample failed"),
                    }
                }
            }
        }
    }

    pub(super) async fn retire_gates(&self, topic: &str) -> Result<(), ControlError> {
        let Some(m) = self.shards.get(topic) else {
            return Ok(());
        };
        let retention_ms = m.config.autoscale.gate_retention_secs.saturating_mul(1000);
        let now = crate::shards::map::now_ms();
        let done: Vec<(i32, u64)> = m
            .map
            .gates
            .iter()
            .filter(|g| g.from_offset.is_some() && g.after.iter().all(|a| a.seal_offset.is_some()))
            .filter(|g| now.saturating_sub(g.created_at_ms) >= retention_ms)
            .filter(|g| self.groups.all_groups_passed(topic, g))
            .map(|g| (g.partition, g.created_epoch))
            .collect();
        if done.is_empty() {
            return Ok(());
        }
        let _op = self.ops.lock().await;
        let (config, map) = self.current(topic)?;
        let mut next = map.clone();
        next.gates
            .retain(|g| !done.contains(&(g.partition, g.created_epoch)));
        if next.gates.len() == map.gates.len() {
            return Ok(());
        }
        next.epoch += 1;
        self.commit(&config, &next, map.epoch).await?;
        for (p, _) in done {
            metrics::gauge!("shardgate_gate_closed", "topic" => topic.to_string(), "partition" => p.to_string()).set(0.0);
            tracing::info!(
                topic,
                partition = p,
                "gate retired: every group consumed past the seal"
            );
        }
        Ok(())
    }
}

/// Gauges describing the map, for the Grafana shard view.
fn export_map_metrics(shards: &Registry, groups: &GroupTracker, topic: &str) {
    let Some(m) = shards.get(topic) else {
        return;
    };
    metrics::gauge!("shardgate_shard_map_epoch", "topic" => topic.to_string())
        .set(m.map.epoch as f64);
    metrics::gauge!("shardgate_shards_active", "topic" => topic.to_string())
        .set(m.active().len() as f64);
    // Per-shard gauges (range, load) are rendered at scrape time from the current map
    // (admin::shard_gauges): a sealed shard's series then end with it instead of staying at
    // their last value.
    for g in &m.map.gates {
        let closed = groups.gate_closed(topic, g);
        metrics::gauge!("shardgate_gate_closed", "topic" => topic.to_string(), "partition" => g.partition.to_string())
            .set(if closed { 1.0 } else { 0.0 });
    }
}
