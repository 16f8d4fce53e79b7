//! Per client connection: what was read from upstream and not yet delivered (its queue: per
//! partition, contiguous answers of read-ahead polls, a long-poll's answer that arrived after
//! its request was answered, the part of an answer beyond the client's max_bytes), the
//! upstream polls in flight, and the offsets upstream last reported per partition. A fetch
//! takes a partition's first entry only at the exact offset the client asks for (and, for a
//! poll's answer, with the epochs the poll was sent with); anything else (a seek, a rewind,
//! new epochs) drops the partition's queue.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kafka_protocol::messages::fetch_response::PartitionData;

use super::plan::{Asked, Key, Marks, error_answer};
use super::queued::Counted;
use super::upstream::{SubFuture, SubResult};
use crate::protocol::{TopicRef, codes};
use crate::proxy::budget::Charge;

/// Data not fetched again within this is dropped (the client moved on or went idle).
pub const DATA_TTL: Duration = Duration::from_secs(30);
/// An error is news only for the next fetch or so.
const ERROR_TTL: Duration = Duration::from_secs(2);
/// A partition the client has not fetched for this long loses its queue (it was revoked in
/// a rebalance, or the consumer paused it); the chain stops reading it by then too (after
/// `prefetch.ttl_ms` if shorter). Not shorter: the Java consumer leaves a partition out of
/// its fetches while it still holds records of it, for seconds with large fetches.
pub const UNASKED_TTL: Duration = Duration::from_secs(10);
/// A partition not fetched for this long no longer counts against the queue's rate target
/// (its bytes still count against `queue_bytes`): a partition revoked in a rebalance must
/// not keep the ones that replaced it from being read ahead until it expires.
pub const RECENT: Duration = Duration::from_secs(1);

/// Poll numbers, unique in the process: a request may fold another connection's poll (a
/// shared read), which must never pass for one of its own.
static SEQ: AtomicU64 = AtomicU64::new(0);

/// An entry taken by a fetch.
pub struct Taken {
    pub data: PartitionData,
    /// Read by a poll sent ahead of the client's request.
    pub ahead: bool,
}

/// What a fetch found in a partition's queue (moved once, right away: not worth a box).
#[allow(clippy::large_enum_variant)]
pub enum Took {
    Entry(Taken),
    /// Nothing queued.
    Empty,
    /// Entries from another offset or with other epochs or isolation level: dropped (the
    /// client sought elsewhere or learnt new epochs).
    Dropped,
}

/// Who sends a poll (`start_if_idle`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollKind {
    /// A request's own poll, for what it needs now.
    Own,
    /// The read-ahead of the client's next fetch, sent as a response goes out.
    ReadAhead,
    /// The next poll of a read-ahead chain (`refill.rs`).
    Chain,
}

/// Where a partition's queue ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// Nothing queued.
    Empty,
    /// The next offset after the last queued records, and the epoch of their last batch.
    At(i64, Option<i32>),
    /// Something queued that no poll should continue (an error, an answer without records).
    Stuck,
}

#[derive(Default)]
pub struct ConnFetch {
    inner: Mutex<Inner>,
    /// Whether a sweep of expired entries is scheduled (a connection that stops fetching
    /// would otherwise keep its queue while it stays open).
    sweep_armed: std::sync::atomic::AtomicBool,
    /// Record bytes queued for this connection.
    queued: Arc<AtomicUsize>,
    /// The connection's fetch sessions with the brokers (its polls).
    pub sessions: std::sync::Arc<super::upstream_sessions::Sessions>,
    /// How fast its client takes records (how much its queue should hold).
    pace: Mutex<super::pace::Pace>,
    /// When the member assignment last applied to the queue arrived, and when one was last
    /// looked for (`learn::unassigned`).
    pub assignment: Mutex<(Option<Instant>, Option<Instant>)>,
}

