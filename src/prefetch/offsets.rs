//! Committed offsets read ahead at a classic group's rebalance. A member just assigned
//! partitions asks the coordinator for its committed offsets (OffsetFetch) and only then
//! fetches: one round trip to Kafka before its first fetch, the larger part of the time to its
//! first record when Kafka is far. The leader's SyncGroup request carries every member's
//! assignment one round trip before any member learns its own, so shardgate sends the
//! OffsetFetch itself then; a member's OffsetFetch that follows its SyncGroup on the same
//! connection is answered from that read.
//!
//! Why the read is still what Kafka would answer when the member asks: it is sent while the
//! group completes its rebalance (the leader's SyncGroup is sent after the join phase ended),
//! when Kafka takes no offset commit for the group (REBALANCE_IN_PROGRESS); once the new
//! generation is stable only its members commit (older generations get ILLEGAL_GENERATION),
//! and a partition of the new assignment is its owner's: the member that asks, whose own
//! commits pass here. Any commit this instance sees for the group drops the group's reads
//! anyway, a read is used once, only by the member it was made for, within `BIND_TTL` of its
//! SyncGroup answer, only for partitions that read found with no error (it asks with
//! require_stable: a partition with a pending transactional commit is never answered here),
//! and never when the leader's SyncGroup failed. Not covered: a transactional producer of
//! clients older than KIP-447 (no member id in TxnOffsetCommit) committing the group's offsets
//! during the rebalance, which Kafka itself does not fence.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How long after its SyncGroup answer a member's OffsetFetch may be answered from the read
/// (clients ask at once; a later ask goes to Kafka).
pub const BIND_TTL: Duration = Duration::from_secs(2);
/// Reads older than this are dropped whatever happened (a member that never asks).
const READ_TTL: Duration = Duration::from_secs(30);
/// Groups followed at once (beyond, new reads are not started).
const MAX_GROUPS: usize = 10_000;

/// One partition's committed offset as the coordinator answered it.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: Option<String>,
    pub error_code: i16,
}

/// (topic, partition) → committed offset; `None` while the read is under way; an empty map
/// when it failed.
pub type ReadState = Option<Arc<HashMap<(String, i32), Committed>>>;

struct Member {
    parts: Vec<(String, i32)>,
    /// The client connection its SyncGroup answer passed on, and when.
    bound: Option<(u64, Instant)>,
}

struct GroupRead {
    generation: i32,
    started: Instant,
    members: HashMap<String, Member>,
    state: watch::Receiver<ReadState>,
}

#[derive(Default)]
pub struct OffsetsAhead {
    groups: Mutex<HashMap<String, GroupRead>>,
}

/// A read a member's OffsetFetch may take its answer from.
pub struct Taken {
    pub state: watch::Receiver<ReadState>,
}

impl OffsetsAhead {
    /// The leader of `group` sends generation `generation`'s assignment (`members`): the
    /// caller reads their committed offsets and sends the result on the returned channel.
    /// None: too many groups followed.
    pub fn begin(
        &self,
        group: &str,
        generation: i32,
        members: HashMap<String, Vec<(String, i32)>>,
        now: Instant,
    ) -> Option<watch::Sender<ReadState>> {
        let mut g = self.groups.lock().ok()?;
        g.retain(|_, r| now.saturating_duration_since(r.started) < READ_TTL);
        if g.len() >= MAX_GROUPS && !g.contains_key(group) {
            return None;
        }
        let (tx, rx) = watch::channel(None);
        let members = members
            .into_iter()
            .map(|(m, parts)| (m, Member { parts, bound: None }))
            .collect();
        g.insert(
            group.to_string(),
            GroupRead {
                generation,
                started: now,
                members,
                state: rx,
            },
        );
        Some(tx)
    }

    /// Forgets `group`'s read: a commit for it passed, or its leader's SyncGroup failed.
    pub fn drop_group(&self, group: &str) {
        if let Ok(mut g) = self.groups.lock() {
            g.remove(group);
        }
    }

