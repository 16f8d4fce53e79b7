//! Kafka's own view of consumer groups, which every instance can read: which groups have a
//! managed partition assigned (DescribeGroups for classic groups, ConsumerGroupDescribe for
//! KIP-848 groups) and what each committed (OffsetFetch, transactional commits included).
//!
//! With several instances a group's coordinator traffic and its fetches reach different
//! instances, so what one instance saw on the wire does not say who owns a fetch or how far
//! its group consumed. This view is the authority for the ordering gates; local observations
//! only make answers arrive sooner. It is read only for topics where a fetch met a closed gate
//! recently, every `REFRESH` while that lasts.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kafka_protocol::messages::consumer_protocol_assignment::ConsumerProtocolAssignment;
use kafka_protocol::messages::offset_fetch_request::{
    OffsetFetchRequestGroup, OffsetFetchRequestTopics,
};
use kafka_protocol::messages::{
    ApiKey, ConsumerGroupDescribeRequest, ConsumerGroupDescribeResponse, DescribeGroupsRequest,
    DescribeGroupsResponse, GroupId, ListGroupsRequest, ListGroupsResponse, OffsetFetchRequest,
    OffsetFetchResponse, TopicName,
};
use kafka_protocol::protocol::{Decodable, StrBytes};

use super::gates::{GroupTracker, TopicGroups};
use super::registry::Registry;
use crate::protocol::codes;
use crate::upstream::UpstreamError;
use crate::upstream::pool::Pool;

/// How often a wanted topic's group state is read again.
const REFRESH: Duration = Duration::from_millis(500);

/// A group as listed by its coordinator.
struct Listed {
    id: GroupId,
    /// KIP-848 (`consumer`) rather than classic.
    kip848: bool,
}

fn version(pool: &Pool, api: ApiKey, want: i16) -> Option<i16> {
    let topo = pool.topology.load();
    let r = topo.api_versions.get(&(api as i16))?;
    (r.min <= want).then(|| want.min(r.max))
}

/// Reads `topic`'s groups from every broker (each lists and describes the groups it
/// coordinates). Groups without members (Empty, Dead) own nothing and are left out.
pub async fn read(
    pool: &Pool,
    topic: &str,
    partitions: &[i32],
) -> Result<TopicGroups, UpstreamError> {
    let topo = pool.topology.load();
    let topic_id = topo.topics.get(topic.as_bytes()).map(|t| t.id);
    let mut out = TopicGroups::default();
    let list_v = version(pool, ApiKey::ListGroups, 5).ok_or(UpstreamError::NoBroker)?;
    let mut failed = None;
    for broker in topo.brokers.keys().copied() {
        // Best effort per broker: one broker down must not hide the groups the others know.
        if let Err(e) =
            read_broker(pool, broker, list_v, topic, topic_id, partitions, &mut out).await
        {
            tracing::debug!(broker, topic, error = %e, "group state of one broker not read");
            failed = Some(e);
        }
    }
    if let Some(e) = failed
        && out.owners.is_empty()
        && out.committed.is_empty()
    {
        return Err(e);
    }
    for owners in out.owners.values_mut() {
        owners.sort();
        owners.dedup();
    }
    Ok(out)
}

