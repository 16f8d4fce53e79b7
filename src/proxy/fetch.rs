//! The fetch path: split by upstream partition leader, fan out, merge, and honour the client's
//! `max_wait_ms`/`min_bytes` over the whole request.
//!
//! Upstream fetches are sent with `max_wait_ms = 0`: a Kafka broker serves one request at a
//! time per connection, so a parked long-poll on a shared upstream connection would stall every
//! other client pinned to it. Waiting happens here instead, in the request's own task: until
//! enough bytes arrived or the wait ran out, the request sleeps on the produce signals of its
//! partitions (woken at once by produces through shardgate) with a bounded poll interval as a
//! fallback for data produced directly to Kafka.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use kafka_protocol::messages::fetch_response::{
    FetchableTopicResponse, LeaderIdAndEpoch, PartitionData,
};
use kafka_protocol::messages::{ApiKey, BrokerId, FetchRequest, FetchResponse, TopicName};

use super::connection::ClientConn;
use super::{Ctx, HandlerError, Reply};
use crate::protocol::{
    RequestFrame, TopicRef, codes, decode_response, encode_request, encode_response,
};
use crate::shards::gates::{Consumer, records_before};
use crate::telemetry;
use crate::upstream::topology::Topology;

pub async fn handle(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
) -> Result<Reply, HandlerError> {
    let mut body: FetchRequest = req.decode_body()?;
    // Every sub-request is cloned from this body: forced once here, it holds for all of them.
    let forced = super::client_fields::fetch_as_consumer(&mut body);
    super::client_fields::report(
        client,
        ApiKey::Fetch,
        req.header.client_id.as_deref(),
        &forced,
    );
    if body.session_id != 0 {
        // We never hand out sessions, so an incremental fetch cannot be ours.
        let resp = FetchResponse::default().with_error_code(codes::FETCH_SESSION_ID_NOT_FOUND);
        return Ok(Reply::Frame(encode_response(
            ApiKey::Fetch,
            req.api_version,
            req.correlation_id(),
            &resp,
        )?));
    }
    let started = Instant::now();
    // The client's max wait, capped: a fetch asking to wait for days is answered (empty) at the
    // cap, and the client fetches again.
    let max_wait = (body.max_wait_ms.max(0) as u64).min(ctx.settings.raw.limits.max_fetch_wait_ms);
    let deadline = started + Duration::from_millis(max_wait);
    // Until the stored maps are loaded a managed topic looks like a plain one: its gates would
    // not apply. Wait (within the client's max wait); still unloaded, answer retriable errors.
    if !ctx.shards.loaded() {
        ctx.shards.wait_loaded(deadline - started).await;
    }
    let min_bytes = body.min_bytes.max(1) as usize;
    let poll_max = Duration::from_millis(ctx.settings.raw.limits.fetch_poll_max_ms);
    let mut poll = Duration::from_millis(5).min(poll_max);

    // Subscribe before the first fetch so a produce landing in between is not missed.
    let by_id = req.api_version >= 13;
    let topo = ctx.topology().load();
    let mut slots = HashSet::new();
    for t in &body.topics {
        let name = if by_id {
            topo.topic_name(&t.topic_id).cloned()
        } else {
            Some(t.topic.0.clone())
        };
        if let Some(n) = name {
            for p in &t.partitions {
                slots.insert(ctx.signals.slot(&n, p.partition));
            }
        }
    }
    let mut watchers: Vec<_> = slots
        .into_iter()
        .map(|s| ctx.signals.subscribe(s))
        .collect();
    let who = observe_positions(ctx, client, req, &body, &topo);
    for w in &mut watchers {
        w.mark_unchanged();
    }

    loop {
        let round = fetch_once(ctx, client, req, &body, who.as_ref()).await?;
        let now = Instant::now();
        if round.bytes >= min_bytes || round.errors || now >= deadline {
            return Ok(Reply::Frame(encode_response(
                ApiKey::Fetch,
                req.api_version,
                req.correlation_id(),
                &round.resp,
            )?));
        }
        let wait = poll.min(deadline - now);
        if watchers.is_empty() {
            tokio::time::sleep(wait).await;
        } else {
            let changed =
                futures::future::select_all(watchers.iter_mut().map(|w| Box::pin(w.changed())));
            let _ = tokio::time::timeout(wait, changed).await;
        }
        for w in &mut watchers {
            w.mark_unchanged();
        }
        poll = (poll * 2).min(poll_max);
    }
}

struct Round {
    resp: FetchResponse,
    bytes: usize,
    /// A partition answered with an error: answer now so the client can react.
    errors: bool,
}

