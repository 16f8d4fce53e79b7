//! Where shards live: which idle partition a split takes, which leadership moves spread
//! active shards across brokers, and, when leadership cannot, which replicas move between
//! brokers (idle partitions first: nothing to copy). Pure functions over what the topology,
//! the consumer groups and the autoscaler's samples show; the controller carries the
//! decisions out (`controller/balance.rs`, `controller/reassign.rs`).

use std::collections::{BTreeMap, HashMap};

/// What placement sees of one pool partition.
#[derive(Debug, Clone, Default)]
pub struct PartitionView {
    pub leader: Option<i32>,
    /// Replicas, preferred leader first.
    pub replicas: Vec<i32>,
    pub isr: Vec<i32>,
    /// Active shards held by the consumer (group member) this partition is assigned to, the
    /// largest over groups; 0 when no group assigned it.
    pub consumer_load: usize,
}

/// The idle partition for a new shard: least loaded leader broker plus consumer first,
/// lowest partition number on ties. Broker load is the sum of `weights` of the active shards
/// it leads (a shard without a weight counts 1: with no samples, the count of active shards).
pub fn pick_idle(
    idle: &[i32],
    active: &[i32],
    view: &HashMap<i32, PartitionView>,
    weights: &HashMap<i32, f64>,
) -> Option<i32> {
    let loads = broker_loads(active, view, weights, &[]);
    idle.iter().copied().min_by(|a, b| {
        let key = |p: &i32| {
            let v = view.get(p).cloned().unwrap_or_default();
            let leader = v
                .leader
                .map(|l| loads.get(&l).copied().unwrap_or(0.0))
                .unwrap_or(f64::MAX / 4.0);
            leader + v.consumer_load as f64
        };
        key(a).total_cmp(&key(b)).then(a.cmp(b))
    })
}

/// Load per broker: the sum of `weights` (1 when absent) of the active shards it leads;
/// every broker of `brokers` is listed (0 when it leads none).
pub fn broker_loads(
    active: &[i32],
    view: &HashMap<i32, PartitionView>,
    weights: &HashMap<i32, f64>,
    brokers: &[i32],
) -> BTreeMap<i32, f64> {
    let mut load: BTreeMap<i32, f64> = brokers.iter().map(|b| (*b, 0.0)).collect();
    for p in active {
        if let Some(l) = view.get(p).and_then(|v| v.leader) {
            *load.entry(l).or_insert(0.0) += weights.get(p).copied().unwrap_or(1.0);
        }
    }
    load
}

/// The busiest broker's load over the mean (1 when nothing is loaded).
pub fn imbalance(loads: &BTreeMap<i32, f64>) -> f64 {
    let total: f64 = loads.values().sum();
    if loads.is_empty() || total <= 0.0 {
        return 1.0;
    }
    let max = loads.values().copied().fold(0.0, f64::max);
    max / (total / loads.len() as f64)
}

/// Brokers from least to most loaded (ties: lower id first).
fn by_load(loads: &BTreeMap<i32, f64>) -> Vec<(f64, i32)> {
    let mut v: Vec<(f64, i32)> = loads.iter().map(|(b, l)| (*l, *b)).collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    v
}

fn in_sync(v: &PartitionView) -> bool {
    let (mut r, mut i) = (v.replicas.clone(), v.isr.clone());
    r.sort_unstable();
    i.sort_unstable();
    !r.is_empty() && r == i
}

/// The replicas of a partition moved so that `to` leads: `to` first, the old leader's
/// replica given up, the others kept (same replication factor).
pub fn replaced(v: &PartitionView, to: i32) -> Vec<i32> {
    let leader = v.leader.or_else(|| v.replicas.first().copied());
    let mut out = vec![to];
    out.extend(
        v.replicas
            .iter()
            .copied()
            .filter(|b| Some(*b) != leader && *b != to),
    );
    out
}

