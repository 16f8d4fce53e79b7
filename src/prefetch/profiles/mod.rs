//! Consumer profiles: who consumes what, how fast, and what it acknowledged.
//!
//! shardgate sees the group protocol (members, their assignments, their commits) and the
//! fetches (positions, what was delivered), on different connections of the same client. A
//! member is linked to the fetch connections of the same client address and client id; where
//! several members share both (one process running several consumers with one client id),
//! a connection belongs to the member whose assignment covers the partitions it fetches.
//! A connection linked to no member is a consumer of its own (connection-scoped identity).
//!
//! Every map here is keyed by client-supplied names, so all of them are bounded: members not
//! heard from for `MEMBER_IDLE` are forgotten, and beyond `max_members` the least recently
//! seen go first.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::embed::Centroid;
use routing::{Histogram, top_values};

mod routing;

/// A member not heard from (heartbeat, commit, fetch of its connections) for this long is
/// forgotten: well past any session timeout Kafka allows by default (45 s).
const MEMBER_IDLE: Duration = Duration::from_secs(300);
/// Group members profiled at once (beyond: the least recently seen are forgotten).
pub const MAX_MEMBERS: usize = 10_000;
/// Window over which consumption rates are measured.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// Partitions whose content centroid is kept (about 1 KiB each with 256 dimensions).
const MAX_PARTITION_CENTROIDS: usize = 4096;
/// A partition's routing histogram halves its counts at this many samples.
const ROUTING_HORIZON: u64 = 1000;
/// After this many samples a centroid follows recent content (a moving average).
const CENTROID_HORIZON: u64 = 500;
/// Committed offsets kept per group (client-supplied partition lists are bounded too).
const MAX_COMMITTED_PER_GROUP: usize = 10_000;

/// Which group protocol a member speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// JoinGroup/SyncGroup with the consumer protocol.
    Classic,
    /// KIP-848 (ConsumerGroupHeartbeat).
    Consumer,
}

type Tp = (String, i32);

#[derive(Debug)]
struct Member {
    client_id: String,
    host: IpAddr,
    protocol: Protocol,
    generation: i32,
    assigned: Vec<Tp>,
    /// When the current assignment arrived (a rebalance restarts the clock).
    assigned_at: Instant,
    seen: Instant,
}

#[derive(Debug)]
struct Conn {
    client_id: String,
    host: IpAddr,
    /// topic → partition → where it fetches next (after what was delivered) and when it
    /// last fetched it; by topic first, so a lookup does not allocate.
    positions: HashMap<String, HashMap<i32, (i64, Instant)>>,
    /// Offsets delivered in total, and samples of that total for the rate.
    delivered: u64,
    bytes: u64,
    history: VecDeque<(Instant, u64)>,
    seen: Instant,
    /// Mean embedding of sampled records delivered on this connection.
    centroid: Option<Centroid>,
    /// (field, value) → records seen with it, among the sampled ones.
    routing: Histogram,
    /// Whether a record set delivered on it was offered for sampling yet.
    sampled: bool,
    /// The isolation level of its last fetch, and whether it is filed under its client.
    isolation: i8,
    isolation_filed: bool,
}

/// One partition of a fetch answer, for `Profiles::fetched`.
#[derive(Debug, Clone, Copy)]
pub struct Fetched<'a> {
    pub topic: &'a str,
    pub partition: i32,
    /// The offset asked for.
    pub from: i64,
    /// Where the client fetches next after what it got (None: nothing delivered).
    pub next: Option<i64>,
    pub bytes: usize,
}

impl Conn {
    fn rate(&self, now: Instant) -> f64 {
        let Some(&(t0, n0)) = self
            .history
            .iter()
            .find(|(t, _)| now.duration_since(*t) <= RATE_WINDOW)
        else {
            return 0.0;
        };
        let span = now.duration_since(t0).as_secs_f64().max(1.0);
        (self.delivered - n0) as f64 / span
    }
}

