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
    /// What every live upstream broker supports (the intersection of their answers), by api
    /// key. During a rolling upgrade the oldest broker bounds it.
    pub api_versions: HashMap<i16, VersionRange>,
    /// The answer whose feature levels are passed through (highest finalized epoch).
    pub api_versions_response: Option<Arc<ApiVersionsResponse>>,
    /// Each live broker's own ApiVersions answer, by broker id.
    pub broker_api_versions: BTreeMap<i32, Arc<ApiVersionsResponse>>,
    /// An answer from a bootstrap address (broker id not known yet): used only until a live
    /// broker has answered.
    pub seed_api_versions: Option<Arc<ApiVersionsResponse>>,
    pub refreshed_at: Option<Instant>,
}

/// The version ranges every answer supports: an API missing from one answer is dropped, the
/// highest minimum and the lowest maximum are kept, and an empty range is dropped.
pub fn intersect<'a>(
    answers: impl IntoIterator<Item = &'a ApiVersionsResponse>,
) -> HashMap<i16, VersionRange> {
    let mut out: Option<HashMap<i16, VersionRange>> = None;
    for a in answers {
        let ranges: HashMap<i16, VersionRange> = a
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
        out = Some(match out {
            None => ranges,
            Some(acc) => acc
                .into_iter()
                .filter_map(|(api, r)| ranges.get(&api).map(|o| (api, r.intersect(o))))
                .collect(),
        });
    }
    let mut out = out.unwrap_or_default();
    out.retain(|_, r| !r.is_empty());
    out
}

/// What the API-version fields of a snapshot are, given its brokers and the answers held:
/// (intersection, feature answer, answers of live brokers kept).
fn api_view(
    brokers: &BTreeMap<i32, HostPort>,
    answers: &BTreeMap<i32, Arc<ApiVersionsResponse>>,
    seed: Option<&Arc<ApiVersionsResponse>>,
) -> ApiView {
    let live: BTreeMap<i32, Arc<ApiVersionsResponse>> = answers
        .iter()
        .filter(|(id, _)| brokers.contains_key(id))
        .map(|(id, a)| (*id, a.clone()))
        .collect();
    let used: Vec<&Arc<ApiVersionsResponse>> = if live.is_empty() {
        seed.into_iter().collect()
    } else {
        live.values().collect()
    };
    let ranges = intersect(used.iter().map(|a| a.as_ref()));
    let features = used
        .iter()
        .max_by_key(|a| a.finalized_features_epoch)
        .map(|a| (*a).clone());
    metrics::gauge!("shardgate_upstream_api_versions_brokers").set(live.len() as f64);
    ApiView {
        ranges,
        features,
        live,
    }
}