/// An idle partition to move onto the least loaded broker that leads no idle partition (so
/// the next split can land there without copying anything): from the broker leading the
/// most idle partitions, an in-sync one, the lowest number. None when the least loaded
/// broker has an idle partition already, or none can move there.
pub fn idle_move(
    idle: &[i32],
    view: &HashMap<i32, PartitionView>,
    loads: &BTreeMap<i32, f64>,
) -> Option<(i32, Vec<i32>)> {
    let leads_idle = |b: i32| {
        idle.iter()
            .filter(|p| view.get(p).and_then(|v| v.leader) == Some(b))
            .count()
    };
    let (_, target) = *by_load(loads).first()?;
    if leads_idle(target) > 0 {
        return None;
    }
    let mut candidates: Vec<(usize, i32)> = idle
        .iter()
        .copied()
        .filter_map(|p| {
            let v = view.get(&p)?;
            let leader = v.leader?;
            (leader != target && !v.replicas.contains(&target) && in_sync(v))
                .then(|| (leads_idle(leader), p))
        })
        .collect();
    // Most idle partitions on the source first, then the lowest number.
    candidates.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let (_, p) = *candidates.first()?;
    Some((p, replaced(&view[&p], target)))
}

/// An active shard's partition to move from the busiest broker to the least loaded one
/// (whose replicas do not include it), the one that leaves the larger of the two loads
/// smallest; only a move that lowers the busiest broker's load without making the target
/// busier than it was. `shard_load`: each active partition's load.
pub fn active_move(
    active: &[i32],
    view: &HashMap<i32, PartitionView>,
    shard_load: &HashMap<i32, f64>,
    loads: &BTreeMap<i32, f64>,
) -> Option<(i32, Vec<i32>)> {
    let order = by_load(loads);
    let (low, target) = *order.first()?;
    let (high, busiest) = *order.last()?;
    let mut best: Option<(f64, i32)> = None;
    for p in active {
        let Some(v) = view.get(p) else { continue };
        if v.leader != Some(busiest) || v.replicas.contains(&target) || !in_sync(v) {
            continue;
        }
        let l = shard_load.get(p).copied().unwrap_or(0.0);
        if l <= 0.0 || low + l >= high {
            continue;
        }
        let worst = (high - l).max(low + l);
        if best.is_none_or(|(w, q)| worst < w || (worst == w && *p < q)) {
            best = Some((worst, *p));
        }
    }
    let (_, p) = best?;
    Some((p, replaced(&view[&p], target)))
}

/// Where a split should go: an idle partition the least loaded broker leads (`Take`), or,
/// when the best idle partition sits on a broker busier than the least loaded one by more
/// than half the splitting shard's load, that broker's idle partition to move there first.
#[derive(Debug, Clone, PartialEq)]
pub enum SplitPlan {
    Take(i32),
    MoveFirst { partition: i32, to: Vec<i32> },
}

