//! The bounded background embedding pool: a fixed number of threads embedding sampled record
//! text, fed through a bounded queue that the request path only ever *tries* to enter. When
//! the queue is full the sample is dropped and counted; the request never waits.
//!
//! Results go to a sink (a callback on the embedding thread) with the caller's opaque key, so
//! the prefetch engine can fold each vector into the centroid of the consumer or partition
//! the sample came from.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use super::{EmbedError, Embedder};
use crate::config::PrefetchConfig;

/// Bytes of a record's text a sample keeps: minilm reads at most 256 tokens anyway, and
/// copying a large record on the request path would cost what sampling is meant to save.
pub const MAX_SAMPLE_BYTES: usize = 2048;

/// Samples one thread takes per `embed` call: one model batch amortises its fixed cost.
const BATCH: usize = 32;

/// One embedded sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded<K> {
    pub key: K,
    pub vector: Vec<f32>,
}

/// What the pool did since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Samples accepted into the queue.
    pub accepted: u64,
    /// Samples refused because the queue was full (or the pool is stopping).
    pub dropped: u64,
    /// Samples embedded and handed to the sink.
    pub embedded: u64,
    /// Samples lost to an embedder error (or a panicking sink).
    pub failed: u64,
}

#[derive(Default)]
struct Shared {
    /// Samples in the queue: checked before a sample's text is copied.
    queued: AtomicUsize,
    stopping: AtomicBool,
    accepted: AtomicU64,
    dropped: AtomicU64,
    embedded: AtomicU64,
    failed: AtomicU64,
}

type Sink<K> = dyn Fn(Embedded<K>) + Send + Sync;

pub struct Pool<K: Send + 'static> {
    sender: Option<SyncSender<(K, String)>>,
    shared: Arc<Shared>,
    capacity: usize,
    threads: Vec<JoinHandle<()>>,
}

impl<K: Send + 'static> Pool<K> {
    /// `threads` embedding threads behind a queue of `capacity` samples; every embedded
    /// sample is passed to `sink` on the thread that embedded it.
    pub fn start<F>(
        embedder: Arc<dyn Embedder>,
        threads: usize,
        capacity: usize,
        sink: F,
    ) -> Result<Self, EmbedError>
    where
        F: Fn(Embedded<K>) + Send + Sync + 'static,
    {
        let (threads, capacity) = (threads.max(1), capacity.max(1));
        let (sender, receiver) = sync_channel(capacity);
        let receiver = Arc::new(Mutex::new(receiver));
        let sink: Arc<Sink<K>> = Arc::new(sink);
        let shared = Arc::new(Shared::default());
        let mut pool = Self {
            sender: Some(sender),
            shared: shared.clone(),
            capacity,
            threads: Vec::with_capacity(threads),
        };
        for index in 0..threads {
            let worker = Worker {
                receiver: receiver.clone(),
                embedder: embedder.clone(),
                sink: sink.clone(),
                shared: shared.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("sg-embed-{index}"))
                .spawn(move || worker.run())
                // Dropping `pool` on this error stops the threads already started.
                .map_err(|source| EmbedError::Spawn { index, source })?;
            pool.threads.push(handle);
        }
        tracing::info!(
            embedder = embedder.name(),
            threads,
            capacity,
            "prefetch embedding pool started"
        );
        Ok(pool)
    }

    /// The pool `prefetch.embed_threads` and `prefetch.embed_queue` describe.
    pub fn from_config<F>(
        cfg: &PrefetchConfig,
        embedder: Arc<dyn Embedder>,
        sink: F,
    ) -> Result<Self, EmbedError>
    where
        F: Fn(Embedded<K>) + Send + Sync + 'static,
    {
        Self::start(embedder, cfg.embed_threads, cfg.embed_queue, sink)
    }

    /// Queues `text` (its first `MAX_SAMPLE_BYTES`) for embedding under `key`, or drops it
    /// when the queue is full. Never blocks; returns whether the sample was accepted.
    pub fn try_submit(&self, key: K, text: &str) -> bool {
        let Some(sender) = &self.sender else {
            return self.drop_sample();
        };
        // A full queue costs the caller one atomic load, not a copy of the text.
        if self.shared.queued.load(Relaxed) >= self.capacity || self.shared.stopping.load(Relaxed) {
            return self.drop_sample();
        }
        let text = truncate(text, MAX_SAMPLE_BYTES).to_owned();
        self.shared.queued.fetch_add(1, Relaxed);
        match sender.try_send((key, text)) {
            Ok(()) => {
                self.shared.accepted.fetch_add(1, Relaxed);
                metrics::counter!("shardgate_prefetch_embedding_samples_total").increment(1);
                true
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.shared.queued.fetch_sub(1, Relaxed);
                self.drop_sample()
            }
        }
    }

    fn drop_sample(&self) -> bool {
        self.shared.dropped.fetch_add(1, Relaxed);
        metrics::counter!("shardgate_prefetch_embedding_dropped_total").increment(1);
        false
    }

    pub fn stats(&self) -> PoolStats {
        let s = &self.shared;
        PoolStats {
            accepted: s.accepted.load(Relaxed),
            dropped: s.dropped.load(Relaxed),
            embedded: s.embedded.load(Relaxed),
            failed: s.failed.load(Relaxed),
        }
    }

    /// Samples waiting for a thread now.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Relaxed)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

