//! Reads shared by every connection: records read from upstream, kept by (topic, partition,
//! offset) for any fetch that asks there.
//!
//! The first prediction filled here: a rebalance. When a member's new assignment passes
//! through (a SyncGroup answer, or a KIP-848 heartbeat answer with an assignment), each
//! partition whose committed offset this instance saw is read from that offset at once. The
//! member itself first asks the coordinator for its offsets (one round trip) and only then
//! fetches: the pre-read is under way, or done, by then. A fetch at the same offset takes the
//! answer (or waits for the read in flight instead of sending its own), and so does every
//! other group reading that partition from there (one upstream read for all of them).
//!
//! The second: several consumers (groups) reading the same partitions. A partition fetched
//! by more than one connection within `prefetch.ttl_ms` is *shared*: the polls that read it
//! are registered here while in flight (another consumer asking at the same offset waits for
//! that read instead of sending its own) and their answers are kept (a consumer behind takes
//! them, also from an offset inside an answer). `prefetch.share_reads` switches this off.
//!
//! Exactness: an answer is served only for the same offset, isolation level and topic id it
//! was read with (the id a Fetch v13+ names, else the one the topology knows for the name: a
//! name-based fetch of a topic deleted and created again by another client, directly at
//! Kafka, could meet an older pre-read until the topology's next refresh, at most 10 s), and when the client's `current_leader_epoch` is unset or the one the read was made
//! under (upstream checked that epoch); high watermark, last stable offset and log start are
//! those upstream reported with the read (never ahead of upstream); records are cut at whole
//! batches to the client's partition max_bytes (the first batch always, as Kafka does), and
//! the aborted transactions kept are those starting within what is returned and not ended
//! (by their control batch) before it. From inside an answer, KIP-320's divergence check
//! holds when the client's last fetched epoch is the read's leader epoch or the epoch of the
//! first batch served (that epoch then lasts past the offset asked for). Entries live
//! `prefetch.ttl_ms`, and the bytes held are capped by `prefetch.max_bytes` (a full store
//! refuses new reads, counted).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
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
/// Entries kept per partition: consumers at different offsets each leave theirs.
const MAX_ENTRIES: usize = 32;
/// Readers remembered per partition (connections that fetched it, groups assigned it).
const MAX_READERS: usize = 6;
/// Marks a reader id that is a group (hash of its name) rather than a connection id.
const GROUP: u64 = 1 << 63;
/// Partitions whose readers are tracked at once (beyond, all are forgotten and relearnt).
const MAX_TRACKED: usize = 100_000;

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
    /// The last fetched epoch the read was sent with (upstream checked it for divergence).
    last_epoch: i32,
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
    slots: Mutex<HashMap<(String, i32), Vec<Slot>>>,
    /// Hash of (topic, partition) → connections that fetched it lately (a collision only
    /// makes a partition look shared: more is kept, nothing wrong is served).
    readers: Mutex<HashMap<u64, Vec<(u64, Instant)>>>,
    bytes: AtomicUsize,
    /// Partitions with entries (read without the lock: fetches skip an empty store at no
    /// cost).
    count: AtomicUsize,
    next_generation: AtomicU64,
    /// `prefetch.ttl_ms`: how long an entry waits to be asked for, and how long a reader
    /// counts as one.
    ttl: Duration,
    /// `prefetch.max_bytes`: bytes of records held at once (all connections).
    max_bytes: usize,
    /// `prefetch.share_reads`.
    share: bool,
}

