//! Keeps a consumer connection's queue filled: when a read-ahead poll lands with records, the
//! next one goes out at once from where it ended (each partition from the end of what its
//! queue holds, with the epoch of its last batch, as the client will ask), for as long as
//! - the polls bring records (a consumer at the end of the log gets one long-poll per wait,
//!   as without shardgate),
//! - the connection's queue is below what its client takes within `prefetch.horizon_ms`
//!   at its rate (at least one response, at most `prefetch.queue_bytes`), all queues below
//!   `prefetch.max_bytes` and the memory budget less than half used (so the queue follows
//!   the consumer's rate: it refills as the consumer takes from it),
//! - the client still fetches the partition (within `prefetch.ttl_ms`) and the broker still
//!   leads it,
//! - the connection lives (the task holds no strong reference to it and is aborted with it).

use std::sync::{Arc, Weak};
use std::time::Duration;

use kafka_protocol::messages::FetchResponse;

use super::plan::{Key, Want};
use super::readahead::{ConnFetch, PollKind};
use super::upstream::{self, SubFuture, Template};
use crate::protocol::codes;
use crate::proxy::Ctx;

/// Starts a poll of `wants` on `broker` for connection `conn` (the broker may hold it up to
/// `max_wait`) and files it as the connection's poll in flight there; None when one is in
/// flight already.
#[allow(clippy::too_many_arguments)]
pub(super) fn start_poll(
    ctx: &Ctx,
    conn: u64,
    state: &ConnFetch,
    template: &Template,
    broker: i32,
    wants: &[&Want],
    max_wait: Duration,
    kind: PollKind,
) -> Option<SubFuture> {
    let sessions = (ctx.settings.raw.upstream.fetch_sessions && template.version >= 7)
        .then(|| state.sessions.clone());
    let request_timeout = Duration::from_millis(ctx.settings.raw.upstream.request_timeout_ms);
    let asked = wants
        .iter()
        .map(|w| (w.key.clone(), super::plan::Asked::of(&w.part)))
        .collect();
    let started = state.start_if_idle(broker, kind, asked, |seq| {
        let f = upstream::start(
            ctx.pool.clone(),
            conn,
            template,
            broker,
            wants,
            max_wait,
            request_timeout,
            seq,
            sessions,
        );
        if !ctx.settings.raw.prefetch.predictive() {
            return f;
        }
        let topo = ctx.topology().load();
        let ids: Vec<(&Want, uuid::Uuid, i32)> = wants
            .iter()
            .map(|w| (*w, super::topic_id(&topo, w), super::leader_epoch(&topo, w)))
            .collect();
        ctx.shared_reads.poll_started(
            conn,
            template.body.isolation_level,
            template.body.min_bytes,
            &ids,
            f,
        )
    });
    if started.is_some() {
        tracing::debug!(
            conn,
            ?kind,
            max_bytes = template.body.max_bytes,
            parts = ?wants.iter().map(|w| (w.key.1, w.part.fetch_offset)).collect::<Vec<_>>(),
            queued = state.queued_bytes(),
            "poll sent"
        );
    }
    started
}

/// A connection's chain of read-ahead polls on one broker.
pub(super) struct Refill {
    pub ctx: Arc<Ctx>,
    pub conn: u64,
    pub state: Weak<ConnFetch>,
    pub template: Template,
    pub max_wait: Duration,
    pub broker: i32,
}