async fn fetch_once(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
    body: &FetchRequest,
    who: Option<&Consumer>,
) -> Result<Round, HandlerError> {
    let by_id = req.api_version >= 13;
    let mut topo = ctx.topology().load();
    let name_of = |topo: &crate::upstream::topology::Topology,
                   t: &kafka_protocol::messages::fetch_request::FetchTopic| {
        if by_id {
            topo.topic_name(&t.topic_id).cloned()
        } else {
            Some(t.topic.0.clone())
        }
    };
    let unknown = body.topics.iter().any(|t| {
        name_of(&topo, t).is_none_or(|n| {
            t.partitions
                .iter()
                .any(|p| topo.leader(&n, p.partition).is_none())
        })
    });
    if unknown {
        ctx.topology()
            .refresh_after(topo.version, Duration::from_millis(500))
            .await;
        topo = ctx.topology().load();
    }

    let mut answers: BTreeMap<(TopicRef, i32), PartitionData> = BTreeMap::new();
    let mut by_broker: BTreeMap<i32, FetchRequest> = BTreeMap::new();
    let mut errors = false;
    let error_answer = |partition: i32, code: i16| {
        PartitionData::default()
            .with_partition_index(partition)
            .with_error_code(code)
            .with_high_watermark(-1)
            .with_last_stable_offset(-1)
            .with_log_start_offset(-1)
            .with_preferred_read_replica(BrokerId(-1))
            .with_records(None)
    };
    for t in &body.topics {
        let name = name_of(&topo, t);
        let tref = TopicRef {
            name: t.topic.0.clone(),
            id: t.topic_id,
        };
        for p in &t.partitions {
            let leader = name.as_ref().and_then(|n| topo.leader(n, p.partition));
            let Some(broker) = leader.filter(|_| ctx.shards.loaded()) else {
                errors = true;
                let code = match &name {
                    _ if !ctx.shards.loaded() => codes::NOT_LEADER_OR_FOLLOWER,
                    None if by_id => codes::UNKNOWN_TOPIC_ID,
                    Some(n) if topo.topics.contains_key(n) => codes::NOT_LEADER_OR_FOLLOWER,
                    _ => codes::UNKNOWN_TOPIC_OR_PARTITION,
                };
                answers.insert((tref.clone(), p.partition), error_answer(p.partition, code));
                continue;
            };
            let sub = by_broker.entry(broker).or_insert_with(|| {
                let mut r = body.clone();
                r.topics.clear();
                r.forgotten_topics_data.clear();
                r.session_id = 0;
                r.session_epoch = -1; // sessionless full fetch upstream
                r.max_wait_ms = 0;
                r.min_bytes = 1;
                r
            });
            match sub
                .topics
                .iter_mut()
                .find(|x| x.topic == t.topic && x.topic_id == t.topic_id)
            {
                Some(x) => x.partitions.push(p.clone()),
                None => {
                    let mut x = t.clone();
                    x.partitions = vec![p.clone()];
                    sub.topics.push(x);
                }
            }
        }
    }

    let calls = by_broker.into_iter().map(|(broker, sub)| async move {
        let result = async {
            let frame = encode_request(
                ApiKey::Fetch,
                req.api_version,
                req.header.client_id.clone(),
                &sub,
            )?;
            let raw = ctx
                .pool
                .send(
                    broker,
                    super::sockets::for_fetch(ctx, client, req),
                    ApiKey::Fetch,
                    frame,
                    true,
                    None,
                )
                .await?
                .wait()
                .await?
                .ok_or(crate::upstream::UpstreamError::Protocol(
                    "no response".into(),
                ))?;
            Ok::<_, HandlerError>(decode_response::<FetchResponse>(
                ApiKey::Fetch,
                req.api_version,
                raw,
            )?)
        }
        .await;
        (sub, result)
    });
    let mut throttle = 0;
    let mut bytes = 0usize;
    let mut stale = false;
    for (sub, result) in futures::future::join_all(calls).await {
        match result {
            Ok(resp) if resp.error_code == codes::NONE => {
                throttle = throttle.max(resp.throttle_time_ms);
                client.note_throttle(resp.throttle_time_ms);
                for t in resp.responses {
                    let tref = TopicRef {
                        name: t.topic.0.clone(),
                        id: t.topic_id,
                    };
                    for mut p in t.partitions {
                        telemetry::upstream_code(ApiKey::Fetch, p.error_code);
                        if p.error_code != codes::NONE {
                            errors = true;
                            stale |= codes::stale_leader(p.error_code);
                        }
                        if let Some(who) = who {
                            let name = if by_id {
                                topo.topic_name(&t.topic_id).cloned()
                            } else {
                                Some(t.topic.0.clone())
                            };
                            if let Some(name) = name {
                                apply_gate(ctx, who, client.id, &name, &mut p);
                                if ctx.shards.nudge(&name, client.id) {
                                    // The pool grew: a retriable error makes the client
                                    // refresh metadata and see the new partitions (it
                                    // fetches this offset again, nothing is skipped).
                                    p.error_code = codes::NOT_LEADER_OR_FOLLOWER;
                                    p.records = None;
                                    errors = true;
                                    metrics::counter!("shardgate_pool_nudges_total", "topic" => name.to_string()).increment(1);
                                }
                            }
                        }
                        bytes += p.records.as_ref().map_or(0, |r| r.len());
                        // Never point the client at a real broker.
                        p.preferred_read_replica = BrokerId(-1);
                        p.current_leader = LeaderIdAndEpoch::default();
                        answers.insert((tref.clone(), p.partition_index), p);
                    }
                }
            }
            other => {
                let code = match &other {
                    Ok(resp) => resp.error_code,
                    Err(_) => codes::NOT_LEADER_OR_FOLLOWER,
                };
                if let Err(e) = &other {
                    tracing::debug!(error = %e, "fetch sub-request failed; answering retriable errors");
                }
                errors = true;
                stale = true;
                for t in &sub.topics {
                    let tref = TopicRef {
                        name: t.topic.0.clone(),
                        id: t.topic_id,
                    };
                    for p in &t.partitions {
                        answers
                            .insert((tref.clone(), p.partition), error_answer(p.partition, code));
                    }
                }
            }
        }
    }
    if stale {
        ctx.topology().request_refresh();
    }

    // Answer every requested partition, in the client's order: a full fetch response that
    // omits partitions is treated as invalid by some clients.
    let mut resp = FetchResponse::default()
        .with_throttle_time_ms(throttle)
        .with_session_id(0);
    for t in &body.topics {
        let tref = TopicRef {
            name: t.topic.0.clone(),
            id: t.topic_id,
        };
        let mut out = FetchableTopicResponse::default()
            .with_topic(TopicName(tref.name.clone()))
            .with_topic_id(tref.id);
        for p in &t.partitions {
            let answer = answers
                .remove(&(tref.clone(), p.partition))
                .unwrap_or_else(|| error_answer(p.partition, codes::UNKNOWN_SERVER_ERROR));
            out.partitions.push(answer);
        }
        resp.responses.push(out);
    }
    Ok(Round {
        resp,
        bytes,
        errors,
    })
}

