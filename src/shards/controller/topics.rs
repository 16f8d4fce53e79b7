//! Managed topics upstream: create or adopt the topic with its partition pool, and grow the
//! pool (CreatePartitions) when a split finds no idle partition.

use super::*;

impl Controller {
    /// Loads every stored map into the registry and adds topics declared in the config that
    /// the store does not know yet.
    pub async fn load(&self) -> Result<(), ControlError> {
        for t in self.store.load_topics().await? {
            tracing::info!(topic = %t.config.name, epoch = t.map.epoch, shards = t.map.active().len(), "loaded shard map");
            self.shards.install(t.config, t.map);
        }
        for cfg in self.settings.raw.topics.clone() {
            if !self.shards.is_managed(&cfg.name) {
                self.create_topic(cfg).await?;
            }
        }
        Ok(())
    }

    /// Creates (or adopts) the upstream topic with `pool` partitions and stores its first map.
    pub async fn create_topic(&self, cfg: TopicConfig) -> Result<ShardMap, ControlError> {
        cfg.validate()
            .map_err(|(field, problem, fix)| ControlError::BadConfig {
                field: field.into(),
                problem,
                fix,
            })?;
        let _op = self.ops.lock().await;
        if self.shards.is_managed(&cfg.name) {
            return Err(ControlError::AlreadyManaged(cfg.name));
        }
        let existing = self.partition_count(&cfg.name).await?;
        match existing {
            Some(n) if n >= cfg.pool => {
                tracing::info!(topic = %cfg.name, partitions = n, "adopting existing topic")
            }
            Some(n) => {
                return Err(ControlError::BadConfig {
                    field: "pool".into(),
                    problem: format!(
                        "topic {} exists with {n} partitions, fewer than pool {}",
                        cfg.name, cfg.pool
                    ),
                    fix: "use a pool no larger than the partition count, or add partitions first"
                        .into(),
                });
            }
            None => self.create_upstream(&cfg).await?,
        }
        let map = ShardMap::initial(&cfg.name, cfg.initial_shards, cfg.pool)?;
        let stored = StoredTopic {
            config: cfg.clone(),
            map: map.clone(),
        };
        self.store.put_topic(&stored, None).await?;
        self.shards.install(cfg, map.clone());
        Ok(map)
    }

    pub(super) async fn partition_count(&self, topic: &str) -> Result<Option<i32>, ControlError> {
        let t = self.pool.topology.load();
        self.pool
            .topology
            .refresh_after(t.version, Duration::from_secs(5))
            .await;
        Ok(self
            .pool
            .topology
            .load()
            .topics
            .get(topic.as_bytes())
            .map(|t| t.partitions.len() as i32))
    }

    pub(super) async fn create_upstream(&self, cfg: &TopicConfig) -> Result<(), ControlError> {
        let broker = self
            .pool
            .topology
            .load()
            .any_broker(0)
            .ok_or(UpstreamError::NoBroker)?;
        let req = CreateTopicsRequest::default()
            .with_timeout_ms(ADMIN_TIMEOUT_MS)
            .with_topics(vec![
                CreatableTopic::default()
                    .with_name(TopicName(StrBytes::from_string(cfg.name.clone())))
                    .with_num_partitions(cfg.pool)
                    .with_replication_factor(cfg.replication_factor),
            ]);
        let resp: CreateTopicsResponse = self
            .pool
            .call_on(broker, ADMIN_SOCKET, ApiKey::CreateTopics, 5, None, &req)
            .await?;
        for t in &resp.topics {
            if t.error_code != 0 && t.error_code != 36 {
                return Err(ControlError::Kafka(format!(
                    "CreateTopics {}: error {} {}",
                    cfg.name,
                    t.error_code,
                    t.error_message.as_deref().unwrap_or("")
                )));
            }
        }
        // Wait until every partition has a leader, so the first produce routes.
        self.wait_for_leaders(&cfg.name, cfg.pool).await
    }

    pub(super) async fn wait_for_leaders(
        &self,
        topic: &str,
        partitions: i32,
    ) -> Result<(), ControlError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let t = self.pool.topology.load();
            if let Some(info) = t.topics.get(topic.as_bytes())
                && info.partitions.len() as i32 >= partitions
                && info.partitions.iter().all(|p| p.leader >= 0)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ControlError::Kafka(format!(
                    "topic {topic} has no leaders for {partitions} partitions after 30 s"
                )));
            }
            self.pool
                .topology
                .refresh_after(t.version, Duration::from_millis(500))
                .await;
        }
    }

    /// Adds partitions to an exhausted pool: half the pool again (at least one), at most
    /// `max_pool`. No key moves; clients learn the new partition count from their next
    /// metadata refresh, which fetches of the topic nudge (see `Registry::nudge`).
    pub(super) async fn grow_pool(
        &self,
        config: &TopicConfig,
        map: &ShardMap,
    ) -> Result<ShardMap, ControlError> {
        let topic = &config.name;
        let target = (map.pool + (map.pool / 2).max(1)).min(config.max_pool);
        let have = self.partition_count(topic).await?.unwrap_or(0);
        if have < target {
            let broker = self
                .pool
                .topology
                .load()
                .any_broker(0)
                .ok_or(UpstreamError::NoBroker)?;
            let req = CreatePartitionsRequest::default()
                .with_timeout_ms(ADMIN_TIMEOUT_MS)
                .with_topics(vec![
                    CreatePartitionsTopic::default()
                        .with_name(TopicName(StrBytes::from_string(topic.clone())))
                        .with_count(target)
                        .with_assignments(None),
                ]);
            let resp: CreatePartitionsResponse = self
                .pool
                .call_on(
                    broker,
                    ADMIN_SOCKET,
                    ApiKey::CreatePartitions,
                    2,
                    None,
                    &req,
                )
                .await?;
            for r in &resp.results {
                // 37 INVALID_PARTITIONS: somebody else (an interrupted earlier growth) already
                // added them; the count check below decides.
                if r.error_code != 0 && r.error_code != 37 {
                    return Err(ControlError::Kafka(format!(
                        "CreatePartitions {topic} to {target}: error {} {}",
                        r.error_code,
                        r.error_message.as_deref().unwrap_or("")
                    )));
                }
            }
        }
        self.wait_for_leaders(topic, target).await?;
        let next = map.grow(target);
        self.commit(config, &next, map.epoch).await?;
        metrics::counter!("shardgate_pool_grown_total", "topic" => topic.clone()).increment(1);
        tracing::info!(
            topic = %topic,
            from = map.pool,
            to = target,
            epoch = next.epoch,
            "partition pool exhausted; partitions added"
        );
        Ok(next)
    }
}
