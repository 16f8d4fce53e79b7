//! The shard maps this instance routes with: one `Arc` snapshot per managed topic, swapped
//! atomically when the controller (or a store watch) installs a new epoch. The produce path
//! reads them without locking; it also leaves two traces the controller needs: how many
//! produce requests are still in flight per map epoch (the seal protocol waits for those of the
//! old epoch), and a sample of recent routing hashes per topic (for split points and hot keys).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::{Shard, ShardMap, ShardState, TopicConfig};

pub struct Managed {
    pub config: TopicConfig,
    pub map: ShardMap,
    /// Active shards sorted by range start, for binary search.
    active: Vec<Shard>,
}

impl Managed {
    pub fn new(config: TopicConfig, map: ShardMap) -> Self {
        let mut active: Vec<Shard> = map
            .shards
            .iter()
            .filter(|s| s.state == ShardState::Active)
            .cloned()
            .collect();
        active.sort_by_key(|s| s.start);
        Self {
            config,
            map,
            active,
        }
    }

    pub fn route(&self, hash: u64) -> &Shard {
        let i = self.active.partition_point(|s| s.start <= hash as u128);
        &self.active[i.saturating_sub(1)]
    }

    pub fn active(&self) -> &[Shard] {
        &self.active
    }
}

const SAMPLES: usize = 8192;

#[derive(Default)]
pub struct Registry {
    topics: ArcSwap<HashMap<String, Arc<Managed>>>,
    inflight: Arc<Mutex<HashMap<(String, u64), usize>>>,
    samples: Mutex<HashMap<String, VecDeque<u64>>>,
    spread: AtomicU64,
    /// Topics whose pool grew recently: (new pool, when), and the client connections already
    /// nudged to refresh metadata for that growth.
    grown: Mutex<HashMap<String, (i32, Instant)>>,
    /// Wall-clock ms of the latest growth (0: none), so the fetch path can skip the nudge
    /// bookkeeping without a lock or an allocation.
    last_growth_ms: AtomicU64,
    nudged: Mutex<HashSet<(String, String, i32)>>,
    /// Set once the stored maps are loaded: until then managed topics are unknown, so produce
    /// requests to them must wait rather than pass through unrouted.
    loaded: std::sync::atomic::AtomicBool,
}

/// How long after a pool growth fetches of the topic nudge clients to refresh metadata.
pub const NUDGE_WINDOW: Duration = Duration::from_secs(120);

/// Counts a produce request as in flight under one map epoch until dropped.
pub struct InflightGuard {
    counts: Arc<Mutex<HashMap<(String, u64), usize>>>,
    key: (String, u64),
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let mut m = self.counts.lock().expect("inflight lock");
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

impl Registry {
    /// Whether the stored maps are loaded (before that, no topic is known to be managed).
    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    pub fn mark_loaded(&self) {
        self.loaded.store(true, Ordering::Release);
    }