/// For fetches touching managed topics: who is fetching, and the positions the fetch reveals
/// (fetching from offset o means everything before o was delivered).
fn observe_positions(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
    body: &FetchRequest,
    topo: &Topology,
) -> Option<Consumer> {
    let by_id = req.api_version >= 13;
    let mut who = None;
    for t in &body.topics {
        let name = if by_id {
            topo.topic_name(&t.topic_id).cloned()
        } else {
            Some(t.topic.0.clone())
        };
        let Some(name) = name else { continue };
        if !ctx.shards.is_managed(&name) {
            continue;
        }
        let w = who.get_or_insert_with(|| {
            let client_id = req.header.client_id.as_deref().unwrap_or("");
            ctx.groups.consumer(client.peer.ip(), client_id, client.id)
        });
        for p in &t.partitions {
            ctx.groups
                .fetched(w, client.id, &name, p.partition, p.fetch_offset);
        }
    }
    who
}

/// Holds back the records of a gated partition that `who` may not see yet. Several gates may
/// cover one partition (one per split or merge that moved keys onto it): records are held from
/// the first offset a closed gate covers.
fn apply_gate(ctx: &Ctx, who: &Consumer, conn: u64, topic: &str, p: &mut PartitionData) {
    let Some(m) = ctx.shards.get(topic) else {
        return;
    };
    let fallback = match m.config.autoscale.gate_fallback_secs {
        0 => None,
        s => Some(std::time::Duration::from_secs(s)),
    };
    let Some(from) = m
        .map
        .gates
        .iter()
        .filter(|g| g.partition == p.partition_index)
        .filter(|g| !ctx.groups.gate_open(who, conn, topic, g, fallback))
        .map(|g| g.from_offset.unwrap_or(0))
        .min()
    else {
        return;
    };
    if let Some(records) = &p.records {
        let kept = records_before(records, from);
        if kept.len() < records.len() {
            metrics::counter!("shardgate_gate_held_fetches_total", "topic" => topic.to_string())
                .increment(1);
        }
        p.records = Some(kept);
    }
}
