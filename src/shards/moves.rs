//! Replica moves of pool partitions (AlterPartitionReassignments), as the shard map records
//! them: the record is written before anything is asked of Kafka and removed once Kafka runs
//! nothing for the partition and shardgate's throttles are gone, so whichever instance leads
//! next finds every move under way and finishes or cancels it. Pure: what a move is, the
//! throttle entries it sets, and what Kafka's state says about it (`judge`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveKind {
    /// A partition no active shard writes to: nothing (or little) to copy; a split can then
    /// land on the target broker.
    Idle,
    /// A partition an active shard writes to: its data is copied under the throttle.
    Active,
}

impl MoveKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MoveKind::Idle => "idle",
            MoveKind::Active => "active",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub partition: i32,
    /// The topic's id when the move began: a topic deleted and created again under the same
    /// name has another, and its configs are not ours to touch.
    pub topic_id: String,
    /// Replicas before, preferred (leader) first.
    pub from: Vec<i32>,
    /// Replicas asked for, the new leader first; as many as `from` (never an RF change).
    pub to: Vec<i32>,
    pub kind: MoveKind,
    /// "split_placement", "balance" or "api".
    pub reason: String,
    /// Node id of the leader instance driving it (the one that started it, or the one that
    /// took it over): an instance that lost leadership cancels only the moves it still owns,
    /// never one a newer leader adopted meanwhile.
    #[serde(default)]
    pub owner: i32,
    /// Wall clock (ms since the epoch): survives a change of leader instance.
    pub started_at_ms: u64,
    /// The leader's log size when the move began.
    pub bytes: i64,
    /// While the leader changes under an active move, writers send acks=all for this
    /// partition: a record the old leader acknowledged alone could be lost at the switch.
    pub acks_all: bool,
    /// The replication throttle shardgate set for this move (None: not throttled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<Throttle>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Throttle {
    pub rate: u64,
    /// Brokers whose `leader/follower.replication.throttled.rate` shardgate set (brokers where
    /// an operator set a rate keep theirs: never set, never deleted by shardgate).
    pub rate_brokers: Vec<i32>,
    /// `leader.replication.throttled.replicas` entries ("partition:broker") for the replicas
    /// copied from.
    pub leader_replicas: Vec<String>,
    /// `follower.replication.throttled.replicas` entries for the new replicas.
    pub follower_replicas: Vec<String>,
}

impl Throttle {
    /// The throttle of a move of `partition` from `from` to `to` at `rate`, setting the rate
    /// on the brokers of both sides except `operator_rates` (brokers with a rate of their own).
    pub fn new(
        partition: i32,
        from: &[i32],
        to: &[i32],
        rate: u64,
        operator_rates: &[i32],
    ) -> Self {
        let mut rate_brokers: Vec<i32> = from
            .iter()
            .chain(to)
            .copied()
            .filter(|b| !operator_rates.contains(b))
            .collect();
        rate_brokers.sort_unstable();
        rate_brokers.dedup();
        Self {
            rate,
            rate_brokers,
            leader_replicas: from.iter().map(|b| format!("{partition}:{b}")).collect(),
            follower_replicas: to
                .iter()
                .filter(|b| !from.contains(b))
                .map(|b| format!("{partition}:{b}"))
                .collect(),
        }
    }
}

/// What Kafka's state says about a recorded move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Kafka is copying towards the target.
    Running,
    /// Nothing runs and the replicas are the target's.
    Done,
    /// Nothing runs and the replicas are still the old ones: it never started or was
    /// cancelled (by shardgate, or by an operator).
    Gone,
    /// The topic is gone, or was created again (another id).
    TopicDeleted,
    /// A reassignment towards something else runs (an operator's).
    Replaced,
    /// Neither: metadata may lag behind a reassignment that just finished; looked at again.
    Unknown,
}

/// Judges a move from ListPartitionReassignments (`listed`: the replica set Kafka reports
/// for the partition while a reassignment runs, None when none runs) and the topology (the
/// topic's current id and the partition's replicas, None when the topic is unknown).
pub fn judge(m: &Move, listed: Option<&[i32]>, current: Option<(&str, &[i32])>) -> Verdict {
    let Some((id, replicas)) = current else {
        return Verdict::TopicDeleted;
    };
    if id != m.topic_id {
        return Verdict::TopicDeleted;
    }
    let same = |a: &[i32], b: &[i32]| {
        let (mut a, mut b) = (a.to_vec(), b.to_vec());
        a.sort_unstable();
        b.sort_unstable();
        a == b
    };
    if let Some(listed) = listed {
        // While it runs Kafka lists the union of old and new replicas.
        return if m.to.iter().all(|b| listed.contains(b)) {
            Verdict::Running
        } else {
            Verdict::Replaced
        };
    }
    if same(replicas, &m.to) {
        Verdict::Done
    } else if same(replicas, &m.from) {
        Verdict::Gone
    } else {
        Verdict::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mv() -> Move {
        Move {
            partition: 3,
            topic_id: "id-1".into(),
            from: vec![1],
            to: vec![2],
            kind: MoveKind::Active,
            reason: "balance".into(),
            owner: 1,
            started_at_ms: 0,
            bytes: 0,
            acks_all: true,
            throttle: None,
        }
    }

    #[test]
    fn kafka_state_decides_what_a_move_is() {
        let m = mv();
        assert_eq!(judge(&m, None, None), Verdict::TopicDeleted);
        assert_eq!(judge(&m, None, Some(("id-2", &[2]))), Verdict::TopicDeleted);
        assert_eq!(
            judge(&m, Some(&[1, 2]), Some(("id-1", &[1, 2]))),
            Verdict::Running
        );
        assert_eq!(
            judge(&m, Some(&[1, 3]), Some(("id-1", &[1, 3]))),
            Verdict::Replaced
        );
        assert_eq!(judge(&m, None, Some(("id-1", &[2]))), Verdict::Done);
        assert_eq!(judge(&m, None, Some(("id-1", &[1]))), Verdict::Gone);
        assert_eq!(judge(&m, None, Some(("id-1", &[1, 2]))), Verdict::Unknown);
        // Replica order does not matter for done (the election puts the leader first).
        let m = Move {
            from: vec![1, 2],
            to: vec![3, 2],
            ..mv()
        };
        assert_eq!(judge(&m, None, Some(("id-1", &[2, 3]))), Verdict::Done);
    }

    #[test]
    fn the_throttle_names_old_replicas_as_leaders_and_new_ones_as_followers() {
        let t = Throttle::new(3, &[1, 2], &[3, 2], 1000, &[]);
        assert_eq!(t.rate_brokers, vec![1, 2, 3]);
        assert_eq!(t.leader_replicas, vec!["3:1", "3:2"]);
        assert_eq!(t.follower_replicas, vec!["3:3"]);
        // A broker with an operator's rate keeps it.
        let t = Throttle::new(0, &[1], &[2], 1000, &[2]);
        assert_eq!(t.rate_brokers, vec![1]);
    }
}
