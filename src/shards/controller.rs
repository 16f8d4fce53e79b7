//! The shard controller: creates managed topics, executes splits and merges with the seal
//! protocol, removes gates every group has passed, and runs the autoscaler. One instance is the
//! leader (with the embedded store: always this one). Every decision is logged with its
//! reason and counted.
//!
//! Split of shard S=[a,b) on partition p at m, onto idle partition q:
//! 1. read q's end offset `from` (q is idle, so nothing lands there until step 3);
//! 2. write epoch e+1 to the store (check-and-set on e): [a,m) stays on p, [m,b) → q, and a
//!    gate (q, from, after p with seal unknown);
//! 3. install it: new produce requests route by e+1;
//! 4. wait until no produce request routed under an older epoch is in flight;
//! 5. read p's end offset as the seal offset and write it into the gate (epoch e+2).
//!
//! Consumers of q get records from `from` on only once their group consumed p up to the seal.
//! A merge works the same way with the lower shard's partition reused.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kafka_protocol::messages::alter_partition_reassignments_request::{
    ReassignablePartition, ReassignableTopic,
};
use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::elect_leaders_request::TopicPartitions;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::{
    AlterPartitionReassignmentsRequest, AlterPartitionReassignmentsResponse, ApiKey, BrokerId,
    CreatePartitionsRequest, CreatePartitionsResponse, CreateTopicsRequest, CreateTopicsResponse,
    ElectLeadersRequest, ElectLeadersResponse, ListOffsetsRequest, ListOffsetsResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use super::placement::{self, PartitionView};
use super::registry::{hottest, weighted_median};
use super::sampler;
use super::stored::{StoredTopic, TopicStore};
use super::{HASH_END, MapError, ShardMap, TopicConfig};
use crate::proxy::Ctx;
use crate::store::{InstanceInfo, ShardStore, StoreError};
use crate::upstream::UpstreamError;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("topic {0} is not managed")]
    UnknownTopic(String),
    #[error("topic {0} is already managed")]
    AlreadyManaged(String),
    #[error("invalid topic config `{field}`: {problem}; {fix}")]
    BadConfig {
        field: String,
        problem: String,
        fix: String,
    },
    #[error(transparent)]
    Map(#[from] MapError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("upstream refused: {0}")]
    Kafka(String),
    #[error("the shard count would leave [{min}, {max}]")]
    Bounds { min: u32, max: u32 },
}

impl ControlError {
    /// HTTP status for the admin API.
    pub fn status(&self) -> u16 {
        match self {
            ControlError::UnknownTopic(_) => 404,
            ControlError::AlreadyManaged(_) | ControlError::Store(StoreError::Conflict { .. }) => {
                409
            }
            ControlError::BadConfig { .. } | ControlError::Map(_) | ControlError::Bounds { .. } => {
                400
            }
            ControlError::Store(_) | ControlError::Upstream(_) | ControlError::Kafka(_) => 503,
        }
    }
}

#[derive(Default)]
struct ShardStats {
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

pub struct Controller {
    pub store: Arc<dyn ShardStore>,
    /// One map change at a time (admin requests and the autoscaler); held across the seal
    /// protocol's awaits on purpose: it guards a multi-step change, not a hot path.
    ops: tokio::sync::Mutex<()>,
    stats: Mutex<HashMap<(String, i32), ShardStats>>,
    cooldown: Mutex<HashMap<String, Instant>>,
    /// Whether this instance holds the leader lock (always, with the embedded store).
    leader: std::sync::atomic::AtomicBool,
}

pub struct Decision {
    pub reason: &'static str,
    pub detail: String,
}

impl Controller {
    pub fn new(store: Arc<dyn ShardStore>) -> Self {
        let leader = std::sync::atomic::AtomicBool::new(!store.elects());
        Self {
            store,
            ops: tokio::sync::Mutex::new(()),
            stats: Mutex::new(HashMap::new()),
            cooldown: Mutex::new(HashMap::new()),
            leader,
        }
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(std::sync::atomic::Ordering::Acquire)
    }

