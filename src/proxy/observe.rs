//! What group traffic tells the shard code: which client speaks for which group, what it
//! committed (ordering gates), which member consumes which partition (placement), and when a
//! member must be nudged to see a grown partition pool.

use bytes::Bytes;
use kafka_protocol::messages::*;

use super::connection::ClientConn;
use super::forward::typed_reply;
use super::{Ctx, Reply};
use crate::prefetch::profiles::Protocol;
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

/// A classic consumer group's SyncGroup answer carries the member's assignment (consumer
/// protocol): placement wants the managed partitions, the consumer profiles all of them.
fn observe_assignment(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
    group: &str,
    resp: &Bytes,
) {
    let (Ok(body), Ok(answer)) = (
        req.decode_body::<SyncGroupRequest>(),
        decode_response::<SyncGroupResponse>(req.api_key, req.api_version, resp.clone()),
    ) else {
        return;
    };
    super::rebalance_offsets::sync_answered(ctx, client, group, &body, answer.error_code);
    if answer.error_code != codes::NONE
        || answer
            .protocol_type
            .as_ref()
            .is_some_and(|t| t.as_str() != "consumer")
    {
        return;
    }
    let Some(all) = super::rebalance_offsets::assigned(&answer.assignment) else {
        return;
    };
    let member = body.member_id.as_str();
    ctx.profiles.assigned(
        group,
        member,
        req.header.client_id.as_deref().unwrap_or(""),
        client.peer.ip(),
        Protocol::Classic,
        body.generation_id,
        all.clone(),
    );
    // Classic members may revoke everything at a rebalance (eager) and fetch it all again
    // from the commits: every partition is read.
    pre_read(ctx, client, req, group, &all);
    let managed = all
        .into_iter()
        .filter(|(t, _)| ctx.shards.is_managed(t))
        .collect();
    ctx.groups
        .assigned(group, body.generation_id, member, managed);
}

/// A member was just assigned `parts`: it will ask for its committed offsets and fetch from
/// them. Where this instance saw the group's commits, those partitions are read now
/// (`fetch::shared`), so the member's first fetch finds them read or under way.
pub(super) fn pre_read(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
    group: &str,
    parts: &[(String, i32)],
) {
    if !ctx.settings.raw.prefetch.predictive() {
        return;
    }
    ctx.shared_reads.assigned(group, parts);
    let known: Vec<(String, i32, i64)> = parts
        .iter()
        .filter_map(|(t, p)| {
            let o = ctx.profiles.committed_offset(group, t, *p)?;
            Some((t.clone(), *p, o))
        })
        .collect();
    if known.is_empty() {
        return;
    }
    ctx.shared_reads
        .pre_read(ctx, known, isolation_of(ctx, client, req));
}

/// The isolation level the client fetched with before (read_uncommitted when unknown).
pub(super) fn isolation_of(ctx: &Ctx, client: &ClientConn, req: &RequestFrame) -> i8 {
    let client_id = req.header.client_id.as_deref().unwrap_or("");
    ctx.profiles
        .isolation_of(client.peer.ip(), client_id)
        .unwrap_or(0)
}

/// Membership the consumer profiles follow beyond assignments: heartbeats, leaving, and
/// KIP-848 members (whose heartbeat answers carry their assignments).
fn observe_membership(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
    group: &str,
    resp: &Bytes,
) {
    match req.api_key {
        ApiKey::Heartbeat => {
            if let Ok(b) = req.decode_body::<HeartbeatRequest>() {
                ctx.profiles.seen(group, b.member_id.as_str());
            }
        }
        ApiKey::LeaveGroup => {
            if let Ok(b) = req.decode_body::<LeaveGroupRequest>() {
                ctx.profiles.left(group, b.member_id.as_str());
                for m in &b.members {
                    ctx.profiles.left(group, m.member_id.as_str());
                }
            }
        }
        ApiKey::ConsumerGroupHeartbeat => {
            let (Ok(body), Ok(answer)) = (
                req.decode_body::<ConsumerGroupHeartbeatRequest>(),
                decode_response::<ConsumerGroupHeartbeatResponse>(
                    req.api_key,
                    req.api_version,
                    resp.clone(),
                ),
            ) else {
                return;
            };
            let member = answer
                .member_id
                .as_ref()
                .map(|m| m.as_str())
                .filter(|m| !m.is_empty())
                .unwrap_or(body.member_id.as_str());
            if body.member_epoch < 0 {
                // -1: leaving; -2: a static member leaving temporarily.
                ctx.profiles.left(group, member);
                return;
            }
            if answer.error_code != codes::NONE {
                return;
            }
            let Some(a) = &answer.assignment else {
                ctx.profiles.seen(group, member);
                return;
            };
            let topo = ctx.topology().load();
            let parts: Vec<(String, i32)> = a
                .topic_partitions
                .iter()
                .filter_map(|t| topo.topic_name(&t.topic_id).map(|n| (n.to_string(), t)))
                .flat_map(|(n, t)| t.partitions.iter().map(move |p| (n.clone(), *p)))
                .collect();
            // KIP-848 answers carry the whole assignment; a member keeps fetching what it
            // held, so only what it gained is read from the commits.
            let added = ctx.profiles.assigned(
                group,
                member,
                req.header.client_id.as_deref().unwrap_or(""),
                client.peer.ip(),
                Protocol::Consumer,
                answer.member_epoch,
                parts,
            );
            pre_read(ctx, client, req, group, &added);
        }
        _ => {}
    }
}

/// Links the client to the consumer group it speaks for and records committed offsets:
/// ordering gates need both (for managed topics), consumer profiles too (for all topics).
pub(super) fn observe_group(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
    group: &str,
    resp: &Bytes,
) {
    observe_membership(ctx, client, req, group, resp);
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
        observe_assignment(ctx, client, req, group, resp);
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
    if !body.member_id.is_empty() {
        ctx.profiles.seen(group, body.member_id.as_str());
    }
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
        let managed = ctx.shards.is_managed(&name);
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
                ctx.profiles
                    .committed(group, &name, p.partition_index, p.committed_offset);
                if managed {
                    ctx.groups
                        .committed(group, &name, p.partition_index, p.committed_offset);
                }
            }
        }
    }
}
