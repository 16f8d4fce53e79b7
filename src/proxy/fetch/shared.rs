//! Pre-reads shared by every connection: records read from upstream before any client asked,
//! kept by (topic, partition, offset) for the fetch that asks exactly there.
//!
//! The first prediction filled here: a rebalance. When a member's new assignment passes
//! through (a SyncGroup answer, or a KIP-848 heartbeat answer with an assignment), each
//! partition whose committed offset this instance saw is read from that offset at once. The
//! member itself first asks the coordinator for its offsets (one round trip) and only then
//! fetches: the pre-read is under way, or done, by then. A fetch at the same offset takes the
//! answer (or waits for the read in flight instead of sending its own), and so does every
//! other group reading that partition from there (one upstream read for all of them).
//!
//! Exactness: an answer is served only for the same offset, isolation level and topic id it
//! was read with (the id a Fetch v13+ names, else the one the topology knows for the name: a
//! name-based fetch of a topic deleted and created again by another client, directly at
//! Kafka, could meet an older pre-read until the topology's next refresh, at most 10 s), and when the client's `current_leader_epoch` is unset or the one the read was made
//! under (upstream checked that epoch); high watermark, last stable offset and log start are
//! those upstream reported with the read (never ahead of upstream); records are cut at whole
//! batches to the client's partition max_bytes (the first batch always, as Kafka does), and
//! the aborted transactions kept are those starting within what is returned. Entries live
//! `prefetch.ttl_ms`, and the bytes held are capped by `prefetch.max_bytes` (a full store
//! refuses new reads, counted).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use kafka_protocol::messages::FetchRequest;
use kafka_protocol::messages::fetch_request::FetchPartition;
use kafka_protocol::messages::fetch_response::PartitionData;

use super::plan::{self, Want};
use super::upstream::{self, SubFuture, SubResult};
use crate::protocol::{TopicRef, codes};
use crate::proxy::Ctx;

/// Bytes one partition's pre-read may bring (Kafka's default max.partition.fetch.bytes).
const PARTITION_MAX_BYTES: i32 = 1024 * 1024;
/// Owner of the upstream sockets pre-reads use (one per broker; pre-reads are not held).
const OWNER: u64 = u64::MAX - 1;
/// Fetch version pre-reads use upstream: topics by id (a topic deleted and created again
/// under the same name is refused as UNKNOWN_TOPIC_ID, not read).
const VERSION: i16 = 13;

enum State {
    InFlight(SubFuture),
    Ready(Box<PartitionData>),
}

struct Slot {
    /// Which read filled it (a slot replaced while a read was out is not filled by it).
    generation: u64,
    /// The topic's id when read: a topic deleted and created again is another topic.
    topic_id: uuid::Uuid,
    offset: i64,
    isolation: i8,
    /// The leader epoch the read was sent with (upstream refused it if stale).
    epoch: i32,
    at: Instant,
    state: State,
    /// Record bytes of a ready slot, or the bytes reserved for a read in flight (the cap
    /// counts both).
    bytes: usize,
}

/// What a fetch finds for one partition.
pub enum Found {
    Ready(Box<PartitionData>),
    InFlight(SubFuture),
    Nothing,
}

pub struct SharedReads {
    slots: Mutex<HashMap<(String, i32), Slot>>,
    bytes: std::sync::atomic::AtomicUsize,
    /// Slots held (read without the lock: fetches skip an empty store at no cost).
    count: std::sync::atomic::AtomicUsize,
    next_generation: std::sync::atomic::AtomicU64,
    /// `prefetch.ttl_ms`: how long a pre-read waits to be asked for.
    ttl: Duration,
    /// `prefetch.max_bytes`: bytes of pre-read records held at once (all connections).
    max_bytes: usize,
}

