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
mod autoscale;
mod balance;
mod change;
mod follow;
mod kafka_admin;
mod leader;
mod offsets;
mod reassign;
mod reassign_follow;
mod topics;

use autoscale::ShardStats;
pub use autoscale::{Decision, ShardLoad};

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

use super::gates::GroupTracker;
use super::placement::{self, PartitionView};
use super::produce::ManagedProduce;
use super::registry::Registry;
use super::registry::{hottest, weighted_median};
use super::sampler;
use super::stored::{StoredTopic, TopicStore};
use super::{MapError, ShardMap, TopicConfig};
use crate::config::{HostPort, Settings};
use crate::store::{InstanceInfo, ShardStore, StoreError};
use crate::upstream::UpstreamError;
use crate::upstream::pool::{Pool, Socket};

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
    #[error("busy: {0}")]
    Busy(String),
}

impl ControlError {
    /// HTTP status for the admin API.
    pub fn status(&self) -> u16 {
        match self {
            ControlError::UnknownTopic(_) => 404,
            ControlError::AlreadyManaged(_)
            | ControlError::Busy(_)
            | ControlError::Store(StoreError::Conflict { .. }) => 409,
            ControlError::BadConfig { .. } | ControlError::Map(_) | ControlError::Bounds { .. } => {
                400
            }
            ControlError::Store(_) | ControlError::Upstream(_) | ControlError::Kafka(_) => 503,
        }
    }
}

/// The controller's admin calls (CreateTopics, CreatePartitions, reassignments, elections)
/// may be held by the broker up to their timeouts, so they go on a connection of their own,
/// shared with no client (see `proxy/sockets.rs`). Client and writer-lane owner ids count up
/// from 0 and 2^40.
const ADMIN_SOCKET: Socket = Socket::Own(u64::MAX);
/// Their timeout, below the pool's 30 s answer wait so the broker's answer comes first.
const ADMIN_TIMEOUT_MS: i32 = 25_000;

/// What the controller works with, handed over by the composition root (`app`).
pub struct Handles {
    pub settings: Settings,
    pub pool: Arc<Pool>,
    pub shards: Arc<Registry>,
    pub groups: Arc<GroupTracker>,
    pub managed: Arc<ManagedProduce>,
}

pub struct Controller {
    pub store: Arc<dyn ShardStore>,
    settings: Settings,
    pool: Arc<Pool>,
    shards: Arc<Registry>,
    groups: Arc<GroupTracker>,
    managed: Arc<ManagedProduce>,
    /// Live instances of the virtual cluster (node id, advertised address), from the store's
    /// registry; the proxy's cluster view follows it.
    members: tokio::sync::watch::Sender<Vec<(i32, HostPort)>>,
    /// One map change at a time (admin requests and the autoscaler); held across the seal
    /// protocol's awaits on purpose: it guards a multi-step change, not a hot path.
    ops: tokio::sync::Mutex<()>,
    stats: Mutex<HashMap<(String, i32), ShardStats>>,
    cooldown: Mutex<HashMap<String, Instant>>,
    /// Topics with a hot shard the autoscaler may not split, and why (logged on change).
    split_blocked: Mutex<HashMap<String, &'static str>>,
    /// Whether this instance holds the leader lock (always, with the embedded store).
    leader: std::sync::atomic::AtomicBool,
    /// Placement's memory between ticks (imbalance timers, copy progress, recent moves).
    placement: Mutex<reassign::PlacementMemory>,
}

impl Controller {
    pub fn new(store: Arc<dyn ShardStore>, h: Handles) -> Self {
        let leader = std::sync::atomic::AtomicBool::new(!store.elects());
        if let Some(ttl) = store.session_ttl() {
            // Fenced until a session is confirmed and the maps re-read (follow.rs); a stall
            // longer than 60 % of the TTL may have cost the session.
            h.shards.enable_fencing(ttl * 3 / 5);
        }
        Self {
            store,
            settings: h.settings,
            pool: h.pool,
            shards: h.shards,
            groups: h.groups,
            managed: h.managed,
            members: tokio::sync::watch::channel(Vec::new()).0,
            ops: tokio::sync::Mutex::new(()),
            stats: Mutex::new(HashMap::new()),
            cooldown: Mutex::new(HashMap::new()),
            split_blocked: Mutex::new(HashMap::new()),
            leader,
            placement: Mutex::new(Default::default()),
        }
    }

    /// The live instances as the store's registry shows them (empty until first read, and
    /// always with the embedded store).
    pub fn members(&self) -> tokio::sync::watch::Receiver<Vec<(i32, HostPort)>> {
        self.members.subscribe()
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(super) fn current(&self, topic: &str) -> Result<(TopicConfig, ShardMap), ControlError> {
        let m = self
            .shards
            .get(topic)
            .ok_or_else(|| ControlError::UnknownTopic(topic.to_string()))?;
        Ok((m.config.clone(), m.map.clone()))
    }

    pub(super) async fn commit(
        &self,
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
        self.shards.install(config.clone(), map.clone());
        Ok(())
    }
}
