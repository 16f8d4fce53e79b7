//! Group and transaction APIs: find the real coordinator of each key (cached, forgotten when it
//! moves), forward the client's bytes to it, and answer COORDINATOR_NOT_AVAILABLE in the API's
//! own shape when it cannot be reached.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

use super::connection::ClientConn;
use super::forward::{any_broker, typed_reply};
use super::{Ctx, HandlerError, Reply};
use crate::protocol::{RequestFrame, codes, decode_response};
use crate::telemetry;

pub const GROUP: i8 = 0;

pub const TXN: i8 = 1;

const MAX_CACHED_COORDINATORS: usize = 100_000;

/// Real coordinators by (key type, key), learned from FindCoordinator upstream and forgotten
/// on NOT_COORDINATOR / COORDINATOR_NOT_AVAILABLE.
#[derive(Default)]
pub struct CoordinatorCache {
    map: Mutex<HashMap<(i8, String), i32>>,
}

impl CoordinatorCache {
    pub(super) fn get(&self, key_type: i8, key: &str) -> Option<i32> {
        self.map
            .lock()
            .expect("coordinator cache")
            .get(&(key_type, key.to_string()))
            .copied()
    }
    pub(super) fn put(&self, key_type: i8, key: &str, broker: i32) {
        let mut m = self.map.lock().expect("coordinator cache");
        if m.len() >= MAX_CACHED_COORDINATORS {
            // Keys are client-chosen group and transaction ids: bounded by starting over
            // (entries are relearned with one FindCoordinator each).
            m.clear();
        }
        m.insert((key_type, key.to_string()), broker);
    }
    pub(super) fn forget(&self, key_type: i8, key: &str) {
        self.map
            .lock()
            .expect("coordinator cache")
            .remove(&(key_type, key.to_string()));
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
    ctx: &Arc<Ctx>,
    client: &ClientConn,
    req: &RequestFrame,
) -> Result<Reply, HandlerError> {
    let (key_type, keys) = coordinator_keys(req)?;
    if key_type == GROUP {
        for k in &keys {
            super::rebalance_offsets::commits_change(ctx, req.api_key, k);
        }
    }
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
        _ => return super::multi_group::split_by_coordinator(ctx, client, req, targets).await,
    };
    if key_type == GROUP
        && let [group] = keys.as_slice()
    {
        use super::rebalance_offsets as ahead;
        match req.api_key {
            ApiKey::SyncGroup => ahead::leader_sync(ctx, client, req, broker),
            ApiKey::OffsetFetch => {
                if let Some(reply) = ahead::answer_offset_fetch(ctx, client, req, group).await? {
                    return Ok(reply);
                }
            }
            _ => {}
        }
    }
    let sent = match super::sockets::parked_for(req) {
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
            return match error_answer(req, &keys, codes::COORDINATOR_NOT_AVAILABLE)? {
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
        super::observe::observe_group(ctx, client, req, group, &resp);
        if let Some(reply) = super::observe::nudge_member(ctx, req, group, &resp) {
            return Ok(reply);
        }
    }
    Ok(Reply::Forwarded {
        correlation_id: req.correlation_id(),
        upstream: resp,
    })
}

/// An answer with `code` in the API's own shape (COORDINATOR_NOT_AVAILABLE, or an
/// authorization failure), for APIs with a top-level or per-group error code. `None` where
/// the API has no such field.
pub(super) fn error_answer(
    req: &RequestFrame,
    keys: &[String],
    code: i16,
) -> Result<Option<Reply>, HandlerError> {
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
