//! Where shard maps live: the `ShardStore` trait with an embedded file store (one instance, the
//! default) and Consul (several instances). Writes are check-and-set on the map's epoch, so two
//! writers can never interleave a split and a merge.

pub mod consul;
pub mod embedded;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::shards::{ShardMap, TopicConfig};

/// One managed topic as stored: its configuration and its current map.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredTopic {
    pub config: TopicConfig,
    pub map: ShardMap,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("shard store unreachable: {0}")]
    Unavailable(String),
    #[error(
        "topic {topic} changed concurrently (expected epoch {expected:?}, found {found:?}); retry"
    )]
    Conflict {
        topic: String,
        expected: Option<u64>,
        found: Option<u64>,
    },
    #[error("stored map of {topic} is corrupt: {message}")]
    Corrupt { topic: String, message: String },
}

/// One shardgate instance as registered in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub node_id: i32,
    pub advertised: String,
    /// Admin HTTP address (`http://host:port`), used to forward admin requests to the leader.
    pub admin: String,
    /// Per managed topic: the newest map epoch this instance routes by and has no produce
    /// request of an older epoch in flight for (the seal protocol waits for every instance).
    #[serde(default)]
    pub applied: BTreeMap<String, u64>,
}

pub trait ShardStore: Send + Sync {
    /// Every stored topic.
    fn load_all(&self) -> BoxFuture<'_, Result<Vec<StoredTopic>, StoreError>>;
    /// Writes `topic` if the stored epoch is `expected` (`None`: the topic must not exist yet).
    fn put<'a>(
        &'a self,
        topic: &'a StoredTopic,
        expected: Option<u64>,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    fn describe(&self) -> String;

    /// Waits (bounded) until the stored topics change after `index`, then returns the new
    /// index and every topic. The embedded store has no other writer, so it only times out.
    fn watch(&self, index: u64) -> BoxFuture<'_, Result<(u64, Vec<StoredTopic>), StoreError>> {
        async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok((index, self.load_all().await?))
        }
        .boxed()
    }

    /// Whether instances elect a leader through this store (else this instance always leads).
    fn elects(&self) -> bool {
        false
    }

    /// Tries to become (or stay) the leader; `Ok(true)` while this instance leads.
    fn campaign<'a>(&'a self, _me: &'a InstanceInfo) -> BoxFuture<'a, Result<bool, StoreError>> {
        async { Ok(true) }.boxed()
    }

    /// Publishes this instance (registry entry bound to its session).
    fn report<'a>(&'a self, _me: &'a InstanceInfo) -> BoxFuture<'a, Result<(), StoreError>> {
        async { Ok(()) }.boxed()
    }

    /// The live instances; `None` where the store has no registry (one instance).
    fn instances(&self) -> BoxFuture<'_, Result<Option<Vec<InstanceInfo>>, StoreError>> {
        async { Ok(None) }.boxed()
    }

    /// The current leader, where the store elects one.
    fn leader(&self) -> BoxFuture<'_, Result<Option<InstanceInfo>, StoreError>> {
        async { Ok(None) }.boxed()
    }
}