impl SharedReads {
    pub fn new(ttl: Duration, max_bytes: usize, share: bool) -> Self {
        Self {
            slots: Mutex::default(),
            readers: Mutex::default(),
            bytes: Default::default(),
            count: Default::default(),
            next_generation: Default::default(),
            ttl,
            max_bytes,
            share,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i32), Vec<Slot>>> {
        self.slots.lock().expect("shared reads")
    }

    /// What is held for `want` of connection `conn` (see the module comment for the rules).
    pub fn find(&self, conn: u64, want: &Want, isolation: i8, topic_id: uuid::Uuid) -> Found {
        let Some(name) = &want.name else {
            return Found::Nothing;
        };
        if self.count.load(Relaxed) == 0 {
            return Found::Nothing;
        }
        let found = self.find_locked(name, want, isolation, topic_id);
        if matches!(found, Found::Ready(_)) {
            // A consumer served from here is still a reader (else the partition would stop
            // looking shared and its reads would no longer be kept).
            self.note_readers(conn, std::iter::once(want));
        }
        found
    }

    fn find_locked(&self, name: &str, want: &Want, isolation: i8, topic_id: uuid::Uuid) -> Found {
        let mut slots = self.lock();
        let key = (name.to_string(), want.key.1);
        let Some(entries) = slots.get_mut(&key) else {
            return Found::Nothing;
        };
        entries.retain(|s| {
            let keep = s.at.elapsed() <= self.ttl;
            if !keep {
                self.evicted(s, "ttl");
            }
            keep
        });
        if entries.is_empty() {
            slots.remove(&key);
            self.count.store(slots.len(), Relaxed);
            return Found::Nothing;
        }
        let z = want.part.fetch_offset;
        let epoch = want.part.current_leader_epoch;
        // KIP-320: a client that names the epoch of its last fetched batch gets a divergence
        // check upstream. The read's own check covers the same epoch at the same offset; the
        // current leader epoch ends at the log end (no divergence below anything read).
        let last = want.part.last_fetched_epoch;
        let limit = want.part.partition_max_bytes.max(0) as usize;
        for s in entries.iter() {
            if s.topic_id != topic_id
                || s.isolation != isolation
                || (epoch >= 0 && epoch != s.epoch)
                || z < s.offset
            {
                continue;
            }
            let checked = last < 0 || last == s.epoch || last == s.last_epoch;
            match &s.state {
                State::InFlight(f) if z == s.offset && checked => {
                    return Found::InFlight(f.clone());
                }
                State::InFlight(_) => {}
                State::Ready(p) if z == s.offset => {
                    if checked {
                        // An oversized first batch: only the request's own read can tell.
                        return cut(p, limit).map_or(Found::Nothing, |p| Found::Ready(Box::new(p)));
                    }
                }
                State::Ready(p) => {
                    let Some((inside, first_epoch)) = from_offset(p, z) else {
                        continue;
                    };
                    if last < 0 || last == s.epoch || last == first_epoch {
                        return cut(&inside, limit)
                            .map_or(Found::Nothing, |p| Found::Ready(Box::new(p)));
                    }
                }
            }
        }
        Found::Nothing
    }

    fn evicted(&self, slot: &Slot, reason: &'static str) {
        self.bytes.fetch_sub(slot.bytes, Relaxed);
        metrics::gauge!("shardgate_prefetch_bytes").set(self.bytes.load(Relaxed) as f64);
        metrics::counter!("shardgate_prefetch_evictions_total", "reason" => reason).increment(1);
    }

    /// Adds `slot` to a partition's entries: it replaces one at the same offset and
    /// isolation level (unless that one is a read still in flight: the first read stays,
    /// and false is returned), and the oldest goes when the partition has `MAX_ENTRIES`.
    fn put(&self, entries: &mut Vec<Slot>, slot: Slot) -> bool {
        if let Some(i) = entries
            .iter()
            .position(|s| s.offset == slot.offset && s.isolation == slot.isolation)
        {
            if matches!(entries[i].state, State::InFlight(_)) && entries[i].at.elapsed() <= self.ttl
            {
                return false;
            }
            let old = entries.swap_remove(i);
            self.evicted(&old, "replaced");
        }
        if entries.len() >= MAX_ENTRIES
            && let Some(i) = entries
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.at)
                .map(|(i, _)| i)
        {
            let old = entries.swap_remove(i);
            self.evicted(&old, "crowded");
        }
        entries.push(slot);
        true
    }

    /// Whether a fetch of `want` would find something here (a read in flight or an answer):
    /// the connection's own read-ahead leaves such partitions alone.
    pub fn covers(&self, want: &Want, isolation: i8, topic_id: uuid::Uuid) -> bool {
        let Some(name) = &want.name else {
            return false;
        };
        self.count.load(Relaxed) > 0
            && !matches!(
                self.find_locked(name, want, isolation, topic_id),
                Found::Nothing
            )
    }