#[derive(Default)]
struct Inner {
    members: HashMap<(String, String), Member>,
    conns: HashMap<u64, Conn>,
    /// group → (topic, partition) → committed offset (the group's acknowledgements).
    committed: HashMap<String, HashMap<Tp, i64>>,
    /// Mean embedding of each partition's sampled recent content.
    partition_content: HashMap<Tp, Centroid>,
    /// Routing values among each partition's sampled recent records.
    partition_routing: HashMap<Tp, Histogram>,
    /// (client address, client id) → the isolation level of its last fetch (outlives its
    /// connections: a member that rejoins from a new connection reads as before).
    isolation: HashMap<(IpAddr, String), i8>,
    /// When each group was last active here (assignment, commit): its commits are kept
    /// `MEMBER_IDLE` after that, so a group whose members all left and rejoin finds them.
    group_seen: HashMap<String, Instant>,
}

/// Consumer profiles of this instance.
pub struct Profiles {
    inner: Mutex<Inner>,
    max_members: usize,
}

/// One partition as a consumer sees it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PartitionView {
    pub topic: String,
    pub partition: i32,
    /// Where the consumer fetches next (-1: not fetched through this instance yet).
    pub position: i64,
    /// The group's committed offset (-1: none seen).
    pub committed: i64,
    /// Cosine similarity between the partition's recent content and what the consumer
    /// read (None until both were sampled).
    pub content_similarity: Option<f32>,
}

/// One consumer, for `GET /api/v1/consumers`.
#[derive(Debug, Clone, Serialize)]
pub struct ConsumerView {
    /// None for a connection no group member is linked to.
    pub group: Option<String>,
    pub member: Option<String>,
    pub client_id: String,
    pub host: String,
    pub protocol: Option<Protocol>,
    pub generation: Option<i32>,
    /// Seconds since the current assignment arrived.
    pub assigned_secs: Option<f64>,
    /// Fetch connections linked to it.
    pub connections: Vec<u64>,
    /// Assigned partitions (for a connection-scoped consumer: those it fetches).
    pub partitions: Vec<PartitionView>,
    /// Offsets delivered per second over the last 10 s.
    pub records_per_sec: f64,
    pub delivered_records: u64,
    pub delivered_bytes: u64,
    /// Records sampled for its content centroid.
    pub content_samples: u64,
    /// Most frequent values of `prefetch.routing_fields` among its sampled records.
    pub top_routing_values: BTreeMap<String, Vec<(String, u64)>>,
}