    /// This instance as the store's registry shows it.
    pub fn me(&self, ctx: &Ctx) -> InstanceInfo {
        let admin = ctx.settings.admin_bind;
        let host = if admin.ip().is_unspecified() {
            ctx.settings.advertised.host.clone()
        } else {
            admin.ip().to_string()
        };
        InstanceInfo {
            node_id: ctx.settings.node_id,
            advertised: ctx.settings.advertised.to_string(),
            admin: format!("http://{host}:{}", admin.port()),
            applied: ctx
                .shards
                .all()
                .iter()
                .filter(|m| ctx.shards.inflight_before(&m.config.name, m.map.epoch) == 0)
                .map(|m| (m.config.name.clone(), m.map.epoch))
                .collect(),
        }
    }

    /// Background work every instance does with the store: follow map changes (blocking
    /// queries), publish which epochs it applied, and campaign for the leader lock. With the
    /// store unreachable, routing goes on with the last maps and the controller pauses.
    pub async fn follow_store(self: Arc<Self>, ctx: Arc<Ctx>) {
        let watcher = {
            let (this, ctx) = (self.clone(), ctx.clone());
            async move {
                let mut index = 0;
                loop {
                    match this.store.watch_topics(index).await {
                        Ok((i, topics)) => {
                            index = i;
                            for t in topics {
                                if ctx.shards.install(t.config, t.map.clone()) {
                                    tracing::info!(topic = %t.map.topic, epoch = t.map.epoch, "installed shard map from the store");
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "watching the shard store failed; routing with the last maps");
                            metrics::counter!("shardgate_store_errors_total", "op" => "watch")
                                .increment(1);
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            }
        };
        let reporter = async move {
            let mut last: Option<InstanceInfo> = None;
            let mut last_sent = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                let me = self.me(&ctx);
                // Renew the session (and registry entry) every 3 s, and at once when the
                // applied epochs change: the seal protocol is waiting for them.
                if last.as_ref() != Some(&me) || last_sent.elapsed() >= Duration::from_secs(3) {
                    match self.store.report(&me).await {
                        Ok(()) => {
                            last = Some(me.clone());
                            last_sent = Instant::now();
                        }
                        Err(e) => {
                            metrics::counter!("shardgate_store_errors_total", "op" => "report")
                                .increment(1);
                            tracing::warn!(error = %e, "cannot report to the shard store");
                            last = None;
                        }
                    }
                    if let Ok(Some(live)) = self.store.instances().await {
                        let members = live
                            .iter()
                            .filter_map(|i| {
                                crate::config::parse_host_port("instances", &i.advertised)
                                    .ok()
                                    .map(|a| (i.node_id, a))
                            })
                            .collect();
                        ctx.cluster.set_live(members);
                    }
                    let lead = match self.store.campaign(&me).await {
                        Ok(l) => l,
                        Err(e) => {
                            metrics::counter!("shardgate_store_errors_total", "op" => "campaign")
                                .increment(1);
                            tracing::warn!(error = %e, "leader election unavailable; controller paused");
                            false
                        }
                    };
                    let was = self.leader.swap(lead, std::sync::atomic::Ordering::AcqRel);
                    if was != lead {
                        tracing::info!(leader = lead, node_id = me.node_id, "leadership changed");
                    }
                    metrics::gauge!("shardgate_controller_leader").set(if lead {
                        1.0
                    } else {
                        0.0
                    });
                }
            }
        };
        tokio::join!(watcher, reporter);
    }

    /// Loads every stored map into the registry and adds topics declared in the config that
    /// the store does not know yet.
    pub async fn load(&self, ctx: &Ctx) -> Result<(), ControlError> {
        for t in self.store.load_topics().await? {
            tracing::info!(topic = %t.config.name, epoch = t.map.epoch, shards = t.map.active().len(), "loaded shard map");
            ctx.shards.install(t.config, t.map);
        }
        for cfg in ctx.settings.raw.topics.clone() {
            if !ctx.shards.is_managed(&cfg.name) {
                self.create_topic(ctx, cfg).await?;
            }
        }
        Ok(())
    }

    /// Creates (or adopts) the upstream topic with `pool` partitions and stores its first map.
    pub async fn create_topic(
        &self,
        ctx: &Ctx,
        cfg: TopicConfig,
    ) -> Result<ShardMap, ControlError> {
        cfg.validate()
            .map_err(|(field, problem, fix)| ControlError::BadConfig {
                field: field.into(),
                problem,
                fix,
            })?;
        let _op = self.ops.lock().await;
        if ctx.shards.is_managed(&cfg.name) {
            return Err(ControlError::AlreadyManaged(cfg.name));
        }
        let existing = self.partition_count(ctx, &cfg.name).await?;
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
            None => self.create_upstream(ctx, &cfg).await?,
        }
        let map = ShardMap::initial(&cfg.name, cfg.initial_shards, cfg.pool)?;
        let stored = StoredTopic {
            config: cfg.clone(),
            map: map.clone(),
        };
        self.store.put_topic(&stored, None).await?;
        ctx.shards.install(cfg, map.clone());
        Ok(map)
    }

    async fn partition_count(&self, ctx: &Ctx, topic: &str) -> Result<Option<i32>, ControlError> {
        let t = ctx.topology().load();
        ctx.topology()
            .refresh_after(t.version, Duration::from_secs(5))
            .await;
        Ok(ctx
            .topology()
            .load()
            .topics
            .get(topic.as_bytes())
            .map(|t| t.partitions.len() as i32))
    }

    async fn create_upstream(&self, ctx: &Ctx, cfg: &TopicConfig) -> Result<(), ControlError> {
        let broker = ctx
            .topology()
            .load()
            .any_broker(0)
            .ok_or(UpstreamError::NoBroker)?;
        let req = CreateTopicsRequest::default()
            .with_timeout_ms(30_000)
            .with_topics(vec![
                CreatableTopic::default()
                    .with_name(TopicName(StrBytes::from_string(cfg.name.clone())))
                    .with_num_partitions(cfg.pool)
                    .with_replication_factor(cfg.replication_factor),
            ]);
        let resp: CreateTopicsResponse = ctx
            .pool
            .call(broker, 0, ApiKey::CreateTopics, 5, None, &req)
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
        self.wait_for_leaders(ctx, &cfg.name, cfg.pool).await
    }

    async fn wait_for_leaders(
        &self,
        ctx: &Ctx,
        topic: &str,
        partitions: i32,
    ) -> Result<(), ControlError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let t = ctx.topology().load();
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
            ctx.topology()
                .refresh_after(t.version, Duration::from_millis(500))
                .await;
        }
    }

