//! The upstream source: one long-poll per broker at a time for a client connection, on a
//! socket of that connection's own (a broker serves one request per socket at a time, so a
//! fetch held for its max wait would otherwise delay every other client on the socket).
//! The poll is a shared future kept in the connection's read-ahead state: when the request
//! that started it is answered first (another broker had data), the next request of the
//! same connection picks it up instead of sending another.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use kafka_protocol::messages::fetch_request::{FetchTopic, ForgottenTopic};
use kafka_protocol::messages::{ApiKey, FetchRequest, FetchResponse, TopicName};
use kafka_protocol::protocol::StrBytes;

use super::plan::{Key, Want};
use super::upstream_sessions::{Planned, Sessions, Use};
use crate::protocol::{codes, decode_response, encode_request};
use crate::upstream::UpstreamError;
use crate::upstream::pool::{Pool, Socket};

/// What came back for one sub-fetch.
#[derive(Debug)]
pub struct SubResult {
    pub broker: i32,
    pub seq: u64,
    /// The partitions it asked for, at which offsets and epochs.
    pub asked: Vec<(Key, super::plan::Asked)>,
    /// The isolation level it was sent with.
    pub isolation: i8,
    pub outcome: Result<FetchResponse, String>,
}

pub type SubFuture = Shared<BoxFuture<'static, Arc<SubResult>>>;

/// Everything of the client's request a sub-fetch copies (isolation level, rack, replica
/// fields already forced to a consumer's).
#[derive(Clone)]
pub struct Template {
    pub body: FetchRequest,
    pub version: i16,
    pub client_id: Option<StrBytes>,
    pub by_id: bool,
}

impl Template {
    pub fn new(mut body: FetchRequest, version: i16, client_id: Option<StrBytes>) -> Self {
        // Taken apart rather than cloned: a request may list thousands of partitions.
        body.topics.clear();
        body.forgotten_topics_data.clear();
        // Each poll sets its own (upstream_sessions.rs).
        body.session_id = 0;
        body.session_epoch = -1;
        Self {
            body,
            version,
            client_id,
            by_id: version >= 13,
        }
    }
}

/// Starts (lazily: on first poll) a fetch of `wants` from `broker` that the broker may hold
/// up to `max_wait` for the client's `min_bytes`; with `sessions`, in the connection's fetch
/// session with the broker (only what changed is listed).
#[allow(clippy::too_many_arguments)]
pub fn start(
    pool: Arc<Pool>,
    owner: u64,
    template: &Template,
    broker: i32,
    wants: &[&Want],
    max_wait: Duration,
    request_timeout: Duration,
    seq: u64,
    sessions: Option<Arc<Sessions>>,
) -> SubFuture {
    let mut base = template.body.clone();
    base.max_wait_ms = max_wait.as_millis().min(i32::MAX as u128) as i32;
    base.min_bytes = base.min_bytes.max(1);
    let asked: Vec<(Key, super::plan::Asked)> = wants
        .iter()
        .map(|w| (w.key.clone(), super::plan::Asked::of(&w.part)))
        .collect();
    let planned = match &sessions {
        Some(s) => s.plan(broker, true, wants),
        None => Planned::sessionless(wants.len()),
    };
    let by_id = template.by_id;
    let request = body(&base, by_id, wants, &planned);
    // Without the session, should the broker have lost it.
    let fallback = (planned.used != Use::None)
        .then(|| body(&base, by_id, wants, &Planned::sessionless(wants.len())));
    let version = template.version;
    let isolation = template.body.isolation_level;
    let client_id = template.client_id.clone();
    let used = planned.used;
    metrics::counter!("shardgate_upstream_fetches_total").increment(1);
    metrics::counter!("shardgate_upstream_fetch_polls_total", "session" => used.label())
        .increment(1);
    metrics::counter!("shardgate_upstream_fetch_partitions_total", "session" => used.label())
        .increment(planned.listed.len() as u64);
    async move {
        let send = |r: FetchRequest| {
            let pool = pool.clone();
            let client_id = client_id.clone();
            async move {
                let frame = encode_request(ApiKey::Fetch, version, client_id, &r)?;
                let raw = pool
                    .send(
                        broker,
                        Socket::Fetch(owner),
                        ApiKey::Fetch,
                        frame,
                        true,
                        Some(max_wait + request_timeout),
                    )
                    .await?
                    .wait()
                    .await?
                    .ok_or(UpstreamError::Protocol("no response".into()))?;
                Ok::<_, super::HandlerError>(decode_response::<FetchResponse>(
                    ApiKey::Fetch,
                    version,
                    raw,
                )?)
            }
        };
        let mut outcome = send(request).await;
        if let Some(s) = &sessions {
            match &outcome {
                Ok(resp) => s.answered(broker, used, resp.error_code, resp.session_id),
                Err(_) => s.failed(broker, used),
            }
        }
        if let (Ok(resp), Some(full)) = (&outcome, fallback)
            && matches!(
                resp.error_code,
                codes::FETCH_SESSION_ID_NOT_FOUND | codes::INVALID_FETCH_SESSION_EPOCH
            )
        {
            outcome = send(full).await;
        }
        let outcome = outcome
            .inspect(|resp| {
                let (bytes, parts) = resp
                    .responses
                    .iter()
                    .flat_map(|t| &t.partitions)
                    .fold((0usize, 0u64), |(b, n), p| {
                        (b + p.records.as_ref().map_or(0, |r| r.len()), n + 1)
                    });
                metrics::counter!("shardgate_upstream_fetch_bytes_total").increment(bytes as u64);
                metrics::counter!("shardgate_upstream_fetch_answered_partitions_total", "session" => used.label())
                    .increment(parts);
            })
            .map_err(|e| {
                tracing::debug!(broker, error = %e, "upstream fetch failed; answering retriable errors");
                e.to_string()
            });
        Arc::new(SubResult {
            broker,
            seq,
            asked,
            isolation,
            outcome,
        })
    }
    .boxed()
    .shared()
}

/// The request of a poll: `base` with the partitions `planned` lists, what it forgets, and
/// its session fields.
fn body(base: &FetchRequest, by_id: bool, wants: &[&Want], planned: &Planned) -> FetchRequest {
    let mut r = base.clone();
    (r.session_id, r.session_epoch) = planned.used.fields();
    let same = |k: &Key, id: &uuid::Uuid, name: &TopicName| {
        if by_id {
            *id == k.0.id
        } else {
            name.0 == k.0.name
        }
    };
    for &i in &planned.listed {
        let w = wants[i];
        match r
            .topics
            .last_mut()
            .filter(|t| same(&w.key, &t.topic_id, &t.topic))
        {
            Some(t) => t.partitions.push(w.part.clone()),
            None => r.topics.push(
                FetchTopic::default()
                    .with_topic(TopicName(w.key.0.name.clone()))
                    .with_topic_id(w.key.0.id)
                    .with_partitions(vec![w.part.clone()]),
            ),
        }
    }
    for k in &planned.forgotten {
        match r
            .forgotten_topics_data
            .iter_mut()
            .find(|t| same(k, &t.topic_id, &t.topic))
        {
            Some(t) => t.partitions.push(k.1),
            None => r.forgotten_topics_data.push(
                ForgottenTopic::default()
                    .with_topic(TopicName(k.0.name.clone()))
                    .with_topic_id(k.0.id)
                    .with_partitions(vec![k.1]),
            ),
        }
    }
    r
}
