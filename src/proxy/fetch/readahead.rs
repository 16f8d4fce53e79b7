//! Per client connection: what was read from upstream and not yet delivered (a long-poll's
//! answer that arrived after its request was answered, the part of an answer beyond the
//! client's max_bytes), the upstream polls in flight, and the offsets upstream last reported
//! per partition. A fetch takes an entry only at the exact offset the client asks for; any
//! other offset (a seek, a rewind) drops it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kafka_protocol::messages::fetch_response::PartitionData;

use super::plan::{Key, Marks, error_answer};
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

    /// The entry for `key` if it answers a fetch from `offset`; any other entry of `key` is
    /// dropped.
    pub fn take(&self, key: &Key, offset: i64) -> Option<PartitionData> {
        let mut st = self.inner.lock().expect("read-ahead");
        let r = st.ready.remove(key)?;
        if r.offset == offset && !r.expired(Instant::now()) {
            Some(r.data)
        } else {
            metrics::counter!("shardgate_fetch_readahead_dropped_total").increment(1);
            None
        }
    }

    /// Keeps `data` (an answer from `offset`) for a later fetch.
    pub fn put(&self, key: Key, offset: i64, data: PartitionData, charge: Option<Charge>) {
        let mut st = self.inner.lock().expect("read-ahead");
        st.ready.insert(
            key,
            Ready {
                offset,
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
        let now = Instant::now();
        st.ready.retain(|_, e| !e.expired(now));
        let mut folded = Folded::default();
        let offsets: HashMap<&Key, i64> = r.asked.iter().map(|(k, o)| (k, *o)).collect();
        let failed = |st: &mut Inner, code: i16| {
            for (k, o) in &r.asked {
                st.ready.insert(
                    k.clone(),
                    Ready {
                        offset: *o,
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
                        let Some(&offset) = offsets.get(&key) else {
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
                        let news = p.error_code != codes::NONE
                            || records > 0
                            || p.diverging_epoch.epoch >= 0
                            || p.snapshot_id.epoch >= 0;
                        if news {
                            st.ready.insert(
                                key,
                                Ready {
                                    offset,
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