    pub fn get(&self, topic: &str) -> Option<Arc<Managed>> {
        self.topics.load().get(topic).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Managed>> {
        let mut v: Vec<_> = self.topics.load().values().cloned().collect();
        v.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        v
    }

    pub fn is_managed(&self, topic: &str) -> bool {
        self.topics.load().contains_key(topic)
    }

    /// Installs a map unless an equal or newer epoch is already installed.
    pub fn install(&self, config: TopicConfig, map: ShardMap) -> bool {
        let cur = self.topics.load();
        if let Some(m) = cur.get(&config.name)
            && m.map.epoch >= map.epoch
            && m.config == config
        {
            return false;
        }
        if let Some(m) = cur.get(&config.name)
            && map.pool > m.map.pool
        {
            self.grown
                .lock()
                .expect("grown")
                .insert(config.name.clone(), (map.pool, Instant::now()));
            self.last_growth_ms
                .store(now_ms().max(1), Ordering::Relaxed);
            self.nudged
                .lock()
                .expect("nudged")
                .retain(|(_, t, _)| *t != config.name);
        }
        let mut next = (**cur).clone();
        next.insert(config.name.clone(), Arc::new(Managed::new(config, map)));
        self.topics.store(Arc::new(next));
        true
    }

    /// Whether connection `conn` should be told to refresh its metadata of `topic` (its pool
    /// grew and this connection was not told yet). Once per connection and growth.
    pub fn nudge(&self, topic: &str, conn: u64) -> bool {
        self.any_recent_growth() && self.nudge_once(topic, format!("conn {conn}"))
    }

    fn any_recent_growth(&self) -> bool {
        let last = self.last_growth_ms.load(Ordering::Relaxed);
        last != 0 && now_ms().saturating_sub(last) <= NUDGE_WINDOW.as_millis() as u64
    }

    /// Topics whose pool grew within the nudge window.
    pub fn recently_grown(&self) -> Vec<String> {
        if !self.any_recent_growth() {
            return vec![];
        }
        self.grown
            .lock()
            .expect("grown")
            .iter()
            .filter(|(_, (_, when))| when.elapsed() <= NUDGE_WINDOW)
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// Once per `who` (a connection, a group member) and growth of `topic`'s pool.
    pub fn nudge_once(&self, topic: &str, who: String) -> bool {
        let Some((pool, when)) = self.grown.lock().expect("grown").get(topic).copied() else {
            return false;
        };
        if when.elapsed() > NUDGE_WINDOW {
            return false;
        }
        self.nudged
            .lock()
            .expect("nudged")
            .insert((who, topic.to_string(), pool))
    }

    pub fn enter(&self, topic: &str, epoch: u64) -> InflightGuard {
        let key = (topic.to_string(), epoch);
        *self
            .inflight
            .lock()
            .expect("inflight lock")
            .entry(key.clone())
            .or_default() += 1;
        InflightGuard {
            counts: self.inflight.clone(),
            key,
        }
    }

    /// Produce requests of `topic` still in flight under an epoch older than `epoch`.
    pub fn inflight_before(&self, topic: &str, epoch: u64) -> usize {
        self.inflight
            .lock()
            .expect("inflight lock")
            .iter()
            .filter(|((t, e), _)| t == topic && *e < epoch)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Remembers some routing hashes of a batch (bounded ring per topic).
    pub fn sample(&self, topic: &str, hashes: &[u64]) {
        if hashes.is_empty() {
            return;
        }
        let mut m = self.samples.lock().expect("samples lock");
        let ring = m.entry(topic.to_string()).or_default();
        // At most 64 samples per batch keep the lock short for big batches.
        let step = hashes.len().div_ceil(64);
        for h in hashes.iter().step_by(step) {
            if ring.len() == SAMPLES {
                ring.pop_front();
            }
            ring.push_back(*h);
        }
    }

    /// Sampled hashes inside `[start, end)`.
    pub fn samples_in(&self, topic: &str, start: u128, end: u128) -> Vec<u64> {
        let m = self.samples.lock().expect("samples lock");
        m.get(topic)
            .map(|r| {
                r.iter()
                    .copied()
                    .filter(|h| (*h as u128) >= start && (*h as u128) < end)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Next shard index for records that have no routing hash (sticky per batch).
    pub fn next_spread(&self) -> u64 {
        self.spread.fetch_add(1, Ordering::Relaxed)
    }
}

/// The split point that halves the observed load of `shard`: the median of its sampled
/// hashes, or the midpoint without samples. Always strictly inside the shard.
pub fn weighted_median(samples: &mut [u64], shard: &Shard) -> u128 {
    let mid = shard.start + (shard.end - shard.start) / 2;
    if samples.len() < 2 {
        return mid;
    }
    samples.sort_unstable();
    let m = samples[samples.len() / 2] as u128;
    if m <= shard.start || m >= shard.end {
        mid
    } else {
        m
    }
}

/// The most frequent sampled hash and its share of the samples.
pub fn hottest(samples: &[u64]) -> Option<(u64, f64)> {
    let mut counts: HashMap<u64, usize> = HashMap::new();
    for h in samples {
        *counts.entry(*h).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(h, n)| (h, n as f64 / samples.len() as f64))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_median_splits_skewed_load_into_equal_halves() {
        let m = ShardMap::initial("t", 1, 4).unwrap();
        let s = m.shard(0).unwrap().clone();
        // 90% of the traffic in the lowest 1% of the space.
        let mut samples: Vec<u64> = (0..900)
            .map(|i| i * 1000)
            .chain((0..100).map(|i| u64::MAX / 100 * i))
            .collect();
        let at = weighted_median(&mut samples, &s);
        let below = samples.iter().filter(|h| (**h as u128) < at).count();
        assert!(
            (450..=550).contains(&below),
            "{below} of 1000 below the split point"
        );
        assert_eq!(weighted_median(&mut [], &s), s.end / 2);
    }

    #[test]
    fn inflight_counts_follow_guards() {
        let r = Registry::default();
        let g1 = r.enter("t", 3);
        let g2 = r.enter("t", 4);
        assert_eq!(r.inflight_before("t", 4), 1);
        assert_eq!(r.inflight_before("t", 5), 2);
        drop(g1);
        assert_eq!(r.inflight_before("t", 4), 0);
        drop(g2);
        assert_eq!(r.inflight_before("t", 9), 0);
    }

    #[test]
    fn hottest_key_share() {
        let samples = [1, 1, 1, 2, 3];
        assert_eq!(hottest(&samples), Some((1, 0.6)));
    }
}