#[derive(Default)]
struct Inner {
    ready: HashMap<Key, VecDeque<Ready>>,
    /// When the client last fetched each partition (a queue continues only for those it
    /// still fetches).
    asked: HashMap<Key, Instant>,
    /// Partitions cut at max_bytes in the last responses, and in how many in a row (they go
    /// first in the next, longest waiting first).
    cut: HashMap<Key, u32>,
    /// The largest throttle time of polls folded since a request last took it.
    throttle_ms: i32,
    seen: HashMap<Key, Marks>,
    /// Per broker: the poll in flight, and how it asks for each partition.
    pending: HashMap<i32, (u64, SubFuture, HashMap<Key, Asked>)>,
    /// Brokers where a request waits for partitions (or offsets) the read-ahead poll in
    /// flight does not ask for: the chain of read-ahead polls stops there and lets it poll.
    yielding: std::collections::HashSet<i32>,
    /// Sequence numbers of polls sent ahead of the client's request (read-aheads): what
    /// they bring counts as prefetched.
    ahead: std::collections::HashSet<u64>,
    /// Tasks running read-ahead polls.
    drivers: Vec<tokio::task::AbortHandle>,
}

impl Drop for ConnFetch {
    fn drop(&mut self) {
        if let Ok(st) = self.inner.get_mut() {
            for t in &st.drivers {
                t.abort();
            }
        }
    }
}

struct Ready {
    offset: i64,
    /// The epochs of the poll it came from (None: the rest of an answer already checked, whose
    /// continuation does not depend on them).
    epochs: Option<(i32, i32)>,
    /// The isolation level it was read with.
    isolation: i8,
    data: PartitionData,
    at: Instant,
    ahead: bool,
    /// Held back by an ordering gate (`hold`).
    gated: bool,
    _charge: Option<Charge>,
    counted: Counted,
}

impl Ready {
    /// Where a fetch continues after this entry (None: an error, no whole batch).
    fn end(&self) -> Option<(i64, Option<i32>)> {
        if self.data.error_code != codes::NONE {
            return None;
        }
        let records = self.data.records.as_ref()?;
        let next = super::plan::batches_within(records, usize::MAX).1?;
        Some((next, super::plan::last_batch_epoch(records)))
    }

    fn expired(&self, now: Instant) -> bool {
        let ttl = if self.data.error_code == codes::NONE {
            DATA_TTL
        } else {
            ERROR_TTL
        };
        now.duration_since(self.at) > ttl
    }
}

/// What folding a sub-fetch's answer found.
#[derive(Debug, Default)]
pub struct Folded {
    pub throttle_ms: i32,
    /// Leadership moved or the broker failed: the topology is worth refreshing.
    pub stale: bool,
}

impl std::fmt::Debug for ConnFetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnFetch")
    }
}

impl ConnFetch {
    pub fn next_seq(&self) -> u64 {
        SEQ.fetch_add(1, Ordering::Relaxed)
    }

    /// The first entry of `key`'s queue if it answers a fetch `asked` at `isolation`;
    /// otherwise the queue is dropped (the client sought elsewhere or learnt new epochs).
    pub fn take(&self, key: &Key, asked: Asked, isolation: i8) -> Took {
        let mut st = self.inner.lock().expect("read-ahead");
        let now = Instant::now();
        match st.asked.get_mut(key) {
            Some(at) => *at = now,
            None => {
                st.asked.insert(key.clone(), now);
            }
        }
        let Some(q) = st.ready.get_mut(key) else {
            return Took::Empty;
        };
        let Some(mut r) = q.pop_front() else {
            return Took::Empty;
        };
        let epochs_hold = r
            .epochs
            .is_none_or(|e| e == (asked.current_leader_epoch, asked.last_fetched_epoch));
        let reason = if r.expired(now) {
            Some("ttl")
        } else if r.offset != asked.offset {
            Some("seek")
        } else if !epochs_hold || r.isolation != isolation {
            Some("epoch")
        } else {
            None
        };
        let took = match reason {
            None => {
                r.counted.taken();
                Took::Entry(Taken {
                    data: r.data,
                    ahead: r.ahead,
                })
            }
            Some(reason) => {
                let n = 1 + q.len() as u64;
                q.clear();
                metrics::counter!("shardgate_fetch_readahead_dropped_total").increment(n);
                metrics::counter!("shardgate_prefetch_evictions_total", "reason" => reason)
                    .increment(n);
                if reason == "ttl" {
                    Took::Empty
                } else {
                    Took::Dropped
                }
            }
        };
        if q.is_empty() {
            st.ready.remove(key);
        }
        took
    }

