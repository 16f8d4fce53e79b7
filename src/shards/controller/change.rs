//! Split and merge with the seal protocol (see the module docs of `controller`), and where a
//! split goes (`placement`).

use super::*;

impl Controller {
    /// What placement sees of the topic's pool partitions: leaders and in-sync replicas from
    /// the topology, consumer load from the groups' assignments.
    pub(super) fn partition_views(&self, map: &ShardMap) -> HashMap<i32, PartitionView> {
        let topo = self.pool.topology.load();
        let active: Vec<i32> = map.active().iter().map(|s| s.partition).collect();
        let consumers = self.groups.consumer_loads(&map.topic, &active);
        let info = topo.topics.get(map.topic.as_bytes());
        (0..map.pool)
            .map(|p| {
                let pi = info.and_then(|t| t.partitions.get(p as usize));
                (
                    p,
                    PartitionView {
                        leader: pi.map(|i| i.leader).filter(|l| *l >= 0),
                        replicas: pi.map(|i| i.replicas.clone()).unwrap_or_default(),
                        isr: pi.map(|i| i.isr.clone()).unwrap_or_default(),
                        consumer_load: consumers.get(&p).copied().unwrap_or(0),
                    },
                )
            })
            .collect()
    }

    /// The idle partition for a new shard: the one whose upstream leader and whose consumer
    /// carry the least load of this topic's active shards (their count before the
    /// autoscaler has samples). Partitions whose replicas are moving are not taken.
    pub(super) fn place(&self, config: &TopicConfig, map: &ShardMap) -> Result<i32, ControlError> {
        let active: Vec<i32> = map.active().iter().map(|s| s.partition).collect();
        placement::pick_idle(
            &self.idle_not_moving(map),
            &active,
            &self.partition_views(map),
            &self.shard_weights(config),
        )
        .ok_or(ControlError::Map(MapError::PoolExhausted(map.pool)))
    }

    /// Idle partitions of the pool without a replica move under way.
    pub(super) fn idle_not_moving(&self, map: &ShardMap) -> Vec<i32> {
        let mut idle = map.idle_partitions();
        idle.retain(|p| !map.moves.iter().any(|m| m.partition == *p));
        idle
    }

    /// Each sampled active partition's load relative to the split thresholds (1.0: at the
    /// threshold), the larger of records/s and bytes/s.
    pub(super) fn shard_weights(&self, config: &TopicConfig) -> HashMap<i32, f64> {
        let a = &config.autoscale;
        self.loads(&config.name)
            .into_iter()
            .map(|(p, l)| {
                let r = l.records_per_sec / a.split_records_per_sec.max(f64::MIN_POSITIVE);
                let b = l.bytes_per_sec / a.split_bytes_per_sec.max(f64::MIN_POSITIVE);
                (p, r.max(b))
            })
            .collect()
    }

    pub async fn split(
        &self,
        topic: &str,
        shard: u32,
        at: Option<u128>,
        reason: &'static str,
    ) -> Result<ShardMap, ControlError> {
        let started = Instant::now();
        let _op = self.ops.lock().await;
        let (config, map) = self.current(topic)?;
        if map.active().len() as u32 >= config.max_shards() {
            return Err(ControlError::Bounds {
                min: config.autoscale.min_shards,
                max: config.max_shards(),
            });
        }
        let s = map.shard(shard)?.clone();
        let at = match at {
            Some(a) => a,
            None => weighted_median(&mut self.shards.samples_in(topic, s.start, s.end), &s),
        };
        let map = match self.place(&config, &map) {
            Err(ControlError::Map(MapError::PoolExhausted(_))) if config.max_pool > map.pool => {
                self.grow_pool(&config, &map).await?
            }
            other => {
                other?;
                map
            }
        };
        let to = self.place(&config, &map)?;
        let mut next = map.split(shard, at, to)?;
        let from = self.end_offsets(topic, &[to]).await?[&to];
        if let Some(g) = next.gates.last_mut() {
            g.from_offset = Some(from);
        }
        self.commit(&config, &next, map.epoch).await?;
        let sealed = self.seal(&config, next).await?;
        let took = started.elapsed();
        metrics::counter!("shardgate_shard_splits_total", "topic" => topic.to_string(), "reason" => reason).increment(1);
        metrics::histogram!("shardgate_shard_change_seconds", "topic" => topic.to_string(), "op" => "split").record(took.as_secs_f64());
        tracing::info!(topic, shard, at = %at, to_partition = to, reason, ms = took.as_millis() as u64, epoch = sealed.epoch, "shard split");
        self.cooldown
            .lock()
            .expect("cooldown")
            .insert(topic.to_string(), Instant::now());
        Ok(sealed)
    }

