//! The client side: accept loop, per-connection handling, and one module per request path.
//!
//! - `connection`: framing, concurrency and in-order responses for one client socket.
//! - `cluster`: the virtual cluster (brokers = shardgate instances) and address rewriting.
//! - `produce`, `fetch`, `partitioned`: requests split by upstream partition leader.
//! - `coordinator`: group/transaction APIs forwarded to the real coordinator, admin APIs.

pub mod admin_apis;
pub mod api_versions;
pub mod authorize;
pub mod budget;
pub mod client_fields;
pub mod cluster;
pub mod config_view;
pub mod configs;
pub mod connection;
pub mod coordinator;
pub mod fetch;
pub mod forward;
pub mod metadata;
pub mod multi_group;
pub mod observe;
pub mod partitioned;
pub mod produce;
pub mod quotas;
pub mod rebalance_offsets;
pub mod responses;
pub mod sasl;
pub mod server;
pub mod sockets;

use std::sync::Arc;

use bytes::Bytes;

use crate::config::Settings;
use crate::protocol::ProtocolError;
use crate::shards::gates::GroupTracker;
use crate::shards::produce::ManagedProduce;
use crate::shards::registry::Registry;
use crate::upstream::UpstreamError;
use crate::upstream::pool::Pool;
use crate::upstream::topology::TopologyHandle;

/// What a request handler gives back to the connection's response sequencer.
#[derive(Debug)]
pub enum Reply {
    /// A complete response frame, length prefix included.
    Frame(Bytes),
    /// An upstream response frame (without length prefix) passed on as it is under the
    /// client's correlation id: no copy of its body.
    Forwarded {
        correlation_id: i32,
        upstream: Bytes,
    },
    /// A complete response frame as pieces written in order (length prefix included): record
    /// data stays in the upstream frames it came in.
    Pieces(Vec<Bytes>),
    /// The request has no response (Produce with acks=0).
    Nothing,
    /// Close the connection after the responses before this one (the reason is logged).
    Close(String),
}

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl HandlerError {
    pub fn kind(&self) -> &'static str {
        match self {
            HandlerError::Protocol(e) => e.kind(),
            HandlerError::Upstream(e) => e.kind(),
        }
    }
}

/// Shared state of the proxy, one per process.
pub struct Ctx {
    pub settings: Settings,
    pub cluster: cluster::VirtualCluster,
    pub pool: Arc<Pool>,
    pub coordinators: coordinator::CoordinatorCache,
    /// KIP-227 fetch sessions offered to clients.
    pub fetch_sessions: fetch::session::FetchSessions,
    /// Shard maps of managed topics, as this instance routes them.
    pub shards: Arc<Registry>,
    /// Consumer groups seen on the wire and how far they consumed (for ordering gates).
    pub groups: Arc<GroupTracker>,
    /// Produce to managed topics: rerouting, shardgate's own writer, client retry memory.
    pub managed: Arc<ManagedProduce>,
    /// Bytes held on behalf of clients (requests and responses), bounded.
    pub budget: Arc<budget::MemoryBudget>,
    /// Client ids with a Kafka quota (their requests avoid shared upstream sockets).
    pub quotas: Arc<quotas::ClientQuotas>,
    /// Consumer profiles (group members, their fetch connections, what they consume).
    pub profiles: Arc<crate::prefetch::Profiles>,
    /// Samples delivered records into the profiles (None: prefetch or sampling off).
    pub sampler: Option<crate::prefetch::content::Sampler>,
    /// Reads every connection may take (rebalance pre-reads, partitions several consumers
    /// read).
    pub shared_reads: Arc<fetch::shared::SharedReads>,
    /// Committed offsets read at classic groups' rebalances (`rebalance_offsets`).
    pub offsets_ahead: crate::prefetch::offsets::OffsetsAhead,
    /// SASL on the client listener (None: clients do not authenticate); set by `app`.
    pub sasl: Option<Arc<crate::auth::Authenticator>>,
    /// The ACL rules in force (None: authorization off); replaced when the store's change.
    pub acls: Arc<arc_swap::ArcSwapOption<crate::auth::acl::Authorizer>>,
}

impl Ctx {
    pub fn new(
        settings: Settings,
        pool: Arc<Pool>,
        shards: Arc<Registry>,
        groups: Arc<GroupTracker>,
        managed: Arc<ManagedProduce>,
        profiles: Arc<crate::prefetch::Profiles>,
        sampler: Option<crate::prefetch::content::Sampler>,
    ) -> Self {
        let settings_acls = settings.authorization.acls.clone();
        let shared_reads = Arc::new(fetch::shared::SharedReads::new(
            std::time::Duration::from_millis(settings.raw.prefetch.ttl_ms),
            settings.raw.prefetch.max_bytes,
            settings.raw.prefetch.share_reads,
        ));
        Self {
            fetch_sessions: fetch::session::FetchSessions::new(
                settings.raw.limits.max_fetch_sessions,
            ),
            managed,
            budget: budget::MemoryBudget::new(settings.raw.limits.memory_budget_bytes),
            quotas: Arc::default(),
            cluster: cluster::VirtualCluster::new(settings.node_id, settings.instances.clone()),
            settings,
            pool,
            coordinators: coordinator::CoordinatorCache::default(),
            shards,
            groups,
            profiles,
            sampler,
            shared_reads,
            offsets_ahead: Default::default(),
            sasl: None,
            acls: Arc::new(arc_swap::ArcSwapOption::new(settings_acls)),
        }
    }

    pub fn topology(&self) -> &TopologyHandle {
        &self.pool.topology
    }
}