    /// `member`'s SyncGroup answer (no error, generation `generation`) passed on connection
    /// `conn`.
    pub fn bind(&self, group: &str, generation: i32, member: &str, conn: u64, now: Instant) {
        let Ok(mut g) = self.groups.lock() else {
            return;
        };
        if let Some(r) = g.get_mut(group)
            && r.generation == generation
            && let Some(m) = r.members.get_mut(member)
        {
            m.bound = Some((conn, now));
        }
    }

    /// An OffsetFetch for `group` on connection `conn` asking for `wanted`: the read made for
    /// the member whose SyncGroup answer passed on `conn` within `BIND_TTL`, if `wanted` are
    /// all its partitions' (taken once: the member is forgotten).
    pub fn take(
        &self,
        group: &str,
        conn: u64,
        wanted: &[(String, i32)],
        now: Instant,
    ) -> Option<Taken> {
        let mut g = self.groups.lock().ok()?;
        let r = g.get_mut(group)?;
        let member = r.members.iter().find_map(|(id, m)| {
            m.bound
                .is_some_and(|(c, at)| c == conn && now.saturating_duration_since(at) < BIND_TTL)
                .then(|| id.clone())
        })?;
        let m = r.members.remove(&member)?;
        if wanted.is_empty() || !wanted.iter().all(|w| m.parts.contains(w)) {
            return None;
        }
        Some(Taken {
            state: r.state.clone(),
        })
    }

    /// Groups with a read held.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.groups.lock().map(|g| g.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(ps: &[i32]) -> Vec<(String, i32)> {
        ps.iter().map(|p| ("t".to_string(), *p)).collect()
    }

    fn two_members() -> HashMap<String, Vec<(String, i32)>> {
        HashMap::from([("a".into(), parts(&[0, 1])), ("b".into(), parts(&[2]))])
    }

    #[test]
    fn a_member_bound_by_its_sync_answer_takes_its_read_once() {
        let o = OffsetsAhead::default();
        let t0 = Instant::now();
        let _tx = o.begin("g", 5, two_members(), t0).unwrap();
        // Not bound yet: forwarded.
        assert!(o.take("g", 7, &parts(&[0]), t0).is_none());
        o.bind("g", 5, "a", 7, t0);
        // Another connection, or partitions that are not the member's: forwarded.
        assert!(o.take("g", 8, &parts(&[0]), t0).is_none());
        assert!(o.take("g", 7, &parts(&[0, 2]), t0).is_none());
        // The miss above used the member's read up: it is not tried again.
        assert!(o.take("g", 7, &parts(&[0, 1]), t0).is_none());
        o.bind("g", 5, "b", 9, t0);
        assert!(o.take("g", 9, &parts(&[2]), t0).is_some());
        assert!(o.take("g", 9, &parts(&[2]), t0).is_none(), "used once");
    }

    #[test]
    fn another_generation_a_late_ask_or_a_commit_leaves_the_ask_to_kafka() {
        let o = OffsetsAhead::default();
        let t0 = Instant::now();
        let _tx = o.begin("g", 5, two_members(), t0).unwrap();
        o.bind("g", 6, "a", 7, t0);
        assert!(o.take("g", 7, &parts(&[0]), t0).is_none(), "generation");
        o.bind("g", 5, "b", 9, t0);
        assert!(
            o.take("g", 9, &parts(&[2]), t0 + BIND_TTL).is_none(),
            "asked too late"
        );
        let _tx = o.begin("g", 6, two_members(), t0).unwrap();
        o.bind("g", 6, "a", 7, t0);
        o.drop_group("g");
        assert!(
            o.take("g", 7, &parts(&[0]), t0).is_none(),
            "a commit passed"
        );
        assert_eq!(o.held(), 0);
    }

    #[test]
    fn old_reads_are_swept_when_new_ones_begin() {
        let o = OffsetsAhead::default();
        let t0 = Instant::now();
        let _a = o.begin("g1", 1, two_members(), t0).unwrap();
        let _b = o.begin("g2", 1, two_members(), t0 + READ_TTL).unwrap();
        assert_eq!(o.held(), 1);
    }
}
