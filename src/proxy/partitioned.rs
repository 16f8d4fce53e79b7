//! Requests addressed to partition leaders that need no waiting or record handling
//! (ListOffsets, OffsetForLeaderEpoch, DeleteRecords): one small trait says how to split each
//! by partition and merge the answers; one function does the fan-out for all of them.

use std::collections::BTreeMap;

use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsTopicResult,
};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::offset_for_leader_epoch_response::{
    EpochEndOffset, OffsetForLeaderTopicResult,
};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

use super::connection::ClientConn;
use super::{Ctx, HandlerError, Reply};
use crate::auth::acl::Operation;
use crate::protocol::{RequestFrame, codes, decode_response, encode_request, encode_response};
use crate::telemetry;
use crate::upstream::pool::Socket;
use std::time::Duration;

pub trait Splittable: Decodable + Encodable + HeaderVersion + Clone {
    type Resp: Decodable + Encodable + Default;
    /// Every (topic, partition) the request names.
    fn partitions(&self) -> Vec<(StrBytes, i32)>;
    /// Keeps only the partitions `keep` accepts (and drops topics left empty).
    fn retain(&mut self, keep: &dyn Fn(&str, i32) -> bool);
    fn merge(into: &mut Self::Resp, from: Self::Resp);
    /// Adds an error answer for one partition.
    fn error(resp: &mut Self::Resp, topic: &StrBytes, partition: i32, code: i16);
    /// Every partition error code in a response.
    fn codes(resp: &Self::Resp) -> Vec<i16>;
    /// Forces the fields a client could pose as a broker with (see `client_fields`).
    fn as_consumer(&mut self, _version: i16) -> Vec<super::client_fields::Rewrite> {
        Vec::new()
    }
}

fn tname(s: &StrBytes) -> TopicName {
    TopicName(s.clone())
}

impl Splittable for ListOffsetsRequest {
    type Resp = ListOffsetsResponse;
    fn as_consumer(&mut self, _version: i16) -> Vec<super::client_fields::Rewrite> {
        super::client_fields::list_offsets_as_consumer(self)
    }
    fn partitions(&self) -> Vec<(StrBytes, i32)> {
        self.topics
            .iter()
            .flat_map(|t| {
                t.partitions
                    .iter()
                    .map(|p| (t.name.0.clone(), p.partition_index))
            })
            .collect()
    }
    fn retain(&mut self, keep: &dyn Fn(&str, i32) -> bool) {
        for t in &mut self.topics {
            let n = t.name.0.clone();
            t.partitions.retain(|p| keep(&n, p.partition_index));
        }
        self.topics.retain(|t| !t.partitions.is_empty());
    }
    fn merge(into: &mut Self::Resp, from: Self::Resp) {
        into.throttle_time_ms = into.throttle_time_ms.max(from.throttle_time_ms);
        into.topics.extend(from.topics);
    }
    fn error(resp: &mut Self::Resp, topic: &StrBytes, partition: i32, code: i16) {
        resp.topics.push(
            ListOffsetsTopicResponse::default()
                .with_name(tname(topic))
                .with_partitions(vec![
                    ListOffsetsPartitionResponse::default()
                        .with_partition_index(partition)
                        .with_error_code(code)
                        .with_offset(-1)
                        .with_timestamp(-1),
                ]),
        );
    }
    fn codes(resp: &Self::Resp) -> Vec<i16> {
        resp.topics
            .iter()
            .flat_map(|t| t.partitions.iter().map(|p| p.error_code))
            .collect()
    }
}

