//! What the autoscaler measures besides end offsets: the bytes each shard partition stores
//! (DescribeLogDirs on its leader, so bytes/s counts whoever produced) and the committed
//! offsets of the consumer groups reading it (ListGroups + OffsetFetch on every broker, so it
//! covers groups connected to any instance, or to Kafka directly).

use std::collections::{BTreeMap, HashMap};

use kafka_protocol::messages::describe_log_dirs_request::DescribableLogDirTopic;
use kafka_protocol::messages::offset_fetch_request::{
    OffsetFetchRequestGroup, OffsetFetchRequestTopics,
};
use kafka_protocol::messages::{
    ApiKey, DescribeLogDirsRequest, DescribeLogDirsResponse, GroupId, ListGroupsRequest,
    ListGroupsResponse, OffsetFetchRequest, OffsetFetchResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use crate::protocol::codes;
use crate::upstream::UpstreamError;
use crate::upstream::pool::Pool;

const DESCRIBE_LOG_DIRS_VERSION: i16 = 2;
const LIST_GROUPS_VERSION: i16 = 4;
const OFFSET_FETCH_VERSION: i16 = 8;

/// Bytes stored per partition, as its leader reports them (the largest log dir entry when a
/// partition is moving between dirs).
pub async fn log_sizes(
    pool: &Pool,
    topic: &str,
    partitions: &[i32],
) -> Result<HashMap<i32, i64>, UpstreamError> {
    let topo = pool.topology.load();
    let mut by_leader: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for p in partitions {
        if let Some(l) = topo.leader(topic, *p) {
            by_leader.entry(l).or_default().push(*p);
        }
    }
    let mut sizes = HashMap::new();
    for (broker, parts) in by_leader {
        let req = DescribeLogDirsRequest::default().with_topics(Some(vec![
            DescribableLogDirTopic::default()
                .with_topic(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partitions(parts.clone()),
        ]));
        let resp: DescribeLogDirsResponse = pool
            .call(
                broker,
                0,
                ApiKey::DescribeLogDirs,
                DESCRIBE_LOG_DIRS_VERSION,
                None,
                &req,
            )
            .await?;
        for dir in resp.results.iter().filter(|d| d.error_code == codes::NONE) {
            for t in dir.topics.iter().filter(|t| t.name.0.as_str() == topic) {
                for p in t
                    .partitions
                    .iter()
                    .filter(|p| parts.contains(&p.partition_index))
                {
                    let e = sizes.entry(p.partition_index).or_insert(0);
                    *e = (*e).max(p.partition_size);
                }
            }
        }
    }
    Ok(sizes)
}

/// For each partition, the committed offsets of the live consumer groups that committed it
/// (groups with members: an empty group's lag grows forever and says nothing about load).
pub async fn group_offsets(
    pool: &Pool,
    topic: &str,
    partitions: &[i32],
) -> Result<HashMap<i32, Vec<(String, i64)>>, UpstreamError> {
    let topo = pool.topology.load();
    let mut out: HashMap<i32, Vec<(String, i64)>> = HashMap::new();
    for broker in topo.brokers.keys().copied() {
        let listed: ListGroupsResponse = pool
            .call(
                broker,
                0,
                ApiKey::ListGroups,
                LIST_GROUPS_VERSION,
                None,
                &ListGroupsRequest::default(),
            )
            .await?;
        let groups: Vec<GroupId> = listed
            .groups
            .into_iter()
            .filter(|g| {
                g.protocol_type.as_str() == "consumer" || g.group_type.as_str() == "consumer"
            })
            .filter(|g| !matches!(g.group_state.as_str(), "Empty" | "Dead"))
            .map(|g| g.group_id)
            .collect();
        if groups.is_empty() {
            continue;
        }
        let req = OffsetFetchRequest::default().with_groups(
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
        let fetched: OffsetFetchResponse = pool
            .call(
                broker,
                0,
                ApiKey::OffsetFetch,
                OFFSET_FETCH_VERSION,
                None,
                &req,
            )
            .await?;
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
                    out.entry(p.partition_index)
                        .or_default()
                        .push((g.group_id.0.to_string(), p.committed_offset));
                }
            }
        }
    }
    Ok(out)
}