impl Refill {
    /// Follows `poll` (a read-ahead of `wants`) and the polls after it.
    pub async fn run(mut self, mut wants: Vec<Want>, mut poll: SubFuture) {
        // Not past the point where the queue drops a partition the client stopped fetching.
        let ttl = Duration::from_millis(self.ctx.settings.raw.prefetch.ttl_ms)
            .min(super::readahead::UNASKED_TTL);
        let max_bytes = self.template.body.max_bytes;
        loop {
            let r = poll.await;
            let Some(state) = self.state.upgrade() else {
                return ended("closed");
            };
            // Whatever ends the chain, what it queued expires even if the client stops
            // fetching (nothing else would look at it while the connection stays open).
            if state.arm_sweep() {
                let weak = self.state.clone();
                state.drive(async move {
                    tokio::time::sleep(super::readahead::DATA_TTL + Duration::from_secs(1)).await;
                    if let Some(s) = weak.upgrade() {
                        s.expire();
                    }
                });
            }
            let budget = self.ctx.budget.clone();
            let folded = state.fold(&r, |n| (n > 0).then(|| budget.charge(n)));
            if folded.stale {
                self.ctx.topology().request_refresh();
                return ended("stale");
            }
            let Ok(resp) = &r.outcome else {
                return ended("error");
            };
            if resp.error_code != codes::NONE {
                return ended("error");
            }
            if !advance(&mut wants, resp) {
                return ended("nothing_new");
            }
            tracing::debug!(
                conn = self.conn,
                bytes = resp
                    .responses
                    .iter()
                    .flat_map(|t| &t.partitions)
                    .map(|p| p.records.as_ref().map_or(0, |r| r.len()))
                    .sum::<usize>(),
                queued = state.queued_bytes(),
                "read-ahead landed"
            );
            let Some(room) = self.room(&state).filter(|r| *r >= self.min_poll(&state)) else {
                if self.ctx.settings.raw.prefetch.queue_bytes() > 0 {
                    metrics::counter!("shardgate_prefetch_queue_full_total").increment(1);
                }
                return ended("full");
            };
            // A poll brings at most the room left (Kafka still sends one whole batch).
            self.template.body.max_bytes =
                (room.min(i32::MAX as usize) as i32).clamp(1, max_bytes.max(1));
            let topo = self.ctx.topology().load();
            let predictive = self.ctx.settings.raw.prefetch.predictive();
            let isolation = self.template.body.isolation_level;
            wants.retain(|w| {
                state.asked_within(&w.key, ttl)
                    && leads(&topo, w, self.broker)
                    // Another consumer's read of it is out or kept: taken from there.
                    && !(predictive
                        && self.ctx.shared_reads.covers(
                            w,
                            isolation,
                            super::topic_id(&topo, w),
                            super::leader_epoch(&topo, w),
                        ))
            });
            if wants.is_empty() {
                return ended("unasked_or_shared");
            }
            if state.yielding(self.broker) {
                return ended("yielded"); // a request needs other partitions or offsets: it polls them
            }
            state.emptiest_first(&mut wants);
            let refs: Vec<&Want> = wants.iter().collect();
            let Some(next) = start_poll(
                &self.ctx,
                self.conn,
                &state,
                &self.template,
                self.broker,
                &refs,
                self.max_wait,
                PollKind::Chain,
            ) else {
                return ended("poll_out"); // the client's own poll is out: it continues from there
            };
            metrics::counter!("shardgate_fetch_readahead_polls_total").increment(1);
            poll = next;
        }
    }

    /// The bytes the connection's queue, all queues and the memory budget have room for
    /// (None: no room).
    fn room(&self, state: &ConnFetch) -> Option<usize> {
        room(&self.ctx, state)
    }

    /// The least room a chain poll is sent for: a quarter of the queue's target, at most
    /// `MIN_CHAIN_POLL`. A poll's answer usually ends inside a record batch, which the next
    /// poll reads again from its start; small polls made that a large share of what was read
    /// (session 16: 12 % more bytes upstream than without prefetch). With less room the chain
    /// stops, and the client's next fetch, taking from the queue, sends the next read-ahead.
    fn min_poll(&self, state: &ConnFetch) -> usize {
        let cfg = &self.ctx.settings.raw.prefetch;
        let target = state.queue_target(Duration::from_millis(cfg.horizon_ms), cfg.queue_bytes());
        (target / 4).min(MIN_CHAIN_POLL)
    }
}

/// See `Refill::min_poll`.
const MIN_CHAIN_POLL: usize = 64 * 1024;

/// Why a chain of read-ahead polls stopped (`shardgate_fetch_readahead_chain_ends_total`):
/// a queue that keeps missing while seldom full shows here which condition ends it.
fn ended(reason: &'static str) {
    metrics::counter!("shardgate_fetch_readahead_chain_ends_total", "reason" => reason)
        .increment(1);
}

/// The bytes a connection's queue may still take: within what its client takes in
/// `prefetch.horizon_ms` (at least a full answer for each partition it fetches, at most
/// `prefetch.queue_bytes`; counting the partitions it fetched within the last second), all
/// its partitions within `prefetch.queue_bytes`, all queues within `prefetch.max_bytes`, the
/// memory budget under half used (None: none).
pub(super) fn room(ctx: &Ctx, state: &ConnFetch) -> Option<usize> {
    let cfg = &ctx.settings.raw.prefetch;
    let target = state.queue_target(Duration::from_millis(cfg.horizon_ms), cfg.queue_bytes());
    // The target is for what the client fetches now: a partition it stopped fetching (revoked
    // in a rebalance) holds bytes until it expires, which must not starve the others (they
    // still count against the hard bound).
    let recent = state.queued_recent(super::readahead::RECENT);
    tracing::trace!(
        target,
        recent,
        queued = state.queued_bytes(),
        "read-ahead room"
    );
    let mine = target
        .checked_sub(recent)?
        .min(cfg.queue_bytes().checked_sub(state.queued_bytes())?);
    let all = cfg.max_bytes.checked_sub(super::queued::total())?;
    let budget = (ctx.budget.limit() / 2).checked_sub(ctx.budget.used())?;
    Some(mine.min(all).min(budget)).filter(|r| *r > 0)
}

