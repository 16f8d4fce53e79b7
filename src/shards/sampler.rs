//! What the autoscaler measures besides end offsets: the bytes each shard partition stores
//! (DescribeLogDirs on its leader, so bytes/s counts whoever produced) and the committed
//! offsets of the consumer groups reading it (`group_state`: ListGroups + OffsetFetch on every
//! broker, so it covers groups connected to any instance, or to Kafka directly).

use std::collections::{BTreeMap, HashMap};

use kafka_protocol::messages::describe_log_dirs_request::DescribableLogDirTopic;
use kafka_protocol::messages::{
    ApiKey, DescribeLogDirsRequest, DescribeLogDirsResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use crate::protocol::codes;
use crate::upstream::UpstreamError;
use crate::upstream::pool::Pool;

const DESCRIBE_LOG_DIRS_VERSION: i16 = 2;

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
        sizes.extend(log_sizes_on(pool, broker, topic, &parts).await?);
    }
    Ok(sizes)
}

/// Bytes `broker` stores for each of `partitions` (its own replica, leader or not; the
/// largest log dir entry when it is moving between dirs). Partitions it has no replica of
/// are absent.
pub async fn log_sizes_on(
    pool: &Pool,
    broker: i32,
    topic: &str,
    parts: &[i32],
) -> Result<HashMap<i32, i64>, UpstreamError> {
    let mut sizes = HashMap::new();
    let req = DescribeLogDirsRequest::default().with_topics(Some(vec![
        DescribableLogDirTopic::default()
            .with_topic(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partitions(parts.to_vec()),
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
    Ok(sizes)
}

/// For each partition, the committed offsets of the live consumer groups that committed it
/// (groups with members: an empty group's lag grows forever and says nothing about load).
pub async fn group_offsets(
    pool: &Pool,
    topic: &str,
    partitions: &[i32],
) -> Result<HashMap<i32, Vec<(String, i64)>>, UpstreamError> {
    let state = super::group_state::read(pool, topic, partitions).await?;
    Ok(super::group_state::offsets_by_partition(&state))
}
