//! Requests that are not split by partition: the cluster view (Metadata, FindCoordinator,
//! DescribeCluster), group and transaction APIs forwarded as bytes to the real coordinator,
//! controller-bound admin APIs, and ListGroups fanned out to every broker.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use bytes::Bytes;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

use super::connection::ClientConn;
use super::{Ctx, HandlerError, Reply};
use crate::protocol::{
    RequestFrame, codes, decode_response, encode_request, encode_response, reframe_response,
};
use crate::telemetry;
use crate::upstream::UpstreamError;

pub const GROUP: i8 = 0;
pub const TXN: i8 = 1;

/// Real coordinators by (key type, key), learned from FindCoordinator upstream and forgotten
/// on NOT_COORDINATOR / COORDINATOR_NOT_AVAILABLE.
#[derive(Default)]
pub struct CoordinatorCache {
    map: Mutex<HashMap<(i8, String), i32>>,
}

impl CoordinatorCache {
    fn get(&self, key_type: i8, key: &str) -> Option<i32> {
        self.map
            .lock()
            .expect("coordinator cache")
            .get(&(key_type, key.to_string()))
            .copied()
    }
    fn put(&self, key_type: i8, key: &str, broker: i32) {
        self.map
            .lock()
            .expect("coordinator cache")
            .insert((key_type, key.to_string()), broker);
    }
    fn forget(&self, key_type: i8, key: &str) {
        self.map
            .lock()
            .expect("coordinator cache")
            .remove(&(key_type, key.to_string()));
    }
}

pub(super) fn any_broker(ctx: &Ctx, client: &ClientConn) -> Result<i32, UpstreamError> {
    let topo = ctx.topology().load();
    if topo.brokers.contains_key(&topo.controller_id) && client.id.is_multiple_of(2) {
        return Ok(topo.controller_id);
    }
    topo.any_broker(client.id).ok_or(UpstreamError::NoBroker)
}

pub(super) fn typed_reply<T: Encodable>(
    req: &RequestFrame,
    resp: &T,
) -> Result<Reply, HandlerError> {
    Ok(Reply::Frame(encode_response(
        req.api_key,
        req.api_version,
        req.correlation_id(),
        resp,
    )?))
}

/// Forwards a typed request at the client's version and decodes the typed response.
pub(super) async fn call_typed<Req, Resp>(
    ctx: &Ctx,
    client: &ClientConn,
    broker: i32,
    req: &RequestFrame,
    body: &Req,
) -> Result<Resp, HandlerError>
where
    Req: Encodable + HeaderVersion,
    Resp: Decodable,
{
    Ok(ctx
        .pool
        .call(
            broker,
            client.pin(),
            req.api_key,
            req.api_version,
            req.header.client_id.clone(),
            body,
        )
        .await?)
}

pub async fn cluster_view(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
) -> Result<Reply, HandlerError> {
    let broker = any_broker(ctx, client)?;
    match req.api_key {
        ApiKey::Metadata => {
            let body: MetadataRequest = req.decode_body()?;
            let all = body.topics.is_none()
                || (req.api_version == 0 && body.topics.as_ref().is_some_and(|t| t.is_empty()));
            let mut resp: MetadataResponse = call_typed(ctx, client, broker, req, &body).await?;
            ctx.topology().absorb(&resp, all);
            ctx.cluster.rewrite_metadata(&mut resp);
            typed_reply(req, &resp)
        }
        ApiKey::FindCoordinator => {
            let body: FindCoordinatorRequest = req.decode_body()?;
            let mut resp: FindCoordinatorResponse =
                call_typed(ctx, client, broker, req, &body).await?;
            if resp.coordinators.is_empty() {
                if resp.error_code == 0 {
                    ctx.coordinators
                        .put(body.key_type, &body.key, resp.node_id.0);
                }
            } else {
                for c in &resp.coordinators {
                    if c.error_code == 0 {
                        ctx.coordinators.put(body.key_type, &c.key, c.node_id.0);
                    }
                }
            }
            ctx.cluster
                .rewrite_find_coordinator(&mut resp, body.key_type, &body.key);
            typed_reply(req, &resp)
        }
        ApiKey::DescribeCluster => {
            let body: DescribeClusterRequest = req.decode_body()?;
            let mut resp: DescribeClusterResponse =
                call_typed(ctx, client, broker, req, &body).await?;
            ctx.cluster.rewrite_describe_cluster(&mut resp);
            typed_reply(req, &resp)
        }
        other => Err(HandlerError::Protocol(
            crate::protocol::ProtocolError::Decode {
                what: format!("{other:?}"),
                message: "not a cluster-view API".into(),
            },
        )),
    }
}