    pub async fn merge(
        &self,
        topic: &str,
        a: u32,
        b: u32,
        reason: &'static str,
    ) -> Result<ShardMap, ControlError> {
        let started = Instant::now();
        let _op = self.ops.lock().await;
        let (config, map) = self.current(topic)?;
        if map.active().len() as u32 <= config.autoscale.min_shards {
            return Err(ControlError::Bounds {
                min: config.autoscale.min_shards,
                max: config.max_shards(),
            });
        }
        let mut next = map.merge(a, b)?;
        let gate_partition = next
            .gates
            .last()
            .map(|g| g.partition)
            .expect("merge adds a gate");
        let from = self.end_offsets(topic, &[gate_partition]).await?[&gate_partition];
        if let Some(g) = next.gates.last_mut() {
            g.from_offset = Some(from);
        }
        self.commit(&config, &next, map.epoch).await?;
        let sealed = self.seal(&config, next).await?;
        let took = started.elapsed();
        metrics::counter!("shardgate_shard_merges_total", "topic" => topic.to_string(), "reason" => reason).increment(1);
        metrics::histogram!("shardgate_shard_change_seconds", "topic" => topic.to_string(), "op" => "merge").record(took.as_secs_f64());
        tracing::info!(
            topic,
            a,
            b,
            reason,
            ms = took.as_millis() as u64,
            epoch = sealed.epoch,
            "shards merged"
        );
        self.cooldown
            .lock()
            .expect("cooldown")
            .insert(topic.to_string(), Instant::now());
        Ok(sealed)
    }

    /// Steps 4-5 of the seal protocol for every gate of `map` still missing a seal offset.
    pub(super) async fn seal(
        &self,
        config: &TopicConfig,
        map: ShardMap,
    ) -> Result<ShardMap, ControlError> {
        if map.sealing().next().is_none() {
            return Ok(map);
        }
        // Every live instance must route by this epoch with nothing older in flight; what
        // their writers had acknowledged on the parents then bounds the seal from below.
        let mut acked: HashMap<i32, i64> = HashMap::new();
        for ends in self
            .wait_applied(&map.topic, map.epoch)
            .await?
            .iter()
            .filter_map(|i| i.acked.get(&map.topic))
        {
            for (p, end) in ends {
                let e = acked.entry(*p).or_insert(*end);
                *e = (*e).max(*end);
            }
        }
        let parents: Vec<i32> = map
            .sealing()
            .flat_map(|g| {
                g.after
                    .iter()
                    .filter(|a| a.seal_offset.is_none())
                    .map(|a| a.partition)
            })
            .collect();
        // The high watermark alone is not enough: with acks=1 a record is acknowledged once
        // the leader has it, before followers do, so acknowledged records of moved keys can
        // lie above it. The seal is the larger of the two.
        let ends = self.end_offsets(&map.topic, &parents).await?;
        let mut next = map.clone();
        next.epoch += 1;
        for g in &mut next.gates {
            for a in &mut g.after {
                if a.seal_offset.is_none() {
                    let hw = ends.get(&a.partition).copied();
                    let local = self.managed.acked_end(&map.topic, a.partition);
                    let remote = acked.get(&a.partition).copied().unwrap_or(-1);
                    let seal = hw.map(|hw| hw.max(local).max(remote));
                    if seal > hw {
                        metrics::counter!("shardgate_seal_above_high_watermark_total", "topic" => map.topic.clone()).increment(1);
                        tracing::info!(topic = %map.topic, partition = a.partition, ?hw, ?seal, "seal offset above the high watermark (acknowledged records not yet replicated)");
                    }
                    a.seal_offset = seal;
                }
            }
        }
        self.commit(config, &next, map.epoch).await?;
        Ok(next)
    }

    /// Waits until no produce request routed under an epoch of `topic` older than `epoch` is
    /// in flight here and every live instance reports it applied `epoch` (bounded by the
    /// request timeout). The live instances as last read (empty with the embedded store).
    pub(super) async fn wait_applied(
        &self,
        topic: &str,
        epoch: u64,
    ) -> Result<Vec<InstanceInfo>, ControlError> {
        let deadline =
            Instant::now() + Duration::from_millis(self.settings.raw.upstream.request_timeout_ms);
        while self.shards.inflight_before(topic, epoch) > 0 {
            if Instant::now() > deadline {
                return Err(ControlError::Kafka(format!(
                    "produce requests older than epoch {epoch} did not finish; the seal is retried later"
                )));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        loop {
            let Some(list) = self.store.instances().await? else {
                return Ok(Vec::new());
            };
            let lagging: Vec<i32> = list
                .iter()
                .filter(|i| i.applied.get(topic).is_none_or(|e| *e < epoch))
                .map(|i| i.node_id)
                .collect();
            if lagging.is_empty() {
                return Ok(list);
            }
            if Instant::now() > deadline {
                return Err(ControlError::Kafka(format!(
                    "instances {lagging:?} have not applied epoch {epoch}; the seal is retried later"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
