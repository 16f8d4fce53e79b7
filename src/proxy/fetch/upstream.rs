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
use kafka_protocol::messages::fetch_request::FetchTopic;
use kafka_protocol::messages::{ApiKey, FetchRequest, FetchResponse, TopicName};
use kafka_protocol::protocol::StrBytes;

use super::plan::{Key, Want};
use crate::protocol::{decode_response, encode_request};
use crate::upstream::UpstreamError;
use crate::upstream::pool::{Pool, Socket};

/// What came back for one sub-fetch.
#[derive(Debug)]
pub struct SubResult {
    pub broker: i32,
    pub seq: u64,
    /// The partitions it asked for and at which offsets.
    pub asked: Vec<(Key, i64)>,
    pub outcome: Result<FetchResponse, String>,
}

pub type SubFuture = Shared<BoxFuture<'static, Arc<SubResult>>>;

/// Everything of the client's request a sub-fetch copies (isolation level, rack, replica
/// fields already forced to a consumer's).
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
        // Sessionless upstream: the partitions a connection reads change from poll to poll.
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
/// up to `max_wait` for the client's `min_bytes`.
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
) -> SubFuture {
    let mut r = template.body.clone();
    r.max_wait_ms = max_wait.as_millis().min(i32::MAX as u128) as i32;
    r.min_bytes = r.min_bytes.max(1);
    let mut asked = Vec::with_capacity(wants.len());
    for w in wants {
        asked.push((w.key.clone(), w.part.fetch_offset));
        let same = |t: &FetchTopic| {
            if template.by_id {
                t.topic_id == w.key.0.id
            } else {
                t.topic.0 == w.key.0.name
            }
        };
        match r.topics.last_mut().filter(|t| same(t)) {
            Some(t) => t.partitions.push(w.part.clone()),
            None => r.topics.push(
                FetchTopic::default()
                    .with_topic(TopicName(w.key.0.name.clone()))
                    .with_topic_id(w.key.0.id)
                    .with_partitions(vec![w.part.clone()]),
            ),
        }
    }
    let version = template.version;
    let client_id = template.client_id.clone();
    metrics::counter!("shardgate_upstream_fetches_total").increment(1);
    async move {
        let outcome = async {
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
        .await
        .inspect(|resp| {
            let bytes: usize = resp
                .responses
                .iter()
                .flat_map(|t| &t.partitions)
                .map(|p| p.records.as_ref().map_or(0, |r| r.len()))
                .sum();
            metrics::counter!("shardgate_upstream_fetch_bytes_total").increment(bytes as u64);
        })
        .map_err(|e| {
            tracing::debug!(broker, error = %e, "upstream fetch failed; answering retriable errors");
            e.to_string()
        });
        Arc::new(SubResult {
            broker,
            seq,
            asked,
            outcome,
        })
    }
    .boxed()
    .shared()
}