impl SharedReads {
    pub fn new(ttl: Duration, max_bytes: usize) -> Self {
        Self {
            slots: Mutex::default(),
            bytes: Default::default(),
            count: Default::default(),
            next_generation: Default::default(),
            ttl,
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i32), Slot>> {
        self.slots.lock().expect("shared reads")
    }

    /// What is held for `want` (an exact match of offset, isolation level and epoch rules).
    pub fn find(&self, want: &Want, isolation: i8, topic_id: uuid::Uuid) -> Found {
        let Some(name) = &want.name else {
            return Found::Nothing;
        };
        if self.count.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            return Found::Nothing;
        }
        let mut slots = self.lock();
        let key = (name.to_string(), want.key.1);
        let Some(slot) = slots.get(&key) else {
            return Found::Nothing;
        };
        if slot.at.elapsed() > self.ttl {
            let gone = slots.remove(&key).expect("present");
            self.evicted(&gone, "ttl");
            self.count
                .store(slots.len(), std::sync::atomic::Ordering::Relaxed);
            return Found::Nothing;
        }
        let epoch = want.part.current_leader_epoch;
        // KIP-320: a client that names the epoch of its last fetched batch gets a divergence
        // check upstream. Under the epoch the read was made with the log cannot have
        // diverged below the offset read; any other epoch goes upstream.
        let last = want.part.last_fetched_epoch;
        if (last >= 0 && last != slot.epoch)
            || slot.offset != want.part.fetch_offset
            || slot.topic_id != topic_id
            || slot.isolation != isolation
            || (epoch >= 0 && epoch != slot.epoch)
        {
            return Found::Nothing;
        }
        match &slot.state {
            State::InFlight(f) => Found::InFlight(f.clone()),
            State::Ready(p) => {
                let limit = want.part.partition_max_bytes.max(0) as usize;
                match cut(p, limit) {
                    Some(p) => Found::Ready(Box::new(p)),
                    None => Found::Nothing,
                }
            }
        }
    }

