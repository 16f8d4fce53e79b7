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
use super::upstream::{SubFuture, SubResult};
use crate::protocol::{TopicRef, codes};
use crate::proxy::budget::Charge;

/// Data not fetched again within this is dropped (the client moved on or went idle).
const DATA_TTL: Duration = Duration::from_secs(30);
/// An error is news only for the next fetch or so.
const ERROR_TTL: Duration = Duration::from_secs(2);

/// Record bytes in all connections' queues of this process (`prefetch.max_bytes` bounds it).
static QUEUED: AtomicUsize = AtomicUsize::new(0);

pub fn queued_total() -> usize {
    QUEUED.load(Ordering::Relaxed)
}

/// Record bytes of one queue entry, counted for its connection and the process until dropped.
struct Held {
    conn: Arc<AtomicUsize>,
    n: usize,
}

impl Held {
    fn new(conn: &Arc<AtomicUsize>, n: usize) -> Self {
        conn.fetch_add(n, Ordering::Relaxed);
        let total = QUEUED.fetch_add(n, Ordering::Relaxed) + n;
        metrics::gauge!("shardgate_prefetch_queue_bytes").set(total as f64);
        Self {
            conn: conn.clone(),
            n,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.conn.fetch_sub(self.n, Ordering::Relaxed);
        let total = QUEUED.fetch_sub(self.n, Ordering::Relaxed) - self.n;
        metrics::gauge!("shardgate_prefetch_queue_bytes").set(total as f64);
    }
}

/// An entry taken by a fetch.
pub struct Taken {
    pub data: PartitionData,
    /// Read by a poll sent ahead of the client's request.
    pub ahead: bool,
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
    seq: AtomicU64,
    /// Record bytes queued for this connection.
    queued: Arc<AtomicUsize>,
    /// The connection's fetch sessions with the brokers (its polls).
    pub sessions: std::sync::Arc<super::upstream_sessions::Sessions>,
}

#[derive(Default)]
struct Inner {
    ready: HashMap<Key, VecDeque<Ready>>,
    /// When the client last fetched each partition (a queue continues only for those it
    /// still fetches).
    asked: HashMap<Key, Instant>,
    /// Partitions the last response cut at max_bytes (they go first in the next).
    cut: std::collections::HashSet<Key>,
    seen: HashMap<Key, Marks>,
    /// Per broker: the poll in flight, and the offset it asks each partition from.
    pending: HashMap<i32, (u64, SubFuture, HashMap<Key, i64>)>,
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
    data: PartitionData,
    at: Instant,
    ahead: bool,
    _charge: Option<Charge>,
    _held: Held,
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
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// The first entry of `key`'s queue if it answers a fetch `asked`; otherwise the queue
    /// is dropped (the client sought elsewhere or learnt new epochs).
    pub fn take(&self, key: &Key, asked: Asked) -> Option<Taken> {
        let mut st = self.inner.lock().expect("read-ahead");
        let now = Instant::now();
        match st.asked.get_mut(key) {
            Some(at) => *at = now,
            None => {
                st.asked.insert(key.clone(), now);
            }
        }
        let q = st.ready.get_mut(key)?;
        let r = q.pop_front()?;
        let epochs_hold = r
            .epochs
            .is_none_or(|e| e == (asked.current_leader_epoch, asked.last_fetched_epoch));
        let reason = if r.expired(now) {
            Some("ttl")
        } else if r.offset != asked.offset {
            Some("seek")
        } else if !epochs_hold {
            Some("epoch")
        } else {
            None
        };
        let dropped = match reason {
            None => 0,
            Some(reason) => {
                let n = 1 + q.len() as u64;
                q.clear();
                metrics::counter!("shardgate_fetch_readahead_dropped_total").increment(n);
                metrics::counter!("shardgate_prefetch_evictions_total", "reason" => reason)
                    .increment(n);
                n
            }
        };
        if q.is_empty() {
            st.ready.remove(key);
        }
        (dropped == 0).then_some(Taken {
            data: r.data,
            ahead: r.ahead,
        })
    }