    /// Puts `data` (an answer from `offset`) first in `key`'s queue for a later fetch;
    /// `asked`: the fetch it answers (its epochs must match), None for the rest of an answer
    /// cut at max_bytes.
    pub fn put(
        &self,
        key: Key,
        offset: i64,
        asked: Option<Asked>,
        isolation: i8,
        data: PartitionData,
        charge: Option<Charge>,
    ) {
        if let Some(e) = self.entry(offset, asked, isolation, data, charge) {
            let mut st = self.inner.lock().expect("read-ahead");
            st.ready.entry(key).or_default().push_front(e);
        }
    }

    /// `put` for an answer an ordering gate holds back: the client's answer once the gate
    /// opens, not read ahead, so it counts against `queue_bytes` but not the rate target.
    pub fn hold(
        &self,
        key: Key,
        offset: i64,
        asked: Asked,
        isolation: i8,
        data: PartitionData,
        charge: Charge,
    ) {
        if let Some(mut e) = self.entry(offset, Some(asked), isolation, data, Some(charge)) {
            e.gated = true;
            let mut st = self.inner.lock().expect("read-ahead");
            st.ready.entry(key).or_default().push_front(e);
        }
    }

    fn entry(
        &self,
        offset: i64,
        asked: Option<Asked>,
        isolation: i8,
        data: PartitionData,
        charge: Option<Charge>,
    ) -> Option<Ready> {
        if data.error_code == codes::NONE
            && data.records.as_ref().is_some_and(|r| !r.is_empty())
            && !super::plan::whole_batch(&data)
        {
            // The rest of a cut answer that is only the broker's partial last batch: a
            // client answered with it alone reads nothing (and librdkafka doubles its
            // partition max bytes); the next fetch reads that batch whole.
            return None;
        }
        let counted = Counted::new(&self.queued, data.records.as_ref().map_or(0, |r| r.len()));
        Some(Ready {
            offset,
            epochs: asked.map(|a| (a.current_leader_epoch, a.last_fetched_epoch)),
            isolation,
            data,
            at: Instant::now(),
            ahead: false,
            gated: false,
            _charge: charge,
            counted,
        })
    }

    /// Where `key`'s queue ends.
    pub fn tail(&self, key: &Key) -> Tail {
        let st = self.inner.lock().expect("read-ahead");
        match st.ready.get(key).and_then(|q| q.back()) {
            None => Tail::Empty,
            Some(r) => r.end().map_or(Tail::Stuck, |(o, e)| Tail::At(o, e)),
        }
    }

