//! Record bytes held in connections' read-ahead queues: per connection and for the whole
//! process (`prefetch.max_bytes` bounds the sum), kept true by each entry's guard.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Record bytes in all connections' queues of this process (`prefetch.max_bytes` bounds it).
static QUEUED: AtomicUsize = AtomicUsize::new(0);

pub fn total() -> usize {
    QUEUED.load(Ordering::Relaxed)
}

/// Record bytes of one queue entry, counted for its connection and the process until dropped.
pub(super) struct Counted {
    conn: Arc<AtomicUsize>,
    n: usize,
}

impl Counted {
    pub(super) fn new(conn: &Arc<AtomicUsize>, n: usize) -> Self {
        conn.fetch_add(n, Ordering::Relaxed);
        QUEUED.fetch_add(n, Ordering::Relaxed);
        metrics::gauge!("shardgate_prefetch_queue_bytes").increment(n as f64);
        Self {
            conn: conn.clone(),
            n,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.conn.fetch_sub(self.n, Ordering::Relaxed);
        QUEUED.fetch_sub(self.n, Ordering::Relaxed);
        metrics::gauge!("shardgate_prefetch_queue_bytes").decrement(self.n as f64);
    }
}
