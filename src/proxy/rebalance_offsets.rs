//! A classic group's rebalance, one round trip sooner (`prefetch::offsets` says why it is
//! exact): when the leader's SyncGroup passes, shardgate asks the coordinator for every new
//! assignment's committed offsets and pre-reads the partitions from them; a member's
//! OffsetFetch right after its SyncGroup answer is answered from that read.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, StrBytes};

use super::connection::ClientConn;
use super::forward::typed_reply;
use super::{Ctx, HandlerError, Reply};
use crate::prefetch::offsets::{Committed, ReadState};
use crate::protocol::{RequestFrame, codes};

/// Longest a member's OffsetFetch waits for the read still under way (beyond, Kafka answers).
const WAIT: Duration = Duration::from_secs(1);

/// The partitions a consumer-protocol assignment names (None: not one; an empty assignment
/// names none).
pub(super) fn assigned(bytes: &bytes::Bytes) -> Option<Vec<(String, i32)>> {
    let mut buf = bytes.clone();
    if buf.len() < 2 {
        return Some(vec![]);
    }
    let version = i16::from_be_bytes([buf[0], buf[1]]);
    bytes::Buf::advance(&mut buf, 2);
    let a = ConsumerProtocolAssignment::decode(&mut buf, version.clamp(0, 3)).ok()?;
    Some(
        a.assigned_partitions
            .iter()
            .flat_map(|t| t.partitions.iter().map(|p| (t.topic.0.to_string(), *p)))
            .collect(),
    )
}

/// A SyncGroup request is about to go to `broker`, the group's coordinator: from the leader
/// (it carries the assignments), start reading the members' committed offsets and their
/// partitions from the commits this instance saw.
pub(super) fn leader_sync(ctx: &Arc<Ctx>, client: &ClientConn, req: &RequestFrame, broker: i32) {
    if !ctx.settings.raw.prefetch.predictive() {
        return;
    }
    let Ok(body) = req.decode_body::<SyncGroupRequest>() else {
        return;
    };
    if body.assignments.is_empty()
        || body
            .protocol_type
            .as_ref()
            .is_some_and(|t| t.as_str() != "consumer")
    {
        return;
    }
    let mut members = HashMap::new();
    for a in &body.assignments {
        let Some(parts) = assigned(&a.assignment) else {
            return;
        };
        members.insert(a.member_id.to_string(), parts);
    }
    let all: Vec<(String, i32)> = members.values().flatten().cloned().collect();
    if all.is_empty() {
        return;
    }
    let group = body.group_id.to_string();
    let Some(tx) = ctx
        .offsets_ahead
        .begin(&group, body.generation_id, members, Instant::now())
    else {
        return;
    };
    // From what this instance saw committed: read now, a round trip before the members ask.
    super::observe::pre_read(ctx, client, req, &group, &all);
    let isolation = super::observe::isolation_of(ctx, client, req);
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let read = read_committed(&ctx, broker, &group, &all).await;
        metrics::counter!("shardgate_prefetch_offset_reads_total",
            "outcome" => if read.is_empty() { "failed" } else { "read" })
        .increment(1);
        // Where Kafka's commits differ from what this instance saw (other instances, other
        // paths), the partitions are read from Kafka's.
        let upstream: Vec<(String, i32, i64)> = read
            .iter()
            .filter(|(_, c)| c.error_code == codes::NONE && c.offset >= 0)
            .map(|((t, p), c)| (t.clone(), *p, c.offset))
            .collect();
        if !upstream.is_empty() {
            ctx.shared_reads.pre_read(&ctx, upstream, isolation);
        }
        let _ = tx.send(Some(Arc::new(read)));
    });
}

/// The committed offsets of `parts` for `group` (require_stable: a pending transactional
/// commit is an error here, never a stale offset); empty when the read failed.
async fn read_committed(
    ctx: &Ctx,
    broker: i32,
    group: &str,
    parts: &[(String, i32)],
) -> HashMap<(String, i32), Committed> {
    let mut by_topic: HashMap<&str, Vec<i32>> = HashMap::new();
    for (t, p) in parts {
        by_topic.entry(t).or_default().push(*p);
    }
    let req = OffsetFetchRequest::default()
        .with_require_stable(true)
        .with_groups(vec![
            offset_fetch_request::OffsetFetchRequestGroup::default()
                .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
                .with_topics(Some(
                    by_topic
                        .into_iter()
                        .map(|(t, ps)| {
                            offset_fetch_request::OffsetFetchRequestTopics::default()
                                .with_name(TopicName(StrBytes::from_string(t.to_string())))
                                .with_partition_indexes(ps)
                        })
                        .collect(),
                )),
        ]);
    // v8 (groups): every Kafka since 3.0.
    let answer: Result<OffsetFetchResponse, _> = ctx
        .pool
        .call(broker, 0, ApiKey::OffsetFetch, 8, None, &req)
        .await;
    let mut out = HashMap::new();
    let Ok(answer) = answer else { return out };
    for g in answer.groups.iter().filter(|g| g.error_code == codes::NONE) {
        for t in &g.topics {
            for p in &t.partitions {
                out.insert(
                    (t.name.to_string(), p.partition_index),
                    Committed {
                        offset: p.committed_offset,
                        leader_epoch: p.committed_leader_epoch,
                        metadata: p.metadata.as_ref().map(|m| m.to_string()),
                        error_code: p.error_code,
                    },
                );
            }
        }
    }
    out
}