/// Moves each partition of `wants` past what `resp` brought for it (partitions it answered
/// with an error are dropped). Whether any brought records.
fn advance(wants: &mut Vec<Want>, resp: &FetchResponse) -> bool {
    let mut any = false;
    let mut failed: Vec<Key> = Vec::new();
    for t in &resp.responses {
        for p in &t.partitions {
            let Some(w) = wants.iter_mut().find(|w| {
                w.key.1 == p.partition_index
                    && if w.key.0.id.is_nil() {
                        w.key.0.name == t.topic.0
                    } else {
                        w.key.0.id == t.topic_id
                    }
            }) else {
                continue;
            };
            if p.error_code != codes::NONE || p.diverging_epoch.epoch >= 0 {
                failed.push(w.key.clone());
                continue;
            }
            let Some(records) = p.records.as_ref().filter(|r| !r.is_empty()) else {
                continue;
            };
            let Some(next) = super::plan::batches_within(records, usize::MAX).1 else {
                continue;
            };
            w.part.fetch_offset = next;
            if w.part.last_fetched_epoch >= 0
                && let Some(epoch) = super::plan::last_batch_epoch(records)
            {
                w.part.last_fetched_epoch = epoch;
            }
            any = true;
        }
    }
    wants.retain(|w| !failed.contains(&w.key));
    any
}

/// Whether the topology still names `broker` as the leader of `w`'s partition.
fn leads(topo: &crate::upstream::topology::Topology, w: &Want, broker: i32) -> bool {
    w.name
        .as_ref()
        .and_then(|n| topo.topics.get(n))
        .and_then(|t| t.partitions.get(w.key.1 as usize))
        .is_some_and(|p| p.leader == broker)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TopicRef;
    use kafka_protocol::messages::fetch_request::FetchPartition;
    use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};

    fn want(p: i32, offset: i64, last_epoch: i32) -> Want {
        Want {
            key: (
                TopicRef {
                    name: kafka_protocol::protocol::StrBytes::from_static_str("t"),
                    id: uuid::Uuid::nil(),
                },
                p,
            ),
            part: FetchPartition::default()
                .with_partition(p)
                .with_fetch_offset(offset)
                .with_last_fetched_epoch(last_epoch),
            name: None,
            leader: Ok(1),
        }
    }

    /// One batch of offsets base..=base+last_delta in leader epoch `epoch`.
    fn batch(base: i64, last_delta: i32, epoch: i32) -> bytes::Bytes {
        use bytes::BufMut;
        let mut b = bytes::BytesMut::new();
        b.put_i64(base);
        b.put_i32(49);
        b.put_i32(epoch);
        b.put_i8(2);
        b.put_u32(0);
        b.put_i16(0);
        b.put_i32(last_delta);
        b.resize(61, 0);
        b.freeze()
    }

    fn response(parts: Vec<PartitionData>) -> FetchResponse {
        FetchResponse::default().with_responses(vec![
            FetchableTopicResponse::default()
                .with_topic(kafka_protocol::messages::TopicName(
                    kafka_protocol::protocol::StrBytes::from_static_str("t"),
                ))
                .with_partitions(parts),
        ])
    }

    #[test]
    fn the_next_poll_asks_from_where_each_answer_ended_as_the_client_will() {
        let mut wants = vec![want(0, 10, 3), want(1, 50, -1), want(2, 7, 3)];
        let resp = response(vec![
            PartitionData::default()
                .with_partition_index(0)
                .with_records(Some(batch(10, 4, 5))),
            // Nothing new: stays where it was.
            PartitionData::default()
                .with_partition_index(1)
                .with_records(Some(bytes::Bytes::new())),
            // An error: no longer read ahead.
            PartitionData::default()
                .with_partition_index(2)
                .with_error_code(codes::NOT_LEADER_OR_FOLLOWER),
        ]);
        assert!(advance(&mut wants, &resp));
        let at: Vec<(i32, i64, i32)> = wants
            .iter()
            .map(|w| (w.key.1, w.part.fetch_offset, w.part.last_fetched_epoch))
            .collect();
        // Partition 0 continues after offset 14 with the epoch of the batch it got (a client
        // that sends no epoch, partition 1, keeps sending none).
        assert_eq!(at, vec![(0, 15, 5), (1, 50, -1)]);
        let empty = response(vec![PartitionData::default().with_partition_index(0)]);
        assert!(!advance(&mut wants, &empty), "nothing came: the chain ends");
    }
}
