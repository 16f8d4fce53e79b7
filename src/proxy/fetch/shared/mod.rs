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
//! `prefetch.ttl_ms` and go when the topology learns a later leader epoch of their partition;
//! the bytes held are capped by `prefetch.max_bytes`: a full store evicts its oldest answers
//! for a new read, and refuses it (counted) when reads in flight hold the rest.

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
use batches::{cut, from_offset};

mod batches;
#[cfg(test)]
mod tests;

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
    /// The partition's leader epoch in shardgate's topology when the read was sent (-1:
    /// unknown). Once the topology knows a later one the answer is dropped: after an
    /// unclean election the new leader may not hold what the old one answered.
    leader_epoch: i32,
    at: Instant,
    state: State,
    /// Record bytes of a ready slot, or the bytes reserved for a read in flight (the cap
    /// counts both).
    bytes: usize,
    /// A rebalance pre-read no consumer has taken yet (evicted so, it was read for nothing).
    unserved: bool,
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

    /// What is held for `want` of connection `conn` (see the module comment for the rules);
    /// `leader_epoch`: the partition's leader epoch in the topology now (-1: unknown).
    pub fn find(
        &self,
        conn: u64,
        want: &Want,
        isolation: i8,
        topic_id: uuid::Uuid,
        leader_epoch: i32,
    ) -> Found {
        let Some(name) = &want.name else {
            return Found::Nothing;
        };
        if self.count.load(Relaxed) == 0 {
            return Found::Nothing;
        }
        let found = self.find_locked(name, want, isolation, topic_id, leader_epoch);
        if matches!(found, Found::Ready(_)) {
            // A consumer served from here is still a reader (else the partition would stop
            // looking shared and its reads would no longer be kept).
            self.note_readers(conn, std::iter::once(want));
        }
        found
    }

    fn find_locked(
        &self,
        name: &str,
        want: &Want,
        isolation: i8,
        topic_id: uuid::Uuid,
        leader_epoch: i32,
    ) -> Found {
        let mut slots = self.lock();
        let key = (name.to_string(), want.key.1);
        let Some(entries) = slots.get_mut(&key) else {
            return Found::Nothing;
        };
        entries.retain(|s| {
            let reason = if s.at.elapsed() > self.ttl {
                Some("ttl")
            } else if leader_epoch >= 0 && s.leader_epoch >= 0 && s.leader_epoch < leader_epoch {
                Some("epoch")
            } else {
                None
            };
            if let Some(reason) = reason {
                self.evicted(s, reason);
            }
            reason.is_none()
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
        for s in entries.iter_mut() {
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
                        let found = cut(p, limit).map(|p| Found::Ready(Box::new(p)));
                        s.unserved &= found.is_none();
                        return found.unwrap_or(Found::Nothing);
                    }
                }
                State::Ready(p) => {
                    let Some((inside, first_epoch)) = from_offset(p, z) else {
                        continue;
                    };
                    if last < 0 || last == s.epoch || last == first_epoch {
                        let found = cut(&inside, limit).map(|p| Found::Ready(Box::new(p)));
                        s.unserved &= found.is_none();
                        return found.unwrap_or(Found::Nothing);
                    }
                }
            }
        }
        Found::Nothing
    }

    /// Evicts the oldest answers (never a read in flight) until `need` more bytes fit under
    /// `prefetch.max_bytes`: newer reads are likelier to be asked for soon. False when even
    /// that is not enough.
    fn make_room(&self, slots: &mut HashMap<(String, i32), Vec<Slot>>, need: usize) -> bool {
        // Only what answers hold can be freed: when reads in flight hold too much, nothing is
        // evicted for a refusal.
        let ready: usize = slots
            .values()
            .flatten()
            .filter(|s| matches!(s.state, State::Ready(_)))
            .map(|s| s.bytes)
            .sum();
        if need > self.max_bytes
            || self.bytes.load(Relaxed) - ready.min(self.bytes.load(Relaxed)) + need
                > self.max_bytes
        {
            return false;
        }
        while self.bytes.load(Relaxed) + need > self.max_bytes {
            let oldest = slots
                .iter()
                .flat_map(|(k, e)| {
                    e.iter()
                        .enumerate()
                        .filter(|(_, s)| matches!(s.state, State::Ready(_)))
                        .map(move |(i, s)| (s.at, k, i))
                })
                .min_by_key(|(at, _, _)| *at)
                .map(|(_, k, i)| (k.clone(), i));
            let Some((k, i)) = oldest else {
                return false;
            };
            let entries = slots.get_mut(&k).expect("seen just now");
            let old = entries.swap_remove(i);
            self.evicted(&old, "memory");
            if entries.is_empty() {
                slots.remove(&k);
            }
        }
        self.count.store(slots.len(), Relaxed);
        true
    }

    fn evicted(&self, slot: &Slot, reason: &'static str) {
        self.bytes.fetch_sub(slot.bytes, Relaxed);
        if slot.unserved && matches!(slot.state, State::Ready(_)) {
            metrics::counter!("shardgate_prefetch_wasted_bytes_total").increment(slot.bytes as u64);
        }
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
    pub fn covers(
        &self,
        want: &Want,
        isolation: i8,
        topic_id: uuid::Uuid,
        leader_epoch: i32,
    ) -> bool {
        let Some(name) = &want.name else {
            return false;
        };
        self.count.load(Relaxed) > 0
            && !matches!(
                self.find_locked(name, want, isolation, topic_id, leader_epoch),
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
            // Only the slot this read was started for (not one that replaced it since).
            let Some(reserved) = slots
                .get(&k)
                .and_then(|e| e.iter().find(|s| s.generation == generation))
                .map(|s| s.bytes)
            else {
                continue;
            };
            // Answers name topics by id from v13, by name before.
            let got = answered
                .get(&(key.0.id, "", key.1))
                .or_else(|| answered.get(&(uuid::Uuid::nil(), key.0.name.as_str(), key.1)));
            let n = got.and_then(|p| p.records.as_ref()).map_or(0, |r| r.len());
            // Beyond its reservation (a first batch larger than a partition's share, KIP-74)
            // a read needs room like any other.
            let extra = n.saturating_sub(reserved);
            let fits = extra == 0
                || self.bytes.load(Relaxed) + extra <= self.max_bytes
                || self.make_room(&mut slots, extra);
            let Some(entries) = slots.get_mut(&k) else {
                continue;
            };
            let Some(i) = entries.iter().position(|s| s.generation == generation) else {
                continue;
            };
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
        wants: &[(&Want, uuid::Uuid, i32)],
        poll: SubFuture,
    ) -> SubFuture {
        // A poll that waits for more than one byte could hold another consumer longer than
        // its own poll would: not waited on by others.
        if !self.share || min_bytes > 1 {
            return poll;
        }
        let shared = self.note_readers(conn, wants.iter().map(|(w, _, _)| *w));
        if !shared.iter().any(|s| *s) {
            return poll;
        }
        let generation = self.next_generation.fetch_add(1, Relaxed);
        let names: Vec<(String, plan::Key)> = wants
            .iter()
            .zip(&shared)
            .filter(|(_, s)| **s)
            .filter_map(|((w, _, _), _)| Some((w.name.as_ref()?.to_string(), w.key.clone())))
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
        for ((w, topic_id, leader_epoch), _) in wants.iter().zip(&shared).filter(|(_, s)| **s) {
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
                    leader_epoch: *leader_epoch,
                    at: Instant::now(),
                    state: State::InFlight(filed.clone()),
                    bytes: 0,
                    unserved: false,
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
            if self.bytes.load(Relaxed) + reserve > self.max_bytes
                && !self.make_room(&mut slots, reserve)
            {
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
                // One-off reads of partitions just assigned: nothing to keep a session for.
                None,
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
                        leader_epoch: w.part.current_leader_epoch,
                        at: Instant::now(),
                        state: State::InFlight(filed.clone()),
                        bytes: PARTITION_MAX_BYTES as usize,
                        unserved: true,
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
