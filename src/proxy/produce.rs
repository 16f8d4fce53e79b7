//! The produce path: unmanaged topics are split by upstream partition leader and queued on
//! the client's pinned upstream connections in arrival order, record batches never decoded
//! (slices of the client's frame); managed topics go to `shards::produce`. Answers are merged
//! in the client's order.

use std::collections::BTreeMap;
use std::time::Duration;

use kafka_protocol::messages::produce_request::TopicProduceData;
use kafka_protocol::messages::produce_response::{
    LeaderIdAndEpoch, PartitionProduceResponse, TopicProduceResponse,
};
use kafka_protocol::messages::{ApiKey, ProduceRequest, ProduceResponse, TopicName};
use kafka_protocol::protocol::StrBytes;

use super::connection::ClientConn;
use super::{Ctx, HandlerError, Reply};
use crate::auth::acl::{Operation, ResourceType};
use crate::protocol::{
    RequestFrame, TopicRef, codes, decode_response, encode_request, encode_response,
};
use crate::shards::produce::ManagedPart;
use crate::telemetry;
use crate::upstream::pool::PendingReply;

/// One upstream part of a produce: its partitions and the queued request.
type SubProduce = (Vec<(TopicRef, i32)>, Result<PendingReply, HandlerError>);

pub struct PendingProduce {
    client: ClientConn,
    api_version: i16,
    correlation_id: i32,
    acks: i16,
    /// Every (topic, partition) in client order, for the response.
    order: Vec<(TopicRef, i32)>,
    subs: Vec<SubProduce>,
    /// Partitions answered without going upstream: (code, message).
    local_errors: BTreeMap<(TopicRef, i32), (i16, Option<String>)>,
    /// Managed topics: what became of each client partition, keyed like `order`.
    managed: BTreeMap<(TopicRef, i32), ManagedPart>,
}

/// What the produces a client connection has in flight went on: the kind of socket and, per
/// broker, the connection. A produce that would go elsewhere waits until they are answered
/// (`SendError::SocketChange`): on two sockets to one broker it could overtake them.
#[derive(Default)]
pub struct Lane {
    own: Option<bool>,
    conns: std::collections::HashMap<i32, u64>,
}