    /// In how many responses in a row each of `keys` was cut at max_bytes.
    pub fn waits<'a>(&self, keys: impl Iterator<Item = &'a Key>) -> Vec<u32> {
        let st = self.inner.lock().expect("read-ahead");
        keys.map(|k| st.cut.get(k).copied().unwrap_or(0)).collect()
    }

    /// What the response just assembled did with partitions that had records: `cut` at
    /// max_bytes (nothing of them delivered) or `delivered` (some or all).
    pub fn note_cuts<'a>(
        &self,
        cut: impl Iterator<Item = &'a Key>,
        delivered: impl Iterator<Item = &'a Key>,
    ) {
        let mut st = self.inner.lock().expect("read-ahead");
        for k in delivered {
            st.cut.remove(k);
        }
        for k in cut {
            *st.cut.entry(k.clone()).or_insert(0) += 1;
        }
        if st.cut.len() > 100_000 {
            st.cut.clear(); // partitions no longer fetched; bounded whatever the client does
        }
    }

    /// The largest throttle time upstream gave polls folded since the last call.
    pub fn take_throttle(&self) -> i32 {
        std::mem::take(&mut self.inner.lock().expect("read-ahead").throttle_ms)
    }

    /// Drops expired entries; a connection that stopped fetching keeps nothing past them.
    pub fn expire(&self) {
        self.sweep_armed.store(false, Ordering::Relaxed);
        let mut st = self.inner.lock().expect("read-ahead");
        expire(&mut st, Instant::now());
    }

    /// Whether the caller should schedule a sweep (none is scheduled yet).
    pub fn arm_sweep(&self) -> bool {
        !self.sweep_armed.swap(true, Ordering::Relaxed)
    }

    /// Record bytes queued for this connection.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Record bytes queued for partitions the client fetched within `within` (answers a gate
    /// holds back not counted).
    pub fn queued_recent(&self, within: Duration) -> usize {
        let st = self.inner.lock().expect("read-ahead");
        let now = Instant::now();
        st.ready
            .iter()
            .filter(|(k, _)| {
                st.asked
                    .get(*k)
                    .is_some_and(|at| now.duration_since(*at) <= within)
            })
            .flat_map(|(_, q)| q.iter())
            .filter(|r| !r.gated)
            .map(|r| r.data.records.as_ref().map_or(0, |b| b.len()))
            .sum()
    }

    /// A fetch was answered with `bytes` of records; its partitions take at most `floor`.
    pub fn note_delivered(&self, bytes: usize, floor: usize) {
        if let Ok(mut p) = self.pace.lock() {
            p.note(bytes, floor, Instant::now());
        }
    }

    /// Bytes the queue should hold: what the client takes within `horizon` at its rate, at
    /// least a full answer for each partition it fetches, at most `cap` (`pace.rs`).
    pub fn queue_target(&self, horizon: Duration, cap: usize) -> usize {
        match self.pace.lock() {
            Ok(p) => p.target(Instant::now(), horizon, cap),
            Err(_) => cap,
        }
    }

    /// Orders a poll's partitions by what the queue holds of them, least first: with little
    /// room, the broker fills the partitions it is asked for in order, and the queue should
    /// not hold one partition's next answers while another's next fetch finds nothing.
    pub fn emptiest_first(&self, wants: &mut [super::plan::Want]) {
        let st = self.inner.lock().expect("read-ahead");
        let held = |k: &Key| -> usize {
            st.ready.get(k).map_or(0, |q| {
                q.iter()
                    .map(|r| r.data.records.as_ref().map_or(0, |b| b.len()))
                    .sum()
            })
        };
        wants.sort_by_cached_key(|w| held(&w.key));
    }

    /// Whether the client fetched `key` within `within`.
    pub fn asked_within(&self, key: &Key, within: Duration) -> bool {
        self.inner
            .lock()
            .expect("read-ahead")
            .asked
            .get(key)
            .is_some_and(|at| at.elapsed() <= within)
    }

    /// Runs a poll nobody waits for yet (a read-ahead); aborted with the connection.
    pub fn drive(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        let task = tokio::spawn(fut);
        let mut st = self.inner.lock().expect("read-ahead");
        st.drivers.retain(|t| !t.is_finished());
        st.drivers.push(task.abort_handle());
    }

    pub fn seen(&self, key: &Key) -> Option<Marks> {
        self.inner
            .lock()
            .expect("read-ahead")
            .seen
            .get(key)
            .copied()
    }

    pub fn pending(&self, broker: i32) -> Option<SubFuture> {
        self.inner
            .lock()
            .expect("read-ahead")
            .pending
            .get(&broker)
            .map(|(_, f, _)| f.clone())
    }

    /// The poll in flight on `broker`, and whether it asks for every one of `wants` (key,
    /// offset) at that offset. When it does not, the read-ahead chain there stops after it
    /// (the request then polls what it needs).
    pub fn pending_for(&self, broker: i32, wants: &[(&Key, Asked)]) -> Option<SubFuture> {
        let mut st = self.inner.lock().expect("read-ahead");
        let (_, f, asked) = st.pending.get(&broker)?;
        let f = f.clone();
        let covers = wants.iter().all(|(k, a)| asked.get(*k) == Some(a));
        if !covers {
            st.yielding.insert(broker);
        }
        Some(f)
    }

    /// Whether a request is waiting for the read-ahead chain on `broker` to stop.
    pub fn yielding(&self, broker: i32) -> bool {
        self.inner
            .lock()
            .expect("read-ahead")
            .yielding
            .contains(&broker)
    }

    /// Makes the read-ahead chain on `broker` stop after its poll in flight (a request
    /// needs something it does not read).
    pub fn yield_broker(&self, broker: i32) {
        self.inner
            .lock()
            .expect("read-ahead")
            .yielding
            .insert(broker);
    }

    /// Starts a poll of `broker` with `start(seq)` and files it as the one in flight there,
    /// unless one is already (one poll per broker at a time: the socket serves one request at
    /// a time, and the fetch session with the broker numbers them). `ahead`: a read-ahead,
    /// sent before the client asked. `start` must not call back into this.
    pub fn start_if_idle(
        &self,
        broker: i32,
        kind: PollKind,
        asked: HashMap<Key, Asked>,
        start: impl FnOnce(u64) -> SubFuture,
    ) -> Option<SubFuture> {
        let mut st = self.inner.lock().expect("read-ahead");
        if st.pending.contains_key(&broker) {
            if kind == PollKind::Own {
                // The chain got its poll out first: it stops after it.
                st.yielding.insert(broker);
            }
            return None;
        }
        match kind {
            PollKind::Chain if st.yielding.contains(&broker) => return None,
            // A request's poll, or the read-ahead of its next fetch, covers what made it
            // yield.
            PollKind::Own | PollKind::ReadAhead => {
                st.yielding.remove(&broker);
            }
            PollKind::Chain => {}
        }
        let ahead = kind != PollKind::Own;
        let seq = self.next_seq();
        let f = start(seq);
        st.pending.insert(broker, (seq, f.clone(), asked));
        if ahead {
            st.ahead.retain(|s| *s + 1024 > seq); // bounded: old marks of lost polls go
            st.ahead.insert(seq);
        }
        Some(f)
    }

    /// Files a finished sub-fetch's answer (once: later calls for the same result do
    /// nothing) at the end of each partition's queue. `charge` accounts for the bytes kept.
    pub fn fold(&self, r: &SubResult, charge: impl Fn(usize) -> Option<Charge>) -> Folded {
        let mut st = self.inner.lock().expect("read-ahead");
        if st.pending.get(&r.broker).map(|(s, _, _)| *s) != Some(r.seq) {
            return Folded::default();
        }
        st.pending.remove(&r.broker);
        let ahead = st.ahead.remove(&r.seq);
        let now = Instant::now();
        expire(&mut st, now);
        let mut folded = Folded::default();
        let offsets: HashMap<&Key, Asked> = r.asked.iter().map(|(k, a)| (k, *a)).collect();
        let queued = self.queued.clone();
        let isolation = r.isolation;
        let entry = |asked: Asked, data: PartitionData, charge: Option<Charge>| Ready {
            offset: asked.offset,
            epochs: Some((asked.current_leader_epoch, asked.last_fetched_epoch)),
            isolation,
            counted: Counted::new(&queued, data.records.as_ref().map_or(0, |r| r.len())),
            data,
            at: now,
            ahead,
            gated: false,
            _charge: charge,
        };
        match &r.outcome {
            Ok(resp) if resp.error_code == codes::NONE => {
                folded.throttle_ms = resp.throttle_time_ms;
                st.throttle_ms = st.throttle_ms.max(resp.throttle_time_ms);
                for t in &resp.responses {
                    for p in &t.partitions {
                        let key: Key = (
                            TopicRef {
                                name: t.topic.0.clone(),
                                id: t.topic_id,
                            },
                            p.partition_index,
                        );
                        let Some(&asked) = offsets.get(&key) else {
                            continue;
                        };
                        crate::telemetry::upstream_code(
                            kafka_protocol::messages::ApiKey::Fetch,
                            p.error_code,
                        );
                        if p.error_code != codes::NONE {
                            folded.stale |= codes::stale_leader(p.error_code);
                        } else {
                            st.seen.insert(key.clone(), Marks::of(p));
                        }
                        let records = p.records.as_ref().map_or(0, |r| r.len());
                        if ahead
                            && p.error_code == codes::NONE
                            && let Some(next) = p
                                .records
                                .as_ref()
                                .and_then(|r| super::plan::batches_within(r, usize::MAX).1)
                        {
                            metrics::counter!("shardgate_prefetch_prefetched_records_total")
                                .increment((next - asked.offset).max(0) as u64);
                        }
                        // Records without one whole batch (the end of a poll's bytes cut
                        // into the next batch) are no answer to queue: a client given only
                        // that reads nothing and, librdkafka, doubles its partition max
                        // bytes (and so the queue's floor) each time.
                        let news = p.error_code != codes::NONE
                            || (records > 0 && super::plan::whole_batch(p))
                            || p.diverging_epoch.epoch >= 0
                            || p.snapshot_id.epoch >= 0;
                        if news {
                            let e = entry(asked, p.clone(), charge(records));
                            append(&mut st, key, e);
                        }
                    }
                }
            }
            Ok(resp) => {
                folded.stale = true;
                for (k, a) in &r.asked {
                    let e = entry(*a, error_answer(k.1, resp.error_code), None);
                    append(&mut st, k.clone(), e);
                }
            }
            Err(_) => {
                folded.stale = true;
                for (k, a) in &r.asked {
                    let e = entry(*a, error_answer(k.1, codes::NOT_LEADER_OR_FOLLOWER), None);
                    append(&mut st, k.clone(), e);
                }
            }
        }
        folded
    }

    /// The partitions the client fetched lately.
    pub fn asked_keys(&self) -> Vec<Key> {
        let st = self.inner.lock().expect("read-ahead");
        st.asked.keys().cloned().collect()
    }

    /// Drops the queues of partitions `keep` refuses (no longer assigned to the connection's
    /// group member) and forgets they were asked for, so the read-ahead chain stops reading
    /// them: at once, not `UNASKED_TTL` after the rebalance.
    pub fn retain_assigned(&self, keep: impl Fn(&Key) -> bool) {
        let mut st = self.inner.lock().expect("read-ahead");
        let mut dropped = 0u64;
        st.ready.retain(|k, q| {
            let kept = keep(k);
            if !kept {
                dropped += q.len() as u64;
            }
            kept
        });
        st.asked.retain(|k, _| keep(k));
        drop(st);
        if dropped > 0 {
            metrics::counter!("shardgate_prefetch_evictions_total", "reason" => "unassigned")
                .increment(dropped);
        }
    }

    #[cfg(test)]
    pub fn ready_len(&self) -> usize {
        let st = self.inner.lock().expect("read-ahead");
        st.ready.values().map(VecDeque::len).sum()
    }
}

