//! Replica moves (issue: placement that reassigns). A move's life:
//! 1. `start_move` records it in the shard map (the intent) before Kafka is asked; for an
//!    active partition every instance then writes it with acks=all until it ends;
//! 2. it sets the replication throttle (broker rates on both sides, the topic's throttled
//!    replica lists) when there is data to copy, then AlterPartitionReassignments;
//! 3. `follow_moves` (every second on the leader instance) judges each recorded move by what
//!    Kafka reports (`moves::judge`): running (copy progress, timeout), done (preferred
//!    election, throttles removed, record removed), gone or replaced (record removed), the
//!    topic deleted (reassignment cancelled, rates removed, record removed).
//!
//! Kafka's state decides, never the record alone: a new leader instance follows the moves
//! its predecessor recorded; one that loses leadership cancels the moves it drives in Kafka
//! and removes their throttles, and the next leader sees them gone and removes the records.

use std::collections::{HashSet, VecDeque};

use super::kafka_admin::*;
use super::*;
use crate::shards::moves::{Move, MoveKind, Throttle};

/// What placement remembers between ticks (leader only, in memory).
#[derive(Default)]
pub(super) struct PlacementMemory {
    /// Since when each topic's active-shard load has been unbalanced beyond the ratio.
    pub imbalanced_since: HashMap<String, Instant>,
    /// Since when a split of (topic, shard) waits for an idle partition to move.
    pub split_waiting: HashMap<(String, u32), Instant>,
    /// Bytes the new replica of each moving (topic, partition) holds, and when measured.
    pub copied: HashMap<(String, i32), (Instant, i64)>,
    /// Since when a move's state has been neither running, done nor gone.
    pub unknown_since: HashMap<(String, i32), Instant>,
    /// Why placement cannot act on a topic (shown on the placement page).
    pub blocked: HashMap<String, &'static str>,
    /// The last ended moves, newest last.
    pub recent: VecDeque<serde_json::Value>,
    /// Moves recorded whose reassignment is not yet asked of Kafka: not judged meanwhile
    /// (Kafka shows nothing yet, which would read as gone).
    pub launching: HashSet<(String, i32)>,
}

const RECENT: usize = 20;

impl Controller {
    /// Moves of every managed topic under way.
    pub(super) fn moves_in_flight(&self) -> usize {
        self.shards.all().iter().map(|m| m.map.moves.len()).sum()
    }