/// The coordinator keys a request is about: (key type, keys).
fn coordinator_keys(req: &RequestFrame) -> Result<(i8, Vec<String>), HandlerError> {
    let one = |s: &StrBytes| vec![s.to_string()];
    Ok(match req.api_key {
        ApiKey::JoinGroup => (GROUP, one(&req.decode_body::<JoinGroupRequest>()?.group_id)),
        ApiKey::SyncGroup => (GROUP, one(&req.decode_body::<SyncGroupRequest>()?.group_id)),
        ApiKey::Heartbeat => (GROUP, one(&req.decode_body::<HeartbeatRequest>()?.group_id)),
        ApiKey::LeaveGroup => (
            GROUP,
            one(&req.decode_body::<LeaveGroupRequest>()?.group_id),
        ),
        ApiKey::OffsetCommit => (
            GROUP,
            one(&req.decode_body::<OffsetCommitRequest>()?.group_id),
        ),
        ApiKey::TxnOffsetCommit => (
            GROUP,
            one(&req.decode_body::<TxnOffsetCommitRequest>()?.group_id),
        ),
        ApiKey::OffsetDelete => (
            GROUP,
            one(&req.decode_body::<OffsetDeleteRequest>()?.group_id),
        ),
        ApiKey::ConsumerGroupHeartbeat => (
            GROUP,
            one(&req.decode_body::<ConsumerGroupHeartbeatRequest>()?.group_id),
        ),
        ApiKey::OffsetFetch => {
            let b: OffsetFetchRequest = req.decode_body()?;
            if req.api_version >= 8 {
                (
                    GROUP,
                    b.groups.iter().map(|g| g.group_id.to_string()).collect(),
                )
            } else {
                (GROUP, one(&b.group_id))
            }
        }
        ApiKey::DescribeGroups => (
            GROUP,
            req.decode_body::<DescribeGroupsRequest>()?
                .groups
                .iter()
                .map(|g| g.to_string())
                .collect(),
        ),
        ApiKey::DeleteGroups => (
            GROUP,
            req.decode_body::<DeleteGroupsRequest>()?
                .groups_names
                .iter()
                .map(|g| g.to_string())
                .collect(),
        ),
        ApiKey::ConsumerGroupDescribe => (
            GROUP,
            req.decode_body::<ConsumerGroupDescribeRequest>()?
                .group_ids
                .iter()
                .map(|g| g.to_string())
                .collect(),
        ),
        ApiKey::InitProducerId => (
            TXN,
            req.decode_body::<InitProducerIdRequest>()?
                .transactional_id
                .iter()
                .map(|t| t.to_string())
                .collect(),
        ),
        ApiKey::AddPartitionsToTxn => (
            TXN,
            one(&req
                .decode_body::<AddPartitionsToTxnRequest>()?
                .v3_and_below_transactional_id),
        ),
        ApiKey::AddOffsetsToTxn => (
            TXN,
            one(&req
                .decode_body::<AddOffsetsToTxnRequest>()?
                .transactional_id),
        ),
        ApiKey::EndTxn => (
            TXN,
            one(&req.decode_body::<EndTxnRequest>()?.transactional_id),
        ),
        other => {
            return Err(HandlerError::Protocol(
                crate::protocol::ProtocolError::Decode {
                    what: format!("{other:?}"),
                    message: "not a coordinator API".into(),
                },
            ));
        }
    })
}