    fn evicted(&self, slot: &Slot, reason: &'static str) {
        self.bytes
            .fetch_sub(slot.bytes, std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!("shardgate_prefetch_bytes")
            .set(self.bytes.load(std::sync::atomic::Ordering::Relaxed) as f64);
        metrics::counter!("shardgate_prefetch_evictions_total", "reason" => reason).increment(1);
    }

    /// Files what a pre-read brought: partitions with records become ready, the rest (errors,
    /// nothing there yet) are dropped so a fetch goes upstream itself.
    fn file(&self, r: &SubResult, generation: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let answered: HashMap<(uuid::Uuid, i32), &PartitionData> = match &r.outcome {
            Ok(resp) => resp
                .responses
                .iter()
                .flat_map(|t| {
                    t.partitions
                        .iter()
                        .map(move |p| ((t.topic_id, p.partition_index), p))
                })
                .collect(),
            Err(_) => HashMap::new(),
        };
        let mut slots = self.lock();
        for (key, _) in &r.asked {
            let k = (key.0.name.to_string(), key.1);
            // Only the slot this read was started for (not one that replaced it since).
            let Some(slot) = slots.get_mut(&k).filter(|s| s.generation == generation) else {
                continue;
            };
            let reserved = slot.bytes;
            match answered.get(&(key.0.id, key.1)) {
                Some(p)
                    if p.error_code == codes::NONE
                        && p.records.as_ref().is_some_and(|r| !r.is_empty()) =>
                {
                    let n = p.records.as_ref().map_or(0, |r| r.len());
                    let mut p = (*p).clone();
                    plan::scrub(&mut p);
                    slot.state = State::Ready(Box::new(p));
                    slot.bytes = n;
                    self.bytes.fetch_add(n, Relaxed);
                    self.bytes.fetch_sub(reserved, Relaxed);
                    metrics::counter!("shardgate_prefetch_prefetched_records_total")
                        .increment(records_in(slot));
                }
                _ => {
                    slots.remove(&k);
                    self.bytes.fetch_sub(reserved, Relaxed);
                }
            }
        }
        self.count.store(slots.len(), Relaxed);
        metrics::gauge!("shardgate_prefetch_bytes").set(self.bytes.load(Relaxed) as f64);
    }

    /// Pre-reads `parts` (topic, partition, offset) for a member that was just assigned
    /// them, unless held already; `isolation` is the level its client fetched with before
    /// (read_uncommitted when unknown).
    pub fn pre_read(self: &Arc<Self>, ctx: &Ctx, parts: Vec<(String, i32, i64)>, isolation: i8) {
        let topo = ctx.topology().load();
        let request_timeout = Duration::from_millis(ctx.settings.raw.upstream.request_timeout_ms);
        self.sweep();
        let mut slots = self.lock();
        let mut by_broker: HashMap<i32, Vec<Want>> = HashMap::new();
        for (topic, partition, offset) in parts {
            if offset < 0 {
                continue;
            }
            let Some(info) = topo.topics.get(topic.as_bytes()) else {
                continue;
            };
            let Some(pi) = info.partitions.get(partition as usize) else {
                continue;
            };
            if pi.leader < 0
                || slots
                    .get(&(topic.clone(), partition))
                    .is_some_and(|s| s.offset == offset && s.isolation == isolation)
            {
                continue;
            }
            // Reserved now: reads in flight count against the cap until they land.
            let reserve = PARTITION_MAX_BYTES as usize;
            if self.bytes.load(std::sync::atomic::Ordering::Relaxed) + reserve > self.max_bytes {
                metrics::counter!("shardgate_prefetch_refused_total", "reason" => "memory")
                    .increment(1);
                continue;
            }
            self.bytes
                .fetch_add(reserve, std::sync::atomic::Ordering::Relaxed);
            let name: kafka_protocol::protocol::StrBytes = topic.clone().into();
            by_broker.entry(pi.leader).or_default().push(Want {
                key: (
                    TopicRef {
                        name: name.clone(),
                        id: info.id,
                    },
                    partition,
                ),
                part: FetchPartition::default()
                    .with_partition(partition)
                    .with_fetch_offset(offset)
                    .with_current_leader_epoch(pi.leader_epoch)
                    .with_log_start_offset(-1)
                    .with_partition_max_bytes(PARTITION_MAX_BYTES),
                name: Some(name),
                leader: Ok(pi.leader),
            });
        }
        for (broker, wants) in by_broker {
            let body = FetchRequest::default()
                .with_replica_id(kafka_protocol::messages::BrokerId(-1))
                .with_max_bytes((self.max_bytes / 4).min(i32::MAX as usize) as i32)
                .with_isolation_level(isolation)
                .with_min_bytes(1);
            let template =
                upstream::Template::new(body, VERSION, Some("shardgate-prefetch".into()));
            let refs: Vec<&Want> = wants.iter().collect();
            let read = upstream::start(
                ctx.pool.clone(),
                OWNER,
                &template,
                broker,
                &refs,
                Duration::ZERO,
                request_timeout,
                // No connection's poll has this sequence number: no connection files it.
                u64::MAX,
            );
            // Whoever awaits the read finds it filed: the store files it before it resolves.
            let store = self.clone();
            let generation = self
                .next_generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let filed: SubFuture = async move {
                let r = read.await;
                store.file(&r, generation);
                r
            }
            .boxed()
            .shared();
            for w in &wants {
                let old = slots.insert(
                    (w.key.0.name.to_string(), w.key.1),
                    Slot {
                        generation,
                        topic_id: w.key.0.id,
                        offset: w.part.fetch_offset,
                        isolation,
                        epoch: w.part.current_leader_epoch,
                        at: Instant::now(),
                        state: State::InFlight(filed.clone()),
                        bytes: PARTITION_MAX_BYTES as usize,
                    },
                );
                if let Some(old) = old {
                    self.evicted(&old, "replaced");
                }
            }
            self.count
                .store(slots.len(), std::sync::atomic::Ordering::Relaxed);
            metrics::counter!("shardgate_prefetch_reads_total", "reason" => "rebalance")
                .increment(1);
            tokio::spawn(filed);
        }
    }

    /// Drops entries past their TTL (also done on every pre-read; this bounds how long an
    /// unasked entry holds memory when no pre-read follows).
    pub fn sweep(&self) {
        let mut slots = self.lock();
        slots.retain(|_, s| {
            let keep = s.at.elapsed() <= self.ttl;
            if !keep {
                self.evicted(s, "ttl");
            }
            keep
        });
        self.count
            .store(slots.len(), std::sync::atomic::Ordering::Relaxed);
    }
}

fn records_in(slot: &Slot) -> u64 {
    match &slot.state {
        State::Ready(p) => p
            .records
            .as_ref()
            .and_then(|r| plan::batches_within(r, usize::MAX).1)
            .map_or(0, |next| (next - slot.offset).max(0) as u64),
        State::InFlight(_) => 0,
    }
}

/// `p` with its records cut at whole batches to `limit` bytes (the first batch whole), and
/// the aborted transactions that start within what is kept.
/// `p` with its records cut at whole batches to `limit` bytes and the aborted transactions
/// that start within what is kept; None when the first batch alone exceeds `limit` (Kafka
/// sends such a batch only as the first partition with data in a response, which only the
/// request's own read can know: the fetch goes upstream).
fn cut(p: &PartitionData, limit: usize) -> Option<PartitionData> {
    let mut out = p.clone();
    let Some(records) = &p.records else {
        return Some(out);
    };
    let (keep, next) = plan::batches_within(records, limit);
    if keep == 0 {
        return None;
    }
    if let (Some(aborted), Some(next)) = (out.aborted_transactions.as_mut(), next) {
        aborted.retain(|a| a.first_offset < next);
    }
    out.records = Some(records.slice(..keep));
    Some(out)
}

/// The key a fetch's want has, for matching pre-reads in tests.
#[cfg(test)]
fn key_of(name: &str, partition: i32) -> plan::Key {
    (
        TopicRef {
            name: name.to_string().into(),
            id: uuid::Uuid::nil(),
        },
        partition,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, Bytes, BytesMut};
    use kafka_protocol::messages::fetch_response::AbortedTransaction;

    fn batch(base: i64, count: i32, len: usize) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_i64(base);
        b.put_i32((len - 12) as i32);
        b.put_i32(0);
        b.put_i8(2);
        b.put_i32(0);
        b.put_i16(0);
        b.put_i32(count - 1);
        b.resize(len, 0);
        b.to_vec()
    }

