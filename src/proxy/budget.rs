//! One memory budget for the bytes shardgate holds on behalf of clients: request frames from
//! the moment their size is known until their response is written, and responses waiting to
//! be written. When it is used up, client sockets are not read (backpressure, the way a Kafka
//! broker's `queued.max.request.bytes` mutes channels) instead of memory growing.
//!
//! Frames larger than an eighth of the budget ("large") may hold at most half of it together:
//! a few clients sending maximum-size requests slowly can then delay each other, but never the
//! ordinary-sized requests of everybody else.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

pub struct MemoryBudget {
    limit: usize,
    used: AtomicUsize,
    large_used: AtomicUsize,
    freed: Notify,
    /// Readers waiting now: a release wakes anybody only when there are some (the common case
    /// has none, and `Notify::notify_waiters` takes a lock).
    waiters: AtomicUsize,
    /// Handle of `shardgate_memory_budget_used_bytes`, set on every charge and release.
    used_gauge: metrics::Gauge,
}

/// A reader waiting for the budget, counted in `waiters` and shown in
/// `shardgate_memory_budget_waiting` while it waits (the waits counter only counts waits that
/// ended).
struct Waiting<'a>(&'a MemoryBudget);

impl<'a> Waiting<'a> {
    fn start(budget: &'a MemoryBudget) -> Self {
        budget.waiters.fetch_add(1, Ordering::SeqCst);
        metrics::gauge!("shardgate_memory_budget_waiting").increment(1.0);
        Waiting(budget)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::SeqCst);
        metrics::gauge!("shardgate_memory_budget_waiting").decrement(1.0);
    }
}

/// Bytes counted against the budget until dropped.
#[must_use]
pub struct Charge {
    budget: Arc<MemoryBudget>,
    bytes: usize,
    large: bool,
}

impl MemoryBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
            large_used: AtomicUsize::new(0),
            freed: Notify::new(),
            waiters: AtomicUsize::new(0),
            used_gauge: metrics::gauge!("shardgate_memory_budget_used_bytes"),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    fn is_large(&self, bytes: usize) -> bool {
        bytes > self.limit / 8
    }

    /// Waits until `bytes` fit, then counts them. A frame larger than the whole budget (only
    /// possible if the config allows it) is admitted when nothing else is held, so it cannot
    /// wait forever.
    pub async fn reserve(self: &Arc<Self>, bytes: usize) -> Charge {
        let large = self.is_large(bytes);
        if self.try_take(bytes, large) {
            return self.charge_taken(bytes, large);
        }
        let _waiting = Waiting::start(self);
        loop {
            // Register before checking, so a release between the check and the wait is seen;
            // the fence pairs with the one in `Charge::drop` (a release either sees this
            // waiter or its bytes are seen here).
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            std::sync::atomic::fence(Ordering::SeqCst);
            if self.try_take(bytes, large) {
                metrics::counter!("shardgate_memory_budget_waits_total").increment(1);
                return self.charge_taken(bytes, large);
            }
            freed.await;
        }
    }

    /// Counts bytes that are already held (a response produced by a request being answered):
    /// they may push the budget over its limit, which stops reading until they are written.
    pub fn charge(self: &Arc<Self>, bytes: usize) -> Charge {
        self.used.fetch_add(bytes, Ordering::AcqRel);
        self.charge_taken(bytes, false)
    }

    fn try_take(&self, bytes: usize, large: bool) -> bool {
        if large {
            let half = self.limit / 2;
            let lu = self.large_used.load(Ordering::Acquire);
            if lu != 0 && lu + bytes > half {
                return false;
            }
        }
        let mut used = self.used.load(Ordering::Acquire);
        loop {
            if used != 0 && used + bytes > self.limit {
                return false;
            }
            match self.used.compare_exchange_weak(
                used,
                used + bytes,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => used = now,
            }
        }
        if large {
            // Checked and added separately: two large frames racing may both pass the check,
            // overshooting the large share by one frame at most per racing reader.
            self.large_used.fetch_add(bytes, Ordering::AcqRel);
        }
        true
    }

    fn charge_taken(self: &Arc<Self>, bytes: usize, large: bool) -> Charge {
        self.used_gauge.set(self.used() as f64);
        Charge {
            budget: self.clone(),
            bytes,
            large,
        }
    }
}

impl Charge {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        if self.large {
            self.budget
                .large_used
                .fetch_sub(self.bytes, Ordering::AcqRel);
        }
        let now = self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel) - self.bytes;
        self.budget.used_gauge.set(now as f64);
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.budget.waiters.load(Ordering::Relaxed) > 0 {
            self.budget.freed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waits_until_enough_is_released() {
        let b = MemoryBudget::new(1000);
        let a = b.reserve(600).await;
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.reserve(500).await.bytes() }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiting.is_finished(),
            "500 more must not fit in 1000 with 600 held"
        );
        drop(a);
        assert_eq!(waiting.await.unwrap(), 500);
    }

    #[tokio::test]
    async fn large_frames_hold_at_most_half_so_small_ones_still_pass() {
        let b = MemoryBudget::new(8000);
        let l1 = b.reserve(2000).await; // large: more than 8000 / 8
        let l2 = b.reserve(2000).await;
        let third = tokio::spawn({
            let b = b.clone();
            async move { b.reserve(2000).await.bytes() }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !third.is_finished(),
            "a third large frame exceeds half of the budget"
        );
        // Ordinary frames still have the other half.
        let small: Vec<Charge> = futures::future::join_all((0..3).map(|_| b.reserve(1000))).await;
        assert_eq!(b.used(), 7000);
        drop(small);
        drop(l1);
        assert_eq!(third.await.unwrap(), 2000);
        drop(l2);
    }

    #[tokio::test]
    async fn an_oversized_frame_passes_alone() {
        let b = MemoryBudget::new(100);
        let c = b.reserve(500).await;
        assert_eq!(b.used(), 500);
        drop(c);
        assert_eq!(b.used(), 0);
    }

    #[tokio::test]
    async fn forced_charges_stop_reservations_until_released() {
        let b = MemoryBudget::new(100);
        let forced = b.charge(150);
        let next = tokio::spawn({
            let b = b.clone();
            async move { b.reserve(10).await.bytes() }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!next.is_finished());
        drop(forced);
        assert_eq!(next.await.unwrap(), 10);
    }
}
