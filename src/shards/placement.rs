//! Where shards live: which idle partition a split takes, and which leadership moves spread
//! active shards across brokers. Pure functions over what the topology and the consumer
//! groups show; the controller carries the decisions out (ElectLeaders after reordering
//! replicas with AlterPartitionReassignments).

use std::collections::{BTreeMap, HashMap};

/// What placement sees of one pool partition.
#[derive(Debug, Clone, Default)]
pub struct PartitionView {
    pub leader: Option<i32>,
    pub isr: Vec<i32>,
    /// Active shards held by the consumer (group member) this partition is assigned to, the
    /// largest over groups; 0 when no group assigned it.
    pub consumer_load: usize,
}

/// The idle partition for a new shard: least loaded leader broker plus consumer first
/// (load = active shards of the topic), lowest partition number on ties.
pub fn pick_idle(idle: &[i32], active: &[i32], view: &HashMap<i32, PartitionView>) -> Option<i32> {
    let broker_load = broker_load(active, view);
    idle.iter().copied().min_by_key(|p| {
        let v = view.get(p).cloned().unwrap_or_default();
        let leader = v
            .leader
            .map(|l| broker_load.get(&l).copied().unwrap_or(0))
            .unwrap_or(usize::MAX / 2);
        (leader + v.consumer_load, *p)
    })
}

fn broker_load(active: &[i32], view: &HashMap<i32, PartitionView>) -> BTreeMap<i32, usize> {
    let mut load = BTreeMap::new();
    for p in active {
        if let Some(l) = view.get(p).and_then(|v| v.leader) {
            *load.entry(l).or_insert(0) += 1;
        }
    }
    load
}

/// One leadership move that narrows the spread of active shards over `brokers`: a partition
/// on the busiest broker whose in-sync replicas include a broker with at least two fewer
/// active shards. None when balanced (max − min ≤ 1) or no in-sync replica can take one.
pub fn leader_move(
    active: &[i32],
    view: &HashMap<i32, PartitionView>,
    brokers: &[i32],
) -> Option<(i32, i32)> {
    let mut load = broker_load(active, view);
    for b in brokers {
        load.entry(*b).or_insert(0);
    }
    let mut by_load: Vec<(usize, i32)> = load.iter().map(|(b, n)| (*n, *b)).collect();
    by_load.sort();
    let (max, busiest) = *by_load.last()?;
    let mut candidates: Vec<i32> = active
        .iter()
        .copied()
        .filter(|p| view.get(p).and_then(|v| v.leader) == Some(busiest))
        .collect();
    candidates.sort();
    for p in candidates {
        let isr = &view[&p].isr;
        // The least loaded in-sync replica that gains from the move.
        if let Some((n, to)) = by_load
            .iter()
            .copied()
            .filter(|(_, b)| *b != busiest && isr.contains(b))
            .min()
            && n + 2 <= max
        {
            return Some((p, to));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(parts: &[(i32, i32, &[i32])]) -> HashMap<i32, PartitionView> {
        parts
            .iter()
            .map(|(p, l, isr)| {
                (
                    *p,
                    PartitionView {
                        leader: Some(*l),
                        isr: isr.to_vec(),
                        consumer_load: 0,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn shards_piled_on_one_broker_move_to_in_sync_replicas_elsewhere() {
        let v = view(&[(0, 1, &[1, 2, 3]), (1, 1, &[1, 2, 3]), (2, 1, &[1, 2, 3])]);
        assert_eq!(leader_move(&[0, 1, 2], &v, &[1, 2, 3]), Some((0, 2)));
        // Balanced: nothing to do.
        let v = view(&[(0, 1, &[1, 2]), (1, 2, &[1, 2]), (2, 3, &[3, 1])]);
        assert_eq!(leader_move(&[0, 1, 2], &v, &[1, 2, 3]), None);
        // Off by one is balanced enough.
        let v = view(&[(0, 1, &[1, 2]), (1, 1, &[1, 2]), (2, 2, &[1, 2])]);
        assert_eq!(leader_move(&[0, 1, 2], &v, &[1, 2]), None);
        // The idle broker is not in sync for these partitions: no move.
        let v = view(&[(0, 1, &[1, 2]), (1, 1, &[1, 2]), (2, 2, &[2, 1])]);
        assert_eq!(leader_move(&[0, 1, 2], &v, &[1, 2, 3]), None);
    }

    #[test]
    fn splits_take_the_partition_with_the_least_loaded_leader_and_consumer() {
        let mut v = view(&[
            (0, 1, &[1]),
            (1, 2, &[2]),
            (2, 1, &[1]),
            (3, 2, &[2]),
            (4, 3, &[3]),
        ]);
        assert_eq!(pick_idle(&[2, 3, 4], &[0, 1], &v), Some(4));
        // Partition 4's consumer already holds two active shards: 3 (broker 2 has one) ties
        // with 2 (broker 1 has one), the lower number wins.
        v.get_mut(&4).unwrap().consumer_load = 2;
        assert_eq!(pick_idle(&[2, 3, 4], &[0, 1], &v), Some(2));
        assert_eq!(pick_idle(&[], &[0, 1], &v), None);
    }
}