    /// Files what a read brought for the slots it was started for (`names`: each slot's
    /// topic name with the key the read asked by, which names topics by id from v13):
    /// partitions with records become ready, the rest (errors, nothing there yet) are
    /// dropped so a fetch goes upstream itself.
    fn file(&self, r: &SubResult, generation: u64, names: &[(String, plan::Key)]) {
        let answered: HashMap<(uuid::Uuid, &str, i32), &PartitionData> = match &r.outcome {
            Ok(resp) if resp.error_code == codes::NONE => resp
                .responses
                .iter()
                .flat_map(|t| {
                    t.partitions
                        .iter()
                        .map(move |p| ((t.topic_id, t.topic.0.as_str(), p.partition_index), p))
                })
                .collect(),
            _ => HashMap::new(),
        };
        let mut slots = self.lock();
        for (name, key) in names {
            let k = (name.clone(), key.1);
            let Some(entries) = slots.get_mut(&k) else {
                continue;
            };
            // Only the slot this read was started for (not one that replaced it since).
            let Some(i) = entries.iter().position(|s| s.generation == generation) else {
                continue;
            };
            let reserved = entries[i].bytes;
            // Answers name topics by id from v13, by name before.
            let got = answered
                .get(&(key.0.id, "", key.1))
                .or_else(|| answered.get(&(uuid::Uuid::nil(), key.0.name.as_str(), key.1)));
            let n = got.and_then(|p| p.records.as_ref()).map_or(0, |r| r.len());
            let fits = reserved > 0 || self.bytes.load(Relaxed) + n <= self.max_bytes;
            match got {
                Some(p) if p.error_code == codes::NONE && n > 0 && fits => {
                    let slot = &mut entries[i];
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
                    if n > 0 && !fits {
                        metrics::counter!("shardgate_prefetch_refused_total", "reason" => "memory")
                            .increment(1);
                    }
                    entries.swap_remove(i);
                    self.bytes.fetch_sub(reserved, Relaxed);
                    if entries.is_empty() {
                        slots.remove(&k);
                    }
                }
            }
        }
        self.count.store(slots.len(), Relaxed);
        metrics::gauge!("shardgate_prefetch_bytes").set(self.bytes.load(Relaxed) as f64);
    }

    /// Notes `reader` (a connection id, or a group's id with `GROUP` set) as a reader of
    /// the partitions `parts` names; returns, per partition, whether it is shared: another
    /// connection fetched it, or two groups were assigned it, within the TTL.
    fn note<'a>(
        &self,
        reader: u64,
        parts: impl Iterator<Item = Option<(&'a str, i32)>>,
    ) -> Vec<bool> {
        let now = Instant::now();
        let mut readers = self.readers.lock().expect("readers");
        if readers.len() >= MAX_TRACKED {
            readers.clear();
        }
        parts
            .map(|part| {
                let Some((name, partition)) = part else {
                    return false;
                };
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (name, partition).hash(&mut h);
                let rs = readers.entry(h.finish()).or_default();
                rs.retain(|(r, at)| *r != reader && now.duration_since(*at) <= self.ttl);
                if rs.len() >= MAX_READERS {
                    rs.remove(0);
                }
                rs.push((reader, now));
                let conns = rs.iter().filter(|(r, _)| r & GROUP == 0).count();
                conns >= 2 || rs.len() - conns >= 2
            })
            .collect()
    }

