//! What group traffic tells the shard code: which client speaks for which group, what it
//! committed (ordering gates), which member consumes which partition (placement), and when a
//! member must be nudged to see a grown partition pool.

use bytes::Bytes;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::Decodable;

use super::connection::ClientConn;
use super::forward::typed_reply;
use super::{Ctx, Reply};
use crate::protocol::{RequestFrame, codes, decode_response};

/// After a managed topic's pool grew, each member of a classic group consuming it is told once
/// (Heartbeat → REBALANCE_IN_PROGRESS) to rejoin: some clients (librdkafka) re-read partition
/// counts for their group only when they join, so without this they would not consume the new
/// partitions until their periodic metadata refresh. KIP-848 groups need nothing: the broker
/// sees the new partitions itself.
pub(super) fn nudge_member(
    ctx: &Ctx,
    req: &RequestFrame,
    group: &str,
    resp: &Bytes,
) -> Option<Reply> {
    if req.api_key != ApiKey::Heartbeat {
        return None;
    }
    let grown = ctx.shards.recently_grown();
    if grown.is_empty() {
        return None;
    }
    let body = req.decode_body::<HeartbeatRequest>().ok()?;
    let answer: HeartbeatResponse =
        decode_response(req.api_key, req.api_version, resp.clone()).ok()?;
    if answer.error_code != codes::NONE {
        return None;
    }
    let consumed = ctx.groups.topics_of(group);
    let topic = grown.into_iter().find(|t| {
        consumed.contains(t)
            && ctx
                .shards
                .nudge_once(t, format!("member {group} {}", body.member_id.as_str()))
    })?;
    metrics::counter!("shardgate_pool_nudges_total", "topic" => topic.clone()).increment(1);
    tracing::info!(group, member = %body.member_id.as_str(), topic, "asking a group member to rejoin: the topic's pool grew");
    typed_reply(req, &answer.with_error_code(codes::REBALANCE_IN_PROGRESS)).ok()
}

/// Placement wants to know which member consumes which managed partition: a classic consumer
/// group's SyncGroup answer carries the member's assignment (consumer protocol).
fn observe_assignment(ctx: &Ctx, req: &RequestFrame, group: &str, resp: &Bytes) {
    let (Ok(body), Ok(answer)) = (
        req.decode_body::<SyncGroupRequest>(),
        decode_response::<SyncGroupResponse>(req.api_key, req.api_version, resp.clone()),
    ) else {
        return;
    };
    if answer.error_code != codes::NONE
        || answer
            .protocol_type
            .as_ref()
            .is_some_and(|t| t.as_str() != "consumer")
    {
        return;
    }
    let mut buf = answer.assignment.clone();
    if buf.len() < 2 {
        ctx.groups
            .assigned(group, body.generation_id, body.member_id.as_str(), vec![]);
        return;
    }
    let version = i16::from_be_bytes([buf[0], buf[1]]);
    bytes::Buf::advance(&mut buf, 2);
    let Ok(a) = ConsumerProtocolAssignment::decode(&mut buf, version.clamp(0, 3)) else {
        return;
    };
    let parts = a
        .assigned_partitions
        .iter()
        .filter(|t| ctx.shards.is_managed(t.topic.0.as_str()))
        .flat_map(|t| t.partitions.iter().map(|p| (t.topic.0.to_string(), *p)))
        .collect();
    ctx.groups
        .assigned(group, body.generation_id, body.member_id.as_str(), parts);
}

/// Links the client to the consumer group it speaks for and records committed offsets of
/// managed topics: the ordering gates need both.
pub(super) fn observe_group(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
    group: &str,
    resp: &Bytes,
) {
    if !matches!(
        req.api_key,
        ApiKey::JoinGroup
            | ApiKey::SyncGroup
            | ApiKey::Heartbeat
            | ApiKey::OffsetCommit
            | ApiKey::OffsetFetch
            | ApiKey::ConsumerGroupHeartbeat
    ) {
        return;
    }
    let client_id = req.header.client_id.as_deref().unwrap_or("");
    ctx.groups.link(client.peer.ip(), client_id, group);
    if req.api_key == ApiKey::SyncGroup {
        observe_assignment(ctx, req, group, resp);
        return;
    }
    if req.api_key != ApiKey::OffsetCommit {
        return;
    }
    let (Ok(body), Ok(answer)) = (
        req.decode_body::<OffsetCommitRequest>(),
        decode_response::<OffsetCommitResponse>(req.api_key, req.api_version, resp.clone()),
    ) else {
        return;
    };
    let topo = ctx.topology().load();
    for t in &body.topics {
        let name = if t.topic_id.is_nil() {
            t.name.0.clone()
        } else {
            match topo.topic_name(&t.topic_id) {
                Some(n) => n.clone(),
                None => continue,
            }
        };
        if !ctx.shards.is_managed(&name) {
            continue;
        }
        let accepted = |partition: i32| {
            answer.topics.iter().any(|rt| {
                (rt.name.0 == t.name.0 && rt.topic_id == t.topic_id)
                    && rt
                        .partitions
                        .iter()
                        .any(|p| p.partition_index == partition && p.error_code == 0)
            })
        };
        for p in &t.partitions {
            if accepted(p.partition_index) {
                ctx.groups
                    .committed(group, &name, p.partition_index, p.committed_offset);
            }
        }
    }
}