struct ApiView {
    ranges: HashMap<i16, VersionRange>,
    features: Option<Arc<ApiVersionsResponse>>,
    live: BTreeMap<i32, Arc<ApiVersionsResponse>>,
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
        // A broker that left takes its answer along; one that comes back is asked again.
        let api = api_view(
            &brokers,
            &old.broker_api_versions,
            old.seed_api_versions.as_ref(),
        );
        let version = old.version + 1;
        self.current.store(Arc::new(Topology {
            version,
            cluster_id: resp.cluster_id.clone().or_else(|| old.cluster_id.clone()),
            controller_id: resp.controller_id.0,
            brokers,
            topics,
            topic_names,
            api_versions: api.ranges,
            api_versions_response: api.features,
            broker_api_versions: api.live,
            seed_api_versions: old.seed_api_versions.clone(),
            refreshed_at: if full {
                Some(Instant::now())
            } else {
                old.refreshed_at
            },
        }));
        self.version_tx.send_replace(version);
    }

    /// Records one broker's ApiVersions answer (`None`: a bootstrap address, id unknown) and
    /// recomputes what is offered. An unchanged answer makes no new snapshot.
    pub fn set_api_versions(&self, broker: Option<i32>, resp: &ApiVersionsResponse) {
        let old = self.load();
        let held = match broker {
            Some(id) => old.broker_api_versions.get(&id),
            None => old.seed_api_versions.as_ref(),
        };
        if held.is_some_and(|h| **h == *resp) {
            return;
        }
        let resp = Arc::new(resp.clone());
        let mut answers = old.broker_api_versions.clone();
        let mut seed = old.seed_api_versions.clone();
        match broker {
            // A broker that left the snapshot while it was asked: its answer counts for nothing.
            Some(id) if !old.brokers.contains_key(&id) => return,
            Some(id) => {
                answers.insert(id, resp);
            }
            None => seed = Some(resp),
        }
        let api = api_view(&old.brokers, &answers, seed.as_ref());
        let version = old.version + 1;
        self.current.store(Arc::new(Topology {
            version,
            cluster_id: old.cluster_id.clone(),
            controller_id: old.controller_id,
            brokers: old.brokers.clone(),
            topics: old.topics.clone(),
            topic_names: old.topic_names.clone(),
            api_versions: api.ranges,
            api_versions_response: api.features,
            broker_api_versions: api.live,
            seed_api_versions: seed,
            refreshed_at: old.refreshed_at,
        }));
        self.version_tx.send_replace(version);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::BrokerId;
    use kafka_protocol::messages::api_versions_response::{ApiVersion, FinalizedFeatureKey};
    use kafka_protocol::messages::metadata_response::MetadataResponseBroker;

    fn answer(ranges: &[(i16, i16, i16)], features_epoch: i64) -> ApiVersionsResponse {
        ApiVersionsResponse::default()
            .with_api_keys(
                ranges
                    .iter()
                    .map(|(api, min, max)| {
                        ApiVersion::default()
                            .with_api_key(*api)
                            .with_min_version(*min)
                            .with_max_version(*max)
                    })
                    .collect(),
            )
            .with_finalized_features_epoch(features_epoch)
            .with_finalized_features(vec![
                FinalizedFeatureKey::default()
                    .with_name(StrBytes::from_string(format!("level.{features_epoch}"))),
            ])
    }

    fn brokers(ids: &[i32]) -> MetadataResponse {
        MetadataResponse::default().with_brokers(
            ids.iter()
                .map(|id| {
                    MetadataResponseBroker::default()
                        .with_node_id(BrokerId(*id))
                        .with_host(StrBytes::from_static_str("h"))
                        .with_port(9000 + id)
                })
                .collect(),
        )
    }

    fn range(t: &Topology, api: i16) -> Option<(i16, i16)> {
        t.api_versions.get(&api).map(|r| (r.min, r.max))
    }

    #[test]
    fn intersection_drops_missing_apis_and_keeps_the_narrowest_range() {
        let a = answer(&[(0, 3, 12), (1, 4, 17), (50, 0, 1)], 1);
        let b = answer(&[(0, 5, 11), (1, 4, 17)], 1);
        let c = answer(&[(0, 0, 4), (1, 13, 18)], 1);
        let r = intersect([&a, &b]);
        assert_eq!(r.len(), 2, "api 50 is missing from b");
        assert_eq!((r[&0].min, r[&0].max), (5, 11), "highest min, lowest max");
        let r = intersect([&a, &b, &c]);
        assert!(!r.contains_key(&0), "5..=4 is empty");
        assert_eq!((r[&1].min, r[&1].max), (13, 17));
        assert!(intersect(std::iter::empty()).is_empty());
    }

    #[test]
    fn every_live_broker_bounds_the_offer_and_answers_are_refreshed() {
        let h = TopologyHandle::new();
        // Before any broker id is known, a bootstrap address's answer serves.
        h.set_api_versions(None, &answer(&[(1, 4, 18), (3, 0, 13)], 5));
        assert_eq!(range(&h.load(), 1), Some((4, 18)));
        h.absorb(&brokers(&[1, 2]), true);
        assert_eq!(
            range(&h.load(), 1),
            Some((4, 18)),
            "seed kept until a broker answers"
        );

        h.set_api_versions(Some(1), &answer(&[(1, 4, 18), (3, 0, 13)], 7));
        h.set_api_versions(Some(2), &answer(&[(1, 4, 17)], 6));
        let t = h.load();
        assert_eq!(
            range(&t, 1),
            Some((4, 17)),
            "an older broker lowers the max"
        );
        assert_eq!(range(&t, 3), None, "an API one broker lacks is not offered");
        assert_eq!(t.broker_api_versions.len(), 2);
        assert_eq!(
            t.api_versions_response
                .as_ref()
                .unwrap()
                .finalized_features_epoch,
            7,
            "features from the highest finalized epoch"
        );

        // Broker 2 upgraded: its new answer raises the offer again.
        h.set_api_versions(Some(2), &answer(&[(1, 4, 18), (3, 0, 13)], 6));
        assert_eq!(range(&h.load(), 1), Some((4, 18)));
        assert_eq!(range(&h.load(), 3), Some((0, 13)));
        // The same answer again makes no new snapshot.
        let v = h.load().version;
        h.set_api_versions(Some(2), &answer(&[(1, 4, 18), (3, 0, 13)], 6));
        assert_eq!(h.load().version, v);

        // Broker 2 downgraded and then left the cluster: its answer goes with it.
        h.set_api_versions(Some(2), &answer(&[(1, 4, 16)], 6));
        assert_eq!(range(&h.load(), 1), Some((4, 16)));
        h.absorb(&brokers(&[1]), true);
        assert_eq!(range(&h.load(), 1), Some((4, 18)));
        assert_eq!(h.load().broker_api_versions.len(), 1);
        // An answer from a broker outside the snapshot counts for nothing.
        h.set_api_versions(Some(9), &answer(&[(1, 4, 5)], 9));
        assert_eq!(range(&h.load(), 1), Some((4, 18)));
        // A client's metadata naming no brokers keeps the known ones (and their answers).
        h.absorb(&MetadataResponse::default(), false);
        assert_eq!(h.load().broker_api_versions.len(), 1);
    }
}