    /// Adds partitions to an exhausted pool: half the pool again (at least one), at most
    /// `max_pool`. No key moves; clients learn the new partition count from their next
    /// metadata refresh, which fetches of the topic nudge (see `Registry::nudge`).
    async fn grow_pool(
        &self,
        ctx: &Ctx,
        config: &TopicConfig,
        map: &ShardMap,
    ) -> Result<ShardMap, ControlError> {
        let topic = &config.name;
        let target = (map.pool + (map.pool / 2).max(1)).min(config.max_pool);
        let have = self.partition_count(ctx, topic).await?.unwrap_or(0);
        if have < target {
            let broker = ctx
                .topology()
                .load()
                .any_broker(0)
                .ok_or(UpstreamError::NoBroker)?;
            let req = CreatePartitionsRequest::default()
                .with_timeout_ms(30_000)
                .with_topics(vec![
                    CreatePartitionsTopic::default()
                        .with_name(TopicName(StrBytes::from_string(topic.clone())))
                        .with_count(target)
                        .with_assignments(None),
                ]);
            let resp: CreatePartitionsResponse = ctx
                .pool
                .call(broker, 0, ApiKey::CreatePartitions, 2, None, &req)
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
        self.wait_for_leaders(ctx, topic, target).await?;
        let next = map.grow(target);
        self.commit(ctx, config, &next, map.epoch).await?;
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

    /// Latest offsets of `partitions` of `topic`, retrying retriable errors (a fresh topic's
    /// leaders, a leader moving) for a few seconds.
    pub async fn end_offsets(
        &self,
        ctx: &Ctx,
        topic: &str,
        partitions: &[i32],
    ) -> Result<BTreeMap<i32, i64>, ControlError> {
        let mut wait = Duration::from_millis(50);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.end_offsets_once(ctx, topic, partitions).await {
                Ok(o) => return Ok(o),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(topic, error = %e, "ListOffsets retry");
                    let v = ctx.topology().load().version;
                    ctx.topology().refresh_after(v, wait).await;
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn end_offsets_once(
        &self,
        ctx: &Ctx,
        topic: &str,
        partitions: &[i32],
    ) -> Result<BTreeMap<i32, i64>, ControlError> {
        let topo = ctx.topology().load();
        let mut by_leader: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
        for p in partitions {
            let leader = topo
                .leader(topic, *p)
                .ok_or_else(|| ControlError::Kafka(format!("{topic}-{p} has no leader")))?;
            by_leader.entry(leader).or_default().push(*p);
        }
        let mut out = BTreeMap::new();
        for (broker, parts) in by_leader {
            let req = ListOffsetsRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_topics(vec![
                    ListOffsetsTopic::default()
                        .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                        .with_partitions(
                            parts
                                .iter()
                                .map(|p| {
                                    ListOffsetsPartition::default()
                                        .with_partition_index(*p)
                                        .with_timestamp(-1)
                                })
                                .collect(),
                        ),
                ]);
            let resp: ListOffsetsResponse = ctx
                .pool
                .call(broker, 0, ApiKey::ListOffsets, 7, None, &req)
                .await?;
            for t in resp.topics {
                for p in t.partitions {
                    if p.error_code != 0 {
                        ctx.topology().request_refresh();
                        return Err(ControlError::Kafka(format!(
                            "ListOffsets {topic}-{}: error {}",
                            p.partition_index, p.error_code
                        )));
                    }
                    out.insert(p.partition_index, p.offset);
                }
            }
        }
        Ok(out)
    }

    fn current(&self, ctx: &Ctx, topic: &str) -> Result<(TopicConfig, ShardMap), ControlError> {
        let m = ctx
            .shards
            .get(topic)
            .ok_or_else(|| ControlError::UnknownTopic(topic.to_string()))?;
        Ok((m.config.clone(), m.map.clone()))
    }

    async fn commit(
        &self,
        ctx: &Ctx,
        config: &TopicConfig,
        map: &ShardMap,
        expected: u64,
    ) -> Result<(), ControlError> {
        self.store
            .put_topic(
                &StoredTopic {
                    config: config.clone(),
                    map: map.clone(),
                },
                Some(expected),
            )
            .await?;
        ctx.shards.install(config.clone(), map.clone());
        Ok(())
    }

    /// What placement sees of the topic's pool partitions: leaders and in-sync replicas from
    /// the topology, consumer load from the groups' assignments.
    fn partition_views(&self, ctx: &Ctx, map: &ShardMap) -> HashMap<i32, PartitionView> {
        let topo = ctx.topology().load();
        let active: Vec<i32> = map.active().iter().map(|s| s.partition).collect();
        let consumers = ctx.groups.consumer_loads(&map.topic, &active);
        let info = topo.topics.get(map.topic.as_bytes());
        (0..map.pool)
            .map(|p| {
                let pi = info.and_then(|t| t.partitions.get(p as usize));
                (
                    p,
                    PartitionView {
                        leader: pi.map(|i| i.leader).filter(|l| *l >= 0),
                        isr: pi.map(|i| i.isr.clone()).unwrap_or_default(),
                        consumer_load: consumers.get(&p).copied().unwrap_or(0),
                    },
                )
            })
            .collect()
    }

    /// The idle partition for a new shard: the one whose upstream leader and whose consumer
    /// carry the fewest active shards of this topic.
    fn place(&self, ctx: &Ctx, map: &ShardMap) -> Result<i32, ControlError> {
        let active: Vec<i32> = map.active().iter().map(|s| s.partition).collect();
        placement::pick_idle(
            &map.idle_partitions(),
            &active,
            &self.partition_views(ctx, map),
        )
        .ok_or(ControlError::Map(MapError::PoolExhausted(map.pool)))
    }

    /// Moves the leadership of one active shard partition off the busiest broker when active
    /// shards pile up there: its replicas are reordered (AlterPartitionReassignments, same
    /// replica set, so no data moves) to make an in-sync replica on a less loaded broker the
    /// preferred leader, then a preferred election runs (ElectLeaders).
    pub async fn balance_leaders(
        &self,
        ctx: &Ctx,
        topic: &str,
    ) -> Result<Option<String>, ControlError> {
        let (_, map) = self.current(ctx, topic)?;
        let active: Vec<i32> = map.active().iter().map(|s| s.partition).collect();
        let view = self.partition_views(ctx, &map);
        let topo = ctx.topology().load();
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
        let mut replicas = info.replicas.clone();
        replicas.retain(|b| *b != to);
        replicas.insert(0, to);
        let broker = topo.any_broker(0).ok_or(UpstreamError::NoBroker)?;
        let name = TopicName(StrBytes::from_string(topic.to_string()));
        let req = AlterPartitionReassignmentsRequest::default()
            .with_timeout_ms(30_000)
            .with_topics(vec![
                ReassignableTopic::default()
                    .with_name(name.clone())
                    .with_partitions(vec![
                        ReassignablePartition::default()
                            .with_partition_index(partition)
                            .with_replicas(Some(replicas.iter().map(|b| BrokerId(*b)).collect())),
                    ]),
            ]);
        let resp: AlterPartitionReassignmentsResponse = ctx
            .pool
            .call(
                broker,
                0,
                ApiKey::AlterPartitionReassignments,
                0,
                None,
                &req,
            )
            .await?;
        let code = resp
            .responses
            .iter()
            .flat_map(|t| &t.partitions)
            .map(|p| p.error_code)
            .find(|c| *c != 0)
            .unwrap_or(resp.error_code);
        if code != 0 {
            return Err(ControlError::Kafka(format!(
                "AlterPartitionReassignments {topic}/{partition} to {replicas:?}: error {code}"
            )));
        }
        // The preferred election needs the controller to have the new order; it is applied at
        // once for a reorder, but the broker may still answer "not available" for a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let req = ElectLeadersRequest::default()
                .with_election_type(0)
                .with_timeout_ms(10_000)
                .with_topic_partitions(Some(vec![
                    TopicPartitions::default()
                        .with_topic(name.clone())
                        .with_partitions(vec![partition]),
                ]));
            let resp: ElectLeadersResponse = ctx
                .pool
                .call(broker, 0, ApiKey::ElectLeaders, 2, None, &req)
                .await?;
            // 84 ELECTION_NOT_NEEDED: the preferred replica leads already.
            let code = resp
                .replica_election_results
                .iter()
                .flat_map(|r| &r.partition_result)
                .map(|p| p.error_code)
                .find(|c| *c != 0 && *c != 84)
                .unwrap_or(if resp.error_code == 84 {
                    0
                } else {
                    resp.error_code
                });
            if code == 0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(ControlError::Kafka(format!(
                    "ElectLeaders {topic}/{partition}: error {code}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        ctx.topology().request_refresh();
        metrics::counter!("shardgate_leader_moves_total", "topic" => topic.to_string())
            .increment(1);
        Ok(Some(format!(
            "partition {partition}: leader {} -> {to} (active shards of the topic per broker were uneven)",
            info.leader
        )))
    }

    pub async fn split(
        &self,
        ctx: &Ctx,
        topic: &str,
        shard: u32,
        at: Option<u128>,
        reason: &'static str,
    ) -> Result<ShardMap, ControlError> {
        let started = Instant::now();
        let _op = self.ops.lock().await;
        let (config, map) = self.current(ctx, topic)?;
        if map.active().len() as u32 >= config.max_shards() {
            return Err(ControlError::Bounds {
                min: config.autoscale.min_shards,
                max: config.max_shards(),
            });
        }
        let s = map.shard(shard)?.clone();
        let at = match at {
            Some(a) => a,
            None => weighted_median(&mut ctx.shards.samples_in(topic, s.start, s.end), &s),
        };
        let map = match self.place(ctx, &map) {
            Err(ControlError::Map(MapError::PoolExhausted(_))) if config.max_pool > map.pool => {
                self.grow_pool(ctx, &config, &map).await?
            }
            other => {
                other?;
                map
            }
        };
        let to = self.place(ctx, &map)?;
        let mut next = map.split(shard, at, to)?;
        let from = self.end_offsets(ctx, topic, &[to]).await?[&to];
        if let Some(g) = next.gates.last_mut() {
            g.from_offset = Some(from);
        }
        self.commit(ctx, &config, &next, map.epoch).await?;
        let sealed = self.seal(ctx, &config, next).await?;
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
        ctx: &Ctx,
        topic: &str,
        a: u32,
        b: u32,
        reason: &'static str,
    ) -> Result<ShardMap, ControlError> {
        let started = Instant::now();
        let _op = self.ops.lock().await;
        let (config, map) = self.current(ctx, topic)?;
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
        let from = self.end_offsets(ctx, topic, &[gate_partition]).await?[&gate_partition];
        if let Some(g) = next.gates.last_mut() {
            g.from_offset = Some(from);
        }
        self.commit(ctx, &config, &next, map.epoch).await?;
        let sealed = self.seal(ctx, &config, next).await?;
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
    async fn seal(
        &self,
        ctx: &Ctx,
        config: &TopicConfig,
        map: ShardMap,
    ) -> Result<ShardMap, ControlError> {
        if map.sealing().next().is_none() {
            return Ok(map);
        }
        let deadline =
            Instant::now() + Duration::from_millis(ctx.settings.raw.upstream.request_timeout_ms);
        while ctx.shards.inflight_before(&map.topic, map.epoch) > 0 {
            if Instant::now() > deadline {
                return Err(ControlError::Kafka(
                    "produce requests of the old epoch did not finish; the seal is retried later"
                        .into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Every live instance must route by this epoch with nothing older in flight.
        loop {
            match self.store.instances().await? {
                None => break,
                Some(list) => {
                    let lagging: Vec<i32> = list
                        .iter()
                        .filter(|i| i.applied.get(&map.topic).is_none_or(|e| *e < map.epoch))
                        .map(|i| i.node_id)
                        .collect();
                    if lagging.is_empty() {
                        break;
                    }
                    if Instant::now() > deadline {
                        return Err(ControlError::Kafka(format!(
                            "instances {lagging:?} have not applied epoch {}; the seal is retried later",
                            map.epoch
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
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
        let ends = self.end_offsets(ctx, &map.topic, &parents).await?;
        let mut next = map.clone();
        next.epoch += 1;
        for g in &mut next.gates {
            for a in &mut g.after {
                if a.seal_offset.is_none() {
                    a.seal_offset = ends.get(&a.partition).copied();
                }
            }
        }
        self.commit(ctx, config, &next, map.epoch).await?;
        Ok(next)
    }

    /// Periodic work of the leader: finish interrupted seals, drop gates every group passed,
    /// sample rates and decide splits and merges.
    pub async fn run(self: Arc<Self>, ctx: Arc<Ctx>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut last_sample: HashMap<String, Instant> = HashMap::new();
        let mut last_balance: HashMap<String, Instant> = HashMap::new();
        let mut last_check = Instant::now();
        loop {
            tick.tick().await;
            if self.is_leader() && last_check.elapsed() >= Duration::from_secs(5) {
                last_check = Instant::now();
                self.republish(&ctx).await;
            }
            for m in ctx.shards.all() {
                let topic = m.config.name.clone();
                export_map_metrics(&ctx, &topic);
                if !self.is_leader() {
                    continue;
                }
                if m.map.sealing().next().is_some() {
                    let _op = self.ops.lock().await;
                    if let Ok((config, map)) = self.current(&ctx, &topic)
                        && let Err(e) = self.seal(&ctx, &config, map).await
                    {
                        tracing::warn!(topic, error = %e, "seal pending");
                    }
                }
                if let Err(e) = self.retire_gates(&ctx, &topic).await {
                    tracing::warn!(topic, error = %e, "gate cleanup failed");
                }
                let balance = m.config.autoscale.balance_interval_secs;
                if balance > 0
                    && last_balance
                        .get(&topic)
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(balance))
                {
                    last_balance.insert(topic.clone(), Instant::now());
                    match self.balance_leaders(&ctx, &topic).await {
                        Ok(Some(detail)) => {
                            tracing::info!(topic, reason = "leader_balance", %detail, "placement acted")
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!(topic, error = %e, "leader balancing failed"),
                    }
                }
                let every = Duration::from_millis(m.config.autoscale.sample_interval_ms);
                if last_sample.get(&topic).is_none_or(|t| t.elapsed() >= every) {
                    last_sample.insert(topic.clone(), Instant::now());
                    match self.evaluate(&ctx, &topic).await {
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

    /// A store that lost maps (a Consul agent restarted without its data) is refilled from the
    /// maps the instances still route by, so check-and-set writes can go on.
    async fn republish(&self, ctx: &Ctx) {
        let stored = match self.store.load_topics().await {
            Ok(s) => s,
            Err(_) => return,
        };
        for m in ctx.shards.all() {
            if stored.iter().any(|t| t.config.name == m.config.name) {
                continue;
            }
            let _op = self.ops.lock().await;
            let t = StoredTopic {
                config: m.config.clone(),
                map: m.map.clone(),
            };
            match self.store.put_topic(&t, None).await {
                Ok(()) => {
                    tracing::warn!(topic = %m.config.name, epoch = m.map.epoch, "shard store had lost the map; republished it")
                }
                Err(e) => {
                    tracing::warn!(topic = %m.config.name, error = %e, "republishing a lost map failed")
                }
            }
        }
    }

    async fn retire_gates(&self, ctx: &Ctx, topic: &str) -> Result<(), ControlError> {
        let Some(m) = ctx.shards.get(topic) else {
            return Ok(());
        };
        let retention_ms = m.config.autoscale.gate_retention_secs.saturating_mul(1000);
        let now = super::map::now_ms();
        let done: Vec<(i32, u64)> = m
            .map
            .gates
            .iter()
            .filter(|g| g.from_offset.is_some() && g.after.iter().all(|a| a.seal_offset.is_some()))
            .filter(|g| now.saturating_sub(g.created_at_ms) >= retention_ms)
            .filter(|g| ctx.groups.all_groups_passed(topic, g))
            .map(|g| (g.partition, g.created_epoch))
            .collect();
        if done.is_empty() {
            return Ok(());
        }
        let _op = self.ops.lock().await;
        let (config, map) = self.current(ctx, topic)?;
        let mut next = map.clone();
        next.gates
            .retain(|g| !done.contains(&(g.partition, g.created_epoch)));
        if next.gates.len() == map.gates.len() {
            return Ok(());
        }
        next.epoch += 1;
        self.commit(ctx, &config, &next, map.epoch).await?;
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

    /// One autoscaler step for `topic`: sample end offsets, update the moving averages, and
    /// split or merge when a threshold held long enough.
    pub async fn evaluate(&self, ctx: &Ctx, topic: &str) -> Result<Option<Decision>, ControlError> {
        let (config, map) = self.current(ctx, topic)?;
        let a = config.autoscale.clone();
        let active: Vec<_> = map.active().into_iter().cloned().collect();
        let parts: Vec<i32> = active.iter().map(|s| s.partition).collect();
        let ends = self.end_offsets(ctx, topic, &parts).await?;
        // Bytes and lag are best effort: without them the records rate still decides.
        let sizes = sampler::log_sizes(&ctx.pool, topic, &parts)
            .await
            .inspect_err(|e| {
                tracing::debug!(topic, error = %e, "log sizes not sampled");
                metrics::counter!("shardgate_autoscaler_sample_errors_total", "measure" => "bytes")
                    .increment(1);
            })
            .ok();
        let committed = if a.split_lag_records > 0 {
            sampler::group_offsets(&ctx.pool, topic, &parts)
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
                let labels = [("topic", topic.to_string()), ("shard", s.id.to_string())];
                if let Some((t0, o0)) = st.last_offset {
                    let dt = now.duration_since(t0).as_secs_f64().max(0.001);
                    let rate = (end - o0).max(0) as f64 / dt;
                    st.fast = ema(st.fast, rate, 0.6);
                    st.slow = ema(st.slow, rate, 0.1);
                    metrics::gauge!("shardgate_shard_records_per_second", &labels).set(st.fast);
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
                        metrics::gauge!("shardgate_shard_bytes_per_second", &labels)
                            .set(st.bytes_fast);
                    }
                    st.last_size = Some((now, *size));
                }
                if let Some(c) = &committed {
                    let lag = c
                        .get(&s.partition)
                        .map(|groups| {
                            groups
                                .iter()
                                .map(|(_, o)| (end - o).max(0))
                                .max()
                                .unwrap_or(0)
                        })
                        .unwrap_or(0);
                    if lag > st.lag && lag > 0 {
                        st.lag_rising_since.get_or_insert(now);
                    } else {
                        st.lag_rising_since = None;
                    }
                    st.lag = lag;
                    metrics::gauge!("shardgate_shard_consumer_lag", &labels).set(lag as f64);
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
        let last_change = self.cooldown.lock().expect("cooldown").get(topic).copied();
        let since_change = last_change
            .map(|t| now.duration_since(t))
            .unwrap_or(Duration::MAX);
        if let Some((id, measure, value, limit, held)) = hot
            && since_change >= Duration::from_secs(a.split_cooldown_secs)
            && (active.len() as u32) < config.max_shards()
            && (!map.idle_partitions().is_empty() || config.max_pool > map.pool)
        {
            let s = map.shard(id)?.clone();
            let samples = ctx.shards.samples_in(topic, s.start, s.end);
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
            self.stats
                .lock()
                .expect("stats")
                .retain(|(t, _), _| t != topic);
            self.split(ctx, topic, id, at, reason).await?;
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
                    match self.merge(ctx, topic, w[0].id, w[1].id, "cold").await {
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

/// Gauges describing the map, for the Grafana shard view.
fn export_map_metrics(ctx: &Ctx, topic: &str) {
    let Some(m) = ctx.shards.get(topic) else {
        return;
    };
    metrics::gauge!("shardgate_shard_map_epoch", "topic" => topic.to_string())
        .set(m.map.epoch as f64);
    metrics::gauge!("shardgate_shards_active", "topic" => topic.to_string())
        .set(m.active().len() as f64);
    for s in m.active() {
        metrics::gauge!(
            "shardgate_shard_range_start_fraction",
            "topic" => topic.to_string(),
            "shard" => s.id.to_string(),
            "partition" => s.partition.to_string()
        )
        .set(s.start as f64 / HASH_END as f64);
    }
    for g in &m.map.gates {
        let sealed = g.from_offset.is_some() && g.after.iter().all(|a| a.seal_offset.is_some());
        let closed = !sealed || !ctx.groups.all_groups_passed(topic, g);
        metrics::gauge!("shardgate_gate_closed", "topic" => topic.to_string(), "partition" => g.partition.to_string())
            .set(if closed { 1.0 } else { 0.0 });
    }
}