pub async fn handle(
    ctx: &Ctx,
    client: &ClientConn,
    req: RequestFrame,
) -> Result<Reply, HandlerError> {
    match send(ctx, client, &req, &mut Lane::default(), false).await {
        Ok(p) => p.finish(ctx).await,
        Err(SendError::Handler(e)) => Err(e),
        Err(SendError::SocketChange) => unreachable!("nothing in flight"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Handler(#[from] HandlerError),
    /// The request would go on another upstream socket (another kind, or a connection that
    /// replaced the one the produces in flight went on: retired at the end of its SASL
    /// session, reconnected) than the produces still in flight; the caller lets those be
    /// answered, then sends again.
    #[error("produce socket changes while produces are in flight")]
    SocketChange,
}

impl From<crate::protocol::ProtocolError> for SendError {
    fn from(e: crate::protocol::ProtocolError) -> Self {
        SendError::Handler(e.into())
    }
}

/// Routes and queues the request upstream. Only queueing is awaited here, so the caller can
/// keep the client's produce order while answers are awaited concurrently.
///
/// `lane` is what the client's produces in flight went on; with `in_flight`, a produce needing
/// another socket is not sent (`SendError::SocketChange`): two sockets to one broker could
/// reorder the client's batches.
pub async fn send(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
    lane: &mut Lane,
    in_flight: bool,
) -> Result<PendingProduce, SendError> {
    let body: ProduceRequest = req.decode_body()?;
    let wants_own = super::sockets::produce_on_own(ctx, client, req, body.acks);
    if !in_flight {
        lane.conns.clear();
    }
    if in_flight && lane.own.is_some_and(|o| o != wants_own) {
        return Err(SendError::SocketChange);
    }
    lane.own = Some(wants_own);
    let by_id = req.api_version >= 13;
    let mut topo = ctx.topology().load();
    let resolve =
        |topo: &crate::upstream::topology::Topology, t: &TopicProduceData| -> Option<StrBytes> {
            if by_id {
                topo.topic_name(&t.topic_id).cloned()
            } else {
                Some(t.name.0.clone())
            }
        };
    let unknown = body.topic_data.iter().any(|t| {
        resolve(&topo, t).is_none_or(|n| {
            t.partition_data
                .iter()
                .any(|p| topo.leader(&n, p.index).is_none())
        })
    });
    if unknown {
        ctx.topology()
            .refresh_after(topo.version, Duration::from_secs(2))
            .await;
        topo = ctx.topology().load();
    }

    let mut order = Vec::new();
    let mut local_errors = BTreeMap::new();
    let mut managed = BTreeMap::new();
    let loaded = ctx.shards.loaded();
    let mut by_broker: BTreeMap<i32, (ProduceRequest, Vec<(TopicRef, i32)>)> = BTreeMap::new();
    let mut terms = crate::shards::produce::ProduceTerms {
        acks: body.acks,
        timeout_ms: body.timeout_ms,
        transactional: body.transactional_id.is_some(),
        allowance: ctx.managed.decompression_allowance(),
    };
    // Authorization: WRITE on the transactional id (every partition refused) and on each topic.
    let access = super::authorize::Access::of(ctx, client, ApiKey::Produce);
    let txn_denied = access.as_ref().is_some_and(|a| {
        body.transactional_id.as_ref().is_some_and(|t| {
            let ok = a.allows(Operation::Write, ResourceType::TransactionalId, t.as_str());
            if !ok {
                a.refused(
                    Operation::Write,
                    ResourceType::TransactionalId,
                    &[t.as_str()],
                );
            }
            !ok
        })
    });
    for t in &body.topic_data {
        let name = resolve(&topo, t);
        let tref = TopicRef {
            name: t.name.0.clone(),
            id: t.topic_id,
        };
        let denied = match (&access, &name) {
            _ if txn_denied => Some(codes::TRANSACTIONAL_ID_AUTHORIZATION_FAILED),
            (Some(a), Some(n)) if !a.denied_topics(Operation::Write, &[n.as_str()]).is_empty() => {
                Some(codes::TOPIC_AUTHORIZATION_FAILED)
            }
            _ => None,
        };
        if let Some(code) = denied {
            for p in &t.partition_data {
                order.push((tref.clone(), p.index));
                local_errors.insert((tref.clone(), p.index), (code, None));
            }
            continue;
        }
        if !loaded {
            // Until the stored shard maps are loaded we cannot tell managed topics from
            // plain ones: a retriable error beats writing records to the wrong partition.
            for p in &t.partition_data {
                order.push((tref.clone(), p.index));
                local_errors.insert((tref.clone(), p.index), (codes::LEADER_NOT_AVAILABLE, None));
            }
            continue;
        }
        if name.as_ref().is_some_and(|n| ctx.shards.is_managed(n)) && ctx.shards.fenced() {
            // Wait (within the request's timeout) rather than refuse at once: refusing this
            // request and accepting the client's next one would reorder its batches.
            let limit = Duration::from_millis(body.timeout_ms.clamp(0, 30_000) as u64);
            ctx.shards.wait_unfenced(limit).await;
        }
        if let Some((m, guard)) = name.as_ref().and_then(|n| ctx.shards.enter(n)) {
            if !ctx.shards.may_write(&guard) {
                // The store session may have lapsed: the map may be stale. Retriable.
                drop(guard);
                metrics::counter!("shardgate_fenced_produces_total").increment(1);
                for p in &t.partition_data {
                    order.push((tref.clone(), p.index));
                    let message = "shardgate instance fenced: its store session lapsed; retry";
                    local_errors.insert(
                        (tref.clone(), p.index),
                        (codes::NOT_LEADER_OR_FOLLOWER, Some(message.to_string())),
                    );
                }
                continue;
            }
            for mp in ctx.managed.route(&guard, &m, &t.partition_data, &mut terms) {
                order.push((tref.clone(), mp.index()));
                managed.insert((tref.clone(), mp.index()), mp);
            }
            continue;
        }
        for p in &t.partition_data {
            order.push((tref.clone(), p.index));
            let leader = name.as_ref().and_then(|n| topo.leader(n, p.index));
            let Some(broker) = leader else {
                let code = match &name {
                    None if by_id => codes::UNKNOWN_TOPIC_ID,
                    Some(n) if !topo.topics.contains_key(n) => codes::UNKNOWN_TOPIC_OR_PARTITION,
                    None => codes::UNKNOWN_TOPIC_OR_PARTITION,
                    Some(_) => codes::NOT_LEADER_OR_FOLLOWER,
                };
                local_errors.insert((tref.clone(), p.index), (code, None));
                continue;
            };
            let (sub, parts) = by_broker.entry(broker).or_insert_with(|| {
                let mut r = body.clone();
                r.topic_data.clear();
                (r, Vec::new())
            });
            match sub
                .topic_data
                .iter_mut()
                .find(|x| x.name == t.name && x.topic_id == t.topic_id)
            {
                Some(x) => x.partition_data.push(p.clone()),
                None => {
                    let mut x = t.clone();
                    x.partition_data = vec![p.clone()];
                    sub.topic_data.push(x);
                }
            }
            parts.push((tref.clone(), p.index));
        }
    }

    let expect_response = body.acks != 0;
    let single = by_broker.len() == 1 && local_errors.is_empty() && managed.is_empty();
    // Every part's connection first: if one changed under produces in flight, nothing of
    // this request is sent yet.
    let (socket, timeout) = super::sockets::for_produce(client, wants_own, body.timeout_ms);
    let mut parts = Vec::with_capacity(by_broker.len());
    for (broker, part) in by_broker {
        let conn = ctx.pool.connection(broker, socket).await;
        if let Ok(c) = &conn
            && in_flight
            && lane.conns.get(&broker).is_some_and(|id| *id != c.id)
        {
            return Err(SendError::SocketChange);
        }
        parts.push((broker, part, conn));
    }
    let mut subs = Vec::with_capacity(parts.len());
    for (broker, (sub, parts), conn) in parts {
        // One leader for everything: forward the client's own bytes untouched.
        let frame = if single {
            Ok(req.frame.clone())
        } else {
            encode_request(
                ApiKey::Produce,
                req.api_version,
                req.header.client_id.clone(),
                &sub,
            )
        };
        let pending = match (frame, conn) {
            (Ok(f), Ok(conn)) => {
                lane.conns.insert(broker, conn.id);
                ctx.pool
                    .send_on(conn, ApiKey::Produce, f, expect_response, timeout)
                    .await
                    .map_err(HandlerError::from)
            }
            (Err(e), _) => Err(e.into()),
            (_, Err(e)) => Err(e.into()),
        };
        subs.push((parts, pending));
    }
    Ok(PendingProduce {
        client: client.clone(),
        api_version: req.api_version,
        correlation_id: req.correlation_id(),
        acks: body.acks,
        order,
        subs,
        local_errors,
        managed,
    })
}

impl PendingProduce {
    /// The one upstream answer to a produce sent whole to one broker, passed on as it came
    /// (no re-encoding, body not copied) when nothing in it must change: no partition names a
    /// leader hint (KIP-951 hints name real brokers) and no error asks for a refresh.
    fn pass_through(&self, raw: &bytes::Bytes) -> Option<Reply> {
        let resp =
            decode_response::<ProduceResponse>(ApiKey::Produce, self.api_version, raw.clone())
                .ok()?;
        let plain = resp.responses.iter().all(|t| {
            t.partition_responses.iter().all(|p| {
                p.error_code == codes::NONE && p.current_leader == LeaderIdAndEpoch::default()
            })
        });
        if !plain || self.acks == 0 {
            return None;
        }
        self.client.note_throttle(resp.throttle_time_ms);
        for t in &resp.responses {
            for p in &t.partition_responses {
                telemetry::upstream_code(ApiKey::Produce, p.error_code);
            }
        }
        Some(Reply::Forwarded {
            correlation_id: self.correlation_id,
            upstream: raw.clone(),
        })
    }

    pub async fn finish(mut self, ctx: &Ctx) -> Result<Reply, HandlerError> {
        let version = self.api_version;
        let mut answers: BTreeMap<(TopicRef, i32), PartitionProduceResponse> = BTreeMap::new();
        let mut throttle = 0;
        let mut stale = false;
        let error_answer = |index: i32, code: i16| {
            PartitionProduceResponse::default()
                .with_index(index)
                .with_error_code(code)
                .with_base_offset(-1)
                .with_log_append_time_ms(-1)
                .with_log_start_offset(-1)
        };
        let waits = std::mem::take(&mut self.subs)
            .into_iter()
            .map(|(parts, pending)| async move {
                let result = match pending {
                    Ok(p) => p.wait().await.map_err(HandlerError::from),
                    Err(e) => Err(e),
                };
                (parts, result)
            });
        let results = futures::future::join_all(waits).await;
        let alone = self.local_errors.is_empty() && self.managed.is_empty();
        if let [(_, Ok(Some(raw)))] = results.as_slice()
            && alone
            && let Some(reply) = self.pass_through(raw)
        {
            return Ok(reply);
        }
        for (parts, result) in results {
            let decoded = result.and_then(|raw| match raw {
                None => Ok(None),
                Some(raw) => Ok(Some(decode_response::<ProduceResponse>(
                    ApiKey::Produce,
                    version,
                    raw,
                )?)),
            });
            match decoded {
                Ok(Some(resp)) => {
                    throttle = throttle.max(resp.throttle_time_ms);
                    self.client.note_throttle(resp.throttle_time_ms);
                    let topo = ctx.topology().load();
                    for t in resp.responses {
                        let name = topo
                            .topic_name(&t.topic_id)
                            .cloned()
                            .unwrap_or_else(|| t.name.0.clone());
                        let tref = TopicRef {
                            name: t.name.0.clone(),
                            id: t.topic_id,
                        };
                        for mut p in t.partition_responses {
                            telemetry::upstream_code(ApiKey::Produce, p.error_code);
                            if p.error_code != codes::NONE && !codes::stale_leader(p.error_code) {
                                tracing::warn!(
                                    topic = %name,
                                    partition = p.index,
                                    code = p.error_code,
                                    message = ?p.error_message,
                                    record_errors = ?p.record_errors,
                                    "upstream refused a produce"
                                );
                            }
                            stale |= codes::stale_leader(p.error_code);
                            // KIP-951 hints name real brokers: clear them; clients refresh
                            // metadata from us instead.
                            p.current_leader = LeaderIdAndEpoch::default();
                            answers.insert((tref.clone(), p.index), p);
                        }
                    }
                }
                Ok(None) => {} // acks=0: nothing to answer
                Err(e) => {
                    tracing::debug!(error = %e, "produce sub-request failed; answering NOT_LEADER_OR_FOLLOWER");
                    stale = true;
                    for key in parts {
                        let idx = key.1;
                        answers.insert(key, error_answer(idx, codes::NOT_LEADER_OR_FOLLOWER));
                    }
                }
            }
        }
        let mut local = BTreeMap::new();
        for (key, (code, message)) in self.local_errors {
            stale |= codes::stale_leader(code) || code == codes::LEADER_NOT_AVAILABLE;
            let idx = key.1;
            local.insert(
                key,
                error_answer(idx, code).with_error_message(message.map(StrBytes::from_string)),
            );
        }
        // Managed parts: every job is awaited, even for acks=0, so the routed epoch stays in
        // flight until the records are written (seal protocol).
        let mut managed_answers = BTreeMap::new();
        for (key, mp) in self.managed {
            let answer = ctx.managed.answer(mp).await;
            managed_answers.insert(key, answer);
        }
        if stale {
            ctx.topology().request_refresh();
        }
        if self.acks == 0 {
            // Kafka closes a connection whose acks=0 produce it refused: the only signal such
            // a producer gets.
            let refused = local.values().any(|p: &PartitionProduceResponse| {
                matches!(
                    p.error_code,
                    codes::TOPIC_AUTHORIZATION_FAILED
                        | codes::TRANSACTIONAL_ID_AUTHORIZATION_FAILED
                )
            });
            return Ok(if refused {
                Reply::Close("acks=0 produce refused by authorization".into())
            } else {
                Reply::Nothing
            });
        }
        let mut resp = ProduceResponse::default().with_throttle_time_ms(throttle);
        for (tref, index) in self.order {
            let key = (tref.clone(), index);
            let answer = if let Some(a) = local.remove(&key) {
                a
            } else if let Some(a) = managed_answers.remove(&key) {
                a
            } else {
                answers
                    .remove(&key)
                    .unwrap_or_else(|| error_answer(index, codes::UNKNOWN_SERVER_ERROR))
            };
            match resp
                .responses
                .iter_mut()
                .find(|t| t.name.0 == tref.name && t.topic_id == tref.id)
            {
                Some(t) => t.partition_responses.push(answer),
                None => resp.responses.push(
                    TopicProduceResponse::default()
                        .with_name(TopicName(tref.name.clone()))
                        .with_topic_id(tref.id)
                        .with_partition_responses(vec![answer]),
                ),
            }
        }
        Ok(Reply::Frame(encode_response(
            ApiKey::Produce,
            version,
            self.correlation_id,
            &resp,
        )?))
    }
}
