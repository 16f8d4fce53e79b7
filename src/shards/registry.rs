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
    loaded_now: tokio::sync::Notify,
    /// Fencing (stores with sessions, several instances): an instance whose store session
    /// may have been lost (it was stopped or stalled past the limit, or the store replaced its
    /// session) writes no managed record until it has re-read the maps: the others may have
    /// split and sealed without it.
    fencing: std::sync::atomic::AtomicBool,
    session_lost: std::sync::atomic::AtomicBool,
    /// Raised-fence count: a job routed under an older generation may carry a stale map.
    fence_gen: AtomicU64,
    /// Serialises raising and lifting the fence (cold paths), so a raise is never undone by
    /// a lift that checked the generation before it.
    fence_lock: Mutex<()>,
    unfenced_now: tokio::sync::Notify,
    /// `monotonic_ms` of the last heartbeat, and the gap that counts as a stall.
    last_heartbeat_ms: AtomicU64,
    stall_limit_ms: AtomicU64,
}

/// Milliseconds on a monotonic clock that keeps running while the process is stopped
/// (`kill -STOP`), which is what fencing needs.
fn monotonic_ms() -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// How long after a pool growth fetches of the topic nudge clients to refresh metadata.
pub const NUDGE_WINDOW: Duration = Duration::from_secs(120);

/// Counts a produce request as in flight under one map epoch until dropped: shared by the
/// request and every writer job carrying its records, so it is released only when the last
/// job's upstream outcome is known (not when a client goes away).
pub struct InflightGuard {
    counts: Arc<Mutex<HashMap<(String, u64), usize>>>,
    key: (String, u64),
    /// The fence generation when the map was read (`Registry::may_write`).
    fence_gen: u64,
}