impl Splittable for OffsetForLeaderEpochRequest {
    type Resp = OffsetForLeaderEpochResponse;
    fn as_consumer(&mut self, version: i16) -> Vec<super::client_fields::Rewrite> {
        super::client_fields::offset_for_leader_epoch_as_consumer(self, version)
    }
    fn partitions(&self) -> Vec<(StrBytes, i32)> {
        self.topics
            .iter()
            .flat_map(|t| {
                t.partitions
                    .iter()
                    .map(|p| (t.topic.0.clone(), p.partition))
            })
            .collect()
    }
    fn retain(&mut self, keep: &dyn Fn(&str, i32) -> bool) {
        for t in &mut self.topics {
            let n = t.topic.0.clone();
            t.partitions.retain(|p| keep(&n, p.partition));
        }
        self.topics.retain(|t| !t.partitions.is_empty());
    }
    fn merge(into: &mut Self::Resp, from: Self::Resp) {
        into.throttle_time_ms = into.throttle_time_ms.max(from.throttle_time_ms);
        into.topics.extend(from.topics);
    }
    fn error(resp: &mut Self::Resp, topic: &StrBytes, partition: i32, code: i16) {
        resp.topics.push(
            OffsetForLeaderTopicResult::default()
                .with_topic(tname(topic))
                .with_partitions(vec![
                    EpochEndOffset::default()
                        .with_partition(partition)
                        .with_error_code(code)
                        .with_leader_epoch(-1)
                        .with_end_offset(-1),
                ]),
        );
    }
    fn codes(resp: &Self::Resp) -> Vec<i16> {
        resp.topics
            .iter()
            .flat_map(|t| t.partitions.iter().map(|p| p.error_code))
            .collect()
    }
}

impl Splittable for DeleteRecordsRequest {
    type Resp = DeleteRecordsResponse;
    fn partitions(&self) -> Vec<(StrBytes, i32)> {
        self.topics
            .iter()
            .flat_map(|t| {
                t.partitions
                    .iter()
                    .map(|p| (t.name.0.clone(), p.partition_index))
            })
            .collect()
    }
    fn retain(&mut self, keep: &dyn Fn(&str, i32) -> bool) {
        for t in &mut self.topics {
            let n = t.name.0.clone();
            t.partitions.retain(|p| keep(&n, p.partition_index));
        }
        self.topics.retain(|t| !t.partitions.is_empty());
    }
    fn merge(into: &mut Self::Resp, from: Self::Resp) {
        into.throttle_time_ms = into.throttle_time_ms.max(from.throttle_time_ms);
        into.topics.extend(from.topics);
    }
    fn error(resp: &mut Self::Resp, topic: &StrBytes, partition: i32, code: i16) {
        resp.topics.push(
            DeleteRecordsTopicResult::default()
                .with_name(tname(topic))
                .with_partitions(vec![
                    DeleteRecordsPartitionResult::default()
                        .with_partition_index(partition)
                        .with_error_code(code)
                        .with_low_watermark(-1),
                ]),
        );
    }
    fn codes(resp: &Self::Resp) -> Vec<i16> {
        resp.topics
            .iter()
            .flat_map(|t| t.partitions.iter().map(|p| p.error_code))
            .collect()
    }
}

pub async fn handle(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
) -> Result<Reply, HandlerError> {
    match req.api_key {
        ApiKey::ListOffsets => split_merge::<ListOffsetsRequest>(ctx, client, req).await,
        ApiKey::OffsetForLeaderEpoch => {
            split_merge::<OffsetForLeaderEpochRequest>(ctx, client, req).await
        }
        ApiKey::DeleteRecords => split_merge::<DeleteRecordsRequest>(ctx, client, req).await,
        other => Err(HandlerError::Protocol(
            crate::protocol::ProtocolError::Decode {
                what: format!("{other:?}"),
                message: "not a partition-leader API".into(),
            },
        )),
    }
}

/// Leaders of the given partitions; refreshes the topology once if some are unknown.
pub async fn leaders(
    ctx: &Ctx,
    parts: &[(StrBytes, i32)],
) -> BTreeMap<(StrBytes, i32), Option<i32>> {
    let mut topo = ctx.topology().load();
    if parts.iter().any(|(t, p)| topo.leader(t, *p).is_none()) {
        ctx.topology()
            .refresh_after(topo.version, Duration::from_secs(2))
            .await;
        topo = ctx.topology().load();
    }
    parts
        .iter()
        .map(|(t, p)| ((t.clone(), *p), topo.leader(t, *p)))
        .collect()
}

