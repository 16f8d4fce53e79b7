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

/// A member not heard from (heartbeat, commit, fetch of its connections) for this long is
/// forgotten: well past any session timeout Kafka allows by default (45 s).
const MEMBER_IDLE: Duration = Duration::from_secs(300);
/// Group members profiled at once (beyond: the least recently seen are forgotten).
pub const MAX_MEMBERS: usize = 10_000;
/// Window over which consumption rates are measured.
const RATE_WINDOW: Duration = Duration::from_secs(10);
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

#[derive(Debug, Default)]
struct PartPos {
    /// The offset the connection fetched from last.
    fetched: i64,
    /// Where it will fetch next (after what was delivered).
    next: i64,
}

#[derive(Debug)]
struct Conn {
    client_id: String,
    host: IpAddr,
    positions: HashMap<Tp, PartPos>,
    /// Offsets delivered in total, and samples of that total for the rate.
    delivered: u64,
    bytes: u64,
    history: VecDeque<(Instant, u64)>,
    seen: Instant,
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
    /// carried one). An older generation than the one known is ignored.
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
    ) {
        if member.is_empty() {
            return;
        }
        partitions.sort();
        partitions.dedup();
        let now = Instant::now();
        let mut inner = self.lock();
        let key = (group.to_string(), member.to_string());
        match inner.members.get_mut(&key) {
            Some(m) if generation < m.generation => {}
            Some(m) => {
                if m.assigned != partitions {
                    m.assigned_at = now;
                }
                m.assigned = partitions;
                m.generation = generation;
                m.seen = now;
                m.client_id = client_id.to_string();
                m.host = host;
                m.protocol = protocol;
            }
            None => {
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
        if !inner.members.keys().any(|(g, _)| g == group) {
            return;
        }
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

    /// A fetch answered on `conn`: the partition was asked from `from`, and records up to
    /// `next` (exclusive; None: nothing delivered) of `bytes` bytes went to the client.
    #[allow(clippy::too_many_arguments)]
    pub fn fetched(
        &self,
        conn: u64,
        host: IpAddr,
        client_id: &str,
        topic: &str,
        partition: i32,
        from: i64,
        next: Option<i64>,
        bytes: usize,
    ) {
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
        });
        c.seen = now;
        let pos = c
            .positions
            .entry((topic.to_string(), partition))
            .or_default();
        pos.fetched = from;
        pos.next = next.unwrap_or(from).max(from);
        if let Some(n) = next {
            c.delivered += (n - from).max(0) as u64;
            c.bytes += bytes as u64;
        }
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
            many => many
                .iter()
                .filter(|(_, m)| {
                    !conn.positions.is_empty()
                        && conn
                            .positions
                            .keys()
                            .all(|tp| m.assigned.binary_search(tp).is_ok())
                })
                .map(|(k, _)| *k)
                .min(),
        }
    }

    /// Forgets members and groups nobody heard from for a while.
    pub fn sweep(&self) {
        let mut inner = self.lock();
        let now = Instant::now();
        let fresh_conn: Vec<(IpAddr, String)> = inner
            .conns
            .values()
            .filter(|c| now.duration_since(c.seen) < MEMBER_IDLE)
            .map(|c| (c.host, c.client_id.clone()))
            .collect();
        inner.members.retain(|_, m| {
            now.duration_since(m.seen) < MEMBER_IDLE
                || fresh_conn
                    .iter()
                    .any(|(h, id)| *h == m.host && *id == m.client_id)
        });
        let groups: std::collections::HashSet<String> =
            inner.members.keys().map(|(g, _)| g.clone()).collect();
        inner.committed.retain(|g, _| groups.contains(g));
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
            let partitions = m
                .assigned
                .iter()
                .map(|tp| PartitionView {
                    topic: tp.0.clone(),
                    partition: tp.1,
                    position: conns
                        .iter()
                        .filter_map(|(_, c)| c.positions.get(tp).map(|p| p.next))
                        .max()
                        .unwrap_or(-1),
                    committed: committed.and_then(|c| c.get(tp)).copied().unwrap_or(-1),
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
            });
        }
        alone.sort_by_key(|(id, _)| *id);
        for (id, c) in alone {
            let mut partitions: Vec<PartitionView> = c
                .positions
                .iter()
                .map(|(tp, p)| PartitionView {
                    topic: tp.0.clone(),
                    partition: tp.1,
                    position: p.next,
                    committed: -1,
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

fn sorted_ids(conns: &[(u64, &Conn)]) -> Vec<u64> {
    let mut v: Vec<u64> = conns.iter().map(|(id, _)| *id).collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    fn tps(list: &[(&str, i32)]) -> Vec<Tp> {
        list.iter().map(|(t, p)| (t.to_string(), *p)).collect()
    }

    #[test]
    fn a_fetch_connection_joins_the_member_of_its_address_and_client_id() {
        let p = Profiles::new(100);
        p.assigned(
            "g",
            "m1",
            "c",
            ip(1),
            Protocol::Classic,
            1,
            tps(&[("t", 0)]),
        );
        p.committed("g", "t", 0, 5);
        p.fetched(7, ip(1), "c", "t", 0, 5, Some(9), 100);
        p.fetched(8, ip(2), "c", "t", 1, 0, None, 0);
        let s = p.snapshot();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].member.as_deref(), Some("m1"));
        assert_eq!(s[0].connections, vec![7]);
        assert_eq!(
            s[0].partitions,
            vec![PartitionView {
                topic: "t".into(),
                partition: 0,
                position: 9,
                committed: 5
            }]
        );
        assert_eq!(s[0].delivered_records, 4);
        assert_eq!(s[1].group, None);
        assert_eq!(s[1].connections, vec![8]);
    }

    #[test]
    fn members_sharing_a_client_id_are_told_apart_by_their_assignments() {
        let p = Profiles::new(100);
        p.assigned(
            "g",
            "a",
            "rdkafka",
            ip(1),
            Protocol::Classic,
            3,
            tps(&[("t", 0)]),
        );
        p.assigned(
            "g",
            "b",
            "rdkafka",
            ip(1),
            Protocol::Classic,
            3,
            tps(&[("t", 1)]),
        );
        p.fetched(1, ip(1), "rdkafka", "t", 1, 0, Some(2), 10);
        let s = p.snapshot();
        let b = s.iter().find(|c| c.member.as_deref() == Some("b")).unwrap();
        assert_eq!(b.connections, vec![1]);
        let a = s.iter().find(|c| c.member.as_deref() == Some("a")).unwrap();
        assert!(a.connections.is_empty());
    }

    #[test]
    fn a_new_classic_generation_drops_the_old_members_and_old_answers_are_ignored() {
        let p = Profiles::new(100);
        p.assigned("g", "a", "c", ip(1), Protocol::Classic, 1, tps(&[("t", 0)]));
        p.assigned("g", "b", "c", ip(1), Protocol::Classic, 2, tps(&[("t", 1)]));
        let s = p.snapshot();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].member.as_deref(), Some("b"));
        p.assigned("g", "b", "c", ip(1), Protocol::Classic, 1, tps(&[("t", 9)]));
        assert_eq!(p.snapshot()[0].partitions[0].partition, 1);
        p.left("g", "b");
        assert!(p.snapshot().is_empty());
    }

    #[test]
    fn members_are_bounded() {
        let p = Profiles::new(10);
        for i in 0..50 {
            p.assigned(
                "g",
                &format!("m{i}"),
                "c",
                ip(1),
                Protocol::Consumer,
                i,
                vec![],
            );
        }
        assert_eq!(p.sizes().0, 10);
        for i in 0..20_000 {
            p.committed("g", "t", i, 1);
        }
        assert!(p.lock().committed["g"].len() <= MAX_COMMITTED_PER_GROUP);
    }
}
