//! Following replica moves on the leader instance (see `reassign.rs` for a move's life):
//! each recorded move judged every second by what Kafka reports, and, when this instance
//! loses leadership, the moves it drove cancelled in Kafka.

use super::*;
use crate::shards::moves::{self, Move, Throttle, Verdict};

impl Controller {
    /// One look at every recorded move (leader only): see the module docs.
    pub(super) async fn follow_moves(&self) {
        // A stalled instance (e.g. frozen past its session) may believe it still leads for a
        // moment after it wakes: it touches no move until its session is confirmed.
        if self.shards.fenced() {
            return;
        }
        for entry in self.shards.all() {
            if entry.map.moves.is_empty() {
                continue;
            }
            let topic = entry.config.name.clone();
            let parts: Vec<i32> = entry.map.moves.iter().map(|m| m.partition).collect();
            // Moves being launched while the list is asked for are judged next time: the list
            // may predate their reassignment (and would read as gone).
            let launching = self.placement.lock().expect("placement").launching.clone();
            let listed = match self.list_reassignments(&topic, &parts).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(topic, error = %e, "cannot list reassignments");
                    continue;
                }
            };
            // Kafka lists nothing for a move that ended, was cancelled or whose topic is
            // gone, and a topology without the topic (or with another id) may only be older
            // than it (an instance that just took over): judge those by a topology read
            // after the list, not an older one.
            let known = self
                .pool
                .topology
                .load()
                .topics
                .get(topic.as_bytes())
                .map(|t| t.id.to_string());
            if parts.iter().any(|p| !listed.contains_key(p))
                || entry
                    .map
                    .moves
                    .iter()
                    .any(|m| known.as_deref() != Some(m.topic_id.as_str()))
            {
                let seen = self.pool.topology.load().version;
                self.pool
                    .topology
                    .refresh_after(seen, Duration::from_secs(5))
                    .await;
            }
            for mut m in entry.map.moves.clone() {
                let key = (topic.clone(), m.partition);
                if m.owner != self.settings.node_id {
                    match self.adopt(&topic, m.partition).await {
                        Ok(Some(adopted)) => m = adopted,
                        Ok(None) => continue, // ended meanwhile
                        Err(e) => {
                            tracing::warn!(topic, partition = m.partition, error = %e, "cannot adopt a reassignment; retried");
                            continue;
                        }
                    }
                }
                if launching.contains(&key)
                    || self
                        .placement
                        .lock()
                        .expect("placement")
                        .launching
                        .contains(&key)
                {
                    continue;
                }
                if let Err(e) = self.follow(&topic, &m, listed.get(&m.partition)).await {
                    tracing::warn!(topic, partition = m.partition, error = %e, "following a reassignment failed; retried");
                }
            }
        }
    }

    async fn follow(
        &self,
        topic: &str,
        m: &Move,
        listed: Option<&Vec<i32>>,
    ) -> Result<(), ControlError> {
        let topo = self.pool.topology.load();
        let info = topo.topics.get(topic.as_bytes());
        let current = info.and_then(|t| {
            Some((
                t.id.to_string(),
                t.partitions.get(m.partition as usize)?.clone(),
            ))
        });
        let verdict = moves::judge(
            m,
            listed.map(|l| l.as_slice()),
            current
                .as_ref()
                .map(|(id, p)| (id.as_str(), p.replicas.as_slice())),
        );
        let leader = current.as_ref().map(|(_, p)| p.leader);
        drop(topo);
        let key = (topic.to_string(), m.partition);
        if verdict != Verdict::Unknown {
            self.placement
                .lock()
                .expect("placement")
                .unknown_since
                .remove(&key);
        }
        match verdict {
            Verdict::Running => {
                let due = self
                    .placement
                    .lock()
                    .expect("placement")
                    .copied
                    .get(&key)
                    .is_none_or(|(at, _)| at.elapsed() >= Duration::from_secs(5));
                let target = m.to.iter().copied().find(|b| !m.from.contains(b));
                if due && let Some(b) = target {
                    let size = self.replica_size(b, topic, m.partition).await.unwrap_or(0);
                    self.placement
                        .lock()
                        .expect("placement")
                        .copied
                        .insert(key, (Instant::now(), size));
                }
                let cfg = &self.settings.raw.placement;
                let rate = m.throttle.as_ref().map_or(u64::MAX, |t| t.rate).max(1);
                let limit = cfg
                    .move_timeout_secs
                    .max(3 * (m.bytes.max(0) as u64) / rate);
                let age = crate::shards::map::now_ms().saturating_sub(m.started_at_ms) / 1000;
                if age > limit {
                    return self.cancel_move(topic, m.partition, "timeout").await;
                }
                Ok(())
            }
            Verdict::Done => {
                if leader != m.to.first().copied()
                    && let Err(e) = self.elect_after_move(topic, m).await
                {
                    tracing::warn!(topic, partition = m.partition, error = %e, "preferred election after a reassignment failed");
                }
                // What the new replica holds now (the last progress sample may be seconds old).
                if let Some(b) = m.to.iter().copied().find(|b| !m.from.contains(b))
                    && let Ok(size) = self.replica_size(b, topic, m.partition).await
                {
                    self.placement
                        .lock()
                        .expect("placement")
                        .copied
                        .insert(key, (Instant::now(), size));
                }
                self.remove_throttle(topic, m).await?;
                self.end_move(topic, m, "finished", "done").await
            }
            Verdict::Gone | Verdict::Replaced => {
                self.remove_throttle(topic, m).await?;
                self.end_move(topic, m, "cancelled", "external").await
            }
            Verdict::TopicDeleted => {
                // Kafka dropped the reassignment and the topic's configs with the topic; a
                // topic created again under the name is not ours to touch (its id differs),
                // so only the broker rates are removed.
                let _ = self.alter_reassignment(topic, m.partition, None).await;
                self.remove_rates(topic, m).await?;
                self.end_move(topic, m, "cancelled", "topic_deleted").await
            }
            Verdict::Unknown => {
                self.pool.topology.request_refresh();
                let since = *self
                    .placement
                    .lock()
                    .expect("placement")
                    .unknown_since
                    .entry(key)
                    .or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(60) {
                    self.remove_throttle(topic, m).await?;
                    return self.end_move(topic, m, "cancelled", "external").await;
                }
                Ok(())
            }
        }
    }

    /// The preferred election ending a move whose new leader Kafka did not elect itself;
    /// with acks=all in force, once what writers acknowledged with acks=1 is replicated.
    async fn elect_after_move(&self, topic: &str, m: &Move) -> Result<(), ControlError> {
        if m.acks_all {
            let (_, map) = self.current(topic)?;
            self.wait_replicated(topic, m.partition, map.epoch).await?;
        }
        self.elect_preferred(topic, m.partition).await
    }

    /// The broker rates of `m`'s throttle only (its topic is gone).
    async fn remove_rates(&self, topic: &str, m: &Move) -> Result<(), ControlError> {
        let Some(t) = &m.throttle else { return Ok(()) };
        let mut no_lists = m.clone();
        no_lists.throttle = Some(Throttle {
            leader_replicas: vec![],
            follower_replicas: vec![],
            ..t.clone()
        });
        self.remove_throttle(topic, &no_lists).await
    }

    /// After this instance lost leadership: cancels in Kafka the moves its maps record and
    /// removes their throttles, without touching the store (the next leader sees them gone
    /// and removes the records, or, if it adopted one meanwhile, finds it cancelled).
    pub(super) async fn abandon_moves(&self) {
        // The store's maps, read now: a move another leader adopted while this instance was
        // stalled is that leader's to finish (and an unreachable store decides nothing).
        let stored = match self.store.load_topics().await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "leadership lost with the store unreachable: moves left to the next leader");
                return;
            }
        };
        let me = self.settings.node_id;
        for entry in stored {
            let topic = entry.config.name.clone();
            for m in entry.map.moves.iter().filter(|m| m.owner == me) {
                let code = self.alter_reassignment(&topic, m.partition, None).await;
                tracing::warn!(
                    topic,
                    partition = m.partition,
                    ?code,
                    "leadership lost: reassignment cancelled"
                );
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline
                    && self
                        .list_reassignments(&topic, &[m.partition])
                        .await
                        .is_ok_and(|l| l.contains_key(&m.partition))
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                if let Err(e) = self.remove_throttle(&topic, m).await {
                    tracing::warn!(topic, partition = m.partition, error = %e, "leadership lost: throttle not removed; the next leader removes it");
                }
                metrics::counter!("shardgate_reassignments_cancelled_total", "topic" => topic.clone(), "reason" => "lost_leadership").increment(1);
            }
        }
    }

    /// Makes this instance the owner of a recorded move (a new leader taking over its
    /// predecessor's): one map change. The move as recorded now, None if it ended.
    async fn adopt(&self, topic: &str, partition: i32) -> Result<Option<Move>, ControlError> {
        let _op = self.ops.lock().await;
        let (config, map) = self.current(topic)?;
        let mut next = map.clone();
        let Some(m) = next.moves.iter_mut().find(|m| m.partition == partition) else {
            return Ok(None);
        };
        let was = m.owner;
        m.owner = self.settings.node_id;
        let adopted = m.clone();
        next.epoch += 1;
        self.commit(&config, &next, map.epoch).await?;
        metrics::counter!("shardgate_reassignments_adopted_total", "topic" => topic.to_string())
            .increment(1);
        tracing::info!(topic, partition, from = ?adopted.from, to = ?adopted.to, previous_owner = was, "reassignment adopted");
        Ok(Some(adopted))
    }
}