    /// Starts moving `partition` of `topic` to the replicas `to` (new leader first). The
    /// kind follows from the map (a partition an active shard writes to is active).
    pub async fn start_move(
        &self,
        topic: &str,
        partition: i32,
        to: Vec<i32>,
        reason: &'static str,
    ) -> Result<Move, ControlError> {
        let cfg = self.settings.raw.placement.clone();
        let bad = |problem: String, fix: &str| ControlError::BadConfig {
            field: "to".into(),
            problem,
            fix: fix.into(),
        };
        if self.shards.fenced() {
            return Err(ControlError::Busy(
                "this instance's store session is not confirmed; retry".into(),
            ));
        }
        let _op = self.ops.lock().await;
        let (config, map) = self.current(topic)?;
        if partition < 0 || partition >= map.pool {
            return Err(bad(
                format!("partition {partition} is not in the pool of {}", map.pool),
                "name a partition of the topic's pool",
            ));
        }
        if map.moves.iter().any(|m| m.partition == partition) {
            return Err(ControlError::Busy(format!(
                "partition {partition} of {topic} is moving already"
            )));
        }
        if self.moves_in_flight() >= cfg.max_concurrent_moves {
            return Err(ControlError::Busy(format!(
                "{} move(s) under way (placement.max_concurrent_moves = {})",
                self.moves_in_flight(),
                cfg.max_concurrent_moves
            )));
        }
        let topo = self.pool.topology.load();
        let (topic_id, info) = topo
            .topics
            .get(topic.as_bytes())
            .and_then(|t| Some((t.id, t.partitions.get(partition as usize)?.clone())))
            .ok_or_else(|| {
                ControlError::Kafka(format!("{topic}/{partition} is not in Kafka's metadata"))
            })?;
        let from = info.replicas.clone();
        let mut dedup = to.clone();
        dedup.sort_unstable();
        dedup.dedup();
        if to.is_empty() || dedup.len() != to.len() || to.len() != from.len() {
            return Err(bad(
                format!("{to:?} for replicas {from:?}"),
                "name as many distinct brokers as the partition has replicas (no change of replication factor)",
            ));
        }
        if let Some(b) = to.iter().find(|b| !topo.brokers.contains_key(b)) {
            return Err(bad(
                format!("broker {b} is not in the cluster"),
                "name live brokers",
            ));
        }
        let mut old = from.clone();
        old.sort_unstable();
        if old == dedup {
            return Err(bad(
                format!("{to:?} holds the same replicas as now"),
                "name at least one broker that has no replica of the partition",
            ));
        }
        let kind = if map.active().iter().any(|s| s.partition == partition) {
            MoveKind::Active
        } else {
            MoveKind::Idle
        };
        drop(topo);
        let bytes = sampler::log_sizes(&self.pool, topic, &[partition])
            .await?
            .get(&partition)
            .copied()
            .unwrap_or(0);
        let acks_all = kind == MoveKind::Active;
        if acks_all {
            // Writers send acks=all meanwhile: a topic requiring more in-sync replicas than
            // it has would refuse every write.
            let broker = self.admin_broker()?;
            let c = self
                .describe_configs(broker, TOPIC_RESOURCE, topic, &["min.insync.replicas"])
                .await?;
            let min_isr: usize = c
                .get("min.insync.replicas")
                .and_then(|(v, _)| v.as_deref()?.parse().ok())
                .unwrap_or(1);
            if min_isr > from.len() {
                return Err(ControlError::Kafka(format!(
                    "{topic} has min.insync.replicas = {min_isr} above its {} replica(s): writes with acks=all (used while an active partition moves) would fail; set min.insync.replicas on the topic to at most its replication factor",
                    from.len()
                )));
            }
        }
        let throttle = if kind == MoveKind::Active || bytes > cfg.idle_move_max_bytes {
            let mut operator = Vec::new();
            let mut union: Vec<i32> = from.iter().chain(&to).copied().collect();
            union.sort_unstable();
            union.dedup();
            for b in union {
                // Rates another recorded move set are ours; any other broker-level rate is
                // an operator's and stays as it is.
                let ours = self
                    .shards
                    .all()
                    .iter()
                    .flat_map(|m| m.map.moves.clone())
                    .any(|m| m.throttle.is_some_and(|t| t.rate_brokers.contains(&b)));
                let c = self
                    .describe_configs(
                        b,
                        BROKER_RESOURCE,
                        &b.to_string(),
                        &[LEADER_RATE, FOLLOWER_RATE],
                    )
                    .await?;
                if !ours && c.values().any(|(_, src)| *src == DYNAMIC_BROKER_CONFIG) {
                    operator.push(b);
                }
            }
            Some(Throttle::new(
                partition,
                &from,
                &to,
                cfg.throttle_bytes_per_sec,
                &operator,
            ))
        } else {
            None
        };
        let m = Move {
            partition,
            topic_id: topic_id.to_string(),
            from,
            to,
            kind,
            reason: reason.to_string(),
            owner: self.settings.node_id,
            started_at_ms: crate::shards::map::now_ms(),
            bytes,
            acks_all,
            throttle,
        };
        let key = (topic.to_string(), partition);
        let epoch = self.record_move(&config, &map, &m).await?;
        drop(_op);
        let launched = self.launch(topic, &m, epoch).await;
        self.placement
            .lock()
            .expect("placement")
            .launching
            .remove(&key);
        if let Err(e) = launched {
            tracing::warn!(topic, partition, error = %e, "reassignment refused; undoing it");
            let _ = self.cancel_move(topic, partition, "refused").await;
            return Err(e);
        }
        metrics::counter!("shardgate_reassignments_started_total", "topic" => topic.to_string(), "kind" => kind.as_str(), "reason" => reason).increment(1);
        tracing::info!(topic, partition, from = ?m.from, to = ?m.to, kind = kind.as_str(), reason, bytes, throttle = ?m.throttle.as_ref().map(|t| t.rate), "reassignment started");
        Ok(m)
    }