impl Profiles {
    pub fn new(max_members: usize) -> Self {
        Self {
            inner: Mutex::default(),
            max_members: max_members.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("profiles lock")
    }

    /// A member's assignment arrived (SyncGroup answer, or a KIP-848 heartbeat answer that
    /// carried one). An older generation than the one known is ignored. Returns the
    /// partitions the member did not hold before.
    #[allow(clippy::too_many_arguments)]
    pub fn assigned(
        &self,
        group: &str,
        member: &str,
        client_id: &str,
        host: IpAddr,
        protocol: Protocol,
        generation: i32,
        mut partitions: Vec<Tp>,
    ) -> Vec<Tp> {
        if member.is_empty() {
            return vec![];
        }
        partitions.sort();
        partitions.dedup();
        let now = Instant::now();
        let mut inner = self.lock();
        inner.group_seen.insert(group.to_string(), now);
        let key = (group.to_string(), member.to_string());
        let mut added = vec![];
        match inner.members.get_mut(&key) {
            Some(m) if generation < m.generation => {}
            Some(m) => {
                if m.assigned != partitions {
                    m.assigned_at = now;
                }
                added = partitions
                    .iter()
                    .filter(|tp| m.assigned.binary_search(tp).is_err())
                    .cloned()
                    .collect();
                m.assigned = partitions;
                m.generation = generation;
                m.seen = now;
                m.client_id = client_id.to_string();
                m.host = host;
                m.protocol = protocol;
            }
            None => {
                added = partitions.clone();
                inner.members.insert(
                    key,
                    Member {
                        client_id: client_id.to_string(),
                        host,
                        protocol,
                        generation,
                        assigned: partitions,
                        assigned_at: now,
                        seen: now,
                    },
                );
                Self::bound(&mut inner, self.max_members);
            }
        }
        // A classic rebalance starts a new generation: members of older ones are gone.
        if protocol == Protocol::Classic {
            inner.members.retain(|(g, _), m| {
                g != group || m.protocol != Protocol::Classic || m.generation >= generation
            });
        }
        added
    }

    /// A member showed it is alive (heartbeat, commit).
    pub fn seen(&self, group: &str, member: &str) {
        if let Some(m) = self
            .lock()
            .members
            .get_mut(&(group.to_string(), member.to_string()))
        {
            m.seen = Instant::now();
        }
    }

    /// A member left its group (LeaveGroup, or a KIP-848 heartbeat with epoch -1).
    pub fn left(&self, group: &str, member: &str) {
        self.lock()
            .members
            .remove(&(group.to_string(), member.to_string()));
    }

    /// A commit the broker accepted. Kept for groups with a member known here (their
    /// acknowledgements); the sweep forgets them with the group.
    pub fn committed(&self, group: &str, topic: &str, partition: i32, offset: i64) {
        let mut inner = self.lock();
        if !inner.members.keys().any(|(g, _)| g == group) && !inner.group_seen.contains_key(group) {
            return;
        }
        inner.group_seen.insert(group.to_string(), Instant::now());
        let c = inner.committed.entry(group.to_string()).or_default();
        if c.len() >= MAX_COMMITTED_PER_GROUP && !c.contains_key(&(topic.to_string(), partition)) {
            return;
        }
        c.insert((topic.to_string(), partition), offset);
    }

    /// The group's committed offset of a partition, if one was seen.
    pub fn committed_offset(&self, group: &str, topic: &str, partition: i32) -> Option<i64> {
        self.lock()
            .committed
            .get(group)?
            .get(&(topic.to_string(), partition))
            .copied()
    }

    /// A fetch answered on `conn` (asked at `asked`): per partition, where it was asked from
    /// and what went to the client. Returns true when records were delivered and none of the connection's
    /// were sampled yet (its first record set is worth a content sample whatever the
    /// sampling rate; `sampled` records that one was taken).
    pub fn fetched<'a>(
        &self,
        conn: u64,
        host: IpAddr,
        client_id: &str,
        isolation: i8,
        asked: Instant,
        parts: impl IntoIterator<Item = Fetched<'a>>,
    ) -> bool {
        let now = Instant::now();
        let mut inner = self.lock();
        let c = inner.conns.entry(conn).or_insert_with(|| Conn {
            client_id: client_id.to_string(),
            host,
            positions: HashMap::new(),
            delivered: 0,
            bytes: 0,
            history: VecDeque::new(),
            seen: now,
            centroid: None,
            routing: Histogram::default(),
            sampled: false,
            isolation,
            isolation_filed: false,
        });
        c.seen = now;
        // Filed per client when a connection starts or changes level (not on every fetch).
        let file = c.isolation != isolation || !c.isolation_filed;
        c.isolation = isolation;
        c.isolation_filed = true;
        if file {
            if inner.isolation.len() >= self.max_members {
                inner.isolation.clear();
            }
            inner
                .isolation
                .insert((host, client_id.to_string()), isolation);
        }
        let c = inner.conns.get_mut(&conn).expect("inserted above");
        // The rate's samples are the totals *before* this fetch: what it delivers counts
        // from the first sample on (a consumer served in one fetch still shows a rate).
        if c.history
            .back()
            .is_none_or(|(t, _)| now.duration_since(*t) >= Duration::from_millis(500))
        {
            c.history.push_back((now, c.delivered));
            while c
                .history
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW * 2)
            {
                c.history.pop_front();
            }
        }
        let mut delivered = false;
        for f in parts {
            let next = f.next.unwrap_or(f.from).max(f.from);
            let pos = next;
            match c.positions.get_mut(f.topic) {
                Some(parts) => {
                    parts.insert(f.partition, (pos, asked));
                }
                None => {
                    c.positions.insert(
                        f.topic.to_string(),
                        HashMap::from([(f.partition, (pos, asked))]),
                    );
                }
            }
            if let Some(n) = f.next {
                c.delivered += (n - f.from).max(0) as u64;
                c.bytes += f.bytes as u64;
                delivered = true;
            }
        }
        delivered && !c.sampled
    }

    /// A content sample of what `conn` delivered was taken (see `fetched`).
    pub fn sampled(&self, conn: u64) {
        if let Some(c) = self.lock().conns.get_mut(&conn) {
            c.sampled = true;
        }
    }

    /// The isolation level the fetches of a client (address and client id) use, if one of
    /// its connections fetched.
    pub fn isolation_of(&self, host: IpAddr, client_id: &str) -> Option<i8> {
        self.lock()
            .isolation
            .get(&(host, client_id.to_string()))
            .copied()
    }

    /// A sampled record of `topic`/`partition` delivered on `conn` carried `value` in routing
    /// field `field`: counted for the connection and the partition.
    pub fn routed(&self, conn: u64, topic: &str, partition: i32, field: &str, value: &str) {
        let mut inner = self.lock();
        if let Some(c) = inner.conns.get_mut(&conn) {
            c.routing.add(field, value);
        }
        let tp = (topic.to_string(), partition);
        if let Some(h) = inner.partition_routing.get_mut(&tp) {
            h.add(field, value);
        } else if inner.partition_routing.len() < MAX_PARTITION_CENTROIDS {
            let mut h = Histogram::recent(ROUTING_HORIZON);
            h.add(field, value);
            inner.partition_routing.insert(tp, h);
        }
    }

    /// The embedding of a sampled record of `topic`/`partition` delivered on `conn`: folded
    /// into the connection's centroid and the partition's.
    pub fn content(&self, conn: u64, topic: &str, partition: i32, v: &[f32]) {
        let mut inner = self.lock();
        if let Some(c) = inner.conns.get_mut(&conn) {
            c.centroid
                .get_or_insert_with(|| Centroid::with_horizon(v.len(), CENTROID_HORIZON))
                .add(v);
        }
        let tp = (topic.to_string(), partition);
        if let Some(p) = inner.partition_content.get_mut(&tp) {
            p.add(v);
        } else if inner.partition_content.len() < MAX_PARTITION_CENTROIDS {
            let mut p = Centroid::with_horizon(v.len(), CENTROID_HORIZON);
            p.add(v);
            inner.partition_content.insert(tp, p);
        }
    }

    /// How close each partition's recent records are to what `conn` was delivered: the cosine
    /// similarity of their content centroids and that of their routing-value histograms,
    /// the mean of the two where both are known (None where neither is).
    pub fn affinities(&self, conn: u64, parts: &[(&str, i32)]) -> Vec<Option<f32>> {
        let inner = self.lock();
        let Some(c) = inner.conns.get(&conn) else {
            return vec![None; parts.len()];
        };
        let mine = c.centroid.as_ref().filter(|c| c.count() > 0);
        parts
            .iter()
            .map(|(t, p)| {
                let tp = (t.to_string(), *p);
                let content = mine.and_then(|mine| {
                    let theirs = inner.partition_content.get(&tp)?;
                    (theirs.count() > 0 && theirs.dims() == mine.dims())
                        .then(|| super::embed::cosine(mine.mean(), theirs.mean()))
                });
                let routing = inner
                    .partition_routing
                    .get(&tp)
                    .and_then(|h| c.routing.cosine(h));
                match (content, routing) {
                    (Some(a), Some(b)) => Some((a + b) / 2.0),
                    (a, b) => a.or(b),
                }
            })
            .collect()
    }

    /// The assignment of the member `conn` belongs to, when it arrived after `known` (the
    /// arrival time of the last one the caller acted on): when it arrived and its partitions.
    pub fn assignment_of(
        &self,
        conn: u64,
        known: Option<Instant>,
    ) -> Option<(Instant, Vec<(String, i32)>)> {
        let inner = self.lock();
        let key = Self::member_of(&inner, inner.conns.get(&conn)?)?;
        let m = inner.members.get(key)?;
        (known != Some(m.assigned_at)).then(|| (m.assigned_at, m.assigned.clone()))
    }

    pub fn connection_closed(&self, conn: u64) {
        self.lock().conns.remove(&conn);
    }

    /// The member a fetch connection belongs to, if any (see the module comment).
    fn member_of<'a>(inner: &'a Inner, conn: &Conn) -> Option<&'a (String, String)> {
        let candidates: Vec<(&(String, String), &Member)> = inner
            .members
            .iter()
            .filter(|(_, m)| m.host == conn.host && m.client_id == conn.client_id)
            .collect();
        match candidates.as_slice() {
            [] => None,
            [(k, _)] => Some(k),
            // Only what the connection asked for since the member's current assignment
            // counts (before a rebalance it fetched partitions that have moved since); the
            // member whose assignment covers most of it, if more in than out.
            many => many
                .iter()
                .filter_map(|(k, m)| {
                    let mut score = 0i64;
                    for (t, parts) in &conn.positions {
                        for (p, _) in parts.iter().filter(|(_, (_, at))| *at >= m.assigned_at) {
                            let owned = m
                                .assigned
                                .binary_search_by(|(at, ap)| {
                                    (at.as_str(), *ap).cmp(&(t.as_str(), *p))
                                })
                                .is_ok();
                            score += if owned { 1 } else { -1 };
                        }
                    }
                    (score > 0).then_some((std::cmp::Reverse(score), *k))
                })
                .min()
                .map(|(_, k)| k),
        }
    }

    /// Forgets members and groups nobody heard from for a while.
    pub fn sweep(&self) {
        let mut inner = self.lock();
        let now = Instant::now();
        let fresh_conn: std::collections::HashSet<(IpAddr, String)> = inner
            .conns
            .values()
            .filter(|c| now.duration_since(c.seen) < MEMBER_IDLE)
            .map(|c| (c.host, c.client_id.clone()))
            .collect();
        // Positions of partitions a connection stopped fetching (moved away at a rebalance).
        for c in inner.conns.values_mut() {
            for parts in c.positions.values_mut() {
                parts.retain(|_, (_, at)| now.duration_since(*at) < MEMBER_IDLE);
            }
            c.positions.retain(|_, parts| !parts.is_empty());
        }
        inner.members.retain(|_, m| {
            now.duration_since(m.seen) < MEMBER_IDLE
                || fresh_conn.contains(&(m.host, m.client_id.clone()))
        });
        let groups: std::collections::HashSet<String> =
            inner.members.keys().map(|(g, _)| g.clone()).collect();
        inner
            .group_seen
            .retain(|g, at| groups.contains(g) || now.duration_since(*at) < MEMBER_IDLE);
        let seen = std::mem::take(&mut inner.group_seen);
        inner.committed.retain(|g, _| seen.contains_key(g));
        inner.group_seen = seen;
    }

    fn bound(inner: &mut Inner, max: usize) {
        while inner.members.len() > max {
            let Some(oldest) = inner
                .members
                .iter()
                .min_by_key(|(_, m)| m.seen)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            inner.members.remove(&oldest);
            metrics::counter!("shardgate_prefetch_profiles_evicted_total").increment(1);
        }
    }

    /// Every consumer this instance knows: group members first, then connections linked to
    /// no member.
    pub fn snapshot(&self) -> Vec<ConsumerView> {
        let inner = self.lock();
        let now = Instant::now();
        let mut by_member: BTreeMap<&(String, String), Vec<(u64, &Conn)>> = BTreeMap::new();
        let mut alone = Vec::new();
        for (id, c) in &inner.conns {
            match Self::member_of(&inner, c) {
                Some(k) => by_member.entry(k).or_default().push((*id, c)),
                None => alone.push((*id, c)),
            }
        }
        let mut out = Vec::new();
        let mut keys: Vec<&(String, String)> = inner.members.keys().collect();
        keys.sort();
        for key in keys {
            let m = &inner.members[key];
            let conns = by_member.remove(key).unwrap_or_default();
            let committed = inner.committed.get(&key.0);
            let centroid = merged_centroid(&conns);
            let partitions = m
                .assigned
                .iter()
                .map(|tp| PartitionView {
                    topic: tp.0.clone(),
                    partition: tp.1,
                    position: conns
                        .iter()
                        .filter_map(|(_, c)| Some(c.positions.get(&tp.0)?.get(&tp.1)?.0))
                        .max()
                        .unwrap_or(-1),
                    committed: committed.and_then(|c| c.get(tp)).copied().unwrap_or(-1),
                    content_similarity: similarity(&inner, centroid.as_ref(), tp),
                })
                .collect();
            out.push(ConsumerView {
                group: Some(key.0.clone()),
                member: Some(key.1.clone()),
                client_id: m.client_id.clone(),
                host: m.host.to_string(),
                protocol: Some(m.protocol),
                generation: Some(m.generation),
                assigned_secs: Some(now.duration_since(m.assigned_at).as_secs_f64()),
                connections: sorted_ids(&conns),
                partitions,
                records_per_sec: conns.iter().map(|(_, c)| c.rate(now)).sum(),
                delivered_records: conns.iter().map(|(_, c)| c.delivered).sum(),
                delivered_bytes: conns.iter().map(|(_, c)| c.bytes).sum(),
                content_samples: centroid.as_ref().map_or(0, |c| c.1),
                top_routing_values: top_values(conns.iter().map(|(_, c)| &c.routing)),
            });
        }
        alone.sort_by_key(|(id, _)| *id);
        for (id, c) in alone {
            let centroid = merged_centroid(&[(id, c)]);
            let mut partitions: Vec<PartitionView> = c
                .positions
                .iter()
                .flat_map(|(t, parts)| parts.iter().map(move |(p, pos)| (t, *p, pos)))
                .map(|(t, p, pos)| PartitionView {
                    topic: t.clone(),
                    partition: p,
                    position: pos.0,
                    committed: -1,
                    content_similarity: similarity(&inner, centroid.as_ref(), &(t.clone(), p)),
                })
                .collect();
            partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
            out.push(ConsumerView {
                group: None,
                member: None,
                client_id: c.client_id.clone(),
                host: c.host.to_string(),
                protocol: None,
                generation: None,
                assigned_secs: None,
                connections: vec![id],
                partitions,
                records_per_sec: c.rate(now),
                delivered_records: c.delivered,
                delivered_bytes: c.bytes,
                content_samples: centroid.as_ref().map_or(0, |c| c.1),
                top_routing_values: top_values(std::iter::once(&c.routing)),
            });
        }
        out
    }

    /// (members, fetch connections) known, for the gauges.
    pub fn sizes(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.members.len(), inner.conns.len())
    }
}