/// The real coordinator of a key, from the cache or from FindCoordinator upstream.
async fn find_coordinator(
    ctx: &Ctx,
    client: &ClientConn,
    key_type: i8,
    key: &str,
) -> Result<Option<i32>, HandlerError> {
    if let Some(b) = ctx.coordinators.get(key_type, key) {
        return Ok(Some(b));
    }
    let broker = any_broker(ctx, client)?;
    let req = FindCoordinatorRequest::default()
        .with_key(StrBytes::from_string(key.to_string()))
        .with_key_type(key_type);
    let resp: FindCoordinatorResponse = ctx
        .pool
        .call(broker, client.pin(), ApiKey::FindCoordinator, 3, None, &req)
        .await?;
    telemetry::upstream_code(ApiKey::FindCoordinator, resp.error_code);
    if resp.error_code != 0 {
        return Ok(None);
    }
    ctx.coordinators.put(key_type, key, resp.node_id.0);
    Ok(Some(resp.node_id.0))
}

/// Error codes in a coordinator response that mean our cached coordinator is stale.
fn coordinator_moved(api: ApiKey, version: i16, frame: &Bytes) -> bool {
    let moved = |c: i16| c == codes::NOT_COORDINATOR || c == codes::COORDINATOR_NOT_AVAILABLE;
    let f = frame.clone();
    macro_rules! top {
        ($t:ty) => {
            decode_response::<$t>(api, version, f)
                .map(|r| moved(r.error_code))
                .unwrap_or(false)
        };
    }
    match api {
        ApiKey::JoinGroup => top!(JoinGroupResponse),
        ApiKey::SyncGroup => top!(SyncGroupResponse),
        ApiKey::Heartbeat => top!(HeartbeatResponse),
        ApiKey::LeaveGroup => top!(LeaveGroupResponse),
        ApiKey::OffsetDelete => top!(OffsetDeleteResponse),
        ApiKey::ConsumerGroupHeartbeat => top!(ConsumerGroupHeartbeatResponse),
        ApiKey::InitProducerId => top!(InitProducerIdResponse),
        ApiKey::AddOffsetsToTxn => top!(AddOffsetsToTxnResponse),
        ApiKey::EndTxn => top!(EndTxnResponse),
        ApiKey::OffsetFetch => decode_response::<OffsetFetchResponse>(api, version, f)
            .map(|r| moved(r.error_code) || r.groups.iter().any(|g| moved(g.error_code)))
            .unwrap_or(false),
        ApiKey::OffsetCommit => decode_response::<OffsetCommitResponse>(api, version, f)
            .map(|r| {
                r.topics
                    .iter()
                    .any(|t| t.partitions.iter().any(|p| moved(p.error_code)))
            })
            .unwrap_or(false),
        ApiKey::TxnOffsetCommit => decode_response::<TxnOffsetCommitResponse>(api, version, f)
            .map(|r| {
                r.topics
                    .iter()
                    .any(|t| t.partitions.iter().any(|p| moved(p.error_code)))
            })
            .unwrap_or(false),
        ApiKey::AddPartitionsToTxn => {
            decode_response::<AddPartitionsToTxnResponse>(api, version, f)
                .map(|r| {
                    moved(r.error_code)
                        || r.results_by_topic_v3_and_below.iter().any(|t| {
                            t.results_by_partition
                                .iter()
                                .any(|p| moved(p.partition_error_code))
                        })
                })
                .unwrap_or(false)
        }
        ApiKey::DescribeGroups => decode_response::<DescribeGroupsResponse>(api, version, f)
            .map(|r| r.groups.iter().any(|g| moved(g.error_code)))
            .unwrap_or(false),
        ApiKey::DeleteGroups => decode_response::<DeleteGroupsResponse>(api, version, f)
            .map(|r| r.results.iter().any(|g| moved(g.error_code)))
            .unwrap_or(false),
        ApiKey::ConsumerGroupDescribe => {
            decode_response::<ConsumerGroupDescribeResponse>(api, version, f)
                .map(|r| r.groups.iter().any(|g| moved(g.error_code)))
                .unwrap_or(false)
        }
        _ => false,
    }
}

