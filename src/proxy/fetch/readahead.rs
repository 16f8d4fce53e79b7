//! Per client connection: what was read from upstream and not yet delivered (a long-poll's
//! answer that arrived after its request was answered, the part of an answer beyond the
//! client's max_bytes), the upstream polls in flight, and the offsets upstream last reported
//! per partition. A fetch takes an entry only at the exact offset the client asks for (and,
//! for a poll's answer, with the epochs the poll was sent with); anything else (a seek, a
//! rewind, new epochs) drops it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
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

#[derive(Default)]
pub struct ConnFetch {
    inner: Mutex<Inner>,
    seq: AtomicU64,
    /// The connection's fetch sessions with the brokers (its polls).
    pub sessions: std::sync::Arc<super::upstream_sessions::Sessions>,
}

#[derive(Default)]
struct Inner {
    ready: HashMap<Key, Ready>,
    seen: HashMap<Key, Marks>,
    pending: HashMap<i32, (u64, SubFuture)>,
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
    _charge: Option<Charge>,
}

impl Ready {
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

    /// The entry for `key` if it answers a fetch `asked`; any other entry of `key` is
    /// dropped.
    pub fn take(&self, key: &Key, asked: Asked) -> Option<PartitionData> {
        let mut st = self.inner.lock().expect("read-ahead");
        let r = st.ready.remove(key)?;
        let epochs_hold = r
            .epochs
            .is_none_or(|e| e == (asked.current_leader_epoch, asked.last_fetched_epoch));
        if r.offset == asked.offset && epochs_hold && !r.expired(Instant::now()) {
            Some(r.data)
        } else {
            metrics::counter!("shardgate_fetch_readahead_dropped_total").increment(1);
            None
        }
    }

    /// Keeps `data` (an answer from `offset`) for a later fetch; `asked`: the fetch it answers
    /// (its epochs must match), None for the rest of an answer cut at max_bytes.
    pub fn put(
        &self,
        key: Key,
        offset: i64,
        asked: Option<Asked>,
        data: PartitionData,
        charge: Option<Charge>,
    ) {
        let mut st = self.inner.lock().expect("read-ahead");
        st.ready.insert(
            key,
            Ready {
                offset,
                epochs: asked.map(|a| (a.current_leader_epoch, a.last_fetched_epoch)),
                data,
                at: Instant::now(),
                _charge: charge,
            },
        );
    }

    pub fn has_ready(&self, key: &Key) -> bool {
        self.inner
            .lock()
            .expect("read-ahead")
            .ready
            .contains_key(key)
    }

    /// Runs a poll nobody waits for yet (a read-ahead); aborted with the connection.
    pub fn drive(&self, fut: SubFuture) {
        let task = tokio::spawn(async move {
            fut.await;
        });
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
            .map(|(_, f)| f.clone())
    }

    /// Marks the poll pending on `broker` as a read-ahead.
    pub fn mark_ahead(&self, broker: i32) {
        let mut st = self.inner.lock().expect("read-ahead");
        if let Some(seq) = st.pending.get(&broker).map(|(s, _)| *s) {
            st.ahead.retain(|s| *s + 1024 > seq); // bounded: old marks of lost polls go
            st.ahead.insert(seq);
        }
    }

    pub fn set_pending(&self, broker: i32, seq: u64, fut: SubFuture) {
        self.inner
            .lock()
            .expect("read-ahead")
            .pending
            .insert(broker, (seq, fut));
    }

    /// Files a finished sub-fetch's answer (once: later calls for the same result do
    /// nothing). `charge` accounts for the bytes kept.
    pub fn fold(&self, r: &SubResult, charge: impl Fn(usize) -> Option<Charge>) -> Folded {
        let mut st = self.inner.lock().expect("read-ahead");
        if st.pending.get(&r.broker).map(|(s, _)| *s) != Some(r.seq) {
            return Folded::default();
        }
        st.pending.remove(&r.broker);
        let ahead = st.ahead.remove(&r.seq);
        let now = Instant::now();
        st.ready.retain(|_, e| !e.expired(now));
        let mut folded = Folded::default();
        let offsets: HashMap<&Key, Asked> = r.asked.iter().map(|(k, a)| (k, *a)).collect();
        let failed = |st: &mut Inner, code: i16| {
            for (k, a) in &r.asked {
                st.ready.insert(
                    k.clone(),
                    Ready {
                        offset: a.offset,
                        epochs: Some((a.current_leader_epoch, a.last_fetched_epoch)),
                        data: error_answer(k.1, code),
                        at: now,
                        _charge: None,
                    },
                );
            }
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
                            st.ready.insert(
                                key,
                                Ready {
                                    offset: asked.offset,
                                    epochs: Some((
                                        asked.current_leader_epoch,
                                        asked.last_fetched_epoch,
                                    )),
                                    data: p.clone(),
                                    at: now,
                                    _charge: charge(records),
                                },
                            );
                        }
                    }
                }
            }
            Ok(resp) => {
                folded.stale = true;
                failed(&mut st, resp.error_code);
            }
            Err(_) => {
                folded.stale = true;
                failed(&mut st, codes::NOT_LEADER_OR_FOLLOWER);
            }
        }
        folded
    }

    /// Forgets a topic's partitions (for tests and sanity: entries are bounded per key).
    #[cfg(test)]
    pub fn ready_len(&self) -> usize {
        self.inner.lock().expect("read-ahead").ready.len()
    }
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
}
