//! How fast a connection's client takes records, and so how much its read-ahead queue should
//! hold: what it will take within `prefetch.horizon_ms` at its rate, at least a full answer
//! for each partition it fetches (the sum of its partition_max_bytes: its next fetch may ask
//! any of them), at most `prefetch.queue_bytes`. A slow consumer keeps a small queue (little
//! read that it may never take, little memory), a fast one the whole allowance.

use std::time::{Duration, Instant};

/// The rate is the bytes delivered, each weighed down by e^(-age/TAU), divided by TAU: the
/// bytes per second of about the last TAU, following a change within a few TAU.
const TAU: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct Pace {
    /// Decayed sum of the record bytes delivered, as of `at`.
    sum: f64,
    at: Option<Instant>,
    /// The least the queue holds: a full answer for each partition of the last fetch.
    floor: usize,
}

impl Pace {
    fn decayed(&self, now: Instant) -> f64 {
        match self.at {
            Some(at) => {
                let age = now.saturating_duration_since(at).as_secs_f64();
                self.sum * (-age / TAU.as_secs_f64()).exp()
            }
            None => 0.0,
        }
    }

    /// A fetch answered now with `bytes` of records; its partitions take `floor` bytes at
    /// most (the sum of their partition_max_bytes).
    pub fn note(&mut self, bytes: usize, floor: usize, now: Instant) {
        self.sum = self.decayed(now) + bytes as f64;
        self.at = Some(now);
        self.floor = floor;
    }

    /// Bytes per second the client took lately.
    pub fn rate(&self, now: Instant) -> f64 {
        self.decayed(now) / TAU.as_secs_f64()
    }

    /// What the queue should hold: the client's rate over `horizon`, at least the floor of
    /// its last fetch, at most `cap`.
    pub fn target(&self, now: Instant, horizon: Duration, cap: usize) -> usize {
        let want = (self.rate(now) * horizon.as_secs_f64()) as usize;
        want.max(self.floor).min(cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_consumer_s_rate_is_learnt_and_sets_the_queue_it_needs() {
        let t0 = Instant::now();
        let mut p = Pace::default();
        // 64 KiB every 100 ms for 10 s: 640 KiB/s.
        for i in 0..100 {
            p.note(64 * 1024, 64 * 1024, t0 + Duration::from_millis(100 * i));
        }
        let now = t0 + Duration::from_millis(9_950);
        let rate = p.rate(now);
        assert!((600.0 * 1024.0..700.0 * 1024.0).contains(&rate), "{rate}");
        let horizon = Duration::from_millis(500);
        let t = p.target(now, horizon, 4 << 20);
        assert!((300 * 1024..350 * 1024).contains(&t), "{t}");
        // Never above the cap, never below one response.
        assert_eq!(p.target(now, Duration::from_secs(60), 4 << 20), 4 << 20);
        assert_eq!(p.target(now, Duration::ZERO, 4 << 20), 64 * 1024);
    }

    #[test]
    fn a_consumer_that_stops_taking_falls_back_to_one_response() {
        let t0 = Instant::now();
        let mut p = Pace::default();
        assert_eq!(
            p.target(t0, Duration::from_secs(1), 1 << 20),
            0,
            "nothing fetched yet"
        );
        for i in 0..20 {
            p.note(1 << 20, 1000, t0 + Duration::from_millis(50 * i));
        }
        let later = t0 + Duration::from_secs(30);
        assert_eq!(p.target(later, Duration::from_secs(1), 1 << 20), 1000);
    }
}