/// A member's SyncGroup answer passed: its OffsetFetch on this connection may be answered
/// from the read; a failed answer to the leader drops the read.
pub(super) fn sync_answered(
    ctx: &Ctx,
    client: &ClientConn,
    group: &str,
    body: &SyncGroupRequest,
    error_code: i16,
) {
    if error_code != codes::NONE {
        if !body.assignments.is_empty() {
            ctx.offsets_ahead.drop_group(group);
        }
        return;
    }
    ctx.offsets_ahead.bind(
        group,
        body.generation_id,
        body.member_id.as_str(),
        client.id,
        Instant::now(),
    );
}

/// A request that changes or removes `group`'s commits is about to go: reads made before it
/// are no longer what Kafka would answer.
pub(super) fn commits_change(ctx: &Ctx, api: ApiKey, group: &str) {
    if matches!(
        api,
        ApiKey::OffsetCommit
            | ApiKey::TxnOffsetCommit
            | ApiKey::OffsetDelete
            | ApiKey::DeleteGroups
    ) {
        ctx.offsets_ahead.drop_group(group);
    }
}

/// A member's OffsetFetch for `group`, answered from the read made at its rebalance when it
/// is the member's and covers every partition asked with no error (None: Kafka answers).
pub(super) async fn answer_offset_fetch(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
    group: &str,
) -> Result<Option<Reply>, HandlerError> {
    // v0 read ZooKeeper offsets; v10 names topics by id (not asked by the clients this serves).
    if !(1..=9).contains(&req.api_version) || !ctx.settings.raw.prefetch.predictive() {
        return Ok(None);
    }
    let body: OffsetFetchRequest = req.decode_body()?;
    let wanted: Vec<(String, i32)> = if req.api_version < 8 {
        let Some(topics) = &body.topics else {
            return Ok(None); // all the group's offsets: not what a member asks after a sync
        };
        topics
            .iter()
            .flat_map(|t| t.partition_indexes.iter().map(|p| (t.name.to_string(), *p)))
            .collect()
    } else {
        let [g] = body.groups.as_slice() else {
            return Ok(None);
        };
        // A KIP-848 member names itself: not a classic rebalance.
        if g.member_id.as_ref().is_some_and(|m| !m.is_empty()) {
            return Ok(None);
        }
        let Some(topics) = &g.topics else {
            return Ok(None);
        };
        topics
            .iter()
            .flat_map(|t| t.partition_indexes.iter().map(|p| (t.name.to_string(), *p)))
            .collect()
    };
    let Some(mut taken) = ctx
        .offsets_ahead
        .take(group, client.id, &wanted, Instant::now())
    else {
        return Ok(None);
    };
    let read: ReadState =
        match tokio::time::timeout(WAIT, taken.state.wait_for(|s| s.is_some())).await {
            Ok(Ok(s)) => s.clone(),
            _ => None,
        };
    let Some(read) = read else {
        metrics::counter!("shardgate_prefetch_offset_answers_total", "outcome" => "late")
            .increment(1);
        return Ok(None);
    };
    if !wanted
        .iter()
        .all(|w| read.get(w).is_some_and(|c| c.error_code == codes::NONE))
    {
        // Not read, or a pending transactional commit: Kafka answers.
        metrics::counter!("shardgate_prefetch_offset_answers_total", "outcome" => "missing")
            .increment(1);
        return Ok(None);
    }
    metrics::counter!("shardgate_prefetch_offset_answers_total", "outcome" => "answered")
        .increment(1);
    let client_id = req.header.client_id.as_deref().unwrap_or("");
    ctx.groups.link(client.peer.ip(), client_id, group);
    // The answer in the asked order, each partition as the read found it.
    macro_rules! topics {
        ($asked:expr, $t:ident, $p:ident) => {
            $asked
                .iter()
                .flatten()
                .map(|t| {
                    $t::default().with_name(t.name.clone()).with_partitions(
                        t.partition_indexes
                            .iter()
                            .map(|p| {
                                let c = read[&(t.name.to_string(), *p)].clone();
                                $p::default()
                                    .with_partition_index(*p)
                                    .with_committed_offset(c.offset)
                                    .with_committed_leader_epoch(c.leader_epoch)
                                    .with_metadata(c.metadata.map(StrBytes::from_string))
                                    .with_error_code(c.error_code)
                            })
                            .collect(),
                    )
                })
                .collect()
        };
    }
    use offset_fetch_response::*;
    let reply = if req.api_version < 8 {
        let topics = topics!(
            body.topics,
            OffsetFetchResponseTopic,
            OffsetFetchResponsePartition
        );
        typed_reply(req, &OffsetFetchResponse::default().with_topics(topics))?
    } else {
        let g = &body.groups[0];
        let topics = topics!(
            g.topics,
            OffsetFetchResponseTopics,
            OffsetFetchResponsePartitions
        );
        let group = OffsetFetchResponseGroup::default()
            .with_group_id(g.group_id.clone())
            .with_topics(topics);
        typed_reply(
            req,
            &OffsetFetchResponse::default().with_groups(vec![group]),
        )?
    };
    Ok(Some(reply))
}
