//! One snapshot of the upstream cluster (brokers, partition leaders, topic ids, API versions),
//! swapped atomically. Every connection reads the same snapshot; errors that mean "stale
//! leader" ask the refresher (`refresh.rs`) for a new one.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use kafka_protocol::messages::{ApiVersionsResponse, MetadataResponse};
use kafka_protocol::protocol::{StrBytes, VersionRange};
use tokio::sync::{Notify, watch};
use uuid::Uuid;

use crate::config::HostPort;
use crate::protocol::codes::UNKNOWN_TOPIC_OR_PARTITION;

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

    /// A broker for requests that any broker can serve, picked by `salt` so callers spread.
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

    /// Resolves when someone asked for a refresh (the refresher waits on it).
    pub async fn refresh_requested(&self) {
        self.refresh_wanted.notified().await
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
                if t.error_code == UNKNOWN_TOPIC_OR_PARTITION {
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

    pub(super) fn set_api_versions(&self, resp: &ApiVersionsResponse) {
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
