//! Ordering gates on the fetch path.
//!
//! After a split or merge, a key's new records land on another partition than its old ones.
//! A gate `(partition q, from_offset, after: [(p, seal_offset)])` holds q's records at and
//! after `from_offset` from a consumer group until that group has consumed p up to
//! `seal_offset`; then the key's old records have all been delivered and the new ones may
//! follow.
//!
//! shardgate sees the group protocol and the fetches, not the consumers themselves, so it links
//! fetch connections to groups by what both carry: the client's address and `client.id`
//! (JoinGroup/SyncGroup/Heartbeat/OffsetCommit name the group). Where that link is ambiguous
//! (several groups behind one address and client id) every linked group must have drained: the
//! conservative answer never breaks order, it only delays. A connection linked to no group is
//! judged by its own fetch positions.
//!
//! Groups advance by their commits. A group that does not commit (manual commits that never
//! come, `enable.auto.commit=false` readers) would wait forever, so after a gate has held a
//! group for the topic's `gate_fallback_secs`, the fetch positions of the connections linked
//! to that group alone count too: weaker (a client may have prefetched records it has not
//! processed yet), but bounded in time instead of a stall.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::map::Gate;

type Positions = HashMap<(String, i32), i64>;

/// How long a closed gate keeps its topic's group state read from Kafka.
const WANTED_FOR: Duration = Duration::from_secs(10);
/// How old Kafka's view may be for judging a connection no group is linked to here.
const KAFKA_FRESH: Duration = Duration::from_secs(5);

/// One topic's consumer groups as Kafka reports them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TopicGroups {
    /// Partition → live groups with a member assigned it.
    pub owners: HashMap<i32, Vec<String>>,
    /// Live groups' committed offsets: (group, partition) → offset.
    pub committed: HashMap<(String, i32), i64>,
}

/// Which topics want their group state read: those where a fetch met a closed gate lately.
#[derive(Default)]
pub struct Demand {
    wanted: Mutex<HashMap<String, Instant>>,
}

impl Demand {
    pub fn want(&self, topic: &str) {
        let mut w = self.wanted.lock().expect("demand lock");
        match w.get_mut(topic) {
            Some(at) => *at = Instant::now(),
            None => {
                w.insert(topic.to_string(), Instant::now());
            }
        }
    }

    pub fn wanted(&self) -> Vec<String> {
        let mut w = self.wanted.lock().expect("demand lock");
        w.retain(|_, at| at.elapsed() < WANTED_FOR);
        w.keys().cloned().collect()
    }
}

/// (who, topic, gated partition, the gate's creation epoch).
type HoldKey = (String, String, i32, u64);
/// (topic, partition) pairs assigned to one group member.
type Assigned = Vec<(String, i32)>;
/// A group's generation and its members' assignments in it.
type GroupAssignment = (i32, HashMap<String, Assigned>);

/// (client address, client id) → the groups it joined, and when it last did.
type Links = HashMap<(IpAddr, String), (HashSet<String>, Instant)>;

#[derive(Default)]
pub struct GroupTracker {
    /// (client address, client id) → the groups it joined, and when it last did.
    links: Mutex<Links>,
    /// Per group: its last activity on the wire (or first sight in Kafka's view), so groups
    /// that went away are forgotten (`expiry.rs`): the maps above are keyed by
    /// client-supplied names and must not grow without bound.
    activity: Mutex<HashMap<String, Instant>>,
    /// Per group: the highest offset known consumed (committed, or a fetch position: fetching
    /// from offset o means everything before o was delivered).
    groups: Mutex<HashMap<String, Positions>>,
    conns: Mutex<HashMap<u64, Positions>>,
    /// Per group: fetch positions of connections linked to that group alone.
    group_fetched: Mutex<HashMap<String, Positions>>,
    /// Per (group, member): the partitions its SyncGroup answer assigned it (classic groups
    /// with the consumer protocol), for placement.
    /// group → (generation, member → assignment); a newer generation replaces the members.
    assignments: Mutex<HashMap<String, GroupAssignment>>,
    /// When a group was first held at a gate (for the wait-time metric and the fallback), and
    /// whether the fallback has let it through (it then stays open: positions only grow).
    held_since: Mutex<HashMap<HoldKey, (Instant, bool)>>,
    /// Kafka's view (`group_state`): per (topic, partition), the live groups assigned it.
    kafka_owners: Mutex<HashMap<(String, i32), Vec<String>>>,
    /// When each topic's group state was last read from Kafka.
    kafka_read: Mutex<HashMap<String, Instant>>,
    /// Topics whose group state a closed gate wants read from Kafka.
    demand: Demand,
}

