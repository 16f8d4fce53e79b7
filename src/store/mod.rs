//! Where shard maps live: the `ShardStore` trait with an embedded file store (one instance, the
//! default) and Consul (several instances). Writes are check-and-set on the map's epoch, so two
//! writers can never interleave a split and a merge.

pub mod embedded;

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
}