    /// Records `m` in `map` (one map change; the caller holds `ops`), its partition marked
    /// launching so that `follow_moves` leaves it alone until Kafka is asked (the caller
    /// unmarks it). The new epoch.
    pub(super) async fn record_move(
        &self,
        config: &TopicConfig,
        map: &ShardMap,
        m: &Move,
    ) -> Result<u64, ControlError> {
        let mut next = map.clone();
        next.moves.push(m.clone());
        next.epoch += 1;
        let key = (map.topic.clone(), m.partition);
        self.placement
            .lock()
            .expect("placement")
            .launching
            .insert(key.clone());
        if let Err(e) = self.commit(config, &next, map.epoch).await {
            self.placement
                .lock()
                .expect("placement")
                .launching
                .remove(&key);
            return Err(e);
        }
        Ok(next.epoch)
    }

    /// Steps after the intent: acks=all in force everywhere, the throttle, the reassignment.
    async fn launch(&self, topic: &str, m: &Move, epoch: u64) -> Result<(), ControlError> {
        if m.acks_all {
            // The leader may change when the reassignment ends: what writers acknowledged
            // with acks=1 before acks=all took over must be on every in-sync replica first.
            self.wait_replicated(topic, m.partition, epoch).await?;
        }
        if let Some(t) = &m.throttle {
            let rate = Some(t.rate.to_string());
            for b in &t.rate_brokers {
                let code = self
                    .alter_configs(
                        *b,
                        BROKER_RESOURCE,
                        &b.to_string(),
                        vec![
                            op(LEADER_RATE, SET, rate.clone()),
                            op(FOLLOWER_RATE, SET, rate.clone()),
                        ],
                    )
                    .await?;
                if code != 0 {
                    return Err(ControlError::Kafka(format!(
                        "setting the replication throttle rate on broker {b}: error {code}"
                    )));
                }
            }
            let code = self
                .alter_configs(
                    self.admin_broker()?,
                    TOPIC_RESOURCE,
                    topic,
                    vec![
                        op(LEADER_REPLICAS, APPEND, Some(t.leader_replicas.join(","))),
                        op(
                            FOLLOWER_REPLICAS,
                            APPEND,
                            Some(t.follower_replicas.join(",")),
                        ),
                    ],
                )
                .await?;
            if code != 0 {
                return Err(ControlError::Kafka(format!(
                    "setting the throttled replicas of {topic}: error {code}"
                )));
            }
        }
        match self
            .alter_reassignment(topic, m.partition, Some(&m.to))
            .await?
        {
            0 => Ok(()),
            code => Err(ControlError::Kafka(format!(
                "AlterPartitionReassignments {topic}/{} to {:?}: error {code}",
                m.partition, m.to
            ))),
        }
    }