/// Who is fetching: the groups linked to the connection, or the connection itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consumer {
    Groups(Vec<String>),
    Connection(u64),
}

impl Consumer {
    fn label(&self) -> String {
        match self {
            Consumer::Groups(g) => g.join(","),
            Consumer::Connection(c) => format!("conn-{c}"),
        }
    }
}

impl GroupTracker {
    pub fn demand(&self) -> &Demand {
        &self.demand
    }

    /// Folds Kafka's view of `topic`'s groups in: their commits advance them as commits seen on
    /// the wire do (wherever they were made, transactional ones included), and the owners of
    /// each partition replace what Kafka said before.
    pub fn absorb_kafka(&self, topic: &str, state: TopicGroups) {
        {
            let mut g = self.groups.lock().expect("groups lock");
            let mut act = self.activity.lock().expect("activity lock");
            for ((group, partition), offset) in &state.committed {
                act.entry(group.clone()).or_insert_with(Instant::now);
                Self::bump(
                    g.entry(group.clone()).or_default(),
                    topic,
                    *partition,
                    *offset,
                );
            }
        }
        let mut o = self.kafka_owners.lock().expect("kafka owners lock");
        o.retain(|(t, _), _| t != topic);
        for (partition, groups) in state.owners {
            o.insert((topic.to_string(), partition), groups);
        }
        self.kafka_read
            .lock()
            .expect("kafka read lock")
            .insert(topic.to_string(), Instant::now());
    }

    /// Whether Kafka's view of `topic`'s groups was read lately (a few refreshes ago at most).
    fn kafka_fresh(&self, topic: &str) -> bool {
        self.kafka_read
            .lock()
            .expect("kafka read lock")
            .get(topic)
            .is_some_and(|at| at.elapsed() < KAFKA_FRESH)
    }

    /// The live groups Kafka says have (topic, partition) assigned; `None`: not read.
    fn kafka_owners(&self, topic: &str, partition: i32) -> Option<Vec<String>> {
        self.kafka_owners
            .lock()
            .expect("kafka owners lock")
            .get(&(topic.to_string(), partition))
            .cloned()
    }

    pub fn link(&self, ip: IpAddr, client_id: &str, group: &str) {
        self.touch(group);
        let mut l = self.links.lock().expect("links lock");
        let e = l
            .entry((ip, client_id.to_string()))
            .or_insert_with(|| (HashSet::new(), Instant::now()));
        e.0.insert(group.to_string());
        e.1 = Instant::now();
    }

    pub fn consumer(&self, ip: IpAddr, client_id: &str, conn: u64) -> Consumer {
        let l = self.links.lock().expect("links lock");
        match l.get(&(ip, client_id.to_string())) {
            Some((g, _)) if !g.is_empty() => {
                let mut v: Vec<String> = g.iter().cloned().collect();
                v.sort();
                Consumer::Groups(v)
            }
            _ => Consumer::Connection(conn),
        }
    }

    fn bump(p: &mut Positions, topic: &str, partition: i32, offset: i64) {
        let e = p.entry((topic.to_string(), partition)).or_insert(offset);
        if offset > *e {
            *e = offset;
        }
    }

    pub fn committed(&self, group: &str, topic: &str, partition: i32, offset: i64) {
        self.touch(group);
        let mut g = self.groups.lock().expect("groups lock");
        Self::bump(
            g.entry(group.to_string()).or_default(),
            topic,
            partition,
            offset,
        );
    }

    /// A fetch from `offset` on `conn`. It counts for the connection, and for a group only
    /// through the fallback: clients prefetch (librdkafka reads ahead on every partition), so a
    /// fetch position says what the client library has received, not what the application has
    /// consumed.
    pub fn fetched(&self, who: &Consumer, conn: u64, topic: &str, partition: i32, offset: i64) {
        {
            let mut m = self.conns.lock().expect("conns lock");
            Self::bump(m.entry(conn).or_default(), topic, partition, offset);
        }
        let groups = match who {
            Consumer::Groups(g) => self.narrow(g, topic, partition),
            // Not linked here (its group traffic may go to another instance): Kafka knows.
            Consumer::Connection(_) => self.kafka_owners(topic, partition).unwrap_or_default(),
        };
        if let Consumer::Groups(g) = who {
            for group in g {
                self.touch(group);
            }
        }
        if let [group] = groups.as_slice() {
            let mut m = self.group_fetched.lock().expect("group fetched lock");
            Self::bump(
                m.entry(group.clone()).or_default(),
                topic,
                partition,
                offset,
            );
        }
    }