    /// Puts `data` (an answer from `offset`) first in `key`'s queue for a later fetch;
    /// `asked`: the fetch it answers (its epochs must match), None for the rest of an answer
    /// cut at max_bytes.
    pub fn put(
        &self,
        key: Key,
        offset: i64,
        asked: Option<Asked>,
        data: PartitionData,
        charge: Option<Charge>,
    ) {
        let held = Held::new(&self.queued, data.records.as_ref().map_or(0, |r| r.len()));
        let mut st = self.inner.lock().expect("read-ahead");
        st.ready.entry(key).or_default().push_front(Ready {
            offset,
            epochs: asked.map(|a| (a.current_leader_epoch, a.last_fetched_epoch)),
            data,
            at: Instant::now(),
            ahead: false,
            _charge: charge,
            _held: held,
        });
    }

    /// Where `key`'s queue ends.
    pub fn tail(&self, key: &Key) -> Tail {
        let st = self.inner.lock().expect("read-ahead");
        match st.ready.get(key).and_then(|q| q.back()) {
            None => Tail::Empty,
            Some(r) => r.end().map_or(Tail::Stuck, |(o, e)| Tail::At(o, e)),
        }
    }

    /// Whether the last response cut each of `keys` at max_bytes.
    pub fn were_cut<'a>(&self, keys: impl Iterator<Item = &'a Key>) -> Vec<bool> {
        let st = self.inner.lock().expect("read-ahead");
        keys.map(|k| st.cut.contains(k)).collect()
    }

    /// The partitions the response just assembled cut at max_bytes.
    pub fn set_cut(&self, cut: std::collections::HashSet<Key>) {
        let mut st = self.inner.lock().expect("read-ahead");
        if !(cut.is_empty() && st.cut.is_empty()) {
            st.cut = cut;
        }
    }