/// One broker's part of `read`: the groups it coordinates.
async fn read_broker(
    pool: &Pool,
    broker: i32,
    list_v: i16,
    topic: &str,
    topic_id: Option<uuid::Uuid>,
    partitions: &[i32],
    out: &mut TopicGroups,
) -> Result<(), UpstreamError> {
    {
        let listed: ListGroupsResponse = pool
            .call(
                broker,
                0,
                ApiKey::ListGroups,
                list_v,
                None,
                &ListGroupsRequest::default(),
            )
            .await?;
        let groups: Vec<Listed> = listed
            .groups
            .into_iter()
            .filter(|g| {
                g.protocol_type.as_str() == "consumer" || g.group_type.as_str() == "consumer"
            })
            .filter(|g| !matches!(g.group_state.as_str(), "Empty" | "Dead"))
            .map(|g| Listed {
                kip848: g.group_type.as_str() == "consumer",
                id: g.group_id,
            })
            .collect();
        if groups.is_empty() {
            return Ok(());
        }
        let classic: Vec<GroupId> = groups
            .iter()
            .filter(|g| !g.kip848)
            .map(|g| g.id.clone())
            .collect();
        if !classic.is_empty()
            && let Some(v) = version(pool, ApiKey::DescribeGroups, 5)
        {
            let resp: DescribeGroupsResponse = pool
                .call(
                    broker,
                    0,
                    ApiKey::DescribeGroups,
                    v,
                    None,
                    &DescribeGroupsRequest::default().with_groups(classic),
                )
                .await?;
            for g in resp.groups.iter().filter(|g| g.error_code == codes::NONE) {
                if g.protocol_type.as_str() != "consumer" {
                    continue;
                }
                for m in &g.members {
                    for p in assigned_in(&m.member_assignment, topic) {
                        own(out, p, g.group_id.as_str());
                    }
                }
            }
        }
        let kip848: Vec<GroupId> = groups
            .iter()
            .filter(|g| g.kip848)
            .map(|g| g.id.clone())
            .collect();
        if !kip848.is_empty()
            && let Some(v) = version(pool, ApiKey::ConsumerGroupDescribe, 0)
        {
            let resp: ConsumerGroupDescribeResponse = pool
                .call(
                    broker,
                    0,
                    ApiKey::ConsumerGroupDescribe,
                    v,
                    None,
                    &ConsumerGroupDescribeRequest::default().with_group_ids(kip848),
                )
                .await?;
            for g in resp.groups.iter().filter(|g| g.error_code == codes::NONE) {
                for m in &g.members {
                    for tp in &m.assignment.topic_partitions {
                        let ours = tp.topic_name.0.as_str() == topic
                            || topic_id.is_some_and(|id| id == tp.topic_id);
                        if ours {
                            for p in &tp.partitions {
                                own(out, *p, g.group_id.as_str());
                            }
                        }
                    }
                }
            }
        }
        let ids: Vec<GroupId> = groups.into_iter().map(|g| g.id).collect();
        for (group, partition, offset) in committed(pool, broker, &ids, topic, partitions).await? {
            out.committed.insert((group, partition), offset);
        }
    }
    Ok(())
}

fn own(out: &mut TopicGroups, partition: i32, group: &str) {
    out.owners
        .entry(partition)
        .or_default()
        .push(group.to_string());
}

/// Partitions of `topic` in a classic consumer-protocol assignment.
pub fn assigned_in(assignment: &bytes::Bytes, topic: &str) -> Vec<i32> {
    let mut buf = assignment.clone();
    if buf.len() < 2 {
        return vec![];
    }
    let version = i16::from_be_bytes([buf[0], buf[1]]);
    bytes::Buf::advance(&mut buf, 2);
    let Ok(a) = ConsumerProtocolAssignment::decode(&mut buf, version.clamp(0, 3)) else {
        return vec![];
    };
    a.assigned_partitions
        .iter()
        .filter(|t| t.topic.0.as_str() == topic)
        .flat_map(|t| t.partitions.iter().copied())
        .collect()
}