    fn group_fetched_topic(&self, group: &str, topic: &str) -> bool {
        let m = self.group_fetched.lock().expect("group fetched lock");
        m.get(group)
            .is_some_and(|p| p.keys().any(|(t, _)| t == topic))
    }

    /// The candidate groups of a fetch that could own `(topic, partition)`: a group whose
    /// members' assignments are known (classic groups, from SyncGroup) and none holds it is
    /// not the owner. Groups with unknown assignments stay (conservative).
    fn narrow(&self, groups: &[String], topic: &str, partition: i32) -> Vec<String> {
        if groups.len() < 2 {
            return groups.to_vec();
        }
        let owners = self.kafka_owners(topic, partition).unwrap_or_default();
        let a = self.assignments.lock().expect("assignments lock");
        let kept: Vec<String> = groups
            .iter()
            .filter(|g| owners.is_empty() || owners.contains(g))
            .filter(|g| {
                a.get(*g).is_none_or(|(_, members)| {
                    members.is_empty()
                        || members
                            .values()
                            .any(|parts| parts.iter().any(|(t, p)| t == topic && *p == partition))
                })
            })
            .cloned()
            .collect();
        if kept.is_empty() {
            groups.to_vec()
        } else {
            kept
        }
    }

    fn group_fetch_position(&self, group: &str, topic: &str, partition: i32) -> i64 {
        let m = self.group_fetched.lock().expect("group fetched lock");
        m.get(group)
            .and_then(|p| p.get(&(topic.to_string(), partition)))
            .copied()
            .unwrap_or(-1)
    }

    pub fn forget_connection(&self, conn: u64) {
        self.conns.lock().expect("conns lock").remove(&conn);
    }

    fn group_position(&self, group: &str, topic: &str, partition: i32) -> Option<i64> {
        let g = self.groups.lock().expect("groups lock");
        let p = g.get(group)?;
        if !p.keys().any(|(t, _)| t == topic) {
            return None; // not known to consume this topic
        }
        Some(
            p.get(&(topic.to_string(), partition))
                .copied()
                .unwrap_or(-1),
        )
    }

    fn conn_position(&self, conn: u64, topic: &str, partition: i32) -> i64 {
        let m = self.conns.lock().expect("conns lock");
        m.get(&conn)
            .and_then(|p| p.get(&(topic.to_string(), partition)))
            .copied()
            .unwrap_or(-1)
    }

    /// Positions that must all have passed a seal for `who` to see gated records: the committed
    /// offsets of every linked group known to consume the topic (a linked group that has not
    /// committed on it yet holds the gate closed), or, for a connection linked to no group, its
    /// own fetch positions.
    fn positions(&self, who: &Consumer, conn: u64, topic: &str, partition: i32) -> Vec<i64> {
        match who {
            Consumer::Groups(groups) => {
                let known: Vec<i64> = groups
                    .iter()
                    .filter_map(|g| self.group_position(g, topic, partition))
                    .collect();
                if known.is_empty() { vec![-1] } else { known }
            }
            Consumer::Connection(_) => vec![self.conn_position(conn, topic, partition)],
        }
    }

    /// Whether `who` (fetching on `conn`) may see records at and after the gate's
    /// `from_offset`. `fallback`: after how long a held group is judged by its fetch positions
    /// too (None: never).
    pub fn gate_open(
        &self,
        who: &Consumer,
        conn: u64,
        topic: &str,
        gate: &Gate,
        fallback: Option<Duration>,
    ) -> bool {
        let open = self.judge(who, conn, topic, gate, fallback);
        if !open {
            // A fetch is held: keep Kafka's view of the topic's groups fresh while it lasts.
            self.demand.want(topic);
        }
        open
    }

