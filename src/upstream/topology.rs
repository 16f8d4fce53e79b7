//! One snapshot of the upstream cluster (brokers, partition leaders, topic ids, API versions),
//! swapped atomically. Every connection reads the same snapshot; errors that mean "stale
//! leader" ask the refresher for a new one.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, MetadataRequest, MetadataResponse,
};
use kafka_protocol::protocol::{StrBytes, VersionRange};
use tokio::sync::{Notify, watch};
use uuid::Uuid;

use super::UpstreamError;
use super::pool::{Pool, bootstrap_id};
use crate::config::HostPort;

#[derive(Debug, Clone)]
pub struct PartitionInfo {
    pub leader: i32,
    pub leader_epoch: i32,
    /// Replica broker ids, preferred leader first.
    pub replicas: Vec<i32>,
    pub isr: Vec<i32>,
}

#[derive(Debug, Clone)]
pub struct TopicInfo {
    pub id: Uuid,
    /// Indexed by partition number.
    pub partitions: Vec<PartitionInfo>,
}

#[derive(Debug, Default)]
pub struct Topology {
    pub version: u64,
    pub cluster_id: Option<StrBytes>,
    pub controller_id: i32,
    pub brokers: BTreeMap<i32, HostPort>,
    pub topics: HashMap<StrBytes, TopicInfo>,
    pub topic_names: HashMap<Uuid, StrBytes>,
    /// What the upstream brokers support, by api key.
    pub api_versions: HashMap<i16, VersionRange>,
    /// The full upstream answer, for its feature levels.
    pub api_versions_response: Option<Arc<ApiVersionsResponse>>,
    pub refreshed_at: Option<Instant>,
}

impl Topology {
    pub fn leader(&self, topic: &str, partition: i32) -> Option<i32> {
        let p = self
            .topics
            .get(topic.as_bytes())?
            .partitions
            .get(partition as usize)?;
        (p.leader >= 0).then_some(p.leader)
    }

    pub fn topic_name(&self, id: &Uuid) -> Option<&StrBytes> {
        self.topic_names.get(id)
    }

    /// A broker to send requests that any broker can serve, preferring the controller.
    pub fn any_broker(&self, salt: u64) -> Option<i32> {
        if self.brokers.is_empty() {
            return None;
        }
        let i = (salt % self.brokers.len() as u64) as usize;
        self.brokers.keys().nth(i).copied()
    }
}

pub struct TopologyHandle {
    current: ArcSwap<Topology>,
    refresh_wanted: Notify,
    version_tx: watch::Sender<u64>,
}

impl Default for TopologyHandle {
    fn default() -> Self {
        Self::new()
    }
}

impl TopologyHandle {
    pub fn new() -> Self {
        Self {
            current: ArcSwap::from_pointee(Topology::default()),
            refresh_wanted: Notify::new(),
            version_tx: watch::channel(0).0,
        }
    }

    pub fn load(&self) -> Arc<Topology> {
        self.current.load_full()
    }

    /// Asks for a refresh without waiting for it.
    pub fn request_refresh(&self) {
        self.refresh_wanted.notify_one();
    }

    /// Asks for a refresh and waits (bounded) until a snapshot newer than `seen` exists.
    pub async fn refresh_after(&self, seen: u64, wait: Duration) {
        let mut rx = self.version_tx.subscribe();
        self.request_refresh();
        let _ = tokio::time::timeout(wait, rx.wait_for(|v| *v > seen)).await;
    }