    /// Record bytes queued for this connection.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
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
    pub fn pending_for(&self, broker: i32, wants: &[(&Key, i64)]) -> Option<SubFuture> {
        let mut st = self.inner.lock().expect("read-ahead");
        let (_, f, asked) = st.pending.get(&broker)?;
        let f = f.clone();
        let covers = wants.iter().all(|(k, o)| asked.get(*k) == Some(o));
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

    /// Starts a poll of `broker` with `start(seq)` and files it as the one in flight there,
    /// unless one is already (one poll per broker at a time: the socket serves one request at
    /// a time, and the fetch session with the broker numbers them). `ahead`: a read-ahead,
    /// sent before the client asked. `start` must not call back into this.
    pub fn start_if_idle(
        &self,
        broker: i32,
        ahead: bool,
        asked: HashMap<Key, i64>,
        start: impl FnOnce(u64) -> SubFuture,
    ) -> Option<SubFuture> {
        let mut st = self.inner.lock().expect("read-ahead");
        if st.pending.contains_key(&broker) || (ahead && st.yielding.contains(&broker)) {
            return None;
        }
        if !ahead {
            st.yielding.remove(&broker);
        }
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
        let mut expired = 0u64;
        st.ready.retain(|_, q| {
            let before = q.len();
            q.retain(|e| !e.expired(now));
            expired += (before - q.len()) as u64;
            !q.is_empty()
        });
        if expired > 0 {
            metrics::counter!("shardgate_prefetch_evictions_total", "reason" => "ttl")
                .increment(expired);
        }
        st.asked.retain(|_, at| now.duration_since(*at) <= DATA_TTL);
        let mut folded = Folded::default();
        let offsets: HashMap<&Key, Asked> = r.asked.iter().map(|(k, a)| (k, *a)).collect();
        let queued = self.queued.clone();
        let entry = |asked: Asked, data: PartitionData, charge: Option<Charge>| Ready {
            offset: asked.offset,
            epochs: Some((asked.current_leader_epoch, asked.last_fetched_epoch)),
            _held: Held::new(&queued, data.records.as_ref().map_or(0, |r| r.len())),
            data,
            at: now,
            ahead,
            _charge: charge,
        };
        match &r.outcome {
            Ok(resp) if resp.error_code == codes::NONE => {
                folded.throttle_ms = resp.throttle_time_ms;
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
                        let news = p.error_code != codes::NONE
                            || records > 0
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

    #[cfg(test)]
    pub fn ready_len(&self) -> usize {
        let st = self.inner.lock().expect("read-ahead");
        st.ready.values().map(VecDeque::len).sum()
    }
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
mod tests {
    use super::*;

    fn key() -> Key {
        (
            TopicRef {
                name: kafka_protocol::protocol::StrBytes::from_static_str("t"),
                id: uuid::Uuid::nil(),
            },
            0,
        )
    }

    fn asked(offset: i64, current: i32, last: i32) -> Asked {
        Asked {
            offset,
            current_leader_epoch: current,
            last_fetched_epoch: last,
        }
    }

    #[test]
    fn a_polls_answer_serves_only_a_fetch_with_the_same_offset_and_epochs() {
        let f = ConnFetch::default();
        let data = || PartitionData::default().with_high_watermark(20);
        f.put(key(), 10, Some(asked(10, 5, 4)), data(), None);
        assert!(
            f.take(&key(), asked(10, 5, 5)).is_none(),
            "other last epoch"
        );
        f.put(key(), 10, Some(asked(10, 5, 4)), data(), None);
        assert!(
            f.take(&key(), asked(10, 6, 4)).is_none(),
            "other leader epoch"
        );
        f.put(key(), 10, Some(asked(10, 5, 4)), data(), None);
        assert!(f.take(&key(), asked(11, 5, 4)).is_none(), "other offset");
        f.put(key(), 10, Some(asked(10, 5, 4)), data(), None);
        assert!(f.take(&key(), asked(10, 5, 4)).is_some());
        // The rest of a checked answer continues whatever the epochs.
        f.put(key(), 10, None, data(), None);
        assert!(f.take(&key(), asked(10, 7, 7)).is_some());
    }

    fn batch(base: i64, last_delta: i32, epoch: i32) -> bytes::Bytes {
        use bytes::BufMut;
        let mut b = bytes::BytesMut::new();
        b.put_i64(base);
        b.put_i32(100);
        b.put_i32(epoch);
        b.put_i8(2);
        b.put_u32(0);
        b.put_i16(0);
        b.put_i32(last_delta);
        b.resize(112, 0);
        b.freeze()
    }

    /// Files an answer of `records` to a poll of `key` from `asked` (sent ahead).
    fn land(f: &ConnFetch, asked: Asked, records: bytes::Bytes) {
        use futures::FutureExt;
        use kafka_protocol::messages::FetchResponse;
        use kafka_protocol::messages::fetch_response::FetchableTopicResponse;
        let resp = FetchResponse::default().with_responses(vec![
            FetchableTopicResponse::default()
                .with_topic(kafka_protocol::messages::TopicName(key().0.name))
                .with_partitions(vec![
                    PartitionData::default()
                        .with_high_watermark(1000)
                        .with_records(Some(records)),
                ]),
        ]);
        let result = Arc::new(SubResult {
            broker: 1,
            seq: 0,
            asked: vec![(key(), asked)],
            outcome: Ok(resp),
        });
        let seq = std::cell::Cell::new(0);
        let started = f
            .start_if_idle(1, true, HashMap::new(), |s| {
                seq.set(s);
                futures::future::ready(result.clone()).boxed().shared()
            })
            .expect("idle");
        drop(started);
        let result = SubResult {
            broker: 1,
            seq: seq.get(),
            asked: result.asked.clone(),
            outcome: result.outcome.clone(),
        };
        f.fold(&result, |_| None);
    }

    #[test]
    fn a_queue_serves_contiguous_reads_in_order_and_a_seek_drops_it() {
        let f = ConnFetch::default();
        land(&f, asked(10, 5, 4), batch(10, 9, 5)); // 10..=19
        assert_eq!(f.tail(&key()), Tail::At(20, Some(5)));
        land(&f, asked(20, 5, 5), batch(20, 4, 5)); // 20..=24, read from where the first ends
        assert_eq!(f.tail(&key()), Tail::At(25, Some(5)));
        assert_eq!(f.ready_len(), 2);
        assert_eq!(f.queued_bytes(), 224);
        let first = f.take(&key(), asked(10, 5, 4)).expect("first read");
        assert!(first.ahead);
        assert_eq!(f.queued_bytes(), 112);
        // The client asks from the end of what it got, with its last batch's epoch.
        assert!(f.take(&key(), asked(20, 5, 5)).is_some(), "second read");
        assert_eq!((f.ready_len(), f.queued_bytes()), (0, 0));

        land(&f, asked(25, 5, 5), batch(25, 4, 5));
        land(&f, asked(30, 5, 5), batch(30, 4, 5));
        // A read that does not continue the queue replaces it.
        land(&f, asked(50, 5, 5), batch(50, 4, 5));
        assert_eq!(f.ready_len(), 1);
        // A seek drops what is queued.
        assert!(f.take(&key(), asked(40, 5, 5)).is_none());
        assert_eq!((f.ready_len(), f.queued_bytes()), (0, 0));
        assert_eq!(f.tail(&key()), Tail::Empty);
    }
}
