//! Placement on the leader: when active shards' load piles up on one broker, first a
//! leadership move (replica reorder + preferred election: nothing copied); when leadership
//! cannot spread it (replication factor 1, or every replica on the busy brokers) and
//! `placement.reassign` is on, replica moves (`reassign.rs`): an idle partition onto the
//! least loaded broker first (nothing to copy; the next split lands there), an active one
//! under the replication throttle only when that is not enough.

use super::*;
use crate::shards::moves::{Move, MoveKind};
use crate::shards::placement::{active_move, broker_loads, idle_move, imbalance};

/// `Move::reason` of a leadership move (a reorder of the same replicas and an election).
pub(super) const LEADERSHIP: &str = "leadership";

/// How long a leader change waits for acknowledged records to be replicated.
const REPLICATED_WAIT: Duration = Duration::from_secs(10);

/// Below this total load (in split thresholds) an imbalance is not worth copying data for.
const MIN_LOAD_TO_MOVE: f64 = 0.5;

impl Controller {
    /// Moves the leadership of one active shard partition off the busiest broker when active
    /// shards pile up there: its replicas are reordered (AlterPartitionReassignments, same
    /// replica set, so no data moves) to make an in-sync replica on a less loaded broker the
    /// preferred leader, then a preferred election runs (ElectLeaders).
    pub async fn balance_leaders(&self, topic: &str) -> Result<Option<String>, ControlError> {
        let (_, map) = self.current(topic)?;
        let active: Vec<i32> = map
            .active()
            .iter()
            .map(|s| s.partition)
            .filter(|p| !map.moves.iter().any(|m| m.partition == *p))
            .collect();
        let view = self.partition_views(&map);
        let topo = self.pool.topology.load();
        let brokers: Vec<i32> = topo.brokers.keys().copied().collect();
        let Some((partition, to)) = placement::leader_move(&active, &view, &brokers) else {
            return Ok(None);
        };
        let Some(info) = topo
            .topics
            .get(topic.as_bytes())
            .and_then(|t| t.partitions.get(partition as usize))
            .cloned()
        else {
            return Ok(None);
        };
        let topic_id = topo.topics.get(topic.as_bytes()).map(|t| t.id.to_string());
        drop(topo);
        let Some(topic_id) = topic_id else {
            return Ok(None);
        };
        let mut replicas = info.replicas.clone();
        replicas.retain(|b| *b != to);
        replicas.insert(0, to);
        // The move is recorded first, like a replica move of an active partition: every
        // instance writes the partition with acks=all until it ends, and the election waits
        // until what any writer acknowledged with acks=1 is replicated. A record the old
        // leader alone held would otherwise be truncated when it follows the new one (an
        // acknowledged record lost: the two-instance test saw 10 of 182,440).
        let m = Move {
            partition,
            topic_id,
            from: info.replicas.clone(),
            to: replicas.clone(),
            kind: MoveKind::Active,
            reason: LEADERSHIP.to_string(),
            owner: self.settings.node_id,
            started_at_ms: crate::shards::map::now_ms(),
            bytes: 0,
            acks_all: true,
            throttle: None,
        };
        let key = (topic.to_string(), partition);
        let epoch = {
            let _op = self.ops.lock().await;
            let (config, map) = self.current(topic)?;
            if map.moves.iter().any(|x| x.partition == partition) {
                return Ok(None);
            }
            self.record_move(&config, &map, &m).await?
        };
        let moved = self.elect_replicated(topic, &m, epoch).await;
        self.placement
            .lock()
            .expect("placement")
            .launching
            .remove(&key);
        let ended = self
            .end_move(
                topic,
                &m,
                if moved.is_ok() {
                    "finished"
                } else {
                    "cancelled"
                },
                if moved.is_ok() { "done" } else { "refused" },
            )
            .await;
        moved?;
        ended?;
        self.pool.topology.request_refresh();
        metrics::counter!("shardgate_leader_moves_total", "topic" => topic.to_string())
            .increment(1);
        Ok(Some(format!(
            "partition {partition}: leader {} -> {to} (active shards of the topic per broker were uneven)",
            info.leader
        )))
    }