/// The centroid of a consumer over its connections (each weighted by its samples).
/// The centroid of a consumer over its connections (each weighted by its samples): the mean
/// vector and the samples behind it.
fn merged_centroid(conns: &[(u64, &Conn)]) -> Option<(Vec<f32>, u64)> {
    let parts: Vec<&Centroid> = conns
        .iter()
        .filter_map(|(_, c)| c.centroid.as_ref())
        .filter(|c| c.count() > 0)
        .collect();
    let dims = parts.first()?.dims();
    let parts: Vec<&Centroid> = parts.into_iter().filter(|c| c.dims() == dims).collect();
    let total: u64 = parts.iter().map(|c| c.count()).sum();
    let mut mean = vec![0.0f32; dims];
    for c in parts {
        let w = c.count() as f32 / total as f32;
        for (m, x) in mean.iter_mut().zip(c.mean()) {
            *m += x * w;
        }
    }
    Some((mean, total))
}

fn similarity(inner: &Inner, centroid: Option<&(Vec<f32>, u64)>, tp: &Tp) -> Option<f32> {
    let (mean, _) = centroid?;
    let p = inner.partition_content.get(tp)?;
    (p.count() > 0).then(|| super::embed::cosine(mean, p.mean()))
}

fn sorted_ids(conns: &[(u64, &Conn)]) -> Vec<u64> {
    let mut v: Vec<u64> = conns.iter().map(|(id, _)| *id).collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests;
