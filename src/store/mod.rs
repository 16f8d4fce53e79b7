//! Where shard maps live: the `ShardStore` trait with an embedded file store (one instance, the
//! default) and Consul (several instances). The store keeps versioned JSON documents by key and
//! knows nothing of what they mean (`shards::stored` turns maps into documents); writes are
//! check-and-set on the version, so two writers can never interleave a split and a merge.

pub mod consul;
pub mod embedded;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// One stored document (one managed topic's configuration and map).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    /// Name within the store's namespace (a topic name).
    pub key: String,
    /// The writer's version of the value (a map epoch); `put` is check-and-set on it.
    pub version: u64,
    pub value: serde_json::Value,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("shard store unreachable: {0}")]
    Unavailable(String),
    #[error("{key} changed concurrently (expected version {expected:?}, found {found:?}); retry")]
    Conflict {
        key: String,
        expected: Option<u64>,
        found: Option<u64>,
    },
    #[error("stored document {key} is corrupt: {message}")]
    Corrupt { key: String, message: String },
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
    /// Per managed topic with a seal pending, per parent partition: the end of what this
    /// instance's writer had acknowledged there, read after it applied the epoch above (so it
    /// covers every record it wrote under older epochs). The seal offset is at least this.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub acked: BTreeMap<String, BTreeMap<i32, i64>>,
}

pub trait ShardStore: Send + Sync {
    /// Every stored document, sorted by key.
    fn load_all(&self) -> BoxFuture<'_, Result<Vec<Document>, StoreError>>;
    /// Writes `doc` if the stored version is `expected` (`None`: the key must not exist yet).
    fn put<'a>(
        &'a self,
        doc: &'a Document,
        expected: Option<u64>,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    fn describe(&self) -> String;

    /// Waits (bounded) until the stored documents change after `index`, then returns the new
    /// index and every document. The embedded store has no other writer, so it only times out.
    fn watch(&self, index: u64) -> BoxFuture<'_, Result<(u64, Vec<Document>), StoreError>> {
        async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok((index, self.load_all().await?))
        }
        .boxed()
    }

    /// Waits (bounded) until the text at `key` (a document outside the shard maps, e.g.
    /// `security/credentials`) changes after `index` (0: answer at once); the new index and
    /// the text (None: no such key). Only a shared store has such documents.
    fn watch_text<'a>(
        &'a self,
        key: &'a str,
        _index: u64,
    ) -> BoxFuture<'a, Result<(u64, Option<String>), StoreError>> {
        async move {
            Err(StoreError::Unavailable(format!(
                "{key} is kept only in the Consul store"
            )))
        }
        .boxed()
    }

    /// How long the store keeps this instance's session after its last renewal; `None`: no
    /// sessions (one instance). With sessions, managed writes are fenced when it may be lost.
    fn session_ttl(&self) -> Option<Duration> {
        None
    }

    /// How many sessions this instance has had: a change means the previous one was lost.
    fn session_generation(&self) -> u64 {
        0
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