async fn split_merge<R: Splittable>(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
) -> Result<Reply, HandlerError> {
    let mut body: R = req.decode_body()?;
    let forced = body.as_consumer(req.api_version);
    super::client_fields::report(
        client,
        req.api_key,
        req.header.client_id.as_deref(),
        &forced,
    );
    let mut merged = R::Resp::default();
    if let Some(access) = super::authorize::Access::of(ctx, client, req.api_key) {
        let op = match req.api_key {
            ApiKey::DeleteRecords => Operation::Delete,
            _ => Operation::Describe,
        };
        let parts = body.partitions();
        let mut names: Vec<&str> = parts.iter().map(|(t, _)| t.as_str()).collect();
        names.dedup();
        let denied: Vec<String> = access
            .denied_topics(op, &names)
            .into_iter()
            .map(str::to_string)
            .collect();
        if !denied.is_empty() {
            for (t, p) in parts
                .iter()
                .filter(|(t, _)| denied.iter().any(|d| d == t.as_str()))
            {
                R::error(&mut merged, t, *p, codes::TOPIC_AUTHORIZATION_FAILED);
            }
            body.retain(&|t, _| !denied.iter().any(|d| d == t));
        }
    }
    let parts = body.partitions();
    let leaders = leaders(ctx, &parts).await;
    let mut by_broker: BTreeMap<i32, R> = BTreeMap::new();
    for ((topic, partition), leader) in &leaders {
        match leader {
            Some(b) => {
                by_broker.entry(*b).or_insert_with(|| {
                    let mut sub = body.clone();
                    let b = *b;
                    let l = &leaders;
                    sub.retain(&|t, p| {
                        l.get(&(StrBytes::from_string(t.to_string()), p))
                            .copied()
                            .flatten()
                            == Some(b)
                    });
                    sub
                });
            }
            None => R::error(
                &mut merged,
                topic,
                *partition,
                codes::NOT_LEADER_OR_FOLLOWER,
            ),
        }
    }
    let calls = by_broker.into_iter().map(|(broker, sub)| async move {
        let frame = encode_request(
            req.api_key,
            req.api_version,
            req.header.client_id.clone(),
            &sub,
        )?;
        // DeleteRecords waits for followers: the client's own socket (see sockets.rs).
        let (socket, timeout) = match req.api_key {
            ApiKey::DeleteRecords => super::sockets::for_admin(client),
            _ => (Socket::Shared(client.pin()), None),
        };
        let result = async {
            ctx.pool
                .send(broker, socket, req.api_key, frame, true, timeout)
                .await?
                .wait()
                .await?
                .ok_or(crate::upstream::UpstreamError::Protocol(
                    "no response".into(),
                ))
        }
        .await;
        Ok::<_, HandlerError>((sub, result))
    });
    let mut stale = false;
    for r in futures::future::join_all(calls).await {
        let (sub, result) = r?;
        match result.map_err(HandlerError::from).and_then(|raw| {
            Ok(decode_response::<R::Resp>(
                req.api_key,
                req.api_version,
                raw,
            )?)
        }) {
            Ok(resp) => {
                for c in R::codes(&resp) {
                    telemetry::upstream_code(req.api_key, c);
                    stale |= codes::stale_leader(c);
                }
                R::merge(&mut merged, resp);
            }
            Err(e) => {
                tracing::debug!(error = %e, api = ?req.api_key, "sub-request failed; answering retriable errors");
                stale = true;
                for (t, p) in sub.partitions() {
                    R::error(&mut merged, &t, p, codes::NOT_LEADER_OR_FOLLOWER);
                }
            }
        }
    }
    if stale {
        ctx.topology().request_refresh();
    }
    Ok(Reply::Frame(encode_response(
        req.api_key,
        req.api_version,
        req.correlation_id(),
        &merged,
    )?))
}