/// Group and transaction APIs: forwarded as the client's bytes to the real coordinator.
pub async fn forward_to_coordinator(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
) -> Result<Reply, HandlerError> {
    let (key_type, keys) = coordinator_keys(req)?;
    let mut targets = BTreeMap::new();
    for k in &keys {
        let b = match find_coordinator(ctx, client, key_type, k).await? {
            Some(b) => b,
            // No coordinator yet: any broker answers NOT_COORDINATOR, which clients retry.
            None => any_broker(ctx, client)?,
        };
        targets.entry(b).or_insert_with(Vec::new).push(k.clone());
    }
    let broker = match targets.len() {
        0 => any_broker(ctx, client)?,
        1 => *targets.keys().next().expect("one target"),
        _ => return split_by_coordinator(ctx, client, req, targets).await,
    };
    let sent = match parked_for(req) {
        // Requests the coordinator may hold until a rebalance completes get a connection of
        // their own (as each Kafka consumer has its own coordinator connection).
        Some(timeout) => {
            ctx.pool
                .call_dedicated(broker, client.id, req.api_key, req.frame.clone(), timeout)
                .await
        }
        None => {
            ctx.pool
                .call_raw(broker, client.pin(), req.api_key, req.frame.clone())
                .await
        }
    };
    let resp = match sent {
        Ok(r) => r,
        Err(e) => {
            // The coordinator is unreachable: forget it, and tell the client in the API's own
            // terms (a retriable error) where we can, rather than dropping the connection.
            for k in &keys {
                ctx.coordinators.forget(key_type, k);
            }
            return match coordinator_unavailable(req, &keys)? {
                Some(reply) => {
                    tracing::warn!(api = ?req.api_key, broker, error = %e, "coordinator unreachable; answering COORDINATOR_NOT_AVAILABLE");
                    telemetry::request_upstream_failure(req.api_key, e.kind());
                    Ok(reply)
                }
                None => Err(e.into()),
            };
        }
    };
    if coordinator_moved(req.api_key, req.api_version, &resp) {
        for k in &keys {
            ctx.coordinators.forget(key_type, k);
        }
    }
    if key_type == GROUP
        && let [group] = keys.as_slice()
    {
        observe_group(ctx, client, req, group, &resp);
        if let Some(reply) = nudge_member(ctx, req, group, &resp) {
            return Ok(reply);
        }
    }
    Ok(Reply::Frame(reframe_response(&resp, req.correlation_id())))
}