impl InflightGuard {
    /// A guard no registry counts (unit tests of code that carries one).
    #[cfg(test)]
    pub fn untracked() -> Arc<Self> {
        Arc::new(Self {
            counts: Default::default(),
            key: (String::new(), 0),
            fence_gen: 0,
        })
    }
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
        self.loaded_now.notify_waiters();
    }

    /// Turns fencing on (a store with sessions): fenced until the first `unfence`, and whenever
    /// no heartbeat came for `stall_limit` (the process was stopped or starved).
    pub fn enable_fencing(&self, stall_limit: Duration) {
        self.stall_limit_ms
            .store(stall_limit.as_millis() as u64, Ordering::Release);
        self.last_heartbeat_ms
            .store(monotonic_ms(), Ordering::Release);
        self.fencing.store(true, Ordering::Release);
        self.raise_fence();
    }

    fn raise_fence(&self) {
        let _g = self.fence_lock.lock().expect("fence lock");
        self.session_lost.store(true, Ordering::Release);
        self.fence_gen.fetch_add(1, Ordering::AcqRel);
    }

    /// Called every few hundred ms by a task that does nothing else: a gap longer than the
    /// stall limit means this process did not run (kill -STOP, a starved runtime) and its
    /// session may be gone, so it stays fenced until `unfence_if`. The fence goes up before
    /// the new heartbeat is stored, so no reader sees neither.
    pub fn heartbeat(&self) {
        let now = monotonic_ms();
        let gap = now.saturating_sub(self.last_heartbeat_ms.load(Ordering::Acquire));
        if gap > self.stall_limit_ms.load(Ordering::Acquire) && self.fencing.load(Ordering::Acquire)
        {
            self.raise_fence();
            tracing::warn!(
                stalled_ms = gap,
                "this process stalled past its store session's safe limit; managed writes fenced until the maps are re-read"
            );
        }
        self.last_heartbeat_ms.store(now, Ordering::Release);
    }

    /// The store replaced this instance's session (the old one expired): fenced.
    pub fn session_lost(&self) {
        self.raise_fence();
    }

    /// How many times the fence went up; read before confirming the session.
    pub fn fence_generation(&self) -> u64 {
        self.fence_gen.load(Ordering::Acquire)
    }

    /// Lifts the fence if it was not raised again since `generation` was read (before the
    /// session was confirmed and the maps re-read); whether it did.
    pub fn unfence_if(&self, generation: u64) -> bool {
        let _g = self.fence_lock.lock().expect("fence lock");
        if self.fence_gen.load(Ordering::Acquire) != generation {
            return false;
        }
        self.session_lost.store(false, Ordering::Release);
        self.unfenced_now.notify_waiters();
        true
    }

    /// Whether managed writes must stop (see `fencing`). A store that is merely unreachable
    /// does not fence: with no store, no instance can change a map either.
    pub fn fenced(&self) -> bool {
        self.fencing.load(Ordering::Acquire)
            && (monotonic_ms().saturating_sub(self.last_heartbeat_ms.load(Ordering::Acquire))
                > self.stall_limit_ms.load(Ordering::Acquire)
                || self.session_lost.load(Ordering::Acquire))
    }

    /// Waits (at most `limit`) until not fenced; whether it is so.
    pub async fn wait_unfenced(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.unfenced_now.notified();
            if !self.fenced() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            // A stall fence also lifts by time alone: look again now and then.
            let step = tokio::time::Instant::now() + Duration::from_millis(100);
            let _ = tokio::time::timeout_at(step.min(deadline), notified).await;
        }
    }

    /// Whether a job whose guard was taken at `guard` may be written now: not fenced, and no
    /// fence went up since (else the map it was routed by may be stale).
    pub fn may_write(&self, guard: &InflightGuard) -> bool {
        !self.fenced() && guard.fence_gen == self.fence_generation()
    }

    /// Waits (at most `limit`) until the stored maps are loaded; whether they are.
    pub async fn wait_loaded(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.loaded_now.notified();
            if self.loaded() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.loaded();
            }
        }
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

    /// Installs a map unless an equal or newer epoch is already installed. Under the in-flight
    /// lock, so a produce entering concurrently either counts under the old epoch before this
    /// returns or routes by the new map (see `enter`), and concurrent installs never lose one.
    pub fn install(&self, config: TopicConfig, map: ShardMap) -> bool {
        let _counts = self.inflight.lock().expect("inflight lock");
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
        if !cur.contains_key(&config.name) {
            crate::telemetry::zero_topic(&config.name);
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

    /// The current map of `topic` and a guard counting one produce in flight under its epoch,
    /// taken together under the lock `install` holds: the seal protocol, which waits until no
    /// produce of an older epoch is in flight after installing a new map, can never miss one
    /// that read the old map. `None`: not managed.
    pub fn enter(&self, topic: &str) -> Option<(Arc<Managed>, Arc<InflightGuard>)> {
        let mut counts = self.inflight.lock().expect("inflight lock");
        let m = self.topics.load().get(topic).cloned()?;
        let key = (topic.to_string(), m.map.epoch);
        *counts.entry(key.clone()).or_default() += 1;
        Some((
            m,
            Arc::new(InflightGuard {
                counts: self.inflight.clone(),
                key,
                fence_gen: self.fence_generation(),
            }),
        ))
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
    fn inflight_counts_follow_guards_taken_with_the_current_map() {
        let r = Registry::default();
        let cfg: TopicConfig = toml::from_str("name = \"t\"\npool = 8").unwrap();
        let map = ShardMap::initial("t", 2, 8).unwrap();
        assert!(r.enter("t").is_none());
        r.install(cfg.clone(), map.clone());
        let (m1, g1) = r.enter("t").unwrap();
        assert_eq!(m1.map.epoch, map.epoch);
        let job = g1.clone(); // a writer job keeps the request's guard
        let mut next = map.split(0, 1, 5).unwrap();
        next.epoch = map.epoch + 1;
        r.install(cfg, next.clone());
        let (m2, g2) = r.enter("t").unwrap();
        assert_eq!(m2.map.epoch, next.epoch);
        assert_eq!(r.inflight_before("t", next.epoch), 1);
        assert_eq!(r.inflight_before("t", next.epoch + 1), 2);
        drop(g1);
        assert_eq!(
            r.inflight_before("t", next.epoch),
            1,
            "the job still holds it"
        );
        drop(job);
        assert_eq!(r.inflight_before("t", next.epoch), 0);
        drop(g2);
        assert_eq!(r.inflight_before("t", 99), 0);
    }

    #[test]
    fn fencing_holds_until_the_maps_are_reread_and_returns_after_a_stall_or_a_lost_session() {
        let r = Registry::default();
        assert!(!r.fenced(), "no fencing without a store that has sessions");
        r.enable_fencing(Duration::from_millis(50));
        assert!(
            r.fenced(),
            "fenced until the maps are read with a confirmed session"
        );
        let cfg: TopicConfig = toml::from_str("name = \"t\"\npool = 8").unwrap();
        r.install(cfg, ShardMap::initial("t", 2, 8).unwrap());
        assert!(r.unfence_if(r.fence_generation()));
        r.heartbeat();
        assert!(!r.fenced());
        let (_, guard) = r.enter("t").unwrap();
        assert!(r.may_write(&guard));
        std::thread::sleep(Duration::from_millis(80));
        assert!(
            r.fenced(),
            "no heartbeat for longer than the limit: stalled"
        );
        let seen = r.fence_generation();
        r.heartbeat();
        assert!(
            r.fenced(),
            "a stall keeps the fence after the heartbeats resume"
        );
        assert!(
            !r.unfence_if(seen),
            "a lift based on what was read before the stall is refused"
        );
        assert!(r.unfence_if(r.fence_generation()));
        assert!(!r.fenced());
        assert!(
            !r.may_write(&guard),
            "a job routed before the stall may carry a stale map"
        );
        r.session_lost();
        assert!(r.fenced());
    }

    #[tokio::test]
    async fn waiting_for_the_maps_ends_when_they_are_loaded_or_the_wait_runs_out() {
        let r = Arc::new(Registry::default());
        assert!(!r.wait_loaded(Duration::from_millis(20)).await);
        let r2 = r.clone();
        let waiter = tokio::spawn(async move { r2.wait_loaded(Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        r.mark_loaded();
        assert!(waiter.await.unwrap());
    }

    #[test]
    fn hottest_key_share() {
        let samples = [1, 1, 1, 2, 3];
        assert_eq!(hottest(&samples), Some((1, 0.6)));
    }
}