    fn judge(
        &self,
        who: &Consumer,
        conn: u64,
        topic: &str,
        gate: &Gate,
        fallback: Option<Duration>,
    ) -> bool {
        if gate.from_offset.is_none() || gate.after.iter().any(|p| p.seal_offset.is_none()) {
            return false;
        }
        let narrowed;
        let who = match who {
            Consumer::Groups(groups) => {
                narrowed = Consumer::Groups(self.narrow(groups, topic, gate.partition));
                &narrowed
            }
            // A connection not linked to a group here may belong to one whose coordinator
            // traffic reaches another instance: the groups Kafka says own the partition judge.
            // Until Kafka's view is read, it stays closed: its own fetch positions may be
            // prefetches of a group member, not consumption.
            Consumer::Connection(_) if !self.kafka_fresh(topic) => return false,
            Consumer::Connection(_) => match self.kafka_owners(topic, gate.partition) {
                Some(owners) if !owners.is_empty() => {
                    narrowed = Consumer::Groups(owners);
                    &narrowed
                }
                _ => who,
            },
        };
        let passed = |positions: &dyn Fn(i32) -> Vec<i64>| {
            gate.after.iter().all(|parent| {
                let seal = parent.seal_offset.unwrap_or(i64::MAX);
                positions(parent.partition).iter().all(|p| *p >= seal)
            })
        };
        let mut open = passed(&|partition| self.positions(who, conn, topic, partition));
        let key = (
            who.label(),
            topic.to_string(),
            gate.partition,
            gate.created_epoch,
        );
        if !open
            && let (Some(after), Consumer::Groups(groups)) = (fallback, who)
            && self
                .held_since
                .lock()
                .expect("held lock")
                .get(&key)
                .is_some_and(|(since, through)| *through || since.elapsed() >= after)
        {
            // Groups with nothing known on the topic (no commits, no fetches of their own)
            // are other consumers sharing the client id; if none is left, stay closed.
            let on_topic: Vec<&String> = groups
                .iter()
                .filter(|g| {
                    self.group_position(g, topic, gate.partition).is_some()
                        || self.group_fetched_topic(g, topic)
                })
                .collect();
            open = !on_topic.is_empty()
                && passed(&|partition| {
                    on_topic
                        .iter()
                        .map(|g| {
                            self.group_position(g, topic, partition)
                                .unwrap_or(-1)
                                .max(self.group_fetch_position(g, topic, partition))
                        })
                        .collect()
                });
            if open {
                // The hold entry stays, so later fetches are judged by the fallback too
                // instead of starting a new hold.
                let mut held = self.held_since.lock().expect("held lock");
                if let Some((since, counted)) = held.get_mut(&key)
                    && !*counted
                {
                    *counted = true;
                    // Its own fetch positions passed the seal, with no commits past it.
                    log_opened(topic, gate, &key.0, *since, "fallback");
                    metrics::counter!("shardgate_gate_fallback_opens_total", "topic" => topic.to_string())
                        .increment(1);
                }
                return true;
            }
        }
        let mut held = self.held_since.lock().expect("held lock");
        if open {
            if let Some((since, _)) = held.remove(&key) {
                metrics::histogram!("shardgate_gate_wait_seconds", "topic" => topic.to_string())
                    .record(since.elapsed().as_secs_f64());
                log_opened(topic, gate, &key.0, since, "passed");
            }
        } else {
            if held.len() > 100_000 {
                // Holds of retired gates and gone consumers: forget the old ones.
                held.retain(|_, (since, _)| since.elapsed() < Duration::from_secs(3600));
            }
            if let std::collections::hash_map::Entry::Vacant(v) = held.entry(key) {
                let (who, ..) = v.key();
                tracing::info!(
                    topic,
                    partition = gate.partition,
                    consumer = %who,
                    reason = "behind_seal",
                    after = ?gate.after.iter().map(|p| (p.partition, p.seal_offset)).collect::<Vec<_>>(),
                    "gate holds a consumer"
                );
                v.insert((Instant::now(), false));
            }
        }
        open
    }

    /// Whether `gate` is about to open for `who` (fetching on `conn`): it is sealed and every
    /// parent was delivered up to its seal, by fetch positions (of `conn`, or of connections
    /// linked to each group alone) or commits; what is missing is the commit that opens it.
    /// A prediction for prefetch only: records go through on `gate_open` alone.
    pub fn gate_opening(&self, who: &Consumer, conn: u64, topic: &str, gate: &Gate) -> bool {
        if gate.from_offset.is_none() || gate.after.iter().any(|p| p.seal_offset.is_none()) {
            return false;
        }
        let groups = match who {
            Consumer::Groups(g) => self.narrow(g, topic, gate.partition),
            Consumer::Connection(_) => Vec::new(),
        };
        gate.after.iter().all(|parent| {
            let seal = parent.seal_offset.unwrap_or(i64::MAX);
            let own = self.conn_position(conn, topic, parent.partition);
            groups.iter().all(|g| {
                let committed = self.group_position(g, topic, parent.partition);
                let fetched = self.group_fetch_position(g, topic, parent.partition);
                committed.unwrap_or(-1).max(fetched).max(own) >= seal
            }) && (!groups.is_empty() || own >= seal)
        })
    }