/// Committed offsets of `groups` (coordinated by `broker`) on `topic`: (group, partition,
/// offset), offsets ≥ 0 only.
async fn committed(
    pool: &Pool,
    broker: i32,
    groups: &[GroupId],
    topic: &str,
    partitions: &[i32],
) -> Result<Vec<(String, i32, i64)>, UpstreamError> {
    if groups.is_empty() {
        return Ok(vec![]);
    }
    // require_stable: commits of open transactions (TxnOffsetCommit) are waited for and then
    // counted, never skipped.
    let req = OffsetFetchRequest::default()
        .with_require_stable(true)
        .with_groups(
            groups
                .iter()
                .map(|g| {
                    OffsetFetchRequestGroup::default()
                        .with_group_id(g.clone())
                        .with_topics(Some(vec![
                            OffsetFetchRequestTopics::default()
                                .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                                .with_partition_indexes(partitions.to_vec()),
                        ]))
                })
                .collect(),
        );
    // v8: several groups in one request; every Kafka since 3.0 takes it.
    let fetched: OffsetFetchResponse = pool
        .call(broker, 0, ApiKey::OffsetFetch, 8, None, &req)
        .await?;
    let mut out = Vec::new();
    for g in fetched
        .groups
        .iter()
        .filter(|g| g.error_code == codes::NONE)
    {
        for t in g.topics.iter().filter(|t| t.name.0.as_str() == topic) {
            for p in t
                .partitions
                .iter()
                .filter(|p| p.error_code == codes::NONE && p.committed_offset >= 0)
            {
                out.push((
                    g.group_id.0.to_string(),
                    p.partition_index,
                    p.committed_offset,
                ));
            }
        }
    }
    Ok(out)
}

/// Background task (every instance): reads the group state of wanted managed topics and hands
/// it to the tracker the gates consult.
pub async fn run(pool: Arc<Pool>, shards: Arc<Registry>, groups: Arc<GroupTracker>) {
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut swept = Instant::now();
    loop {
        tick.tick().await;
        if swept.elapsed() >= Duration::from_secs(60) {
            swept = Instant::now();
            use crate::shards::gates::expiry::{GROUP_IDLE, MAX_GROUPS, MAX_LINKS};
            groups.sweep(GROUP_IDLE, MAX_GROUPS, MAX_LINKS);
            let (g, l) = groups.remembered();
            metrics::gauge!("shardgate_groups_remembered").set(g as f64);
            metrics::gauge!("shardgate_client_links_remembered").set(l as f64);
        }
        for topic in groups.demand().wanted() {
            let Some(m) = shards.get(&topic) else {
                continue;
            };
            let partitions: Vec<i32> = (0..m.map.pool).collect();
            let started = Instant::now();
            match read(&pool, &topic, &partitions).await {
                Ok(state) => {
                    metrics::histogram!("shardgate_group_state_read_seconds")
                        .record(started.elapsed().as_secs_f64());
                    groups.absorb_kafka(&topic, state);
                }
                Err(e) => {
                    metrics::counter!("shardgate_group_state_errors_total").increment(1);
                    tracing::debug!(topic, error = %e, "reading Kafka's group state failed");
                }
            }
        }
    }
}

/// Per partition, the committed offsets of live groups (for the autoscaler's lag trigger).
pub fn offsets_by_partition(state: &TopicGroups) -> HashMap<i32, Vec<(String, i64)>> {
    let mut out: BTreeMap<i32, Vec<(String, i64)>> = BTreeMap::new();
    for ((group, partition), offset) in &state.committed {
        out.entry(*partition)
            .or_default()
            .push((group.clone(), *offset));
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::consumer_protocol_assignment::TopicPartition;
    use kafka_protocol::protocol::Encodable;

    #[test]
    fn classic_assignments_are_read_per_topic() {
        let a = ConsumerProtocolAssignment::default().with_assigned_partitions(vec![
            TopicPartition::default()
                .with_topic(TopicName(StrBytes::from_static_str("orders")))
                .with_partitions(vec![1, 4]),
            TopicPartition::default()
                .with_topic(TopicName(StrBytes::from_static_str("other")))
                .with_partitions(vec![2]),
        ]);
        let mut buf = bytes::BytesMut::new();
        buf.extend_from_slice(&1i16.to_be_bytes());
        a.encode(&mut buf, 1).unwrap();
        let bytes = buf.freeze();
        assert_eq!(assigned_in(&bytes, "orders"), vec![1, 4]);
        assert!(assigned_in(&bytes, "missing").is_empty());
        assert!(assigned_in(&bytes::Bytes::from_static(b"\x00"), "orders").is_empty());
    }
}
