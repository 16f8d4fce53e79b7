//! Record bytes held in connections' read-ahead queues: per connection and for the whole
//! process (`prefetch.max_bytes` bounds the sum), kept true by each entry's guard.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Record bytes in all connections' queues of this process (`prefetch.max_bytes` bounds it).
static QUEUED: AtomicUsize = AtomicUsize::new(0);

pub fn total() -> usize {
    QUEUED.load(Ordering::Relaxed)
}

/// Record bytes of one queue entry, counted for its connection and the process until dropped;
/// dropped without being taken by a fetch, they were read from upstream for nothing
/// (`shardgate_prefetch_wasted_bytes_total`).
pub(super) struct Counted {
    conn: Arc<AtomicUsize>,
    n: usize,
    taken: bool,
}

impl Counted {
    pub(super) fn new(conn: &Arc<AtomicUsize>, n: usize) -> Self {
        conn.fetch_add(n, Ordering::Relaxed);
        QUEUED.fetch_add(n, Ordering::Relaxed);
        metrics::gauge!("shardgate_prefetch_queue_bytes").increment(n as f64);
        Self {
            conn: conn.clone(),
            n,
            taken: false,
        }
    }

    /// A fetch took the entry's records (to deliver them, or to hold them at a gate again).
    pub(super) fn taken(&mut self) {
        self.taken = true;
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.conn.fetch_sub(self.n, Ordering::Relaxed);
        QUEUED.fetch_sub(self.n, Ordering::Relaxed);
        metrics::gauge!("shardgate_prefetch_queue_bytes").decrement(self.n as f64);
        if !self.taken && self.n > 0 {
            metrics::counter!("shardgate_prefetch_wasted_bytes_total").increment(self.n as u64);
        }
    }
}