    /// Committed positions per group on managed topics, for `GET /api/v1/consumers`.
    pub fn snapshot(
        &self,
    ) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, i64>> {
        let g = self.groups.lock().expect("groups lock");
        g.iter()
            .map(|(group, p)| {
                (
                    group.clone(),
                    p.iter()
                        .map(|((t, part), o)| (format!("{t}/{part}"), *o))
                        .collect(),
                )
            })
            .collect()
    }

    /// Records what a SyncGroup answer of `generation` assigned to a member. Members of older
    /// generations are forgotten, so a rebalance never leaves stale owners behind.
    pub fn assigned(
        &self,
        group: &str,
        generation: i32,
        member: &str,
        partitions: Vec<(String, i32)>,
    ) {
        self.touch(group);
        let mut a = self.assignments.lock().expect("assignments lock");
        let entry = a
            .entry(group.to_string())
            .or_insert_with(|| (generation, HashMap::new()));
        if generation > entry.0 {
            *entry = (generation, HashMap::new());
        }
        if generation == entry.0 {
            // Kept even when empty: "this member holds nothing managed" is knowledge too.
            entry.1.insert(member.to_string(), partitions);
        }
    }

    /// For each partition of `topic` some member is assigned: how many of the `active`
    /// partitions that member holds (the largest over groups).
    pub fn consumer_loads(&self, topic: &str, active: &[i32]) -> HashMap<i32, usize> {
        let a = self.assignments.lock().expect("assignments lock");
        let mut out: HashMap<i32, usize> = HashMap::new();
        for parts in a.values().flat_map(|(_, members)| members.values()) {
            let mine: Vec<i32> = parts
                .iter()
                .filter(|(t, _)| t == topic)
                .map(|(_, p)| *p)
                .collect();
            let load = mine.iter().filter(|p| active.contains(p)).count();
            for p in mine {
                let e = out.entry(p).or_insert(0);
                *e = (*e).max(load);
            }
        }
        out
    }

    /// Managed topics `group` has positions on.
    pub fn topics_of(&self, group: &str) -> Vec<String> {
        let g = self.groups.lock().expect("groups lock");
        let mut topics: Vec<String> = g
            .get(group)
            .map(|p| p.keys().map(|(t, _)| t.clone()).collect())
            .unwrap_or_default();
        topics.sort();
        topics.dedup();
        topics
    }

    /// Groups that have positions on `topic` (those a gate must wait for before removal).
    pub fn groups_on(&self, topic: &str) -> Vec<String> {
        let g = self.groups.lock().expect("groups lock");
        g.iter()
            .filter(|(_, p)| p.keys().any(|(t, _)| t == topic))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Whether `gate` still holds records: not sealed yet, or some group seen on `topic` has
    /// not passed a parent's seal.
    pub fn gate_closed(&self, topic: &str, gate: &Gate) -> bool {
        let sealed =
            gate.from_offset.is_some() && gate.after.iter().all(|a| a.seal_offset.is_some());
        !sealed || !self.all_groups_passed(topic, gate)
    }

    /// Whether every group seen on `topic` has passed every parent of `gate`.
    pub fn all_groups_passed(&self, topic: &str, gate: &Gate) -> bool {
        self.groups_on(topic)
            .into_iter()
            .all(|g| self.judge(&Consumer::Groups(vec![g]), u64::MAX, topic, gate, None))
    }
}

/// One log line per gate opened for a consumer it held (the decision and how long it held).
fn log_opened(topic: &str, gate: &Gate, who: &str, since: Instant, reason: &'static str) {
    tracing::info!(
        topic,
        partition = gate.partition,
        consumer = who,
        held_secs = since.elapsed().as_secs_f64(),
        reason,
        "gate opened"
    );
}

/// The batches of `records` that start below `from_offset` (a gate cuts only at batch
/// boundaries: shardgate's rerouted batches never straddle a routing switch).
pub fn records_before(records: &Bytes, from_offset: i64) -> Bytes {
    let mut pos = 0usize;
    while records.len() >= pos + 12 {
        let base = i64::from_be_bytes(records[pos..pos + 8].try_into().expect("8 bytes"));
        let len = i32::from_be_bytes(records[pos + 8..pos + 12].try_into().expect("4 bytes"));
        if base >= from_offset || len < 0 {
            break;
        }
        let next = pos + 12 + len as usize;
        if next > records.len() {
            // A partial batch at the end (fetch max_bytes): keep it, as the broker sent it.
            pos = records.len();
            break;
        }
        pos = next;
    }
    records.slice(..pos)
}

pub mod expiry;
#[cfg(test)]
mod tests;