    /// A recorded leadership move's Kafka steps: acks=all in force on every instance, what
    /// they acknowledged replicated, the replicas reordered, the preferred election.
    async fn elect_replicated(
        &self,
        topic: &str,
        m: &Move,
        epoch: u64,
    ) -> Result<(), ControlError> {
        self.wait_replicated(topic, m.partition, epoch).await?;
        let code = self
            .alter_reassignment(topic, m.partition, Some(&m.to))
            .await?;
        if code != 0 {
            return Err(ControlError::Kafka(format!(
                "AlterPartitionReassignments {topic}/{} to {:?}: error {code}",
                m.partition, m.to
            )));
        }
        // The preferred election needs the controller to have the new order; it is applied at
        // once for a reorder, but the broker may still answer "not available" for a moment.
        let elected = self.elect_preferred(topic, m.partition).await;
        if elected.is_err() {
            // Kafka's own preferred-leader rebalance would otherwise elect the new first
            // replica later, with writers back on acks=1.
            let _ = self
                .alter_reassignment(topic, m.partition, Some(&m.from))
                .await;
        }
        elected
    }

    /// Before a leader change of `partition` (its writers on acks=all from `epoch` on): waits
    /// until every live instance applied `epoch` and the high watermark reached the end of
    /// what any of them acknowledged there. After that every in-sync replica, so any leader
    /// Kafka may elect, holds every acknowledged record. Bounded by `REPLICATED_WAIT` (the
    /// leader's loop waits meanwhile; a replica that lags longer drops out of the ISR and is
    /// not elected, or the move is refused and tried again later).
    pub(super) async fn wait_replicated(
        &self,
        topic: &str,
        partition: i32,
        epoch: u64,
    ) -> Result<(), ControlError> {
        let acked = self
            .wait_applied(topic, epoch)
            .await?
            .iter()
            .filter_map(|i| i.acked.get(topic)?.get(&partition).copied())
            .fold(self.managed.acked_end(topic, partition), i64::max);
        let deadline = Instant::now() + REPLICATED_WAIT;
        loop {
            let hw = self
                .end_offsets(topic, &[partition])
                .await?
                .get(&partition)
                .copied()
                .unwrap_or(-1);
            if hw >= acked {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ControlError::Kafka(format!(
                    "{topic}/{partition}: high watermark {hw} still below {acked}, the end of what writers acknowledged; the leader stays"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One placement step for `topic`: a leadership move if one helps, else (reassign on,
    /// samples complete, the imbalance held `imbalance_secs`, no move under way beyond the
    /// budget, no operator's reassignment of the topic) one replica move.
    pub async fn placement_tick(&self, topic: &str) -> Result<Option<String>, ControlError> {
        if let Some(detail) = self.balance_leaders(topic).await? {
            return Ok(Some(detail));
        }
        let cfg = self.settings.raw.placement.clone();
        let (config, map) = self.current(topic)?;
        let active: Vec<i32> = map.active().iter().map(|s| s.partition).collect();
        let weights = self.shard_weights(&config);
        let view = self.partition_views(&map);
        let brokers: Vec<i32> = self.pool.topology.load().brokers.keys().copied().collect();
        let loads = broker_loads(&active, &view, &weights, &brokers);
        let ratio = imbalance(&loads);
        metrics::gauge!("shardgate_placement_imbalance_ratio", "topic" => topic.to_string())
            .set(ratio);
        let complete = active.iter().all(|p| weights.contains_key(p));
        let total: f64 = loads.values().sum();
        {
            let mut mem = self.placement.lock().expect("placement");
            if !complete || ratio <= cfg.imbalance_ratio || total < MIN_LOAD_TO_MOVE {
                mem.imbalanced_since.remove(topic);
                return Ok(None);
            }
            let since = *mem
                .imbalanced_since
                .entry(topic.to_string())
                .or_insert_with(Instant::now);
            if !cfg.reassign
                || since.elapsed() < Duration::from_secs(cfg.imbalance_secs)
                || self.moves_in_flight() >= cfg.max_concurrent_moves
            {
                return Ok(None);
            }
        }
        if self.list_all_reassignments().await?.contains_key(topic) {
            // In KRaft a new request would silently re-target an operator's reassignment.
            self.set_blocked(topic, Some("foreign_reassignment"));
            return Ok(None);
        }
        let idle = self.idle_not_moving(&map);
        if let Some((p, to)) = idle_move(&idle, &view, &loads) {
            self.set_blocked(topic, None);
            let m = self.start_move(topic, p, to, "balance").await?;
            return Ok(Some(format!(
                "partition {p} (idle): replicas {:?} -> {:?} (load per broker {loads:?}, ratio {ratio:.2})",
                m.from, m.to
            )));
        }
        // A hot shard on the busiest broker splits onto the least loaded one without copying.
        let busiest = loads
            .iter()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(b, _)| *b);
        if self
            .hot_partitions(topic)
            .iter()
            .any(|p| view.get(p).and_then(|v| v.leader) == busiest)
        {
            return Ok(None);
        }
        let movable: Vec<i32> = active
            .iter()
            .copied()
            .filter(|p| !map.moves.iter().any(|m| m.partition == *p))
            .collect();
        match active_move(&movable, &view, &weights, &loads) {
            Some((p, to)) => {
                self.set_blocked(topic, None);
                let m = self.start_move(topic, p, to, "balance").await?;
                Ok(Some(format!(
                    "partition {p} (active): replicas {:?} -> {:?} (load per broker {loads:?}, ratio {ratio:.2})",
                    m.from, m.to
                )))
            }
            None => {
                self.set_blocked(topic, Some("no_move_helps"));
                Ok(None)
            }
        }
    }

    /// Records (and logs on change) why placement cannot act on `topic`.
    fn set_blocked(&self, topic: &str, reason: Option<&'static str>) {
        let mut mem = self.placement.lock().expect("placement");
        let before = mem.blocked.get(topic).copied();
        if before == reason {
            return;
        }
        match reason {
            Some(r) => {
                tracing::warn!(topic, reason = r, "placement blocked");
                mem.blocked.insert(topic.to_string(), r);
            }
            None => {
                tracing::info!(topic, was = before, "placement unblocked");
                mem.blocked.remove(topic);
            }
        }
        for r in ["foreign_reassignment", "no_move_helps"] {
            metrics::gauge!("shardgate_placement_blocked", "topic" => topic.to_string(), "reason" => r)
                .set(if reason == Some(r) { 1.0 } else { 0.0 });
        }
    }
}

impl Controller {
    /// What placement sees of `topic` (leader only: loads are the autoscaler's samples):
    /// per broker its active shards, idle partitions and load; the moves under way with
    /// their copy progress; the last ended moves; why placement is blocked, if it is.
    pub fn placement_view(&self, topic: &str) -> Result<serde_json::Value, ControlError> {
        let (config, map) = self.current(topic)?;
        let cfg = &self.settings.raw.placement;
        let active: Vec<i32> = map.active().iter().map(|s| s.partition).collect();
        let weights = self.shard_weights(&config);
        let raw = self.loads(topic);
        let view = self.partition_views(&map);
        let brokers: Vec<i32> = self.pool.topology.load().brokers.keys().copied().collect();
        let loads = broker_loads(&active, &view, &weights, &brokers);
        let total: f64 = loads.values().sum();
        let leads = |b: i32, parts: &[i32]| -> Vec<i32> {
            parts
                .iter()
                .copied()
                .filter(|p| view.get(p).and_then(|v| v.leader) == Some(b))
                .collect()
        };
        let idle = map.idle_partitions();
        let per_broker: Vec<_> = loads
            .iter()
            .map(|(b, l)| {
                let mine = leads(*b, &active);
                let rate = |f: fn(&ShardLoad) -> f64| -> f64 {
                    mine.iter().filter_map(|p| raw.get(p)).map(f).sum()
                };
                serde_json::json!({
                    "broker": b,
                    "active_partitions": mine,
                    "idle_partitions": leads(*b, &idle),
                    "records_per_sec": rate(|l| l.records_per_sec),
                    "bytes_per_sec": rate(|l| l.bytes_per_sec),
                    "load": l,
                    "share": if total > 0.0 { l / total } else { 0.0 },
                })
            })
            .collect();
        let mem = self.placement.lock().expect("placement");
        let now = crate::shards::map::now_ms();
        let moving: Vec<_> = map
            .moves
            .iter()
            .map(|m| {
                let mut v = serde_json::to_value(m).unwrap_or_default();
                v["elapsed_secs"] = serde_json::json!(now.saturating_sub(m.started_at_ms) / 1000);
                v["copied_bytes"] = serde_json::json!(
                    mem.copied
                        .get(&(topic.to_string(), m.partition))
                        .map(|(_, b)| *b)
                );
                v
            })
            .collect();
        Ok(serde_json::json!({
            "topic": topic,
            "epoch": map.epoch,
            "reassign": cfg.reassign,
            "ratio": imbalance(&loads),
            "threshold": cfg.imbalance_ratio,
            "samples_complete": active.iter().all(|p| weights.contains_key(p)),
            "brokers": per_broker,
            "moving": moving,
            "recent": mem.recent.iter().collect::<Vec<_>>(),
            "blocked": mem.blocked.get(topic),
        }))
    }
}
