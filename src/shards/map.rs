//! The shard map of one managed topic: contiguous ranges of the 64-bit hash space, each on one
//! partition of the upstream topic, plus the ordering gates that splits and merges leave.
//!
//! Vocabulary (as in Pravega/Kinesis): a *shard* covers `[start, end)`; a split or merge
//! *seals* shards and creates *children* whose `parents` are the sealed ones; every change
//! bumps the map's *epoch*. A *gate* holds back a partition's records from `from_offset` on
//! until its parent partitions are consumed up to their *seal offsets*.
//!
//! All operations are pure: they return a new map or an error and never touch the old one, so
//! a rejected request changes nothing.

use serde::{Deserialize, Serialize};

/// One past the last hash value: the exclusive end of the last shard.
pub const HASH_END: u128 = 1u128 << 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardState {
    Active,
    Sealed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub id: u32,
    #[serde(with = "u128_string")]
    pub start: u128,
    /// Exclusive; `HASH_END` for the last shard.
    #[serde(with = "u128_string")]
    pub end: u128,
    pub partition: i32,
    pub state: ShardState,
    pub parents: Vec<u32>,
    pub created_epoch: u64,
}

impl Shard {
    pub fn contains(&self, hash: u64) -> bool {
        (hash as u128) >= self.start && (hash as u128) < self.end
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateParent {
    pub partition: i32,
    /// End offset of the parent partition once every instance stopped routing to it; `None`
    /// while the seal protocol is still running (the gate is closed until then).
    pub seal_offset: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gate {
    pub partition: i32,
    /// First offset of the gated partition that belongs to the new routing; `None` until the
    /// controller has read it (records are held until then).
    pub from_offset: Option<i64>,
    pub after: Vec<GateParent>,
    pub created_epoch: u64,
    /// Wall-clock creation time (ms since the epoch), for the retention of gates.
    #[serde(default)]
    pub created_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMap {
    pub topic: String,
    pub epoch: u64,
    /// Fixed per topic forever: changing it would move every key.
    pub hash: String,
    pub pool: i32,
    pub next_id: u32,
    pub shards: Vec<Shard>,
    pub gates: Vec<Gate>,
    /// Replica moves under way (placement), written before Kafka is asked and removed once
    /// it is done; absent from the JSON when there are none (maps of older instances parse).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moves: Vec<super::moves::Move>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("shard {0} does not exist")]
    NoSuchShard(u32),
    #[error("shard {0} is sealed; only active shards can be split or merged")]
    Sealed(u32),
    #[error("split point {at} is not strictly inside shard {id} [{start}, {end})")]
    BadSplitPoint {
        id: u32,
        at: u128,
        start: u128,
        end: u128,
    },
    #[error("shards {0} and {1} are not adjacent")]
    NotAdjacent(u32, u32),
    #[error("no idle partition left in the pool of {0}; add partitions or merge shards")]
    PoolExhausted(i32),
    #[error("partition {0} still has an open gate or undrained parent; try again later")]
    PartitionBusy(i32),
    #[error("initial shard count {count} must be between 1 and the pool size {pool}")]
    BadInitial { count: u32, pool: i32 },
}

pub const HASH_XXH3: &str = "xxh3-64";

impl ShardMap {
    /// `count` equal shards on partitions 0..count of a pool of `pool` partitions.
    pub fn initial(topic: &str, count: u32, pool: i32) -> Result<Self, MapError> {
        if count == 0 || pool < 1 || count as i64 > pool as i64 {
            return Err(MapError::BadInitial { count, pool });
        }
        let width = HASH_END / count as u128;
        let shards = (0..count)
            .map(|i| Shard {
                id: i,
                start: width * i as u128,
                end: if i + 1 == count {
                    HASH_END
                } else {
                    width * (i as u128 + 1)
                },
                partition: i as i32,
                state: ShardState::Active,
                parents: vec![],
                created_epoch: 0,
            })
            .collect();
        Ok(Self {
            topic: topic.to_string(),
            epoch: 0,
            hash: HASH_XXH3.to_string(),
            pool,
            next_id: count,
            shards,
            gates: vec![],
            moves: vec![],
        })
    }

    /// Active shards sorted by range start.
    pub fn active(&self) -> Vec<&Shard> {
        let mut v: Vec<&Shard> = self
            .shards
            .iter()
            .filter(|s| s.state == ShardState::Active)
            .collect();
        v.sort_by_key(|s| s.start);
        v
    }

    /// The active shard whose range holds `hash` (binary search over range starts).
    pub fn route(&self, hash: u64) -> &Shard {
        let active = self.active();
        let h = hash as u128;
        let i = active.partition_point(|s| s.start <= h);
        // Coverage is an invariant: i >= 1 always, since the first active shard starts at 0.
        active[i.saturating_sub(1)]
    }

    pub fn shard(&self, id: u32) -> Result<&Shard, MapError> {
        self.shards
            .iter()
            .find(|s| s.id == id)
            .ok_or(MapError::NoSuchShard(id))
    }

    /// Partitions of the pool no active shard uses and no gate or unsealed parent still needs.
    pub fn idle_partitions(&self) -> Vec<i32> {
        (0..self.pool)
            .filter(|p| !self.partition_busy(*p))
            .collect()
    }

    fn partition_busy(&self, p: i32) -> bool {
        self.shards
            .iter()
            .any(|s| s.state == ShardState::Active && s.partition == p)
            || self
                .gates
                .iter()
                .any(|g| g.partition == p || g.after.iter().any(|a| a.partition == p))
    }

    /// Splits shard `id` at `at`: `[start, at)` stays on its partition (no key moves, no gate),
    /// `[at, end)` goes to `to_partition` behind a gate after the parent partition.
    pub fn split(&self, id: u32, at: u128, to_partition: i32) -> Result<ShardMap, MapError> {
        let parent = self.shard(id)?.clone();
        if parent.state != ShardState::Active {
            return Err(MapError::Sealed(id));
        }
        if at <= parent.start || at >= parent.end {
            return Err(MapError::BadSplitPoint {
                id,
                at,
                start: parent.start,
                end: parent.end,
            });
        }
        if !self.idle_partitions().contains(&to_partition) {
            return Err(MapError::PartitionBusy(to_partition));
        }
        let epoch = self.epoch + 1;
        let mut next = self.clone();
        next.epoch = epoch;
        let (low, high) = (next.next_id, next.next_id + 1);
        next.next_id += 2;
        for s in &mut next.shards {
            if s.id == id {
                s.state = ShardState::Sealed;
            }
        }
        next.shards.push(Shard {
            id: low,
            start: parent.start,
            end: at,
            partition: parent.partition,
            state: ShardState::Active,
            parents: vec![id],
            created_epoch: epoch,
        });
        next.shards.push(Shard {
            id: high,
            start: at,
            end: parent.end,
            partition: to_partition,
            state: ShardState::Active,
            parents: vec![id],
            created_epoch: epoch,
        });
        next.gates.push(Gate {
            partition: to_partition,
            from_offset: None,
            after: vec![GateParent {
                partition: parent.partition,
                seal_offset: None,
            }],
            created_epoch: epoch,
            created_at_ms: now_ms(),
        });
        Ok(next)
    }

    /// The same map over a larger pool (partitions were added upstream). No key moves.
    pub fn grow(&self, pool: i32) -> ShardMap {
        let mut next = self.clone();
        next.pool = self.pool.max(pool);
        next.epoch += 1;
        next
    }

    /// Merges adjacent active shards `a` and `b` onto the partition of the lower one; the
    /// upper one's keys move there behind a gate after its partition.
    pub fn merge(&self, a: u32, b: u32) -> Result<ShardMap, MapError> {
        let (sa, sb) = (self.shard(a)?.clone(), self.shard(b)?.clone());
        for s in [&sa, &sb] {
            if s.state != ShardState::Active {
                return Err(MapError::Sealed(s.id));
            }
        }
        let (lo, hi) = if sa.end == sb.start {
            (sa, sb)
        } else if sb.end == sa.start {
            (sb, sa)
        } else {
            return Err(MapError::NotAdjacent(a, b));
        };
        let epoch = self.epoch + 1;
        let mut next = self.clone();
        next.epoch = epoch;
        let id = next.next_id;
        next.next_id += 1;
        for s in &mut next.shards {
            if s.id == lo.id || s.id == hi.id {
                s.state = ShardState::Sealed;
            }
        }
        next.shards.push(Shard {
            id,
            start: lo.start,
            end: hi.end,
            partition: lo.partition,
            state: ShardState::Active,
            parents: vec![lo.id, hi.id],
            created_epoch: epoch,
        });
        next.gates.push(Gate {
            partition: lo.partition,
            from_offset: None,
            after: vec![GateParent {
                partition: hi.partition,
                seal_offset: None,
            }],
            created_epoch: epoch,
            created_at_ms: now_ms(),
        });
        Ok(next)
    }

    /// Checks the structural invariants; `Err` names the first one broken.
    pub fn check(&self) -> Result<(), String> {
        let active = self.active();
        let mut pos = 0u128;
        for s in &active {
            if s.start != pos {
                return Err(format!(
                    "gap or overlap at {pos}: shard {} starts at {}",
                    s.id, s.start
                ));
            }
            if s.end <= s.start {
                return Err(format!("shard {} is empty", s.id));
            }
            if !(0..self.pool).contains(&s.partition) {
                return Err(format!(
                    "shard {} on partition {} outside the pool",
                    s.id, s.partition
                ));
            }
            pos = s.end;
        }
        if pos != HASH_END {
            return Err(format!("hash space not covered: ends at {pos}"));
        }
        let mut parts: Vec<i32> = active.iter().map(|s| s.partition).collect();
        parts.sort();
        if parts.windows(2).any(|w| w[0] == w[1]) {
            return Err("two active shards share a partition".into());
        }
        Ok(())
    }

    /// Gates whose records may flow for everybody (seal protocol done and every parent
    /// drained is judged per consumer group elsewhere): here, gates still waiting for the
    /// seal protocol.
    pub fn sealing(&self) -> impl Iterator<Item = &Gate> {
        self.gates
            .iter()
            .filter(|g| g.from_offset.is_none() || g.after.iter().any(|a| a.seal_offset.is_none()))
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// u128 hash-space bounds as decimal strings in JSON (2^64 does not fit in a JSON number that
/// every client parses exactly).
mod u128_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        let s = String::deserialize(d)?;
        let v: u128 = s.parse().map_err(serde::de::Error::custom)?;
        if v > super::HASH_END {
            return Err(serde::de::Error::custom(format!(
                "{v} is beyond the hash space"
            )));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn initial_map_covers_the_hash_space_in_equal_parts() {
        let m = ShardMap::initial("t", 4, 32).unwrap();
        m.check().unwrap();
        assert_eq!(m.active().len(), 4);
        assert_eq!(m.route(0).id, 0);
        assert_eq!(m.route(u64::MAX).id, 3);
        assert_eq!(m.idle_partitions().len(), 28);
    }

    #[test]
    fn split_keeps_the_low_half_in_place_and_gates_the_high_half() {
        let m = ShardMap::initial("t", 1, 8).unwrap();
        let at = 1u128 << 63;
        let n = m.split(0, at, 5).unwrap();
        n.check().unwrap();
        assert_eq!(n.epoch, 1);
        assert_eq!(n.route(0).partition, 0);
        assert_eq!(n.route(u64::MAX).partition, 5);
        assert_eq!(n.gates.len(), 1);
        assert_eq!((n.gates[0].partition, n.gates[0].from_offset), (5, None));
        assert_eq!(
            n.gates[0].after,
            vec![GateParent {
                partition: 0,
                seal_offset: None
            }]
        );
        assert_eq!(m.epoch, 0, "the old map is untouched");
    }

    #[test]
    fn merge_reuses_the_lower_partition() {
        let m = ShardMap::initial("t", 2, 8).unwrap();
        let n = m.merge(1, 0).unwrap();
        n.check().unwrap();
        let merged = n.active()[0];
        assert_eq!(
            (merged.start, merged.end, merged.partition),
            (0, HASH_END, 0)
        );
        assert_eq!(n.gates[0].partition, 0);
        assert_eq!(n.gates[0].after[0].partition, 1);
    }

    #[test]
    fn bad_operations_are_refused() {
        let m = ShardMap::initial("t", 3, 4).unwrap();
        assert_eq!(m.merge(0, 2), Err(MapError::NotAdjacent(0, 2)));
        let s = m.shard(1).unwrap().clone();
        assert!(matches!(
            m.split(1, s.start, 3),
            Err(MapError::BadSplitPoint { .. })
        ));
        assert!(matches!(
            m.split(1, s.end, 3),
            Err(MapError::BadSplitPoint { .. })
        ));
        assert_eq!(m.split(1, s.start + 1, 0), Err(MapError::PartitionBusy(0)));
        assert_eq!(m.split(9, 1, 3), Err(MapError::NoSuchShard(9)));
        let n = m.split(1, s.start + 1, 3).unwrap();
        assert_eq!(n.split(1, s.start + 2, 3), Err(MapError::Sealed(1)));
        assert!(ShardMap::initial("t", 5, 4).is_err());
    }

    #[test]
    fn json_shape_uses_decimal_strings_for_bounds() {
        let m = ShardMap::initial("t", 1, 1).unwrap();
        let j = serde_json::to_value(&m).unwrap();
        assert_eq!(j["shards"][0]["start"], "0");
        assert_eq!(j["shards"][0]["end"], "18446744073709551616");
        let back: ShardMap = serde_json::from_value(j).unwrap();
        assert_eq!(back, m);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Split { pick: usize, frac: f64 },
        Merge { pick: usize },
        Drain,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<usize>(), 0.0f64..1.0).prop_map(|(pick, frac)| Op::Split { pick, frac }),
            any::<usize>().prop_map(|pick| Op::Merge { pick }),
            Just(Op::Drain),
        ]
    }

    proptest! {
        /// Through any sequence of splits and merges the active shards cover the hash space
        /// exactly once, and routing is a pure function of the map.
        #[test]
        fn active_shards_always_cover_the_hash_space_exactly_once(
            initial in 1u32..6,
            ops in proptest::collection::vec(op(), 0..60),
            probes in proptest::collection::vec(any::<u64>(), 1..20),
        ) {
            let mut m = ShardMap::initial("t", initial, 16).unwrap();
            for op in ops {
                let active: Vec<Shard> = m.active().into_iter().cloned().collect();
                let next = match op {
                    Op::Split { pick, frac } => {
                        let s = &active[pick % active.len()];
                        let at = s.start + ((s.end - s.start) as f64 * frac) as u128;
                        match m.idle_partitions().first() {
                            Some(&p) => m.split(s.id, at, p),
                            None => Err(MapError::PoolExhausted(16)),
                        }
                    }
                    Op::Merge { pick } if active.len() > 1 => {
                        let i = pick % (active.len() - 1);
                        m.merge(active[i].id, active[i + 1].id)
                    }
                    Op::Merge { .. } => Err(MapError::NotAdjacent(0, 0)),
                    // Gates retire as consumers drain; model it by dropping them.
                    Op::Drain => { let mut n = m.clone(); n.gates.clear(); Ok(n) }
                };
                match next {
                    Ok(n) => {
                        prop_assert!(n.check().is_ok(), "{:?}", n.check());
                        m = n;
                    }
                    Err(_) => prop_assert!(m.check().is_ok()),
                }
            }
            for h in probes {
                let s = m.route(h);
                prop_assert!(s.contains(h));
                prop_assert_eq!(s.id, m.clone().route(h).id);
                prop_assert_eq!(m.active().iter().filter(|a| a.contains(h)).count(), 1);
            }
        }
    }
}