/// After a managed topic's pool grew, each member of a classic group consuming it is told once
/// (Heartbeat → REBALANCE_IN_PROGRESS) to rejoin: some clients (librdkafka) re-read partition
/// counts for their group only when they join, so without this they would not consume the new
/// partitions until their periodic metadata refresh. KIP-848 groups need nothing: the broker
/// sees the new partitions itself.
fn nudge_member(ctx: &Ctx, req: &RequestFrame, group: &str, resp: &Bytes) -> Option<Reply> {
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

/// How long the coordinator may hold a request before answering, for requests that wait for
/// a rebalance: JoinGroup (up to its rebalance timeout) and SyncGroup (until the leader's
/// assignment arrives, bounded by the same timeout).
fn parked_for(req: &RequestFrame) -> Option<std::time::Duration> {
    let margin = std::time::Duration::from_secs(15);
    match req.api_key {
        ApiKey::JoinGroup => {
            let rebalance_ms = req
                .decode_body::<JoinGroupRequest>()
                .map(|b| {
                    if b.rebalance_timeout_ms > 0 {
                        b.rebalance_timeout_ms
                    } else {
                        b.session_timeout_ms
                    }
                })
                .unwrap_or(300_000)
                .max(0) as u64;
            Some(std::time::Duration::from_millis(rebalance_ms) + margin)
        }
        ApiKey::SyncGroup => Some(std::time::Duration::from_secs(300) + margin),
        _ => None,
    }
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
fn observe_group(ctx: &Ctx, client: &ClientConn, req: &RequestFrame, group: &str, resp: &Bytes) {
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

/// Multi-group requests whose groups live on different coordinators (admin clients batch them
/// because every group's coordinator looks like the same shardgate node).
async fn split_by_coordinator(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
    targets: BTreeMap<i32, Vec<String>>,
) -> Result<Reply, HandlerError> {
    let gid = |s: &String| GroupId(StrBytes::from_string(s.clone()));
    match req.api_key {
        ApiKey::DescribeGroups => {
            let body: DescribeGroupsRequest = req.decode_body()?;
            let mut merged = DescribeGroupsResponse::default();
            for (broker, groups) in targets {
                let mut sub = body.clone();
                sub.groups = groups.iter().map(gid).collect();
                let r: DescribeGroupsResponse = call_typed(ctx, client, broker, req, &sub).await?;
                merged.throttle_time_ms = merged.throttle_time_ms.max(r.throttle_time_ms);
                merged.groups.extend(r.groups);
            }
            typed_reply(req, &merged)
        }
        ApiKey::DeleteGroups => {
            let body: DeleteGroupsRequest = req.decode_body()?;
            let mut merged = DeleteGroupsResponse::default();
            for (broker, groups) in targets {
                let mut sub = body.clone();
                sub.groups_names = groups.iter().map(gid).collect();
                let r: DeleteGroupsResponse = call_typed(ctx, client, broker, req, &sub).await?;
                merged.throttle_time_ms = merged.throttle_time_ms.max(r.throttle_time_ms);
                merged.results.extend(r.results);
            }
            typed_reply(req, &merged)
        }
        ApiKey::ConsumerGroupDescribe => {
            let body: ConsumerGroupDescribeRequest = req.decode_body()?;
            let mut merged = ConsumerGroupDescribeResponse::default();
            for (broker, groups) in targets {
                let mut sub = body.clone();
                sub.group_ids = groups.iter().map(gid).collect();
                let r: ConsumerGroupDescribeResponse =
                    call_typed(ctx, client, broker, req, &sub).await?;
                merged.throttle_time_ms = merged.throttle_time_ms.max(r.throttle_time_ms);
                merged.groups.extend(r.groups);
            }
            typed_reply(req, &merged)
        }
        ApiKey::OffsetFetch => {
            let body: OffsetFetchRequest = req.decode_body()?;
            let mut merged = OffsetFetchResponse::default();
            for (broker, groups) in targets {
                let mut sub = body.clone();
                sub.groups
                    .retain(|g| groups.iter().any(|k| g.group_id.as_str() == k.as_str()));
                let r: OffsetFetchResponse = call_typed(ctx, client, broker, req, &sub).await?;
                merged.throttle_time_ms = merged.throttle_time_ms.max(r.throttle_time_ms);
                merged.groups.extend(r.groups);
            }
            typed_reply(req, &merged)
        }
        other => Err(HandlerError::Protocol(
            crate::protocol::ProtocolError::Decode {
                what: format!("{other:?}"),
                message: "request names several coordinator keys but cannot be split".into(),
            },
        )),
    }
}

/// Admin APIs any broker serves (KRaft brokers forward controller-bound requests).
pub async fn forward_to_any(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
) -> Result<Reply, HandlerError> {
    let broker = any_broker(ctx, client)?;
    let resp = ctx
        .pool
        .call_raw(broker, client.pin(), req.api_key, req.frame.clone())
        .await?;
    if matches!(
        req.api_key,
        ApiKey::CreateTopics | ApiKey::DeleteTopics | ApiKey::CreatePartitions
    ) {
        // Leaders of new partitions must be known before clients produce to them.
        ctx.topology().request_refresh();
    }
    Ok(Reply::Frame(reframe_response(&resp, req.correlation_id())))
}

/// ListGroups: each broker knows only the groups it coordinates.
pub async fn list_groups(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
) -> Result<Reply, HandlerError> {
    let body: ListGroupsRequest = req.decode_body()?;
    let brokers: Vec<i32> = ctx.topology().load().brokers.keys().copied().collect();
    if brokers.is_empty() {
        return Err(UpstreamError::NoBroker.into());
    }
    let frame = encode_request(
        req.api_key,
        req.api_version,
        req.header.client_id.clone(),
        &body,
    )?;
    let calls = brokers.iter().map(|b| {
        let frame = frame.clone();
        async move {
            let raw = ctx
                .pool
                .call_raw(*b, client.pin(), req.api_key, frame)
                .await?;
            Ok::<ListGroupsResponse, HandlerError>(decode_response(
                req.api_key,
                req.api_version,
                raw,
            )?)
        }
    });
    let mut merged = ListGroupsResponse::default();
    for r in futures::future::join_all(calls).await {
        match r {
            Ok(r) => {
                merged.throttle_time_ms = merged.throttle_time_ms.max(r.throttle_time_ms);
                if merged.error_code == 0 {
                    merged.error_code = r.error_code;
                }
                merged.groups.extend(r.groups);
            }
            Err(e) => {
                tracing::warn!(error = %e, "ListGroups: a broker did not answer");
                merged.error_code = codes::COORDINATOR_NOT_AVAILABLE;
            }
        }
    }
    typed_reply(req, &merged)
}

/// A COORDINATOR_NOT_AVAILABLE answer in the API's own shape, for APIs with a top-level or
/// per-group error code. `None` where the API has no such field (the connection is closed
/// instead, which clients also retry).
fn coordinator_unavailable(
    req: &RequestFrame,
    keys: &[String],
) -> Result<Option<Reply>, HandlerError> {
    let code = codes::COORDINATOR_NOT_AVAILABLE;
    let reply = match req.api_key {
        ApiKey::JoinGroup => typed_reply(req, &JoinGroupResponse::default().with_error_code(code))?,
        ApiKey::SyncGroup => typed_reply(req, &SyncGroupResponse::default().with_error_code(code))?,
        ApiKey::Heartbeat => typed_reply(req, &HeartbeatResponse::default().with_error_code(code))?,
        ApiKey::LeaveGroup => {
            typed_reply(req, &LeaveGroupResponse::default().with_error_code(code))?
        }
        ApiKey::ConsumerGroupHeartbeat => typed_reply(
            req,
            &ConsumerGroupHeartbeatResponse::default().with_error_code(code),
        )?,
        ApiKey::InitProducerId => typed_reply(
            req,
            &InitProducerIdResponse::default()
                .with_error_code(code)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1),
        )?,
        ApiKey::AddOffsetsToTxn => typed_reply(
            req,
            &AddOffsetsToTxnResponse::default().with_error_code(code),
        )?,
        ApiKey::EndTxn => typed_reply(req, &EndTxnResponse::default().with_error_code(code))?,
        ApiKey::OffsetFetch if req.api_version >= 8 => {
            let groups = keys
                .iter()
                .map(|k| {
                    offset_fetch_response::OffsetFetchResponseGroup::default()
                        .with_group_id(GroupId(StrBytes::from_string(k.clone())))
                        .with_error_code(code)
                })
                .collect();
            typed_reply(req, &OffsetFetchResponse::default().with_groups(groups))?
        }
        ApiKey::OffsetFetch => {
            typed_reply(req, &OffsetFetchResponse::default().with_error_code(code))?
        }
        ApiKey::DescribeGroups => {
            let groups = keys
                .iter()
                .map(|k| {
                    describe_groups_response::DescribedGroup::default()
                        .with_group_id(GroupId(StrBytes::from_string(k.clone())))
                        .with_error_code(code)
                })
                .collect();
            typed_reply(req, &DescribeGroupsResponse::default().with_groups(groups))?
        }
        _ => return Ok(None),
    };
    Ok(Some(reply))
}