    /// Folds a Metadata response (from a refresh or from a client's request) into a new snapshot.
    /// `full` means the response lists every topic, so topics missing from it are gone.
    pub fn absorb(&self, resp: &MetadataResponse, full: bool) {
        let old = self.load();
        let mut brokers = BTreeMap::new();
        for b in &resp.brokers {
            brokers.insert(
                b.node_id.0,
                HostPort {
                    host: b.host.to_string(),
                    port: b.port as u16,
                },
            );
        }
        if brokers.is_empty() {
            brokers = old.brokers.clone();
        }
        let mut topics = if full {
            HashMap::new()
        } else {
            old.topics.clone()
        };
        for t in &resp.topics {
            let Some(name) = &t.name else { continue };
            if t.error_code != 0 {
                if t.error_code == crate::protocol::codes::UNKNOWN_TOPIC_OR_PARTITION {
                    topics.remove(&name.0);
                }
                continue;
            }
            let n = t
                .partitions
                .iter()
                .map(|p| p.partition_index + 1)
                .max()
                .unwrap_or(0)
                .max(0) as usize;
            let mut parts = vec![
                PartitionInfo {
                    leader: -1,
                    leader_epoch: -1,
                    replicas: vec![],
                    isr: vec![],
                };
                n
            ];
            for p in &t.partitions {
                if p.partition_index >= 0 {
                    parts[p.partition_index as usize] = PartitionInfo {
                        leader: p.leader_id.0,
                        leader_epoch: p.leader_epoch,
                        replicas: p.replica_nodes.iter().map(|b| b.0).collect(),
                        isr: p.isr_nodes.iter().map(|b| b.0).collect(),
                    };
                }
            }
            topics.insert(
                name.0.clone(),
                TopicInfo {
                    id: t.topic_id,
                    partitions: parts,
                },
            );
        }
        let topic_names = topics
            .iter()
            .filter(|(_, t)| !t.id.is_nil())
            .map(|(n, t)| (t.id, n.clone()))
            .collect();
        let version = old.version + 1;
        self.current.store(Arc::new(Topology {
            version,
            cluster_id: resp.cluster_id.clone().or_else(|| old.cluster_id.clone()),
            controller_id: resp.controller_id.0,
            brokers,
            topics,
            topic_names,
            api_versions: old.api_versions.clone(),
            api_versions_response: old.api_versions_response.clone(),
            refreshed_at: if full {
                Some(Instant::now())
            } else {
                old.refreshed_at
            },
        }));
        self.version_tx.send_replace(version);
    }

    fn set_api_versions(&self, resp: &ApiVersionsResponse) {
        let old = self.load();
        let api_versions = resp
            .api_keys
            .iter()
            .map(|k| {
                (
                    k.api_key,
                    VersionRange {
                        min: k.min_version,
                        max: k.max_version,
                    },
                )
            })
            .collect();
        let version = old.version + 1;
        self.current.store(Arc::new(Topology {
            version,
            cluster_id: old.cluster_id.clone(),
            controller_id: old.controller_id,
            brokers: old.brokers.clone(),
            topics: old.topics.clone(),
            topic_names: old.topic_names.clone(),
            api_versions,
            api_versions_response: Some(Arc::new(resp.clone())),
            refreshed_at: old.refreshed_at,
        }));
        self.version_tx.send_replace(version);
    }
}

/// The Metadata version shardgate uses for its own refreshes.
fn metadata_version(t: &Topology) -> i16 {
    t.api_versions
        .get(&(ApiKey::Metadata as i16))
        .map(|r| r.max.min(12))
        .unwrap_or(9)
}

/// Refreshes the whole topology from some reachable broker: known brokers first, then the
/// bootstrap list, so a cluster whose brokers all changed address is still found.
pub async fn refresh_once(pool: &Pool) -> Result<(), UpstreamError> {
    let topo = pool.topology.load();
    let mut candidates: Vec<i32> = topo.brokers.keys().copied().collect();
    candidates.extend((0..pool.bootstrap_len()).map(bootstrap_id));
    let mut last_err = UpstreamError::NoBroker;
    for broker in candidates {
        if topo.api_versions.is_empty() {
            let req = ApiVersionsRequest::default()
                .with_client_software_name(StrBytes::from_static_str("shardgate"))
                .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
            match pool
                .call::<_, ApiVersionsResponse>(broker, 0, ApiKey::ApiVersions, 3, None, &req)
                .await
            {
                Ok(resp) if resp.error_code == 0 => pool.topology.set_api_versions(&resp),
                Ok(resp) => {
                    last_err =
                        UpstreamError::Protocol(format!("ApiVersions error {}", resp.error_code));
                    continue;
                }
                Err(e) => {
                    last_err = e;
                    continue;
                }
            }
        }
        let version = metadata_version(&pool.topology.load());
        let req = MetadataRequest::default()
            .with_topics(None)
            .with_allow_auto_topic_creation(false);
        match pool
            .call::<_, MetadataResponse>(broker, 0, ApiKey::Metadata, version, None, &req)
            .await
        {
            Ok(resp) => {
                pool.topology.absorb(&resp, true);
                return Ok(());
            }
            Err(e) => last_err = e,
        }
    }
    Err(last_err)
}

/// Background task: refreshes on request (coalescing bursts) and periodically.
pub async fn run_refresher(pool: Arc<Pool>, every: Duration) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match refresh_once(&pool).await {
            Ok(()) => {
                backoff = Duration::from_millis(100);
                metrics::counter!("shardgate_topology_refreshes_total", "result" => "ok")
                    .increment(1);
                tokio::select! {
                    _ = pool.topology.refresh_wanted.notified() => {}
                    _ = tokio::time::sleep(every) => {}
                }
            }
            Err(e) => {
                metrics::counter!("shardgate_topology_refreshes_total", "result" => "error")
                    .increment(1);
                tracing::warn!(error = %e, retry_ms = backoff.as_millis() as u64, "topology refresh failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