    fn data(batches: &[Vec<u8>], aborted: &[i64]) -> PartitionData {
        let mut r = Vec::new();
        for b in batches {
            r.extend_from_slice(b);
        }
        PartitionData::default()
            .with_records(Some(Bytes::from(r)))
            .with_aborted_transactions(Some(
                aborted
                    .iter()
                    .map(|o| AbortedTransaction::default().with_first_offset(*o))
                    .collect(),
            ))
    }

    #[test]
    fn a_cut_keeps_whole_batches_within_the_limit() {
        let p = data(
            &[batch(0, 10, 100), batch(10, 10, 100), batch(20, 5, 100)],
            &[5, 15, 22],
        );
        let c = cut(&p, 250).unwrap();
        assert_eq!(c.records.as_ref().unwrap().len(), 200);
        assert_eq!(
            c.aborted_transactions
                .unwrap()
                .iter()
                .map(|a| a.first_offset)
                .collect::<Vec<_>>(),
            vec![5, 15]
        );
        assert!(
            cut(&p, 10).is_none(),
            "a first batch above the limit goes upstream"
        );
        let c = cut(&p, 100).unwrap();
        assert_eq!(c.records.as_ref().unwrap().len(), 100);
        assert_eq!(c.aborted_transactions.unwrap().len(), 1);
        let c = cut(&p, usize::MAX).unwrap();
        assert_eq!(c.records.as_ref().unwrap().len(), 300);
    }

    #[test]
    fn only_the_exact_offset_isolation_and_epoch_match() {
        let store = SharedReads::new(Duration::from_secs(10), 1 << 26);
        store.lock().insert(
            ("t".into(), 0),
            Slot {
                generation: 0,
                topic_id: uuid::Uuid::nil(),
                offset: 10,
                isolation: 1,
                epoch: 4,
                at: Instant::now(),
                state: State::Ready(Box::new(data(&[batch(10, 5, 100)], &[]))),
                bytes: 100,
            },
        );
        store.count.store(1, std::sync::atomic::Ordering::Relaxed);
        let want = |offset: i64, epoch: i32| Want {
            key: key_of("t", 0),
            part: FetchPartition::default()
                .with_partition(0)
                .with_fetch_offset(offset)
                .with_current_leader_epoch(epoch)
                .with_last_fetched_epoch(-1)
                .with_partition_max_bytes(1 << 20),
            name: Some("t".to_string().into()),
            leader: Ok(1),
        };
        assert!(matches!(
            store.find(&want(10, 4), 1, uuid::Uuid::nil()),
            Found::Ready(_)
        ));
        let mut last = want(10, 4);
        last.part.last_fetched_epoch = 3;
        assert!(
            matches!(store.find(&last, 1, uuid::Uuid::nil()), Found::Nothing),
            "a last fetched epoch other than the read's: Kafka checks for divergence"
        );
        last.part.last_fetched_epoch = 4;
        assert!(matches!(
            store.find(&last, 1, uuid::Uuid::nil()),
            Found::Ready(_)
        ));
        assert!(
            matches!(
                store.find(&want(10, 4), 1, uuid::Uuid::from_u128(7)),
                Found::Nothing
            ),
            "a topic created again under the same name"
        );
        assert!(matches!(
            store.find(&want(10, -1), 1, uuid::Uuid::nil()),
            Found::Ready(_)
        ));
        assert!(
            matches!(
                store.find(&want(10, 5), 1, uuid::Uuid::nil()),
                Found::Nothing
            ),
            "another epoch"
        );
        assert!(
            matches!(
                store.find(&want(10, 4), 0, uuid::Uuid::nil()),
                Found::Nothing
            ),
            "another isolation"
        );
        assert!(
            matches!(
                store.find(&want(11, 4), 1, uuid::Uuid::nil()),
                Found::Nothing
            ),
            "another offset"
        );
    }
}