impl<K: Send + 'static> Drop for Pool<K> {
    /// Stops the threads: what is still queued is dropped, not embedded (shutdown should
    /// not wait seconds for a model to work through samples nobody will read).
    fn drop(&mut self) {
        self.shared.stopping.store(true, Relaxed);
        self.sender = None;
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

struct Worker<K> {
    receiver: Arc<Mutex<Receiver<(K, String)>>>,
    embedder: Arc<dyn Embedder>,
    sink: Arc<Sink<K>>,
    shared: Arc<Shared>,
}

impl<K> Worker<K> {
    fn run(self) {
        let mut batch: Vec<(K, String)> = Vec::with_capacity(BATCH);
        let mut failures = 0u64;
        loop {
            {
                // One thread waits on the queue at a time; the others wait for this lock.
                let receiver = self.receiver.lock().unwrap_or_else(PoisonError::into_inner);
                match receiver.recv() {
                    Ok(sample) => batch.push(sample),
                    Err(_) => return, // the pool was dropped
                }
                while batch.len() < BATCH {
                    match receiver.try_recv() {
                        Ok(sample) => batch.push(sample),
                        Err(_) => break,
                    }
                }
            }
            let n = batch.len();
            self.shared.queued.fetch_sub(n, Relaxed);
            if self.shared.stopping.load(Relaxed) {
                return;
            }
            let started = Instant::now();
            // A panicking embedder or sink must not take the thread (and so the pool) down.
            let outcome = catch_unwind(AssertUnwindSafe(|| self.embed(&mut batch)));
            metrics::histogram!("shardgate_prefetch_embedding_batch_seconds")
                .record(started.elapsed().as_secs_f64());
            let error = match outcome {
                Ok(Ok(())) => {
                    self.shared.embedded.fetch_add(n as u64, Relaxed);
                    None
                }
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("panicked (embedder or sink)".to_string()),
            };
            batch.clear();
            if let Some(error) = error {
                self.shared.failed.fetch_add(n as u64, Relaxed);
                metrics::counter!("shardgate_prefetch_embedding_errors_total").increment(n as u64);
                failures += 1;
                // The first failure and then every power of two: a broken model would
                // otherwise log once per batch, forever.
                if failures.is_power_of_two() {
                    tracing::warn!(
                        embedder = self.embedder.name(),
                        samples = n,
                        failures,
                        "prefetch embedding failed: {error}"
                    );
                }
            }
        }
    }

    fn embed(&self, batch: &mut Vec<(K, String)>) -> Result<(), EmbedError> {
        let vectors = {
            let texts: Vec<&str> = batch.iter().map(|(_, t)| t.as_str()).collect();
            self.embedder.embed(&texts)?
        };
        if vectors.len() != batch.len() {
            return Err(EmbedError::Embed {
                embedder: self.embedder.name(),
                texts: batch.len(),
                message: format!("{} vectors came back", vectors.len()),
            });
        }
        for ((key, _), vector) in batch.drain(..).zip(vectors) {
            (self.sink)(Embedded { key, vector });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{Receiver, channel};
    use std::time::Duration;

    use super::super::{Hashing, cosine};
    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    fn hashing() -> Arc<dyn Embedder> {
        Arc::new(Hashing::new(64).unwrap())
    }

    /// A pool whose results arrive on a channel.
    fn pool(threads: usize, capacity: usize) -> (Pool<u32>, Receiver<Embedded<u32>>) {
        let (tx, rx) = channel();
        let tx = Mutex::new(tx);
        let pool = Pool::start(hashing(), threads, capacity, move |e| {
            let _ = tx.lock().unwrap().send(e);
        })
        .unwrap();
        (pool, rx)
    }

    #[test]
    fn every_accepted_sample_comes_back_with_its_key_and_vector() {
        let (pool, rx) = pool(2, 1000);
        let texts: Vec<String> = (0..200)
            .map(|i| format!("event {i} of kind k{}", i % 7))
            .collect();
        for (i, t) in texts.iter().enumerate() {
            assert!(pool.try_submit(i as u32, t));
        }
        let direct = Hashing::new(64).unwrap();
        let mut seen = vec![false; texts.len()];
        for _ in 0..texts.len() {
            let e = rx.recv_timeout(WAIT).expect("a result");
            let want = direct.embed(&[texts[e.key as usize].as_str()]).unwrap();
            assert_eq!(e.vector, want[0], "key {}", e.key);
            seen[e.key as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
        let s = pool.stats();
        assert_eq!((s.accepted, s.dropped, s.failed), (200, 0, 0));
        // `embedded` is counted after the sink ran for the whole batch.
        let deadline = Instant::now() + WAIT;
        while pool.stats().embedded < 200 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(pool.stats().embedded, 200);
        assert_eq!(pool.queued(), 0);
    }

    #[test]
    fn a_full_queue_drops_samples_without_blocking_and_counts_them() {
        // The sink blocks until the test lets it go, so the one thread is busy and the queue
        // fills: exactly `capacity` samples wait, the rest are dropped at once.
        let (entered_tx, entered_rx) = channel();
        let (release_tx, release_rx) = channel::<()>();
        let (entered_tx, release_rx) = (Mutex::new(entered_tx), Mutex::new(release_rx));
        let (done_tx, done_rx) = channel();
        let done_tx = Mutex::new(done_tx);
        let pool = Pool::start(hashing(), 1, 4, move |e: Embedded<u32>| {
            if e.key == 0 {
                entered_tx.lock().unwrap().send(()).unwrap();
                release_rx.lock().unwrap().recv_timeout(WAIT).unwrap();
            }
            done_tx.lock().unwrap().send(e.key).unwrap();
        })
        .unwrap();
        assert!(pool.try_submit(0, "first"));
        entered_rx
            .recv_timeout(WAIT)
            .expect("the thread took sample 0");
        let started = Instant::now();
        let accepted: Vec<bool> = (1..=10)
            .map(|k| pool.try_submit(k, "queued while busy"))
            .collect();
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "try_submit waited"
        );
        assert_eq!(accepted, [[true; 4].as_slice(), &[false; 6]].concat());
        assert_eq!(pool.queued(), 4);
        let s = pool.stats();
        assert_eq!((s.accepted, s.dropped), (5, 6));

        release_tx.send(()).unwrap();
        let mut keys: Vec<u32> = (0..5)
            .map(|_| done_rx.recv_timeout(WAIT).unwrap())
            .collect();
        keys.sort();
        assert_eq!(keys, [0, 1, 2, 3, 4]);
        assert!(done_rx.recv_timeout(Duration::from_millis(100)).is_err());
        // Room again once the queue drained.
        assert!(pool.try_submit(11, "after"));
        assert_eq!(done_rx.recv_timeout(WAIT).unwrap(), 11);
    }

    #[test]
    fn samples_are_cut_to_max_sample_bytes_on_a_char_boundary() {
        let (pool, rx) = pool(1, 10);
        let long = "é".repeat(MAX_SAMPLE_BYTES); // 2 bytes each: the cut falls inside one
        assert!(pool.try_submit(1, &long));
        let e = rx.recv_timeout(WAIT).unwrap();
        let cut = truncate(&long, MAX_SAMPLE_BYTES);
        assert_eq!(cut.len(), MAX_SAMPLE_BYTES);
        let h = Hashing::new(64).unwrap();
        assert_eq!(e.vector, h.embed(&[cut]).unwrap()[0]);
        assert_eq!(truncate("aé", 2), "a");
        assert!(cosine(&e.vector, &e.vector) > 0.99);
    }

    #[test]
    fn dropping_the_pool_stops_its_threads_and_a_panicking_sink_is_survived() {
        let (tx, rx) = channel();
        let tx = Mutex::new(tx);
        let pool = Pool::start(hashing(), 2, 100, move |e: Embedded<u32>| {
            assert!(e.key != 7, "sink refuses key 7");
            let _ = tx.lock().unwrap().send(e.key);
        })
        .unwrap();
        assert!(pool.try_submit(7, "boom"));
        let deadline = Instant::now() + WAIT;
        while pool.stats().failed == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(pool.stats().failed, 1);
        assert!(pool.try_submit(8, "fine"));
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), 8);
        drop(pool); // joins both threads; hangs here if a thread did not stop
    }
}