/// Drops expired entries (and the record of partitions not asked for since).
fn expire(st: &mut Inner, now: Instant) {
    let (mut expired, mut unasked) = (0u64, 0u64);
    let asked = &st.asked;
    st.ready.retain(|k, q| {
        if asked
            .get(k)
            .is_none_or(|at| now.duration_since(*at) > UNASKED_TTL)
        {
            unasked += q.len() as u64;
            return false;
        }
        let before = q.len();
        q.retain(|e| !e.expired(now));
        expired += (before - q.len()) as u64;
        !q.is_empty()
    });
    if expired > 0 {
        metrics::counter!("shardgate_prefetch_evictions_total", "reason" => "ttl")
            .increment(expired);
    }
    if unasked > 0 {
        metrics::counter!("shardgate_prefetch_evictions_total", "reason" => "unasked")
            .increment(unasked);
    }
    st.asked.retain(|_, at| now.duration_since(*at) <= DATA_TTL);
    let asked = &st.asked;
    st.seen.retain(|k, _| asked.contains_key(k));
}

/// Queues `e` after what `key` holds when it continues it; otherwise (a gap, an error
/// before it) it replaces the queue: a fetch can only ever take the first entry.
fn append(st: &mut Inner, key: Key, e: Ready) {
    let q = st.ready.entry(key).or_default();
    if q.back()
        .is_some_and(|b| b.end().map(|(o, _)| o) != Some(e.offset))
    {
        metrics::counter!("shardgate_prefetch_evictions_total", "reason" => "replaced")
            .increment(q.len() as u64);
        q.clear();
    }
    q.push_back(e);
}

#[cfg(test)]
#[path = "readahead_tests.rs"]
mod tests;