pub fn split_plan(
    idle: &[i32],
    view: &HashMap<i32, PartitionView>,
    loads: &BTreeMap<i32, f64>,
    shard_load: f64,
) -> Option<SplitPlan> {
    let order = by_load(loads);
    let (low, _) = *order.first()?;
    let leader_load = |p: &i32| {
        view.get(p)
            .and_then(|v| v.leader)
            .and_then(|l| loads.get(&l).copied())
            .unwrap_or(f64::MAX / 4.0)
    };
    let best = idle
        .iter()
        .copied()
        .min_by(|a, b| leader_load(a).total_cmp(&leader_load(b)).then(a.cmp(b)))?;
    if leader_load(&best) > low + shard_load / 2.0
        && let Some((partition, to)) = idle_move(idle, view, loads)
    {
        return Some(SplitPlan::MoveFirst { partition, to });
    }
    Some(SplitPlan::Take(best))
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
                        replicas: isr.to_vec(),
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
        let none = HashMap::new();
        assert_eq!(pick_idle(&[2, 3, 4], &[0, 1], &v, &none), Some(4));
        // Partition 4's consumer already holds two active shards: 3 (broker 2 has one) ties
        // with 2 (broker 1 has one), the lower number wins.
        v.get_mut(&4).unwrap().consumer_load = 2;
        assert_eq!(pick_idle(&[2, 3, 4], &[0, 1], &v, &none), Some(2));
        assert_eq!(pick_idle(&[], &[0, 1], &v, &none), None);
        // With loads: broker 1's shard is cold, broker 2's hot: broker 1's partition wins.
        let w = HashMap::from([(0, 0.1), (1, 3.0)]);
        assert_eq!(pick_idle(&[2, 3], &[0, 1], &v, &w), Some(2));
    }

    #[test]
    fn an_idle_partition_moves_to_the_least_loaded_broker_without_one() {
        // RF1, everything on broker 1: shards 0-3 active, 4-11 idle.
        let parts: Vec<(i32, i32, &[i32])> = (0..12).map(|p| (p, 1, &[1][..])).collect();
        let v = view(&parts);
        let active = [0, 1, 2, 3];
        let idle: Vec<i32> = (4..12).collect();
        let w = HashMap::from([(0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0)]);
        let loads = broker_loads(&active, &v, &w, &[1, 2, 3]);
        assert_eq!(imbalance(&loads), 3.0);
        assert_eq!(idle_move(&idle, &v, &loads), Some((4, vec![2])));
        // A split of a shard on broker 1 waits for that move.
        assert_eq!(
            split_plan(&idle, &v, &loads, 1.0),
            Some(SplitPlan::MoveFirst {
                partition: 4,
                to: vec![2]
            })
        );
        // Once broker 2 leads an idle partition, broker 3 is next; then the split takes it.
        let mut v2 = v.clone();
        v2.get_mut(&4).unwrap().leader = Some(2);
        v2.get_mut(&4).unwrap().replicas = vec![2];
        v2.get_mut(&4).unwrap().isr = vec![2];
        // Broker 2 (the least loaded, with broker 3, lower id) has one now: the split takes it.
        assert_eq!(idle_move(&idle, &v2, &loads), None);
        assert_eq!(
            split_plan(&idle, &v2, &loads, 1.0),
            Some(SplitPlan::Take(4))
        );
        // Once a shard landed there, broker 3 is the least loaded: it gets the next one.
        let mut w2 = w.clone();
        w2.insert(4, 0.5);
        let loads2 = broker_loads(&[0, 1, 2, 3, 4], &v2, &w2, &[1, 2, 3]);
        let idle2: Vec<i32> = (5..12).collect();
        assert_eq!(idle_move(&idle2, &v2, &loads2), Some((5, vec![3])));
        // Out of sync partitions do not move.
        let mut v3 = v.clone();
        for p in 4..12 {
            v3.get_mut(&p).unwrap().isr = vec![];
        }
        assert_eq!(idle_move(&idle, &v3, &loads), None);
    }

    #[test]
    fn an_active_move_lowers_the_busiest_broker_and_never_overshoots() {
        // Broker 1 leads four shards of 1.0, broker 2 and 3 one of 2.0 each: 4/2/2.
        let v = view(&[
            (0, 1, &[1]),
            (1, 1, &[1]),
            (2, 1, &[1]),
            (3, 1, &[1]),
            (4, 2, &[2]),
            (5, 3, &[3]),
        ]);
        let w = HashMap::from([(0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0)]);
        let active = [0, 1, 2, 3, 4, 5];
        let loads = broker_loads(&active, &v, &w, &[1, 2, 3]);
        assert_eq!(active_move(&active, &v, &w, &loads), Some((0, vec![2])));
        // 3/3/2 after it: moving a 1.0 from a 3 onto the 2 gives 2/3/3, no gain: none.
        let mut v2 = v.clone();
        v2.get_mut(&0).unwrap().leader = Some(2);
        v2.get_mut(&0).unwrap().replicas = vec![2];
        v2.get_mut(&0).unwrap().isr = vec![2];
        let loads = broker_loads(&active, &v2, &w, &[1, 2, 3]);
        assert_eq!(active_move(&active, &v2, &w, &loads), None);
        // RF3 replicas elsewhere: the replaced one is the leader's.
        let v = view(&[(0, 1, &[1, 2, 3])]);
        assert_eq!(replaced(&v[&0], 4), vec![4, 2, 3]);
    }
}