    /// Cancels a recorded move: the reassignment in Kafka (if one runs), then, once Kafka
    /// shows none (the copy would otherwise go on unthrottled), the throttles, then the
    /// record.
    pub async fn cancel_move(
        &self,
        topic: &str,
        partition: i32,
        reason: &'static str,
    ) -> Result<(), ControlError> {
        let (_, map) = self.current(topic)?;
        let Some(m) = map.moves.iter().find(|m| m.partition == partition).cloned() else {
            return Err(ControlError::BadConfig {
                field: "partition".into(),
                problem: format!("no move of {topic}/{partition} is under way"),
                fix: "see GET /api/v1/topics/{topic}/placement for the moves under way".into(),
            });
        };
        let code = self.alter_reassignment(topic, partition, None).await?;
        if ![0, NO_REASSIGNMENT_IN_PROGRESS, UNKNOWN_TOPIC_OR_PARTITION].contains(&code) {
            return Err(ControlError::Kafka(format!(
                "cancelling the reassignment of {topic}/{partition}: error {code}"
            )));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self
            .list_reassignments(topic, &[partition])
            .await?
            .contains_key(&partition)
        {
            if Instant::now() > deadline {
                return Err(ControlError::Kafka(format!(
                    "the reassignment of {topic}/{partition} is still listed after its cancellation"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.remove_throttle(topic, &m).await?;
        self.end_move(topic, &m, "cancelled", reason).await
    }

    /// Removes what `m`'s throttle set: its entries of the topic's throttled replica lists
    /// and the rates on brokers no other recorded move still throttles.
    pub(super) async fn remove_throttle(&self, topic: &str, m: &Move) -> Result<(), ControlError> {
        let Some(t) = &m.throttle else { return Ok(()) };
        let mut lists = Vec::new();
        let pairs = [
            (LEADER_REPLICAS, &t.leader_replicas),
            (FOLLOWER_REPLICAS, &t.follower_replicas),
        ];
        if pairs.iter().any(|(_, e)| !e.is_empty()) {
            // Entries of others (an operator's, another move's) stay; a list left empty is
            // deleted rather than kept as an empty setting.
            let now = match self
                .describe_configs(
                    self.admin_broker()?,
                    TOPIC_RESOURCE,
                    topic,
                    &[LEADER_REPLICAS, FOLLOWER_REPLICAS],
                )
                .await
            {
                Ok(c) => c,
                Err(ControlError::Kafka(_)) => HashMap::new(), // the topic is gone
                Err(e) => return Err(e),
            };
            for (key, entries) in pairs {
                if entries.is_empty() {
                    continue;
                }
                let current: Vec<String> = now
                    .get(key)
                    .and_then(|(v, _)| v.clone())
                    .unwrap_or_default()
                    .split(',')
                    .map(|e| e.trim().to_string())
                    .filter(|e| !e.is_empty())
                    .collect();
                if current.iter().all(|e| entries.contains(e)) {
                    lists.push(op(key, DELETE, None));
                } else {
                    lists.push(op(key, SUBTRACT, Some(entries.join(","))));
                }
            }
        }
        if !lists.is_empty() {
            let code = self
                .alter_configs(self.admin_broker()?, TOPIC_RESOURCE, topic, lists)
                .await?;
            // A deleted topic took its configs with it.
            if code != 0 && code != UNKNOWN_TOPIC_OR_PARTITION {
                return Err(ControlError::Kafka(format!(
                    "removing the throttled replicas of {topic}: error {code}"
                )));
            }
        }
        let others: Vec<Move> = self
            .shards
            .all()
            .iter()
            .flat_map(|x| {
                let name = x.config.name.clone();
                x.map
                    .moves
                    .iter()
                    .filter(move |o| !(name == topic && o.partition == m.partition))
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect();
        for b in &t.rate_brokers {
            if others.iter().any(|o| {
                o.throttle
                    .as_ref()
                    .is_some_and(|x| x.rate_brokers.contains(b))
            }) {
                continue;
            }
            let code = self
                .alter_configs(
                    *b,
                    BROKER_RESOURCE,
                    &b.to_string(),
                    vec![
                        op(LEADER_RATE, DELETE, None),
                        op(FOLLOWER_RATE, DELETE, None),
                    ],
                )
                .await?;
            if code != 0 {
                return Err(ControlError::Kafka(format!(
                    "removing the replication throttle rate of broker {b}: error {code}"
                )));
            }
        }
        Ok(())
    }

    /// Removes the record of `m` (one map change), counts and logs how it ended.
    pub(super) async fn end_move(
        &self,
        topic: &str,
        m: &Move,
        how: &'static str,
        reason: &'static str,
    ) -> Result<(), ControlError> {
        {
            let _op = self.ops.lock().await;
            let (config, map) = self.current(topic)?;
            let mut next = map.clone();
            next.moves.retain(|x| x.partition != m.partition);
            if next.moves.len() != map.moves.len() {
                next.epoch += 1;
                self.commit(&config, &next, map.epoch).await?;
            }
        }
        let secs = crate::shards::map::now_ms().saturating_sub(m.started_at_ms) as f64 / 1000.0;
        let key = (topic.to_string(), m.partition);
        let mut mem = self.placement.lock().expect("placement");
        let copied = mem.copied.remove(&key).map(|(_, b)| b);
        mem.unknown_since.remove(&key);
        mem.recent.push_back(serde_json::json!({
            "partition": m.partition, "from": m.from, "to": m.to, "kind": m.kind,
            "reason": m.reason, "outcome": how, "why": reason, "seconds": secs, "bytes": m.bytes,
            "started_at_ms": m.started_at_ms, "copied_bytes": copied,
        }));
        while mem.recent.len() > RECENT {
            mem.recent.pop_front();
        }
        drop(mem);
        let t = topic.to_string();
        if m.reason == super::balance::LEADERSHIP {
            // Counted as a leader move (or not) by `balance_leaders`: no replica moved.
            tracing::info!(topic, partition = m.partition, from = ?m.from, to = ?m.to, outcome = how, secs, "leadership move ended");
        } else if how == "finished" {
            metrics::counter!("shardgate_reassignments_finished_total", "topic" => t.clone(), "kind" => m.kind.as_str()).increment(1);
            metrics::counter!("shardgate_reassignment_bytes_total", "topic" => t.clone())
                .increment(copied.unwrap_or(m.bytes).max(0) as u64);
            metrics::histogram!("shardgate_reassignment_seconds", "topic" => t, "kind" => m.kind.as_str()).record(secs);
            tracing::info!(topic, partition = m.partition, from = ?m.from, to = ?m.to, kind = m.kind.as_str(), reason = %m.reason, bytes = m.bytes, secs, "reassignment finished");
        } else {
            metrics::counter!("shardgate_reassignments_cancelled_total", "topic" => t, "reason" => reason).increment(1);
            tracing::warn!(topic, partition = m.partition, from = ?m.from, to = ?m.to, kind = m.kind.as_str(), reason, secs, "reassignment cancelled");
        }
        self.pool.topology.request_refresh();
        Ok(())
    }

    /// Before the autoscaler splits shard `id` (not a hot-key isolation): whether the split
    /// waits because the best idle partition sits on a busier broker than the least loaded
    /// one, which then gets an idle partition moved to it first (nothing to copy). Some(d):
    /// return `d` instead of splitting (a move started, or one is under way); None: split
    /// now (placement satisfied, reassign off, or the wait ran past `split_wait_secs`).
    pub(super) async fn split_waits(
        &self,
        config: &TopicConfig,
        map: &ShardMap,
        id: u32,
    ) -> Option<Option<Decision>> {
        let cfg = self.settings.raw.placement.clone();
        let topic = config.name.clone();
        let key = (topic.clone(), id);
        if !cfg.reassign || cfg.split_wait_secs == 0 {
            return None;
        }
        let since = *self
            .placement
            .lock()
            .expect("placement")
            .split_waiting
            .entry(key.clone())
            .or_insert_with(Instant::now);
        let done = |c: &Self| {
            c.placement
                .lock()
                .expect("placement")
                .split_waiting
                .remove(&key);
        };
        if since.elapsed() >= Duration::from_secs(cfg.split_wait_secs) {
            tracing::warn!(
                topic,
                shard = id,
                waited_secs = cfg.split_wait_secs,
                "placement_timeout: the split takes the best idle partition it has"
            );
            done(self);
            return None;
        }
        if !map.moves.is_empty() {
            return Some(None); // the move it waits for (or another) is under way
        }
        let active: Vec<i32> = map.active().iter().map(|s| s.partition).collect();
        let weights = self.shard_weights(config);
        let view = self.partition_views(map);
        let brokers: Vec<i32> = self.pool.topology.load().brokers.keys().copied().collect();
        let loads = placement::broker_loads(&active, &view, &weights, &brokers);
        let shard_load = map
            .shard(id)
            .ok()
            .and_then(|s| weights.get(&s.partition).copied())
            .unwrap_or(1.0);
        match placement::split_plan(&self.idle_not_moving(map), &view, &loads, shard_load) {
            Some(placement::SplitPlan::MoveFirst { partition, to }) => {
                if self.moves_in_flight() >= cfg.max_concurrent_moves {
                    return Some(None);
                }
                match self
                    .start_move(&topic, partition, to.clone(), "split_placement")
                    .await
                {
                    Ok(_) => Some(Some(Decision {
                        reason: "placement",
                        detail: format!(
                            "split of shard {id} waits for partition {partition} to move to broker {}",
                            to[0]
                        ),
                    })),
                    Err(e) => {
                        tracing::warn!(topic, shard = id, partition, error = %e, "moving an idle partition for a split failed; splitting now");
                        done(self);
                        None
                    }
                }
            }
            _ => {
                done(self);
                None
            }
        }
    }
}