    fn note_readers<'a>(&self, conn: u64, wants: impl Iterator<Item = &'a Want>) -> Vec<bool> {
        self.note(
            conn & !GROUP,
            wants.map(|w| w.name.as_ref().map(|n| (n.as_str(), w.key.1))),
        )
    }

    /// A member of `group` was assigned `parts`: a partition assigned in two groups is
    /// shared from their first fetch on (before either fetched it).
    pub fn assigned(&self, group: &str, parts: &[(String, i32)]) {
        if !self.share {
            return;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        group.hash(&mut h);
        self.note(
            h.finish() | GROUP,
            parts.iter().map(|(t, p)| Some((t.as_str(), *p))),
        );
    }

    /// A connection's poll of `wants` is starting as `poll`. Partitions other connections
    /// read too are registered as in flight, and the answer is kept for them; returns the
    /// future to wait on in place of `poll` (the same when nothing is shared).
    pub fn poll_started(
        self: &Arc<Self>,
        conn: u64,
        isolation: i8,
        min_bytes: i32,
        wants: &[(&Want, uuid::Uuid)],
        poll: SubFuture,
    ) -> SubFuture {
        // A poll that waits for more than one byte could hold another consumer longer than
        // its own poll would: not waited on by others.
        if !self.share || min_bytes > 1 {
            return poll;
        }
        let shared = self.note_readers(conn, wants.iter().map(|(w, _)| *w));
        if !shared.iter().any(|s| *s) {
            return poll;
        }
        let generation = self.next_generation.fetch_add(1, Relaxed);
        let names: Vec<(String, plan::Key)> = wants
            .iter()
            .zip(&shared)
            .filter(|(_, s)| **s)
            .filter_map(|((w, _), _)| Some((w.name.as_ref()?.to_string(), w.key.clone())))
            .collect();
        let store = self.clone();
        let filed: SubFuture = async move {
            let r = poll.await;
            store.file(&r, generation, &names);
            r
        }
        .boxed()
        .shared();
        let mut slots = self.lock();
        let mut registered = 0u64;
        for ((w, topic_id), _) in wants.iter().zip(&shared).filter(|(_, s)| **s) {
            let Some(name) = &w.name else { continue };
            let entries = slots.entry((name.to_string(), w.key.1)).or_default();
            registered += u64::from(self.put(
                entries,
                Slot {
                    generation,
                    topic_id: *topic_id,
                    offset: w.part.fetch_offset,
                    isolation,
                    epoch: w.part.current_leader_epoch,
                    last_epoch: w.part.last_fetched_epoch,
                    at: Instant::now(),
                    state: State::InFlight(filed.clone()),
                    bytes: 0,
                },
            ));
        }
        self.count.store(slots.len(), Relaxed);
        metrics::counter!("shardgate_prefetch_reads_total", "reason" => "shared")
            .increment(registered);
        filed
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
                || slots.get(&(topic.clone(), partition)).is_some_and(|e| {
                    e.iter()
                        .any(|s| s.offset == offset && s.isolation == isolation)
                })
            {
                continue;
            }
            // Reserved now: reads in flight count against the cap until they land.
            let reserve = PARTITION_MAX_BYTES as usize;
            if self.bytes.load(Relaxed) + reserve > self.max_bytes {
                metrics::counter!("shardgate_prefetch_refused_total", "reason" => "memory")
                    .increment(1);
                continue;
            }
            self.bytes.fetch_add(reserve, Relaxed);
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
            let generation = self.next_generation.fetch_add(1, Relaxed);
            let names: Vec<(String, plan::Key)> = wants
                .iter()
                .map(|w| (w.key.0.name.to_string(), w.key.clone()))
                .collect();
            let filed: SubFuture = async move {
                let r = read.await;
                store.file(&r, generation, &names);
                r
            }
            .boxed()
            .shared();
            for w in &wants {
                let entries = slots
                    .entry((w.key.0.name.to_string(), w.key.1))
                    .or_default();
                let put = self.put(
                    entries,
                    Slot {
                        generation,
                        topic_id: w.key.0.id,
                        offset: w.part.fetch_offset,
                        isolation,
                        epoch: w.part.current_leader_epoch,
                        last_epoch: -1,
                        at: Instant::now(),
                        state: State::InFlight(filed.clone()),
                        bytes: PARTITION_MAX_BYTES as usize,
                    },
                );
                if !put {
                    // Kept out by a read in flight there (its own reservation holds).
                    self.bytes.fetch_sub(PARTITION_MAX_BYTES as usize, Relaxed);
                }
            }
            self.count.store(slots.len(), Relaxed);
            metrics::counter!("shardgate_prefetch_reads_total", "reason" => "rebalance")
                .increment(1);
            tokio::spawn(filed);
        }
    }

    /// Drops entries past their TTL and readers not seen within it (also done on every
    /// pre-read; this bounds how long an unasked entry holds memory when none follows).
    pub fn sweep(&self) {
        let mut slots = self.lock();
        slots.retain(|_, entries| {
            entries.retain(|s| {
                let keep = s.at.elapsed() <= self.ttl;
                if !keep {
                    self.evicted(s, "ttl");
                }
                keep
            });
            !entries.is_empty()
        });
        self.count.store(slots.len(), Relaxed);
        drop(slots);
        let now = Instant::now();
        self.readers.lock().expect("readers").retain(|_, rs| {
            rs.retain(|(_, at)| now.duration_since(*at) <= self.ttl);
            !rs.is_empty()
        });
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

/// Batch header fields read here (v2 record batches; offsets from the batch start).
const LEADER_EPOCH_AT: usize = 12;
const MAGIC_AT: usize = 16;
const ATTRIBUTES_AT: usize = 21;
const LAST_DELTA_AT: usize = 23;
const PRODUCER_ID_AT: usize = 43;
const HEADER_LEN: usize = 61;
/// Attribute bit of a control batch (a transaction's commit or abort marker).
const CONTROL: i16 = 0x20;

/// What Kafka answers to a fetch from `z` inside `p` (an answer read from an earlier
/// offset): the whole batches from the first one ending at or after `z`, and the aborted
/// transactions still open there (a transaction whose control batch lies before that batch
/// ended before `z`). Also the leader epoch of the first batch served. None when no whole
/// batch ends at or after `z`.
fn from_offset(p: &PartitionData, z: i64) -> Option<(PartitionData, i32)> {
    let records = p.records.as_ref()?;
    let be_i64 = |at: usize| i64::from_be_bytes(records[at..at + 8].try_into().expect("8"));
    let be_i32 = |at: usize| i32::from_be_bytes(records[at..at + 4].try_into().expect("4"));
    let mut pos = 0usize;
    // Control batches passed: (producer id, offset).
    let mut ended: Vec<(i64, i64)> = Vec::new();
    while records.len() >= pos + HEADER_LEN {
        let base = be_i64(pos);
        let len = be_i32(pos + 8);
        // Old message formats (magic 0 and 1) have no such header: not served from inside.
        if len < 0 || pos + 12 + len as usize > records.len() || records[pos + MAGIC_AT] != 2 {
            return None;
        }
        let last = base + be_i32(pos + LAST_DELTA_AT) as i64;
        if last >= z {
            let mut out = p.clone();
            out.records = Some(records.slice(pos..));
            if let Some(aborted) = out.aborted_transactions.as_mut() {
                aborted.retain(|a| {
                    !ended
                        .iter()
                        .any(|(pid, at)| *pid == a.producer_id.0 && *at >= a.first_offset)
                });
            }
            return Some((out, be_i32(pos + LEADER_EPOCH_AT)));
        }
        let attributes = i16::from_be_bytes(
            records[pos + ATTRIBUTES_AT..pos + ATTRIBUTES_AT + 2]
                .try_into()
                .expect("2"),
        );
        if attributes & CONTROL != 0 {
            ended.push((be_i64(pos + PRODUCER_ID_AT), base));
        }
        pos += 12 + len as usize;
    }
    None
}

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

    /// A store holding `p`, read at offset 10, read_committed, under leader epoch `epoch`
    /// with last fetched epoch `last_epoch`.
    fn holding(p: PartitionData, epoch: i32, last_epoch: i32) -> SharedReads {
        let store = SharedReads::new(Duration::from_secs(10), 1 << 26, true);
        let bytes = p.records.as_ref().map_or(0, |r| r.len());
        store.lock().insert(
            ("t".into(), 0),
            vec![Slot {
                generation: 0,
                topic_id: uuid::Uuid::nil(),
                offset: 10,
                isolation: 1,
                epoch,
                last_epoch,
                at: Instant::now(),
                state: State::Ready(Box::new(p)),
                bytes,
            }],
        );
        store.count.store(1, std::sync::atomic::Ordering::Relaxed);
        store
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
    fn only_offsets_within_the_read_at_its_isolation_and_epoch_match() {
        let store = holding(data(&[batch(10, 5, 100)], &[]), 4, -1);
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
            store.find(1, &want(10, 4), 1, uuid::Uuid::nil()),
            Found::Ready(_)
        ));
        let mut last = want(10, 4);
        last.part.last_fetched_epoch = 3;
        assert!(
            matches!(store.find(1, &last, 1, uuid::Uuid::nil()), Found::Nothing),
            "a last fetched epoch other than the read's: Kafka checks for divergence"
        );
        last.part.last_fetched_epoch = 4;
        assert!(matches!(
            store.find(1, &last, 1, uuid::Uuid::nil()),
            Found::Ready(_)
        ));
        assert!(
            matches!(
                store.find(1, &want(10, 4), 1, uuid::Uuid::from_u128(7)),
                Found::Nothing
            ),
            "a topic created again under the same name"
        );
        assert!(matches!(
            store.find(1, &want(10, -1), 1, uuid::Uuid::nil()),
            Found::Ready(_)
        ));
        assert!(
            matches!(
                store.find(1, &want(10, 5), 1, uuid::Uuid::nil()),
                Found::Nothing
            ),
            "another epoch"
        );
        assert!(
            matches!(
                store.find(1, &want(10, 4), 0, uuid::Uuid::nil()),
                Found::Nothing
            ),
            "another isolation"
        );
        assert!(
            matches!(
                store.find(1, &want(11, 4), 1, uuid::Uuid::nil()),
                Found::Ready(_)
            ),
            "an offset inside the answer"
        );
        for outside in [9, 15] {
            assert!(
                matches!(
                    store.find(1, &want(outside, 4), 1, uuid::Uuid::nil()),
                    Found::Nothing
                ),
                "an offset outside the answer"
            );
        }
    }

    /// A v2 batch header with the fields `from_offset` reads, `len` bytes in all.
    fn batch_of(base: i64, count: i32, len: usize, epoch: i32, control: bool, pid: i64) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_i64(base);
        b.put_i32((len - 12) as i32);
        b.put_i32(epoch);
        b.put_i8(2);
        b.put_i32(0);
        b.put_i16(if control { 0x30 } else { 0x10 });
        b.put_i32(count - 1);
        b.put_i64(0);
        b.put_i64(0);
        b.put_i64(pid);
        b.resize(len, 0);
        b.to_vec()
    }

    fn aborted(list: &[(i64, i64)]) -> Vec<(i64, i64)> {
        list.to_vec()
    }

    fn aborted_of(p: &PartitionData) -> Vec<(i64, i64)> {
        p.aborted_transactions
            .iter()
            .flatten()
            .map(|a| (a.producer_id.0, a.first_offset))
            .collect()
    }

    fn txn_data() -> PartitionData {
        // pid 7 writes 10..13 and aborts at 14; pid 8 writes 15..19 and aborts at 20.
        let batches = [
            batch_of(10, 4, 100, 3, false, 7),
            batch_of(14, 1, 80, 3, true, 7),
            batch_of(15, 5, 100, 4, false, 8),
            batch_of(20, 1, 80, 4, true, 8),
        ];
        let mut p = data(&batches, &[]);
        p.aborted_transactions = Some(
            aborted(&[(7, 10), (8, 15)])
                .into_iter()
                .map(|(pid, first)| {
                    AbortedTransaction::default()
                        .with_producer_id(kafka_protocol::messages::ProducerId(pid))
                        .with_first_offset(first)
                })
                .collect(),
        );
        p
    }

    #[test]
    fn from_inside_an_answer_the_batches_and_open_transactions_from_there() {
        let p = txn_data();
        let (inside, epoch) = from_offset(&p, 16).unwrap();
        assert_eq!(inside.records.as_ref().unwrap().len(), 180);
        assert_eq!(&inside.records.as_ref().unwrap()[..8], &15i64.to_be_bytes());
        assert_eq!(epoch, 4);
        assert_eq!(
            aborted_of(&inside),
            vec![(8, 15)],
            "pid 7's transaction ended before 15: a consumer would skip pid 7's next batches"
        );
        let (inside, epoch) = from_offset(&p, 12).unwrap();
        assert_eq!(inside.records.as_ref().unwrap().len(), 360);
        assert_eq!(epoch, 3);
        assert_eq!(aborted_of(&inside), vec![(7, 10), (8, 15)]);
        assert!(from_offset(&p, 21).is_none(), "beyond the answer");
    }

    #[test]
    fn a_fetch_inside_an_answer_needs_a_divergence_check_that_holds() {
        let store = holding(txn_data(), 5, 3);
        let want = |offset: i64, last: i32| Want {
            key: key_of("t", 0),
            part: FetchPartition::default()
                .with_partition(0)
                .with_fetch_offset(offset)
                .with_current_leader_epoch(5)
                .with_last_fetched_epoch(last)
                .with_partition_max_bytes(1 << 20),
            name: Some("t".to_string().into()),
            leader: Ok(1),
        };
        let served = |w: Want| match store.find(2, &w, 1, uuid::Uuid::nil()) {
            Found::Ready(p) => Some(p),
            _ => None,
        };
        assert!(served(want(10, 3)).is_some(), "the read's own check");
        assert!(
            served(want(10, 4)).is_none(),
            "another epoch at the read's offset"
        );
        assert!(served(want(15, -1)).is_some());
        assert!(
            served(want(15, 4)).is_some(),
            "the first batch served has epoch 4"
        );
        assert!(
            served(want(15, 5)).is_some(),
            "the leader's epoch at the read"
        );
        assert!(
            served(want(15, 3)).is_none(),
            "epoch 3 may end before 15 upstream"
        );
        let p = served(want(17, -1)).unwrap();
        assert_eq!(aborted_of(&p), vec![(8, 15)]);
        assert!(served(want(9, -1)).is_none(), "before the answer");
        assert!(served(want(21, -1)).is_none(), "after the answer");
    }

    #[tokio::test]
    async fn a_partition_two_connections_read_is_read_once_for_both() {
        use kafka_protocol::messages::FetchResponse;
        use kafka_protocol::messages::fetch_response::FetchableTopicResponse;
        let store = Arc::new(SharedReads::new(Duration::from_secs(10), 1 << 26, true));
        // Asked by topic id (Fetch v13): the key has no name, the answer names no topic.
        let id = uuid::Uuid::from_u128(42);
        let by_id = (
            TopicRef {
                name: Default::default(),
                id,
            },
            0,
        );
        let want = Want {
            key: by_id.clone(),
            part: FetchPartition::default()
                .with_partition(0)
                .with_fetch_offset(10)
                .with_current_leader_epoch(-1)
                .with_last_fetched_epoch(-1)
                .with_partition_max_bytes(1 << 20),
            name: Some("t".to_string().into()),
            leader: Ok(1),
        };
        let poll = |seq: u64| -> SubFuture {
            let answer = FetchResponse::default().with_responses(vec![
                FetchableTopicResponse::default()
                    .with_topic_id(id)
                    .with_partitions(vec![
                        data(&[batch(10, 5, 100), batch(15, 5, 100)], &[]).with_high_watermark(20),
                    ]),
            ]);
            let r = Arc::new(SubResult {
                broker: 1,
                seq,
                asked: vec![(by_id.clone(), 10)],
                outcome: Ok(answer),
            });
            futures::future::ready(r).boxed().shared()
        };
        let ids = [(&want, id)];
        // One reader: its poll is its own.
        let first = store.poll_started(1, 0, 1, &ids, poll(1));
        assert!(matches!(store.find(3, &want, 0, id), Found::Nothing));
        first.await;
        assert!(matches!(store.find(3, &want, 0, id), Found::Nothing));
        // A second connection reads it: its poll is registered, then kept.
        let second = store.poll_started(2, 0, 1, &ids, poll(2));
        assert!(matches!(store.find(3, &want, 0, id), Found::InFlight(_)));
        second.await;
        let Found::Ready(p) = store.find(3, &want, 0, id) else {
            panic!("the second poll's answer is kept");
        };
        assert_eq!(p.records.as_ref().unwrap().len(), 200);
        let mut inside = want.clone();
        inside.part.fetch_offset = 16;
        let Found::Ready(p) = store.find(3, &inside, 0, id) else {
            panic!("a consumer behind, inside the answer");
        };
        assert_eq!(p.records.as_ref().unwrap().len(), 100);
        assert!(
            matches!(store.find(3, &want, 1, id), Found::Nothing),
            "another isolation level"
        );
        // A poll waiting for more than a byte is not waited on by others.
        let third = store.poll_started(4, 0, 1024, &ids, poll(3));
        third.await;
        assert_eq!(store.bytes.load(std::sync::atomic::Ordering::Relaxed), 200);
        store.sweep();
        assert_eq!(store.count.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_partition_two_groups_were_assigned_is_shared_from_the_first_fetch() {
        let store = Arc::new(SharedReads::new(Duration::from_secs(10), 1 << 26, true));
        let want = Want {
            key: key_of("t", 0),
            part: FetchPartition::default()
                .with_partition(0)
                .with_fetch_offset(0)
                .with_current_leader_epoch(-1)
                .with_last_fetched_epoch(-1)
                .with_partition_max_bytes(1 << 20),
            name: Some("t".to_string().into()),
            leader: Ok(1),
        };
        let pending: SubFuture = futures::future::pending().boxed().shared();
        let ids = [(&want, uuid::Uuid::nil())];
        let parts = [("t".to_string(), 0)];
        store.assigned("g1", &parts);
        store.assigned("g1", &parts);
        drop(store.poll_started(1, 0, 1, &ids, pending.clone()));
        assert!(
            matches!(store.find(2, &want, 0, uuid::Uuid::nil()), Found::Nothing),
            "one group (assigned twice) and its connection: not shared"
        );
        store.assigned("g2", &parts);
        drop(store.poll_started(1, 0, 1, &ids, pending));
        assert!(matches!(
            store.find(2, &want, 0, uuid::Uuid::nil()),
            Found::InFlight(_)
        ));
    }
}
